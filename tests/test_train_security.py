"""Checkpoints are data, never code: crafted pickles are refused, state loads with weights_only, and a
failed write (a full disk) says so and leaves the previous checkpoint in place."""

from __future__ import annotations

import errno
import os
import random
import shlex
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch

from training.checkpoint import (
    LATEST,
    MODEL_FILE,
    STATE_FILE,
    CheckpointError,
    load_checkpoint,
    load_model_file,
    load_transformer,
    save_checkpoint,
    step_dir_name,
    write_model_checkpoint,
)
from training.distributed import DistInfo
from training.model import ModelConfig, Transformer

# What torch's zip writer says when the disk fills mid-write: it names neither the disk nor the file.
TORCH_DISK_FULL = "[enforce fail at inline_container.cc:659] . unexpected pos 1216 vs 1104"


class _Exploit:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


class _Usage(NamedTuple):
    total: int
    used: int
    free: int


def _model_and_optimizer() -> tuple[Transformer, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_dict(dict(vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2,
                                                   ffn_hidden=64, max_seq_len=16)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 64, (2, 8))).sum().backward()
    optimizer.step()  # the optimizer now has state to save
    return model, optimizer


def _save(root: Path, step: int, model: Transformer, optimizer: torch.optim.Optimizer,
          data_state: Any = None) -> Path:
    path = save_checkpoint(root, step, model, optimizer, info=DistInfo(), model_config=model.cfg.to_dict(),
                           config={"stage": "pretrain"}, data_state=data_state or {"step": step, "consumed": {}},
                           tokens=step * 10, keep=3)
    assert path is not None
    return path


def test_a_crafted_train_state_is_refused_without_running_its_code(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer()
    ckpt = _save(tmp_path / "ckpts", 1, model, optimizer)
    marker = tmp_path / "pwned"
    torch.save({"optimizer": _Exploit(marker), "step": 1, "tokens": 0, "data": [{}], "rng": [{}],
                "world_size": 1}, ckpt / STATE_FILE)
    with pytest.raises(CheckpointError, match=r"refusing to load .*train_state\.pt.*(posix|os)\.system"):
        load_checkpoint(ckpt, model, optimizer, DistInfo())
    assert not marker.exists()


def test_a_crafted_model_file_is_refused_on_every_path_that_reads_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save({"model": _Exploit(marker), "model_config": {}}, ckpt / MODEL_FILE)
    for read in (load_model_file, load_transformer):
        with pytest.raises(CheckpointError, match="refusing to load"):
            read(ckpt)
    assert not marker.exists()


def test_saved_state_loads_with_weights_only_and_resume_restores_every_rng(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer()
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # a cached gaussian is part of numpy's state too
    ckpt = _save(tmp_path, 5, model, optimizer)
    expected = (random.random(), np.random.standard_normal(), torch.rand(1).item())
    for name in (MODEL_FILE, STATE_FILE):
        torch.load(ckpt / name, weights_only=True)  # plain data only: no allowlist needed

    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    state = load_checkpoint(ckpt, model, optimizer, DistInfo())
    assert (random.random(), np.random.standard_normal(), torch.rand(1).item()) == expected
    assert (state["step"], state["tokens"], state["data"]) == (5, 50, {"step": 5, "consumed": {}})


def test_a_checkpoint_with_numpys_own_rng_tuple_still_resumes(tmp_path: Path) -> None:
    # The format written before RNG states became plain data: np.random.get_state() as is.
    model, optimizer = _model_and_optimizer()
    ckpt = _save(tmp_path, 2, model, optimizer)
    np.random.seed(4)
    legacy = np.random.get_state()
    expected = np.random.random()
    state = torch.load(ckpt / STATE_FILE, weights_only=True)
    state["rng"][0]["numpy"] = legacy
    torch.save(state, ckpt / STATE_FILE)
    np.random.seed(0)
    load_checkpoint(ckpt, model, optimizer, DistInfo())
    assert np.random.random() == expected


def test_state_that_weights_only_could_not_load_is_refused_when_saving(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer()
    with pytest.raises(CheckpointError, match=r"train state 'data'.*numpy\.int64.*weights_only"):
        _save(tmp_path, 1, model, optimizer, data_state={"step": np.int64(1)})
    assert not (tmp_path / LATEST).exists()


def test_a_full_disk_while_checkpointing_names_the_directory_and_keeps_the_previous_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, optimizer = _model_and_optimizer()
    root = tmp_path / "ckpts"
    _save(root, 1, model, optimizer)

    def full(obj: Any, path: Any) -> None:
        Path(path).write_bytes(b"partial")
        raise RuntimeError(TORCH_DISK_FULL)

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: _Usage(10**9, 10**9 - 4096, 4096))
    with pytest.raises(CheckpointError, match=rf"disk full: cannot write into {root}\b.*inline_container"):
        _save(root, 2, model, optimizer)
    assert (root / LATEST).read_text() == step_dir_name(1)
    assert sorted(p.name for p in root.iterdir()) == [LATEST, step_dir_name(1)]  # no half-written step


def test_enospc_is_a_full_disk_even_when_space_was_freed_since(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def full(obj: Any, path: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    model, _ = _model_and_optimizer()
    with pytest.raises(CheckpointError, match="disk full: cannot write into"):
        write_model_checkpoint(tmp_path / "imported", model.state_dict(), model.cfg.to_dict())


def test_other_write_failures_are_not_called_a_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(obj: Any, path: Any) -> None:
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", broken)
    model, optimizer = _model_and_optimizer()
    with pytest.raises(CheckpointError, match=r"cannot write into .* free\): PytorchStreamWriter") as info:
        _save(tmp_path, 1, model, optimizer)
    assert "disk full" not in str(info.value)


def test_a_checkpoint_written_onto_a_file_says_so(tmp_path: Path) -> None:
    model, _ = _model_and_optimizer()
    (tmp_path / "taken").write_text("")
    with pytest.raises(CheckpointError, match="is a file"):
        write_model_checkpoint(tmp_path / "taken", model.state_dict(), model.cfg.to_dict())
