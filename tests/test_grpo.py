"""GRPO / RLVR: group advantages, the loss aggregations, learning from an SFT model and from a base
model (-Zero), exact resume inside a rollout batch, LoRA's adapter-free reference, DAPO's filtering,
and the GSM8K / MATH pipelines end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from rl_fixtures import CONFIGS, arith_overrides
from torch import nn

from training.config import ConfigError, load_config
from training.distributed import DistInfo
from training.engine import train_from_cli
from training.objectives.base import Batch, RunContext
from training.objectives.grpo import GRPOObjective, clipped_surrogate, group_advantages, k3_kl

GRPO = str(CONFIGS / "grpo_tiny.yaml")
ZERO = str(CONFIGS / "grpo_zero_tiny.yaml")


def metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def evals(rows: list[dict[str, Any]]) -> list[float]:
    return [r["eval_reward"] for r in rows if "eval_reward" in r]


# ------------------------------------------------------------------------------------------- math


def test_group_advantages_with_and_without_std_scaling() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    centred = group_advantages(rewards, 4, scale=False)  # Dr. GRPO
    assert torch.allclose(centred, torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]))
    scaled = group_advantages(rewards, 4, scale=True)
    std = torch.tensor([1.0, 0.0, 0.0, 0.0]).std()  # unbiased, as TRL's GRPOTrainer
    assert torch.allclose(scaled[:4], centred[:4] / (std + 1e-4))
    assert torch.equal(scaled[4:], torch.zeros(4))  # a group that agrees carries no signal


def test_k3_estimator_and_clipped_surrogate() -> None:
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.0, -1.0, -2.0])
    kl = k3_kl(logp, ref)
    d = ref - logp
    assert torch.allclose(kl, d.exp() - d - 1) and kl[0] == 0 and bool((kl[1:] > 0).all())
    # ratio 1.5 with A > 0 is clipped at 1 + eps; with A < 0 the unclipped (larger) loss is kept.
    old = torch.log(torch.tensor([1.0, 1.0]))
    new = torch.log(torch.tensor([1.5, 1.5]))
    loss, clipped = clipped_surrogate(new, old, torch.tensor([1.0, -1.0]), 0.2, 0.28)
    assert torch.allclose(loss, torch.tensor([-1.28, 1.5])) and clipped.tolist() == [True, False]


class TableModel(nn.Module):
    """logits[t] = table[ids[t]]: a differentiable stand-in policy."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids]


def objective(models: dict[str, Path], *overrides: str) -> GRPOObjective:
    cfg = load_config(GRPO, [*arith_overrides(models, models["root"] / "unused", 1), *overrides], stage="grpo")
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), initialized_here=False)
    return GRPOObjective(cfg, RunContext(cfg, info, "fp32", initial_model=lambda: None))  # type: ignore[arg-type]


@pytest.mark.parametrize("loss_type", ["token", "sequence", "constant"])
def test_loss_aggregation_over_tokens_sequences_or_a_constant(arith_models: dict[str, Path], loss_type: str) -> None:
    """At ratio 1 each completion token's loss is -Â_i; the three aggregations weigh completions by their
    length (token), equally (sequence) or by length over a constant (constant, Dr. GRPO)."""
    obj = objective(arith_models, f"grpo.loss_type={loss_type}", "grpo.max_new_tokens=8")
    model = TableModel(16)
    ids = torch.tensor([[1, 2, 3, 4, 5, 0], [1, 2, 6, 0, 0, 0]])  # prompts of 2 tokens, completions of 3 and 1
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 0, 1, 0, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        old = torch.log_softmax(model(ids)[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0] * mask[:, 1:]
    adv = torch.tensor([2.0, -1.0])[:, None] * mask[:, 1:]
    t = {"input_ids": ids, "completion_mask": mask, "old_logps": old, "advantages": adv,
         "lengths": torch.tensor([5, 3]), "stat/reward": torch.tensor(0.5)}
    weight = obj.weight(t)
    out = obj.loss(model, Batch(t, weight, 8))
    expected = {"token": (-(2.0 * 3 - 1.0 * 1), 4), "sequence": (-(2.0 - 1.0), 2),
                "constant": (-(2.0 * 3 - 1.0 * 1) / 8, 2)}[loss_type]
    assert (float(out.loss.detach()), weight) == pytest.approx(expected)
    assert float(out.metrics["reward"]) / weight == pytest.approx(0.5)  # a rollout statistic comes back whole


# ----------------------------------------------------------------------------------------- learning


def test_grpo_from_an_sft_model_raises_verified_reward(arith_models: dict[str, Path], tmp_path: Path,
                                                       one_thread: None) -> None:
    out = tmp_path / "grpo"
    train_from_cli("grpo", GRPO, arith_overrides(arith_models, out, 40))
    rows = metrics(out)
    start, end = evals(rows)
    reward = [r["reward"] for r in rows if "reward" in r]
    assert len(reward) == 40  # the reward curve: every step in metrics.jsonl
    assert end >= start + 0.15, (start, end)
    assert sum(reward[-10:]) / 10 >= sum(reward[:10]) / 10 + 0.1


def test_grpo_zero_from_a_base_model_raises_verified_reward(arith_models: dict[str, Path], tmp_path: Path,
                                                            one_thread: None) -> None:
    out = tmp_path / "zero"
    train_from_cli("grpo", ZERO, arith_overrides(arith_models, out, 40, init="base"))
    start, end = evals(metrics(out))
    assert end >= start + 0.15, (start, end)


def test_killed_grpo_run_resumes_with_the_metrics_of_an_uninterrupted_one(arith_models: dict[str, Path],
                                                                          tmp_path: Path, one_thread: None) -> None:
    """μ = 2 epochs over 64 completions in steps of 32: a rollout batch spans 4 steps, and the run is
    stopped after step 3, inside one. The resumed run continues on the saved rollout batch."""
    common = ["grpo.epochs=2", "grpo.prompts_per_rollout=8", "grpo.beta=0.04", "train.eval_at_start=false",
              "data.eval=null"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train_from_cli("grpo", GRPO, [*arith_overrides(arith_models, whole, 6), *common])
    train_from_cli("grpo", GRPO, [*arith_overrides(arith_models, parts, 6), *common, "train.stop_after=3"])
    assert [r["step"] for r in metrics(parts)] == [1, 2, 3]
    train_from_cli("grpo", GRPO, [*arith_overrides(arith_models, parts, 6), *common])
    a, b = metrics(whole), metrics(parts)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b, strict=True):
        for key in ("loss", "grad_norm", "reward", "kl", "ratio", "clip_frac"):
            assert x[key] == pytest.approx(y[key], abs=1e-6), (x["step"], key)


def test_lora_policy_uses_the_base_with_adapters_off_as_reference(arith_models: dict[str, Path], tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  one_thread: None) -> None:
    def no_second_copy(self: RunContext) -> nn.Module:
        raise AssertionError("a LoRA run must not build a reference model")

    monkeypatch.setattr(RunContext, "initial_model", no_second_copy)
    out = tmp_path / "lora"
    train_from_cli("grpo", GRPO, [*arith_overrides(arith_models, out, 3), "grpo.beta=0.04", "lora.r=8",
                                  "lora.dropout=0.0", "data.eval=null", "train.eval_at_start=false"])
    rows = metrics(out)
    assert rows[0]["kl"] == 0.0  # the adapters start at zero: policy == base
    assert rows[-1]["kl"] > 0.0
    assert (out / "adapter" / "adapter_config.json").is_file()


def test_zero_variance_filtering_trains_on_informative_groups(arith_models: dict[str, Path], tmp_path: Path,
                                                              one_thread: None) -> None:
    out = tmp_path / "dapo"
    train_from_cli("grpo", GRPO, [*arith_overrides(arith_models, out, 1), "grpo.filter_zero_variance=true",
                                  "grpo.max_rounds=4", "data.eval=null", "train.eval_at_start=false"])
    row = metrics(out)[0]
    assert row["sampling_rounds"] >= 1 and "reward_trained" in row
    from training.checkpoint import latest_checkpoint, load_plain

    state = load_plain(latest_checkpoint(out / "checkpoints") / "train_state.pt")
    rewards = state["objective"]["buffer"]["rewards"].view(-1, 8)
    flat = int((rewards.std(dim=1) == 0).sum())
    assert flat == row["filled_flat_groups"]  # every flat group left is one sampling could not replace


@pytest.mark.slow
def test_two_rank_ddp_grpo_matches_one_process(arith_models: dict[str, Path], tmp_path: Path,
                                               one_thread: None) -> None:
    """Every rank holds the same rollout batch (same seeds) and trains rows rank::2 of each micro-batch."""
    common = [*arith_overrides(arith_models, tmp_path / "one", 4), "grpo.prompts_per_rollout=8", "grpo.epochs=2",
              "data.eval=null", "train.eval_at_start=false"]
    train_from_cli("grpo", GRPO, common)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "training.loop", "grpo", GRPO, *common, f"train.out_dir={tmp_path / 'two'}", "train.parallel=ddp",
           "train.device=cpu"]
    proc = subprocess.run(cmd, cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for a, b in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two"), strict=True):
        for key in ("loss", "grad_norm", "reward", "ratio"):
            assert b[key] == pytest.approx(a[key], abs=1e-5), (a["step"], key)


@pytest.mark.slow
def test_rollouts_on_ray_actors_train_like_in_process_ones(arith_models: dict[str, Path], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    """6 steps span two rollout batches: the second is sampled after the updated weights were pushed."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    common = ["data.eval=null", "train.eval_at_start=false"]
    train_from_cli("grpo", GRPO, [*arith_overrides(arith_models, tmp_path / "local", 6), *common])
    train_from_cli("grpo", GRPO, [*arith_overrides(arith_models, tmp_path / "ray", 6), *common,
                                  "grpo.backend=ray", "grpo.ray_actors=2"])
    for a, b in zip(metrics(tmp_path / "local"), metrics(tmp_path / "ray"), strict=True):
        assert (a["reward"], a["completion_len"]) == (b["reward"], b["completion_len"])
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)


def test_config_errors_name_the_keys(arith_models: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="multiple of 32"):
        load_config(GRPO, ["grpo.prompts_per_rollout=3", "grpo.samples_per_prompt=4"], stage="grpo")
    with pytest.raises(ConfigError, match="group size"):
        load_config(GRPO, ["grpo.samples_per_prompt=1", "train.batch_size=16"], stage="grpo")
    with pytest.raises(ConfigError, match="ddp"):
        load_config(GRPO, ["train.parallel=fsdp"], stage="grpo")
    with pytest.raises(ConfigError, match="loss_type"):
        load_config(GRPO, ["grpo.loss_type=dapo"], stage="grpo")


# ------------------------------------------------------------------------------------ real data


@pytest.mark.integration
@pytest.mark.parametrize("dataset, path", [("gsm8k", "gsm8k/train.jsonl"), ("math", "math/math500_test.jsonl")])
def test_gsm8k_and_math_pipelines_run_end_to_end(arith_models: dict[str, Path], shared_data: Path, tmp_path: Path,
                                                 dataset: str, path: str, one_thread: None) -> None:
    """The tiny arithmetic model on the real problems: prompts, sampling, the verifier (GSM8K's number,
    MATH's math-verify), the update and the export all run; its reward is near 0, as expected."""
    out = tmp_path / dataset
    data = shared_data / "verifiable" / path
    summary = train_from_cli("grpo", str(CONFIGS / "grpo_gsm8k.yaml"), [
        f"grpo.dataset={dataset}", f"data.mix={data}", f"data.eval={data}", f"train.init_from={arith_models['sft']}",
        f"train.out_dir={out}", "train.steps=2", "train.batch_size=4", "grpo.prompts_per_rollout=2",
        "grpo.samples_per_prompt=2", "grpo.max_new_tokens=8", "data.seq_len=512", "model.max_seq_len=512",
        "train.eval_batches=1", "train.eval_batch_size=2", "train.progress=false"])
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert 0.0 <= rows[-1]["reward"] <= 1.0 and "eval_reward" in rows[-1]
    assert summary["hf_dir"] and (Path(summary["hf_dir"]) / "config.json").is_file()
