"""Synthetic arithmetic with exact answers, in GSM8K's answer format: a task a small model learns on CPU.

A problem adds (or subtracts) `terms` small numbers; its worked solution is one line per partial result
and a final `#### N` line, as GSM8K writes answers:

    question: What is 7 + 5 + 3?
    answer:   7 + 5 = 12
              12 + 3 = 15
              #### 15

The same problems are written four ways, one per stage of the RL walkthrough (docs/rl.md):
- `tasks.jsonl`: GSM8K rows (`question`, `answer`), read by `training.rewards.read_tasks("gsm8k", ...)`
  and verified by the GSM8K verifier, for GRPO / PPO / PRM;
- `sft.jsonl`: chat rows (`messages`: user question, assistant solution) for `refinery chat tokenize`;
- `preferences.jsonl`: the right solution preferred over a sloppy one and over a wrong one, for a
  reward model (PPO);
- `pretrain/corpus.jsonl`: one document (`text`) per demonstration, `Question: ...\\nAnswer: ...`, the
  "web text" a -Zero base model is pretrained on (`refinery tokenize --corpus DIR/pretrain`): no chat
  template, no SFT.

    python -m training.rl_synthetic --out runs/arith --train 4000 --test 200

Problems are drawn from `random.Random(seed)`; train and test never share a question.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PLAIN_TEMPLATE = "Question: {question}\nAnswer:"


@dataclass(frozen=True)
class Problem:
    terms: tuple[int, ...]
    signs: tuple[str, ...]  # "+" or "-" before each term after the first

    @property
    def question(self) -> str:
        expr = str(self.terms[0]) + "".join(f" {s} {t}" for s, t in zip(self.signs, self.terms[1:], strict=True))
        return f"What is {expr}?"

    @property
    def value(self) -> int:
        total = self.terms[0]
        for s, t in zip(self.signs, self.terms[1:], strict=True):
            total = total + t if s == "+" else total - t
        return total

    @property
    def solution(self) -> str:
        """One line per partial result, then `#### N`."""
        return self.worked()

    def worked(self, sloppy: bool = False, error: int = 0) -> str:
        """The solution; `sloppy` copies the first number into the final line instead of the result
        (a systematic slip of the kind a model learns from imperfect demonstrations); `error` puts every
        partial result off by that much (a consistent but wrong solution)."""
        lines, total = [], self.terms[0]
        for s, t in zip(self.signs, self.terms[1:], strict=True):
            new = (total + t if s == "+" else total - t) + error
            lines.append(f"{total} {s} {t} = {new}")
            total = new
        return "\n".join([*lines, f"#### {self.terms[0] if sloppy else total}"])


def make_problems(n: int, seed: int = 0, terms: int = 2, max_value: int = 9, subtract: bool = False,
                  exclude: set[str] | None = None) -> list[Problem]:
    """`n` distinct problems of `terms` numbers in [0, max_value]; `subtract` allows `-` (results stay
    >= 0). Raises ValueError when fewer than `n` distinct questions exist."""
    if terms < 2:
        raise ValueError(f"terms must be >= 2, got {terms}")
    space = (max_value + 1) ** terms * (2 ** (terms - 1) if subtract else 1)
    taken = set(exclude or ())
    if n > space - len(taken):
        raise ValueError(f"only {space - len(taken)} distinct problems of {terms} terms up to {max_value} are left; "
                         f"asked for {n}")
    rng = random.Random(seed)
    out: list[Problem] = []
    while len(out) < n:
        values = tuple(rng.randint(0, max_value) for _ in range(terms))
        signs = tuple(rng.choice("+-") if subtract else "+" for _ in range(terms - 1))
        p = Problem(values, signs)
        if (subtract and any(_partial_negative(p))) or p.question in taken:
            continue
        taken.add(p.question)
        out.append(p)
    return out


def _partial_negative(p: Problem) -> list[bool]:
    total, out = p.terms[0], []
    for s, t in zip(p.signs, p.terms[1:], strict=True):
        total = total + t if s == "+" else total - t
        out.append(total < 0)
    return out


def gsm8k_row(p: Problem) -> dict[str, str]:
    return {"question": p.question, "answer": p.solution}


def chat_row(p: Problem, sloppy: bool = False) -> dict[str, list[dict[str, str]]]:
    return {"messages": [{"role": "user", "content": p.question}, {"role": "assistant", "content": p.worked(sloppy)}]}


def preference_rows(p: Problem) -> list[dict[str, Any]]:
    """The right solution preferred over a sloppy one and over a consistent but wrong one (reward-model
    data for PPO: with only the sloppy kind, "the final line repeats the result" would be enough to win)."""
    right = [{"role": "assistant", "content": p.worked()}]
    return [{"prompt": p.question, "chosen": right, "rejected": [{"role": "assistant", "content": wrong}]}
            for wrong in (p.worked(sloppy=True), p.worked(error=1))]


def plain_text(p: Problem, sloppy: bool = False) -> str:
    return PLAIN_TEMPLATE.format(question=p.question) + " " + p.worked(sloppy)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def write_task_files(out: str | Path, train: int = 2000, test: int = 200, seed: int = 0, terms: int = 2,
                     max_value: int = 9, subtract: bool = False, noise: float = 0.0,
                     repeats: int = 1) -> dict[str, Path]:
    """Write tasks.jsonl / test.jsonl (GSM8K rows, always right), sft.jsonl (chat rows of the train
    problems) and pretrain/corpus.jsonl (plain-text documents) under `out`; returns their
    paths. The demonstrations (SFT rows, pretraining text) are `repeats` shuffled passes over the train
    problems. `noise`: the fraction of demonstrations whose final line repeats the first number instead
    of the result, drawn per demonstration: a systematic slip a model trained on them makes as often,
    which RL with the verifier has to unlearn."""
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise is a fraction in [0, 1], got {noise}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    out = Path(out)
    test_problems = make_problems(test, seed + 1, terms, max_value, subtract)
    train_problems = make_problems(train, seed, terms, max_value, subtract,
                                   exclude={p.question for p in test_problems})
    paths = {"tasks": out / "tasks.jsonl", "test": out / "test.jsonl", "sft": out / "sft.jsonl",
             "preferences": out / "preferences.jsonl", "pretrain": out / "pretrain" / "corpus.jsonl"}
    _write_jsonl(paths["tasks"], [gsm8k_row(p) for p in train_problems])
    _write_jsonl(paths["test"], [gsm8k_row(p) for p in test_problems])
    _write_jsonl(paths["sft"], [chat_row(p, sloppy) for p, sloppy in _demonstrations(train_problems, repeats, noise,
                                                                                      seed + 2)])
    _write_jsonl(paths["preferences"], [row for p in train_problems for row in preference_rows(p)])
    _write_jsonl(paths["pretrain"], [{"id": f"arith-{i}", "text": plain_text(p, sloppy)} for i, (p, sloppy)
                                     in enumerate(_demonstrations(train_problems, repeats, noise, seed + 3))])
    return paths


def _demonstrations(problems: list[Problem], repeats: int, noise: float, seed: int) -> list[tuple[Problem, bool]]:
    """`repeats` shuffled passes over `problems`, each demonstration sloppy with probability `noise`."""
    rng = random.Random(seed)
    out = []
    for _ in range(repeats):
        order = list(problems)
        rng.shuffle(order)
        out += [(p, rng.random() < noise) for p in order]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory to write the task files into")
    parser.add_argument("--train", type=int, default=2000, help="training problems")
    parser.add_argument("--test", type=int, default=200, help="held-out problems")
    parser.add_argument("--terms", type=int, default=2, help="numbers per problem (solution steps = terms - 1)")
    parser.add_argument("--max-value", type=int, default=9, help="largest number in a problem")
    parser.add_argument("--subtract", action="store_true", help="also use '-' (partial results stay >= 0)")
    parser.add_argument("--noise", type=float, default=0.0,
                        help="fraction of demonstrations whose final line repeats the first number (tasks stay right)")
    parser.add_argument("--repeats", type=int, default=1, help="shuffled passes of demonstrations (SFT, pretraining)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        paths = write_task_files(args.out, args.train, args.test, args.seed, args.terms, args.max_value, args.subtract,
                                 args.noise, args.repeats)
    except ValueError as e:
        parser.error(str(e))
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
