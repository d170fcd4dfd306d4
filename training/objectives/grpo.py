"""GRPO / RLVR: `refinery train grpo CONFIG`.

Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300, eq. 3): for each
prompt q the current policy samples a group of G completions o_1..o_G; a verifier scores each,
r_i ∈ [0, 1] (reinforcement learning with verifiable rewards, RLVR: Lambert et al. 2024, Tülu 3). The
advantage of every token of o_i is its reward against the group (outcome supervision, §4.1.2):

    Â_i = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + 1e-4)      (scale_rewards: true, TRL's default)
    Â_i =  r_i - mean(r_1..r_G)                                (false: Dr. GRPO, Liu et al. 2025,
                                                                arXiv:2503.20783 §3.1, no std bias)

and the loss is PPO's clipped surrogate (Schulman et al. 2017, eq. 7) with an optional KL penalty to a
frozen reference, estimated per token with Schulman's k3 (DeepSeekMath eq. 4):

    ℓ_{i,t} = -min(ρ_{i,t} Â_i, clip(ρ_{i,t}, 1-ε_low, 1+ε_high) Â_i) + β D_{i,t},
    ρ_{i,t} = π_θ(o_{i,t} | q, o_{i,<t}) / π_old(o_{i,t} | q, o_{i,<t}),
    D_{i,t} = π_ref/π_θ - log(π_ref/π_θ) - 1

(ε_high > ε_low is DAPO's clip-higher, Yu et al. 2025, arXiv:2503.14476 §3.1.) Aggregation of ℓ over
the step's completions (`loss_type`):

    token     Σ_i Σ_t ℓ_{i,t} / Σ_i |o_i|         DAPO §3.3 (TRL's default "dapo"): long answers count per token
    sequence  1/N Σ_i (1/|o_i|) Σ_t ℓ_{i,t}       the GRPO paper's eq. 3
    constant  Σ_i Σ_t ℓ_{i,t} / (N · max_new_tokens)  Dr. GRPO: no length bias

π_old is the sampling policy (its log-probs come with the rollouts); with `epochs` μ > 1 each rollout
batch is reused for μ passes and ρ departs from 1 (DeepSeekMath Algorithm 1). `filter_zero_variance`
is DAPO's dynamic sampling (§3.2): groups whose completions all scored the same carry no gradient, so
more prompts are sampled (up to `max_rounds` rounds) until the batch holds P informative groups.

Process rewards (`prm`: a checkpoint of `refinery train prm`): the PRM scores each step of each
completion; the step rewards, normalized over the group, add to the advantage of every token at or
before each step (DeepSeekMath §4.1.3, process supervision: Â_{i,t} = Σ_{steps j ending at or after t}
r̃_{i,j}), weighted by `prm_coef`.

With LoRA (a `lora:` section) the policy is adapters over a frozen base and the reference is that base
with the adapters switched off: no second copy. Rollout batches, resume and ranks:
training/rl_batches.py.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from training.config import ConfigError, TrainConfig
from training.objectives.base import LossOutput, RunContext
from training.rl_batches import RolloutObjective, RolloutSettings, Round, relabel, scaled_logps
from training.rollout import Rollout

LOSS_TYPES = ("token", "sequence", "constant")


@dataclass
class GRPOSection(RolloutSettings):
    """The `grpo:` section (sampling keys: training/rl_batches.py's RolloutSettings)."""

    scale_rewards: bool = True  # divide by the group's std; false = Dr. GRPO
    loss_type: Literal["token", "sequence", "constant"] = "token"
    clip_eps: float = 0.2  # ε_low
    clip_eps_high: float | None = None  # ε_high; None: = clip_eps (DAPO uses 0.28)
    beta: float = 0.0  # KL coefficient (TRL's default 0: no reference; DeepSeekMath 0.04)
    mask_truncated: bool = False  # no loss on completions cut at max_new_tokens (DAPO §3.4 overlong filtering)
    filter_zero_variance: bool = False  # DAPO dynamic sampling
    max_rounds: int = 4  # sampling rounds per rollout batch when filtering
    prm: str | None = None  # process reward model checkpoint: dense step rewards
    prm_coef: float = 1.0


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool, eps: float = 1e-4) -> torch.Tensor:
    """Â_i per completion [N] from rewards [N] in groups of `group_size` consecutive rows."""
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        # unbiased std as TRL's GRPOTrainer (torch.std); a group of 1 has no spread to divide by
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(centred)
        centred = centred / (std + eps)
    return centred.reshape(-1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(π_θ || π_ref) per token: unbiased, always >= 0."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, eps_low: float,
                      eps_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(-min(ρÂ, clip(ρ)Â) per token, whether the clipped branch was taken) for per-token Â."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high) * advantages
    return -torch.minimum(unclipped, clipped), (clipped < unclipped).detach()


class GRPOObjective(RolloutObjective):
    sections = ("grpo",)
    section_name = "grpo"

    def __init__(self, cfg: TrainConfig, run: RunContext) -> None:
        super().__init__(cfg, run)
        self.needs_reference = self.s.beta > 0
        self.eps_high = self.s.clip_eps if self.s.clip_eps_high is None else self.s.clip_eps_high
        self.prm: Any = None

    @classmethod
    def validate_config(cls, cfg: TrainConfig) -> None:
        super().validate_config(cfg)
        s = cfg.section("grpo")
        if s.loss_type not in LOSS_TYPES:
            raise ConfigError(f"grpo.loss_type must be one of {', '.join(LOSS_TYPES)}, got {s.loss_type!r}")
        if s.samples_per_prompt < 2:
            raise ConfigError("grpo.samples_per_prompt (the group size G) must be >= 2: advantages compare a "
                              "completion with the others of its group")
        if s.clip_eps <= 0 or (s.clip_eps_high is not None and s.clip_eps_high <= 0):
            raise ConfigError("grpo.clip_eps and grpo.clip_eps_high must be > 0")
        if s.beta < 0:
            raise ConfigError(f"grpo.beta must be >= 0, got {s.beta}")
        if s.max_rounds < 1:
            raise ConfigError(f"grpo.max_rounds must be >= 1, got {s.max_rounds}")

    def setup(self, model: nn.Module) -> None:
        super().setup(model)
        if self.s.prm:
            from training.objectives.prm import load_prm

            self.prm = load_prm(self.s.prm, self.run.device, self.renderer.vocab_size)

    # ------------------------------------------------------------------------------------- rollouts

    def collect(self, rollout: int) -> tuple[Round, dict[str, float]]:
        if not self.s.filter_zero_variance:
            return super().collect(rollout)
        g, p = self.s.samples_per_prompt, self.s.prompts_per_rollout
        informative: list[tuple[Round, int]] = []  # (round, group) pairs
        flat: list[tuple[Round, int]] = []
        first: Round | None = None
        rounds = 0
        for round_ in range(self.s.max_rounds):
            rnd = self.sample_round(rollout, round_)
            rounds += 1
            first = first or rnd
            for k in range(p):
                varied = bool(rnd.rewards[k * g:(k + 1) * g].std() > 0)
                (informative if varied else flat).append((rnd, k))
            if len(informative) >= p:
                break
        assert first is not None
        chosen = (informative + flat)[:p]  # filled with flat groups if sampling ran out of rounds
        rows = [(rnd, k * g + j) for rnd, k in chosen for j in range(g)]
        groups: list[list[Rollout]] = [[rnd.rollouts[k * g + j] for j in range(g)] for rnd, k in chosen]
        reasons: Counter = Counter()
        for used in {id(rnd): rnd for rnd, _ in chosen}.values():
            reasons += used.reasons
        merged = Round(relabel(groups), [rnd.tasks[i] for rnd, i in rows],
                       torch.stack([rnd.rewards[i] for rnd, i in rows]),
                       {n: torch.stack([rnd.parts[n][i] for rnd, i in rows]) for n in first.parts}, reasons)
        flat_first = sum(1 for k in range(p) if not bool(first.rewards[k * g:(k + 1) * g].std() > 0))
        # The policy's own reward is the first round's, before filtering; `reward_trained` is the batch's.
        stats = {"reward": float(first.rewards.mean()), "reward_std": float(first.rewards.std(unbiased=False)),
                 **({f"reward_{n}": float(v.mean()) for n, v in first.parts.items()} if len(first.parts) > 1 else {}),
                 "reward_trained": float(merged.rewards.mean()),
                 "zero_variance_groups": flat_first / p, "sampling_rounds": float(rounds),
                 "filled_flat_groups": float(max(0, p - len(informative)))}
        return merged, stats

    def prepare(self, t: dict[str, torch.Tensor], rnd: Round) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        g = self.s.samples_per_prompt
        adv = group_advantages(rnd.rewards, g, self.s.scale_rewards)
        mask = t["completion_mask"][:, 1:]
        per_token = adv[:, None] * mask
        stats: dict[str, float] = {}
        if self.prm is not None:
            from training.objectives.prm import process_advantages

            dense, step_mean = process_advantages(self.prm, t, rnd.rollouts, g, self.renderer.tokenizer,
                                                  self.run.device)
            per_token = per_token + self.s.prm_coef * dense
            stats["prm_step_score"] = step_mean
        t["advantages"] = per_token
        if self.s.mask_truncated:
            finished = torch.tensor([r.finish_reason != "length" for r in rnd.rollouts])
            t["completion_mask"] = t["completion_mask"] & finished[:, None]
        flat = rnd.rewards.view(-1, g).std(dim=1) == 0
        stats.setdefault("zero_variance_groups", float(flat.float().mean()))
        return t, stats

    # ----------------------------------------------------------------------------------------- loss

    def weight(self, t: dict[str, torch.Tensor]) -> int:
        if self.s.loss_type == "token":
            return int(t["completion_mask"][:, 1:].sum())
        return int(t["input_ids"].shape[0])

    def loss(self, model: nn.Module, batch: Any) -> LossOutput:
        t = batch.tensors
        ids, mask = t["input_ids"], t["completion_mask"][:, 1:].float()
        logp = scaled_logps(model(ids), ids, self._temperature)
        per_token, clipped = clipped_surrogate(logp, t["old_logps"], t["advantages"], self.s.clip_eps, self.eps_high)
        metrics: dict[str, torch.Tensor] = {}
        if self.needs_reference:
            kl = k3_kl(logp, t["ref_logps"])
            per_token = per_token + self.s.beta * kl
            metrics["kl"] = (kl.detach() * mask).sum()
        lengths = mask.sum(dim=1).clamp(min=1)
        if self.s.loss_type == "token":
            loss = (per_token * mask).sum()
        elif self.s.loss_type == "sequence":
            loss = ((per_token * mask).sum(dim=1) / lengths).sum()
        else:
            loss = (per_token * mask).sum() / self.s.max_new_tokens
        # Token metrics in the loss's units: per token (token), per completion (sequence, constant).
        units = mask if self.s.loss_type == "token" else mask / lengths[:, None]
        metrics["clip_frac"] = (clipped.float() * units).sum()
        metrics["ratio"] = (torch.exp(logp.detach() - t["old_logps"]) * units).sum()
        if "kl" in metrics:
            metrics["kl"] = (k3_kl(logp.detach(), t["ref_logps"]) * units).sum()
        metrics.update(self.stat_metrics(t, batch.weight))
        return LossOutput(loss, metrics)
