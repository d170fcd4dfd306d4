"""Direct preference optimization and its variants: `refinery train dpo CONFIG`.

With πθ the policy, π_ref the frozen start model, (x, y_w, y_l) a prompt with its chosen and rejected
response and log π(y|x) summed over the response tokens, the per-pair losses are

    sigmoid   (Rafailov et al. 2023, eq. 7)   -log σ(β [log πθ(y_w|x)/π_ref(y_w|x) - log πθ(y_l|x)/π_ref(y_l|x)])
    ipo       (Azar et al. 2023, eq. 17)      (h - 1/(2β))², h the same log-ratio difference with each
              log-ratio averaged over its response tokens (as TRL does, agreed with the IPO authors)
    dpo_norm  (open-instruct dpo_tune_cache)  sigmoid with every log-prob averaged over its response tokens
              (TRL's `sigmoid_norm`)
    simpo     (Meng et al. 2024, eq. 6)       -log σ(β/|y_w| log πθ(y_w|x) - β/|y_l| log πθ(y_l|x) - γ),
              no reference model

The implicit reward of a response (Rafailov et al. eq. 5) is r = β log πθ(y|x)/π_ref(y|x) (per token
for dpo_norm; β · average log-prob for simpo, its eq. 4); logged as chosen/rejected reward, their
margin and the fraction of pairs where the chosen one is higher (accuracy).

π_ref never changes, so its log-probs are computed once, before the first step, and cached on disk
beside the run (training/reference.py, like open-instruct's dpo_tune_cache.py): no reference model is
held in memory during training, and a resumed or repeated run reuses the cache.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from training.config import ConfigError, TrainConfig
from training.distributed import broadcast_object
from training.logprobs import sequence_logps
from training.objectives.base import Batch, DataInfo, LossOutput, Objective, RunContext
from training.objectives.pairs import PairData, PairStream, eval_pair_batches, evaluate_pairs, pair_metrics
from training.reference import (
    cache_key,
    cache_path,
    data_fingerprint,
    load_or_compute,
    model_fingerprint,
    score_pairs,
)

log = logging.getLogger(__name__)

LOSS_TYPES = ("sigmoid", "ipo", "dpo_norm", "simpo")
LossType = Literal["sigmoid", "ipo", "dpo_norm", "simpo"]
REFERENCE_FREE = ("simpo",)


def preference_loss(
    loss_type: str,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    beta: float,
    gamma: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair (losses, chosen rewards, rejected rewards), each [B], from summed response log-probs
    [B] and response token counts [B]. Rewards are detached."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown DPO loss type {loss_type!r}; known: {', '.join(LOSS_TYPES)}")
    n_chosen = chosen_tokens.clamp(min=1).to(chosen_logps.dtype)
    n_rejected = rejected_tokens.clamp(min=1).to(rejected_logps.dtype)
    if loss_type == "simpo":
        chosen_scores, rejected_scores = chosen_logps / n_chosen, rejected_logps / n_rejected
        losses = -F.logsigmoid(beta * (chosen_scores - rejected_scores) - gamma)
    else:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError(f"DPO loss {loss_type!r} needs the reference log-probs")
        chosen_scores = chosen_logps - ref_chosen_logps
        rejected_scores = rejected_logps - ref_rejected_logps
        if loss_type == "sigmoid":
            losses = -F.logsigmoid(beta * (chosen_scores - rejected_scores))
        else:
            chosen_avg, rejected_avg = chosen_scores / n_chosen, rejected_scores / n_rejected
            if loss_type == "ipo":
                losses = (chosen_avg - rejected_avg - 1.0 / (2.0 * beta)) ** 2
            else:  # dpo_norm: the reward itself is per token
                chosen_scores, rejected_scores = chosen_avg, rejected_avg
                losses = -F.logsigmoid(beta * (chosen_scores - rejected_scores))
    return losses, beta * chosen_scores.detach(), beta * rejected_scores.detach()


@dataclass
class DPOSection:
    """The `dpo:` section of a DPO config."""

    loss: LossType = "sigmoid"
    beta: float = 0.1  # β: Rafailov et al. use 0.1; SimPO's paper 2.0-2.5
    gamma: float = 0.5  # SimPO's target margin γ (TRL's simpo_gamma default); other losses ignore it
    reference_batch_size: int = 0  # pairs per forward of the one reference pass; 0: train.batch_size


class DPOObjective(Objective):
    """Batches of pairs (chosen rows, then rejected rows), the loss of `dpo.loss`, pair metrics."""

    sections = ("dpo",)
    requires_init_from = True

    @classmethod
    def validate_config(cls, cfg: TrainConfig) -> None:
        s = cfg.section("dpo")
        if s.beta <= 0:
            raise ConfigError(f"dpo.beta must be > 0, got {s.beta}")
        if s.reference_batch_size < 0:
            raise ConfigError(f"dpo.reference_batch_size must be >= 0, got {s.reference_batch_size}")

    def __init__(self, cfg: TrainConfig, run: RunContext) -> None:
        super().__init__(cfg, run)
        self.section = cfg.section("dpo")
        d = cfg.data
        self.train_data = PairData(d.mix, d.seq_len)
        self.eval_data = PairData(d.eval, d.eval_seq_len or d.seq_len) if d.eval else None
        self.reference: dict[str, torch.Tensor] = {}  # split -> [pairs, 2] reference log-probs

    def data_info(self) -> DataInfo:
        return self.train_data.data_info()

    def setup(self, model: nn.Module) -> None:
        t, info = self.cfg.train, self.run.info
        self.stream = PairStream(self.train_data, t.batch_size, t.seed, info.rank, info.world_size)
        self.eval_batches = [] if self.eval_data is None else eval_pair_batches(
            self.eval_data, t.eval_batch_size or t.batch_size, t.eval_batches)
        if info.is_main:
            self.train_data.warn_truncated("data.mix")
        if self.section.loss in REFERENCE_FREE:
            return
        reference = self.run.initial_model()
        fingerprint = broadcast_object(model_fingerprint(reference) if info.is_main else None, info)
        for split, data in (("train", self.train_data), ("eval", self.eval_data)):
            if data is not None:
                self.reference[split] = self._reference_table(reference, fingerprint, split, data)
        del reference

    def _reference_table(self, reference: nn.Module, fingerprint: str, split: str, data: PairData) -> torch.Tensor:
        info = self.run.info
        parts = broadcast_object({"data": data_fingerprint(data.manifest_path), "reference": fingerprint,
                                  "seq_len": data.seq_len, "precision": self.run.precision, "pairs": len(data)}
                                 if info.is_main else None, info)
        path = cache_path(self.cfg.train.out_dir, split, cache_key(**parts))
        batch_size = self.section.reference_batch_size or self.cfg.train.batch_size

        def compute() -> torch.Tensor:
            mine = range(info.rank, len(data), info.world_size)
            table = score_pairs(reference, mine, data.collate, len(data), batch_size, self.run.device,
                                self.run.autocast)
            if info.distributed:  # each rank filled its own rows: the sum is the whole table
                table = table.to(self.run.device)
                dist.all_reduce(table)
            return table.cpu()

        table, computed = load_or_compute(path, compute, is_main=info.is_main, metadata=parts,
                                          broadcast=lambda obj: broadcast_object(obj, info))
        if info.is_main:
            log.info("reference log-probs of %d %s pairs %s %s", len(data), split,
                     "computed and cached in" if computed else "read from", path)
        return torch.from_numpy(table)

    def next_batch(self) -> Batch:
        batch = self.stream.next_batch()
        if "train" in self.reference:
            batch.tensors["ref_logps"] = self.reference["train"][batch.tensors["pair_index"]]
        return batch

    def _pair_losses(self, model: nn.Module, tensors: dict[str, torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids, mask = tensors["input_ids"], tensors["mask"]
        logps, counts = sequence_logps(model(ids), ids, mask)
        n = ids.shape[0] // 2
        ref = tensors.get("ref_logps")
        return preference_loss(self.section.loss, logps[:n], logps[n:],
                               None if ref is None else ref[:, 0], None if ref is None else ref[:, 1],
                               counts[:n], counts[n:], beta=self.section.beta, gamma=self.section.gamma)

    def loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        losses, chosen, rejected = self._pair_losses(model, batch.tensors)
        return LossOutput(loss=losses.sum(), metrics=pair_metrics(chosen, rejected))

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if not self.eval_batches:
            return {}

        def score(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            if "eval" in self.reference:
                tensors["ref_logps"] = self.reference["eval"][tensors["pair_index"].cpu()].to(self.run.device)
            return self._pair_losses(model, tensors)

        return evaluate_pairs(model, self.eval_batches, score, self.run.device, self.run.autocast)

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)
