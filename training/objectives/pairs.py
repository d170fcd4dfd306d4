"""Preference pairs as batches, shared by the reward-model and DPO objectives.

A batch of B pairs is one tensor of 2B rows, the B chosen sequences first and then the B rejected
ones (TRL's layout too), right-padded to the longest row: one forward scores both sides. Rows longer
than `data.seq_len` are cut from the end, like every stage's rows; the cut pairs are counted and
reported once, since a cut response is a different response.

The global batch of every step comes from one `ExampleOrder` stream that every rank holds; a rank
keeps the pairs `rank::world_size` of it, so the run does not depend on the number of ranks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.objectives.base import Batch, DataInfo, ExampleOrder

log = logging.getLogger(__name__)


class PairData:
    """One split of preference shards (`training.chat.PreferenceShards`), cut to `seq_len` tokens."""

    def __init__(self, path: str | Path, seq_len: int) -> None:
        from training.chat import PreferenceShards

        self.shards = PreferenceShards(path)
        if len(self.shards) == 0:
            raise ValueError(f"{self.shards.path} holds no preference pairs")
        self.seq_len = seq_len
        manifest = self.shards.manifest
        self.pad_id: int | None = manifest.get("pad_id")
        self.truncated = int((self.shards.lengths.reshape(-1, 2) > seq_len).any(axis=1).sum())

    def __len__(self) -> int:
        return len(self.shards)

    @property
    def manifest_path(self) -> Path:
        return self.shards.path

    def data_info(self) -> DataInfo:
        m = self.shards.manifest
        tokenizer = self.shards.root / m.get("tokenizer", "tokenizer.json")
        return DataInfo(vocab_size=self.shards.vocab_size, tokenizer=tokenizer if tokenizer.is_file() else None,
                        special_ids={k: m.get(k) for k in ("bos_id", "eos_id", "pad_id")})

    def collate(self, pairs: Sequence[int]) -> dict[str, torch.Tensor]:
        """{"input_ids" [2B, T] int64, "mask" [2B, T] bool (targets), "lengths" [2B]}: chosen rows,
        then rejected rows, padded with the tokenizer's pad id (0 if it has none)."""
        chosen: list[tuple[np.ndarray, np.ndarray]] = []
        rejected: list[tuple[np.ndarray, np.ndarray]] = []
        for i in pairs:
            chosen_ids, chosen_mask, rejected_ids, rejected_mask = self.shards[int(i)]
            chosen.append((chosen_ids[:self.seq_len], chosen_mask[:self.seq_len]))
            rejected.append((rejected_ids[:self.seq_len], rejected_mask[:self.seq_len]))
        rows = chosen + rejected
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), self.pad_id if self.pad_id is not None else 0, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        lengths = torch.empty(len(rows), dtype=torch.long)
        for r, (row_ids, row_mask) in enumerate(rows):
            ids[r, :len(row_ids)] = torch.from_numpy(row_ids)
            mask[r, :len(row_mask)] = torch.from_numpy(row_mask)
            lengths[r] = len(row_ids)
        return {"input_ids": ids, "mask": mask, "lengths": lengths}

    def warn_truncated(self, name: str) -> None:
        if self.truncated:
            log.warning("%s: %d of %d pairs have a sequence longer than data.seq_len=%d; they are cut from the "
                        "end", name, self.truncated, len(self), self.seq_len)


class PairStream:
    """This rank's micro-batches of pairs: the global batch from the shared order, rows rank::world."""

    def __init__(self, data: PairData, global_batch: int, seed: int, rank: int, world_size: int) -> None:
        self.data, self.global_batch, self.rank, self.world_size = data, global_batch, rank, world_size
        self.order = ExampleOrder(len(data), seed)

    def next_batch(self) -> Batch:
        pairs = self.order.take(self.global_batch)[self.rank::self.world_size]
        tensors = self.data.collate(pairs)
        tensors["pair_index"] = torch.tensor(pairs, dtype=torch.long)
        return Batch(tensors=tensors, weight=len(pairs), tokens=int(tensors["lengths"].sum()))

    def state_dict(self) -> dict[str, Any]:
        return {"order": self.order.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order.load_state_dict(state["order"])


def eval_pair_batches(data: PairData, batch_size: int, max_batches: int) -> list[dict[str, torch.Tensor]]:
    """The first `batch_size * max_batches` pairs of a held-out split, in order, as batches."""
    n = min(len(data), batch_size * max_batches)
    out = []
    for start in range(0, n, batch_size):
        pairs = list(range(start, min(n, start + batch_size)))
        batch = data.collate(pairs)
        batch["pair_index"] = torch.tensor(pairs, dtype=torch.long)
        out.append(batch)
    return out


def pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums over pairs (the engine divides by the pair count): rewards of each side, their margin and
    how many pairs rank the chosen response higher."""
    chosen, rejected = chosen.detach().float(), rejected.detach().float()
    return {"chosen_reward": chosen.sum(), "rejected_reward": rejected.sum(),
            "margin": (chosen - rejected).sum(), "accuracy": (chosen > rejected).float().sum()}


PairScorer = Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@torch.no_grad()
def evaluate_pairs(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], score: PairScorer,
                   device: torch.device, autocast: Callable[[], AbstractContextManager[Any]]) -> dict[str, float]:
    """Means over all held-out pairs of the loss and `pair_metrics`, keyed "eval_*", plus "eval_pairs".
    `score(tensors)` gives per-pair (losses, chosen rewards, rejected rewards). Every rank evaluates
    every batch (FSDP needs all ranks in each forward), so all get the same numbers."""
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    pairs = 0
    for batch in batches:
        with autocast():
            losses, chosen, rejected = score({k: v.to(device) for k, v in batch.items()})
        for key, value in {"loss": losses.sum(), **pair_metrics(chosen, rejected)}.items():
            sums[key] = sums.get(key, 0.0) + float(value)
        pairs += len(losses)
    model.train(was_training)
    return {**{f"eval_{key}": value / pairs for key, value in sums.items()}, "eval_pairs": float(pairs)}
