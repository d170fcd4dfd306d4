"""Dedup at scale: exact + MinHash over 100k to 1M documents with our pipeline on Ray, and
datatrove's 4-stage MinHash pipeline on the same corpus, against a planted truth.

    python benchmarks/dedup_scale.py --sizes 100000 --datatrove 26x11   # ours and datatrove
    python benchmarks/dedup_scale.py --sizes 100000,300000,1000000      # ours, scaling
    python benchmarks/dedup_scale.py --signatures                       # MinHash vs datasketch

Corpus. Real text from ../shared/data (C4, Dolma CC, the Pile, OSCAR, Wikipedia, 13 Gutenberg
books, arXiv abstracts, AG News), cut into 77k distinct passages of 8-80 words; a document is at
least 3 random passages and 60-2,000 words (log-normal, median ~280, mean ~325), so two documents
share at most a passage or two. 10% of the documents are planted copies of a document in the next shard: exact (15%), case
and whitespace changed (10%), and copies with words replaced by other real words, aimed at a
word-5-gram Jaccard in [0.85, 1) (25%), [0.75, 0.85) (30%, the threshold's neighbourhood) and
[0.5, 0.75) (20%, which must stay). The true Jaccard of every pair is computed, not assumed.

Ours: phase 1 (per shard: read, exact hash and MinHash signatures, write the phase-1 shard),
`run_dedup` (exact, then MinHash) and `write_shard` of curation/pipeline.py, each an
`executor.map` on a local Ray with `--workers` CPUs. Datatrove: MinhashDedupSignature →
MinhashDedupBuckets → MinhashDedupCluster → MinhashDedupFilter + ParquetWriter on a
LocalPipelineExecutor with the same worker count and the same bands × rows (it has no Jaccard
check and no exact step). Each system runs in a fresh process: its peak RSS is the driver's;
our workers report their own peak (VmHWM, read in each task), datatrove's pool workers' peaks are
read every 0.1 s. Recall: planted pairs with Jaccard ≥ 0.8 that lost one document; precision: dropped
documents that are the single loss of such a pair.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data"
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

COPY_FRACTION = 0.1
# (kind, share of the copies, Jaccard range aimed at)
COPY_KINDS = [("exact", 3, (1.0, 1.0)), ("case", 2, (1.0, 1.0)), ("near", 5, (0.85, 1.0)),
              ("threshold", 6, (0.75, 0.85)), ("below", 4, (0.5, 0.75))]
THRESHOLD = 0.8
BANDS_REPORTED = [(0.5, 0.75), (0.75, 0.8), (0.8, 0.85), (0.85, 0.9), (0.9, 1.0), (1.0, 1.0)]
_WORD = re.compile(r"([^\W_]+)")
CORPUS_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("created", pa.string())])
TRUTH_SCHEMA = pa.schema([("copy", pa.string()), ("original", pa.string()), ("jaccard", pa.float64()),
                          ("kind", pa.string())])


# ---------------------------------------------------------------------------------------------
# the corpus


def _passages(text: str, max_words: int = 80) -> list[str]:
    out = []
    for para in re.split(r"\n\s*\n|\n", text):
        ws = para.split()
        for i in range(0, len(ws), max_words):
            chunk = ws[i : i + max_words]
            if len(chunk) >= 8:
                out.append(" ".join(chunk))
    return out


def passage_pool() -> list[str]:
    """Distinct passages of real text, in a fixed order."""
    texts: list[str] = []
    web = DATA / "web_text"
    c4 = web / "c4_en_sample"
    texts += [json.loads(x)["text"] for x in open(c4 / "c4_en_train_first1000.jsonl")]
    texts += [json.loads(x)["text"] for x in gzip.open(c4 / "c4-sample.00000-of-00001.json.gz", "rt")]
    for f in sorted((web / "dolma_cc_fixtures").glob("*.jsonl*")):
        opener = gzip.open if f.suffix == ".gz" else open
        texts += [json.loads(x)["text"] for x in opener(f, "rt")]
    texts += [json.loads(x)["contents"] for x in open(web / "pile_toy_sample" / "toy_pile_data.jsonl")]
    texts += [json.loads(x)["content"] for x in open(web / "oscar_sample_annotated" / "oscar_data.jsonl")]
    for f in sorted((DATA / "text" / "wikipedia_en").glob("*.*")):
        texts.append(f.read_text(errors="replace"))
    for f in sorted((DATA / "text" / "gutenberg_nltk").glob("*.txt")):
        # Gutenberg wraps lines inside paragraphs: join them first
        texts += [" ".join(p.split()) for p in f.read_text(errors="replace").split("\n\n")]
    with open(DATA / "domains" / "arxiv_abstracts" / "arxiv_data.csv", newline="") as fh:
        texts += [row["abstract"] for row in csv.DictReader(fh)]
    with open(DATA / "domains" / "ag_news" / "test.csv", newline="") as fh:
        texts += [f"{row[1]}. {row[2]}" for row in csv.reader(fh)]
    seen: set[str] = set()
    pool = []
    for t in texts:
        for p in _passages(t):
            if p not in seen:
                seen.add(p)
                pool.append(p)
    return pool


_POOL: list[str] = []
_VOCAB: list[str] = []


def _init_pool() -> None:
    global _POOL, _VOCAB
    if not _POOL:
        _POOL = passage_pool()
        _VOCAB = sorted({w for p in _POOL[:20000] for w in _WORD.findall(p.lower())})


def base_document(seed: int, g: int) -> str:
    """Document number g of the corpus: passages drawn until a log-normal length is reached."""
    rng = np.random.default_rng([seed, g])
    target = int(np.clip(rng.lognormal(np.log(250), 0.6), 60, 2000))
    parts, n = [], 0
    while n < target or len(parts) < 3:  # one-passage documents would repeat by chance
        p = _POOL[int(rng.integers(len(_POOL)))]
        parts.append(p)
        n += p.count(" ") + 1
    return "\n\n".join(parts)


def planted_copy(text: str, kind: str, aim: tuple[float, float], rng: np.random.Generator) -> str:
    """A copy of `text`: the same, in another case and spacing, or with words replaced by other
    real words, as many as the Jaccard aimed at needs (k isolated replacements change 5k of the
    S shingles each way: J = (S - 5k)/(S + 5k))."""
    if kind == "exact":
        return text
    if kind == "case":  # ASCII only: upper-casing "ß" makes "SS", another word once lowered
        return "  " + "".join(c.upper() if c.isascii() else c for c in text).replace(" ", "  ")
    tokens = _WORD.split(text)  # words at the odd positions, separators between
    word_at = np.arange(1, len(tokens), 2)
    shingles = max(1, len(word_at) - 4)
    target = rng.uniform(*aim)
    k = max(1, round(shingles * (1 - target) / (5 * (1 + target))))
    for p in rng.choice(word_at, min(k, len(word_at)), replace=False):
        tokens[p] = _VOCAB[int(rng.integers(len(_VOCAB)))]
    return "".join(tokens)


def _shard_task(task: tuple[int, int, int, int, str]) -> int:
    """Write shard s of the corpus (base documents, then copies of the next shard's documents)
    and its part of the truth."""
    from curation.dedup.minhash import jaccard, shingle_sets

    s, n_shards, per_shard, seed, folder = task
    _init_pool()
    n_copies = round(per_shard * COPY_FRACTION)
    n_base = per_shard - n_copies
    ids = [f"d{s * per_shard + j:09d}" for j in range(n_base)]
    texts = [base_document(seed, s * per_shard + j) for j in range(n_base)]
    created = [f"2019-{1 + j % 12:02d}-01T00:00:00Z" for j in range(n_base)]
    src = (s + 1) % n_shards
    rng = np.random.default_rng([seed, s, 1])
    kinds = [k for k, share, _ in COPY_KINDS for _ in range(share)]
    ranges = {k: r for k, _, r in COPY_KINDS}
    truth: list[tuple[str, str, str, str]] = []
    for c in range(n_copies):
        j = c * (n_base // n_copies)
        original = base_document(seed, src * per_shard + j)
        kind = kinds[c % len(kinds)]
        copy_id = f"c{s:05d}-{c:06d}"
        ids.append(copy_id)
        texts.append(planted_copy(original, kind, ranges[kind], rng))
        created.append(f"2021-{1 + c % 12:02d}-01T00:00:00Z")
        truth.append((copy_id, f"d{src * per_shard + j:09d}", original, kind))
    sets = shingle_sets([t for _, _, t, _ in truth] + texts[n_base:], 5)
    jac = [jaccard(sets[i], sets[len(truth) + i]) for i in range(len(truth))]
    pq.write_table(pa.table({"id": ids, "text": texts, "created": created}, schema=CORPUS_SCHEMA),
                   Path(folder) / f"shard-{s:05d}.parquet", compression="zstd", row_group_size=2000)
    pq.write_table(pa.table({"copy": [t[0] for t in truth], "original": [t[1] for t in truth], "jaccard": jac,
                             "kind": [t[3] for t in truth]}, schema=TRUTH_SCHEMA),
                   Path(folder) / "truth" / f"shard-{s:05d}.parquet")
    return per_shard


def make_corpus(folder: Path, n_docs: int, per_shard: int, workers: int, seed: int = 0) -> None:
    """The corpus as `shard-*.parquet` (id, text, created) and its truth in `truth/`."""
    n_shards = max(1, n_docs // per_shard)
    (folder / "truth").mkdir(parents=True, exist_ok=True)
    tasks = [(s, n_shards, per_shard, seed, str(folder)) for s in range(n_shards)]
    with Pool(workers) as pool:
        pool.map(_shard_task, tasks)


# ---------------------------------------------------------------------------------------------
# ours


def peak_rss(pid: int | str = "self") -> int:
    """Peak RSS of a process in bytes: VmHWM, the high-water mark of its own memory. Not
    getrusage's ru_maxrss, which Linux carries across execve: a process started by a big parent
    (a Ray worker by the raylet, this script's runs by the script) would report its parent's size."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 if pid == "self" else 0


def _measured(fn: Callable, item: Any) -> tuple[Any, int]:
    """Run a task and report the peak RSS of the process it ran in (bytes)."""
    return fn(item), peak_rss()


class PeakRssExecutor:
    """Wraps an executor; remembers the largest worker peak RSS any task reported."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.name, self.worker_peak = inner, inner.name, 0

    def map(self, fn: Callable, items: Sequence, desc: str = "") -> list:
        out = self.inner.map(partial(_measured, fn), items, desc)
        self.worker_peak = max([self.worker_peak] + [m for _, m in out])
        return [r for r, _ in out]

    def shutdown(self) -> None:
        self.inner.shutdown()


def _phase1_task(ctx: Any, shard: Any) -> dict:
    """Phase 1 of the pipeline for a corpus that is already text: the dedup signals per document,
    written where `process_shard` writes them."""
    from curation.config import CurationConfig
    from curation.document import Document
    from curation.pipeline import stage1_path
    from curation.registry import DEDUP_STEPS, build
    from curation.writer import write_parquet_docs

    cfg = CurationConfig.from_dict(ctx.config)
    t = pq.read_table(shard.path)
    stream: Any = (Document(id=i, text=x, source="bench", created=c) for i, x, c in
                   zip(t["id"].to_pylist(), t["text"].to_pylist(), t["created"].to_pylist(), strict=True))
    for spec in cfg.dedup:
        stream = build(spec.name, spec.params, DEDUP_STEPS).run(stream)
    rows = write_parquet_docs(stream, stage1_path(ctx, shard), internal=True)
    return {"shard": shard.key, "input_version": shard.version, "rows": rows}


def run_ours(corpus: Path, work: Path, workers: int, partitions: int) -> dict:
    import psutil

    from curation.config import CurationConfig
    from curation.executor import RayExecutor
    from curation.pipeline import RunContext, Shard, phase1_digest, run_dedup, write_shard

    cfg = CurationConfig.from_dict({"name": "bench", "dedup": [{"dedup_exact": {"partitions": partitions}},
                                                               {"dedup_minhash": {"partitions": partitions}}]})
    ctx = RunContext(config=cfg.to_dict(), work=str(work / "_work"), output=str(work / "out"), added="bench")
    files = sorted(corpus.glob("shard-*.parquet"))
    shards = [Shard(f"{i:05d}-{f.stem}", str(f), "bench") for i, f in enumerate(files)]
    t0 = time.perf_counter()
    ex = PeakRssExecutor(RayExecutor(num_cpus=workers, progress=False))
    ray_start = time.perf_counter() - t0
    me = psutil.Process()
    rss = {"ray_started": me.memory_info().rss}
    try:
        times = {}
        t = time.perf_counter()
        results = ex.map(partial(_phase1_task, ctx), shards)
        times["signatures"] = time.perf_counter() - t
        rss["signatures"] = me.memory_info().rss
        phase1 = phase1_digest(ctx, results)
        t = time.perf_counter()
        stats = run_dedup(ctx, shards, phase1, ex)
        times["dedup"] = time.perf_counter() - t
        rss["dedup"] = me.memory_info().rss
        t = time.perf_counter()
        written = ex.map(partial(write_shard, ctx, phase1), shards)
        times["write"] = time.perf_counter() - t
        rss["write"] = me.memory_info().rss
    finally:
        ex.shutdown()
    return {"system": "ours", "ray_start_s": ray_start, "phases_s": times, "wall_s": sum(times.values()),
            "driver_peak_rss": peak_rss(), "driver_rss_after": rss, "worker_peak_rss": ex.worker_peak, "partitions": partitions,
            "documents_written": sum(r["rows"] for r in written),
            "counters": {k: v for s in stats for k, v in s["counters"].items()},
            "output": str(work / "out" / "documents")}


# ---------------------------------------------------------------------------------------------
# datatrove


class ChildRssSampler(threading.Thread):
    """Largest peak RSS of any child process (datatrove's pool workers), read every 0.1 s."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.done = 0, threading.Event()

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self.done.wait(0.1):
            for child in me.children(recursive=True):
                self.peak = max(self.peak, peak_rss(child.pid))


def run_datatrove(corpus: Path, work: Path, workers: int, bands: int, rows: int) -> dict:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import ParquetReader
    from datatrove.pipeline.writers import ParquetWriter

    config = MinhashConfig(n_grams=5, num_buckets=bands, hashes_per_bucket=rows, seed=1)
    n_files = len(list(corpus.glob("shard-*.parquet")))

    def reader() -> ParquetReader:
        return ParquetReader(str(corpus), glob_pattern="shard-*.parquet", text_key="text", id_key="id")

    stages = {
        "signatures": ([reader(), MinhashDedupSignature(output_folder=str(work / "sigs"), config=config)],
                       n_files, workers),
        "buckets": ([MinhashDedupBuckets(input_folder=str(work / "sigs"), output_folder=str(work / "buckets"),
                                         config=config)], bands, workers),
        "cluster": ([MinhashDedupCluster(input_folder=str(work / "buckets"), output_folder=str(work / "remove"),
                                         config=config)], 1, 1),
        "filter": ([reader(), MinhashDedupFilter(input_folder=str(work / "remove")),
                    ParquetWriter(str(work / "out"))], n_files, workers),
    }
    sampler = ChildRssSampler()
    sampler.start()
    times = {}
    for name, (pipeline, tasks, n_workers) in stages.items():
        t = time.perf_counter()
        LocalPipelineExecutor(pipeline, tasks=tasks, workers=n_workers,
                              logging_dir=str(work / "logs" / name)).run()
        times[name] = time.perf_counter() - t
    sampler.done.set()
    return {"system": f"datatrove {bands}x{rows}", "phases_s": times, "wall_s": sum(times.values()),
            "driver_peak_rss": peak_rss(), "worker_peak_rss": sampler.peak, "output": str(work / "out")}


# ---------------------------------------------------------------------------------------------
# scoring against the truth


def s_curve(j: np.ndarray, bands: int, rows: int) -> np.ndarray:
    return 1 - (1 - j**rows) ** bands


def evaluate(corpus: Path, output: Path, bands: int, rows: int) -> dict:
    """Recall and precision of the drops against the planted pairs, overall and per Jaccard band."""
    all_ids = pa.concat_arrays([pq.read_table(f, columns=["id"])["id"].combine_chunks()
                                for f in sorted(corpus.glob("shard-*.parquet"))])
    kept = set(pa.concat_arrays([pq.read_table(f, columns=["id"])["id"].combine_chunks()
                                 for f in sorted(output.rglob("*.parquet"))]).to_pylist())
    dropped = set(all_ids.to_pylist()) - kept
    truth = pa.concat_tables([pq.read_table(f) for f in sorted((corpus / "truth").glob("*.parquet"))])
    copies, originals = truth["copy"].to_pylist(), truth["original"].to_pylist()
    jac = truth["jaccard"].to_numpy()
    lost = np.array([(c in dropped) + (o in dropped) for c, o in zip(copies, originals, strict=True)])
    positive = jac >= THRESHOLD
    detected = lost >= 1
    justified = int(((lost == 1) & positive).sum())
    out = {"documents": len(all_ids), "dropped": len(dropped), "positives": int(positive.sum()),
           "recall": float(detected[positive].mean()), "precision": justified / max(1, len(dropped)),
           "negatives_merged": int((detected & ~positive).sum()), "negatives": int((~positive).sum()),
           "bands": []}
    for lo, hi in BANDS_REPORTED:
        sel = (jac >= 1.0) if lo == 1.0 else (jac >= lo) & (jac < hi)
        if sel.any():
            out["bands"].append({"jaccard": [lo, hi], "pairs": int(sel.sum()), "lost_one": float(detected[sel].mean()),
                                 "s_curve": float(s_curve(jac[sel], bands, rows).mean())})
    return out


# ---------------------------------------------------------------------------------------------
# driver


def _in_fresh_process(args: list[str]) -> dict:
    """Run one system in a new interpreter, so its peak RSS is its own."""
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{args[:2]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000", help="comma-separated corpus sizes (documents)")
    ap.add_argument("--datatrove", default="", help="bands x rows settings for datatrove at the first size, "
                    "e.g. 26x11 (ours) or 26x11,14x8 (its default); empty to skip")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--docs-per-shard", type=int, default=10_000)
    ap.add_argument("--docs-per-partition", type=int, default=25_000,
                    help="our shuffle partitions = documents / this (worker memory stays bounded)")
    ap.add_argument("--signatures", action="store_true", help="also MinHash signatures/s vs datasketch")
    ap.add_argument("--workdir", default=None, help="default: a temporary folder, removed at the end")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--run", nargs=3, metavar=("SYSTEM", "CORPUS", "WORK"), help=argparse.SUPPRESS)
    ap.add_argument("--setting", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.run:  # one system, in this fresh process
        system, corpus, work = args.run
        if system == "ours":
            result = run_ours(Path(corpus), Path(work), args.workers, int(args.setting))
        else:
            bands, rows = map(int, args.setting.split("x"))
            result = run_datatrove(Path(corpus), Path(work), args.workers, bands, rows)
        print(json.dumps(result))
        return

    results: dict[str, Any] = {"workers": args.workers, "runs": []}
    if args.signatures:
        from benchmarks.curation_parts import bench_minhash, web_texts

        results["signatures"] = bench_minhash(web_texts())
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="dedup_scale_"))
    try:
        for i, n in enumerate(int(x) for x in args.sizes.split(",") if x):
            corpus = root / f"corpus-{n}"
            if not (corpus / "truth").is_dir():
                t = time.perf_counter()
                make_corpus(corpus, n, args.docs_per_shard, args.workers)
                print(f"corpus of {n:,} documents made in {time.perf_counter() - t:.0f} s", flush=True)
            partitions = max(1, round(n / args.docs_per_partition))
            runs = [("ours", str(partitions), 26, 11)]
            if i == 0:
                runs += [("datatrove", s, *map(int, s.split("x"))) for s in args.datatrove.split(",") if s]
            for system, setting, bands, rows in runs:
                work = root / f"work-{system}-{setting}-{n}"
                shutil.rmtree(work, ignore_errors=True)
                r = _in_fresh_process(["--run", system, str(corpus), str(work), "--setting", setting,
                                       "--workers", str(args.workers)])
                r.update(size=n, docs_per_s=n / r["wall_s"], quality=evaluate(corpus, Path(r["output"]), bands, rows))
                results["runs"].append(r)
                q = r["quality"]
                print(f"{r['system']:>16} {n:>9,} docs: {r['wall_s']:7.1f} s ({r['docs_per_s']:,.0f} docs/s), driver "
                      f"{_mb(r['driver_peak_rss'])}, largest worker {_mb(r['worker_peak_rss'])}; recall "
                      f"{q['recall']:.4f}, precision {q['precision']:.4f} ({q['dropped']:,} dropped)", flush=True)
                shutil.rmtree(work, ignore_errors=True)
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    text = json.dumps(results, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
