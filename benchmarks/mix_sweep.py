"""The mixing guide end to end from the CLI: classifiers, pools, a 64-proxy sweep on Ray, fit, upsample, validate.

Runs every command of docs/mixing.md on `pipelines/configs/mix.yaml` (paths moved under --work), in
fresh processes, and times each. Also measures the sweep's scaling from 1 to 2 Ray workers on a
smaller sweep over the same pools. Prints the table for docs/benchmarks.md and writes JSON to --out.

    .venv/bin/python benchmarks/mix_sweep.py --out results/mix_sweep.json       # ~40 min on 2 quiet cores
    .venv/bin/python benchmarks/mix_sweep.py --quick --work /tmp/mixq          # smoke run, ~3 min

Expected runtime of the full run on 2 quiet cores: classifiers + tokenizer + pools ~1 min; scaling
(4 proxies on 1 worker, then on 2) ~4 min; the 64-proxy sweep (1m model, 250k tokens each, 2
workers; measured 18 s of wall per proxy) ~19 min; seed noise (3 proxies) ~2 min; fit < 1 min;
validation (4 runs of a ~3M model, 250k tokens) ~8 min. 32 proxies rank held-out mixtures at
k-fold Spearman 0.75 and the searched mixture's win is within noise; 64 reach 0.81 and a clear win
(docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Run `refinery CMD...` in a fresh process; returns (seconds, stdout); a failure stops the benchmark."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "pipelines.cli", "-q", *cmd], cwd=REPO, env=env, capture_output=True,
                       text=True)
    seconds = time.perf_counter() - t0
    print(f"  {' '.join(cmd[:3])}: {seconds:.1f} s", flush=True)
    if p.returncode != 0:
        sys.exit(f"refinery {' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return seconds, p.stdout


def config(work: Path, data: Path, proxies: int, tokens: int, quick: bool, **sweep: Any) -> dict[str, Any]:
    cfg = yaml.safe_load((REPO / "pipelines/configs/mix.yaml").read_text())
    cfg["output"] = str(work / "mix")
    cfg["tokenizer"] = str(work / "tokenizer/tokenizer.json")
    cfg["web"]["quality_model"] = str(work / "classifiers/quality")
    cfg["web"]["topic_model"] = str(work / "classifiers/topic")
    shared = "../shared/data"

    def move(p: str) -> str:
        return str(data / p[len(shared) + 1:]) if p.startswith(shared) else p

    cfg["web"]["corpus"] = [move(p) for p in cfg["web"]["corpus"]]
    for section in (*cfg["sources"], *cfg["targets"]):
        if section.get("paths"):
            section["paths"] = [move(p) for p in section["paths"]]
    cfg["sweep"].update({"proxies": proxies, "tokens": tokens, **sweep})
    if quick:
        cfg["sweep"].update({"seq_len": 64, "batch_size": 8, "eval_batches": 2})
        cfg["fit"].update({"candidates": 5000, "top_k": 20, "folds": 3, "budget_tokens": 1_000_000})
        cfg["validate"].update({"tokens": tokens, "seq_len": 64, "batch_size": 8, "eval_batches": 2})
    return cfg


def seed_noise(cfg_path: Path, seeds: int, workers: int) -> dict[str, Any]:
    """Train proxy 0's mixture again with `seeds` other seeds: the spread of one mixture's objective
    across seeds against the spread across the sweep's mixtures bounds the Spearman any fit can reach."""
    from proxy_mix.config import load_config
    from proxy_mix.proxy import train_proxy
    from proxy_mix.runner import run_tasks
    from proxy_mix.sweep import proxy_task

    cfg = load_config(cfg_path)
    s = cfg.sweep
    pools = json.loads((cfg.out / "pools/pools.json").read_text())
    swept = json.loads((cfg.out / "sweep/results.json").read_text())
    ok = [r for r in swept["proxies"] if r.get("status") == "ok"]
    base = ok[0]
    tasks = [proxy_task(cfg, pools, 0, base["weights"], cfg.out / "noise" / f"seed{s.seed + i}", model=s.model,
                        tokens=s.tokens, seq_len=s.seq_len, batch_size=s.batch_size, lr=s.lr, seed=s.seed + i,
                        eval_batches=s.eval_batches, max_repetition=s.max_repetition, cpus=s.cpus_per_proxy,
                        gpus=s.gpus_per_proxy, keep_checkpoints=False) for i in range(1, seeds + 1)]
    results: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    run_tasks(tasks, train_proxy, lambda _t, r: results.append(r), executor="ray", workers=workers,
              cpus=s.cpus_per_proxy, progress=False)
    print(f"  {seeds} seeds of proxy 0: {time.perf_counter() - t0:.1f} s", flush=True)

    def objective(r: dict[str, Any]) -> float:
        return sum(r["bpb"].values()) / len(r["bpb"])

    same = [objective(base)] + [objective(r) for r in results if r.get("status") == "ok"]
    across = [objective(r) for r in ok]
    sd_seed, sd_mix = statistics.stdev(same), statistics.pstdev(across)
    # y = f(w) + noise: even a perfect fit of f correlates with y at most sd(f)/sd(y) (Pearson).
    ceiling = math.sqrt(max(sd_mix ** 2 - sd_seed ** 2, 0.0)) / sd_mix if sd_mix else 0.0
    per_target = {t: statistics.stdev([base["bpb"][t]] + [r["bpb"][t] for r in results if r.get("status") == "ok"])
                  for t in base["bpb"]}
    return {"seeds": len(same), "objective_sd_across_seeds": round(sd_seed, 4),
            "objective_sd_across_mixtures": round(sd_mix, 4), "correlation_ceiling": round(ceiling, 3),
            "target_sd_across_seeds": {t: round(v, 4) for t, v in per_target.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="runs/bench_mix", help="working directory (pools, sweeps, models)")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--proxies", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=250_000, help="training tokens per proxy")
    ap.add_argument("--workers", type=int, default=2, help="Ray workers of the main sweep and the validation")
    ap.add_argument("--scaling-proxies", type=int, default=4, help="proxies of the 1-vs-2-worker runs (0: skip)")
    ap.add_argument("--noise-seeds", type=int, default=3, help="reruns of proxy 0 with other seeds (0: skip)")
    ap.add_argument("--only-noise", action="store_true", help="only the seed-noise runs, on an existing --work")
    ap.add_argument("--quick", action="store_true", help="6 proxies of 8k tokens: checks the benchmark runs")
    ap.add_argument("--out", default=None, help="JSON results file")
    args = ap.parse_args()
    if args.quick:
        args.proxies, args.tokens, args.scaling_proxies, args.noise_seeds = 6, 8192, 2, 2
    work, data = Path(args.work).resolve(), Path(args.data).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    os.environ.update({"RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"})
    times: dict[str, float] = {}
    if args.only_noise:
        print(json.dumps(seed_noise(work / "mix.yaml", args.noise_seeds, args.workers), indent=1))
        return

    print("classifiers and tokenizer", flush=True)
    per_source = ["--max-per-source", "500"] if args.quick else []
    for kind in ("quality", "topic"):
        times[f"classify_{kind}"], out = run(["classify", "train", "--kind", kind, "-o",
                                              str(work / "classifiers" / kind), "--data", str(data), *per_source], env)
        print("   ", out.strip())
    times["tokenizer"], _ = run(["tokenizer", "train", "-i", str(data / "text/wikitext2/valid.txt"),
                                 str(data / "web_text/c4_en_sample/c4_en_train_first1000.jsonl"), "--vocab-size",
                                 "4096", "-o", str(work / "tokenizer/tokenizer.json")], env)
    main_cfg = work / "mix.yaml"
    main_cfg.write_text(yaml.safe_dump(config(work, data, args.proxies, args.tokens, args.quick), sort_keys=False))
    print("pools", flush=True)
    times["pools"], out = run(["mix", "pools", str(main_cfg)], env)
    print(out)
    pools = json.loads((work / "mix/pools/pools.json").read_text())

    scaling: dict[str, Any] = {}
    if args.scaling_proxies:
        print(f"scaling: {args.scaling_proxies} proxies on 1 worker, then 2", flush=True)
        for workers in (1, 2):
            sub = work / f"scale{workers}"
            sub.mkdir(exist_ok=True)
            cfg = config(work, data, args.scaling_proxies, args.tokens, args.quick)
            cfg["output"] = str(sub)
            if not (sub / "pools").exists():
                (sub / "pools").symlink_to(work / "mix/pools")  # the same pools, tokenized once
            path = sub / "mix.yaml"
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            seconds, _ = run(["mix", "sweep", str(path), "--workers", str(workers)], env)
            scaling[f"{workers}_worker_seconds"] = round(seconds, 1)
        scaling["speedup"] = round(scaling["1_worker_seconds"] / scaling["2_worker_seconds"], 2)

    print(f"sweep: {args.proxies} proxies on {args.workers} workers", flush=True)
    times["sweep"], out = run(["mix", "sweep", str(main_cfg), "--workers", str(args.workers)], env)
    sweep = json.loads((work / "mix/sweep/summary.json").read_text())
    print("fit", flush=True)
    noise = seed_noise(main_cfg, args.noise_seeds, args.workers) if args.noise_seeds else {}
    times["fit"], out = run(["mix", "fit", str(main_cfg)], env)
    fit = json.loads((work / "mix/fit/report.json").read_text())
    times["upsample"], _ = run(["mix", "upsample", str(main_cfg)], env)
    print("validate", flush=True)
    times["validate"], out = run(["mix", "validate", str(main_cfg), "--workers", str(args.workers)], env)
    validate = json.loads((work / "mix/validate/report.json").read_text())

    s = fit["summary"]
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "settings": {"proxies": args.proxies, "tokens_per_proxy": args.tokens, "workers": args.workers,
                     "pools": len(pools["pools"]), "targets": [t["name"] for t in pools["targets"]]},
        "seconds": {k: round(v, 1) for k, v in times.items()},
        "sweep": {k: sweep.get(k) for k in ("ok", "failed", "wall_seconds", "proxies_per_core_hour", "cores")},
        "scaling": scaling,
        "seed_noise": noise,
        "fit": {"kfold_spearman": s["kfold_spearman"], "kfold_mae": s["kfold_mae"], "chosen": s["chosen_model"],
                "predicted_bpb": s["predicted_bpb"], "weights": fit["weights"]},
        "validate": {"model": validate["model"], "tokens": validate["tokens"], "verdict": validate["verdict"],
                     "objective": {k: r["objective"] for k, r in validate["mixtures"].items()}},
    }
    print()
    print("| pools | proxies | sweep wall | proxies / core-hour | 1→2 workers | k-fold Spearman "
          "(lightgbm / loglinear / linear) |")
    print("|---:|---:|---:|---:|---:|---|")
    sp = s["kfold_spearman"]
    print(f"| {len(pools['pools'])} | {sweep['ok']}/{args.proxies} | {sweep['wall_seconds']} s | "
          f"{sweep.get('proxies_per_core_hour')} | {scaling.get('speedup', 'n/a')}× | "
          + " / ".join("n/a" if sp[m] is None else f"{sp[m]:.3f}" for m in ("lightgbm", "loglinear", "linear"))
          + " |")
    print()
    print(validate["table"])
    if args.out:
        out_path = Path(args.out)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"\nwritten to {out_path}")


if __name__ == "__main__":
    main()
