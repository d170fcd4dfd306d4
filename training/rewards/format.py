"""Format reward: reasoning in one tag, then the answer in another, and nothing else.

DeepSeek-R1 (2025) §2.2.2 rewards `<think>…</think><answer>…</answer>`; TRL's format reward is
the regex `^<think>.*?</think>\\s*<answer>.*?</answer>$`. Same here, with the tag names as
arguments and a reason for each way a completion misses.
"""

from __future__ import annotations

import re
from typing import Any

from training.rewards.base import RewardResult, Verifier


def extract_tag(text: str, tag: str) -> str | None:
    """The content of the last complete `<tag>…</tag>` in `text`, stripped; None when there is none."""
    found = re.findall(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", text, flags=re.DOTALL)
    return found[-1].strip() if found else None


class FormatVerifier(Verifier):
    """1 when the completion is exactly `<think>…</think>` then `<answer>…</answer>` (whitespace
    around and between allowed, each tag once, both non-empty), else 0. Ground truth is ignored."""

    name = "format"

    def __init__(self, reasoning_tag: str = "think", answer_tag: str = "answer") -> None:
        if not reasoning_tag or not answer_tag or reasoning_tag == answer_tag:
            raise ValueError(f"format tags must be two different names, got {reasoning_tag!r}, {answer_tag!r}")
        self.tags = (reasoning_tag, answer_tag)
        r, a = (re.escape(t) for t in self.tags)
        self._pattern = re.compile(rf"\s*<{r}>(.*?)</{r}>\s*<{a}>(.*?)</{a}>\s*", re.DOTALL)

    def __call__(self, completion: str, ground_truth: Any = None) -> RewardResult:
        for tag in self.tags:
            opened, closed = completion.count(f"<{tag}>"), completion.count(f"</{tag}>")
            if opened == 0 or closed == 0:
                return RewardResult(0.0, f"missing <{tag}> or </{tag}>")
            if opened > 1 or closed > 1:
                return RewardResult(0.0, f"<{tag}> appears more than once")
        match = self._pattern.fullmatch(completion)
        if match is None:
            return RewardResult(0.0, f"not <{self.tags[0]}>…</{self.tags[0]}> then <{self.tags[1]}>…"
                                     f"</{self.tags[1]}> with nothing around them")
        if not match.group(1).strip() or not match.group(2).strip():
            return RewardResult(0.0, "empty reasoning or answer")
        return RewardResult(1.0, "well formatted")
