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

Both ``.pt`` files hold tensors and plain data only (dicts, lists, tuples, str, numbers, None; the
numpy RNG state as a list of ints) and are read with ``torch.load(weights_only=True)``: a checkpoint
is something users download and pass around, and a full unpickle of a crafted file runs its code.

Every checkpoint is written under a temporary name and renamed into place, and ``latest`` is
replaced atomically after it, so a kill at any moment leaves the previous checkpoint intact.
State dicts go through ``torch.distributed.checkpoint.state_dict``: full (unsharded) tensors,
gathered to CPU on rank 0, with the wrapper prefixes of DDP (``module.``), activation checkpointing
and compile stripped, so a checkpoint loads the same in one process, DDP or FSDP2, and ``model.pt``
alone is what mid-training and export read. Loading broadcasts from rank 0, so the other nodes of
a multi-node run need no shared filesystem.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import re
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

from training.distributed import DistInfo, broadcast_object, gather_objects, scatter_objects

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
    """This process's RNG states as plain data and tensors, which ``weights_only`` loading accepts."""
    key, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),  # (version, tuple of 625 ints, gauss or None)
        "numpy": {"key": str(key), "state": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, keys, gauss = state["python"]
    random.setstate((int(version), tuple(keys), gauss))
    npy = state["numpy"]
    if isinstance(npy, dict):
        np.random.set_state((npy["key"], np.asarray(npy["state"], dtype=np.uint32), npy["pos"],
                             npy["has_gauss"], npy["cached_gaussian"]))
    else:  # checkpoints written before the plain-data format: numpy's own tuple
        np.random.set_state(tuple(npy))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


_PLAIN_SCALARS = (str, int, float, bool, type(None), torch.Tensor)


def _require_plain(obj: Any, where: str) -> None:
    """Refuse at save time what ``weights_only`` loading would refuse at resume time."""
    if isinstance(obj, _PLAIN_SCALARS):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str | int):
                raise CheckpointError(f"{where} has a key of type {type(k).__name__}; checkpoint state "
                                      f"must be plain data (str or int keys)")
            _require_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            _require_plain(v, f"{where}[{i}]")
        return
    raise CheckpointError(f"{where} is a {type(obj).__module__}.{type(obj).__name__}; checkpoint state "
                          f"must be tensors or plain data (dict, list, str, int, float, bool, None) so that "
                          f"it loads with weights_only")


def _payload_bytes(obj: Any) -> int:
    """Bytes of the tensors in ``obj``: roughly what writing it needs on disk."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_payload_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_payload_bytes(v) for v in obj)
    return 0


def write_error(directory: str | Path, error: BaseException, needed_bytes: int | None = None) -> CheckpointError:
    """A CheckpointError for a failed write into ``directory`` that says when the disk is full.

    torch's writer reports a full disk as ``[enforce fail at inline_container.cc:...] unexpected pos``,
    naming neither the file nor the cause; so look at errno and at the free space left (measured
    before the partial file is removed, while it still holds the space it took)."""
    directory = Path(directory)
    free: int | None = None
    try:
        free = shutil.disk_usage(directory if directory.exists() else directory.parent).free
    except OSError:
        pass
    no_space = (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)) or any(
        text in str(error) for text in ("No space left on device", "StorageFull", "Disk quota exceeded"))
    if not no_space and free is not None:
        no_space = free == 0 or (needed_bytes is not None and free < needed_bytes)
    cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    free_text = f"{free / 2**20:,.1f} MiB free" if free is not None else "free space unknown"
    if no_space:
        need = f", about {needed_bytes / 2**20:,.1f} MiB needed" if needed_bytes else ""
        return CheckpointError(f"disk full: cannot write into {directory} ({free_text}{need}); free space there "
                               f"or point the output elsewhere, then rerun ({cause})")
    return CheckpointError(f"cannot write into {directory} ({free_text}): {cause}")


def _save(obj: Any, path: Path, directory: Path) -> None:
    try:
        torch.save(obj, path)
    except (RuntimeError, OSError) as e:
        raise write_error(directory, e, _payload_bytes(obj)) from e


_UNSAFE_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def _legacy_safe_globals() -> list[Any]:
    """numpy's array reconstruction, for the RNG states of checkpoints written before the plain-data
    format: it builds arrays of numbers and calls nothing else."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return [_reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]


def load_plain(path: str | Path, legacy_numpy: bool = False) -> Any:
    """``torch.load`` of a checkpoint file that may come from anyone: tensors and plain data only.

    A file that needs any other Python object (a crafted pickle, or another program's checkpoint) is
    refused with a CheckpointError before any of its code can run."""
    path = Path(path)
    try:
        if legacy_numpy:
            with torch.serialization.safe_globals(_legacy_safe_globals()):
                return torch.load(path, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = _UNSAFE_GLOBAL.search(str(e))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(f"refusing to load {path}: it holds Python objects{what} beyond tensors and plain "
                              f"data, which could run code; only checkpoints written by refinery are "
                              f"accepted") from e
    except FileNotFoundError as e:
        raise CheckpointError(f"cannot read {path}: file not found") from e
    except Exception as e:  # truncated or foreign file: say which
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read {path}: {first}") from e


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
                    data_state: Any, tokens: int, keep: int, extra: dict[str, Any] | None = None) -> Path | None:
    """Collective: every rank calls it; rank 0 writes. Returns the step directory on rank 0.
    ``extra``: the objective's own state (rank 0's), e.g. a policy snapshot."""
    opts = _save_options(info)
    model_sd = get_model_state_dict(model, options=opts)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=opts)
    data_states = gather_objects(data_state, info)
    rngs = gather_objects(rng_state(), info)
    final: Path | None = None
    error: Exception | None = None
    if info.is_main:
        try:
            final = _write_step_dir(Path(root), step, model_sd, optim_sd, model_config=model_config,
                                    config=config, data_states=data_states, rngs=rngs, tokens=tokens,
                                    world_size=info.world_size, keep=keep, extra=extra or {})
        except Exception as e:
            error = e
    # Raised on every rank: the others would otherwise go on training without a checkpoint, or wait.
    error = broadcast_object(error, info)
    if error is not None:
        raise error
    return final


def _write_step_dir(root: Path, step: int, model_sd: dict[str, Any], optim_sd: dict[str, Any], *,
                    model_config: dict[str, Any], config: dict[str, Any], data_states: Any, rngs: Any,
                    tokens: int, world_size: int, keep: int, extra: dict[str, Any]) -> Path:
    _require_finite(model_sd, root, step)
    train_state = {"optimizer": optim_sd, "step": step, "tokens": tokens, "data": data_states,
                   "rng": rngs, "world_size": world_size, "objective": extra}
    for key in ("step", "tokens", "data", "rng", "world_size", "objective"):  # the optimizer's is torch's own
        _require_plain(train_state[key], f"train state {key!r}")
    _require_plain(model_config, "model_config")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(root, e) from e
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        _save({"model": model_sd, "model_config": model_config}, tmp / MODEL_FILE, root)
        _save(train_state, tmp / STATE_FILE, root)
        try:
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        except OSError as e:
            raise write_error(root, e) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # give the space back; the previous checkpoint stands
        raise
    if final.exists():  # the same step saved again (e.g. a rerun): replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer_tmp = root / f".{LATEST}.tmp"
    pointer_tmp.write_text(final.name)
    os.replace(pointer_tmp, root / LATEST)
    _prune(root, keep)
    return final


def _require_finite(model_sd: dict[str, Any], root: Path, step: int) -> None:
    """A diverged model is no checkpoint: writing it would make `latest` point past the last good one."""
    for name, tensor in model_sd.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            last = root / LATEST
            good = f"the last good checkpoint is {root / last.read_text().strip()}" if last.is_file() else \
                "no checkpoint was written before it"
            raise CheckpointError(f"refusing to write the step-{step} checkpoint: parameter {name} holds "
                                  f"non-finite values (training diverged); {good}")


def _prune(root: Path, keep: int) -> None:
    steps = sorted(d for d in root.iterdir() if d.is_dir() and d.name.startswith("step_"))
    for old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def load_model_file(ckpt: str | Path) -> dict[str, Any]:
    """``model.pt`` of a checkpoint: ``{"model": state dict, "model_config": dict}``. Tensors only
    (``weights_only``), so a checkpoint from elsewhere cannot run code when loaded."""
    d = resolve_checkpoint(ckpt)
    data = load_plain(d / MODEL_FILE)
    if not isinstance(data, dict) or not {"model", "model_config"} <= set(data):
        raise CheckpointError(f"{d / MODEL_FILE} is not a refinery model file: expected the keys 'model' "
                              f"and 'model_config'")
    return data


def write_model_checkpoint(out_dir: str | Path, model_state: dict[str, torch.Tensor],
                           model_config: dict[str, Any]) -> Path:
    """A weights-only checkpoint (``out_dir/model.pt``), e.g. from ``refinery import`` of a Hugging
    Face model: ``train.init_from`` and ``load_transformer`` accept the directory."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:
        raise CheckpointError(f"{out} is a file; give a directory to write the checkpoint into") from e
    tmp = out / f".tmp-{MODEL_FILE}"
    try:
        _save({"model": {k: v.detach().cpu() for k, v in model_state.items()},
               "model_config": dict(model_config)}, tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
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
    """Collective resume: model, optimizer and this rank's RNG; returns ``{"step", "tokens", "data": this
    rank's loader state, "extra": the objective's own state}``. ``ckpt_dir`` matters on rank 0 only."""
    model_file = state = None
    error: Exception | None = None
    if info.is_main:
        assert ckpt_dir is not None
        try:
            model_file = load_model_file(ckpt_dir)
            state = load_plain(ckpt_dir / STATE_FILE, legacy_numpy=True)
            missing = {"optimizer", "step", "tokens", "data", "rng", "world_size"} - set(
                state if isinstance(state, dict) else ())
            if missing:
                raise CheckpointError(f"{ckpt_dir / STATE_FILE} is not a refinery train state: it lacks "
                                      f"{sorted(missing)}")
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
    meta = broadcast_object({"step": state["step"], "tokens": state["tokens"],
                             "extra": state.get("objective", {})} if state else None, info)
    return {"step": meta["step"], "tokens": meta["tokens"], "data": mine["data"], "extra": meta["extra"]}
