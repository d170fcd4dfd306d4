"""Code: run the task's unit tests on the completion, in the sandbox.

Two ground-truth forms:
- HumanEval (`prompt`, `test` defining `check(candidate)`, `entry_point`): the program is the
  prompt, the completion and `check(entry_point)`, as the HumanEval harness builds it; 1 if every
  assert holds, else 0.
- a list of assert statements (`{"tests": ["assert f(1) == 2", ...]}`, MBPP / open-instruct style):
  the score is the fraction that hold, as open-instruct's `CodeVerifier` (pass rate).

A completion may be the function body (HumanEval's continuation) or a whole function, bare or in a
```python block (the last block counts): when it defines the entry point, it replaces the stub.

A program that exits early (`sys.exit(0)`, `os._exit(0)` before the tests ran) must not pass: the
harness reads a random nonce from stdin before the solution runs, closes stdin, and prints the
nonce only after the tests; a run passes only with that last line. (A program that walks the
interpreter's frames could still find it; the sandbox bounds what such a program can do.)
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from training.rewards.base import RewardResult, VerifiableTask, Verifier, read_jsonl, require
from training.rewards.sandbox import ExecJob, ExecResult, Sandbox, SandboxLimits

DEFAULT_INSTRUCTION = ("Complete the following Python function. Reply with the whole function in a "
                       "```python code block.")
_FENCE = re.compile(r"```(?:python|py|Python)?[ \t]*\n(.*?)```", re.DOTALL)

# The harness runs the solution, then the tests, in one namespace named "solution" (a completion's
# `if __name__ == "__main__":` block does not run, as in HumanEval's own harness).
_HARNESS = '''\
import os, sys

def _run():
    nonce = sys.stdin.readline().strip()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    namespace = {"__name__": "solution"}
    with open("solution.py", encoding="utf-8") as f:
        exec(compile(f.read(), "solution.py", "exec"), namespace)
    with open("tests.py", encoding="utf-8") as f:
        tests = f.read()
    MODE
    sys.stdout.write("\\n" + nonce + "\\n")
    sys.stdout.flush()

_run()
'''
_CHECK = '''exec(compile(tests, "tests.py", "exec"), namespace)
    namespace["check"](namespace[ENTRY])'''
_ASSERTS = '''passed = 0
    for i, line in enumerate(tests.split("\\0")):
        try:
            exec(compile(line, f"test_{i}", "exec"), namespace)
            passed += 1
        except Exception as e:  # one failing assert does not hide the others
            print(f"test {i} failed: {type(e).__name__}: {e}"[:200], file=sys.stderr)
    nonce = f"{nonce} {passed}"'''


def extract_code(completion: str) -> str:
    """The last ```python block of the completion, else the completion itself."""
    blocks = _FENCE.findall(completion)
    return blocks[-1] if blocks else completion


def build_job(completion: str, ground_truth: Mapping[str, Any], limits: SandboxLimits | None = None
              ) -> tuple[ExecJob, str]:
    """The sandbox job for one completion and the nonce its run must print last."""
    code = extract_code(completion)
    nonce = secrets.token_hex(16)
    if "tests" in ground_truth:
        tests = list(ground_truth["tests"])
        if not tests or any("\0" in t for t in tests):
            raise ValueError("code ground truth 'tests' must be a non-empty list of statements without NUL bytes")
        prefix = ground_truth.get("prompt", "")
        solution = f"{prefix}\n{code}" if prefix and not _defines_any(code, prefix) else code
        harness = _HARNESS.replace("MODE", _ASSERTS)
        test_text = "\0".join(tests)
    else:
        missing = [k for k in ("prompt", "test", "entry_point") if k not in ground_truth]
        if missing:
            raise ValueError(f"code ground truth needs prompt, test and entry_point (HumanEval) or tests "
                             f"(a list of asserts); missing {', '.join(missing)}")
        prompt, entry = ground_truth["prompt"], ground_truth["entry_point"]
        if re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", code, flags=re.MULTILINE):
            solution = f"{prompt}\n    pass\n\n{code}"  # the stub stays for its imports and helpers
        else:
            solution = prompt + code
        harness = _HARNESS.replace("MODE", _CHECK.replace("ENTRY", repr(entry)))
        test_text = ground_truth["test"]
    files = {"main.py": harness, "solution.py": solution, "tests.py": test_text}
    return ExecJob(files, stdin=nonce + "\n", limits=limits), nonce


def _defines_any(code: str, prompt: str) -> bool:
    names = re.findall(r"^\s*def\s+(\w+)\s*\(", prompt, flags=re.MULTILINE)
    return any(re.search(rf"^\s*def\s+{re.escape(n)}\s*\(", code, flags=re.MULTILINE) for n in names)


def score_run(result: ExecResult, nonce: str, n_tests: int | None) -> RewardResult:
    """Reward of one sandbox run: see the module docstring."""
    last = next((ln.strip() for ln in reversed(result.stdout.splitlines()) if ln.strip()), "")
    if n_tests is None:
        if result.ok and last == nonce:
            return RewardResult(1.0, "all tests passed")
        if result.ok:
            return RewardResult(0.0, "exited before the tests finished")
        return RewardResult(0.0, result.reason())
    head, _, count = last.partition(" ")
    if not result.ok or head != nonce or not count.isdigit():
        return RewardResult(0.0, result.reason() if not result.ok else "exited before the tests finished")
    passed = min(int(count), n_tests)
    return RewardResult(passed / n_tests, f"{passed}/{n_tests} tests passed")


class CodeVerifier(Verifier):
    """Scores completions by running their tests in a `Sandbox` (made on first use unless given);
    `score_batch` runs one program per core at a time."""

    name = "code"

    def __init__(self, sandbox: Sandbox | None = None, limits: SandboxLimits | None = None) -> None:
        self._sandbox = sandbox
        self.limits = limits

    @property
    def sandbox(self) -> Sandbox:
        if self._sandbox is None:
            self._sandbox = Sandbox(self.limits)
        return self._sandbox

    def __call__(self, completion: str, ground_truth: Any) -> RewardResult:
        return self.score_batch([completion], [ground_truth])[0]

    def score_batch(self, completions: Sequence[str], ground_truths: Sequence[Any]) -> list[RewardResult]:
        if len(completions) != len(ground_truths):
            raise ValueError(f"{len(completions)} completions but {len(ground_truths)} ground truths")
        built = [build_job(c, g, self.limits) for c, g in zip(completions, ground_truths, strict=True)]
        results = self.sandbox.run_many([job for job, _ in built])
        return [score_run(res, nonce, len(g["tests"]) if "tests" in g else None)
                for res, (_, nonce), g in zip(results, built, ground_truths, strict=True)]

    def close(self) -> None:
        if self._sandbox is not None:
            self._sandbox.close()


def read_tasks(path: str | Path, instruction: str = DEFAULT_INSTRUCTION) -> list[VerifiableTask]:
    """HumanEval rows (`task_id`, `prompt`, `test`, `entry_point`) -> tasks; the canonical solution,
    when present, is kept in `meta`."""
    path = Path(path)
    tasks = []
    for lineno, row in read_jsonl(path):
        require(row, ("task_id", "prompt", "test", "entry_point"), f"{path}:{lineno}")
        truth = {k: row[k] for k in ("prompt", "test", "entry_point")}
        content = f"{instruction}\n\n```python\n{row['prompt']}```" if instruction else row["prompt"]
        meta = {"canonical_solution": row["canonical_solution"]} if "canonical_solution" in row else {}
        tasks.append(VerifiableTask(id=f"humaneval/{row['task_id']}", messages=[{"role": "user", "content": content}],
                                    ground_truth=truth, verifier="code", meta=meta))
    return tasks
