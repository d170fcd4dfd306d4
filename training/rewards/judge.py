"""LLM judge: a model grades a response against a rubric, for tasks no rule can check.

The judge model is either a local Hugging Face causal LM directory (transformers, greedy decoding)
or any OpenAI-compatible chat-completions endpoint (vLLM, llama.cpp, TGI, OpenAI): open-instruct's
`LMJudgeVerifier` and MT-Bench's single-answer grading in one class. The reply is asked to end with
`Score: N` (0..max_score); `parse_score` also accepts the forms judges actually write (`[[8]]`,
`8/10`, `{"score": 8}`, `Rating: 8`, a bare number). A reply that holds no score in range is
counted in `stats["unparseable"]` and scored `unparseable_score` (0 by default, so a broken judge
cannot raise the reward); an endpoint that fails after retries is counted in `stats["errors"]`.
"""

from __future__ import annotations

import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from training.rewards.base import RewardResult, Verifier

DEFAULT_RUBRIC = (
    "Judge the response on helpfulness (does it answer what was asked), correctness (no false "
    "statements), clarity, and harmlessness. A response that refuses a harmless request, or that is "
    "off-topic, scores low; a complete, accurate, well-written answer scores high."
)
PROMPT_TEMPLATE = (
    "You are a strict, impartial grader.\n\nRubric:\n{rubric}\n\n[Question]\n{question}\n\n"
    "{reference}[Response]\n{response}\n\n"
    "Grade the response from 0 to {max_score}. Reply with a one-sentence justification, then a last "
    "line of the form 'Score: N'."
)

# Most specific first; within a form the last occurrence wins (a judge states its verdict last).
_SCORE_FORMS = [
    re.compile(r"\"score\"\s*:\s*\"?(-?\d+(?:\.\d+)?)"),
    re.compile(r"\[\[\s*(-?\d+(?:\.\d+)?)\s*\]\]"),
    re.compile(r"(?:score|rating|grade)\s*(?:is|of)?\s*[:=]?\s*\**\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE),
    re.compile(r"(-?\d+(?:\.\d+)?)\s*(?:/|out of)\s*(\d+)", re.IGNORECASE),
]
_BARE = re.compile(r"\s*\**\s*(-?\d+(?:\.\d+)?)\s*\**\s*\.?\s*")


def parse_score(reply: str, max_score: float = 10) -> float | None:
    """The judge's score scaled to [0, 1], or None when the reply states none within 0..max_score."""
    for form in _SCORE_FORMS:
        found = form.findall(reply)
        if not found:
            continue
        last = found[-1]
        if isinstance(last, tuple):  # "N/D" or "N out of D": scale by the judge's own denominator
            value, denom = float(last[0]), float(last[1])
            return value / denom if denom > 0 and 0 <= value <= denom else None
        value = float(last)
        return value / max_score if 0 <= value <= max_score else None
    bare = _BARE.fullmatch(reply)
    if bare:
        value = float(bare.group(1))
        return value / max_score if 0 <= value <= max_score else None
    return None


class JudgeBackend(ABC):
    """Turns chat messages into the judge's reply text."""

    @abstractmethod
    def complete(self, conversations: Sequence[list[dict[str, str]]]) -> list[str | None]:
        """One reply per conversation; None where the backend failed (counted as an error)."""


class HTTPJudge(JudgeBackend):
    """An OpenAI-compatible `/chat/completions` endpoint; `base_url` like `http://host:8000/v1`.
    Requests go out `concurrency` at a time; a failed one is retried `retries` times. The protocol is
    `training.llm_client.OpenAIChatClient`'s; this only fixes the judge's sampling."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, max_tokens: int = 256,
                 temperature: float = 0.0, timeout_s: float = 60.0, retries: int = 2, concurrency: int = 8) -> None:
        from training.llm_client import OpenAIChatClient
        from training.sampling import SamplingParams

        self.client = OpenAIChatClient(base_url, model=model, api_key=api_key, concurrency=concurrency,
                                       retries=retries, timeout_s=timeout_s)
        self.params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature)

    def complete(self, conversations: Sequence[list[dict[str, str]]]) -> list[str | None]:
        return [reply.text for reply in self.client.complete(conversations, self.params)]


class HFJudge(JudgeBackend):
    """A local Hugging Face causal LM directory; greedy, batched with left padding. Prompts use the
    tokenizer's chat template when it has one, else the messages' texts joined."""

    def __init__(self, model_dir: str | Path, max_new_tokens: int = 64, batch_size: int = 8,
                 device: str = "cpu") -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"judge model directory {path} has no config.json")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.convert_ids_to_tokens(0)
        self.model = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
        self.max_new_tokens, self.batch_size, self.device = max_new_tokens, batch_size, device

    def _render(self, messages: list[dict[str, str]]) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "\n\n".join(m["content"] for m in messages) + "\n\n"

    def complete(self, conversations: Sequence[list[dict[str, str]]]) -> list[str | None]:
        import torch

        replies: list[str | None] = []
        for i in range(0, len(conversations), self.batch_size):
            texts = [self._render(m) for m in conversations[i: i + self.batch_size]]
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
            with torch.no_grad():
                out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                                          pad_token_id=self.tokenizer.pad_token_id)
            new = out[:, enc["input_ids"].shape[1]:]
            replies.extend(self.tokenizer.batch_decode(new, skip_special_tokens=True))
        return replies


class LLMJudge(Verifier):
    """Scores a response with a judge model and a rubric.

    ground_truth: the question (a string) or a mapping with `question` and optionally `reference`
    (a reference answer shown to the judge) and `rubric` (overrides the judge's rubric for this row).
    """

    name = "judge"

    def __init__(self, backend: JudgeBackend, rubric: str = DEFAULT_RUBRIC, max_score: int = 10,
                 unparseable_score: float = 0.0) -> None:
        if max_score <= 0:
            raise ValueError(f"judge max_score must be > 0, got {max_score}")
        if not 0.0 <= unparseable_score <= 1.0:
            raise ValueError(f"unparseable_score must be in [0, 1], got {unparseable_score}")
        self.backend, self.rubric, self.max_score = backend, rubric, max_score
        self.unparseable_score = unparseable_score
        self.stats = {"judged": 0, "unparseable": 0, "errors": 0}
        self._lock = threading.Lock()

    def messages(self, response: str, ground_truth: Any) -> list[dict[str, str]]:
        if isinstance(ground_truth, Mapping):
            if "question" not in ground_truth:
                raise ValueError(f"judge ground truth needs a 'question', got keys {sorted(ground_truth)}")
            question, reference = str(ground_truth["question"]), ground_truth.get("reference")
            rubric = str(ground_truth.get("rubric") or self.rubric)
        else:
            question, reference, rubric = str(ground_truth), None, self.rubric
        ref = f"[Reference answer]\n{reference}\n\n" if reference else ""
        text = PROMPT_TEMPLATE.format(rubric=rubric, question=question, reference=ref, response=response,
                                      max_score=self.max_score)
        return [{"role": "user", "content": text}]

    def __call__(self, completion: str, ground_truth: Any) -> RewardResult:
        return self.score_batch([completion], [ground_truth])[0]

    def score_batch(self, completions: Sequence[str], ground_truths: Sequence[Any]) -> list[RewardResult]:
        if len(completions) != len(ground_truths):
            raise ValueError(f"{len(completions)} completions but {len(ground_truths)} ground truths")
        conversations = [self.messages(c, g) for c, g in zip(completions, ground_truths, strict=True)]
        replies = self.backend.complete(conversations)
        results, counts = [], {"judged": len(replies), "unparseable": 0, "errors": 0}
        for reply in replies:
            if reply is None:
                counts["errors"] += 1
                results.append(RewardResult(self.unparseable_score, "judge failed to reply"))
                continue
            score = parse_score(reply, self.max_score)
            if score is None:
                counts["unparseable"] += 1
                results.append(RewardResult(self.unparseable_score, f"judge reply unparseable: {reply[-80:]!r}"))
            else:
                results.append(RewardResult(score, f"judge: {score * self.max_score:g}/{self.max_score}"))
        with self._lock:
            for k, v in counts.items():
                self.stats[k] += v
        return results
