"""Data parallelism on CPU with gloo: 2 ranks under torchrun train exactly like 1 process with the
same global batch, for DDP and for FSDP2 (``fully_shard``, which runs on CPU/gloo in torch 2.13),
and an FSDP2 run stopped and resumed from its checkpoint still does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.checkpoint import load_model_file
from training.config import load_config
from training.loop import train
from training.metrics import read_metrics

REPO_ROOT = Path(__file__).resolve().parents[1]
# Gradients are reduced in a different order than one process sums them: equal to rounding.
TOLERANCE = 1e-5
LR = 5e-3
# Adam divides each update by sqrt(v): where a gradient is near zero, a rounding difference in it
# moves that weight by a visible fraction of one step's size (at most ~lr). Measured: ~1% of lr;
# allowed: 10%. A wrong reduction (a rank's gradient dropped or doubled) already shows in grad_norm.
PARAM_TOLERANCE = 0.1 * LR

pytestmark = pytest.mark.usefixtures("one_thread")


def _overrides(shakespeare_tokens: dict[str, Path], out: Path, *extra: str) -> list[str]:
    # Two micro-batches per step: the no-sync path of gradient accumulation is exercised too.
    return ["model.size=1m", f"data.mix={shakespeare_tokens['train']}", f"data.eval={shakespeare_tokens['heldout']}",
            "data.seq_len=64", "train.batch_size=8", "optim.grad_accum=2", f"optim.lr={LR}", "optim.warmup=2",
            "train.steps=4", "train.eval_batches=1", "train.log_every=1", "train.progress=false",
            "train.export_hf=false", f"train.out_dir={out}", *extra]


@pytest.fixture(scope="module")
def single(shakespeare_tokens: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before the one_thread fixture
    try:
        train(load_config(None, _overrides(shakespeare_tokens, out)))
    finally:
        torch.set_num_threads(before)
    return out


def _torchrun(shakespeare_tokens: dict[str, Path], out: Path, parallel: str, tmp_path: Path, *extra: str) -> None:
    config = tmp_path / "cfg.yaml"
    config.write_text("stage: pretrain\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "training.loop", "pretrain", str(config),
           *_overrides(shakespeare_tokens, out, f"train.parallel={parallel}", "train.device=cpu", *extra)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _assert_same_run(single: Path, multi: Path) -> None:
    a, b = read_metrics(single / "metrics.jsonl"), read_metrics(multi / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=TOLERANCE, rel=0)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], abs=TOLERANCE, rel=0)
        assert rb["tokens"] == ra["tokens"]  # the global batch, not the per-rank one
    assert b[-1]["eval_loss"] == pytest.approx(a[-1]["eval_loss"], abs=TOLERANCE, rel=0)
    wa, wb = load_model_file(single)["model"], load_model_file(multi)["model"]
    assert set(wa) == set(wb)  # full, unsharded, wrapper-free names
    for name, tensor in wa.items():
        torch.testing.assert_close(wb[name], tensor, rtol=0, atol=PARAM_TOLERANCE)


@pytest.mark.slow
def test_two_rank_ddp_matches_one_process_with_the_same_global_batch(
        shakespeare_tokens: dict[str, Path], single: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    _torchrun(shakespeare_tokens, out, "ddp", tmp_path)
    _assert_same_run(single, out)


@pytest.mark.slow
def test_two_rank_fsdp2_stopped_and_resumed_matches_one_process_with_the_same_global_batch(
        shakespeare_tokens: dict[str, Path], single: Path, tmp_path: Path) -> None:
    # Stopping after step 2 and resuming in a new torchrun job also covers the FSDP2 checkpoint:
    # sharded weights and optimizer state gathered to rank 0, then loaded and re-sharded.
    out = tmp_path / "fsdp"
    _torchrun(shakespeare_tokens, out, "fsdp", tmp_path, "train.checkpoint_every=2", "train.stop_after=2")
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]
    _torchrun(shakespeare_tokens, out, "fsdp", tmp_path, "train.checkpoint_every=2")
    _assert_same_run(single, out)
