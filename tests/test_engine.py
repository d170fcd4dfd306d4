"""The engine's divergence guard: a run that blows up never leaves a non-finite checkpoint behind, and its
error names the step and a checkpoint that is good to resume from."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from training.checkpoint import CheckpointError, save_checkpoint
from training.config import load_config
from training.distributed import DistInfo
from training.loop import train
from training.model import ModelConfig, Transformer

pytestmark = pytest.mark.usefixtures("one_thread")


def _all_finite(path: Path) -> bool:
    model = torch.load(path / "model.pt", weights_only=True)["model"]
    return all(torch.isfinite(t).all() for t in model.values() if t.is_floating_point())


def test_a_huge_learning_rate_stops_before_any_non_finite_checkpoint(shakespeare_tokens: dict[str, Path],
                                                                     tmp_path: Path) -> None:
    # Logging only every 10 steps: the loss was once checked on log steps only, and checkpoints 3, 6, 9
    # of such a run were all NaN before the divergence was reported at step 10.
    cfg = load_config(None, ["model.size=1m", f"data.mix={shakespeare_tokens['train']}", "data.seq_len=64",
                             "train.batch_size=8", "optim.lr=1e6", "optim.warmup=0", "train.steps=12",
                             "train.log_every=10", "train.checkpoint_every=1", "train.keep_checkpoints=20",
                             "train.progress=false", "train.export_hf=false", f"train.out_dir={tmp_path}"])
    with pytest.raises(FloatingPointError) as err:
        train(cfg)
    message = str(err.value)
    found = re.search(r"at step (\d+);.*lower optim.lr", message)
    assert found, message
    step = int(found.group(1))
    written = sorted((tmp_path / "checkpoints").glob("step_*"))
    assert written and all(_all_finite(d) for d in written)
    assert int(written[-1].name.split("_")[1]) < step  # nothing at or after the failing step
    latest = tmp_path / "checkpoints" / (tmp_path / "checkpoints" / "latest").read_text()
    assert f"resume from the last good checkpoint {latest}" in message


def test_the_checkpoint_writer_refuses_non_finite_parameters(tmp_path: Path) -> None:
    cfg = ModelConfig(vocab_size=11, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, ffn_hidden=16)
    model = Transformer(cfg)
    optimizer = torch.optim.AdamW(model.parameters())
    args = {"info": DistInfo(), "model_config": cfg.to_dict(), "config": {}, "data_state": {}, "tokens": 0, "keep": 5}
    good = save_checkpoint(tmp_path, 1, model, optimizer, **args)
    with torch.no_grad():
        model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"step-2 checkpoint: parameter layers.0.mlp.up_proj.weight holds "
                                              r"non-finite values .*last good checkpoint is .*step_00000001"):
        save_checkpoint(tmp_path, 2, model, optimizer, **args)
    assert (tmp_path / "latest").read_text() == good.name and not (tmp_path / "step_00000002").exists()
