"""Process reward model: step boundaries, Math-Shepherd labels, PRM training with best-of-N reranking,
and step scores as GRPO's dense process rewards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from rl_fixtures import CONFIGS, arith_overrides
from torch import nn

from training.engine import train_from_cli
from training.objectives.prm import process_advantages, rerank
from training.rewards import VerifiableTask
from training.rl_prm_labels import label_solutions, step_ends
from training.rollout import Rollout, SamplingParams


def metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


class CharTokenizer:
    """One character per token id (ord): enough to place step ends by hand."""

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(i) for i in ids)


def ids(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_step_ends_fall_on_newlines_and_the_last_token() -> None:
    tok = CharTokenizer()
    assert step_ends(ids("1+2=3\n#### 3"), tok) == [5, 11]
    assert step_ends(ids("a\n\nb\n"), tok) == [2, 4]  # a blank line belongs to the step it closes
    assert step_ends([], tok) == []


class ScriptedEngine:
    """A rollout engine that answers from a script: solutions first, then prefix completions."""

    tokenizer = CharTokenizer()

    def __init__(self, solutions: list[str], completions: dict[str, list[str]]) -> None:
        self.solutions, self.completions = solutions, completions

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Rollout]:
        out = []
        for i, p in enumerate(prompts):
            if params.n == len(self.solutions):  # the solutions of one prompt
                texts = self.solutions
            else:  # completions of a prefix: keyed by the prefix's text after the prompt "Q"
                texts = self.completions["".join(map(chr, p))[1:]]
            out += [Rollout(i, j, p, ids(t), [0.0] * len(t), "stop", t) for j, t in enumerate(texts)]
        return out


def test_math_shepherd_labels_are_the_rate_of_completions_that_reach_the_answer() -> None:
    task = VerifiableTask("t", [{"role": "user", "content": "1+2+3?"}], "6", "gsm8k")
    engine = ScriptedEngine(
        solutions=["1+2=3\n3+3=6\n#### 6", "1+2=4\n4+3=7\n#### 7"],
        completions={"1+2=3\n": ["3+3=6\n#### 6", "3+3=5\n#### 5", "3+3=6\n#### 6", "#### 6"],
                     "1+2=3\n3+3=6\n": ["#### 6"] * 4,
                     "1+2=4\n": ["4+3=7\n#### 7", "4+3=7\n#### 7", "#### 7", "#### 6"],
                     "1+2=4\n4+3=7\n": ["#### 7"] * 4})

    def verify(tasks: list[VerifiableTask], texts: list[str]) -> list[float]:
        return [float(t.rstrip().endswith("#### 6")) for t in texts]

    rows = label_solutions(engine, [task], [ids("Q")], verify, solutions=2, rollouts=4,  # type: ignore[arg-type]
                           params=SamplingParams(max_new_tokens=16))
    right, wrong = rows
    assert right["correct"] == 1.0 and right["soft"] == [0.75, 1.0, 1.0] and right["hard"] == [1.0, 1.0, 1.0]
    assert wrong["correct"] == 0.0 and wrong["soft"] == [0.25, 0.0, 0.0] and wrong["hard"] == [1.0, 0.0, 0.0]
    assert right["step_ends"] == [5, 11, 17]


class ScriptedPRM(nn.Module):
    """Value of a position = a number written into the token ids (ids - 100): step scores by hand."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return (input_ids - 100).float()


def test_process_rewards_are_group_normalized_and_summed_over_later_steps() -> None:
    """DeepSeekMath §4.1.3: a token's advantage is the sum of the normalized rewards of the steps that
    end at or after it."""
    prm = ScriptedPRM()
    nl = ord("\n")
    # two completions of a one-token prompt; the token before each newline carries the step's logit
    rollouts = [Rollout(0, 0, [1], [100, nl, 100], [0.0] * 3, "stop"),  # steps end at 1 and 2
                Rollout(0, 1, [1], [100, 200], [0.0] * 2, "stop")]  # one step, ends at 1
    t = {"completion_mask": torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0]], dtype=torch.bool)}
    dense, mean = process_advantages(prm, t, rollouts, 2, CharTokenizer(), "cpu")
    scores = [torch.sigmoid(torch.tensor(float(nl - 100))).item(), 0.5, 1.0]  # σ(-90), σ(0), σ(100)
    mu, sd = float(torch.tensor(scores).mean()), float(torch.tensor(scores).std(unbiased=False))
    r = [(s - mu) / (sd + 1e-4) for s in scores]
    assert dense[0, :3].tolist() == pytest.approx([r[0] + r[1], r[0] + r[1], r[1]], abs=1e-5)
    assert dense[1, :2].tolist() == pytest.approx([r[2], r[2]], abs=1e-5)
    assert mean == pytest.approx(sum(scores) / 3)
    # best-of-N by the lowest step score: the second completion (min 1.0) beats the first (min ~0)
    assert rerank(prm, rollouts, 2, CharTokenizer(), "cpu") == [1]


@pytest.fixture(scope="module")
def prm_run(arith_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before the one_thread fixture
    out = tmp_path_factory.mktemp("prm") / "prm"
    try:
        train_from_cli("prm", str(CONFIGS / "prm_tiny.yaml"), [
            f"data.mix={arith_models['tasks']}", f"data.eval={arith_models['test']}",
            f"train.init_from={arith_models['sft']}", f"train.out_dir={out}", "train.steps=40",
            "train.progress=false", "prm.solutions=4", "prm.rollouts=4"])
    finally:
        torch.set_num_threads(before)
    return out


def test_prm_learns_the_automatic_step_labels_and_reranks(prm_run: Path) -> None:
    rows = metrics(prm_run)
    start, end = [r for r in rows if "eval_step_accuracy" in r]
    assert end["eval_step_accuracy"] >= start["eval_step_accuracy"] + 0.1, (start, end)
    assert end["eval_loss"] < start["eval_loss"]
    # best-of-4 by the PRM is at least as good as a random pick of the held-out solutions
    assert end["eval_best_of_n"] >= end["eval_solution_accuracy"]
    labels = next((prm_run / "prm_labels").glob("train-*.jsonl")).read_text().splitlines()
    assert len(labels) == 80 * 4  # every task's 4 solutions, labelled once and cached


def test_prm_step_scores_as_dense_rewards_in_grpo(arith_models: dict[str, Path], prm_run: Path,
                                                  tmp_path: Path, one_thread: None) -> None:
    out = tmp_path / "grpo_prm"
    train_from_cli("grpo", str(CONFIGS / "grpo_tiny.yaml"), [
        *arith_overrides(arith_models, out, 2), f"grpo.prm={prm_run}", "grpo.prm_coef=0.5", "data.eval=null",
        "train.eval_at_start=false"])
    rows = metrics(out)
    assert all(0.0 < r["prm_step_score"] < 1.0 for r in rows)
