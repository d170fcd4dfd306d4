"""The sandbox holds hostile programs: each is stopped, scored 0, and the host is unharmed, in time.

Runs in both isolation modes where the machine allows (namespaces need root with CAP_SYS_ADMIN;
plain mode needs root to drop to an unprivileged uid). The fork bomb runs only with a uid of its
own (root), where RLIMIT_NPROC applies to it and to nothing else of the host.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from training.rewards.code import CodeVerifier, build_job, read_tasks, score_run
from training.rewards.sandbox import ExecJob, Sandbox, SandboxLimits, _processes_of

ROOT = os.geteuid() == 0
LIMITS = SandboxLimits(wall_s=3.0, cpu_s=1, memory_mb=256, nproc=8, file_mb=1, output_kb=16)
# HumanEval-style task the hostile programs pretend to solve: a correct solution scores 1.
TASK = {"prompt": "def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n",
        "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
        "entry_point": "add"}


def _modes() -> list[str]:
    modes = ["plain"] if ROOT else []
    if ROOT:
        with Sandbox(LIMITS, workers=1) as probe:
            if probe.isolation == "namespace":
                modes.insert(0, "namespace")
    return modes


MODES = _modes()
pytestmark = pytest.mark.skipif(not MODES, reason="the sandbox's uid drop needs root")


@pytest.fixture(scope="module", params=MODES)
def sandbox(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    with Sandbox(LIMITS, workers=2, isolation=request.param) as sb:
        yield sb


@pytest.fixture(scope="module")
def verifier(sandbox: Sandbox) -> CodeVerifier:
    return CodeVerifier(sandbox, LIMITS)


def _slot_uids(sandbox: Sandbox) -> list[int]:
    return [u for u in list(sandbox._slots.queue) if u is not None]


def _host_healthy(sandbox: Sandbox) -> None:
    """No process of the sandbox's uids is left, and the host can still start processes."""
    deadline = time.monotonic() + 3
    while any(_processes_of(u) for u in _slot_uids(sandbox)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for u in _slot_uids(sandbox) for p in _processes_of(u)], "sandbox processes outlived the run"
    assert subprocess.run(["true"]).returncode == 0


def _hostile(verifier: CodeVerifier, body: str) -> tuple[float, str, float]:
    """Score a completion that does `body` inside add(); return (score, reason, seconds)."""
    code = "def add(a, b):\n" + "".join(f"    {line}\n" for line in body.strip("\n").splitlines()) + "    return a + b\n"
    start = time.monotonic()
    result = verifier(f"```python\n{code}```", TASK)
    return result.score, result.reason, time.monotonic() - start


def test_a_correct_solution_scores_one_and_a_wrong_one_zero(verifier: CodeVerifier) -> None:
    assert verifier("```python\ndef add(a, b):\n    return a + b\n```", TASK).score == 1.0
    assert verifier("    return a + b\n", TASK).score == 1.0  # a body continuing the prompt
    wrong = verifier("    return a - b\n", TASK)
    assert wrong.score == 0.0 and "AssertionError" in wrong.reason


def test_fork_bomb_is_stopped_by_the_process_limit(verifier: CodeVerifier, sandbox: Sandbox) -> None:
    score, reason, seconds = _hostile(verifier, "import os\nwhile True:\n    try:\n        os.fork()\n"
                                                "    except OSError:\n        pass")
    assert score == 0.0 and seconds < LIMITS.wall_s + 3
    _host_healthy(sandbox)


def test_memory_bomb_fails_at_the_memory_limit(verifier: CodeVerifier, sandbox: Sandbox) -> None:
    score, reason, seconds = _hostile(verifier, "hog = []\nwhile True:\n    hog.append(bytearray(16 << 20))")
    assert score == 0.0 and "MemoryError" in reason and seconds < LIMITS.wall_s + 3
    _host_healthy(sandbox)


def test_endless_loop_is_killed_by_the_cpu_or_wall_limit(verifier: CodeVerifier, sandbox: Sandbox) -> None:
    score, reason, seconds = _hostile(verifier, "while True:\n    pass")
    assert score == 0.0 and reason.split(":")[0] in ("signal", "timeout") and seconds < LIMITS.wall_s + 3
    score, reason, seconds = _hostile(verifier, "import time\ntime.sleep(3600)")
    assert score == 0.0 and reason.startswith("timeout") and seconds < LIMITS.wall_s + 3
    _host_healthy(sandbox)


def test_opening_a_socket_fails(verifier: CodeVerifier, sandbox: Sandbox) -> None:
    import socket

    server = socket.create_server(("127.0.0.1", 0))  # a host service the program must not reach
    port = server.getsockname()[1]
    try:
        score, reason, _ = _hostile(verifier, f"import socket\nsocket.create_connection(('127.0.0.1', {port}), 2)")
        assert score == 0.0 and ("unreachable" in reason or "refused" in reason or "disabled" in reason)
        server.settimeout(0.2)
        with pytest.raises(TimeoutError):
            server.accept()
    finally:
        server.close()


def test_writing_or_deleting_outside_its_directory_fails(verifier: CodeVerifier, sandbox: Sandbox,
                                                         tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    tmp_path.chmod(0o755)  # visible to others, as most of a host is, but not writable
    # Under /tmp: namespace mode does not even see the host's /tmp (FileNotFoundError).
    refused = ("PermissionError", "FileNotFoundError")
    score, reason, _ = _hostile(verifier, f"import os\nos.remove({str(victim)!r})")
    assert score == 0.0 and any(r in reason for r in refused)
    score, reason, _ = _hostile(verifier, f"open({str(tmp_path / 'new.txt')!r}, 'w').write('x')")
    assert score == 0.0 and any(r in reason for r in refused)
    assert victim.read_text() == "precious" and not (tmp_path / "new.txt").exists()
    # Outside /tmp, both modes: the host's directories belong to another uid. (The interpreter's own
    # directory: readable by the sandbox, so its refusal is a permission check, not invisibility.)
    target = Path(sandbox.python).parent / f"refinery-escape-{os.getpid()}.txt"
    try:
        score, reason, _ = _hostile(verifier, f"open({str(target)!r}, 'w').write('x')")
        assert score == 0.0 and "PermissionError" in reason and not target.exists()
    finally:
        target.unlink(missing_ok=True)


@pytest.mark.skipif("namespace" not in MODES, reason="a private /tmp needs namespace isolation")
def test_files_written_to_tmp_stay_in_the_sandbox(tmp_path: Path) -> None:
    marker = f"/tmp/refinery-sandbox-escape-{os.getpid()}"
    with Sandbox(LIMITS, workers=1, isolation="namespace") as sb:
        result = sb.run_python(f"open({marker!r}, 'w').write('x')\nprint(open({marker!r}).read())")
    assert result.ok and result.stdout.strip() == "x"
    assert not Path(marker).exists()


def test_reading_the_users_home_fails(verifier: CodeVerifier, sandbox: Sandbox) -> None:
    home = Path.home()
    score, reason, _ = _hostile(verifier, f"import os\nassert os.listdir({str(home)!r})\n"
                                          f"open(os.path.join({str(home)!r}, os.listdir({str(home)!r})[0])).read()")
    assert score == 0.0
    result = sandbox.run_python(f"import os\nprint(os.listdir({str(home)!r}))")
    assert not result.ok or result.stdout.strip() == "[]"


def test_flooding_stdout_is_cut_at_the_output_limit(verifier: CodeVerifier, sandbox: Sandbox) -> None:
    score, reason, seconds = _hostile(verifier, "while True:\n    print('x' * 1000)")
    assert score == 0.0 and reason.startswith("output_limit") and seconds < LIMITS.wall_s + 3
    result = sandbox.run_python("import sys\nsys.stdout.write('y' * (1 << 20))")
    assert result.status == "output_limit" and len(result.stdout) == LIMITS.output_kb * 1024
    _host_healthy(sandbox)


def test_killing_its_parent_or_the_host_fails(verifier: CodeVerifier, sandbox: Sandbox) -> None:
    host = os.getpid()
    for body in ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
                 f"import os, signal\nos.kill({host}, signal.SIGKILL)",
                 "import os, signal\nos.kill(-1, signal.SIGKILL)\nraise SystemExit(1)"):
        score, _, _ = _hostile(verifier, body)
        assert score == 0.0
    assert sandbox.run_python("print('still serving')").stdout.strip() == "still serving"
    _host_healthy(sandbox)


def test_exiting_early_does_not_pass_the_tests(verifier: CodeVerifier) -> None:
    for hack in ("import os\nos._exit(0)", "import sys\nsys.exit(0)", "raise SystemExit(0)"):
        code = f"```python\n{hack}\ndef add(a, b):\n    return 0\n```"
        result = verifier(code, TASK)
        assert result.score == 0.0, hack
    # Reading the nonce back from stdin does not work either: it is consumed before the solution runs.
    cheat = "```python\nimport sys\nprint(sys.stdin.read())\nsys.stdout.flush()\nimport os\nos._exit(0)\n```"
    assert verifier(cheat, TASK).score == 0.0


def test_environment_is_scrubbed_and_the_user_unprivileged(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REFINERY_SECRET_TOKEN", "hunter2")
    result = sandbox.run_python("import os\nprint(os.getuid(), sorted(os.environ))")
    uid, names = result.stdout.split(" ", 1)
    assert result.ok and int(uid) != 0 and "REFINERY_SECRET_TOKEN" not in names
    assert set(ast.literal_eval(names)) <= {"PATH", "HOME", "LANG", "TMPDIR", "PYTHONDONTWRITEBYTECODE",
                                            "PYTHONIOENCODING", "PYTHONHASHSEED"}


def test_large_files_are_refused_beyond_the_file_size_limit(sandbox: Sandbox) -> None:
    result = sandbox.run_python("open('big.bin', 'wb').write(b'x' * (4 << 20))")
    assert not result.ok and ("File too large" in result.stderr or "SIGXFSZ" in result.stderr)


def test_programs_run_in_parallel_across_workers(sandbox: Sandbox) -> None:
    jobs = [ExecJob({"main.py": "import time\ntime.sleep(1.0)\nprint('done')"}) for _ in range(4)]
    start = time.monotonic()
    results = sandbox.run_many(jobs)
    elapsed = time.monotonic() - start
    assert [r.stdout.strip() for r in results] == ["done"] * 4
    assert elapsed < 3.5, f"4 one-second programs on 2 workers took {elapsed:.1f}s"  # serial: >= 4 s


def test_stdin_reaches_the_program_and_assert_lists_score_the_pass_rate(sandbox: Sandbox) -> None:
    assert sandbox.run_python("print(input()[::-1])", stdin="olleh\n").stdout.strip() == "hello"
    truth = {"tests": ["assert f(1) == 2", "assert f(2) == 4", "assert f(3) == 7"]}
    job, nonce = build_job("def f(x):\n    return 2 * x\n", truth)
    assert score_run(sandbox.run(job), nonce, 3).score == pytest.approx(2 / 3)


def test_bad_jobs_and_limits_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="wall_s must be > 0"):
        SandboxLimits(wall_s=0)
    with pytest.raises(ValueError, match="isolation must be one of"):
        Sandbox(isolation="docker")
    with pytest.raises(ValueError, match="prompt, test and entry_point"):
        build_job("x = 1", {"prompt": "def f():\n"})


@pytest.mark.integration
def test_humaneval_canonical_solutions_pass_and_mutants_fail(shared_data: Path) -> None:
    tasks = read_tasks(shared_data / "verifiable" / "humaneval" / "HumanEval.jsonl.gz")
    assert len(tasks) == 164
    limits = SandboxLimits(wall_s=10.0, cpu_s=5)
    with Sandbox(limits) as sb:
        verifier = CodeVerifier(sb, limits)
        truths = [t.ground_truth for t in tasks]
        canonical = verifier.score_batch([t.meta["canonical_solution"] for t in tasks], truths)
        assert [t.id for t, r in zip(tasks, canonical, strict=True) if r.score != 1.0] == []

        # Mutant: every `return X` of the solution returns None instead.
        class NoneReturns(ast.NodeTransformer):
            def visit_Return(self, node: ast.Return) -> ast.Return:
                return ast.Return(value=ast.Constant(None))

        mutants = [ast.unparse(NoneReturns().visit(ast.parse(t.ground_truth["prompt"] + t.meta["canonical_solution"])))
                   for t in tasks]
        mutated = verifier.score_batch([f"```python\n{m}\n```" for m in mutants], truths)
        assert [t.id for t, r in zip(tasks, mutated, strict=True) if r.score != 0.0] == []


def test_the_launcher_is_not_importable_as_a_side_effect() -> None:
    # The launcher runs as root in its own process; importing the package must never execute it.
    code = "import training.rewards.sandbox, training.rewards.code; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok"
