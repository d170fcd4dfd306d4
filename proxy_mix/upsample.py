"""Quality-aware upsampling (`refinery mix upsample CONFIG`), after OLMo 3 / Olmix.

Each web topic keeps the share of the run a mixture gives it (the searched one by default); inside
the topic, the lowest `drop_bottom` share of its quality buckets is dropped (rounded to whole buckets, one
kept at least) and the kept buckets are
repeated along a curve rising from the lowest kept bucket to the best: `linear` g_k = 1 + (R-1)·k/(m-1)
or `exponential` g_k = R^(k/(m-1)) for kept buckets k = 0..m-1 and R = `max_repetition`. The curve
is scaled so the topic fills its share of the budget, and no bucket repeats more than R times:
bucket k is repeated r_k = min(s·g_k, R) times, s solving Σ_k r_k·T_k = share·B. Named sources keep
their weight. The result is a mix manifest the trainer reads, with each pool's cap.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from proxy_mix.config import MixConfig, MixConfigError
from proxy_mix.mixture import natural_weights, read_mix_weights, write_mix


def curve(m: int, max_repetition: float, shape: str) -> np.ndarray:
    """Relative repetition of m kept buckets, lowest first; the best bucket gets `max_repetition`."""
    if m == 1:
        return np.array([max_repetition])
    k = np.arange(m) / (m - 1)
    if shape == "linear":
        return 1.0 + (max_repetition - 1.0) * k
    return max_repetition ** k


def fill(tokens: np.ndarray, g: np.ndarray, cap: float, want: float) -> np.ndarray:
    """Repetitions r = min(s·g, cap) with Σ r·tokens = want (bisection on s; monotone in s)."""
    most = float(cap * tokens.sum())
    if want > most * (1 + 1e-9):
        raise ValueError(f"{int(want):,} tokens wanted, at most {int(most):,} within the cap")
    lo, hi = 0.0, cap / float(g.min())
    for _ in range(200):
        mid = (lo + hi) / 2
        if float((np.minimum(mid * g, cap) * tokens).sum()) < want:
            lo = mid
        else:
            hi = mid
    return np.minimum(hi * g, cap)


def _topic_shares(cfg: MixConfig, pools: list[dict[str, Any]], mix: str | None) -> tuple[dict[str, float], str]:
    names = [p["name"] for p in pools]
    path = mix or cfg.upsample.mix
    if path is None and (cfg.out / "fit" / "searched.json").is_file():
        path = str(cfg.out / "fit" / "searched.json")
    if path is None:
        tokens = np.array([p["tokens"] for p in pools], dtype=np.float64)
        return dict(zip(names, natural_weights(tokens).tolist(), strict=True)), "natural"
    if not Path(path).is_file():
        raise MixConfigError(f"mixture not found: {path}")
    return read_mix_weights(path, names), str(path)


def run_upsample(cfg: MixConfig, pools_summary: dict[str, Any], mix: str | None = None) -> dict[str, Any]:
    u = cfg.upsample
    pools = pools_summary["pools"]
    web = [p for p in pools if p["kind"] == "web"]
    if not web:
        raise MixConfigError("upsampling needs web pools (topic × quality buckets); the config has only sources")
    weights, origin = _topic_shares(cfg, pools, mix)
    tokens_all = sum(p["tokens"] for p in pools)
    budget = u.budget_tokens or cfg.fit.budget_tokens or tokens_all
    out_weights = {p["name"]: 0.0 for p in pools}
    caps: dict[str, float | None] = {}
    rows = []
    for p in pools:
        if p["kind"] != "web":
            out_weights[p["name"]] = weights[p["name"]]
            caps[p["name"]] = cfg.fit.max_repetition
            rows.append({"pool": p["name"], "topic": None, "bucket": None, "tokens": p["tokens"],
                         "weight": weights[p["name"]], "repetition": weights[p["name"]] * budget / p["tokens"],
                         "kept": True})
    for topic in sorted({p["topic"] for p in web}):
        members = sorted((p for p in web if p["topic"] == topic), key=lambda p: p["bucket"])
        share = sum(weights[p["name"]] for p in members)
        n = len(members)
        dropped = min(n - 1, int(math.floor(u.drop_bottom * n + 0.5)))  # the nearest whole bucket count
        kept = members[dropped:]
        for p in members[:dropped]:
            caps[p["name"]] = None
            rows.append({"pool": p["name"], "topic": topic, "bucket": p["bucket"], "tokens": p["tokens"],
                         "weight": 0.0, "repetition": 0.0, "kept": False})
        if share <= 0:
            continue
        t = np.array([p["tokens"] for p in kept], dtype=np.float64)
        try:
            r = fill(t, curve(len(kept), u.max_repetition, u.curve), u.max_repetition, share * budget)
        except ValueError as e:
            raise MixConfigError(
                f"upsample: topic {topic!r} has {share:.3f} of a {budget:,}-token budget, but its kept buckets "
                f"({', '.join(p['name'] for p in kept)}) cannot fill it: {e}; raise upsample.max_repetition, "
                "lower upsample.drop_bottom or the budget") from None
        for p, rep in zip(kept, r, strict=True):
            w = float(rep) * p["tokens"] / budget
            out_weights[p["name"]] = w
            caps[p["name"]] = u.max_repetition
            rows.append({"pool": p["name"], "topic": topic, "bucket": p["bucket"], "tokens": p["tokens"],
                         "weight": w, "repetition": float(rep), "kept": True})
    total = sum(out_weights.values())
    out_weights = {k: v / total for k, v in out_weights.items()}  # rounding only: shares already sum to one
    out = cfg.out / "upsample"
    manifest = write_mix(out / "upsampled.json", pools, out_weights, caps, name="upsampled",
                         description=f"quality-aware upsampling of {origin} for a {budget:,}-token run")
    report = {"manifest": str(manifest), "from": origin, "budget_tokens": budget, "drop_bottom": u.drop_bottom,
              "max_repetition": u.max_repetition, "curve": u.curve, "pools": rows}
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".tmp-report.json"
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, out / "report.json")
    return report
