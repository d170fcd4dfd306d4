"""The proxy sweep (`refinery mix sweep CONFIG`): K mixtures, one small trainer run each, one results table.

Mixture 0 is the natural distribution (each pool's share of all tokens); mixture k > 0 is a draw
from a Dirichlet around natural^temperature with a log-uniform concentration scale (RegMix),
projected under the proxies' repetition cap. Mixture k depends only on (seed, k), so raising
`sweep.proxies` later adds proxies without changing the earlier ones.

Layout under OUTPUT/sweep/: `plan.json` (pools, settings and mixtures; a rerun with other settings
is refused), `proxies/p0007/{mix.json, run/, result.json}` and `results.{json,csv}`. A proxy with
an `ok` result.json is never trained again; a failed one is retried once within the sweep and,
failing again, recorded as failed (and tried again by the next `sweep`).
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from proxy_mix.config import MixConfig, MixConfigError
from proxy_mix.mixture import check_feasible, natural_weights, project_to_caps, sample_dirichlet, write_mix
from proxy_mix.proxy import read_result, train_proxy, write_result
from proxy_mix.runner import Result, Task, run_tasks

PLAN_FORMAT = "refinery.sweep/1"
# Proxies' caps are set a little under max_repetition: the loader samples pools row by row, so a pool
# at exactly its cap could run out a few rows early and hand its share to the others.
CAP_MARGIN = 0.95


def sweep_dir(cfg: MixConfig) -> Path:
    return cfg.out / "sweep"


def check_sizes(pools: dict[str, Any], seq_len: int, what: str) -> None:
    for p in pools["pools"]:
        if p["tokens"] < seq_len + 1:
            raise MixConfigError(f"pool {p['name']!r} has {p['tokens']} tokens, fewer than {what}.seq_len + 1 = "
                                 f"{seq_len + 1}; add documents or merge it (web.topics, fewer web.buckets)")
    for t in pools["targets"]:
        if t["tokens"] < seq_len + 1:
            raise MixConfigError(f"target {t['name']!r} has {t['tokens']} tokens, fewer than {what}.seq_len + 1 = "
                                 f"{seq_len + 1}; raise `holdout` or give more text")


def _plan_fingerprint(cfg: MixConfig, pools: dict[str, Any]) -> dict[str, Any]:
    s = cfg.sweep
    return json.loads(json.dumps({"pools": {p["name"]: p["tokens"] for p in pools["pools"]},
            "targets": [t["name"] for t in pools["targets"]],
            "settings": {k: getattr(s, k) for k in ("seed", "model", "tokens", "seq_len", "batch_size", "lr",
                                                     "concentration", "temperature", "max_repetition",
                                                     "eval_batches")}}))  # as read back from plan.json


def plan_mixtures(cfg: MixConfig, pools: dict[str, Any]) -> tuple[list[str], np.ndarray]:
    """Pool names and the K × P matrix of the sweep's mixtures (row 0: natural)."""
    s = cfg.sweep
    names = [p["name"] for p in pools["pools"]]
    tokens = np.array([p["tokens"] for p in pools["pools"]], dtype=np.float64)
    u = check_feasible(tokens, s.tokens, s.max_repetition * CAP_MARGIN, names, "sweep")
    natural = natural_weights(tokens)
    prior = natural ** s.temperature
    prior /= prior.sum()
    rows = [project_to_caps(natural, u)]
    for k in range(1, s.proxies):
        rng = np.random.default_rng([s.seed, k])
        rows.append(project_to_caps(sample_dirichlet(rng, prior, s.concentration, 1)[0], u))
    return names, np.vstack(rows)


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def proxy_task(cfg: MixConfig, pools: dict[str, Any], k: int, weights: dict[str, float], folder: Path,
               *, model: str | dict[str, int], tokens: int, seq_len: int, batch_size: int, lr: float, seed: int, eval_batches: int,
               max_repetition: float, cpus: int, gpus: float, keep_checkpoints: bool) -> Task:
    """A runnable task: the run's mix manifest is written now, the training happens in `train_proxy`."""
    mix = write_mix(folder / "mix.json", pools["pools"], weights, max_repetition, name=folder.name, seed=seed)
    return {"id": k, "name": folder.name, "dir": str(folder), "mix": str(mix), "weights": weights, "model": model,
            "tokens": tokens, "seq_len": seq_len, "batch_size": batch_size, "lr": lr, "seed": seed,
            "eval_batches": eval_batches, "threads": cpus, "device": "cuda" if gpus > 0 else "cpu",
            "keep_checkpoints": keep_checkpoints,
            "targets": [{"name": t["name"], "manifest": t["manifest"]} for t in pools["targets"]]}


def run_sweep(cfg: MixConfig, pools: dict[str, Any], *, executor: str = "ray", address: str | None = None,
              workers: int | None = None, progress: bool = True,
              train_fn: Callable[[Task], Result] = train_proxy,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train every proxy not finished yet; returns the sweep summary (results table paths, counts)."""
    s = cfg.sweep
    check_sizes(pools, s.seq_len, "sweep")
    root = sweep_dir(cfg)
    fingerprint = _plan_fingerprint(cfg, pools)
    plan_path = root / "plan.json"
    if plan_path.is_file():
        old = json.loads(plan_path.read_text())
        if {k: old.get(k) for k in fingerprint} != fingerprint:
            raise MixConfigError(f"{root} holds a sweep planned with other pools, targets or sweep settings; use "
                                 f"another `output` or delete {root} to start over")
    names, mixtures = plan_mixtures(cfg, pools)
    _write_json(plan_path, {"format": PLAN_FORMAT, **fingerprint, "names": names,
                            "mixtures": [[round(float(x), 8) for x in row] for row in mixtures]})
    tasks: list[Task] = []
    skipped = 0
    for k, row in enumerate(mixtures):
        folder = root / "proxies" / f"p{k:04d}"
        weights = {n: float(w) for n, w in zip(names, row, strict=True)}
        done = read_result(folder)
        if done is not None and done.get("status") == "ok":
            skipped += 1
            continue
        tasks.append(proxy_task(cfg, pools, k, weights, folder, model=s.model, tokens=s.tokens, seq_len=s.seq_len,
                                batch_size=s.batch_size, lr=s.lr, seed=s.seed, eval_batches=s.eval_batches,
                                max_repetition=s.max_repetition, cpus=s.cpus_per_proxy, gpus=s.gpus_per_proxy,
                                keep_checkpoints=s.keep_checkpoints))
    log(f"sweep: {len(mixtures)} proxies, {skipped} finished before, {len(tasks)} to train")

    def on_done(task: Task, result: Result) -> None:
        if result.get("status") != "ok":
            write_result(Path(task["dir"]), result)
            log(f"sweep: proxy {task['name']} failed after {result['attempts']} attempts: {result['error'][:300]}")

    t0 = time.perf_counter()
    run_tasks(tasks, train_fn, on_done, executor=executor, address=address, workers=workers,
              cpus=s.cpus_per_proxy, gpus=s.gpus_per_proxy, retries=1, progress=progress)
    wall = time.perf_counter() - t0
    summary = write_results(cfg, names, [t["name"] for t in pools["targets"]], len(mixtures))
    trained = sum(1 for r in summary["proxies"] if r["status"] == "ok") - skipped
    summary.update({"trained_now": max(trained, 0), "skipped": skipped, "wall_seconds": round(wall, 2)})
    if tasks and wall > 0:
        cores = s.cpus_per_proxy if executor == "local" else (workers * s.cpus_per_proxy if workers
                                                               else os.cpu_count() or 1)
        summary["cores"] = cores
        summary["proxies_per_core_hour"] = round(len(tasks) / (wall / 3600) / cores, 2)
    _write_json(root / "summary.json", {k: v for k, v in summary.items() if k != "proxies"})
    return summary


def write_results(cfg: MixConfig, names: list[str], targets: list[str], k: int) -> dict[str, Any]:
    """Collect proxies 0..k-1 into results.json and results.csv (one row per proxy, failed ones too)."""
    root = sweep_dir(cfg)
    rows = []
    for i in range(k):
        r = read_result(root / "proxies" / f"p{i:04d}") or {"id": i, "status": "missing"}
        rows.append(r)
    _write_json(root / "results.json", {"pools": names, "targets": targets, "proxies": rows})
    tmp = root / ".tmp-results.csv"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "status", *(f"w.{n}" for n in names), *(f"loss.{t}" for t in targets),
                    *(f"bpb.{t}" for t in targets), "seconds", "error"])
        for r in rows:
            weights = r.get("realized") or r.get("weights") or {}
            w.writerow([r["id"], r["status"], *(round(weights.get(n, 0.0), 6) for n in names),
                        *(_fmt(r.get("loss", {}).get(t)) for t in targets),
                        *(_fmt(r.get("bpb", {}).get(t)) for t in targets), r.get("seconds", ""), r.get("error", "")])
    os.replace(tmp, root / "results.csv")
    ok = sum(r["status"] == "ok" for r in rows)
    return {"proxies": rows, "total": k, "ok": ok, "failed": sum(r["status"] == "failed" for r in rows),
            "results_json": str(root / "results.json"), "results_csv": str(root / "results.csv")}


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.6f}"


def load_results(cfg: MixConfig) -> dict[str, Any]:
    path = sweep_dir(cfg) / "results.json"
    if not path.is_file():
        raise MixConfigError(f"no sweep results in {sweep_dir(cfg)}; run `refinery mix sweep CONFIG` first")
    return json.loads(path.read_text())
