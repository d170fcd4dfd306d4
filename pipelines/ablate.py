"""The data-quality proof (`refinery ablate CONFIG`, and the `ablate` stage of `refinery run`).

Equal models trained on an equal token budget from three corpora made of the same WARCs:

    raw       the extracted text with no filter and no dedup (a curation run with only `extract`)
    curated   the curated corpus (every filter, dedup), as the curate stage wrote it
    mixed     the curated corpus classified, mixed with the other sources by the searched mixture and
              upsampled by quality (the mix stage's manifest, what `pretrain` trains on)

each over several seeds, then held-out bits per byte on the mix's targets (clean reference text and a
held-out slice of the web that no arm trains on). Every run is a proxy run (`proxy_mix.proxy.train_proxy`,
a `refinery train pretrain` run plus evaluation), as Ray tasks or in this process; a finished run keeps
its result.json and is not retrained.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.run import RunConfigError, StageContext

ARMS = ("raw", "curated", "mixed")
ARM_TITLES = {"raw": "(a) raw extracted text, no filters", "curated": "(b) curated corpus",
              "mixed": "(c) curated + mixed + upsampled"}


def raw_curation_config(ctx: StageContext) -> dict[str, Any]:
    """The curate stage's config reduced to reading and extraction: no filter, no dedup."""
    from pipelines.stages import curation_config

    base = curation_config(ctx)
    extract = [s for s in base["steps"] if "extract" in s]
    return {**base, "name": f"{base['name']}-raw", "steps": extract or [{"extract": {}}], "dedup": [],
            "after_dedup": []}


def _tokenize(corpus: Path, tokenizer: Path, out: Path) -> dict[str, Any]:
    from curation.executor import LocalExecutor
    from curation.tokenize import tokenize_corpus

    manifest = tokenize_corpus(corpus, tokenizer, out, executor=LocalExecutor(progress=False))
    if manifest.get("failed"):
        raise RunConfigError(f"ablate: tokenizing {corpus} failed: {manifest['failed'][0]}")
    return manifest


def run_ablate_stage(ctx: StageContext) -> dict[str, Any]:
    from curation.pipeline import curate
    from pipelines.stages import _write_json, _write_yaml, resolve_inputs, tokenizer_path
    from proxy_mix.proxy import read_result, train_proxy, write_result
    from proxy_mix.runner import run_tasks

    s = ctx.section
    seeds = [int(x) for x in s.get("seeds", [0, 1])]
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise RunConfigError(f"ablate.seeds must list at least 2 different seeds (the spread), got {seeds}")
    mix = ctx.summaries.get("mix") or {}
    if not mix.get("manifest"):
        raise RunConfigError("ablate needs the mix stage's manifest; rerun with --from mix")

    # (a) raw text: a second curation of the same inputs, extraction only.
    raw_config = _write_yaml(ctx.dir / "raw_curate.yaml", raw_curation_config(ctx))
    raw_stats = curate(raw_config, resolve_inputs(ctx), ctx.dir / "raw_corpus", executor=s.get("curate_executor", "local"),
                       progress=ctx.progress)
    tok = tokenizer_path(ctx)
    manifests = {"raw": _tokenize(ctx.dir / "raw_corpus", tok, ctx.dir / "tokens" / "raw"),
                 "curated": _tokenize(ctx.out / "curate" / "corpus", tok, ctx.dir / "tokens" / "curated")}
    mixes = {"raw": str(ctx.dir / "tokens" / "raw" / "manifest.json"),
             "curated": str(ctx.dir / "tokens" / "curated" / "manifest.json"), "mixed": mix["manifest"]}
    targets = [{"name": name, "manifest": path} for name, path in mix["targets"].items()]
    tokens = int(s.get("tokens", 150_000))
    tasks = []
    for arm in ARMS:
        for seed in seeds:
            folder = ctx.dir / "runs" / f"{arm}-seed{seed}"
            done = read_result(folder)
            if done is not None and done.get("status") == "ok":
                continue
            tasks.append({"id": len(tasks), "name": folder.name, "dir": str(folder), "mix": mixes[arm], "weights": {},
                          "model": s.get("model", "1m"), "tokens": tokens, "seq_len": int(s.get("seq_len", 128)),
                          "batch_size": int(s.get("batch_size", 16)), "lr": float(s.get("lr", 3e-3)), "seed": seed,
                          "eval_batches": int(s.get("eval_batches", 8)), "threads": 1, "device": "cpu",
                          "keep_checkpoints": False, "targets": targets})

    def on_done(task: dict[str, Any], result: dict[str, Any]) -> None:
        if result.get("status") != "ok":
            write_result(Path(task["dir"]), result)

    executor = s.get("executor", "ray")
    if executor == "ray":
        from curation.executor import check_ray_address

        check_ray_address(s.get("ray_address"))
    run_tasks(tasks, train_proxy, on_done, executor=executor, address=s.get("ray_address"),
              workers=s.get("workers"), cpus=1, retries=1, progress=ctx.progress)
    runs = {arm: [read_result(ctx.dir / "runs" / f"{arm}-seed{seed}") or {"status": "missing"} for seed in seeds]
            for arm in ARMS}
    failed = [f"{arm} seed {seed}: {r.get('error', r['status'])}" for arm in ARMS
              for seed, r in zip(seeds, runs[arm], strict=True) if r["status"] != "ok"]
    if failed:
        raise RunConfigError(f"ablate: {len(failed)} runs failed ({failed[0][:300]}); rerun to retry them")
    available = {"raw": manifests["raw"]["total_tokens"], "curated": manifests["curated"]["total_tokens"],
                 "mixed": mix.get("tokens")}
    pools = json.loads((ctx.out / "mix" / "pools" / "pools.json").read_text())["pools"]
    documents = {"raw": raw_stats["documents_written"],
                 "curated": (ctx.summaries.get("curate") or {}).get("documents_written"),
                 "mixed": sum(p["documents"] for p in pools)}
    report = ablation_report(runs, [t["name"] for t in targets], seeds, tokens, s.get("model", "1m"), available,
                             documents)
    _write_json(ctx.dir / "report.json", report)
    tmp = ctx.dir / ".tmp-report.md"
    tmp.write_text(report["markdown"] + "\n")
    os.replace(tmp, ctx.dir / "report.md")
    return {k: v for k, v in report.items() if k != "markdown"} | {"report": str(ctx.dir / "report.md")}


def _stats(values: list[float]) -> dict[str, Any]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
            "min": float(a.min()), "max": float(a.max()), "values": [float(v) for v in a]}


def ablation_report(runs: dict[str, list[dict[str, Any]]], targets: list[str], seeds: list[int], tokens: int,
                    model: Any, available: dict[str, Any], documents: dict[str, Any]) -> dict[str, Any]:
    """Per arm and target: bits per byte over the seeds (mean, sample std, range), and the mean over targets."""
    table: dict[str, dict[str, Any]] = {}
    objective: dict[str, Any] = {}
    for arm in ARMS:
        table[arm] = {t: _stats([r["bpb"][t] if r["bpb"].get(t) is not None else r["loss"][t] for r in runs[arm]])
                      for t in targets}
        objective[arm] = _stats([float(np.mean([r["bpb"][t] for t in targets])) for r in runs[arm]])
    params = next((r.get("params") for r in runs["raw"] if r.get("params")), None)
    lines = [f"Equal models ({model}, {params:,} parameters), {tokens:,} training tokens each, seeds {seeds}; "
             f"held-out bits per byte (lower is better), mean ± sample std over seeds [min–max].", "",
             "| corpus | documents | tokens available | " + " | ".join(targets) + " | mean |",
             "|---|---:|---:|" + "---:|" * (len(targets) + 1)]
    for arm in ARMS:
        cells = [_cell(table[arm][t]) for t in targets] + [_cell(objective[arm])]
        docs = documents.get(arm)
        avail = available.get(arm)
        lines.append(f"| {ARM_TITLES[arm]} | {'-' if docs is None else f'{docs:,}'} | "
                     f"{'-' if avail is None else f'{avail:,}'} | " + " | ".join(cells) + " |")
    best = min(ARMS, key=lambda a: objective[a]["mean"])
    lines += ["", verdict(objective, best)]
    return {"seeds": seeds, "tokens": tokens, "model": model, "params": params, "targets": targets, "table": table,
            "objective": objective, "best": best, "available_tokens": available, "documents": documents,
            "markdown": "\n".join(lines)}


def _cell(st: dict[str, Any]) -> str:
    return f"{st['mean']:.4f} ± {st['std']:.4f} [{st['min']:.4f}–{st['max']:.4f}]"


def verdict(objective: dict[str, Any], best: str) -> str:
    """One sentence: which corpus wins on the mean over targets, and whether the seeds' ranges separate it."""
    others = [a for a in ARMS if a != best]
    separated = [a for a in others if objective[best]["max"] < objective[a]["min"]]
    gaps = ", ".join(f"{a} by {objective[a]['mean'] - objective[best]['mean']:.4f}" for a in others)
    spread = ("its seeds' range is below every other corpus's" if len(separated) == len(others) else
              "but the seeds' ranges overlap with " + ", ".join(a for a in others if a not in separated))
    return f"Lowest mean held-out bits per byte: {best} (beats {gaps}); {spread}."


def run_ablate(config: str | Path | None, *, output: str | Path | None = None, inputs: list[str] | None = None,
               data: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """`refinery ablate CONFIG`: the stages the ablation reads (skipped when done), then the ablation."""
    from pipelines.run import run_pipeline

    result = run_pipeline(config, output=output, inputs=inputs, data=data, only=["ablate"], progress=progress,
                          print_summary=False)
    return result["summaries"]["ablate"]


def markdown_of(summary: dict[str, Any]) -> str:
    path = Path(summary["report"])
    return path.read_text() if path.is_file() else json.dumps(summary, indent=1)


__all__ = ["ARMS", "run_ablate_stage", "run_ablate", "ablation_report", "verdict", "markdown_of"]
