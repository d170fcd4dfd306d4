"""RLHF with PPO: `refinery train ppo CONFIG`.

The four models of InstructGPT (Ouyang et al. 2022, §3.5; Stiennon et al. 2020): the policy π_θ, a
frozen reference π_ref (the start checkpoint), a reward model r_φ (a `refinery train reward`
checkpoint, or the verifiers of the task, "PPO with verifiable rewards") and a value head V_ψ. Here
the value head is a scalar projection of the policy's own final hidden states (a shared trunk, as in
Ziegler et al. 2019 and TRL's original `AutoModelForCausalLMWithValueHead`), so the engine trains one
module with one optimizer.

Per completion y of prompt x the token rewards are a KL penalty on every token plus the score at the
last one (Ziegler et al. 2019 eq. 2; TRL `PPOTrainer`):

    r_t = -β (log π_old(y_t|·) - log π_ref(y_t|·)) + [t = T] r_φ(x, y)

optionally whitened over the batch (`whiten_rewards`, TRL: scaled by their std, mean kept). Advantages
by generalized advantage estimation (Schulman et al. 2016, eq. 16), then whitened (zero mean, unit std):

    δ_t = r_t + γ V(s_{t+1}) - V(s_t),     Â_t = Σ_l (γλ)^l δ_{t+l},     R_t = Â_t + V(s_t)

and the loss per completion token is PPO's clipped surrogate (Schulman et al. 2017, eq. 7) plus the
clipped value loss of the PPO2 reference implementation (OpenAI baselines; OpenRLHF `ValueLoss`):

    ℓ_t = -min(ρ_t Â_t, clip(ρ_t, 1-ε, 1+ε) Â_t)
          + c_v · ½ max((V_θ(s_t) - R_t)², (V_old + clip(V_θ - V_old, -ε_v, ε_v) - R_t)²)

averaged over the step's completion tokens. A completion cut at max_new_tokens can be given
`missing_eos_penalty` instead of its score (TRL, OpenRLHF). Rollout batches, epochs, resume and ranks:
training/rl_batches.py. Export: the policy as a `LlamaForCausalLM` (the value head is dropped).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from training.config import ConfigError, TrainConfig
from training.model import ModelConfig, Transformer
from training.objectives.base import LossOutput, RunContext
from training.rl_batches import RolloutObjective, RolloutSettings, Round, scaled_logps
from training.rollout import FINISH_LENGTH, Rollout

VALUE_KEY = "value_head.weight"


@dataclass
class PPOSection(RolloutSettings):
    """The `ppo:` section (sampling keys: training/rl_batches.py's RolloutSettings)."""

    samples_per_prompt: int = 1
    epochs: int = 4  # PPO epochs over each rollout batch (TRL's num_ppo_epochs)
    reward_model: str | None = None  # a reward-stage checkpoint; None: the `rewards` verifiers
    kl_coef: float = 0.05  # β (TRL PPOConfig.kl_coef)
    kl_estimator: Literal["k1", "k3"] = "k1"
    gamma: float = 1.0
    lam: float = 0.95
    clip_eps: float = 0.2
    clip_value: float = 0.2
    vf_coef: float = 0.1
    whiten_rewards: bool = True
    missing_eos_penalty: float | None = None  # score of a completion that never stopped; None: its own


class PolicyValueModel(Transformer):
    """The policy with a scalar value head on its final hidden states (a subclass, so `.layers`, FSDP,
    checkpoints and `init_from` work as for any Transformer). `forward` returns logits, as the rollout
    engine expects; `forward(..., with_values=True)` returns (logits, values [B, T] float32)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.value_head = nn.Linear(cfg.dim, 1, bias=False)
        nn.init.zeros_(self.value_head.weight)  # V = 0 at the start: the first advantages are the rewards

    def forward(self, input_ids: torch.Tensor, start_pos: int = 0, kv_cache: Any = None,
                position_ids: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
                with_values: bool = False) -> Any:
        hidden = self.hidden_states(input_ids, start_pos, kv_cache, position_ids, segment_ids)
        logits = self.lm_head(hidden)
        if not with_values:
            return logits
        return logits, self.value_head(hidden).squeeze(-1).float()


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked entries (mean added back when not `shift_mean`); 0 off the mask."""
    m = mask.float()
    n = m.sum().clamp(min=1)
    mean = (x * m).sum() / n
    var = (((x - mean) * m) ** 2).sum() / n
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * m


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) [B, T] over the masked (contiguous) positions of each row; V after the last
    position of a row is 0 (the episode ends)."""
    m = mask.float()
    adv = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0], dtype=rewards.dtype)
    next_value = torch.zeros_like(last)
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        adv[:, t] = last * m[:, t]
        # Outside the completion nothing carries over: the next row position starts fresh.
        last = last * m[:, t]
        next_value = values[:, t] * m[:, t]
    return adv, (adv + values) * m


def load_reward_model(path: str, device: torch.device, vocab_size: int) -> nn.Module:
    """A frozen `RewardModel` from a reward-stage checkpoint (run, checkpoints or step directory)."""
    from training.checkpoint import load_model_file
    from training.reward_model import SCORE_KEY, RewardModel

    data = load_model_file(path)
    if SCORE_KEY not in data["model"]:
        raise ConfigError(f"{path} is not a reward model (no {SCORE_KEY}); train one with `refinery train reward`")
    cfg = ModelConfig.from_dict(data["model_config"])
    if cfg.vocab_size < vocab_size:
        raise ConfigError(f"the reward model {path} has vocab_size {cfg.vocab_size}, smaller than the policy "
                          f"tokenizer's {vocab_size}: it must use the policy's tokenizer")
    with torch.device(device):
        model = RewardModel(cfg)
    model.load_state_dict(data["model"], strict=True)
    return model.requires_grad_(False).eval()


class PPOObjective(RolloutObjective):
    sections = ("ppo",)
    section_name = "ppo"

    def __init__(self, cfg: TrainConfig, run: RunContext) -> None:
        super().__init__(cfg, run)
        self.needs_reference = self.s.kl_coef > 0

    @classmethod
    def validate_config(cls, cfg: TrainConfig) -> None:
        super().validate_config(cfg)
        s = cfg.section("ppo")
        if cfg.has_section("lora"):
            raise ConfigError("stage ppo trains a value head beside the policy, which a LoRA adapter export "
                              "cannot carry; use full fine-tuning for PPO (LoRA RL: stage grpo)")
        for key in ("kl_coef", "clip_value", "vf_coef"):
            if getattr(s, key) < 0:
                raise ConfigError(f"ppo.{key} must be >= 0, got {getattr(s, key)}")
        if s.clip_eps <= 0:
            raise ConfigError(f"ppo.clip_eps must be > 0, got {s.clip_eps}")
        if not (0 <= s.gamma <= 1 and 0 <= s.lam <= 1):
            raise ConfigError(f"ppo.gamma and ppo.lam must be in [0, 1], got {s.gamma}, {s.lam}")

    def build_model(self, mcfg: ModelConfig) -> nn.Module:
        return PolicyValueModel(mcfg)

    def adapt_init_state(self, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
        """A language model gains a zero value head, so the load stays strict."""
        if VALUE_KEY not in state:
            dim = state["embed_tokens.weight"].shape[1]
            state = {**state, VALUE_KEY: torch.zeros(1, dim)}
        return state, True

    def setup(self, model: nn.Module) -> None:
        super().setup(model)
        self.reward_model = None
        if self.s.reward_model:
            self.reward_model = load_reward_model(self.s.reward_model, self.run.device, self.renderer.vocab_size)

    # -------------------------------------------------------------------------------------- rewards

    @torch.no_grad()
    def score(self, tasks: list[Any], rollouts: list[Rollout]) -> tuple[torch.Tensor, dict[str, torch.Tensor], Counter]:
        if self.reward_model is None:
            total, parts, reasons = super().score(tasks, rollouts)
        else:
            from training.reward_model import last_token_values
            from training.rollout import collate_rollouts

            pad = self.renderer.pad_id if self.renderer.pad_id is not None else 0
            scores = []
            for lo in range(0, len(rollouts), self.s.rollout_batch):
                chunk = rollouts[lo: lo + self.s.rollout_batch]
                ids = collate_rollouts(chunk, pad)["input_ids"].to(self.run.device)
                lengths = torch.tensor([len(r.prompt_ids) + len(r.token_ids) for r in chunk], device=ids.device)
                with self.run.autocast():
                    scores.append(last_token_values(self.reward_model(ids), lengths).float().cpu())
            total, reasons = torch.cat(scores), Counter({"reward model": len(rollouts)})
            parts = {"reward_model": total}
            if all(t.verifier != "none" for t in tasks):
                # Logged beside the score, never trained on: does the reward model's gain hold up?
                parts["verified"], _, reasons_v = super().score(tasks, rollouts)
                reasons += reasons_v
        if self.s.missing_eos_penalty is not None:
            cut = torch.tensor([r.finish_reason == FINISH_LENGTH for r in rollouts])
            total = torch.where(cut, torch.full_like(total, self.s.missing_eos_penalty), total)
        return total, parts, reasons

    # ------------------------------------------------------------------------------------- rollouts

    @torch.no_grad()
    def _values(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        was_training = self.policy.training
        self.policy.eval()
        out = []
        for lo in range(0, t["input_ids"].shape[0], self.s.rollout_batch):
            ids = t["input_ids"][lo: lo + self.s.rollout_batch].to(self.run.device)
            with self.run.autocast():
                out.append(self.policy(ids, with_values=True)[1][:, :-1].float().cpu())
        self.policy.train(was_training)
        return torch.cat(out)

    def prepare(self, t: dict[str, torch.Tensor], rnd: Round) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        s = self.s
        mask = t["completion_mask"][:, 1:]
        values = self._values(t) * mask
        rewards = torch.zeros_like(values)
        stats: dict[str, float] = {}
        if self.needs_reference:
            log_ratio = (t["old_logps"] - t["ref_logps"]) * mask
            kl = log_ratio if s.kl_estimator == "k1" else (torch.exp(-log_ratio) + log_ratio - 1) * mask
            rewards = rewards - s.kl_coef * kl
            stats["kl"] = float(kl.sum(dim=1).mean())  # per completion, nats
        last = t["lengths"] - 2  # the position that predicts each completion's last token
        rewards[torch.arange(len(last)), last] += rnd.rewards
        if s.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        adv, returns = gae(rewards, values, mask, s.gamma, s.lam)
        t["advantages"] = masked_whiten(adv, mask)
        t["returns"], t["old_values"] = returns, values
        stats["value"] = float(values.sum() / mask.sum().clamp(min=1))
        return t, stats

    # ----------------------------------------------------------------------------------------- loss

    def loss(self, model: nn.Module, batch: Any) -> LossOutput:
        from training.objectives.grpo import clipped_surrogate

        s, t = self.s, batch.tensors
        ids, mask = t["input_ids"], t["completion_mask"][:, 1:].float()
        logits, values = model(ids, with_values=True)
        logp = scaled_logps(logits, ids, self._temperature)
        policy_loss, clipped = clipped_surrogate(logp, t["old_logps"], t["advantages"], s.clip_eps, s.clip_eps)
        v, old_v, returns = values[:, :-1], t["old_values"], t["returns"]
        v_clipped = old_v + (v - old_v).clamp(-s.clip_value, s.clip_value)
        value_loss = 0.5 * torch.maximum((v - returns) ** 2, (v_clipped - returns) ** 2)
        loss = ((policy_loss + s.vf_coef * value_loss) * mask).sum()
        metrics = {"policy_loss": (policy_loss.detach() * mask).sum(), "value_loss": (value_loss.detach() * mask).sum(),
                   "clip_frac": (clipped.float() * mask).sum(),
                   "ratio": (torch.exp(logp.detach() - t["old_logps"]) * mask).sum(),
                   **self.stat_metrics(t, batch.weight)}
        return LossOutput(loss, metrics)

    def export(self, state: dict[str, torch.Tensor], mcfg: ModelConfig, out_dir: Path) -> str | None:
        return super().export({k: v for k, v in state.items() if k != VALUE_KEY}, mcfg, out_dir)
