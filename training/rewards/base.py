"""The verifier interface: a completion and its ground truth in, a score in [0, 1] and a reason out.

As open-instruct's `VerifierFunction` and verl's `reward_score/*`: one small class per task family,
no model state, so a reward worker can hold them all. `score_batch` is the unit RL calls once per
rollout batch; families with real per-call cost (code runs in the sandbox, a judge is a model) make
it parallel or batched, the others inherit the loop.
"""

from __future__ import annotations

import gzip
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Message = dict[str, str]


@dataclass(frozen=True)
class RewardResult:
    """`score` in [0, 1]; `reason` says in a few words why (kept in metrics and rollout dumps)."""

    score: float
    reason: str

    def __post_init__(self) -> None:
        if not 0.0 <= self.score <= 1.0:
            raise ValueError(f"reward score must be in [0, 1], got {self.score} ({self.reason})")


@dataclass(frozen=True)
class VerifiableTask:
    """One dataset row made ready for RL: the prompt as chat messages and what a verifier checks
    against. `verifier` names the family in `training.rewards.VERIFIERS`."""

    id: str
    messages: list[Message]
    ground_truth: Any
    verifier: str
    meta: dict[str, Any] = field(default_factory=dict)


class Verifier(ABC):
    """A reward function for one task family."""

    name: str = ""

    @abstractmethod
    def __call__(self, completion: str, ground_truth: Any) -> RewardResult:
        """Score one completion (the assistant's text, without the prompt)."""

    def score_batch(self, completions: Sequence[str], ground_truths: Sequence[Any]) -> list[RewardResult]:
        if len(completions) != len(ground_truths):
            raise ValueError(f"{len(completions)} completions but {len(ground_truths)} ground truths")
        return [self(c, g) for c, g in zip(completions, ground_truths, strict=True)]


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) of a .jsonl or .jsonl.gz file; a bad line is an error naming it."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or remove the line") from e
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def require(row: dict[str, Any], keys: Sequence[str], where: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise ValueError(f"{where}: row lacks {', '.join(missing)} (has {', '.join(sorted(row)) or 'nothing'})")
