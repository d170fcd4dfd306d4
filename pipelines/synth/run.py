"""`refinery synth spec`: synthetic documents that explain a Model Spec, written as a corpus.

Output (a corpus like `refinery curate` writes, see `curation/corpus.py`, so `refinery tokenize
--corpus OUT` reads exactly its documents and refuses it while a run is unfinished):

    OUT/documents/spec-synthetic/part-00000.jsonl.gz   Dolma documents (id, text, source, added,
                                                       created, metadata{section, doc_type, prompt_id,
                                                       principle, audience, generator, ...})
    OUT/stats.json            written last: counts, drops by reason, coverage, and `files`
    OUT/heldout/...           with --holdout: the held-out prompts' documents, a corpus of its own
    OUT/synth.json            every setting, the generator, the spec's sections, every template
    OUT/spec.md               the spec as it was read
    OUT/prompts.jsonl.gz      every prompt sent (prompt_id, section, doc_type, messages, ...)
    OUT/dropped.jsonl.gz      every generation not kept: prompt_id, reason, duplicate_of
    OUT/_work/run.json        the run's fingerprint (spec, templates, generator, sampling, batch size)
    OUT/_work/batches/b000000.jsonl.gz + .done   raw generations of one batch and its marker

Resuming: batch b holds jobs [b·B, (b+1)·B) of the plan. Its generations are written under a
temporary name and renamed, then its `.done` marker; a rerun skips finished batches and regenerates
only the items of a batch that failed (kept as errors). The plan is prefix-stable, so a rerun with a
larger `--documents` continues the same plan; settings that change what is generated (the
fingerprint) are refused unless `overwrite`. Everything after generation (drops, dedup, held-out
split, writing) runs again on every call: cheap, and it takes the current `--min-words`,
`--holdout` and dedup threshold.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from tqdm.auto import tqdm

from curation.corpus import DOCUMENTS_DIR, RUN_FILE, STATS_FILE, WORK_DIR
from curation.document import Document
from curation.writer import atomic_write_text, clean_tmp, tmp_path
from pipelines.synth.prompts import Job, check_doc_types, plan_job, plan_jobs, templates_record
from pipelines.synth.quality import DROP_DUPLICATE, clean, drop_reason, near_duplicates
from pipelines.synth.spec import Spec, load_spec
from training.llm_client import FINISH_LENGTH, ChatClient
from training.sampling import SamplingParams

SOURCE = "spec-synthetic"
HELDOUT_DIR = "heldout"
PART_DOCS = 20_000  # documents per output file
OWNED = (DOCUMENTS_DIR, WORK_DIR, HELDOUT_DIR, STATS_FILE, "synth.json", "spec.md", "prompts.jsonl.gz",
         "dropped.jsonl.gz")


class SynthError(ValueError):
    """A synthetic-data run that cannot go on as asked (other settings in OUT, a generator that fails)."""


@dataclass
class SynthSettings:
    documents: int
    batch_size: int = 16
    max_new_tokens: int = 768
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int = 0
    doc_types: tuple[str, ...] = ()  # empty: every type in prompts.DOC_TYPES
    min_words: int = 20
    dedup_threshold: float = 0.8
    holdout: float = 0.0  # share of prompts whose documents go to OUT/heldout
    holdout_types: tuple[str, ...] = ()  # document types eligible for the held-out split; empty: all

    def __post_init__(self) -> None:
        self.doc_types = check_doc_types(self.doc_types)
        self.holdout_types = check_doc_types(self.holdout_types) if self.holdout_types else self.doc_types
        if self.documents < 1 or self.batch_size < 1:
            raise ValueError(f"--documents and --batch-size must be >= 1, got {self.documents}, {self.batch_size}")
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"--holdout must be in [0, 1), got {self.holdout}")
        if not 0.0 < self.dedup_threshold <= 1.0:
            raise ValueError(f"--dedup-threshold must be in (0, 1], got {self.dedup_threshold}")
        self.generation(0)  # checks them

    def generation(self, first_job: int) -> SamplingParams:
        # Seeds differ per batch (and per item inside a batch, by the client), and repeat on a rerun.
        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                              seed=self.seed * 1_000_003 + first_job)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def fingerprint(spec: Spec, settings: SynthSettings, generator: dict[str, Any]) -> dict[str, Any]:
    """What decides the generated texts: a change here makes the finished batches another run's."""
    who = {k: v for k, v in generator.items() if k not in ("device",)}
    return {"spec_sha256": spec.sha256, "doc_types": list(settings.doc_types),
            "templates_sha1": hashlib.sha1(json.dumps(templates_record(settings.doc_types), sort_keys=True)
                                           .encode()).hexdigest(),
            "generator": who, "seed": settings.seed, "batch_size": settings.batch_size,
            "max_new_tokens": settings.max_new_tokens, "temperature": settings.temperature,
            "top_p": settings.top_p}


def _prepare(output: Path, run: dict[str, Any], overwrite: bool) -> None:
    run_file = output / WORK_DIR / RUN_FILE
    if output.exists() and not output.is_dir():
        raise SynthError(f"--output {output} is a file; give a directory")
    if run_file.is_file() and not overwrite:
        old = json.loads(run_file.read_text())
        if old.get("fingerprint") != run["fingerprint"]:
            diff = [k for k in sorted(set(old.get("fingerprint", {})) | set(run["fingerprint"]))
                    if old.get("fingerprint", {}).get(k) != run["fingerprint"].get(k)]
            raise SynthError(f"{output} holds a synthetic run with other settings ({', '.join(diff)} differ); "
                             "choose another --output, or pass --overwrite to start over")
    elif output.is_dir() and any(output.iterdir()) and not overwrite and not run_file.is_file():
        raise SynthError(f"--output {output} is not empty and holds no synthetic run; choose an empty or new "
                         "directory")
    if overwrite:
        for name in OWNED:
            p = output / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    clean_tmp(output)
    (output / WORK_DIR / "batches").mkdir(parents=True, exist_ok=True)
    # No stats.json while the run works: corpus readers refuse the half-written corpus.
    (output / STATS_FILE).unlink(missing_ok=True)
    (output / HELDOUT_DIR / STATS_FILE).unlink(missing_ok=True)
    atomic_write_text(run_file, json.dumps(run, indent=1))


def _write_gz_lines(final: Path, rows: list[dict[str, Any]]) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(final)
    with gzip.open(tmp, "wb", compresslevel=6) as f:
        for row in rows:
            f.write(orjson.dumps(row) + b"\n")
    os.replace(tmp, final)


def _read_gz_lines(path: Path) -> list[dict[str, Any]]:
    with gzip.open(path, "rb") as f:
        return [orjson.loads(line) for line in f if line.strip()]


def _batch_paths(output: Path, b: int) -> tuple[Path, Path]:
    base = output / WORK_DIR / "batches" / f"b{b:06d}"
    return base.with_suffix(".jsonl.gz"), base.with_suffix(".done")


def _load_batch(output: Path, b: int) -> dict[int, dict[str, Any]]:
    data, marker = _batch_paths(output, b)
    if not marker.is_file() or not data.is_file():
        return {}
    return {int(r["k"]): r for r in _read_gz_lines(data)}


def generate_batches(spec: Spec, client: ChatClient, output: Path, settings: SynthSettings,
                     progress: bool = True) -> dict[str, int]:
    """Generate every job of the plan not yet generated; returns counts of this call's work."""
    n, size = settings.documents, settings.batch_size
    done_before = 0
    counts = Counter[str]()
    todo: list[tuple[int, dict[int, dict[str, Any]], list[int]]] = []
    for b in range(math.ceil(n / size)):
        lo, hi = b * size, min((b + 1) * size, n)
        marker = _batch_paths(output, b)[1]
        if marker.is_file():  # a batch holds a prefix of its range: enough rows and no error = done
            done = json.loads(marker.read_text())
            if done["jobs"] >= hi - lo and not done["errors"]:
                done_before += hi - lo
                continue
        have = _load_batch(output, b)
        pending = [k for k in range(lo, hi) if k not in have or have[k]["text"] is None]
        done_before += (hi - lo) - len(pending)
        if pending:
            todo.append((b, have, pending))
    bar = tqdm(total=n, initial=done_before, desc="synth: generate", unit="doc", disable=not progress)
    try:
        for b, have, pending in todo:
            jobs = [plan_job(spec, k, settings.doc_types, settings.seed) for k in pending]
            t0 = time.perf_counter()
            replies = client.complete([list(j.messages) for j in jobs], settings.generation(pending[0]))
            if len(replies) != len(jobs):
                raise SynthError(f"the generator returned {len(replies)} replies for {len(jobs)} prompts")
            failed = [r for r in replies if r.text is None]
            counts["requested"] += len(jobs)
            counts["failed"] += len(failed)
            if len(failed) == len(jobs):
                raise SynthError(f"all {len(jobs)} requests of batch {b} failed ({failed[0].error}); check the "
                                 "generator, then rerun the same command to resume")
            stamp = _now()
            for job, reply in zip(jobs, replies, strict=True):
                have[job.index] = {"k": job.index, "prompt_id": job.prompt_id, "text": reply.text,
                                   "finish_reason": reply.finish_reason, "error": reply.error,
                                   "generated_at": stamp}
            data, marker = _batch_paths(output, b)
            rows = [have[k] for k in sorted(have)]
            _write_gz_lines(data, rows)
            atomic_write_text(marker, json.dumps({"jobs": len(rows), "errors": sum(r["text"] is None for r in rows),
                                                  "seconds": round(time.perf_counter() - t0, 3)}))
            bar.update(len(jobs) - len(failed))
    finally:
        bar.close()
    return dict(counts)


def _split_hash(seed: int, job: Job) -> float:
    digest = hashlib.sha1(f"{seed}:{job.prompt_key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


def _write_corpus(root: Path, docs: list[Document]) -> list[dict[str, Any]]:
    folder = root / DOCUMENTS_DIR / SOURCE
    files = []
    for part, lo in enumerate(range(0, len(docs), PART_DOCS)):
        path = folder / f"part-{part:05d}.jsonl.gz"
        _write_gz_lines(path, [d.to_row() for d in docs[lo: lo + PART_DOCS]])
        files.append({"path": path.relative_to(root).as_posix(), "documents": len(docs[lo: lo + PART_DOCS])})
    listed = {root / f["path"] for f in files}
    if folder.is_dir():  # parts an earlier, larger finish wrote
        for stale in folder.glob("part-*.jsonl.gz"):
            if stale not in listed:
                stale.unlink()
    return files


def finish(spec: Spec, output: Path, settings: SynthSettings, generator: dict[str, Any],
           run_id: str) -> dict[str, Any]:
    """Raw generations → kept documents (drops counted by reason, near-duplicates removed) → corpus."""
    n = settings.documents
    records: dict[int, dict[str, Any]] = {}
    for b in range(math.ceil(n / settings.batch_size)):
        records.update({k: r for k, r in _load_batch(output, b).items() if k < n})
    missing = [k for k in range(n) if k not in records]
    if missing:
        raise SynthError(f"{len(missing)} prompts have no generation yet (first: p{missing[0]:07d}); rerun the "
                         "same command to generate them")
    jobs = plan_jobs(spec, n, settings.doc_types, settings.seed)
    drops: list[dict[str, Any]] = []
    kept: list[tuple[Job, str, dict[str, Any]]] = []
    for job in jobs:
        record = records[job.index]
        text = None if record["text"] is None else clean(record["text"])
        reason = drop_reason(text, settings.min_words)
        if reason:
            drops.append({"prompt_id": job.prompt_id, "reason": reason, "error": record.get("error")})
        else:
            assert text is not None
            kept.append((job, text, record))
    dups = near_duplicates([t for _, t, _ in kept], threshold=settings.dedup_threshold)
    for i, j in sorted(dups.items()):
        drops.append({"prompt_id": kept[i][0].prompt_id, "reason": DROP_DUPLICATE,
                      "duplicate_of": kept[j][0].prompt_id})
    kept = [x for i, x in enumerate(kept) if i not in dups]

    train: list[Document] = []
    heldout: list[Document] = []
    for job, text, record in kept:
        meta: dict[str, Any] = {
            "section": job.section, "section_id": job.section_id, "doc_type": job.doc_type,
            "prompt_id": job.prompt_id, "principle": job.principle, "audience": job.audience,
            "generator": generator, "spec": spec.title, "spec_sha256": spec.sha256, "run": run_id,
            "finish_reason": record["finish_reason"]}
        if job.other_section:
            meta["other_section"], meta["other_principle"] = job.other_section, job.other_principle
        held = (settings.holdout > 0 and job.doc_type in settings.holdout_types
                and _split_hash(settings.seed, job) < settings.holdout)
        if held:
            meta["split"] = "heldout"
        doc = Document(id=f"{SOURCE}-{run_id}-{job.prompt_id}", text=text, source=SOURCE,
                       added=record["generated_at"], created=record["generated_at"], metadata=meta)
        (heldout if held else train).append(doc)

    _write_gz_lines(output / "dropped.jsonl.gz", sorted(drops, key=lambda d: d["prompt_id"]))
    by = Counter(d["reason"] for d in drops)
    stats: dict[str, Any] = {
        "name": SOURCE, "format": "dolma", "spec": spec.title, "spec_sha256": spec.sha256, "run": run_id,
        "generator": generator,
        "documents_requested": n,
        "documents_written": len(train),
        "heldout_written": len(heldout),
        "dropped": dict(by.most_common()),
        "truncated_kept": sum(1 for _, _, r in kept if r["finish_reason"] == FINISH_LENGTH),
        "requested_by_section": dict(Counter(j.section for j in jobs)),
        "kept_by_section": dict(Counter(j.section for j, _, _ in kept)),
        "kept_by_doc_type": dict(Counter(j.doc_type for j, _, _ in kept)),
        "characters_written": sum(len(d.text) for d in train),
    }
    if settings.holdout > 0:
        files = _write_corpus(output / HELDOUT_DIR, heldout)
        atomic_write_text(output / HELDOUT_DIR / STATS_FILE, json.dumps(
            {"name": f"{SOURCE}-heldout", "format": "dolma", "run": run_id, "documents_written": len(heldout),
             "files": files}, indent=1))
    elif (output / HELDOUT_DIR).is_dir():
        shutil.rmtree(output / HELDOUT_DIR)  # an earlier finish's split, now off
    stats["files"] = _write_corpus(output, train)
    atomic_write_text(output / STATS_FILE, json.dumps(stats, indent=1))
    return stats


def synthesize_spec(spec_path: str | Path, client: ChatClient, output: str | Path, settings: SynthSettings,
                    progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Generate (or resume) a synthetic corpus about the spec at `spec_path`; returns its stats."""
    t0 = time.perf_counter()
    spec = load_spec(spec_path)
    output = Path(output)
    generator = client.describe()
    fp = fingerprint(spec, settings, generator)
    run_id = hashlib.sha1(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:10]
    _prepare(output, {"fingerprint": fp, "run": run_id}, overwrite)
    spec_text = Path(spec_path).read_text(encoding="utf-8")
    atomic_write_text(output / "spec.md", spec_text)
    atomic_write_text(output / "synth.json", json.dumps({
        "run": run_id, "spec": {"path": str(spec_path), "title": spec.title, "sha256": spec.sha256,
                                "sections": [asdict(s) for s in spec.sections]},
        "generator": generator, "settings": asdict(settings),
        "sampling": asdict(settings.generation(0)) | {"seed": "seed * 1000003 + first job of the batch + item"},
        "templates": templates_record(settings.doc_types)}, indent=1))
    _write_gz_lines(output / "prompts.jsonl.gz", [
        {"prompt_id": j.prompt_id, "section_id": j.section_id, "section": j.section, "doc_type": j.doc_type,
         "principle": j.principle, "audience": j.audience, "other_section": j.other_section,
         "other_principle": j.other_principle, "messages": list(j.messages)}
        for j in plan_jobs(spec, settings.documents, settings.doc_types, settings.seed)])
    work = generate_batches(spec, client, output, settings, progress)
    stats = finish(spec, output, settings, generator, run_id)
    stats["this_call"] = work
    stats["wall_seconds"] = round(time.perf_counter() - t0, 2)
    atomic_write_text(output / STATS_FILE, json.dumps(stats, indent=1))
    return stats
