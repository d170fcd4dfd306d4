"""The fit, upsampling and validation steps on sweep results with a known answer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from proxy_mix.config import MixConfig, MixConfigError, config_from_dict
from proxy_mix.fit import kfold, run_fit
from proxy_mix.mixture import caps, read_mix_weights, sample_dirichlet
from proxy_mix.proxy import write_result
from proxy_mix.upsample import curve, run_upsample
from proxy_mix.validate import run_validate

POOLS = ["news.q0", "news.q1", "news.q2", "sci.q0", "sci.q1", "sci.q2", "code"]
TOKENS = np.array([300_000, 300_000, 300_000, 200_000, 200_000, 200_000, 150_000], dtype=np.float64)
# How much each pool lowers the target loss: the higher quality buckets help most.
USEFUL = np.array([0.1, 0.5, 1.0, 0.2, 0.6, 1.2, 0.8])


def true_bpb(w: np.ndarray) -> np.ndarray:
    return 2.0 + 1.5 * np.exp(-1.5 * np.atleast_2d(w) @ USEFUL)


def _setup(tmp_path: Path, n: int = 48, **overrides: Any) -> tuple[MixConfig, dict[str, Any]]:
    raw: dict[str, Any] = {"output": str(tmp_path / "out"), "tokenizer": "tok.json",
                           "sources": [{"name": "code", "paths": ["x"]}], "targets": [{"name": "t", "pool": "code"}],
                           "fit": {"candidates": 20_000, "top_k": 50, "folds": 5, "budget_tokens": 3_000_000,
                                   "max_repetition": 4.0}}
    raw.update(overrides)
    cfg = config_from_dict(raw)
    pools = {"pools": [{"name": n_, "kind": "source" if n_ == "code" else "web",
                        "topic": None if n_ == "code" else n_.split(".")[0],
                        "bucket": None if n_ == "code" else int(n_[-1]), "tokens": int(t),
                        "manifest": str(tmp_path / "pools" / n_ / "tokens" / "manifest.json")}
                       for n_, t in zip(POOLS, TOKENS, strict=True)]}
    rng = np.random.default_rng(0)
    w = sample_dirichlet(rng, TOKENS / TOKENS.sum(), (0.1, 5.0), n)
    y = true_bpb(w) + rng.normal(0, 0.003, n)
    proxies = [{"id": i, "status": "ok", "weights": dict(zip(POOLS, row.tolist(), strict=True)),
                "loss": {"t": float(v)}, "bpb": {"t": float(v)}} for i, (row, v) in enumerate(zip(w, y, strict=True))]
    proxies.append({"id": n, "status": "failed", "error": "boom", "weights": None})
    sweep = tmp_path / "out" / "sweep"
    sweep.mkdir(parents=True)
    (sweep / "results.json").write_text(json.dumps({"pools": POOLS, "targets": ["t"], "proxies": proxies}))
    return cfg, pools


def test_fit_ranks_held_out_mixtures_and_the_search_beats_natural(tmp_path: Path) -> None:
    cfg, pools = _setup(tmp_path)
    report = run_fit(cfg, pools, log=lambda _: None)
    s = report["summary"]
    assert s["proxies"] == 48  # the failed proxy is left out of the fit
    for model in ("lightgbm", "loglinear", "linear"):
        assert s["kfold_spearman"][model] > 0.85, (model, s)
    assert s["kfold_spearman"]["loglinear"] > 0.97  # the true law is log-linear
    w = report["weights"]
    searched = np.array([w["searched"][p] for p in POOLS])
    natural = np.array([w["natural"][p] for p in POOLS])
    u = caps(TOKENS, 3_000_000, 4.0)
    assert abs(searched.sum() - 1) < 1e-9 and np.all(searched >= 0) and np.all(searched <= u + 1e-9)
    assert true_bpb(searched)[0] < true_bpb(natural)[0] - 0.05  # really better, not only predicted better
    assert s["predicted_bpb"]["searched"] < s["predicted_bpb"]["natural"]
    mix = read_mix_weights(tmp_path / "out/fit/searched.json", POOLS)  # a manifest the trainer reads
    assert mix == pytest.approx(w["searched"], abs=1e-6)
    assert "k-fold Spearman" in (tmp_path / "out/fit/report.md").read_text()


def test_kfold_scores_a_useless_model_near_zero() -> None:
    rng = np.random.default_rng(3)
    x = rng.dirichlet(np.ones(5), 60)
    y = rng.normal(size=60)  # loss unrelated to the weights
    assert abs(kfold("linear", x, y, 5, 0)["spearman"]) < 0.35


def test_fit_needs_finished_proxies_and_a_feasible_budget(tmp_path: Path) -> None:
    cfg, pools = _setup(tmp_path, n=3)
    with pytest.raises(MixConfigError, match="at least 4 finished proxies"):
        run_fit(cfg, pools, log=lambda _: None)
    cfg, pools = _setup(tmp_path / "b", fit={"budget_tokens": 10**9, "max_repetition": 4.0, "candidates": 100,
                                             "top_k": 5})
    with pytest.raises(MixConfigError, match="caps make the budget impossible"):
        run_fit(cfg, pools, log=lambda _: None)


def test_upsampling_drops_the_bottom_and_repeats_the_top_within_the_cap(tmp_path: Path) -> None:
    cfg, pools = _setup(tmp_path, upsample={"drop_bottom": 0.34, "max_repetition": 5.0, "curve": "exponential",
                                            "budget_tokens": 1_500_000})
    run_fit(cfg, pools, log=lambda _: None)
    report = run_upsample(cfg, pools)
    rows = {r["pool"]: r for r in report["pools"]}
    assert not rows["news.q0"]["kept"] and not rows["sci.q0"]["kept"]  # the bottom third of each topic
    assert rows["news.q0"]["weight"] == 0 and rows["sci.q0"]["weight"] == 0
    for topic in ("news", "sci"):
        r1, r2 = rows[f"{topic}.q1"]["repetition"], rows[f"{topic}.q2"]["repetition"]
        assert 0 < r1 < r2 <= 5.0 + 1e-9
        assert r2 / r1 == pytest.approx(5.0, rel=1e-6) or r2 == pytest.approx(5.0)  # the curve, or the cap
    searched = read_mix_weights(tmp_path / "out/fit/searched.json", POOLS)
    weights = read_mix_weights(report["manifest"], POOLS)  # sums to one, else this raises
    for topic in ("news", "sci"):  # each topic keeps the share the searched mixture gave it
        share = sum(v for k, v in searched.items() if k.startswith(topic))
        assert sum(v for k, v in weights.items() if k.startswith(topic)) == pytest.approx(share, abs=1e-6)
    assert weights["code"] == pytest.approx(searched["code"], abs=1e-7)
    mix = json.loads(Path(report["manifest"]).read_text())
    assert {p["name"] for p in mix["pools"]} == set(POOLS) - {"news.q0", "sci.q0"}


def test_upsampling_that_cannot_fill_the_budget_is_an_error(tmp_path: Path) -> None:
    cfg, pools = _setup(tmp_path, upsample={"drop_bottom": 0.67, "max_repetition": 1.0,
                                            "budget_tokens": 3_000_000})
    with pytest.raises(MixConfigError, match="cannot fill it"):
        run_upsample(cfg, pools)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"pools": [{"name": "code", "manifest": "m.json", "weight": 0.5}]}))
    with pytest.raises(MixConfigError, match="sum to 0.5, not 1"):
        run_upsample(cfg, pools, mix=str(bad))


def test_curves_rise_to_the_cap() -> None:
    np.testing.assert_allclose(curve(3, 7.0, "linear"), [1.0, 4.0, 7.0])
    np.testing.assert_allclose(curve(3, 4.0, "exponential"), [1.0, 2.0, 4.0])
    assert curve(1, 7.0, "linear").tolist() == [7.0]


def test_validate_compares_searched_natural_and_uniform(tmp_path: Path) -> None:
    cfg, pools = _setup(tmp_path, validate={"tokens": 2_000_000, "mixtures": ["searched", "natural", "uniform"]})
    pools["targets"] = [{"name": "t", "manifest": "unused", "tokens": 10_000}]
    run_fit(cfg, pools, log=lambda _: None)

    def fake_run(task: dict[str, Any]) -> dict[str, Any]:  # the true law instead of a trainer run
        w = np.array([task["weights"][p] for p in POOLS])
        v = float(true_bpb(w)[0])
        result = {"id": task["id"], "status": "ok", "weights": task["weights"], "loss": {"t": v}, "bpb": {"t": v}}
        write_result(Path(task["dir"]), result)
        return result

    report = run_validate(cfg, pools, executor="local", train_fn=fake_run, progress=False, log=lambda _: None)
    assert set(report["mixtures"]) == {"searched", "natural", "uniform"}
    assert report["best"] == "searched" and report["verdict"].startswith("searched beats natural")
    assert "| searched (best) |" in report["table"]
    for r in report["mixtures"].values():  # projected under the validation run's caps
        w = np.array([r["weights"][p] for p in POOLS])
        assert np.all(w <= caps(TOKENS, 2_000_000, 4.0) + 1e-9)
    with pytest.raises(MixConfigError, match="validate.mixtures names 'best'"):
        cfg.validate.mixtures = ["best"]
        run_validate(cfg, pools, executor="local", train_fn=fake_run, progress=False, log=lambda _: None)


def test_the_objective_fitted_per_target_ranks_a_sum_of_laws_that_one_law_misfits() -> None:
    """Two targets, each a steep log-linear law of its own pool's weight (as code and arXiv bpb are):
    their mean is not one log-linear law. One law per target, averaged, ranks held-out mixtures well;
    one law on the mean does not."""
    rng = np.random.default_rng(0)
    x = rng.dirichlet([1.0, 1.0, 1.0], size=32)
    y = np.stack([2.0 + np.exp(1.0 - 9.0 * x[:, 0]), 2.0 + np.exp(1.0 - 9.0 * x[:, 1])], axis=1)
    y += rng.normal(0.0, 0.01, size=y.shape)
    per_target = kfold("loglinear", x, y, folds=5, seed=0)
    direct = kfold("loglinear", x, y.mean(axis=1), folds=5, seed=0)
    assert per_target["spearman"] > 0.95 and per_target["mae"] < direct["mae"]
    assert direct["spearman"] < per_target["spearman"] - 0.1
