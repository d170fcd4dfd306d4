"""Rollouts: log-probs equal a teacher-forced pass, seeded reruns repeat, stops end rows, sampling
follows its distribution, and Ray actors give the in-process rollouts."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from training.generate import generate
from training.logprobs import token_logps
from training.model import ModelConfig, Transformer
from training.rollout import (
    LocalRollout,
    SamplingParams,
    collate_rollouts,
    plan_work,
    row_uniforms,
    sample_tokens,
)

PROMPTS = [[5, 17, 3, 99, 42, 8, 11], [7, 7], [60, 2, 31, 4], [12], [88, 1, 9]]
# Decoding many tiny steps: OpenMP threads spinning against other load make it ~25x slower.
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**overrides: object) -> ModelConfig:
    base: dict[str, object] = dict(vocab_size=101, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, ffn_hidden=96,
                                   max_seq_len=128)
    base.update(overrides)
    return ModelConfig.from_dict(base)


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    m = Transformer(tiny()).eval()
    with torch.no_grad():  # sharper than the 0.02-std init, so samples differ from uniform noise
        m.lm_head.weight.mul_(4)
    return m


def _teacher_forced(model: Transformer, rollouts: list, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    batch = collate_rollouts(rollouts)
    with torch.no_grad():
        logps = token_logps(model(batch["input_ids"]).float() / temperature, batch["input_ids"])
    target = batch["completion_mask"][:, 1:]
    return logps[target], batch["old_logps"][target]


@pytest.mark.parametrize("temperature, top_p, top_k", [(1.0, 1.0, 0), (0.7, 0.9, 20), (0.0, 1.0, 0)])
def test_logprobs_equal_a_teacher_forced_forward(model: Transformer, temperature: float, top_p: float,
                                                 top_k: int) -> None:
    params = SamplingParams(n=3, max_new_tokens=24, temperature=temperature, top_p=top_p, top_k=top_k,
                            stop_token_ids=(13,), seed=4)
    rollouts = LocalRollout(model, max_batch=4).generate(PROMPTS, params)
    assert [(r.prompt_index, r.sample_index) for r in rollouts] == [(i, j) for i in range(5) for j in range(3)]
    forced, reported = _teacher_forced(model, rollouts, temperature or 1.0)
    assert forced.numel() == sum(len(r.token_ids) for r in rollouts)
    torch.testing.assert_close(reported, forced, atol=1e-5, rtol=0)


def test_a_rerun_with_the_seed_repeats_and_another_seed_differs(model: Transformer) -> None:
    engine = LocalRollout(model, max_batch=8)
    params = SamplingParams(n=4, max_new_tokens=16, temperature=1.0, seed=11)
    first, again = engine.generate(PROMPTS, params), engine.generate(PROMPTS, params)
    assert [(r.token_ids, r.logprobs) for r in first] == [(r.token_ids, r.logprobs) for r in again]
    other = engine.generate(PROMPTS, SamplingParams(n=4, max_new_tokens=16, temperature=1.0, seed=12))
    assert [r.token_ids for r in first] != [r.token_ids for r in other]
    # The n samples of a prompt differ from each other (each has its own random stream).
    assert len({tuple(r.token_ids) for r in first if r.prompt_index == 0}) > 1


def test_rollouts_do_not_depend_on_how_rows_are_batched(model: Transformer) -> None:
    params = SamplingParams(n=3, max_new_tokens=16, temperature=1.0, top_p=0.95, seed=2)
    one_by_one = LocalRollout(model, max_batch=1).generate(PROMPTS, params)
    all_at_once = LocalRollout(model, max_batch=64).generate(PROMPTS, params)
    assert [r.token_ids for r in one_by_one] == [r.token_ids for r in all_at_once]
    for a, b in zip(one_by_one, all_at_once, strict=True):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_rows_joining_a_running_batch_match_a_teacher_forced_pass(model: Transformer) -> None:
    params = SamplingParams(n=4, max_new_tokens=20, temperature=1.0, stop_token_ids=(13, 27, 40, 71), seed=6)
    engine = LocalRollout(model, max_batch=3)
    rollouts = engine.generate(PROMPTS, params)
    assert engine.last_stats["joined"] >= 5  # 20 rows through 3 slots: most join a running batch
    assert len({len(r.token_ids) for r in rollouts}) > 3  # rows did end at different lengths
    forced, reported = _teacher_forced(model, rollouts, 1.0)
    torch.testing.assert_close(reported, forced, atol=1e-5, rtol=0)
    wide = LocalRollout(model, max_batch=64)
    assert [r.token_ids for r in wide.generate(PROMPTS, params)] == [r.token_ids for r in rollouts]
    assert wide.last_stats["joined"] == 0 and wide.last_stats["slot_steps"] > engine.last_stats["slot_steps"] / 3


def test_greedy_rollouts_equal_the_kv_cache_sampler(model: Transformer) -> None:
    rollouts = LocalRollout(model).generate(PROMPTS, SamplingParams(max_new_tokens=12, temperature=0.0))
    assert [r.token_ids for r in rollouts] == generate(model, PROMPTS, max_new_tokens=12, greedy=True)
    # top_k=1 and a tiny top_p are greedy too.
    for params in (SamplingParams(max_new_tokens=12, top_k=1, seed=3), SamplingParams(max_new_tokens=12, top_p=1e-6)):
        assert [r.token_ids for r in LocalRollout(model).generate(PROMPTS, params)] == [r.token_ids for r in rollouts]


def test_stop_token_ends_a_row_and_is_kept(model: Transformer) -> None:
    free = LocalRollout(model).generate(PROMPTS, SamplingParams(n=2, max_new_tokens=30, seed=5))
    stop = next(t for t in free[0].token_ids[3:] if t not in free[0].token_ids[:3])  # a token sampled mid-way
    stopped = LocalRollout(model).generate(PROMPTS, SamplingParams(n=2, max_new_tokens=30, seed=5, stop_token_ids=(stop,)))
    for f, s in zip(free, stopped, strict=True):
        if stop in f.token_ids:
            cut = f.token_ids.index(stop) + 1
            assert s.token_ids == f.token_ids[:cut] and s.finish_reason == "stop"
        else:
            assert s.token_ids == f.token_ids and s.finish_reason == "length"
    assert any(s.finish_reason == "stop" for s in stopped)


def test_stop_strings_end_rows_on_decoded_text(chat_tokenizer: Path) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(chat_tokenizer))
    torch.manual_seed(1)
    model = Transformer(tiny(vocab_size=tok.get_vocab_size())).eval()
    prompts = [tok.encode("ROMEO: What say you?").ids, tok.encode("JULIET:").ids]
    free = LocalRollout(model, tok).generate(prompts, SamplingParams(n=2, max_new_tokens=40, seed=0))
    text = free[0].text or ""
    stop = text[len(text) // 2: len(text) // 2 + 2]  # two characters the first rollout writes mid-way
    params = SamplingParams(n=2, max_new_tokens=40, seed=0, stop=(stop,))
    stopped = LocalRollout(model, tok).generate(prompts, params)
    assert stopped[0].finish_reason == "stop" and stopped[0].text.endswith(stop)
    assert stop not in stopped[0].text[: -len(stop)]
    assert stopped[0].token_ids == free[0].token_ids[: len(stopped[0].token_ids)]
    assert stop in tok.decode(stopped[0].token_ids) and stop not in tok.decode(stopped[0].token_ids[:-1])
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        LocalRollout(model).generate(prompts, params)


def test_inverse_cdf_sampling_follows_the_filtered_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    n = 40_000
    uniforms = torch.from_numpy(row_uniforms(0, np.zeros(n, dtype=np.int64), np.arange(n), 0))
    for params in (SamplingParams(), SamplingParams(temperature=0.5), SamplingParams(top_k=3), SamplingParams(top_p=0.8)):
        scaled = (logits / params.temperature).log_softmax(-1)
        tokens = sample_tokens(scaled.expand(n, -1), params, uniforms)
        freq = torch.bincount(tokens, minlength=6).double() / n
        probs = scaled.exp()[0].double()
        if params.top_k:
            probs[params.top_k:] = 0
        if params.top_p < 1:
            keep = (probs.cumsum(0) - probs) < params.top_p
            probs = probs * keep
        probs /= probs.sum()
        torch.testing.assert_close(freq, probs, atol=0.01, rtol=0)
        assert (freq[probs == 0] == 0).all()  # filtered tokens are never drawn


def test_uniforms_are_a_function_of_seed_prompt_sample_and_step() -> None:
    u = row_uniforms(7, np.array([0, 1, 0]), np.array([0, 0, 1]), 3)
    assert u.tolist() == row_uniforms(7, np.array([0, 1, 0]), np.array([0, 0, 1]), 3).tolist()
    assert len(set(u.tolist())) == 3 and ((0 <= u) & (u < 1)).all()
    assert row_uniforms(7, np.array([1]), np.array([0]), 3)[0] == u[1]  # alone or in a batch: the same
    assert row_uniforms(8, np.array([1]), np.array([0]), 3)[0] != u[1]


def test_plan_work_keeps_lengths_together_and_every_row_once() -> None:
    batches = plan_work(PROMPTS, n=3, max_rows=4)
    rows = [r for b in batches for r in b.rows]
    assert sorted(rows) == [(i, j) for i in range(5) for j in range(3)]
    assert all(len(b.rows) <= 4 for b in batches)
    assert rows[0][0] == 0 and rows[-1][0] == 3  # longest prompt first, shortest last


def test_collate_aligns_old_logps_with_token_logps() -> None:
    from training.rollout import Rollout

    r = Rollout(0, 0, [1, 2, 3], [4, 5], [-0.5, -0.25], "length")
    short = Rollout(1, 0, [6], [7], [-1.0], "stop")
    batch = collate_rollouts([r, short], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 0, 0, 0]]
    assert batch["completion_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 1, 0, 0, 0]]
    assert batch["old_logps"].tolist() == [[0, 0, -0.5, -0.25], [-1.0, 0, 0, 0]]


def test_bad_requests_are_clear_errors(model: Transformer) -> None:
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="n .samples per prompt. must be >= 1"):
        SamplingParams(n=0)
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len 128"):
        LocalRollout(model).generate([[1] * 100], SamplingParams(max_new_tokens=40))
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        LocalRollout(model).generate([[1], []], SamplingParams())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        LocalRollout(model).generate([[1, 500]], SamplingParams())


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.mark.slow
def test_two_ray_actors_give_the_in_process_rollouts_and_take_new_weights(ray_local: None) -> None:
    from training.rollout import RayRollout

    torch.manual_seed(3)
    policy = Transformer(tiny()).eval()
    params = SamplingParams(n=4, max_new_tokens=20, temperature=1.0, top_p=0.95, stop_token_ids=(13,), seed=9)
    remote = RayRollout(policy, num_actors=2, max_batch=4, max_rows=8)  # 3 work lists over 2 actors
    try:
        local = LocalRollout(policy, max_batch=4, max_rows=8).generate(PROMPTS, params)
        assert [(r.token_ids, r.logprobs) for r in remote.generate(PROMPTS, params)] == \
            [(r.token_ids, r.logprobs) for r in local]
        with torch.no_grad():  # an "update": new weights pushed to the actors
            for p in policy.parameters():
                p.add_(0.05 * torch.randn_like(p))
        remote.load_weights(policy.state_dict())
        updated = LocalRollout(policy, max_batch=4, max_rows=8).generate(PROMPTS, params)
        assert [r.token_ids for r in updated] != [r.token_ids for r in local]
        assert [(r.token_ids, r.logprobs) for r in remote.generate(PROMPTS, params)] == \
            [(r.token_ids, r.logprobs) for r in updated]
    finally:
        remote.close()
