"""Process reward model: `refinery train prm CONFIG`.

A PRM scores every step of a solution with the probability that the solution is still on its way to
the right answer. Labels come without human annotation (Math-Shepherd, Wang et al. 2024,
arXiv:2312.08935): the policy `prm.policy` (default train.init_from) solves each task of `data.mix`
and completes every step prefix; see training/rl_prm_labels.py. The labels are written once per
(tasks, policy weights, labelling settings) to `<out_dir>/prm_labels/`, so a resumed or repeated run
reads them.

The model is our Transformer with a scalar head (training/reward_model.py's `RewardModel`, initialized
from train.init_from), read at the last token of each step s with its label y_s ∈ [0, 1]; the loss is
Math-Shepherd's eq. 3, binary cross-entropy over the steps of the optimizer step:

    L = -1/S Σ_s [ y_s log σ(v_s) + (1 - y_s) log(1 - σ(v_s)) ]

Metrics: step accuracy (σ(v) > 0.5 agreeing with y > 0.5). Evaluation on `data.eval` tasks: the same,
and best-of-N reranking of each held-out task's sampled solutions by their lowest step score
(Math-Shepherd §4.2; Lightman et al. 2023): `eval_best_of_n` against `eval_solution_accuracy` (a random
pick) and `eval_oracle` (any correct).

Use: `process_advantages` turns step scores into GRPO's dense process rewards (`grpo.prm`), and
`rerank` picks the best of N completions.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.config import ConfigError, TrainConfig
from training.model import ModelConfig
from training.objectives.base import Batch, DataInfo, ExampleOrder, LossOutput, Objective, RunContext
from training.reward_model import SCORE_KEY, RewardModel, score_init
from training.rl_prm_labels import label_solutions, load_policy, read_labels, step_ends, write_labels
from training.rl_tasks import DATASETS, PromptRenderer, RewardFunctions, find_tokenizer, load_tasks
from training.rollout import LocalRollout, Rollout, SamplingParams

log = logging.getLogger(__name__)


@dataclass
class PRMSection:
    """The `prm:` section: the tasks to label and how (Math-Shepherd uses 15 solutions, N = 8)."""

    dataset: str = "gsm8k"  # reader of data.mix / data.eval: gsm8k | math | humaneval
    instruction: str | None = None
    prompt_format: Literal["chat", "plain"] = "chat"
    plain_template: str = "{prompt}"
    tokenizer: str | None = None  # None: <init_from run>/hf/tokenizer.json
    policy: str | None = None  # the solver whose steps are labelled; None: train.init_from
    solutions: int = 4  # solutions sampled per task
    rollouts: int = 8  # completions per step prefix (Math-Shepherd's N)
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] | None = None
    separator: str = "\n"  # a step ends at the token holding it
    label: Literal["soft", "hard"] = "hard"  # Math-Shepherd's best PRM used hard estimation
    rollout_batch: int = 64


class PRMObjective(Objective):
    sections = ("prm",)
    requires_init_from = True

    def __init__(self, cfg: TrainConfig, run: RunContext) -> None:
        super().__init__(cfg, run)
        self.s = cfg.section("prm")
        self.renderer = PromptRenderer(find_tokenizer(self.s.tokenizer, cfg.train.init_from), self.s.prompt_format,
                                       self.s.plain_template, self.s.stop or ())

    @classmethod
    def validate_config(cls, cfg: TrainConfig) -> None:
        s = cfg.section("prm")
        if s.dataset not in DATASETS or s.dataset == "prompts":
            raise ConfigError(f"prm.dataset must be one with answers to verify (gsm8k, math, humaneval), got {s.dataset!r}")
        for key in ("solutions", "rollouts", "max_new_tokens", "rollout_batch"):
            if getattr(s, key) < 1:
                raise ConfigError(f"prm.{key} must be >= 1, got {getattr(s, key)}")
        if not s.separator:
            raise ConfigError("prm.separator must be a non-empty string (the end of a step)")

    def data_info(self) -> DataInfo:
        r = self.renderer
        return DataInfo(r.vocab_size, r.path, {"bos_id": r.bos_id, "eos_id": r.export_eos_id, "pad_id": r.pad_id})

    def build_model(self, mcfg: ModelConfig) -> nn.Module:
        return RewardModel(mcfg)

    def adapt_init_state(self, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
        state = {k: v for k, v in state.items() if k != "value_head.weight"}  # a PPO policy's value head
        if SCORE_KEY not in state:
            state[SCORE_KEY] = score_init(state["embed_tokens.weight"].shape[1], self.cfg.train.seed)
        return state, True

    # --------------------------------------------------------------------------------------- labels

    def _labels(self, split: str, path: str) -> list[dict[str, Any]]:
        """The labelled solutions of one task file, computed by rank 0 once and cached."""
        from training.distributed import broadcast_object

        info, s = self.run.info, self.s
        policy_path = s.policy or self.cfg.train.init_from
        assert policy_path is not None
        out: Path | None = None
        if info.is_main:
            settings = {k: getattr(s, k) for k in ("dataset", "instruction", "prompt_format", "plain_template",
                                                    "solutions", "rollouts", "max_new_tokens", "temperature",
                                                    "top_p", "stop", "separator")}
            digest = hashlib.blake2b(digest_size=8)
            digest.update(json.dumps({**settings, "seed": self.cfg.train.seed, "seq_len": self.cfg.data.seq_len},
                                     sort_keys=True).encode())
            digest.update(Path(path).read_bytes())
            policy = load_policy(policy_path, self.run.device)
            from training.reference import model_fingerprint

            digest.update(model_fingerprint(policy).encode())
            out = Path(self.cfg.train.out_dir) / "prm_labels" / f"{split}-{digest.hexdigest()}.jsonl"
            if not out.is_file():
                rows = self._label(policy, path, split)
                write_labels(rows, out)
                log.info("prm: labelled %d %s solutions -> %s", len(rows), split, out)
            del policy
        out = broadcast_object(out, info)
        assert out is not None
        return read_labels(out)

    def _label(self, policy: nn.Module, path: str, split: str) -> list[dict[str, Any]]:
        s = self.s
        tasks = load_tasks(s.dataset, path, s.instruction)
        limit = min(self.cfg.data.seq_len, policy.cfg.max_seq_len) - 2 * s.max_new_tokens  # type: ignore[union-attr]
        kept = [(t, ids) for t in tasks if len(ids := self.renderer.render(t)) <= limit]
        if not kept:
            raise ConfigError(f"no task of {path} fits data.seq_len={self.cfg.data.seq_len} with two "
                              f"prm.max_new_tokens={s.max_new_tokens} budgets (solution, then its completion)")
        rewards = RewardFunctions(["task"])
        verify = lambda ts, texts: rewards.score(ts, texts)[0].tolist()  # noqa: E731
        engine = LocalRollout(policy, self.renderer.tokenizer, s.rollout_batch)  # type: ignore[arg-type]
        params = SamplingParams(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                                stop=tuple(s.stop or ()), stop_token_ids=self.renderer.stop_token_ids,
                                seed=self.cfg.train.seed * 7919 + (split == "eval"))
        try:
            return label_solutions(engine, [t for t, _ in kept], [ids for _, ids in kept], verify,
                                   solutions=s.solutions, rollouts=s.rollouts, params=params, separator=s.separator)
        finally:
            rewards.close()

    # ---------------------------------------------------------------------------------------- data

    def setup(self, model: nn.Module) -> None:
        cfg = self.cfg
        self.rows = [r for r in self._labels("train", cfg.data.mix) if r["step_ends"]]
        if not self.rows:
            raise ConfigError(f"no labelled solution with a step from {cfg.data.mix}")
        self.order = ExampleOrder(len(self.rows), cfg.train.seed)
        self.eval_rows = [r for r in self._labels("eval", cfg.data.eval) if r["step_ends"]] if cfg.data.eval else []
        if self.run.info.is_main:
            labels = np.concatenate([np.asarray(r[self.s.label], dtype=np.float64) for r in self.rows])
            log.info("prm: %d solutions, %d steps, %.1f%% positive (%s labels)", len(self.rows), len(labels),
                     100 * float((labels > 0.5).mean()), self.s.label)

    def collate(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """input_ids [B, T], step positions (input index of each step's last token) and labels, padded
        with position 0 / label -1 where a row has fewer steps."""
        pad = self.renderer.pad_id if self.renderer.pad_id is not None else 0
        seqs = [r["prompt_ids"] + r["completion_ids"] for r in rows]
        width = max(map(len, seqs))
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        steps = max(len(r["step_ends"]) for r in rows)
        pos = torch.zeros((len(rows), steps), dtype=torch.long)
        labels = torch.full((len(rows), steps), -1.0)
        for i, (r, seq) in enumerate(zip(rows, seqs, strict=True)):
            ids[i, :len(seq)] = torch.tensor(seq)
            n = len(r["step_ends"])
            pos[i, :n] = torch.tensor(r["step_ends"]) + len(r["prompt_ids"])
            labels[i, :n] = torch.tensor(r[self.s.label], dtype=torch.float32)
        return {"input_ids": ids, "step_pos": pos, "labels": labels,
                "lengths": torch.tensor([len(s) for s in seqs])}

    def next_batch(self) -> Batch:
        info = self.run.info
        picked = self.order.take(self.cfg.train.batch_size)[info.rank::info.world_size]
        t = self.collate([self.rows[i] for i in picked])
        return Batch(t, weight=int((t["labels"] >= 0).sum()), tokens=int(t["lengths"].sum()))

    def state_dict(self) -> dict[str, Any]:
        return self.order.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order.load_state_dict(state)

    # ---------------------------------------------------------------------------------------- loss

    def _step_logits(self, model: nn.Module, t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        values = model(t["input_ids"])
        return values.gather(1, t["step_pos"]), t["labels"] >= 0

    def loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        t = batch.tensors
        logits, valid = self._step_logits(model, t)
        labels = t["labels"].clamp(min=0)
        bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        agree = ((logits.detach() > 0) == (labels > 0.5)) & valid
        return LossOutput((bce * valid).sum(), {"step_accuracy": agree.float().sum(),
                                                 "positive": ((labels > 0.5) & valid).float().sum()})

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if not self.eval_rows:
            return {}
        was_training = model.training
        model.eval()
        size = self.cfg.train.eval_batch_size or self.cfg.train.batch_size
        bce = agree = steps = 0.0
        min_scores: list[float] = []
        for lo in range(0, len(self.eval_rows), size):
            t = {k: v.to(self.run.device) for k, v in self.collate(self.eval_rows[lo:lo + size]).items()}
            with self.run.autocast():
                logits, valid = self._step_logits(model, t)
            labels = t["labels"].clamp(min=0)
            bce += float((F.binary_cross_entropy_with_logits(logits.float(), labels, reduction="none") * valid).sum())
            agree += float((((logits > 0) == (labels > 0.5)) & valid).sum())
            steps += float(valid.sum())
            min_scores += torch.where(valid, logits.float(), torch.inf).min(dim=1).values.tolist()
        model.train(was_training)
        by_task: dict[str, list[tuple[float, float]]] = {}
        for row, score in zip(self.eval_rows, min_scores, strict=True):
            by_task.setdefault(row["task"], []).append((score, row["correct"]))
        best = [max(c, key=lambda sc: sc[0])[1] for c in by_task.values()]
        return {"eval_loss": bce / max(steps, 1.0), "eval_step_accuracy": agree / max(steps, 1.0),
                "eval_best_of_n": float(np.mean(best)),
                "eval_solution_accuracy": float(np.mean([r["correct"] for r in self.eval_rows])),
                "eval_oracle": float(np.mean([max(c for _, c in v) for v in by_task.values()]))}

    def export(self, state: dict[str, torch.Tensor], mcfg: ModelConfig, out_dir: Path) -> str | None:
        from training.reward_model import export_reward_model

        info = self.data_info()
        if info.special_ids.get("pad_id") is None:
            return None
        return str(export_reward_model((state, mcfg), out_dir / "hf", pad_id=info.special_ids["pad_id"],
                                       tokenizer_path=info.tokenizer, bos_id=info.special_ids.get("bos_id"),
                                       eos_id=info.special_ids.get("eos_id")))


# ------------------------------------------------------------------------------------------- use


def load_prm(path: str, device: torch.device | str, vocab_size: int) -> RewardModel:
    """A frozen PRM from a `refinery train prm` checkpoint."""
    from training.objectives.ppo import load_reward_model

    return load_reward_model(path, torch.device(device), vocab_size)  # type: ignore[return-value]


@torch.no_grad()
def step_scores(prm: nn.Module, rollouts: Sequence[Rollout], tokenizer: Any, device: torch.device | str,
                separator: str = "\n", pad_id: int = 0) -> list[tuple[list[int], list[float]]]:
    """Per completion: (step end indices into its tokens, σ(PRM value) at each step end)."""
    out: list[tuple[list[int], list[float]]] = []
    for r in rollouts:
        ends = step_ends(r.token_ids, tokenizer, separator)
        if not ends:
            out.append(([], []))
            continue
        ids = torch.tensor([list(r.prompt_ids) + list(r.token_ids)], device=device)
        values = prm(ids)[0]
        pos = torch.tensor(ends, device=device) + len(r.prompt_ids)
        out.append((ends, torch.sigmoid(values[pos].float()).tolist()))
    return out


def process_advantages(prm: nn.Module, t: dict[str, torch.Tensor], rollouts: Sequence[Rollout], group_size: int,
                       tokenizer: Any, device: torch.device | str) -> tuple[torch.Tensor, float]:
    """GRPO process supervision (DeepSeekMath §4.1.3): step rewards normalized by the mean and std of all
    step rewards of the group; each completion token's advantage is the sum of the normalized rewards
    of the steps ending at or after it. Returns [R, T-1] aligned with `token_logps`, and the mean score."""
    scored = step_scores(prm, rollouts, tokenizer, device)
    dense = torch.zeros(t["completion_mask"].shape[0], t["completion_mask"].shape[1] - 1)
    for g in range(0, len(rollouts), group_size):
        flat = [s for _, scores in scored[g:g + group_size] for s in scores]
        if len(flat) < 2:
            continue
        mean, std = float(np.mean(flat)), float(np.std(flat))
        for i in range(g, g + group_size):
            ends, scores = scored[i]
            start = len(rollouts[i].prompt_ids) - 1  # logp index of the first completion token
            for end, score in zip(ends, scores, strict=True):
                dense[i, start:start + end + 1] += (score - mean) / (std + 1e-4)
    all_scores = [s for _, scores in scored for s in scores]
    return dense, float(np.mean(all_scores)) if all_scores else 0.0


def rerank(prm: nn.Module, rollouts: Sequence[Rollout], n: int, tokenizer: Any, device: torch.device | str
           ) -> list[int]:
    """Best-of-N: for each prompt's n consecutive completions, the index (into `rollouts`) of the one
    whose lowest step score is highest (Math-Shepherd's verification by the minimum)."""
    scored = step_scores(prm, rollouts, tokenizer, device)
    picks = []
    for g in range(0, len(rollouts), n):
        keys = [min(s) if s else float("-inf") for _, s in scored[g:g + n]]
        picks.append(g + int(np.argmax(keys)))
    return picks
