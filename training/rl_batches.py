"""Rollout batches on the one training loop: what GRPO and PPO share (training/objectives/{grpo,ppo}.py).

The engine's step is one optimizer step; an RL iteration is bigger: sample a rollout batch with the
current policy, score it, then take several optimizer steps on it. Here a rollout batch of
P prompts x n samples = R completions spans

    S = epochs x R / (train.batch_size x optim.grad_accum)

engine steps: each epoch (PPO's and GRPO's μ) visits every completion once, in a fresh order seeded by
(train.seed, rollout index, epoch), cut into R / (batch_size x grad_accum) optimizer steps of grad_accum
micro-batches. The first micro-batch of step r·S samples rollout batch r with the weights the policy
has then, so "old" log-probs are those of the sampling policy (`training.rollout` returns them, equal
to a teacher-forced forward to ~1e-5 in fp32) and the importance ratio of the first step is 1.

Everything is a pure function of (train.seed, step): the prompts come from an `ExampleOrder`, the
samples from the rollout engine's counter-based RNG keyed by (seed, rollout index, prompt, sample,
token), the row order from a seeded permutation. A checkpoint stores the data position and the whole
current rollout batch (tokens, old and reference log-probs, advantages: a few MB), so a run killed
in the middle of a rollout batch resumes on the same completions and logs the same metrics as an
uninterrupted one.

Ranks: every rank holds the same global rollout batch (sampled with the same seeds, so identical)
and trains on rows rank::world_size of each micro-batch, so N ranks train like one process. Rollouts run on the policy module itself (DDP's inner module); FSDP2 would
need every rank to decode in lockstep and is refused.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn

from training.config import ConfigError, TrainConfig
from training.logprobs import token_logps
from training.objectives.base import Batch, DataInfo, ExampleOrder, Objective, RunContext
from training.rewards import VerifiableTask
from training.rl_tasks import DATASETS, PromptRenderer, RewardFunctions, find_tokenizer, load_tasks
from training.rollout import FINISH_LENGTH, LocalRollout, Rollout, SamplingParams, collate_rollouts

log = logging.getLogger(__name__)


@dataclass
class RolloutSettings:
    """Keys every rollout-based stage has (the `grpo:` / `ppo:` section adds its own)."""

    dataset: str = "gsm8k"  # reader of data.mix / data.eval: gsm8k | math | humaneval | prompts
    instruction: str | None = None  # appended to each problem; None: the reader's default, "": none
    prompt_format: Literal["chat", "plain"] = "chat"  # plain: a base model without the chat template (-Zero)
    plain_template: str = "{prompt}"  # plain prompts: {prompt} is the problem text
    tokenizer: str | None = None  # tokenizer.json of the policy; None: <init_from run>/hf/tokenizer.json
    rewards: list[str] = field(default_factory=lambda: ["task"])  # task | format | gsm8k | math | code
    reward_weights: list[float] = field(default_factory=list)  # one per reward function; []: all 1
    prompts_per_rollout: int = 16  # P: prompts sampled per rollout batch (over all ranks)
    samples_per_prompt: int = 8  # n: completions per prompt (GRPO's group size G)
    max_new_tokens: int = 64
    temperature: float = 1.0  # also divides the logits of the loss's log-probs, as TRL does
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)  # stop strings (kept in the text); stop ids: <|end|>, EOS
    epochs: int = 1  # μ: passes of optimizer steps over each rollout batch
    rollout_batch: int = 64  # rows decoded together (KV-cache memory: rows x (prompt + new tokens))
    backend: Literal["local", "ray"] = "local"  # ray: rank 0 samples on ray_actors actors holding the policy
    ray_actors: int = 2
    eval_samples: int = 1  # completions per held-out prompt (greedy when 1)


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """The LoRA policy with its adapters off: the frozen base, i.e. the reference model, with no second
    copy (PEFT's `disable_adapter`). requires_grad flags are restored exactly afterwards."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])


def scaled_logps(logits: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """log π(ids[t+1] | ids[≤t]) [B, T-1] of logits / T (the distribution the sampler drew from)."""
    if temperature not in (0.0, 1.0):
        logits = logits.float() / temperature
    return token_logps(logits, ids)


@dataclass
class Round:
    """One sampling round: rollouts (prompt_index relative to the round), their tasks and rewards."""

    rollouts: list[Rollout]
    tasks: list[VerifiableTask]  # one per rollout
    rewards: torch.Tensor  # [N] total reward
    parts: dict[str, torch.Tensor]  # per reward function [N]
    reasons: Counter


class RolloutObjective(Objective):
    """Base of the rollout-based stages: prompts, sampling, scoring, the step plan, resume. A subclass
    turns a rollout batch into training tensors (`prepare`) and defines the loss."""

    requires_init_from = True
    section_name: ClassVar[str] = ""
    needs_reference: bool = False  # set by a subclass's __init__ from its section

    def __init__(self, cfg: TrainConfig, run: RunContext) -> None:
        super().__init__(cfg, run)
        self.s = cfg.section(self.section_name)
        self.renderer = PromptRenderer(find_tokenizer(self.s.tokenizer, cfg.train.init_from), self.s.prompt_format,
                                       self.s.plain_template, self.s.stop)
        self.rows = self.s.prompts_per_rollout * self.s.samples_per_prompt
        self.step_rows = cfg.train.batch_size * cfg.optim.grad_accum
        self.minibatches = self.rows // self.step_rows
        self.steps_per_rollout = self.s.epochs * self.minibatches

    @classmethod
    def validate_config(cls, cfg: TrainConfig) -> None:
        s, name = cfg.section(cls.section_name), cls.section_name
        for key in ("prompts_per_rollout", "samples_per_prompt", "max_new_tokens", "epochs", "rollout_batch",
                    "ray_actors", "eval_samples"):
            if getattr(s, key) < 1:
                raise ConfigError(f"{name}.{key} must be >= 1, got {getattr(s, key)}")
        if s.dataset not in DATASETS:
            raise ConfigError(f"{name}.dataset must be one of {', '.join(DATASETS)}, got {s.dataset!r}")
        if s.temperature < 0:
            raise ConfigError(f"{name}.temperature must be >= 0 (0: greedy), got {s.temperature}")
        rows, step_rows = s.prompts_per_rollout * s.samples_per_prompt, cfg.train.batch_size * cfg.optim.grad_accum
        if rows % step_rows:
            raise ConfigError(f"a rollout batch of {name}.prompts_per_rollout x {name}.samples_per_prompt = {rows} "
                              f"completions must split into optimizer steps of train.batch_size x optim.grad_accum "
                              f"= {step_rows}; make {rows} a multiple of {step_rows}")
        if cfg.train.parallel == "fsdp":
            raise ConfigError(f"stage {cfg.stage} samples on the policy module, which FSDP2 shards; use "
                              f"train.parallel=ddp (each rank holds the policy)")
        if s.backend == "ray" and cfg.has_section("lora") and cfg.section("lora").quantize != "none":
            raise ConfigError(f"{name}.backend=ray pushes plain weights to the actors; QLoRA's 4-bit base cannot "
                              f"be pushed: use {name}.backend=local")

    def data_info(self) -> DataInfo:
        r = self.renderer
        return DataInfo(r.vocab_size, r.path, {"bos_id": r.bos_id, "eos_id": r.export_eos_id, "pad_id": r.pad_id})

    # ------------------------------------------------------------------------------------------ setup

    def _usable_tasks(self, path: str, what: str) -> tuple[list[VerifiableTask], list[list[int]]]:
        tasks = load_tasks(self.s.dataset, path, self.s.instruction)
        assert self.run.model_config is not None
        limit = min(self.cfg.data.seq_len, self.run.model_config.max_seq_len) - self.s.max_new_tokens
        kept, prompts = [], []
        for t in tasks:
            ids = self.renderer.render(t)
            if len(ids) <= limit:
                kept.append(t)
                prompts.append(ids)
        if len(kept) < len(tasks) and self.run.info.is_main:
            log.warning("%s: skipped %d of %d %s prompts longer than data.seq_len - max_new_tokens = %d tokens",
                        self.cfg.stage, len(tasks) - len(kept), len(tasks), what, limit)
        if not kept:
            raise ConfigError(f"no {what} prompt of {path} fits data.seq_len={self.cfg.data.seq_len} minus "
                              f"{self.section_name}.max_new_tokens={self.s.max_new_tokens}")
        return kept, prompts

    def setup(self, model: nn.Module) -> None:
        cfg, info = self.cfg, self.run.info
        self.model = model
        self.policy = unwrap(model)
        self.lora = cfg.has_section("lora")
        self.tasks, self.prompts = self._usable_tasks(cfg.data.mix, "training")
        self.order = ExampleOrder(len(self.tasks), cfg.train.seed)
        self.eval_tasks: list[VerifiableTask] = []
        self.eval_prompts: list[list[int]] = []
        if cfg.data.eval:
            tasks, prompts = self._usable_tasks(cfg.data.eval, "held-out")
            n = cfg.train.eval_batches * (cfg.train.eval_batch_size or cfg.train.batch_size)
            self.eval_tasks, self.eval_prompts = tasks[:n], prompts[:n]
        self.reward_fns = RewardFunctions(self.s.rewards, self.s.reward_weights)
        self.reference: nn.Module | None = None
        if self.needs_reference and not self.lora:
            self.reference = self.run.initial_model()
        tokenizer = self.renderer.tokenizer
        self.local = LocalRollout(self.policy, tokenizer, self.s.rollout_batch)  # type: ignore[arg-type]
        self.ray: Any = None  # rank 0's actors; every rank follows `use_ray`
        self.use_ray = self.s.backend == "ray"
        if self.use_ray and info.is_main:
            from training.rollout import RayRollout

            self.ray = RayRollout(self._plain_policy(), self.s.ray_actors, tokenizer, self.s.rollout_batch)
        self.micro = 0
        self.buffer: dict[str, torch.Tensor] | None = None
        self.buffer_index = -1

    def _plain_policy(self) -> nn.Module:
        """The policy as a plain Transformer (LoRA merged into a copy) for the Ray actors."""
        if not self.lora:
            return self.policy
        import copy

        from training.adapters import merge_adapter

        return merge_adapter(copy.deepcopy(self.policy))

    # -------------------------------------------------------------------------------------- sampling

    def sampling(self, rollout: int, round_: int, n: int | None = None, greedy: bool = False) -> SamplingParams:
        s = self.s
        # A distinct, reproducible stream per (run seed, rollout batch, round).
        seed = (self.cfg.train.seed * 1_000_003 + rollout) * 1_009 + round_
        return SamplingParams(n=n or s.samples_per_prompt, max_new_tokens=s.max_new_tokens,
                              temperature=0.0 if greedy else s.temperature, top_p=s.top_p, top_k=s.top_k,
                              stop=tuple(s.stop), stop_token_ids=self.renderer.stop_token_ids, seed=seed)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Rollout]:
        """Rollouts of the current policy, the same on every rank."""
        info = self.run.info
        if self.use_ray:
            from training.distributed import broadcast_object

            out = None
            if info.is_main:
                self.ray.load_weights({k: v.detach().cpu() for k, v in self._plain_policy().state_dict().items()})
                out = self.ray.generate(prompts, params)
            return broadcast_object(out, info)
        # Every rank samples the whole batch: the counter-based RNG makes the copies identical. (A share per
        # rank plus an all-gather would divide the work; requested from training/rollout.py.)
        return self.local.generate(prompts, params)

    def sample_round(self, rollout: int, round_: int) -> Round:
        """P prompts from the data order, n samples each, scored."""
        picked = self.order.take(self.s.prompts_per_rollout)
        rollouts = self.generate([self.prompts[i] for i in picked], self.sampling(rollout, round_))
        tasks = [self.tasks[picked[r.prompt_index]] for r in rollouts]
        total, parts, reasons = self.score(tasks, rollouts)
        return Round(rollouts, tasks, total, parts, reasons)

    def score(self, tasks: list[VerifiableTask], rollouts: list[Rollout]
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor], Counter]:
        return self.reward_fns.score(tasks, [r.text or "" for r in rollouts])

    def collect(self, rollout: int) -> tuple[Round, dict[str, float]]:
        """The rollout batch: one round by default (GRPO may resample)."""
        return self.sample_round(rollout, 0), {}

    # ------------------------------------------------------------------------------------ the buffer

    @torch.no_grad()
    def forward_logps(self, model: nn.Module, t: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-token log-probs [R, T-1] of the buffer's rows under `model`, in chunks."""
        out = []
        for lo in range(0, t["input_ids"].shape[0], self.s.rollout_batch):
            ids = t["input_ids"][lo: lo + self.s.rollout_batch].to(self.run.device)
            with self.run.autocast():
                out.append(scaled_logps(model(ids), ids, self._temperature).cpu())
        return torch.cat(out)

    @property
    def _temperature(self) -> float:
        return self.s.temperature or 1.0

    def reference_logps(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.reference is not None:
            return self.forward_logps(self.reference, t)
        was_training = self.policy.training
        self.policy.eval()
        try:
            with adapters_disabled(self.policy):
                return self.forward_logps(self.policy, t)
        finally:
            self.policy.train(was_training)

    def _fill_buffer(self, rollout: int) -> None:
        rnd, extra_stats = self.collect(rollout)
        pad = self.renderer.pad_id if self.renderer.pad_id is not None else 0
        t = collate_rollouts(rnd.rollouts, pad_id=pad)
        t["lengths"] = torch.tensor([len(r.prompt_ids) + len(r.token_ids) for r in rnd.rollouts])
        t["rewards"] = rnd.rewards
        if self.needs_reference:
            t["ref_logps"] = self.reference_logps(t)
        t, stats = self.prepare(t, rnd)
        lengths = torch.tensor([len(r.token_ids) for r in rnd.rollouts], dtype=torch.float32)
        stats.update({"reward": float(rnd.rewards.mean()), "reward_std": float(rnd.rewards.std(unbiased=False)),
                      "completion_len": float(lengths.mean()),
                      "truncated": float(np.mean([r.finish_reason == FINISH_LENGTH for r in rnd.rollouts]))})
        if len(rnd.parts) > 1:
            stats.update({f"reward_{k}": float(v.mean()) for k, v in rnd.parts.items()})
        stats.update(extra_stats)  # e.g. GRPO's filtered batch: the policy's reward before filtering
        t.update({f"stat/{k}": torch.tensor(float(v)) for k, v in stats.items()})
        self.buffer, self.buffer_index = t, rollout
        if self.run.info.is_main:
            log.info("%s rollout %d: reward %.4f, %s", self.cfg.stage, rollout, stats["reward"],
                     dict(rnd.reasons.most_common(4)))

    def prepare(self, t: dict[str, torch.Tensor], rnd: Round) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Add the training tensors (advantages, ...) of a rollout batch; return it and its stats."""
        raise NotImplementedError

    def next_batch(self) -> Batch:
        info, ga, bs = self.run.info, self.cfg.optim.grad_accum, self.cfg.train.batch_size
        step, k = divmod(self.micro, ga)
        rollout, within = divmod(step, self.steps_per_rollout)
        if self.buffer is None or self.buffer_index != rollout:
            self._fill_buffer(rollout)
        assert self.buffer is not None
        epoch, m = divmod(within, self.minibatches)
        order = np.random.default_rng([self.cfg.train.seed, rollout, epoch]).permutation(self.rows)
        rows = order[m * self.step_rows:(m + 1) * self.step_rows][k * bs:(k + 1) * bs][info.rank::info.world_size]
        index = torch.from_numpy(np.sort(rows))
        width = int(self.buffer["lengths"][index].max())
        t: dict[str, torch.Tensor] = {}
        for key, v in self.buffer.items():
            if key.startswith("stat/"):
                t[key] = v
            elif key in ("input_ids", "completion_mask"):
                t[key] = v[index, :width]
            elif v.dim() == 2:  # per-token values aligned with token_logps: T - 1 columns
                t[key] = v[index, :width - 1]
            else:
                t[key] = v[index]
        self.micro += 1
        return Batch(t, weight=self.weight(t), tokens=int(t["lengths"].sum()))

    def weight(self, t: dict[str, torch.Tensor]) -> int:
        """Units the loss sums over (the engine's divisor): completion tokens by default."""
        return int(t["completion_mask"][:, 1:].sum())

    @staticmethod
    def stat_metrics(t: dict[str, torch.Tensor], weight: int) -> dict[str, torch.Tensor]:
        """Rollout-batch statistics as sums over the batch's units: the engine's division by the step's
        units gives the statistic back (every micro-batch of a step comes from one rollout batch)."""
        return {k.removeprefix("stat/"): v.float() * weight for k, v in t.items() if k.startswith("stat/")}

    def after_step(self, step: int, model: nn.Module) -> None:
        t = self.cfg.train
        if self.use_ray and step == min(t.steps, t.stop_after or t.steps):
            # The engine has no teardown hook: release the actors after the last step (a later run in this
            # process would otherwise wait for their CPUs). Final evaluation samples in process, identically.
            self.use_ray = False
            if self.ray is not None:
                self.ray.close()
                self.ray = None

    # ---------------------------------------------------------------------------------------- resume

    def state_dict(self) -> dict[str, Any]:
        return {"order": self.order.state_dict(), "micro": self.micro}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order.load_state_dict(state["order"])
        self.micro = int(state["micro"])

    def extra_state(self) -> dict[str, Any]:
        if self.buffer is None:
            return {}
        return {"rollout_index": self.buffer_index, "buffer": {k: v.cpu() for k, v in self.buffer.items()}}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if "buffer" in state:
            # Used only if the run stopped inside this rollout batch; at a boundary the next one is sampled.
            self.buffer, self.buffer_index = dict(state["buffer"]), int(state["rollout_index"])

    # ------------------------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Mean reward of the policy on the held-out prompts (greedy unless eval_samples > 1); every rank
        computes the same numbers."""
        if not self.eval_tasks:
            return {}
        n = self.s.eval_samples
        params = self.sampling(-1, 0, n=n, greedy=n == 1)
        rollouts = self.generate(self.eval_prompts, params)
        tasks = [self.eval_tasks[r.prompt_index] for r in rollouts]
        total, parts, _ = self.score(tasks, rollouts)
        out = {"eval_reward": float(total.mean()),
               "eval_completion_len": float(np.mean([len(r.token_ids) for r in rollouts]))}
        if len(parts) > 1:
            out.update({f"eval_reward_{k}": float(v.mean()) for k, v in parts.items()})
        return out


def relabel(groups: list[list[Rollout]]) -> list[Rollout]:
    """Concatenate groups of rollouts, renumbering prompt_index 0, 1, ... in group order."""
    return [replace(r, prompt_index=g) for g, group in enumerate(groups) for r in group]
