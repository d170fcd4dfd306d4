"""GSM8K: the final number of the answer against the gold number after `####`.

Extraction as verl's `reward_score/gsm8k.py` (strict: `#### N` only; flexible: the last number)
and open-instruct's `GSM8KVerifier` (last number, commas dropped), with two more places a trained
policy puts its answer: `<answer>…</answer>` and `\\boxed{…}`. Numbers compare exactly as
fractions, so `18`, `18.00` and `$18` are one answer and `1,000` is a thousand.
"""

from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path
from typing import Any

from training.rewards.base import RewardResult, VerifiableTask, Verifier, read_jsonl, require
from training.rewards.format import extract_tag

DEFAULT_INSTRUCTION = "Solve the problem step by step. Write the final answer as a number on its own line: #### <number>"
_NUMBER = re.compile(r"-?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")
_HASHES = re.compile(r"####\s*(\S[^\n]*)")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def parse_number(text: str) -> Fraction | None:
    """The last number in `text` as an exact fraction; `$`, thousands commas and a trailing period
    are ignored. None when `text` holds no number."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    raw = found[-1].replace("$", "").replace(",", "").replace(" ", "")
    try:
        return Fraction(raw)
    except (ValueError, ZeroDivisionError):
        return None


def gold_answer(answer: str) -> str:
    """The text after `####` of a GSM8K `answer` field."""
    match = _HASHES.search(answer)
    if match is None:
        raise ValueError(f"GSM8K answer has no '#### <number>' line: {answer[-80:]!r}")
    return match.group(1).strip()


def extract_answer(completion: str, strict: bool = False) -> str | None:
    """Where the completion states its answer: the last `#### …`, else (not strict) the last
    `<answer>…</answer>`, the last `\\boxed{…}`, or the whole text (its last number counts)."""
    hashes = _HASHES.findall(completion)
    if hashes:
        return hashes[-1]
    if strict:
        return None
    tagged = extract_tag(completion, "answer")
    if tagged is not None:
        return tagged
    boxed = _BOXED.findall(completion)
    return boxed[-1] if boxed else completion


class GSM8KVerifier(Verifier):
    """1 when the stated final number equals the gold number exactly, else 0.

    ground_truth: the gold number as text (`"18"`) or a whole GSM8K answer with its `#### 18` line.
    """

    name = "gsm8k"

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict

    def __call__(self, completion: str, ground_truth: Any) -> RewardResult:
        gold_text = str(ground_truth)
        if "####" in gold_text:
            gold_text = gold_answer(gold_text)
        gold = parse_number(gold_text)
        if gold is None:
            raise ValueError(f"GSM8K ground truth holds no number: {ground_truth!r}")
        stated = extract_answer(completion, self.strict)
        if stated is None:
            return RewardResult(0.0, "no '#### <number>' line")
        pred = parse_number(stated)
        if pred is None:
            return RewardResult(0.0, "no number in the answer")
        if pred == gold:
            return RewardResult(1.0, f"correct: {gold_text}")
        return RewardResult(0.0, f"wrong: {_show(pred)} != {gold_text}")


def _show(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else f"{float(x):g}"


def read_tasks(path: str | Path, instruction: str = DEFAULT_INSTRUCTION) -> list[VerifiableTask]:
    """GSM8K jsonl rows (`question`, `answer` with `#### N`) -> tasks whose ground truth is N."""
    path = Path(path)
    tasks = []
    for lineno, row in read_jsonl(path):
        where = f"{path}:{lineno}"
        require(row, ("question", "answer"), where)
        try:
            gold = gold_answer(row["answer"])
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e
        content = f"{row['question'].strip()}\n\n{instruction}" if instruction else row["question"].strip()
        tasks.append(VerifiableTask(id=f"gsm8k/{path.stem}/{lineno}", messages=[{"role": "user", "content": content}],
                                    ground_truth=gold, verifier="gsm8k"))
    return tasks
