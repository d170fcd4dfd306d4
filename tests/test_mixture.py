"""Mixtures: sampled ones lie on the simplex and respect repetition caps, impossible caps and bad
weights are clear errors, and the trainer's loader realizes a written manifest's weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from proxy_mix.config import MixConfigError, config_from_dict
from proxy_mix.mixture import (
    caps,
    check_feasible,
    check_weights,
    project_rows,
    project_to_caps,
    read_mix_weights,
    sample_dirichlet,
    write_mix,
)
from proxy_mix.proxy import realized_shares
from proxy_mix.sweep import plan_mixtures
from training.data import MixtureLoader


def token_pool(root: Path, name: str, n_tokens: int, vocab: int = 256, seed: int = 0) -> dict:
    """A token manifest in the `refinery.tokens/1` contract, written by hand (random ids)."""
    d = root / name
    d.mkdir(parents=True)
    ids = np.random.default_rng(seed).integers(0, vocab, n_tokens).astype(np.uint16)
    np.save(d / "part.npy", ids)
    manifest = {"format": "refinery.tokens/1", "dtype": "uint16", "vocab_size": vocab, "eos_id": 0,
                "total_tokens": n_tokens, "total_text_bytes": 3 * n_tokens,
                "shards": [{"path": "part.npy", "tokens": n_tokens, "dtype": "uint16",
                            "nbytes": (d / "part.npy").stat().st_size}]}
    (d / "manifest.json").write_text(json.dumps(manifest))
    return {"name": name, "manifest": str(d / "manifest.json"), "tokens": n_tokens}


def _cfg(**sweep: object) -> object:
    return config_from_dict({"tokenizer": "tok.json", "sources": [{"name": "a", "paths": ["x"]}],
                             "targets": [{"name": "t", "pool": "a"}], "sweep": sweep})


def test_sampled_mixtures_lie_on_the_simplex_and_respect_caps() -> None:
    tokens = [5_000, 40_000, 200_000, 1_000_000, 12_000, 80_000]
    pools = {"pools": [{"name": f"p{i}", "tokens": t} for i, t in enumerate(tokens)]}
    cfg = _cfg(proxies=200, tokens=400_000, max_repetition=2.0, concentration=[0.05, 5.0])
    names, mixtures = plan_mixtures(cfg, pools)
    u = caps(np.array(tokens), 400_000, 2.0 * 0.95)
    assert names == [f"p{i}" for i in range(6)] and mixtures.shape == (200, 6)
    assert np.all(mixtures >= 0)
    np.testing.assert_allclose(mixtures.sum(axis=1), 1.0, atol=1e-9)
    assert np.all(mixtures <= u + 1e-9)
    assert np.all(mixtures[:, 0] <= u[0] + 1e-9) and u[0] < 0.03  # the smallest pool's cap binds
    np.testing.assert_allclose(mixtures[0], project_to_caps(np.array(tokens) / sum(tokens), u))  # row 0: natural
    # Diverse around natural: the largest pool (natural share 0.74) ranges from minor to nearly all.
    assert mixtures[:, 3].min() < 0.3 and mixtures[:, 3].max() > 0.95
    # Mixture k depends only on (seed, k): more proxies keep the earlier ones.
    _, fewer = plan_mixtures(_cfg(proxies=20, tokens=400_000, max_repetition=2.0, concentration=[0.05, 5.0]), pools)
    np.testing.assert_array_equal(fewer, mixtures[:20])


def test_projection_keeps_proportions_below_the_caps() -> None:
    rng = np.random.default_rng(1)
    for _ in range(300):
        p = int(rng.integers(2, 10))
        u = rng.uniform(0.01, 0.6, p)
        u = u if u.sum() >= 1 else u / u.sum() * 1.05
        w = sample_dirichlet(rng, np.full(p, 1 / p), (0.05, 2.0), 1)[0]
        x = project_to_caps(w, u)
        assert abs(x.sum() - 1) < 1e-9 and np.all(x >= 0) and np.all(x <= u + 1e-12)
        free = x < u - 1e-9
        if free.sum() >= 2 and (w[free] > 0).all():  # uncapped pools keep their ratios
            ratio = x[free] / w[free]
            np.testing.assert_allclose(ratio, ratio[0], rtol=1e-9)
    many = project_rows(rng.dirichlet(np.ones(4), size=1000), np.array([0.1, 0.2, 0.5, 0.9]))
    assert np.all(many <= [0.1 + 1e-12, 0.2 + 1e-12, 0.5 + 1e-12, 0.9 + 1e-12])
    np.testing.assert_allclose(many.sum(axis=1), 1.0)


def test_a_cap_that_makes_the_budget_impossible_is_an_error() -> None:
    with pytest.raises(MixConfigError, match="caps make the budget impossible.*raise max_repetition"):
        check_feasible(np.array([1000.0, 2000.0]), 10_000, 2.0, ["a", "b"], "fit")
    pools = {"pools": [{"name": "a", "tokens": 1000}, {"name": "b", "tokens": 2000}]}
    with pytest.raises(MixConfigError, match="impossible"):
        plan_mixtures(_cfg(tokens=100_000, max_repetition=4.0), pools)


def test_weights_that_do_not_sum_to_one_are_refused(tmp_path: Path) -> None:
    with pytest.raises(MixConfigError, match="sum to 0.9, not 1"):
        check_weights({"a": 0.5, "b": 0.4}, ["a", "b"])
    with pytest.raises(MixConfigError, match="unknown pools"):
        check_weights({"a": 0.5, "zz": 0.5}, ["a", "b"])
    with pytest.raises(MixConfigError, match="finite and >= 0"):
        check_weights({"a": 1.5, "b": -0.5}, ["a", "b"])
    pools = [token_pool(tmp_path, "a", 1000), token_pool(tmp_path, "b", 1000, seed=1)]
    with pytest.raises(MixConfigError, match="sum to"):
        write_mix(tmp_path / "m.json", pools, {"a": 0.7, "b": 0.7}, 2.0, name="m")
    # A hand-written manifest whose weights do not sum to one is refused where weights matter.
    (tmp_path / "hand.json").write_text(json.dumps({"pools": [
        {"name": "a", "manifest": "a/manifest.json", "weight": 3}, {"name": "b", "manifest": "b/manifest.json",
                                                                     "weight": 1}]}))
    with pytest.raises(MixConfigError, match="sum to 4"):
        read_mix_weights(tmp_path / "hand.json", ["a", "b"])


def test_manifest_weights_are_realized_by_the_trainers_loader_within_one_percent(tmp_path: Path) -> None:
    sizes = {"web.q0": 300_000, "web.q1": 120_000, "code": 60_000, "ref": 200_000}
    pools = [token_pool(tmp_path / "pools", n, t, seed=i) for i, (n, t) in enumerate(sizes.items())]
    weights = {"web.q0": 0.4, "web.q1": 0.25, "code": 0.2, "ref": 0.15}
    seq_len, batch, steps = 32, 64, 600  # 38,400 rows, 1.2M tokens: no pool reaches its cap of 4 epochs
    mix = write_mix(tmp_path / "mixes" / "m.json", pools, weights, 4.0, name="m", seed=3)
    assert read_mix_weights(mix, list(sizes)) == pytest.approx(weights)
    loader = MixtureLoader(mix, seq_len=seq_len, global_batch_size=batch, seed=3)
    tokens = dict.fromkeys(loader.names, 0)
    for _ in range(steps):
        inputs, _ = next(loader)
        assert inputs.shape == (batch, seq_len)
    for name, rows in zip(loader.names, loader.consumed, strict=True):
        tokens[name] = rows * seq_len
    total = sum(tokens.values())
    for name, w in weights.items():
        assert abs(tokens[name] / total - w) < 0.01, (name, tokens[name] / total, w)
    # The proxies record the same shares from the loader's own plan, without reading tokens.
    shares = realized_shares(mix, seq_len, batch, steps, seed=3)
    assert shares == pytest.approx({n: t / total for n, t in tokens.items()})
