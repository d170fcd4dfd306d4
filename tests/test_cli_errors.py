"""User errors end in one line on stderr (`refinery: error: what; what to do`) and an exit status,
never a traceback unless --debug; a run that keeps nothing or loses most documents to errors fails."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pipelines.cli import main

REPO = Path(__file__).resolve().parents[1]
ONE_PAGE = "warc/commoncrawl/whirlwind_CC-MAIN-2024-22.warc.gz"  # one HTML response, in English


def _config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def _curate(tmp_path: Path, config: str, inputs: list[str], *extra: str) -> int:
    return main(["-q", "curate", config, "--input", *inputs, "--output", str(tmp_path / "out"), *extra])


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("refinery: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(("yaml_text", "named"), [
    ("read: {statuses: 200}\nsteps:\n  - extract: {}\n", "`statuses`"),
    ("steps:\n  - extract: {}\n  - language: {min_score: high}\n", "`min_score`"),
    ("steps:\n  - extract: {}\ndedup:\n  - dedup_minhash: {bands: \"26\"}\n", "`bands`"),
    ("steps:\n  - extract: {timeout_s: [5]}\n", "`timeout_s` must be a number"),
    ("steps:\n  - extract: {}\n  - language: {languages: [english]}\n", "did you mean 'en'"),
    ("", "config is empty"),
    ("steps:\n  - extract: {}\nsteps: []\n", "duplicate key 'steps'"),
    ("steps:\n  - language: {}\n", "no `extract` step"),
])
def test_config_mistakes_are_one_line_usage_errors(shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                  yaml_text: str, named: str) -> None:
    code = _curate(tmp_path, _config(tmp_path, yaml_text), [str(shared_data / ONE_PAGE)])
    assert code == 2
    assert named in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out" / "documents").exists()


def test_output_under_a_file_is_a_one_line_error(shared_data: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "a_file").write_text("x")
    code = main(["-q", "curate", _config(tmp_path, "steps:\n  - extract: {}\n"), "--input",
                 str(shared_data / ONE_PAGE), "--output", str(tmp_path / "a_file" / "out")])
    assert code == 2 and "a_file" in _one_error_line(capsys.readouterr().err)


def _fail_with(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    def curate(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise error

    monkeypatch.setattr("curation.pipeline.curate", curate)


@pytest.mark.parametrize(("error", "code", "says"), [
    (OSError(errno.ENOSPC, "No space left on device", "/data/out/documents/x.parquet"), 1,
     "disk full at /data/out/documents/x.parquet"),
    (PermissionError(errno.EACCES, "Permission denied", "/read-only/out"), 2, "permission denied: /read-only/out"),
    (FileExistsError("export: /m/model.safetensors exists; pass --force to replace it"), 2, "pass --force"),
])
def test_os_errors_are_one_line(shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                monkeypatch: pytest.MonkeyPatch, error: OSError, code: int, says: str) -> None:
    _fail_with(monkeypatch, error)
    assert _curate(tmp_path, _config(tmp_path, "steps:\n  - extract: {}\n"), [str(shared_data / ONE_PAGE)]) == code
    assert says in _one_error_line(capsys.readouterr().err)


def test_debug_shows_the_traceback(shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fail_with(monkeypatch, PermissionError(errno.EACCES, "Permission denied", "/read-only/out"))
    config = _config(tmp_path, "steps:\n  - extract: {}\n")
    with pytest.raises(PermissionError):
        main(["--debug", "-q", "curate", config, "--input", str(shared_data / ONE_PAGE), "--output", "o"])


def test_interrupt_exits_130_without_a_traceback(shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _fail_with(monkeypatch, KeyboardInterrupt())
    assert _curate(tmp_path, _config(tmp_path, "steps:\n  - extract: {}\n"), [str(shared_data / ONE_PAGE)]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_a_bug_keeps_its_traceback(shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fail_with(monkeypatch, KeyError("a bug"))
    with pytest.raises(KeyError):
        _curate(tmp_path, _config(tmp_path, "steps:\n  - extract: {}\n"), [str(shared_data / ONE_PAGE)])


def test_a_user_error_in_a_subprocess_has_no_traceback(shared_data: Path, tmp_path: Path) -> None:
    config = _config(tmp_path, "read: {statuses: 200}\nsteps:\n  - extract: {}\n")
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "-q", "curate", config, "--input",
                           str(shared_data / ONE_PAGE), "--output", str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("refinery: error: read: parameter `statuses`")


# -- a run that keeps nothing, or loses most documents to errors, fails ------------------------


def test_a_run_that_keeps_nothing_exits_1(shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = _config(tmp_path, "steps:\n  - extract: {}\n  - language: {languages: [eo]}\n")
    assert _curate(tmp_path, config, [str(shared_data / ONE_PAGE)]) == 1
    assert "kept no documents" in _one_error_line(capsys.readouterr().err)


def test_a_run_that_loses_most_documents_to_errors_exits_1(shared_data: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    def step(name: str, docs_in: int, docs_out: int, dropped: dict[str, int]) -> dict[str, Any]:
        return {"name": name, "docs_in": docs_in, "docs_out": docs_out, "dropped": dropped,
                "errors": dict(dropped), "counters": {}, "samples": [], "seconds": 0.0}

    stats = {"documents_read": 10, "documents_written": 2, "wall_seconds": 0.1, "input_files": 1,
             "inputs_unavailable": [],
             "steps": [step("read", 10, 10, {}), step("extract", 10, 3, {"extract.error": 6, "extract.timeout": 1}),
                       step("c4", 3, 2, {"c4.too_few_sentences": 1})]}
    monkeypatch.setattr("curation.pipeline.curate", lambda *a, **k: stats)
    assert _curate(tmp_path, _config(tmp_path, "steps:\n  - extract: {}\n"), [str(shared_data / ONE_PAGE)]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "7 of 10 documents (70%) were lost to errors (extract.error 6, extract.timeout 1)" in line


def test_read_errors_are_summed_up_on_stderr(shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    inputs = [str(shared_data / "warc/malformed/resiliparse_clipped.warc.gz"), str(shared_data / ONE_PAGE)]
    assert _curate(tmp_path, _config(tmp_path, "steps:\n  - extract: {}\n"), inputs) == 0
    err = capsys.readouterr().err
    assert "refinery: warning: 1 of 2 input files had read errors (read.malformed 1); see " in err


def test_random_bytes_as_input_fail_loudly(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    noise = tmp_path / "noise.warc.gz"
    noise.write_bytes(bytes(range(256)) * 20)
    assert _curate(tmp_path, _config(tmp_path, "steps:\n  - extract: {}\n"), [str(noise)]) == 1
    err = capsys.readouterr().err
    assert "1 of 1 input files had read errors" in err and "no documents were read" in err


# -- Ray addresses without a cluster fail fast -------------------------------------------------


@pytest.fixture
def no_ray_running(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    if ray.is_initialized():  # left by an earlier test: the executor would reuse it
        ray.shutdown()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")


@pytest.mark.timeout(90)
def test_unreachable_ray_address_fails_fast_with_what_to_do(shared_data: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture, no_ray_running: None) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    code = _curate(tmp_path, _config(tmp_path, "steps:\n  - extract: {}\n"), [str(shared_data / ONE_PAGE)],
                   "--executor", "ray", "--ray-address", f"127.0.0.1:{port}")
    assert code == 2 and time.monotonic() - t0 < 30
    line = _one_error_line(capsys.readouterr().err)
    assert f"no Ray cluster at 127.0.0.1:{port}" in line and "ray start --head" in line


@pytest.mark.timeout(90)
def test_ray_auto_without_a_cluster_says_so(shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                            monkeypatch: pytest.MonkeyPatch, no_ray_running: None) -> None:
    from ray._private import services

    # Nothing recorded by `ray start` and no GCS process: what a machine without a cluster shows.
    monkeypatch.setattr(services, "find_gcs_addresses", lambda: [])
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir: None)
    code = _curate(tmp_path, _config(tmp_path, "steps:\n  - extract: {}\n"), [str(shared_data / ONE_PAGE)],
                   "--executor", "ray", "--ray-address", "auto")
    assert code == 2
    assert "no Ray cluster at auto" in _one_error_line(capsys.readouterr().err)
