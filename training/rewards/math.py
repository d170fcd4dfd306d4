"""MATH: the boxed answer against the gold answer, equal when `math-verify` says so.

Hugging Face's `math-verify` (as TRL's accuracy reward and open-instruct's `MathVerifier` use it)
parses LaTeX and plain expressions to SymPy and compares them numerically and symbolically, so
`\\frac12`, `0.5` and `\\dfrac{1}{2}` are one answer, and sets, intervals, matrices and equations
compare as such. Gold answers are parsed as `\\boxed{gold}`: on MATH-500 every `answer` then
verifies against the last box of its own `solution` (tested).

math-verify bounds its work with `signal.alarm`, which works on the main thread only: elsewhere
(a thread pool of reward workers) it runs without a timeout, as its documentation advises.
"""

from __future__ import annotations

import threading
from functools import lru_cache
from pathlib import Path
from typing import Any

from training.rewards.base import RewardResult, VerifiableTask, Verifier, read_jsonl, require
from training.rewards.format import extract_tag

DEFAULT_INSTRUCTION = "Solve the problem step by step. Put the final answer within \\boxed{}."


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{…}` (or `\\fbox{…}`), nested braces included."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        return None
    depth = 0
    for i in range(brace, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[brace + 1: i]
    return None


def _timeout(seconds: int) -> int | None:
    return seconds if threading.current_thread() is threading.main_thread() else None


@lru_cache(maxsize=4096)
def _parse_gold(gold: str, timeout: int | None) -> list:
    from math_verify import parse

    return parse(f"\\boxed{{{gold}}}", parsing_timeout=timeout)


class MathVerifier(Verifier):
    """1 when the completion's final answer equals the gold answer under math-verify, else 0.

    The answer is read from `<answer>…</answer>` when the completion has one, else from the whole
    text (math-verify takes the last `\\boxed{}`, then other final-answer forms).
    ground_truth: the gold answer in LaTeX, without `\\boxed` (MATH-500's `answer`).
    """

    name = "math"

    def __init__(self, timeout_s: int = 5) -> None:
        self.timeout_s = timeout_s

    def __call__(self, completion: str, ground_truth: Any) -> RewardResult:
        from math_verify import parse, verify

        timeout = _timeout(self.timeout_s)
        gold_text = str(ground_truth).strip()
        gold = _parse_gold(gold_text, timeout)
        if not gold:
            raise ValueError(f"math-verify cannot parse the gold answer {gold_text!r}")
        tagged = extract_tag(completion, "answer")
        pred = parse(tagged if tagged is not None else completion, parsing_timeout=timeout)
        if not pred:
            return RewardResult(0.0, "no answer found")
        if verify(gold, pred, timeout_seconds=timeout):
            return RewardResult(1.0, f"equivalent to {gold_text}")
        shown = pred[-1] if isinstance(pred[-1], str) else str(pred[0])
        return RewardResult(0.0, f"wrong: {shown[:80]} != {gold_text[:80]}")


def read_tasks(path: str | Path, instruction: str = DEFAULT_INSTRUCTION) -> list[VerifiableTask]:
    """MATH jsonl rows -> tasks. The gold answer is `answer` when the row has one (MATH-500), else the
    last `\\boxed{}` of `solution` (the MATH test set)."""
    path = Path(path)
    tasks = []
    for lineno, row in read_jsonl(path):
        where = f"{path}:{lineno}"
        require(row, ("problem",), where)
        gold = row.get("answer")
        if gold is None:
            require(row, ("solution",), where)
            gold = last_boxed(row["solution"])
            if gold is None:
                raise ValueError(f"{where}: no answer field and no \\boxed{{}} in the solution")
        content = f"{row['problem'].strip()}\n\n{instruction}" if instruction else row["problem"].strip()
        meta = {k: row[k] for k in ("level", "subject", "type", "unique_id") if k in row}
        tasks.append(VerifiableTask(id=f"math/{path.stem}/{lineno}", messages=[{"role": "user", "content": content}],
                                    ground_truth=str(gold), verifier="math", meta=meta))
    return tasks
