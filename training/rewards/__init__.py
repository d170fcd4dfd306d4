"""Rewards for RL: one `Verifier` interface (completion + ground truth -> score in [0, 1] + reason),
one module per task family, the sandbox that runs model-written code, and dataset readers that turn
rows into `VerifiableTask`s (prompt messages + ground truth).

    family   module                       ground truth                    reader
    gsm8k    training.rewards.gsm8k       the number after ####           read_tasks(GSM8K jsonl)
    math     training.rewards.math        LaTeX answer (math-verify)      read_tasks(MATH / MATH-500)
    code     training.rewards.code        HumanEval test / assert list    read_tasks(HumanEval jsonl.gz)
    format   training.rewards.format      (none)                          -
    judge    training.rewards.judge       question [+ reference, rubric]  -

Modules load on first use (`make_verifier("math")`), so importing this package costs nothing.
"""

from __future__ import annotations

import importlib
from typing import Any

from training.rewards.base import RewardResult, VerifiableTask, Verifier

VERIFIERS = {
    "gsm8k": "training.rewards.gsm8k:GSM8KVerifier",
    "math": "training.rewards.math:MathVerifier",
    "code": "training.rewards.code:CodeVerifier",
    "format": "training.rewards.format:FormatVerifier",
    "judge": "training.rewards.judge:LLMJudge",
}
READERS = {
    "gsm8k": "training.rewards.gsm8k:read_tasks",
    "math": "training.rewards.math:read_tasks",
    "humaneval": "training.rewards.code:read_tasks",
}


def _load(table: dict[str, str], name: str, what: str) -> Any:
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; choose one of {', '.join(sorted(table))}")
    module, attr = table[name].split(":")
    return getattr(importlib.import_module(module), attr)


def make_verifier(name: str, **kwargs: Any) -> Verifier:
    """A verifier by family name, e.g. `make_verifier("gsm8k", strict=True)`."""
    return _load(VERIFIERS, name, "verifier")(**kwargs)


def read_tasks(dataset: str, path: str, **kwargs: Any) -> list[VerifiableTask]:
    """Rows of a GSM8K / MATH / HumanEval file as tasks, e.g. `read_tasks("gsm8k", "test.jsonl")`."""
    return _load(READERS, dataset, "dataset")(path, **kwargs)


__all__ = ["RewardResult", "VerifiableTask", "Verifier", "VERIFIERS", "READERS", "make_verifier", "read_tasks"]
