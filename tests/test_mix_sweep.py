"""The proxy sweep: real trainer runs per mixture (in-process and as Ray tasks), a results table, resume
without retraining finished proxies (also after a kill), and failed proxies retried once, then recorded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from mixing_data import make_inputs, mix_config

from pipelines.mix import tokenize_fn
from proxy_mix.config import MixConfig, MixConfigError, config_from_dict
from proxy_mix.pools import build_pools
from proxy_mix.proxy import write_result
from proxy_mix.sweep import run_sweep

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_inputs(shared_data, tmp_path_factory.mktemp("sweep_inputs"))


def _setup(inputs: dict[str, Path], out: Path, **overrides: Any) -> tuple[MixConfig, dict[str, Any]]:
    cfg = config_from_dict(mix_config(inputs, out, **overrides))
    return cfg, build_pools(cfg, tokenize_fn(cfg.tokenizer), log=lambda _: None)


def fake_proxy(task: dict[str, Any]) -> dict[str, Any]:
    """A stand-in for train_proxy: loss from the weights, result written as the real one does."""
    loss = {t["name"]: 5.0 - task["weights"].get("reference", 0.0) for t in task["targets"]}
    result = {"id": task["id"], "status": "ok", "weights": task["weights"], "loss": loss, "bpb": loss,
              "attempt": task["attempt"]}
    write_result(Path(task["dir"]), result)
    return result


def test_killed_sweep_resumes_without_redoing_finished_proxies(inputs: dict[str, Path], tmp_path: Path) -> None:
    cfg, pools = _setup(inputs, tmp_path / "out", sweep={"proxies": 6})
    trained: list[int] = []

    def dies_at_third(task: dict[str, Any]) -> dict[str, Any]:
        if len(trained) == 2:
            raise KeyboardInterrupt  # the sweep is killed while proxy 2 trains
        trained.append(task["id"])
        return fake_proxy(task)

    with pytest.raises(KeyboardInterrupt):
        run_sweep(cfg, pools, executor="local", train_fn=dies_at_third, progress=False, log=lambda _: None)
    assert trained == [0, 1]
    before = {k: (tmp_path / f"out/sweep/proxies/p000{k}/result.json").stat().st_mtime_ns for k in (0, 1)}
    again: list[int] = []

    def counting(task: dict[str, Any]) -> dict[str, Any]:
        again.append(task["id"])
        return fake_proxy(task)

    summary = run_sweep(cfg, pools, executor="local", train_fn=counting, progress=False, log=lambda _: None)
    assert again == [2, 3, 4, 5]
    assert summary["ok"] == 6 and summary["skipped"] == 2 and summary["trained_now"] == 4
    assert {k: (tmp_path / f"out/sweep/proxies/p000{k}/result.json").stat().st_mtime_ns for k in (0, 1)} == before
    # More proxies later: the first six are kept as they are.
    cfg8, _ = _setup(inputs, tmp_path / "out", sweep={"proxies": 8})
    again.clear()
    run_sweep(cfg8, pools, executor="local", train_fn=counting, progress=False, log=lambda _: None)
    assert again == [6, 7]


def test_a_failed_proxy_is_retried_once_then_recorded_as_failed(inputs: dict[str, Path], tmp_path: Path) -> None:
    cfg, pools = _setup(inputs, tmp_path / "out")
    attempts: dict[int, int] = {}

    def flaky(task: dict[str, Any]) -> dict[str, Any]:
        attempts[task["id"]] = attempts.get(task["id"], 0) + 1
        if task["id"] == 1:
            raise RuntimeError("out of memory (always)")
        if task["id"] == 2 and task["attempt"] == 1:
            raise RuntimeError("worker lost (once)")
        return fake_proxy(task)

    summary = run_sweep(cfg, pools, executor="local", train_fn=flaky, progress=False, log=lambda _: None)
    assert attempts == {0: 1, 1: 2, 2: 2, 3: 1}
    assert summary["ok"] == 3 and summary["failed"] == 1
    rows = {r["id"]: r for r in json.loads((tmp_path / "out/sweep/results.json").read_text())["proxies"]}
    assert rows[1]["status"] == "failed" and rows[1]["attempts"] == 2 and "out of memory" in rows[1]["error"]
    assert rows[2]["status"] == "ok" and rows[2]["attempt"] == 2
    table = (tmp_path / "out/sweep/results.csv").read_text().splitlines()
    assert len(table) == 5 and table[2].startswith("1,failed,")
    # The next sweep retries only the failed proxy.
    attempts.clear()
    summary = run_sweep(cfg, pools, executor="local", train_fn=fake_proxy, progress=False, log=lambda _: None)
    assert summary["ok"] == 4 and summary["trained_now"] == 1


def test_a_sweep_with_other_settings_is_refused(inputs: dict[str, Path], tmp_path: Path) -> None:
    cfg, pools = _setup(inputs, tmp_path / "out")
    run_sweep(cfg, pools, executor="local", train_fn=fake_proxy, progress=False, log=lambda _: None)
    other = config_from_dict(mix_config(inputs, tmp_path / "out", sweep={"lr": 1e-3}))
    with pytest.raises(MixConfigError, match="other pools, targets or sweep settings"):
        run_sweep(other, pools, executor="local", train_fn=fake_proxy, progress=False, log=lambda _: None)


def test_proxies_are_trainer_runs_evaluated_on_every_target(inputs: dict[str, Path], tmp_path: Path,
                                                           one_thread: None) -> None:
    cfg, pools = _setup(inputs, tmp_path / "out", sweep={"proxies": 2})
    summary = run_sweep(cfg, pools, executor="local", progress=False, log=lambda _: None)
    assert summary["ok"] == 2
    for r in summary["proxies"]:
        assert set(r["loss"]) == {"ref", "web"} and all(0 < v < 10 for v in r["loss"].values())
        assert all(v is not None and v > 0 for v in r["bpb"].values())
        assert r["tokens"] >= 4096 and r["model"] == "1m"
        assert sum(r["realized"].values()) == pytest.approx(1.0)
        run = tmp_path / f"out/sweep/proxies/p{r['id']:04d}/run"
        assert (run / "metrics.jsonl").is_file() and not (run / "checkpoints").exists()  # checkpoints dropped
    # Different mixtures, different losses.
    assert summary["proxies"][0]["loss"] != summary["proxies"][1]["loss"]


@pytest.mark.slow
def test_proxies_run_as_ray_tasks(inputs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    cfg, pools = _setup(inputs, tmp_path / "out", sweep={"proxies": 2})
    summary = run_sweep(cfg, pools, executor="ray", workers=2, progress=False, log=lambda _: None)
    assert summary["ok"] == 2 and summary["failed"] == 0
    assert summary["proxies_per_core_hour"] > 0 and summary["cores"] == 2


@pytest.mark.slow
def test_a_killed_cli_sweep_resumes_without_retraining(inputs: dict[str, Path], tmp_path: Path) -> None:
    config = tmp_path / "mix.yaml"
    config.write_text(yaml.safe_dump(mix_config(inputs, tmp_path / "out", sweep={"proxies": 4})))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pipelines.cli", "-q", "mix", "sweep", str(config), "--executor", "local"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = tmp_path / "out/sweep/proxies/p0000/result.json"
    deadline = time.monotonic() + 300
    while not first.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.is_file(), proc.stderr.read().decode() if proc.stderr else ""
    finished = {p.parent.name: p.stat().st_mtime_ns for p in (tmp_path / "out/sweep/proxies").glob("*/result.json")}
    assert 1 <= len(finished) < 4
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"{len(finished)} before" in done.stdout
    after = {p.parent.name: p.stat().st_mtime_ns for p in (tmp_path / "out/sweep/proxies").glob("*/result.json")}
    assert len(after) == 4 and all(after[k] == v for k, v in finished.items())
