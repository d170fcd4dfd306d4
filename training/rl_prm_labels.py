"""Automatic step labels for a process reward model, as Math-Shepherd (Wang et al. 2024, arXiv:2312.08935 §3.3).

A policy writes `solutions` solutions per problem; a solution's steps are its lines (a step ends at
the token that holds a newline, the last step at the last token). From the prefix that ends with step
k, the policy completes the solution `rollouts` times and the verifier checks each completion's final
answer. Step k's label is

    soft:  y_k = (1/N) Σ_j 1[completion j reaches the gold answer]        (Math-Shepherd eq. 1, "SE")
    hard:  y_k = 1[any completion reaches it]                              (eq. 2, "HE")

i.e. whether the step still leads to the right answer. The last step's label is the verdict on the
solution itself. Everything is sampled with the rollout engine's counter-based seeds, so labelling is
reproducible.

Output: one JSON line per solution (`prompt_ids`, `completion_ids`, `step_ends` indexing
`completion_ids`, `soft`, `hard`, `correct`, `task`), read by the `prm` stage
(training/objectives/prm.py), which caches the file under its run directory keyed by everything the
labels depend on.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from training.rewards import VerifiableTask
from training.rollout import LocalRollout, SamplingParams

log = logging.getLogger(__name__)


def step_ends(token_ids: Sequence[int], tokenizer: Any, separator: str = "\n") -> list[int]:
    """Indices of the tokens that end a step: each token whose text holds `separator` (a run of such
    tokens ends one step), and the last token. Empty for an empty completion."""
    ends: list[int] = []
    for i, tok in enumerate(token_ids):
        if separator in tokenizer.decode([int(tok)], skip_special_tokens=False):
            if ends and ends[-1] == i - 1:
                ends[-1] = i  # blank lines belong to the step they close
            else:
                ends.append(i)
    if token_ids and (not ends or ends[-1] != len(token_ids) - 1):
        ends.append(len(token_ids) - 1)
    return ends


def load_policy(path: str, device: torch.device | str = "cpu") -> nn.Module:
    """The language model of a checkpoint, dropping a value or score head if it has one."""
    from training.checkpoint import load_model_file
    from training.model import ModelConfig, Transformer

    data = load_model_file(path)
    with torch.device(device):
        model = Transformer(ModelConfig.from_dict(data["model_config"]))
    own = set(model.state_dict())
    model.load_state_dict({k: v for k, v in data["model"].items() if k in own}, strict=True)
    return model.requires_grad_(False).eval()


def label_solutions(engine: LocalRollout, tasks: Sequence[VerifiableTask], prompts: Sequence[list[int]],
                    verify: Callable[[list[VerifiableTask], list[str]], list[float]], *, solutions: int,
                    rollouts: int, params: SamplingParams, separator: str = "\n") -> list[dict[str, Any]]:
    """Math-Shepherd labels of `solutions` sampled solutions per task (see the module docstring).
    `verify(tasks, texts)` scores full completion texts in [0, 1]; a score >= 0.5 counts as correct."""
    tokenizer = engine.tokenizer
    sols = engine.generate(prompts, SamplingParams(**{**_fields(params), "n": solutions}))
    sol_texts = [r.text or "" for r in sols]
    correct = verify([tasks[r.prompt_index] for r in sols], sol_texts)
    rows = []
    queries: list[tuple[int, int]] = []  # (solution, step) whose prefix is continued
    prefixes: list[list[int]] = []
    for s, r in enumerate(sols):
        ends = step_ends(r.token_ids, tokenizer, separator)
        rows.append({"task": tasks[r.prompt_index].id, "prompt_ids": list(r.prompt_ids),
                     "completion_ids": list(r.token_ids), "step_ends": ends, "correct": float(correct[s] >= 0.5),
                     "soft": [0.0] * len(ends), "hard": [0.0] * len(ends)})
        if ends:
            rows[-1]["soft"][-1] = rows[-1]["hard"][-1] = float(correct[s] >= 0.5)
        for k, end in enumerate(ends[:-1]):
            queries.append((s, k))
            prefixes.append(list(r.prompt_ids) + list(r.token_ids[: end + 1]))
    if prefixes:
        budget = max(1, params.max_new_tokens)
        conts = engine.generate(prefixes, SamplingParams(**{**_fields(params), "n": rollouts, "max_new_tokens": budget,
                                                            "seed": params.seed + 1}))
        texts, owners = [], []
        for c in conts:
            s, k = queries[c.prompt_index]
            head = tokenizer.decode(sols[s].token_ids[: rows[s]["step_ends"][k] + 1], skip_special_tokens=False)
            texts.append(head + (c.text or ""))
            owners.append(tasks[sols[s].prompt_index])
        scores = verify(owners, texts)
        hits: dict[tuple[int, int], list[float]] = {}
        for c, score in zip(conts, scores, strict=True):
            hits.setdefault(queries[c.prompt_index], []).append(float(score >= 0.5))
        for (s, k), got in hits.items():
            rows[s]["soft"][k] = sum(got) / len(got)
            rows[s]["hard"][k] = float(any(got))
    return rows


def _fields(params: SamplingParams) -> dict[str, Any]:
    return {k: getattr(params, k) for k in ("n", "max_new_tokens", "temperature", "top_p", "top_k", "stop",
                                            "stop_token_ids", "seed")}


def write_labels(rows: Sequence[dict[str, Any]], path: Any) -> None:
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def read_labels(path: Any) -> list[dict[str, Any]]:
    from training.rewards.base import read_jsonl

    rows = []
    for lineno, row in read_jsonl(path):
        missing = [k for k in ("prompt_ids", "completion_ids", "step_ends", "soft", "hard") if k not in row]
        if missing:
            raise ValueError(f"{path}:{lineno}: not a PRM label row (lacks {', '.join(missing)})")
        rows.append(row)
    return rows

