"""Resumable checkpoints: model, optimizer, step, data position, RNG states and config.

Layout under a run's ``out_dir``::

    checkpoints/
      step_00000100/
        model.pt        {"model": full state dict (clean names), "model_config": dict}
        train_state.pt  {"optimizer": full optimizer state dict (keyed by parameter name),
                         "step": int, "tokens": int, "data": [per-rank loader state],
                         "rng": [per-rank RNG states], "world_size": int}
        config.json     the full training config of the run
      latest            text: the name of the newest complete step directory

Every checkpoint is written under a temporary name and renamed into place, and ``latest`` is
replaced atomically after it, so a kill at any moment leaves the previous checkpoint intact.
State dicts go through ``torch.distributed.checkpoint.state_dict``: full (unsharded) tensors,
gathered to CPU on rank 0, with the wrapper prefixes of DDP (``module.``), activation checkpointing
and compile stripped, so a checkpoint loads the same in one process, DDP or FSDP2, and ``model.pt``
alone is what mid-training and export read. Loading broadcasts from rank 0, so the other nodes of
a multi-node run need no shared filesystem.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from training.distributed import DistInfo, barrier, broadcast_object, gather_objects, scatter_objects

LATEST = "latest"
MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"
CONFIG_FILE = "config.json"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or does not fit the run."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _save_options(info: DistInfo) -> StateDictOptions:
    return StateDictOptions(full_state_dict=True, cpu_offload=info.distributed)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(root: str | Path) -> Path | None:
    """The step directory named by ``root/latest``, or None when there is no complete checkpoint."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    d = Path(root) / pointer.read_text().strip()
    if not (d / MODEL_FILE).is_file() or not (d / STATE_FILE).is_file():
        raise CheckpointError(f"{pointer} names {d.name}, which is missing {MODEL_FILE} or {STATE_FILE}")
    return d


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a step directory, a ``checkpoints`` directory or a run directory; return the step dir."""
    p = Path(path)
    if (p / MODEL_FILE).is_file():
        return p
    for root in (p, p / "checkpoints"):
        if (root / LATEST).is_file():
            found = latest_checkpoint(root)
            if found is not None:
                return found
    raise CheckpointError(f"no checkpoint at {p}: expected {MODEL_FILE}, a '{LATEST}' pointer, "
                          f"or checkpoints/{LATEST} under it")


def save_checkpoint(root: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    *, info: DistInfo, model_config: dict[str, Any], config: dict[str, Any],
                    data_state: Any, tokens: int, keep: int) -> Path | None:
    """Collective: every rank calls it; rank 0 writes. Returns the step directory on rank 0."""
    opts = _save_options(info)
    model_sd = get_model_state_dict(model, options=opts)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=opts)
    data_states = gather_objects(data_state, info)
    rngs = gather_objects(rng_state(), info)
    final: Path | None = None
    if info.is_main:
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        final = root / step_dir_name(step)
        tmp = root / f".tmp-{final.name}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        torch.save({"model": model_sd, "model_config": model_config}, tmp / MODEL_FILE)
        torch.save({"optimizer": optim_sd, "step": step, "tokens": tokens, "data": data_states,
                    "rng": rngs, "world_size": info.world_size}, tmp / STATE_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        if final.exists():  # the same step saved again (e.g. a rerun): replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer_tmp = root / f".{LATEST}.tmp"
        pointer_tmp.write_text(final.name)
        os.replace(pointer_tmp, root / LATEST)
        _prune(root, keep)
    barrier(info)
    return final


def _prune(root: Path, keep: int) -> None:
    steps = sorted(d for d in root.iterdir() if d.is_dir() and d.name.startswith("step_"))
    for old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def load_model_file(ckpt: str | Path) -> dict[str, Any]:
    """``model.pt`` of a checkpoint: ``{"model": state dict, "model_config": dict}``. Tensors only
    (``weights_only``), so a checkpoint from elsewhere cannot run code when loaded."""
    d = resolve_checkpoint(ckpt)
    try:
        return torch.load(d / MODEL_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign file: say which
        raise CheckpointError(f"cannot read {d / MODEL_FILE}: {e}") from e


def write_model_checkpoint(out_dir: str | Path, model_state: dict[str, torch.Tensor],
                           model_config: dict[str, Any]) -> Path:
    """A weights-only checkpoint (``out_dir/model.pt``), e.g. from ``refinery import`` of a Hugging
    Face model: ``train.init_from`` and ``load_transformer`` accept the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".tmp-{MODEL_FILE}"
    torch.save({"model": {k: v.detach().cpu() for k, v in model_state.items()},
                "model_config": dict(model_config)}, tmp)
    os.replace(tmp, out / MODEL_FILE)
    return out


def load_transformer(ckpt: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The Transformer of a checkpoint (run dir, ``checkpoints`` dir or step dir), for export,
    generation and later stages."""
    from training.model import ModelConfig, Transformer

    data = load_model_file(ckpt)
    with torch.device(device):
        model = Transformer(ModelConfig.from_dict(data["model_config"]))
    model.load_state_dict(data["model"], strict=True)
    return model


def load_model_weights(model: nn.Module, state: dict[str, torch.Tensor] | None, info: DistInfo,
                       strict: bool = True) -> None:
    """Load a full state dict (present on rank 0 at least) into a possibly wrapped/sharded model."""
    if info.distributed:
        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=strict)
        set_model_state_dict(model, state if info.is_main else {}, options=opts)
    else:
        assert state is not None
        set_model_state_dict(model, state, options=StateDictOptions(strict=strict))


def load_checkpoint(ckpt_dir: Path | None, model: nn.Module, optimizer: torch.optim.Optimizer,
                    info: DistInfo) -> dict[str, Any]:
    """Collective resume: model, optimizer and this rank's RNG; returns
    ``{"step", "tokens", "data": this rank's loader state}``. ``ckpt_dir`` matters on rank 0 only."""
    model_file = state = None
    error: Exception | None = None
    if info.is_main:
        assert ckpt_dir is not None
        try:
            model_file = load_model_file(ckpt_dir)
            # Our own file, written by save_checkpoint: it holds RNG tuples and loader states that
            # weights_only cannot represent.
            try:
                state = torch.load(ckpt_dir / STATE_FILE, map_location="cpu", weights_only=False)
            except Exception as e:  # truncated or foreign file: say which
                raise CheckpointError(f"cannot read {ckpt_dir / STATE_FILE}: {e}") from e
            if state["world_size"] != info.world_size and len({repr(s) for s in state["data"]}) > 1:
                raise CheckpointError(f"{ckpt_dir} was written by {state['world_size']} ranks with per-rank "
                                      f"data positions; resume it with the same number of ranks, not "
                                      f"{info.world_size}")
        except Exception as e:
            error = e
    # Raised on every rank: the others would otherwise wait forever in the broadcasts below.
    error = broadcast_object(error, info)
    if error is not None:
        raise error
    load_model_weights(model, model_file["model"] if model_file else None, info)
    if info.distributed:
        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_optimizer_state_dict(model, optimizer, state["optimizer"] if state else {}, options=opts)
    else:
        assert state is not None
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
    per_rank: list[dict[str, Any]] | None = None
    if info.is_main:
        assert state is not None
        n = state["world_size"]
        same_world = n == info.world_size
        per_rank = [{"data": state["data"][r if same_world else 0],
                     "rng": state["rng"][r] if same_world else state["rng"][0]}
                    for r in range(info.world_size)]
    mine = scatter_objects(per_rank, info)
    set_rng_state(mine["rng"])
    meta = broadcast_object({"step": state["step"], "tokens": state["tokens"]} if state else None, info)
    return {"step": meta["step"], "tokens": meta["tokens"], "data": mine["data"]}
