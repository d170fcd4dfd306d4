"""Runs a curation config over input files in three resumable phases.

1. shard phase (parallel, one task per input file): read → extract → filters/taggers → dedup
   signals, written to `_work/stage1/<shard>.parquet` with a completion marker;
2. dedup phase (global): each dedup step decides, across all shards, which documents to drop;
3. write phase (parallel): each shard minus the dropped documents becomes the final corpus shard.

Every output appears atomically and is followed by a marker holding that unit's stats, so a
killed run restarts where it stopped: finished shards are skipped, never redone or duplicated.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.config import CurationConfig, validate_buildable
from curation.executor import Executor, make_executor
from curation.registry import DEDUP_STEPS, DOC_STEPS, ConfigError, build
from curation.step import StepStats
from curation.writer import (
    BASE_SCHEMA,
    atomic_write_text,
    clean_tmp,
    write_dolma_table,
    write_parquet_docs,
    write_parquet_table,
)

RUN_FILE = "run.json"


@dataclass(frozen=True)
class RunContext:
    """Everything a shard task needs; small and picklable, shipped to every Ray task."""

    config: dict[str, Any]
    work: str
    output: str
    added: str


@dataclass(frozen=True)
class Shard:
    key: str
    path: str


def shard_key(index: int, path: str) -> str:
    name = Path(path.rstrip("/")).name
    for suffix in (".gz", ".warc", ".arc", ".wet", ".wat", ".txt"):
        name = name.removesuffix(suffix)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return f"{index:05d}-{safe}"


# ---------------------------------------------------------------------------------------------
# phase 1: per-shard steps

_BUILT: dict[str, tuple[Any, list[Any], list[Any]]] = {}


def _build_steps(ctx: RunContext) -> tuple[Any, list[Any], list[Any]]:
    """Build the reader and steps once per process (models load once), fresh stats per shard."""
    from curation.read.warc import WarcReader

    cfg = CurationConfig.from_dict(ctx.config)
    key = cfg.fingerprint() + ctx.added
    if key not in _BUILT:
        reader = WarcReader(source=cfg.source, added=ctx.added,
                            **{**cfg.read, "cache_dir": download_cache(cfg, Path(ctx.work))})
        steps = [build(s.name, s.params, DOC_STEPS) for s in cfg.steps]
        dedups = [build(s.name, s.params, DEDUP_STEPS) for s in cfg.dedup]
        _BUILT.clear()
        _BUILT[key] = (reader, steps, dedups)
    reader, steps, dedups = _BUILT[key]
    reader.stats = StepStats(reader.name)
    for s in steps:
        s.stats = StepStats(s.name)
    return reader, steps, dedups


def process_shard(ctx: RunContext, shard: Shard) -> dict[str, Any]:
    """Phase 1 for one input file. Returns (and records in its marker) the shard's stats."""
    stage1 = Path(ctx.work) / "stage1"
    marker = stage1 / f"{shard.key}.done.json"
    if marker.exists():
        return json.loads(marker.read_text())
    reader, steps, dedups = _build_steps(ctx)

    t0 = time.perf_counter()
    stream: Any = reader.read(shard.path)
    for step in steps:
        stream = step(stream)

    for d in dedups:  # dedup signals only; the decisions are global (phase 2)
        stream = d.run(stream)
    rows = write_parquet_docs(stream, stage1 / f"{shard.key}.parquet", internal=True)
    read_stats = reader.stats
    # The reader's input is records, not documents (its skips are in counters by kind), so its
    # row in the funnel starts at the documents it produced.
    read_stats.docs_in = read_stats.docs_out
    result = {
        "shard": shard.key,
        "path": shard.path,
        "rows": rows,
        "seconds": round(time.perf_counter() - t0, 3),
        "steps": [read_stats.to_dict()] + [s.stats.to_dict() for s in steps],
    }
    if read_stats.errors.get("read.unavailable"):
        # The input could not be opened (a missing file, a failed download): no marker, so a rerun
        # tries it again instead of taking an empty shard as done.
        result["unavailable"] = True
        return result
    atomic_write_text(marker, json.dumps(result))
    return result


# ---------------------------------------------------------------------------------------------
# phase 2: global dedup


def run_dedup(ctx: RunContext, shards: list[str], executor: Executor) -> tuple[pa.Table, list[dict]]:
    """Run each dedup step over all shards; a document drops at the first step that drops it."""
    cfg = CurationConfig.from_dict(ctx.config)
    ddir = Path(ctx.work) / "dedup"
    ddir.mkdir(parents=True, exist_ok=True)
    total = sum(pq.read_metadata(p).num_rows for p in shards)
    dropped_ids: set[str] = set()
    tables: list[pa.Table] = []
    stats: list[dict] = []
    for spec in cfg.dedup:
        out = ddir / f"{spec.name}.parquet"
        marker = ddir / f"{spec.name}.done.json"
        if marker.exists():
            table = pq.read_table(out)
            done = json.loads(marker.read_text())
            seconds, counters = done["seconds"], done.get("counters", {})
        else:
            step = build(spec.name, spec.params, DEDUP_STEPS)
            t0 = time.perf_counter()
            scratch = ddir / f"{spec.name}.scratch"
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir(parents=True)
            table = step.find_duplicates(shards, scratch, executor)
            table = table.select(["id", "reason", "duplicate_of"])
            seconds = time.perf_counter() - t0
            counters = dict(step.stats.counters)
            write_parquet_table(table, out)
            shutil.rmtree(scratch, ignore_errors=True)
            atomic_write_text(marker, json.dumps({"seconds": seconds, "counters": counters}))
        # Only documents not already dropped by an earlier dedup step count for this one.
        if dropped_ids:
            table = table.filter(pc.invert(pc.is_in(table["id"], pa.array(sorted(dropped_ids)))))
        docs_in = total - len(dropped_ids)
        s = StepStats(spec.name, docs_in=docs_in, docs_out=docs_in - table.num_rows, seconds=seconds)
        s.dropped.update(Counter(table["reason"].to_pylist()))
        s.counters.update(counters)
        stats.append(s.to_dict())
        dropped_ids.update(table["id"].to_pylist())
        tables.append(table)
    empty = pa.table({"id": pa.array([], pa.string()), "reason": pa.array([], pa.string()),
                      "duplicate_of": pa.array([], pa.string())})
    return (pa.concat_tables(tables) if tables else empty), stats


# ---------------------------------------------------------------------------------------------
# phase 3: write the corpus


def final_path(ctx: RunContext, shard: Shard, source: str) -> Path:
    cfg = CurationConfig.from_dict(ctx.config)
    ext = "parquet" if cfg.format == "parquet" else "jsonl.gz"
    safe_source = "".join(c if c.isalnum() or c in "-_." else "_" for c in source) or "unknown"
    return Path(ctx.output) / "documents" / safe_source / f"{shard.key}.{ext}"


def write_shard(ctx: RunContext, drops_path: str, shard: Shard) -> dict[str, Any]:
    """Phase 3 for one shard: drop deduplicated documents, strip internal columns, write."""
    marker = Path(ctx.work) / "final" / f"{shard.key}.done.json"
    if marker.exists():
        return json.loads(marker.read_text())
    cfg = CurationConfig.from_dict(ctx.config)
    src = Path(ctx.work) / "stage1" / f"{shard.key}.parquet"
    table = pq.read_table(src, columns=BASE_SCHEMA.names)
    if drops_path:
        drop_ids = pq.read_table(drops_path, columns=["id"])["id"]
        table = table.filter(pc.invert(pc.is_in(table["id"], drop_ids)))
    langs: Counter = Counter()
    chars = 0
    for meta, text in zip(table["metadata"].to_pylist(), table["text"].to_pylist(), strict=True):
        langs[(orjson.loads(meta) if meta else {}).get("lang", "unknown")] += 1
        chars += len(text)
    if table.num_rows:
        out = final_path(ctx, shard, cfg.source)
        if cfg.format == "parquet":
            write_parquet_table(table, out)
        else:
            write_dolma_table(table, out)
    result = {"shard": shard.key, "rows": table.num_rows, "chars": chars, "languages": dict(langs)}
    atomic_write_text(marker, json.dumps(result))
    return result


# ---------------------------------------------------------------------------------------------
# driver


def download_cache(cfg: CurationConfig, work: Path) -> str:
    """Where remote inputs (listings and archives alike) are downloaded: `read.cache_dir`, else
    inside the run's work folder."""
    return str(cfg.read.get("cache_dir") or work / "download_cache")


def _start_or_resume(work: Path, cfg: CurationConfig, paths: list[str]) -> dict[str, Any]:
    run_file = work / RUN_FILE
    if run_file.exists():
        run = json.loads(run_file.read_text())
        if run["fingerprint"] != cfg.fingerprint() or run["inputs"] != paths:
            raise ConfigError(
                f"{work.parent} holds a run with a different config or inputs; "
                "use another --output or delete it to start over"
            )
        return run
    run = {
        "fingerprint": cfg.fingerprint(),
        "inputs": paths,
        # One timestamp for the whole run, reused on resume, so a resumed run is byte-identical.
        "added": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z"),
        "config": cfg.to_dict(),
    }
    atomic_write_text(run_file, json.dumps(run, indent=1))
    return run


def curate(
    config: CurationConfig | str | Path,
    inputs: list[str],
    output: str | Path,
    executor: str = "local",
    ray_address: str | None = None,
    output_format: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Curate `inputs` (paths, globs, listings, URLs) into `output`; returns the stats dict."""
    from curation.read.inputs import expand_inputs
    from curation.report import write_report

    cfg = config if isinstance(config, CurationConfig) else CurationConfig.load(config)
    if output_format:  # on a copy: the caller's config stays as it was
        cfg = CurationConfig.from_dict({**cfg.to_dict(), "output": {**cfg.output, "format": output_format}})
    validate_buildable(cfg)
    output = Path(output)
    work = output / "_work"
    work.mkdir(parents=True, exist_ok=True)
    paths = expand_inputs(inputs, cache_dir=download_cache(cfg, work))
    run = _start_or_resume(work, cfg, paths)
    clean_tmp(output)
    ctx = RunContext(config=cfg.to_dict(), work=str(work), output=str(output), added=run["added"])
    shards = [Shard(shard_key(i, p), p) for i, p in enumerate(paths)]

    t0 = time.perf_counter()
    ex = make_executor(executor, ray_address=ray_address, progress=progress)
    try:
        shard_results = ex.map(partial(process_shard, ctx), shards, desc="extract + filter")
        stage1 = [str(work / "stage1" / f"{s.key}.parquet") for s, r in zip(shards, shard_results, strict=True)
                  if r["rows"]]
        drops, dedup_stats = run_dedup(ctx, stage1, ex) if cfg.dedup and stage1 else (None, [])
        drops_path = str(work / "dedup" / "dropped.parquet") if drops is not None else ""
        if drops is not None:
            write_parquet_table(drops, Path(drops_path))
        nonempty = [s for s, r in zip(shards, shard_results, strict=True) if r["rows"]]
        final_results = ex.map(partial(write_shard, ctx, drops_path), nonempty, desc="write")
    finally:
        ex.shutdown()
    stats = assemble_stats(cfg, shard_results, dedup_stats, final_results, time.perf_counter() - t0, executor)
    atomic_write_text(output / "stats.json", json.dumps(stats, indent=1))
    write_report(stats, output)
    return stats


def assemble_stats(cfg: CurationConfig, shard_results: list[dict], dedup_stats: list[dict],
                   final_results: list[dict], wall: float, executor: str) -> dict[str, Any]:
    merged: dict[str, StepStats] = {}
    order: list[str] = []
    for r in shard_results:
        for d in r["steps"]:
            s = StepStats.from_dict(d)
            if s.name not in merged:
                merged[s.name] = StepStats(s.name)
                order.append(s.name)
            merged[s.name].merge(s)
    steps = [merged[n].to_dict() for n in order] + dedup_stats
    langs: Counter = Counter()
    for r in final_results:
        langs.update(r["languages"])
    kept = sum(r["rows"] for r in final_results)
    return {
        "name": cfg.name,
        "format": cfg.format,
        "executor": executor,
        "input_files": len(shard_results),
        "documents_read": steps[0]["docs_out"] if steps else 0,
        "documents_written": kept,
        "characters_written": sum(r["chars"] for r in final_results),
        "wall_seconds": round(wall, 2),
        "steps": steps,
        # Inputs that could not be opened; a rerun of the same command retries exactly these.
        "inputs_unavailable": [r["path"] for r in shard_results if r.get("unavailable")],
        "languages": dict(langs.most_common()),
        "shards": [{"shard": r["shard"], "path": r["path"], "rows_after_filters": r["rows"]}
                   for r in shard_results],
    }
