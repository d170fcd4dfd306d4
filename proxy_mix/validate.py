"""Validation (`refinery mix validate CONFIG`): does the searched mixture beat natural and uniform?

A model larger than the proxies (`validate.model`) is trained at equal tokens on each mixture named
in `validate.mixtures` (`searched`, `natural`, `uniform` from the fit, `upsampled` from upsampling)
plus any given as NAME=PATH, each as a Ray task like a proxy, and evaluated on every target set.
Each mixture is first projected under the repetition cap for `validate.tokens` (the fit's caps were
for its planned budget). Runs with a finished `result.json` for the same weights are not redone.
Written: `validate/report.json` and `validate/report.md`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from proxy_mix.config import MixConfig, MixConfigError
from proxy_mix.mixture import check_feasible, project_to_caps, read_mix_weights
from proxy_mix.proxy import read_result, train_proxy, write_result
from proxy_mix.runner import Result, Task, run_tasks
from proxy_mix.sweep import check_sizes, proxy_task

BUILTIN = {"searched": "fit/searched.json", "natural": "fit/natural.json", "uniform": "fit/uniform.json",
           "upsampled": "upsample/upsampled.json"}


def _mixture_paths(cfg: MixConfig, extra: dict[str, str], log: Callable[[str], None]) -> dict[str, Path]:
    paths: dict[str, Path] = {}
    for name in cfg.validate.mixtures:
        if name not in BUILTIN:
            raise MixConfigError(f"validate.mixtures names {name!r}; known: {list(BUILTIN)} (give others with "
                                 "--mix NAME=PATH)")
        path = cfg.out / BUILTIN[name]
        if not path.is_file():
            step = "upsample" if name == "upsampled" else "fit"
            if name == "upsampled":
                log(f"validate: no {path} (run `refinery mix {step}`); the upsampled mixture is left out")
                continue
            raise MixConfigError(f"validate: {path} not found; run `refinery mix {step} CONFIG` first")
        paths[name] = path
    for name, p in extra.items():
        if name in paths:
            raise MixConfigError(f"--mix {name}=... clashes with the built-in mixture {name!r}; rename it")
        if not Path(p).is_file():
            raise MixConfigError(f"--mix {name}: mixture not found: {p}")
        paths[name] = Path(p)
    return paths


def run_validate(cfg: MixConfig, pools: dict[str, Any], *, extra: dict[str, str] | None = None,
                 executor: str = "ray", address: str | None = None, workers: int | None = None,
                 progress: bool = True, train_fn: Callable[[Task], Result] = train_proxy,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    v = cfg.validate
    check_sizes(pools, v.seq_len, "validate")
    names = [p["name"] for p in pools["pools"]]
    tokens = np.array([p["tokens"] for p in pools["pools"]], dtype=np.float64)
    u = check_feasible(tokens, v.tokens, v.max_repetition, names, "validate")
    root = cfg.out / "validate"
    tasks, planned = [], {}
    for i, (name, path) in enumerate(_mixture_paths(cfg, extra or {}, log).items()):
        raw = read_mix_weights(path, names)
        w = project_to_caps(np.array([raw[n] for n in names]), u)
        weights = {n: float(x) for n, x in zip(names, w, strict=True)}
        planned[name] = {"source": str(path), "weights": weights,
                         "moved_by_caps": float(np.abs(w - np.array([raw[n] for n in names])).sum() / 2)}
        folder = root / name
        done = read_result(folder)
        if done is not None and done.get("status") == "ok" and _same(done.get("weights", {}), weights):
            continue
        if (folder / "run").exists():  # a run for other weights (a refit): start it over
            shutil.rmtree(folder / "run")
        task = proxy_task(cfg, pools, i, weights, folder, model=v.model, tokens=v.tokens, seq_len=v.seq_len,
                          batch_size=v.batch_size, lr=v.lr, seed=v.seed, eval_batches=v.eval_batches,
                          max_repetition=v.max_repetition, cpus=v.cpus_per_run, gpus=v.gpus_per_run,
                          keep_checkpoints=True)
        tasks.append(task)
    log(f"validate: {len(planned)} mixtures, {len(tasks)} to train ({v.model}, {v.tokens:,} tokens each)")

    def on_done(task: Task, result: Result) -> None:
        if result.get("status") != "ok":
            write_result(Path(task["dir"]), result)

    run_tasks(tasks, train_fn, on_done, executor=executor, address=address, workers=workers, cpus=v.cpus_per_run,
              gpus=v.gpus_per_run, retries=1, progress=progress)
    targets = [t["name"] for t in pools["targets"]]
    objective = cfg.fit.targets or targets
    results = {}
    for name in planned:
        r = read_result(root / name) or {"status": "missing"}
        results[name] = {**planned[name], "status": r["status"], "bpb": r.get("bpb"), "loss": r.get("loss"),
                         "error": r.get("error"),
                         "objective": (float(np.mean([r["bpb"][t] for t in objective])) if r.get("status") == "ok"
                                       else None)}
    ok = {k: r["objective"] for k, r in results.items() if r["objective"] is not None}
    best = min(ok, key=ok.get) if ok else None
    report = {"model": v.model, "tokens": v.tokens, "targets": targets, "objective_targets": objective,
              "mixtures": results, "best": best, "failed": sum(r["status"] != "ok" for r in results.values())}
    report["verdict"] = _verdict(results)
    report["table"] = _table(report)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / ".tmp-report.json"
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, root / "report.json")
    (root / "report.md").write_text(report["table"] + "\n")
    return report


def _same(a: dict[str, float], b: dict[str, float]) -> bool:
    return set(a) == set(b) and all(abs(a[k] - b[k]) < 1e-7 for k in a)


def _verdict(results: dict[str, Any]) -> str:
    s = results.get("searched", {}).get("objective")
    if s is None:
        return "no searched mixture was validated"
    others = {k: r["objective"] for k, r in results.items() if k in ("natural", "uniform") and r["objective"]}
    if not others:
        return "no natural or uniform run to compare with"
    lost = [k for k, o in others.items() if o <= s]
    if not lost:
        return "searched beats " + " and ".join(f"{k} by {others[k] - s:.4f} bpb" for k in others)
    return "searched does NOT beat " + " and ".join(f"{k} ({others[k]:.4f} <= {s:.4f} bpb)" for k in lost)


def _table(report: dict[str, Any]) -> str:
    targets = report["targets"]
    model = report["model"]
    if isinstance(model, dict):
        model = ", ".join(f"{k} {v}" for k, v in model.items())
    lines = [f"# Validation: model {model} at {report['tokens']:,} tokens (bits per byte, lower is better)", "",
             "| mixture | " + " | ".join(targets) + " | objective |", "|---" * (len(targets) + 2) + "|"]
    for name, r in report["mixtures"].items():
        if r["status"] != "ok":
            lines.append(f"| {name} | " + " | ".join("—" for _ in targets) + f" | {r['status']}: {r['error']} |")
            continue
        cells = [f"{r['bpb'][t]:.4f}" for t in targets]
        lines.append(f"| {name}{' (best)' if name == report['best'] else ''} | " + " | ".join(cells)
                     + f" | {r['objective']:.4f} |")
    lines += ["", report["verdict"]]
    return "\n".join(lines)
