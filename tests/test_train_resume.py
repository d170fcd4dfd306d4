"""Checkpoints: a killed run resumed in a new process continues exactly like an uninterrupted one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.checkpoint import CheckpointError, load_model_file, step_dir_name
from training.config import ConfigError, load_config
from training.loop import train
from training.metrics import read_metrics

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def _overrides(shakespeare_tokens: dict[str, Path], out: Path, *extra: str) -> list[str]:
    # Clipping active (grad_clip 0.5), a cosine schedule and two micro-batches per step, so the
    # optimizer state, the step and the data position all matter for exactness.
    return ["model.size=1m", f"data.mix={shakespeare_tokens['train']}", f"data.eval={shakespeare_tokens['heldout']}",
            "data.seq_len=64", "train.batch_size=8", "optim.grad_accum=2", "optim.lr=5e-3", "optim.warmup=3",
            "optim.grad_clip=0.5", "optim.schedule=cosine", "train.eval_every=10", "train.eval_batches=2",
            "train.log_every=1", "train.checkpoint_every=10", "train.progress=false", "train.export_hf=false",
            f"train.out_dir={out}", "train.steps=20", *extra]


def test_killed_run_resumed_in_a_new_process_repeats_the_uninterrupted_losses(
        shakespeare_tokens: dict[str, Path], tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    train(load_config(None, _overrides(shakespeare_tokens, straight)))

    killed = tmp_path / "killed"
    train(load_config(None, _overrides(shakespeare_tokens, killed, "train.stop_after=13")))
    # What a kill at step 13 leaves on disk: the step-10 checkpoint as latest, and metrics for
    # steps 11-13 that the resumed run will repeat.
    ckpts = killed / "checkpoints"
    shutil.rmtree(ckpts / step_dir_name(13))
    (ckpts / "latest").write_text(step_dir_name(10))
    assert read_metrics(killed / "metrics.jsonl")[-1]["step"] == 13

    config = tmp_path / "cfg.yaml"
    config.write_text("stage: pretrain\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "training.loop", "pretrain", str(config),
                           *_overrides(shakespeare_tokens, killed)], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]

    a, b = read_metrics(straight / "metrics.jsonl"), read_metrics(killed / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, 21))  # each step logged once
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-6, rel=0)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], abs=1e-6, rel=0)
        assert rb["lr"] == ra["lr"] and rb["tokens"] == ra["tokens"]
        assert rb.get("eval_loss") == pytest.approx(ra.get("eval_loss"), abs=1e-6)
    wa, wb = load_model_file(straight)["model"], load_model_file(killed)["model"]
    for name, tensor in wa.items():
        torch.testing.assert_close(wb[name], tensor, rtol=0, atol=1e-6)


def test_checkpoints_keep_the_last_k_and_point_latest_at_the_newest(shakespeare_tokens: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(load_config(None, _overrides(shakespeare_tokens, out, "train.steps=8", "train.checkpoint_every=2",
                                       "train.keep_checkpoints=2", "data.eval=none")))
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", step_dir_name(6), step_dir_name(8)]
    assert (ckpts / "latest").read_text() == step_dir_name(8)
    assert sorted(p.name for p in (ckpts / step_dir_name(8)).iterdir()) == ["config.json", "model.pt",
                                                                          "train_state.pt"]


def test_resuming_with_a_different_global_batch_is_an_error(shakespeare_tokens: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(load_config(None, _overrides(shakespeare_tokens, out, "train.steps=2", "optim.warmup=1", "train.checkpoint_every=1", "data.eval=none")))
    with pytest.raises(ValueError, match="global_batch_size"):
        train(load_config(None, _overrides(shakespeare_tokens, out, "train.steps=4", "train.batch_size=4", "data.eval=none")))


def test_a_latest_pointer_to_a_missing_checkpoint_is_an_error(shakespeare_tokens: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text(step_dir_name(5))
    with pytest.raises(CheckpointError, match="missing model.pt"):
        train(load_config(None, _overrides(shakespeare_tokens, out, "data.eval=none")))


def test_starting_over_in_a_used_out_dir_is_an_error(shakespeare_tokens: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(load_config(None, _overrides(shakespeare_tokens, out, "train.steps=1", "optim.warmup=0", "data.eval=none")))
    with pytest.raises(ConfigError, match="holds checkpoints of an earlier run and train.resume=false"):
        train(load_config(None, _overrides(shakespeare_tokens, out, "train.resume=false", "data.eval=none")))


_TWO_RANK_LOAD = """
import sys
import torch
import torch.distributed as dist
from training.checkpoint import CheckpointError, load_checkpoint
from training.distributed import cleanup, init_distributed
from training.model import ModelConfig, Transformer

info = init_distributed("cpu")
model = Transformer(ModelConfig(vocab_size=11, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, ffn_hidden=16))
optimizer = torch.optim.AdamW(model.parameters())
try:
    load_checkpoint(__import__("pathlib").Path(sys.argv[1]) if info.is_main else None, model, optimizer, info)
except CheckpointError as e:
    print(f"rank {info.rank}: {e}", flush=True)
cleanup(info)
"""


def _tiny_checkpoint(root: Path) -> Path:
    from training.checkpoint import save_checkpoint
    from training.distributed import DistInfo
    from training.model import ModelConfig, Transformer

    cfg = ModelConfig(vocab_size=11, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, ffn_hidden=16)
    model = Transformer(cfg)
    optimizer = torch.optim.AdamW(model.parameters())
    path = save_checkpoint(root, 1, model, optimizer, info=DistInfo(), model_config=cfg.to_dict(), config={},
                           data_state={}, tokens=0, keep=1)
    assert path is not None
    state = path / "train_state.pt"
    state.write_bytes(state.read_bytes()[:100])  # cut short, as by a full disk
    return path


def test_a_truncated_train_state_is_a_clear_error_on_every_rank(tmp_path: Path) -> None:
    from training.checkpoint import load_checkpoint
    from training.distributed import DistInfo
    from training.model import ModelConfig, Transformer

    ckpt = _tiny_checkpoint(tmp_path / "checkpoints")
    model = Transformer(ModelConfig(vocab_size=11, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, ffn_hidden=16))
    with pytest.raises(CheckpointError, match="cannot read .*train_state.pt"):
        load_checkpoint(ckpt, model, torch.optim.AdamW(model.parameters()), DistInfo())
    # Two ranks: rank 0's read fails; rank 1 must get the error too instead of waiting in a broadcast.
    script = tmp_path / "load.py"
    script.write_text(_TWO_RANK_LOAD)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(ckpt)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0: cannot read" in proc.stdout and "rank 1: cannot read" in proc.stdout
