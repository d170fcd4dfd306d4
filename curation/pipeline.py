"""Runs a curation config over input files in three resumable phases.

1. shard phase (parallel, one task per input file): read → extract → filters/taggers → dedup
   signals, written to `_work/stage1/<shard>.parquet` with a completion marker;
2. dedup phase (global): each dedup step decides, across all shards, which documents to drop;
3. write phase (parallel): each shard minus the dropped documents runs the `after_dedup` steps (taggers
   that should only see survivors) and is written to `documents/`, one file per partition folder
   (`output.partition_by`, see curation/partition.py).

With `keep_rejected`, every dropped document is kept too: phase 1 streams its shard's drops to
`_work/rejected1/`, the write phase adds dedup's and the after_dedup steps' drops and writes
`rejected/<source>/<shard>` beside the corpus (curation/rejected.py).

Every output appears atomically and is followed by a marker holding that unit's stats, so a
killed run restarts where it stopped: finished shards are skipped, never redone or duplicated.

The output directory belongs to one run (see "The output-directory contract" in
docs/decisions.md): a lock keeps a second run out while one works; `_work/run.json` pins the
config and inputs, and a run over results it cannot account for is refused unless `overwrite`.
Markers carry what they were made from (an input's size and mtime; a digest of all phase-1
shards for dedup and write), so an input changed at the same path is redone, and so is every
global result that depended on it.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.config import CurationConfig, validate_buildable
from curation.corpus import DOCUMENTS_DIR, RUN_FILE, STATS_FILE, WORK_DIR
from curation.dedup.cluster import DROP_SCHEMA
from curation.document import Document
from curation.executor import Executor, make_executor
from curation.partition import PartitionedWriter, Partitioner, path_safe
from curation.registry import DEDUP_STEPS, DOC_STEPS, ConfigError, build, build_reader, phase_resources
from curation.rejected import REJECTED_DIR, RejectSink, mark_rejected, rejection
from curation.step import Step, StepStats, batched, built_once
from curation.writer import (
    BASE_SCHEMA,
    atomic_write_text,
    clean_tmp,
    documents_table,
    shard_name,
    table_documents,
    write_parquet_docs,
    write_parquet_table,
)

log = logging.getLogger(__name__)

LOCK_FILE = "lock"
# What a run writes, relative to the output directory; the only things `overwrite` removes.
# `_work/download_cache` (remote inputs, keyed by URL) and the lock stay.
OWNED = (f"{WORK_DIR}/{RUN_FILE}", f"{WORK_DIR}/stage1", f"{WORK_DIR}/rejected1", f"{WORK_DIR}/dedup",
         f"{WORK_DIR}/final", DOCUMENTS_DIR, REJECTED_DIR, STATS_FILE, "report.md", "funnel.png")
# Rows per table the write phase streams through (a shard is never read whole).
WRITE_BATCH_ROWS = 2000
# The shard keys (`shard_key`) the write phase names its document (and rejected) files after.
_SHARD_KEY = re.compile(r"\d{5,}-[^/]*")


class OutputConflictError(ConfigError):
    """The output directory is in use by another run, or holds results this run cannot account for."""


@dataclass(frozen=True)
class RunContext:
    """Everything a shard task needs; small and picklable, shipped to every Ray task."""

    config: dict[str, Any]
    work: str
    output: str
    added: str
    keep_rejected: bool = False


@dataclass(frozen=True)
class Shard:
    key: str
    path: str
    version: str = ""  # input_version(path) when the run started


def input_version(path: str) -> str:
    """What tells a changed input apart without reading it: a local file's size and mtime. A
    remote input is read once through a cache keyed by its URL, so the URL is its version."""
    from curation.read.inputs import is_remote

    if is_remote(path):
        return "remote"
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}"


def shard_key(index: int, path: str) -> str:
    name = Path(path.rstrip("/")).name
    for suffix in (".gz", ".zst", ".warc", ".arc", ".wet", ".wat", ".txt", ".jsonl", ".json", ".parquet", ".arrow"):
        name = name.removesuffix(suffix)
    return f"{index:05d}-{path_safe(name)}"


# ---------------------------------------------------------------------------------------------
# phase 1: per-shard steps

_BUILT: dict[str, list[Any]] = {}


def _build_steps(ctx: RunContext) -> tuple[Any, list[Any], list[Any]]:
    """The reader, steps and dedup steps, built once per process (models load once), fresh stats per shard."""
    cfg = CurationConfig.from_dict(ctx.config)
    built = built_once(_BUILT, cfg.fingerprint() + ctx.added, lambda: [
        build_reader(cfg.reader, cfg.source, ctx.added, download_cache(cfg, Path(ctx.work))),
        *(build(s.name, s.params, DOC_STEPS) for s in cfg.steps),
        *(build(s.name, s.params, DEDUP_STEPS) for s in cfg.dedup)])
    return built[0], built[1:1 + len(cfg.steps)], built[1 + len(cfg.steps):]


def process_shard(ctx: RunContext, shard: Shard) -> dict[str, Any]:
    """Phase 1 for one input file. Returns (and records in its marker) the shard's stats."""
    stage1 = Path(ctx.work) / "stage1"
    marker = stage1 / f"{shard.key}.done.json"
    if marker.exists():
        done = json.loads(marker.read_text())
        if done.get("input_version") != shard.version:
            log.info("%s changed since its shard was made; redoing it", shard.path)
        elif not _phase1_rejects_match(ctx, shard, done):
            log.info("shard %s was made with keep_rejected=%s; redoing it", shard.key, not ctx.keep_rejected)
        else:
            log.debug("shard %s: phase 1 already done", shard.key)
            return done
        marker.unlink()  # its shard is about to be replaced; never trust the pair half-updated
    reader, steps, dedups = _build_steps(ctx)

    t0 = time.perf_counter()
    # Kept rejects stream to `_work/rejected1/<shard>.parquet` in batches as the steps drop them.
    rejects = PartitionedWriter(Path(ctx.work) / "rejected1", shard.key, "parquet") if ctx.keep_rejected else None
    sink = RejectSink(lambda t: rejects.write([""] * t.num_rows, t)) if rejects is not None else None
    try:
        for step in steps:
            step.on_drop = sink.hook(step.name) if sink is not None else None
        stream: Any = reader.read(shard.path)
        for step in steps:
            stream = step(stream)

        for d in dedups:  # dedup signals only; the decisions are global (phase 2)
            stream = d.run(stream)
        out = stage1 / f"{shard.key}.parquet"
        rows = write_parquet_docs(stream, out, internal=True)
        if sink is not None and rejects is not None:
            sink.flush()
            rejects.close()
    except BaseException:
        if rejects is not None:
            rejects.abort()
        raise
    finally:
        for step in steps:
            step.on_drop = None
    if not rows:  # an empty stream writes nothing; an earlier version's shard must not stay
        out.unlink(missing_ok=True)
    if sink is not None:
        if not sink.rows:
            rejected1_path(ctx, shard).unlink(missing_ok=True)
        _check_rejects_complete(steps, sink)
    read_stats = reader.stats
    # The reader's input is records, not documents (its skips are in counters by kind), so its
    # row in the funnel starts at the documents it produced.
    read_stats.docs_in = read_stats.docs_out
    result = {
        "shard": shard.key,
        "path": shard.path,
        "input_version": shard.version,
        "rows": rows,
        "seconds": round(time.perf_counter() - t0, 3),
        "steps": [read_stats.to_dict()] + [s.stats.to_dict() for s in steps],
        "keep_rejected": ctx.keep_rejected,
        "rejected": sink.rows if sink is not None else 0,
    }
    if read_stats.errors.get("read.unavailable"):
        # The input could not be opened (a missing file, a failed download): no marker, so a rerun
        # tries it again instead of taking an empty shard as done.
        log.warning("shard %s: %s could not be opened; rerun the same command to retry it", shard.key, shard.path)
        result["unavailable"] = True
        return result
    if read_stats.errors:
        first = next((x for x in read_stats.samples if x.get("kind") in read_stats.errors), {})
        log.warning("shard %s: read errors in %s (%s)%s", shard.key, shard.path,
                    ", ".join(f"{k} {v}" for k, v in sorted(read_stats.errors.items())),
                    f"; first: {first.get('message', '')}" if first.get("message") else "")
    log.info("shard %s: %d documents read, %d kept after the steps%s, %.1f s", shard.key, read_stats.docs_out,
             rows, f", {result['rejected']} rejects kept" if ctx.keep_rejected else "", result["seconds"])
    atomic_write_text(marker, json.dumps(result))
    return result


def rejected1_path(ctx: RunContext, shard: Shard) -> Path:
    return Path(ctx.work) / "rejected1" / f"{shard.key}.parquet"


def _phase1_rejects_match(ctx: RunContext, shard: Shard, done: dict[str, Any]) -> bool:
    """A phase-1 marker serves this run only if it was made with the same `keep_rejected` and
    its rejects file, if it has one, is still there."""
    if done.get("keep_rejected", False) != ctx.keep_rejected:
        return False
    return not (ctx.keep_rejected and done.get("rejected")) or rejected1_path(ctx, shard).is_file()


def _check_rejects_complete(steps: list[Step], sink: RejectSink) -> None:
    """Warn when a step dropped documents without handing them to `Step.drop` (a step that counts
    its drops by hand): they are in the stats but missing from `rejected/`."""
    dropped: Counter = Counter()
    for step in steps:
        dropped[step.name] += sum(step.stats.dropped.values())
    for name, n in dropped.items():
        if n != sink.counts[name]:
            log.warning("step %s dropped %d documents but handed %d to Step.drop; rejected/ misses the rest "
                        "(the step should call self.drop(doc, reason))", name, n, sink.counts[name])


# ---------------------------------------------------------------------------------------------
# phase 2: global dedup


def phase1_digest(ctx: RunContext, shard_results: list[dict]) -> str:
    """What every global result is made from: the config and each phase-1 shard's input version
    and row count. Dedup and write markers made from another digest are redone."""
    parts = [[r["shard"], r.get("input_version", ""), r["rows"]] for r in shard_results]
    blob = json.dumps([CurationConfig.from_dict(ctx.config).fingerprint(), parts])
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def run_dedup(ctx: RunContext, shards: list[Shard], phase1: str, executor: Executor) -> list[dict]:
    """Run each dedup step over all phase-1 shards; a row drops at the first step that drops it.
    Returns each step's stats.

    Each step leaves one drop list per shard (`_work/dedup/<step>/drops/`); one task per shard
    then merges its lists into `_work/dedup/dropped/<shard>.parquet`, the only file its write task
    reads. The driver sees counts and file names, never a document: nothing it holds grows with
    the corpus beyond one entry per shard. Drops name rows (`shard` = shard key, `row`), never ids
    alone: the same archive given under two names yields every document twice with one id, and
    exactly one copy must stay.
    """
    cfg = CurationConfig.from_dict(ctx.config)
    ddir = Path(ctx.work) / "dedup"
    ddir.mkdir(parents=True, exist_ok=True)
    paths = [str(stage1_path(ctx, s)) for s in shards]
    step_files: list[dict[str, str]] = []  # per step: shard key → its drop list, relative to ddir
    step_runs: list[tuple[float, dict]] = []
    for spec in cfg.dedup:
        marker = ddir / f"{spec.name}.done.json"
        done = json.loads(marker.read_text()) if marker.exists() else {}
        listed = done.get("files")
        if done.get("phase1") != phase1 or listed is None or not all((ddir / f).is_file() for f in listed.values()):
            marker.unlink(missing_ok=True)  # its lists are about to be replaced
            step = build(spec.name, spec.params, DEDUP_STEPS)
            t0 = time.perf_counter()
            found = step.drop_rows(paths, ddir, executor)
            files = {s.key: Path(d.file).relative_to(ddir).as_posix()
                     for s, d in zip(shards, found, strict=True) if d.rows}
            done = {"seconds": time.perf_counter() - t0, "counters": dict(step.stats.counters),
                    "phase1": phase1, "files": files}
            atomic_write_text(marker, json.dumps(done))
        step_files.append(done["files"])
        step_runs.append((done["seconds"], done.get("counters", {})))
    merged = executor.map(
        partial(merge_drops, ctx, phase1),
        [(s, [files.get(s.key, "") for files in step_files]) for s in shards],
        desc="dedup: drops per shard",
    )
    stats: list[dict] = []
    dropped_before = 0
    total = sum(m["rows"] for m in merged)
    for i, (spec, (seconds, counters)) in enumerate(zip(cfg.dedup, step_runs, strict=True)):
        reasons: Counter = Counter()
        for m in merged:
            reasons.update(m["dropped"][i])
        docs_in = total - dropped_before
        s = StepStats(spec.name, docs_in=docs_in, docs_out=docs_in - sum(reasons.values()), seconds=seconds)
        s.dropped.update(reasons)
        s.counters.update(counters)
        stats.append(s.to_dict())
        dropped_before += sum(reasons.values())
    return stats


# A shard's merged drop list: DROP_SCHEMA plus the dedup step that dropped the row.
MERGED_DROP_SCHEMA = DROP_SCHEMA.append(pa.field("step", pa.string()))


def dropped_path(ctx: RunContext, shard: Shard) -> Path:
    return Path(ctx.work) / "dedup" / "dropped" / f"{shard.key}.parquet"


def merge_drops(ctx: RunContext, phase1: str, item: tuple[Shard, list[str]]) -> dict[str, Any]:
    """One shard: its drop lists of every dedup step (paths relative to `_work/dedup`, "" for
    none) → one list where each row carries the step and reason of the first step that dropped it.
    Returns the shard's phase-1 row count and, per step, the rows it newly dropped by reason."""
    shard, files = item
    out = dropped_path(ctx, shard)
    marker = out.with_name(f"{shard.key}.done.json")
    if marker.exists():
        done = json.loads(marker.read_text())
        if done.get("phase1") == phase1 and out.is_file():
            return done
    ddir = Path(ctx.work) / "dedup"
    taken = np.empty(0, dtype=np.int64)
    tables: list[pa.Table] = []
    per_step: list[dict[str, int]] = []
    for spec, f in zip(CurationConfig.from_dict(ctx.config).dedup, files, strict=True):
        if not f:
            per_step.append({})
            continue
        t = pq.read_table(ddir / f, schema=DROP_SCHEMA)
        t = t.filter(pa.array(~np.isin(t["row"].to_numpy(), taken)))
        per_step.append(dict(Counter(t["reason"].to_pylist())))
        taken = np.concatenate([taken, t["row"].to_numpy()])
        tables.append(t.append_column("step", pa.array([spec.name] * t.num_rows, pa.string())))
    table = pa.concat_tables(tables) if tables else MERGED_DROP_SCHEMA.empty_table()
    table = table.set_column(0, "shard", pa.array([shard.key] * table.num_rows, pa.string())).sort_by("row")
    write_parquet_table(table, out)  # written even when empty: a stale list must never stay
    result = {"shard": shard.key, "rows": pq.read_metadata(stage1_path(ctx, shard)).num_rows,
              "dropped": per_step, "phase1": phase1}
    atomic_write_text(marker, json.dumps(result))
    return result


# ---------------------------------------------------------------------------------------------
# phase 3: write the corpus


def stage1_path(ctx: RunContext, shard: Shard) -> Path:
    return Path(ctx.work) / "stage1" / f"{shard.key}.parquet"


def write_shard(ctx: RunContext, phase1: str, shard: Shard) -> dict[str, Any]:
    """Phase 3 for one shard: drop its deduplicated rows (its own list only), run the after_dedup
    steps on the survivors, write them to their partition folders (internal columns stripped) and,
    with `keep_rejected`, its rejects to `rejected/`. Streams the shard in batches."""
    marker = Path(ctx.work) / "final" / f"{shard.key}.done.json"
    if marker.exists():
        done = json.loads(marker.read_text())
        listed = [f["path"] for f in done.get("files", []) + done.get("rejected_files", [])]
        if (done.get("phase1") == phase1 and done.get("keep_rejected", False) == ctx.keep_rejected
                and all((Path(ctx.output) / p).is_file() for p in listed)):
            log.debug("shard %s: already written", shard.key)
            return done
    cfg = CurationConfig.from_dict(ctx.config)
    t0 = time.perf_counter()
    output = Path(ctx.output)
    partitioner = Partitioner(cfg.output.get("partition_by"), cfg.output.get("buckets"))
    documents = PartitionedWriter(output / DOCUMENTS_DIR, shard.key, cfg.format)
    rejects = PartitionedWriter(output / REJECTED_DIR, shard.key, cfg.format) if ctx.keep_rejected else None
    steps = _after_dedup_steps(ctx)
    sink = RejectSink(partial(_write_by_source, rejects)) if rejects is not None else None
    langs: Counter = Counter()
    chars = 0
    try:
        for step in steps:
            step.on_drop = sink.hook(step.name) if sink is not None else None
        if rejects is not None and rejected1_path(ctx, shard).is_file():
            for batch in pq.ParquetFile(rejected1_path(ctx, shard)).iter_batches(WRITE_BATCH_ROWS):
                _write_by_source(rejects, pa.Table.from_batches([batch]))
        survivors = _dedup_survivors(ctx, cfg, shard, rejects)
        for table in _run_after_dedup(survivors, steps):
            metas = [orjson.loads(m) if m else {} for m in table["metadata"].to_pylist()]
            langs.update(m.get("lang", "unknown") for m in metas)
            chars += pc.sum(pc.utf8_length(table["text"])).as_py() or 0
            documents.write([partitioner.folder(src, m) for src, m in zip(table["source"].to_pylist(), metas,
                                                                           strict=True)], table)
        if sink is not None:
            sink.flush()
            _check_rejects_complete(steps, sink)
        files = documents.close()
        rejected_files = rejects.close() if rejects is not None else {}
    except BaseException:
        documents.abort()
        if rejects is not None:
            rejects.abort()
        raise
    finally:
        for step in steps:
            step.on_drop = None
    rows = sum(files.values())
    rows_in = steps[0].stats.docs_in if steps else rows
    result = {"shard": shard.key, "rows": rows, "chars": chars, "languages": dict(langs),
              "files": [{"path": p, "documents": n} for p, n in files.items()],
              "steps": [s.stats.to_dict() for s in steps], "keep_rejected": ctx.keep_rejected,
              "rejected_files": [{"path": p, "documents": n} for p, n in rejected_files.items()],
              "seconds": round(time.perf_counter() - t0, 3), "phase1": phase1}
    log.info("shard %s written: %d documents after dedup, %d written to %d files%s, %.1f s", shard.key, rows_in,
             rows, len(files), f", {sum(rejected_files.values())} rejects kept" if ctx.keep_rejected else "",
             result["seconds"])
    atomic_write_text(marker, json.dumps(result))
    return result


_AFTER_DEDUP: dict[str, list[Any]] = {}


def _after_dedup_steps(ctx: RunContext) -> list[Any]:
    """The after_dedup steps, built once per process (models load once), fresh stats per shard."""
    cfg = CurationConfig.from_dict(ctx.config)
    return built_once(_AFTER_DEDUP, cfg.fingerprint() + ctx.added,
                      lambda: [build(s.name, s.params, DOC_STEPS) for s in cfg.after_dedup])


def _dedup_survivors(ctx: RunContext, cfg: CurationConfig, shard: Shard,
                     rejects: PartitionedWriter | None) -> Iterator[pa.Table]:
    """The shard's phase-1 rows (BASE_SCHEMA) that dedup kept, in tables of WRITE_BATCH_ROWS; the
    rows it dropped go to `rejects` (when kept) with their step, reason and surviving copy."""
    path = stage1_path(ctx, shard)
    if not path.is_file():  # the steps dropped every document of this shard
        return
    drops = pq.read_table(dropped_path(ctx, shard)) if cfg.dedup else MERGED_DROP_SCHEMA.empty_table()
    rows = drops["row"].to_numpy()  # sorted by merge_drops
    offset = 0
    for batch in pq.ParquetFile(path).iter_batches(WRITE_BATCH_ROWS, columns=BASE_SCHEMA.names):
        table = pa.Table.from_batches([batch])
        lo, hi = np.searchsorted(rows, [offset, offset + table.num_rows])
        if hi > lo:
            at = rows[lo:hi] - offset
            if rejects is not None:
                why = [rejection(step, reason, duplicate_of=dup) for step, reason, dup in zip(
                    drops["step"][lo:hi].to_pylist(), drops["reason"][lo:hi].to_pylist(),
                    drops["duplicate_of"][lo:hi].to_pylist(), strict=True)]
                _write_by_source(rejects, mark_rejected(table.take(at), why))
            keep = np.ones(table.num_rows, dtype=np.bool_)
            keep[at] = False
            table = table.filter(pa.array(keep))
        offset += batch.num_rows
        if table.num_rows:
            yield table


def _run_after_dedup(tables: Iterator[pa.Table], steps: list[Step]) -> Iterator[pa.Table]:
    """The survivors through the after_dedup steps, as BASE_SCHEMA tables again."""
    if not steps:
        yield from tables
        return

    stream: Iterator[Document] = (doc for table in tables for doc in table_documents(table))
    for step in steps:
        stream = step(stream)
    for batch in batched(stream, WRITE_BATCH_ROWS):
        yield documents_table(batch)


def _write_by_source(rejects: PartitionedWriter | None, table: pa.Table) -> None:
    """Rejected rows go to `rejected/<source>/`, whatever the corpus's partitioning."""
    assert rejects is not None
    by_source = Partitioner()
    rejects.write([by_source.folder(s, {}) for s in table["source"].to_pylist()], table)


def remove_stale_files(folder: Path, written: set[str]) -> list[Path]:
    """Delete document (or rejected) files under `folder` that this run did not write (an earlier
    version of a changed input, a shard whose documents are now all dropped or in other partitions),
    so no stale shard sits beside the corpus, then the folders that left empty. Only names the
    write phase makes are touched; `written` holds paths relative to `folder`'s parent."""
    removed = []
    for p in sorted(folder.rglob("*")) if folder.is_dir() else []:
        if (p.is_file() and _SHARD_KEY.fullmatch(shard_name(p.name) or "")
                and p.relative_to(folder.parent).as_posix() not in written):
            p.unlink()
            removed.append(p)
    for d in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        if not any(d.iterdir()):
            d.rmdir()
    return removed


# ---------------------------------------------------------------------------------------------
# the output directory: one run at a time, and only its own results


def download_cache(cfg: CurationConfig, work: Path) -> str:
    """Where remote inputs (listings and archives alike) are downloaded: `read.cache_dir`, else
    inside the run's work folder."""
    return str(cfg.read.get("cache_dir") or work / "download_cache")


@contextmanager
def hold_output(output: Path) -> Iterator[None]:
    """Hold `output` for this process: an exclusive flock on `_work/lock` for the whole run; a
    second run on the same output fails at once, naming the holder's pid."""
    work = output / WORK_DIR
    work.mkdir(parents=True, exist_ok=True)
    fd = os.open(work / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputConflictError(
                f"{output} is in use by another refinery curate run (pid {_lock_holder(fd)}); wait for it "
                "to finish, or choose another --output"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays, so no two runs ever lock different files


def _lock_holder(fd: int) -> str:
    # The holder writes its pid just after taking the lock; give it a moment to do so.
    for _ in range(20):
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if pid:
            return pid
        time.sleep(0.05)
    return "unknown"


def _foreign_results(output: Path) -> list[str]:
    """Results in `output` that no run.json accounts for (an empty documents/ holds none)."""
    results = (f"{WORK_DIR}/stage1", f"{WORK_DIR}/rejected1", f"{WORK_DIR}/dedup", f"{WORK_DIR}/final",
               STATS_FILE, "report.md")
    found = [name for name in results if (output / name).exists()]
    for name in (DOCUMENTS_DIR, REJECTED_DIR):
        folder = output / name
        if folder.is_dir() and any(p.is_file() for p in folder.rglob("*")):
            found.append(name)
    return found


def remove_owned(output: Path) -> None:
    """What `overwrite` deletes: the results and work files a run writes (OWNED), nothing else."""
    for name in OWNED:
        p = output / name
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)


def _start_or_resume(output: Path, cfg: CurationConfig, shards: list[Shard],
                     keep_rejected: bool = False) -> dict[str, Any]:
    run_file = output / WORK_DIR / RUN_FILE
    paths = [s.path for s in shards]
    versions = [s.version for s in shards]
    if run_file.exists():
        run = json.loads(run_file.read_text())
        differ = [what for what, same in (("config", run["fingerprint"] == cfg.fingerprint()),
                                          ("inputs", run["inputs"] == paths)) if not same]
        if differ:
            raise OutputConflictError(
                f"{output} holds a run with a different config or inputs (the {' and '.join(differ)} "
                "differ); pass --overwrite to replace it, or choose another --output"
            )
        # Refused, not redone: the rejects of every finished shard would be missing (or stale),
        # and phase 1 is the expensive part.
        if run.get("keep_rejected", False) != keep_rejected:
            started = "with" if run.get("keep_rejected", False) else "without"
            raise OutputConflictError(
                f"{output} holds a run started {started} --keep-rejected; rerun {started} it to resume, "
                "pass --overwrite to start over, or choose another --output"
            )
        if run.get("input_versions") != versions:
            # Same paths, new content: the changed shards and every global result are redone
            # (their markers no longer match), under the run's original `added` time.
            run["input_versions"] = versions
            atomic_write_text(run_file, json.dumps(run, indent=1))
        return run
    if found := _foreign_results(output):
        raise OutputConflictError(
            f"{output} already holds curation results that no run record accounts for "
            f"({', '.join(found)}); pass --overwrite to replace them, or choose another --output"
        )
    run = {
        "fingerprint": cfg.fingerprint(),
        "inputs": paths,
        "input_versions": versions,
        "keep_rejected": keep_rejected,
        # One timestamp for the whole run, reused on resume, so a resumed run is byte-identical.
        "added": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z"),
        "config": cfg.to_dict(),
    }
    atomic_write_text(run_file, json.dumps(run, indent=1))
    return run


def _clean_owned_tmp(output: Path) -> None:
    """Temp files of a killed run: only in what a run owns, only names the writer makes."""
    work = output / WORK_DIR
    clean_tmp(work, recursive=False)  # run.json
    for sub in ("stage1", "rejected1", "dedup", "final"):
        clean_tmp(work / sub)
    clean_tmp(output / DOCUMENTS_DIR)
    clean_tmp(output / REJECTED_DIR)
    clean_tmp(output, suffixes=(STATS_FILE, "report.md"), recursive=False)


# ---------------------------------------------------------------------------------------------
# driver


def curate(
    config: CurationConfig | str | Path,
    inputs: list[str],
    output: str | Path,
    executor: str = "local",
    ray_address: str | None = None,
    output_format: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
    keep_rejected: bool = False,
) -> dict[str, Any]:
    """Curate `inputs` (paths, globs, listings, URLs) into `output`; returns the stats dict.

    Resumes a run of the same config, inputs and `keep_rejected` in `output`; refuses one of
    another, or results no run record accounts for, unless `overwrite` (which first deletes what a
    run writes there, and nothing else). With `keep_rejected`, every dropped document is written
    to `output/rejected/` with its step and reason (curation/rejected.py).
    """
    from curation.read.inputs import expand_inputs
    from curation.report import write_report

    cfg = config if isinstance(config, CurationConfig) else CurationConfig.load(config)
    if output_format:  # on a copy: the caller's config stays as it was
        cfg = CurationConfig.from_dict({**cfg.to_dict(), "output": {**cfg.output, "format": output_format}})
    validate_buildable(cfg)
    output = Path(output)
    work = output / WORK_DIR
    with hold_output(output):
        # Expanded before anything is removed, so a typo in --input fails with the output intact.
        reader = build_reader(cfg.reader, cfg.source, "", download_cache(cfg, work))
        paths = expand_inputs(inputs, cache_dir=download_cache(cfg, work),
                              allow_local_in_listings=bool(cfg.read.get("allow_local_in_listings", False)),
                              files_in=reader.files_in)
        if overwrite:
            remove_owned(output)
        shards = [Shard(shard_key(i, p), p, input_version(p)) for i, p in enumerate(paths)]
        run = _start_or_resume(output, cfg, shards, keep_rejected)
        _clean_owned_tmp(output)
        # Readers take stats.json as "the corpus is complete"; it comes back when this run is.
        (output / STATS_FILE).unlink(missing_ok=True)
        ctx = RunContext(config=cfg.to_dict(), work=str(work), output=str(output), added=run["added"],
                         keep_rejected=keep_rejected)

        t0 = time.perf_counter()
        ex = make_executor(executor, ray_address=ray_address, progress=progress)
        try:
            # Every phase's request is checked now: one no node can hold must not wait for phase 3.
            for specs in ([cfg.reader, *cfg.steps, *cfg.dedup], cfg.after_dedup):
                ex.check_resources(phase_resources(specs))
            shard_results = ex.map(partial(process_shard, ctx), shards, desc="extract + filter",
                                   resources=phase_resources([cfg.reader, *cfg.steps, *cfg.dedup]))
            phase1 = phase1_digest(ctx, shard_results)
            nonempty = [s for s, r in zip(shards, shard_results, strict=True) if r["rows"]]
            dedup_stats = run_dedup(ctx, nonempty, phase1, ex) if cfg.dedup and nonempty else []
            # A shard whose documents were all dropped still has rejects to write.
            to_write = [s for s, r in zip(shards, shard_results, strict=True)
                        if r["rows"] or (keep_rejected and r.get("rejected"))]
            final_results = ex.map(partial(write_shard, ctx, phase1), to_write, desc="write",
                                   resources=phase_resources(cfg.after_dedup))
        finally:
            ex.shutdown()
        for folder, key in ((DOCUMENTS_DIR, "files"), (REJECTED_DIR, "rejected_files")):
            remove_stale_files(output / folder, {f["path"] for r in final_results for f in r.get(key, [])})
        stats = assemble_stats(cfg, shard_results, dedup_stats, final_results, time.perf_counter() - t0,
                               executor, keep_rejected)
        write_report(stats, output)
        atomic_write_text(output / STATS_FILE, json.dumps(stats, indent=1))
    return stats


def assemble_stats(cfg: CurationConfig, shard_results: list[dict], dedup_stats: list[dict],
                   final_results: list[dict], wall: float, executor: str,
                   keep_rejected: bool = False) -> dict[str, Any]:
    merged: dict[str, StepStats] = {}
    order: list[str] = []
    for r in shard_results:
        for d in r["steps"]:
            s = StepStats.from_dict(d)
            if s.name not in merged:
                merged[s.name] = StepStats(s.name)
                order.append(s.name)
            merged[s.name].merge(s)
    # After dedup, by position: a step may also appear (under its name) before dedup.
    after = [StepStats(s.name) for s in cfg.after_dedup]
    for r in final_results:
        for total, d in zip(after, r.get("steps", []), strict=False):
            total.merge(StepStats.from_dict(d))
    steps = [merged[n].to_dict() for n in order] + dedup_stats + [s.to_dict() for s in after]
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
        # The corpus: every document file this run wrote, relative to the output (curation/corpus.py).
        "files": sorted((f for r in final_results for f in r["files"]), key=lambda f: f["path"]),
        # Only with --keep-rejected: every dropped document, with its step and reason (curation/rejected.py).
        **({"rejected_files": sorted((f for r in final_results for f in r["rejected_files"]),
                                     key=lambda f: f["path"])} if keep_rejected else {}),
        # What made the corpus, so it can be refiltered (curation/refilter.py) after `_work/` is gone.
        "config": cfg.to_dict(),
    }
