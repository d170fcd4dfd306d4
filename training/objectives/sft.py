"""Supervised fine-tuning on chat shards (stage ``sft``), with Proximal SFT as a loss option.

Batches: conversations of ``training.chat.ChatShards`` (``data.mix``; held-out ``data.eval``). The model
predicts token t+1 at position t, and the loss at t counts iff ``mask[t+1]`` (assistant text and its
<|end|>), so prompts, system and user turns only condition. With ``sft.packing`` a row of
``data.seq_len + 1`` tokens holds as many whole conversations as fit, each seeing only itself (a
block-diagonal causal mask, positions restarting at 0: ``Transformer(position_ids=, segment_ids=)``), so
a packed conversation's loss equals its loss alone. A conversation longer than a row is skipped and
counted. Every rank computes the same global plan of rows and keeps rows ``rank::world_size``.

``sft.loss: ce`` — response-only cross-entropy over the N target tokens of the step:

    L(θ) = -1/N Σ_t m_{t+1} log π_θ(x_{t+1} | x_{≤t})

``sft.loss: proximal`` — Proximal SFT (Zhu et al. 2025, arXiv:2508.17784, section 3): SFT read as a policy
gradient with advantage Â_t = 1 on every target token, under PPO's clipped surrogate (Schulman et al.
2017, arXiv:1707.06347, eq. 7):

    L(θ) = -1/N Σ_t m_{t+1} min(r_t, clip(r_t, 1-ε, 1+ε)),   r_t = π_θ(x_{t+1}|x_{≤t}) / π_old(x_{t+1}|x_{≤t})

With Â = 1 only the upper bound binds: a token whose probability already rose past (1+ε)·π_old gives no
gradient, which bounds how far one snapshot's updates move the policy (the paper's remedy for entropy
collapse). π_old is a frozen copy of the starting policy, refreshed from the current weights every
``sft.refresh_every`` optimizer steps (0: never). The authors' recipe (github.com/zwhong714/PSFT,
verl/recipe/psft/run_psft.sh) computes old log-probs once per batch of 256 prompts and takes 8
mini-batch steps on it (refresh every 8), with clip_ratio_high ε = 0.28: the defaults here.
Logged: ``nll`` (the CE above, comparable across losses) and ``clip_frac``. Evaluation: ``eval_loss``
(CE per held-out target token) and ``eval_entropy`` (mean entropy, nats, of the next-token distribution
at held-out target positions).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.config import ConfigError, TrainConfig
from training.objectives.base import Batch, DataInfo, ExampleOrder, LossOutput, Objective

log = logging.getLogger("refinery.train")
PAD_SEGMENT = -1


@dataclass
class SFTSection:
    loss: Literal["ce", "proximal"] = "ce"
    clip_eps: float = 0.28  # proximal: ε of the upper clip 1 + ε
    refresh_every: int = 8  # proximal: optimizer steps between π_old snapshots; 0 = the start policy
    packing: bool = True  # several conversations per row, isolated from each other


def pack_rows(rows: list[list[tuple[np.ndarray, np.ndarray]]], packed: bool) -> dict[str, torch.Tensor]:
    """Rows of whole sequences -> inputs, targets, loss mask (+ positions and segments when packed)."""
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("inputs", "targets", "mask", "pos", "seg")}
    for row in rows:
        ids = np.concatenate([s for s, _ in row])
        mask = np.concatenate([m for _, m in row])
        seg = np.concatenate([np.full(len(s), k) for k, (s, _) in enumerate(row)])
        pos = np.concatenate([np.arange(len(s)) for s, _ in row])
        cols["inputs"].append(ids[:-1])
        cols["targets"].append(ids[1:])
        cols["mask"].append(mask[1:] & (seg[1:] == seg[:-1]))  # never predict across a boundary
        cols["pos"].append(pos[:-1])
        cols["seg"].append(seg[:-1])
    width = max(len(x) for x in cols["inputs"])
    pad = {"inputs": 0, "targets": 0, "mask": False, "pos": 0, "seg": PAD_SEGMENT}
    out = {k: torch.from_numpy(np.stack([np.pad(x, (0, width - len(x)), constant_values=pad[k]) for x in v]))
           for k, v in cols.items()}
    out["inputs"], out["targets"] = out["inputs"].long(), out["targets"].long()
    if not packed:  # one sequence per row: right padding under plain causal attention changes nothing
        del out["pos"], out["seg"]
    else:
        out["pos"], out["seg"] = out["pos"].long(), out["seg"].long()
    return out


def _forward(model: nn.Module, t: dict[str, torch.Tensor], logits_at: torch.Tensor | None = None) -> torch.Tensor:
    extra = {} if logits_at is None else {"logits_at": logits_at}
    if "seg" in t:
        return model(t["inputs"], position_ids=t["pos"], segment_ids=t["seg"], **extra)
    return model(t["inputs"], **extra)


def masked_target_logprobs(model: nn.Module, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """log π(target) at the loss-bearing positions only, fp32 [N]: the LM head runs on those alone."""
    at = t["mask"].bool()
    logits = _forward(model, t, at).float()
    return -F.cross_entropy(logits, t["targets"][at], reduction="none")


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log π(target) at every position, fp32 [B, T]."""
    return -F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)


def proximal_loss(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor,
                  clip_eps: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Σ_t m_t · -min(r_t, clip(r_t, 1-ε, 1+ε)) with r_t = exp(logp - old_logp) (the module docstring's
    equation, before the engine's 1/N); metrics ``nll`` and ``clip_frac`` as sums over the targets."""
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.minimum(ratio, ratio.clamp(1 - clip_eps, 1 + clip_eps))
    clipped = (ratio.detach() > 1 + clip_eps).float()
    return -(surrogate * mask).sum(), {"nll": -(logp.detach() * mask).sum(), "clip_frac": (clipped * mask).sum()}


class SFTObjective(Objective):
    sections = ("sft",)
    requires_init_from = True

    @classmethod
    def validate_config(cls, cfg: TrainConfig) -> None:
        s = cfg.section("sft")
        if s.clip_eps <= 0:
            raise ConfigError(f"sft.clip_eps must be > 0, got {s.clip_eps}")
        if s.refresh_every < 0:
            raise ConfigError(f"sft.refresh_every must be >= 0 (0: keep the starting policy), got {s.refresh_every}")
        if s.loss == "proximal" and s.refresh_every and cfg.has_section("lora"):
            raise ConfigError("sft.loss=proximal with a lora section needs sft.refresh_every=0 (π_old = the base)")

    def _shards(self, path: str) -> Any:
        from training.chat import ChatShards

        return ChatShards(path)

    def data_info(self) -> DataInfo:
        m = self._shards(self.cfg.data.mix).manifest
        tokenizer = Path(self.cfg.data.mix) / m.get("tokenizer", "tokenizer.json")
        # Generation must stop at the end of the assistant's turn: <|end|> is the exported eos.
        eos = m.get("end_id", m.get("eos_id"))
        return DataInfo(int(m["vocab_size"]), tokenizer if tokenizer.is_file() else None,
                        {"bos_id": m.get("bos_id"), "eos_id": eos, "pad_id": m.get("pad_id")})

    def _usable(self, shards: Any, what: str) -> np.ndarray:
        """Indices of the conversations that fit a row; the others are counted and skipped."""
        fits = (shards.lengths <= self.cfg.data.seq_len + 1) & (shards.lengths >= 2)
        if (skipped := int((~fits).sum())) and self.run.info.is_main:
            log.warning("sft: skipped %d of %d %s conversations (longer than data.seq_len + 1 = %d tokens)",
                        skipped, len(fits), what, self.cfg.data.seq_len + 1)
        return np.flatnonzero(fits)

    def setup(self, model: nn.Module) -> None:
        cfg, s = self.cfg, self.cfg.section("sft")
        self.s = s
        self.train_data = self._shards(cfg.data.mix)
        if self.run.model_config and self.train_data.vocab_size > self.run.model_config.vocab_size:
            raise ConfigError(f"{cfg.data.mix} has token ids up to {self.train_data.vocab_size - 1}, beyond "
                              f"the model's vocab_size {self.run.model_config.vocab_size}")
        self.usable = self._usable(self.train_data, "training")
        if len(self.usable) == 0:
            raise ConfigError(f"no conversation of {cfg.data.mix} fits data.seq_len={cfg.data.seq_len}")
        self.order = ExampleOrder(len(self.usable), cfg.train.seed)
        self.eval_rows: list[list[tuple[np.ndarray, np.ndarray]]] = []
        if cfg.data.eval:
            held = self._shards(cfg.data.eval)
            n = cfg.train.eval_batches * (cfg.train.eval_batch_size or cfg.train.batch_size)
            self.eval_rows = [[held[int(i)]] for i in self._usable(held, "held-out")[:n]]
        self.old_policy = self.run.initial_model() if s.loss == "proximal" else None

    # -------------------------------------------------------------------------------------------- data

    def _plan(self) -> list[list[int]]:
        """The global batch: ``train.batch_size`` rows, each a list of conversation indices."""
        cap, rows = self.cfg.data.seq_len + 1, []
        for _ in range(self.cfg.train.batch_size):
            row = [int(self.usable[self.order.next()])]
            used = int(self.train_data.lengths[row[0]])
            while self.s.packing:
                nxt = int(self.usable[self.order.peek()])
                if used + int(self.train_data.lengths[nxt]) > cap:
                    break
                row.append(nxt)
                used += int(self.train_data.lengths[nxt])
                self.order.next()
            rows.append(row)
        return rows

    def next_batch(self) -> Batch:
        info = self.run.info
        mine = self._plan()[info.rank::info.world_size]
        tensors = pack_rows([[self.train_data[i] for i in row] for row in mine], self.s.packing)
        real = int(sum(int(self.train_data.lengths[i]) - 1 for row in mine for i in row))
        return Batch(tensors, weight=int(tensors["mask"].sum()), tokens=real)

    def state_dict(self) -> dict[str, Any]:
        return self.order.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order.load_state_dict(state)

    # -------------------------------------------------------------------------------------------- loss

    def loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        t = batch.tensors
        logp = masked_target_logprobs(model, t)
        if self.old_policy is None:
            return LossOutput(-logp.sum())
        with torch.no_grad():
            old_logp = masked_target_logprobs(self.old_policy, t)
        return LossOutput(*proximal_loss(logp, old_logp, torch.ones_like(logp), self.s.clip_eps))

    def after_step(self, step: int, model: nn.Module) -> None:
        if self.old_policy is None or not self.s.refresh_every or step % self.s.refresh_every:
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # Full on every rank (a collective under FSDP2): each rank keeps its own unsharded π_old.
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        self.old_policy.load_state_dict(state)

    def extra_state(self) -> dict[str, Any]:
        if self.old_policy is None or not self.s.refresh_every:
            return {}  # π_old is the start policy, rebuilt from train.init_from on resume
        return {"old_policy": {k: v.detach().cpu() for k, v in self.old_policy.state_dict().items()}}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if self.old_policy is not None and "old_policy" in state:
            self.old_policy.load_state_dict(state["old_policy"])

    # -------------------------------------------------------------------------------------------- eval

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Every rank evaluates every held-out conversation (FSDP needs all ranks in each forward)."""
        if not self.eval_rows:
            return {}
        was_training = model.training
        model.eval()
        size = self.cfg.train.eval_batch_size or self.cfg.train.batch_size
        nll = entropy = count = 0.0
        for lo in range(0, len(self.eval_rows), size):
            t = {k: v.to(self.run.device) for k, v in pack_rows(self.eval_rows[lo:lo + size], False).items()}
            with self.run.autocast():
                logits = _forward(model, t).float()
            mask = t["mask"].float()
            logq = logits.log_softmax(-1)
            nll -= float((logq.gather(-1, t["targets"][..., None])[..., 0] * mask).sum())
            entropy -= float(((logq.exp() * logq).sum(-1) * mask).sum())
            count += float(mask.sum())
        model.train(was_training)
        return {"eval_loss": nll / max(count, 1.0), "eval_entropy": entropy / max(count, 1.0)}
