"""Mixtures: weights on the simplex over pools, repetition caps, sampling, and the mix manifest.

A mixture is only a manifest of weights over already tokenized pools (never a re-tokenization);
the trainer's `training.data.load_mix` reads it. A pool's cap is the epochs a run may take of it:
with a budget of B tokens, weight w_i of pool i (T_i tokens) repeats it w_i·B/T_i times, so a cap
r bounds the weight by u_i = r·T_i/B. Sampled and searched mixtures are projected onto
{w ≥ 0, Σw = 1, w ≤ u}, which is empty exactly when Σu < 1: the cap makes the budget impossible.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from proxy_mix.config import MixConfigError

# Weights are written with this many decimals; sums are checked to this tolerance.
DECIMALS = 8
SUM_TOLERANCE = 1e-6


def check_weights(weights: dict[str, float], pools: Sequence[str], where: str = "mixture") -> dict[str, float]:
    """Weights over exactly `pools`, each finite and >= 0, summing to one; else a MixConfigError."""
    unknown = sorted(set(weights) - set(pools))
    if unknown:
        raise MixConfigError(f"{where}: unknown pools {unknown}; pools: {list(pools)}")
    out = {p: float(weights.get(p, 0.0)) for p in pools}
    bad = {p: w for p, w in out.items() if not math.isfinite(w) or w < 0}
    if bad:
        raise MixConfigError(f"{where}: weights must be finite and >= 0, got {bad}")
    total = sum(out.values())
    if abs(total - 1.0) > SUM_TOLERANCE:
        raise MixConfigError(f"{where}: weights sum to {total:.6g}, not 1; divide each by their sum "
                             "(or let `refinery mix` write the mixture)")
    return out


def caps(tokens: np.ndarray, budget: float, max_repetition: float | np.ndarray) -> np.ndarray:
    """Upper bound of each pool's weight: `max_repetition` epochs of its tokens in a `budget`-token run."""
    if budget <= 0:
        raise MixConfigError(f"the token budget must be > 0, got {budget}")
    return np.asarray(max_repetition, dtype=np.float64) * np.asarray(tokens, dtype=np.float64) / budget


def check_feasible(tokens: np.ndarray, budget: float, max_repetition: float | np.ndarray,
                   names: Sequence[str], what: str) -> np.ndarray:
    """The caps, or an error naming the numbers when no mixture can fill the budget under them."""
    u = caps(tokens, budget, max_repetition)
    if u.sum() < 1.0 - 1e-9:
        most = float((np.asarray(max_repetition) * tokens).sum())
        raise MixConfigError(
            f"{what}: the caps make the budget impossible: {int(budget):,} tokens are wanted but the pools "
            f"({', '.join(names)}; {int(tokens.sum()):,} tokens) repeated at most {max_repetition}× give "
            f"{int(most):,}; raise max_repetition, lower the budget, or add data")
    return u


def project_to_caps(w: np.ndarray, u: np.ndarray) -> np.ndarray:
    """The mixture nearest in proportion to `w` with 0 <= w_i <= u_i and Σw = 1 (see `project_rows`)."""
    return project_rows(np.asarray(w, dtype=np.float64)[None, :], u)[0]


def project_rows(w: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Each row of `w` (N × P) projected onto {0 <= w <= u, Σw = 1}, for many candidates at once.

    Water-filling: pools over their cap are fixed at it and the remaining mass is shared among the
    others in proportion to their weight, until none is over (at most P rounds). When every pool
    with weight is fixed, the rest of the mass goes to the zero-weight pools in proportion to their
    caps. Feasible whenever Σu >= 1.
    """
    u = np.asarray(u, dtype=np.float64)
    if u.sum() < 1.0 - 1e-9:
        raise MixConfigError(f"caps sum to {u.sum():.4g} < 1: no mixture fits")
    w = np.clip(np.array(w, dtype=np.float64), 0.0, None)
    sums = w.sum(axis=1, keepdims=True)
    w = np.where(sums > 0, w / np.where(sums > 0, sums, 1.0), u / u.sum())
    fixed = np.zeros(w.shape, dtype=bool)
    for _ in range(w.shape[1] + 1):
        over = (w > u + 1e-12) & ~fixed
        if not over.any():
            break
        fixed |= over
        w = np.where(fixed, u, w)
        room = 1.0 - np.where(fixed, w, 0.0).sum(axis=1)
        free_w = np.where(fixed, 0.0, w)
        free_sum = free_w.sum(axis=1)
        free_cap = np.where(fixed, 0.0, u).sum(axis=1)
        by_weight = free_w * (room / np.where(free_sum > 0, free_sum, 1.0))[:, None]
        by_cap = np.where(fixed, 0.0, u) * (room / np.where(free_cap > 0, free_cap, 1.0))[:, None]
        w = np.where(fixed, w, np.where((free_sum > 0)[:, None], by_weight, by_cap))
    return w / w.sum(axis=1, keepdims=True)


def sample_dirichlet(rng: np.random.Generator, natural: np.ndarray, scale_range: tuple[float, float],
                     n: int) -> np.ndarray:
    """`n` mixtures from Dirichlet(scale · P · natural), scale log-uniform in `scale_range` (RegMix).

    The mean of every draw is the natural distribution; small scales give sparse mixtures, large
    scales mixtures close to natural, so the proxies cover both ends.
    """
    p = len(natural)
    lo, hi = scale_range
    scales = np.exp(rng.uniform(math.log(lo), math.log(hi), size=n))
    alpha = np.maximum(scales[:, None] * p * natural[None, :], 1e-3)
    out = rng.gamma(alpha)
    sums = out.sum(axis=1, keepdims=True)
    # A draw of all zeros (every gamma underflowed) becomes the natural mixture.
    zero = sums[:, 0] <= 0
    out[zero] = natural
    sums[zero] = 1.0
    return out / sums


def natural_weights(tokens: np.ndarray) -> np.ndarray:
    tokens = np.asarray(tokens, dtype=np.float64)
    return tokens / tokens.sum()


def write_mix(path: str | Path, pools: Sequence[dict[str, Any]], weights: dict[str, float],
              max_repetition: dict[str, float | None] | float | None, name: str, description: str = "",
              seed: int | None = None) -> Path:
    """Write a mix manifest (`training.data.load_mix` reads it) atomically; pools without weight are left out.

    `pools` are pool records of pools.json (`name`, absolute `manifest`); manifest paths are written
    relative to the mix file, so a mixing output directory can move as a whole.
    """
    path = Path(path)
    by_name = {p["name"]: p for p in pools}
    checked = check_weights(weights, list(by_name), where=name)
    entries = []
    for pool_name, w in checked.items():
        if w <= 0:
            continue
        rep = max_repetition.get(pool_name) if isinstance(max_repetition, dict) else max_repetition
        manifest = Path(by_name[pool_name]["manifest"])
        entries.append({"name": pool_name, "manifest": os.path.relpath(manifest.resolve(), path.parent.resolve()),
                        "weight": round(w, DECIMALS),
                        "max_repetition": None if rep is None else round(float(rep), 6)})
    mix: dict[str, Any] = {"name": name, "pools": entries}
    if description:
        mix["description"] = description
    if seed is not None:
        mix["seed"] = seed
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(mix, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def read_mix_weights(path: str | Path, pools: Sequence[str]) -> dict[str, float]:
    """The weights of a mix manifest over `pools` (absent pools: 0), checked to sum to one."""
    from training.data import load_mix

    specs, _ = load_mix(path)
    raw = {s.name: s.weight for s in specs}
    return check_weights(raw, pools, where=str(path))
