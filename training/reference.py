"""Reference log-probs computed once and cached on disk (open-instruct's dpo_tune_cache.py does the same).

DPO's reference model never changes, so log π_ref(y|x) of every chosen and rejected response is a fixed
table: one pass over the preference data before the first step, saved as
``<run>/reference_logps/<name>-<key>.npy`` ([pairs, 2] float32: chosen, rejected). The key is a hash of
everything the numbers depend on: the data's bytes, the reference weights, the row length the data is
cut to and the precision. A resumed run, or a new run on the same data and start checkpoint, finds the
file and skips the pass; any change of those inputs gives a new key, so a stale table is never read.

The pass is split over ranks (rank r scores pairs r, r + world, ...) and summed with one all-reduce,
so every rank ends with the whole table; rank 0 writes it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from training.atomic import atomic_save_npy, atomic_write_text
from training.logprobs import sequence_logps

FORMAT_VERSION = 1
_CHUNK = 1 << 20


def data_fingerprint(manifest_path: str | os.PathLike[str]) -> str:
    """Hash of a shard manifest and the bytes of every file its shards name (tokens, mask, idx)."""
    manifest = Path(manifest_path)
    if not manifest.is_file():
        raise FileNotFoundError(f"shard manifest not found: {manifest}")
    text = manifest.read_bytes()
    digest = hashlib.blake2b(text, digest_size=16)
    names = sorted({v for shard in json.loads(text).get("shards", []) for v in shard.values()
                    if isinstance(v, str) and (manifest.parent / v).is_file()})
    for name in names:
        digest.update(name.encode() + b"\0")
        with (manifest.parent / name).open("rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """Hash of a model's state dict: names, dtypes, shapes and values."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_key(**parts: Any) -> str:
    text = json.dumps({"version": FORMAT_VERSION, **parts}, sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def cache_path(run_dir: str | os.PathLike[str], name: str, key: str) -> Path:
    return Path(run_dir) / "reference_logps" / f"{name}-{key}.npy"


@torch.no_grad()
def score_pairs(
    model: nn.Module,
    pairs: Sequence[int],
    collate: Callable[[Sequence[int]], dict[str, torch.Tensor]],
    n_pairs: int,
    batch_size: int,
    device: torch.device,
    autocast: Callable[[], Any],
) -> torch.Tensor:
    """Summed response log-probs [n_pairs, 2] (float64, zeros outside ``pairs``) of ``model`` on the
    given pair indices; ``collate`` turns pair indices into {"input_ids", "mask"} with the chosen rows
    first, then the rejected rows."""
    table = torch.zeros(n_pairs, 2, dtype=torch.float64)
    for start in range(0, len(pairs), batch_size):
        chunk = list(pairs[start:start + batch_size])
        batch = collate(chunk)
        ids, mask = batch["input_ids"].to(device), batch["mask"].to(device)
        with autocast():
            logits = model(ids)
        logps, _ = sequence_logps(logits, ids, mask)
        table[chunk] = logps.double().cpu().view(2, len(chunk)).T
    return table


def load_or_compute(path: Path, compute: Callable[[], torch.Tensor], *, is_main: bool,
                    broadcast: Callable[[Any], Any], metadata: dict[str, Any]) -> tuple[np.ndarray, bool]:
    """The cached table at ``path``, or ``compute()`` (collective: every rank calls it and gets the
    whole table) written there by rank 0. Returns (table as float32, whether it was computed).

    Rank 0 decides whether the file is there and the others follow (they could otherwise see it appear
    half-way and skip a collective); the file is then read by every rank from the shared filesystem,
    as checkpoints are.
    """
    if broadcast(path.is_file() if is_main else None):
        table = np.load(path)
        if table.ndim != 2 or table.shape[1] != 2 or table.shape[0] != metadata.get("pairs", table.shape[0]):
            raise ValueError(f"{path} is not a [pairs, 2] reference table for this data; delete it to recompute")
        return table.astype(np.float32, copy=False), False
    table = compute().numpy().astype(np.float32)
    if is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path.with_suffix(".json"), json.dumps(metadata, indent=2) + "\n")
        atomic_save_npy(path, table)  # the table last: it marks done
    return table, True
