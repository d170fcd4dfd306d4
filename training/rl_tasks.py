"""What RL stages read and score: task files as prompts, the prompt rendering, and the reward functions.

Tasks come from `training.rewards.read_tasks` (GSM8K, MATH, HumanEval rows: prompt messages + ground
truth + verifier family) or, with `dataset: prompts`, from any chat file `refinery chat tokenize`
reads (the prompt is every turn before the last assistant turn; there is no ground truth, so the
reward is a reward model's, as in RLHF).

Prompts are rendered with the chat template of the policy's tokenizer (`training.chat`, generation
stops at <|end|>), or, for a base model that never saw the template (a -Zero run), as plain text
through `plain_template` (DeepSeek-R1-Zero's "A conversation between User and Assistant ..." is
such a template), stopping at the tokenizer's EOS or a stop string.

Rewards: a weighted sum of named reward functions, each a `training.rewards` verifier scoring the
completion's text against the task's ground truth; "task" is the verifier the task names (gsm8k for a
GSM8K row), the others are family names (`format`, `gsm8k`, `math`, `code`).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from training.config import ConfigError
from training.rewards import VerifiableTask, make_verifier
from training.rewards import read_tasks as read_verifiable

log = logging.getLogger(__name__)

DATASETS = ("gsm8k", "math", "humaneval", "prompts")
REWARD_NAMES = ("task", "format", "gsm8k", "math", "code")


def load_tasks(dataset: str, path: str | Path, instruction: str | None = None) -> list[VerifiableTask]:
    """The tasks of one file. `instruction` None keeps the reader's default; "" adds none."""
    if dataset not in DATASETS:
        raise ConfigError(f"unknown RL dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if not Path(path).is_file():
        raise ConfigError(f"task file not found: {path}")
    if dataset == "prompts":
        return _prompt_tasks(Path(path))
    kwargs = {} if instruction is None else {"instruction": instruction}
    tasks = read_verifiable(dataset, str(path), **kwargs)
    if not tasks:
        raise ConfigError(f"{path} holds no {dataset} rows")
    return tasks


def _prompt_tasks(path: Path) -> list[VerifiableTask]:
    from training.chat_formats import Conversation, PreferencePair, holds_pairs, read_examples

    tasks, dropped = [], Counter()
    for i, ex in enumerate(read_examples(path, "auto", pairs=holds_pairs(path))):
        if isinstance(ex, PreferencePair):
            messages = list(ex.prompt)
        elif isinstance(ex, Conversation):
            last = max((k for k, m in enumerate(ex.messages) if m["role"] == "assistant"), default=len(ex.messages))
            messages = list(ex.messages[:last])
        else:
            dropped[ex.reason] += 1
            continue
        if not messages or messages[-1]["role"] == "assistant":
            dropped["no_prompt"] += 1
            continue
        tasks.append(VerifiableTask(id=f"prompts/{path.stem}/{i}", messages=messages, ground_truth=None,
                                    verifier="none"))
    if dropped:
        log.warning("%s: skipped %d rows without a usable prompt (%s)", path, sum(dropped.values()), dict(dropped))
    if not tasks:
        raise ConfigError(f"{path} holds no prompts")
    return tasks


def find_tokenizer(explicit: str | None, init_from: str | None) -> Path:
    """`explicit` (a tokenizer.json or a directory holding one), else the tokenizer exported beside
    `init_from`'s run (`<run>/hf/tokenizer.json`, what every finished stage writes)."""
    candidates: list[Path] = []
    if explicit:
        p = Path(explicit)
        candidates = [p, p / "tokenizer.json"]
    elif init_from:
        p = Path(init_from)
        for d in (p, *list(p.parents)[:3]):
            candidates += [d / "hf" / "tokenizer.json", d / "tokenizer.json"]
    for c in candidates:
        if c.is_file():
            return c
    where = explicit or init_from or "(none)"
    raise ConfigError(f"no tokenizer.json found for {where}; set the stage's `tokenizer` key to the policy's "
                      f"tokenizer.json (e.g. the SFT run's hf/tokenizer.json)")


class PromptRenderer:
    """Tasks -> prompt token ids, and the ids that end a completion."""

    def __init__(self, tokenizer_path: str | Path, fmt: str = "chat", plain_template: str = "{prompt}",
                 stop_strings: Sequence[str] = ()) -> None:
        from tokenizers import Tokenizer

        from training.chat import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, ChatTemplate

        if fmt not in ("chat", "plain"):
            raise ConfigError(f"prompt_format must be chat or plain, got {fmt!r}")
        if fmt == "plain" and "{prompt}" not in plain_template:
            raise ConfigError(f"plain_template must contain {{prompt}}, got {plain_template!r}")
        self.fmt, self.plain_template, self.stop_strings = fmt, plain_template, tuple(stop_strings)
        self.path = Path(tokenizer_path)
        if fmt == "chat":
            self.template: Any = ChatTemplate.load(self.path)
            self.tokenizer = self.template.tokenizer
        else:
            self.template = None
            self.tokenizer = Tokenizer.from_file(str(self.path))
        tok = self.tokenizer
        self.vocab_size = max(tok.get_vocab(with_added_tokens=True).values()) + 1
        self.bos_id: int | None = tok.token_to_id(BOS_TOKEN)
        self.eos_id: int | None = tok.token_to_id(EOS_TOKEN)
        self.pad_id: int | None = tok.token_to_id(PAD_TOKEN)

    def render(self, task: VerifiableTask) -> list[int]:
        if self.template is not None:
            return self.template.render_prompt(task.messages)
        text = "\n\n".join(m["content"] for m in task.messages)
        ids = self.tokenizer.encode(self.plain_template.format(prompt=text), add_special_tokens=False).ids
        return ([self.bos_id] if self.bos_id is not None else []) + ids

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        ids = list(self.template.stop_ids) if self.template is not None else []
        if self.eos_id is not None:
            ids.append(self.eos_id)
        return tuple(dict.fromkeys(ids))

    @property
    def export_eos_id(self) -> int | None:
        """The EOS an exported model stops at: <|end|> under the chat template."""
        return self.template.end_id if self.template is not None else self.eos_id


class RewardFunctions:
    """A weighted sum of named verifier rewards; see the module docstring."""

    def __init__(self, names: Sequence[str], weights: Sequence[float] | None = None) -> None:
        names = list(names)
        if not names:
            raise ConfigError("at least one reward function is needed (e.g. [task])")
        unknown = [n for n in names if n not in REWARD_NAMES]
        if unknown:
            raise ConfigError(f"unknown reward function(s) {unknown}; choose from {', '.join(REWARD_NAMES)}")
        weights = list(weights) if weights else [1.0] * len(names)
        if len(weights) != len(names):
            raise ConfigError(f"{len(names)} reward functions but {len(weights)} reward_weights")
        self.names, self.weights = names, [float(w) for w in weights]
        self._verifiers: dict[str, Any] = {}

    def _verifier(self, family: str) -> Any:
        if family not in self._verifiers:
            self._verifiers[family] = make_verifier(family)
        return self._verifiers[family]

    def score(self, tasks: Sequence[VerifiableTask], texts: Sequence[str]
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor], Counter]:
        """(total [N], per-function scores {name: [N]}, reason counts) for completions of `tasks`."""
        per: dict[str, torch.Tensor] = {}
        reasons: Counter = Counter()
        for name in self.names:
            scores = torch.zeros(len(texts), dtype=torch.float32)
            groups: dict[str, list[int]] = {}
            for i, task in enumerate(tasks):
                family = task.verifier if name == "task" else name
                if family == "none":
                    raise ConfigError(f"task {task.id} has no ground truth to verify; use a reward model "
                                      f"(ppo.reward_model) for prompt-only data")
                groups.setdefault(family, []).append(i)
            for family, rows in groups.items():
                results = self._verifier(family).score_batch([texts[i] for i in rows],
                                                             [tasks[i].ground_truth for i in rows])
                for i, r in zip(rows, results, strict=True):
                    scores[i] = r.score
                    reasons[f"{name}: {r.reason.split(':')[0]}"] += 1
            per[name] = scores
        total = sum(w * per[n] for n, w in zip(self.names, self.weights, strict=True))
        assert isinstance(total, torch.Tensor)
        return total, per, reasons

    def close(self) -> None:
        for v in self._verifiers.values():
            if hasattr(v, "close"):
                v.close()
