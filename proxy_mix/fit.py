"""From proxy results to a searched mixture (`refinery mix fit CONFIG`).

Three regressions from mixture weights to target loss (bits per byte), each scored by k-fold
cross-validation (Spearman between out-of-fold predictions and the truth, and their error):
- LightGBM, RegMix's choice (Liu et al. 2024, arXiv:2407.01492 §3.3): gradient-boosted trees,
  here with linear leaves for sweeps of tens of proxies (see `LightGBM`);
- log-linear, Data Mixing Laws' form (Ye et al. 2024, arXiv:2403.16952 eq. 5; Olmix's default):
  L(w) = c + exp(b + Σ_i t_i·w_i);
- linear (ridge), the baseline.
The model with the best out-of-fold Spearman (or the configured one) then scores `candidates`
mixtures sampled like the sweep's and projected under the planned run's repetition caps; the
searched mixture is the mean of the `top_k` best (RegMix), which stays inside the caps (the
feasible set is convex). Written: `fit/report.json`, `fit/report.md`, and the mix manifests
`fit/searched.json`, `fit/natural.json`, `fit/uniform.json`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from proxy_mix.config import MixConfig, MixConfigError
from proxy_mix.mixture import check_feasible, natural_weights, project_rows, sample_dirichlet, write_mix
from proxy_mix.sweep import load_results

MIN_PROXIES = 4
MODELS = ("lightgbm", "loglinear", "linear")


class Regressor(Protocol):
    def fit(self, x: np.ndarray, y: np.ndarray) -> Regressor: ...
    def predict(self, x: np.ndarray) -> np.ndarray: ...


class Linear:
    """Ridge regression with an intercept (a small ridge: the weights are collinear, Σw = 1)."""

    def __init__(self, ridge: float = 1e-4) -> None:
        self.ridge = ridge

    def fit(self, x: np.ndarray, y: np.ndarray) -> Linear:
        self.mx, self.my = x.mean(axis=0), y.mean()
        xc = x - self.mx
        self.coef = np.linalg.solve(xc.T @ xc + self.ridge * len(y) * np.eye(x.shape[1]), xc.T @ (y - self.my))
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mx) @ self.coef + self.my


class LogLinear:
    """L(w) = c + exp(b + t·w) by nonlinear least squares, c kept below the smallest observed loss."""

    def __init__(self, ridge: float = 1e-3) -> None:
        self.ridge = ridge

    def fit(self, x: np.ndarray, y: np.ndarray) -> LogLinear:
        from scipy.optimize import least_squares

        spread = float(y.max() - y.min()) or 1.0
        c0 = float(y.min()) - 0.5 * spread
        init = Linear(self.ridge).fit(x, np.log(y - c0))
        t0 = init.coef
        b0 = float(init.my - init.mx @ init.coef)
        lam = math.sqrt(self.ridge * len(y))

        def residuals(p: np.ndarray) -> np.ndarray:
            c, b, t = p[0], p[1], p[2:]
            return np.concatenate([c + np.exp(np.clip(b + x @ t, -50, 50)) - y, lam * t])

        upper = np.full(len(t0) + 2, np.inf)
        upper[0] = float(y.min()) - 1e-6
        start = np.concatenate([[c0, b0], t0])
        sol = least_squares(residuals, start, bounds=(np.full_like(upper, -np.inf), upper), max_nfev=2000)
        self.c, self.b, self.t = float(sol.x[0]), float(sol.x[1]), sol.x[2:]
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.c + np.exp(np.clip(self.b + x @ self.t, -50, 50))


class LightGBM:
    """Gradient-boosted trees, RegMix's regressor, with a linear model in each leaf (`linear_tree`).

    RegMix fits 512 proxies with plain trees; a sweep here has tens, where piecewise-constant trees
    rank held-out mixtures poorly (k-fold Spearman 0.48 / 0.88 / 0.90 at 32 / 48 / 128 proxies of a
    smooth log-linear law, against 0.79 / 0.94 / 0.98 with linear leaves).
    """

    def __init__(self, seed: int = 0, rounds: int = 100) -> None:
        self.seed, self.rounds = seed, rounds

    def fit(self, x: np.ndarray, y: np.ndarray) -> LightGBM:
        import lightgbm as lgb

        params = {"objective": "regression", "learning_rate": 0.1, "num_leaves": 4, "linear_tree": True,
                  "linear_lambda": 1e-2, "min_data_in_leaf": max(5, len(y) // 6), "min_data_in_bin": 1,
                  "verbose": -1, "seed": self.seed, "deterministic": True, "num_threads": 1,
                  "force_col_wise": True}
        self.booster = lgb.train(params, lgb.Dataset(x, label=y, params={"verbose": -1}),
                                 num_boost_round=self.rounds)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.booster.predict(x), dtype=np.float64)


class TargetMean:
    """The objective (mean bits per byte over the targets) as the mean of one regressor per target.

    Each target's loss is a simple function of the weights (the code target's bpb falls steeply with
    the code weight, arXiv's with the arXiv weight), but their mean is a sum of such curves that one
    law fits badly: on the 32-proxy benchmark sweep one log-linear law on the mean ranks held-out
    proxies at Spearman -0.10, the mean of per-target laws far better (docs/benchmarks.md). Data
    Mixing Laws fits each domain's loss and combines them (§4); RegMix fits one regressor per target.
    """

    def __init__(self, name: str, seed: int = 0) -> None:
        self.name, self.seed = name, seed

    def fit(self, x: np.ndarray, y: np.ndarray) -> TargetMean:
        self.models = [make_model(self.name, self.seed).fit(x, y[:, j]) for j in range(y.shape[1])]
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.mean([m.predict(x) for m in self.models], axis=0)


def make_objective_model(name: str, seed: int, per_target: bool) -> Regressor:
    """The regressor of the objective: per target and averaged (default), or one fit on the mean."""
    return TargetMean(name, seed) if per_target else make_model(name, seed)


def make_model(name: str, seed: int = 0) -> Regressor:
    if name == "lightgbm":
        return LightGBM(seed)
    if name == "loglinear":
        return LogLinear()
    if name == "linear":
        return Linear()
    raise MixConfigError(f"unknown model {name!r}; choose one of {MODELS}")


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rank correlation; None when either side is constant."""
    from scipy.stats import spearmanr

    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    r = spearmanr(a, b).statistic
    return None if not math.isfinite(r) else float(r)


def kfold(name: str, x: np.ndarray, y: np.ndarray, folds: int, seed: int) -> dict[str, Any]:
    """Out-of-fold predictions of a model: Spearman (pooled, and mean per fold), MAE, RMSE. A 2-D `y`
    (proxies × targets) is scored on its row means, predicted by one model per target (TargetMean)."""
    per_target = y.ndim == 2
    model_y = y
    if per_target:
        y = y.mean(axis=1)
    n = len(y)
    k = min(folds, n)
    order = np.random.default_rng(seed).permutation(n)
    pred = np.empty(n)
    per_fold = []
    for f in range(k):
        test = order[f::k]
        train = np.setdiff1d(order, test)
        pred[test] = make_objective_model(name, seed, per_target).fit(x[train], model_y[train]).predict(x[test])
        r = spearman(pred[test], y[test])
        if r is not None:
            per_fold.append(r)
    err = pred - y
    return {"spearman": spearman(pred, y), "spearman_fold_mean": float(np.mean(per_fold)) if per_fold else None,
            "mae": float(np.abs(err).mean()), "rmse": float(np.sqrt((err ** 2).mean())),
            "y_range": float(np.ptp(y)), "folds": k}


def training_data(cfg: MixConfig, results: dict[str, Any]) -> tuple[list[str], list[str], np.ndarray,
                                                                       dict[str, np.ndarray]]:
    """Pools, targets, X (realized weights of each finished proxy) and y per target (bits per byte)."""
    names, targets = results["pools"], results["targets"]
    ok = [r for r in results["proxies"] if r.get("status") == "ok"]
    if len(ok) < MIN_PROXIES:
        raise MixConfigError(f"the fit needs at least {MIN_PROXIES} finished proxies, the sweep has {len(ok)}; "
                             "run (or finish) `refinery mix sweep`")
    x = np.array([[(r.get("realized") or r["weights"]).get(n, 0.0) for n in names] for r in ok])
    y = {}
    for t in targets:
        vals = [r["bpb"].get(t) if r["bpb"].get(t) is not None else r["loss"][t] for r in ok]
        y[t] = np.array(vals, dtype=np.float64)
    return names, targets, x, y


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def run_fit(cfg: MixConfig, pools: dict[str, Any], log: Callable[[str], None] = print) -> dict[str, Any]:
    f = cfg.fit
    results = load_results(cfg)
    names, targets, x, ys = training_data(cfg, results)
    objective_targets = f.targets or targets
    missing = [t for t in objective_targets if t not in targets]
    if missing:
        raise MixConfigError(f"fit.targets {missing} were not evaluated by the sweep (its targets: {targets})")
    y_targets = np.stack([ys[t] for t in objective_targets], axis=1)
    y = y_targets.mean(axis=1)
    per_target = f.combine == "per_target"
    log(f"fit: {len(y)} proxies, {len(names)} pools, objective = mean bits per byte over {objective_targets}")

    scores: dict[str, Any] = {}
    for m in MODELS:
        scores[m] = {"objective": kfold(m, x, y_targets if per_target else y, f.folds, f.seed),
                     # the other way of fitting the objective, for the record
                     "objective_" + ("direct" if per_target else "per_target"):
                         kfold(m, x, y if per_target else y_targets, f.folds, f.seed),
                     "targets": {t: kfold(m, x, ys[t], f.folds, f.seed) for t in targets}}
    chosen = f.model if f.model != "auto" else max(
        MODELS, key=lambda m: (scores[m]["objective"]["spearman"] or -2.0, -scores[m]["objective"]["mae"]))
    model = make_objective_model(chosen, f.seed, per_target).fit(x, y_targets if per_target else y)

    pool_recs = pools["pools"]
    by_name = {p["name"]: p for p in pool_recs}
    tokens = np.array([by_name[n]["tokens"] for n in names], dtype=np.float64)
    budget = f.budget_tokens if f.budget_tokens is not None else int(tokens.sum())
    u = check_feasible(tokens, budget, f.max_repetition, names, "fit")
    natural = natural_weights(tokens)
    prior = natural ** cfg.sweep.temperature
    prior /= prior.sum()
    rng = np.random.default_rng(f.seed)
    cand = project_rows(sample_dirichlet(rng, prior, cfg.sweep.concentration, f.candidates), u)
    pred = model.predict(cand)
    top = np.argsort(pred, kind="stable")[: f.top_k]
    searched = project_rows(cand[top].mean(axis=0)[None, :], u)[0]
    mixtures = {"searched": searched, "natural": project_rows(natural[None, :], u)[0],
                "uniform": project_rows(np.full((1, len(names)), 1.0 / len(names)), u)[0]}
    predicted = {k: float(model.predict(v[None, :])[0]) for k, v in mixtures.items()}
    out = cfg.out / "fit"
    manifests = {}
    for k, w in mixtures.items():
        weights = {n: float(v) for n, v in zip(names, w, strict=True)}
        manifests[k] = str(write_mix(out / f"{k}.json", pool_recs, weights, f.max_repetition, name=k,
                                     description=f"{k} mixture for a {budget:,}-token run (refinery mix fit)"))
    summary = {"proxies": len(y), "chosen_model": chosen, "combine": f.combine, "objective_targets": objective_targets,
               "kfold_spearman": {m: scores[m]["objective"]["spearman"] for m in MODELS},
               "kfold_mae": {m: round(scores[m]["objective"]["mae"], 5) for m in MODELS},
               "predicted_bpb": {k: round(v, 5) for k, v in predicted.items()},
               "best_proxy_bpb": round(float(y.min()), 5), "budget_tokens": budget}
    report = {"summary": summary, "scores": scores, "pools": names,
              "weights": {k: {n: round(float(v), 6) for n, v in zip(names, w, strict=True)}
                          for k, w in mixtures.items()},
              "caps": {n: round(float(c), 6) for n, c in zip(names, u, strict=True)},
              "top_k_predicted": [round(float(v), 5) for v in pred[top][:10]], "manifests": manifests}
    _write_json(out / "report.json", report)
    (out / "report.md").write_text(_markdown(report))
    return report


def _markdown(report: dict[str, Any]) -> str:
    s = report["summary"]
    other = "direct" if s["combine"] == "per_target" else "per_target"
    lines = [f"# Mixture fit: {s['proxies']} proxies, objective = mean bits per byte over "
             f"{', '.join(s['objective_targets'])}", "",
             f"The objective fitted {s['combine'].replace('_', ' ')}; the last columns fit it {other.replace('_', ' ')}.",
             "", f"| model | k-fold Spearman | mean per fold | MAE (bpb) | RMSE | Spearman ({other}) |",
             "|---|---|---|---|---|---|"]
    for m in MODELS:
        o = report["scores"][m]["objective"]
        alt = report["scores"][m][f"objective_{other}"]
        lines.append(f"| {m}{' (chosen)' if m == s['chosen_model'] else ''} | {_f(o['spearman'])} | "
                     f"{_f(o['spearman_fold_mean'])} | {o['mae']:.4f} | {o['rmse']:.4f} | {_f(alt['spearman'])} |")
    lines += ["", "| target | " + " | ".join(f"{m} Spearman" for m in MODELS) + " |",
              "|---|" + "---|" * len(MODELS)]
    for t in s["objective_targets"]:
        lines.append(f"| {t} | " + " | ".join(_f(report["scores"][m]["targets"][t]["spearman"]) for m in MODELS)
                     + " |")
    lines += ["", "| pool | cap | natural | uniform | searched |", "|---|---|---|---|---|"]
    w = report["weights"]
    for n in report["pools"]:
        lines.append(f"| {n} | {report['caps'][n]:.3f} | {w['natural'][n]:.4f} | {w['uniform'][n]:.4f} | "
                     f"{w['searched'][n]:.4f} |")
    lines += ["", "Predicted objective (bpb): " + ", ".join(f"{k} {v}" for k, v in s["predicted_bpb"].items()), ""]
    return "\n".join(lines)


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"
