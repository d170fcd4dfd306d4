"""Reward model: `refinery train reward CONFIG`.

The model (training/reward_model.py) reads a sequence and gives one scalar r(x, y) at its last token.
Trained on preference pairs with the Bradley–Terry loss (Ouyang et al. 2022, eq. 1), with the
optional margin m of Llama 2 (Touvron et al. 2023, eq. 2):

    L = -log σ(r(x, y_w) - r(x, y_l) - m)

Metrics per pair: the chosen and rejected rewards, their margin, and the accuracy (r(x, y_w) >
r(x, y_l)); held-out accuracy comes with its 95% Wilson score interval (Wilson 1927), the honest way to
say whether a small evaluation set shows a reward model better than chance.

Export: HF `LlamaForSequenceClassification` (num_labels=1) in `<out_dir>/hf`, padded with the
tokenizer's <|pad|>, so `transformers` gives the same scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training.config import ConfigError, TrainConfig
from training.model import ModelConfig
from training.objectives.base import Batch, DataInfo, LossOutput, Objective, RunContext
from training.objectives.pairs import PairData, PairStream, eval_pair_batches, evaluate_pairs, pair_metrics
from training.reward_model import SCORE_KEY, RewardModel, export_reward_model, last_token_values, score_init


@dataclass
class RewardSection:
    """The `reward:` section of a reward-model config."""

    margin: float = 0.0  # m in -log σ(r_w - r_l - m); 0 is the plain Bradley–Terry loss


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Per-pair -log σ(r_w - r_l - m)."""
    return -F.logsigmoid(chosen - rejected - margin)


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% for the default z)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


class RewardObjective(Objective):
    sections = ("reward",)
    requires_init_from = True

    def __init__(self, cfg: TrainConfig, run: RunContext) -> None:
        super().__init__(cfg, run)
        self.margin = float(cfg.section("reward").margin)
        d = cfg.data
        self.train_data = PairData(d.mix, d.seq_len)
        self.eval_data = PairData(d.eval, d.eval_seq_len or d.seq_len) if d.eval else None

    @classmethod
    def validate_config(cls, cfg: TrainConfig) -> None:
        if cfg.section("reward").margin < 0:
            raise ConfigError(f"reward.margin must be >= 0, got {cfg.section('reward').margin}")

    def data_info(self) -> DataInfo:
        return self.train_data.data_info()

    def build_model(self, mcfg: ModelConfig) -> nn.Module:
        return RewardModel(mcfg)

    def adapt_init_state(self, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
        """A language model's weights gain a head drawn from train.seed, so the load stays strict."""
        if SCORE_KEY not in state:
            dim = state["embed_tokens.weight"].shape[1]
            state = {**state, SCORE_KEY: score_init(dim, self.cfg.train.seed)}
        return state, True

    def setup(self, model: nn.Module) -> None:
        t, info = self.cfg.train, self.run.info
        pad_id = self.train_data.pad_id
        if t.export_hf and pad_id is None:
            raise ValueError(f"{self.train_data.manifest_path}: the tokenizer has no <|pad|> token, which the "
                             "LlamaForSequenceClassification export needs; use a tokenizer with one or set "
                             "train.export_hf=false")
        self.stream = PairStream(self.train_data, t.batch_size, t.seed, info.rank, info.world_size)
        self.eval_batches = [] if self.eval_data is None else eval_pair_batches(
            self.eval_data, t.eval_batch_size or t.batch_size, t.eval_batches)
        if info.is_main:
            self.train_data.warn_truncated("data.mix")

    def next_batch(self) -> Batch:
        batch = self.stream.next_batch()
        _check_last_tokens(batch.tensors, self.train_data.pad_id)
        return batch

    def _rewards(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        rewards = last_token_values(model(tensors["input_ids"]), tensors["lengths"])
        n = rewards.shape[0] // 2
        return rewards[:n], rewards[n:]

    def loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        chosen, rejected = self._rewards(model, batch.tensors)
        return LossOutput(loss=bradley_terry_loss(chosen, rejected, self.margin).sum(),
                          metrics=pair_metrics(chosen, rejected))

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if not self.eval_batches:
            return {}

        def score(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            chosen, rejected = self._rewards(model, tensors)
            return bradley_terry_loss(chosen, rejected, self.margin), chosen, rejected

        result = evaluate_pairs(model, self.eval_batches, score, self.run.device, self.run.autocast)
        low, high = wilson_interval(round(result["eval_accuracy"] * result["eval_pairs"]), int(result["eval_pairs"]))
        return {**result, "eval_accuracy_low": low, "eval_accuracy_high": high}

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)

    def export(self, state: dict[str, torch.Tensor], mcfg: ModelConfig, out_dir: Path) -> str | None:
        info = self.data_info()
        assert self.train_data.pad_id is not None  # checked in setup
        return str(export_reward_model((state, mcfg), out_dir / "hf", pad_id=self.train_data.pad_id,
                                       tokenizer_path=info.tokenizer, bos_id=info.special_ids.get("bos_id"),
                                       eos_id=info.special_ids.get("eos_id")))


def _check_last_tokens(tensors: dict[str, torch.Tensor], pad_id: int | None) -> None:
    """HF's classifier scores the rightmost non-pad token: a sequence ending in the pad id would be
    scored one token early there, so the export would disagree with training."""
    if pad_id is None:
        return
    last = tensors["input_ids"].gather(1, (tensors["lengths"] - 1).unsqueeze(1))
    if bool((last == pad_id).any()):
        raise ValueError(f"a preference sequence ends with the pad token id {pad_id}; the tokenizer's pad "
                         "token must not be part of the data")
