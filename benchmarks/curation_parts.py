"""Per-step curation benchmarks against their anchors (called by benchmarks/curation.py)."""

from __future__ import annotations

import contextlib
import gzip
import json
import re
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def _times(fn: Callable[[], object], rounds: int = 3) -> list[float]:
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _rates(n: int, seconds: list[float]) -> dict:
    """Items per second: median and min-max over the rounds."""
    rates = [n / s for s in seconds]
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates)}


class DatatroveTrafilatura:
    """trafilatura called exactly as datatrove's `Trafilatura` extractor calls it
    (datatrove/pipeline/extractors/trafilatura.py: favor_precision=True, include_comments=False,
    deduplicate=True, trafilatura's default config), for our Extract step in the same-extractor
    comparison. Our own `extractor: trafilatura` keeps short pages (minimum sizes 0) instead."""

    def __call__(self, html: str) -> str:
        from trafilatura import extract

        return extract(html, favor_precision=True, include_comments=False, deduplicate=True) or ""


@contextlib.contextmanager
def trafilatura_as_datatrove() -> Iterator[None]:
    """While open, `Extract(extractor="trafilatura")` built in this process uses DatatroveTrafilatura
    (a module-level class, so it pickles to the extraction child, which imports this module)."""
    import curation.extract as extract

    original = extract._extractor
    extract._extractor = lambda name: DatatroveTrafilatura() if name == "trafilatura" else original(name)
    try:
        yield
    finally:
        extract._extractor = original


def web_texts() -> list[str]:
    """Real web text: C4 English and Dolma CC documents."""
    wt = DATA / "web_text"
    docs = [json.loads(line)["text"] for line in open(next((wt / "c4_en_sample").glob("*train*.jsonl")))]
    for f in sorted((wt / "dolma_cc_fixtures").glob("*.jsonl.gz")):
        docs += [json.loads(line)["text"] for line in gzip.open(f, "rt")]
    return docs


def bench_extract(files: list[str]) -> dict:
    from curation.extract import Extract
    from curation.read.warc import WarcReader

    pages = [d for f in files for d in WarcReader().read(f)]
    out: dict = {"pages": len(pages)}
    times: dict[str, list[float]] = {}
    for name in ("resiliparse", "hybrid", "trafilatura"):
        step = Extract(extractor=name)

        def run(step: Extract = step, pages: list = pages) -> None:
            for d in pages:
                d2 = type(d)(id=d.id, text="", source=d.source, metadata=dict(d.metadata), raw=d.raw,
                             charset=d.charset)
                list(step([d2]))

        run(pages=pages[:20])  # starts the extraction child and warms the extractor
        times[name] = _times(run)
        out[name] = {"pages_per_s": _rates(len(pages), times[name])}
        step.close()
    for name in ("resiliparse", "hybrid"):
        out[f"ratio_{name}_vs_trafilatura"] = statistics.median(times["trafilatura"]) / statistics.median(times[name])
    print("extraction pages/s (median of 3): " + ", ".join(
        f"{n} {out[n]['pages_per_s']['median']:.0f}" for n in ("resiliparse", "hybrid", "trafilatura"))
        + f"; hybrid / trafilatura {out['ratio_hybrid_vs_trafilatura']:.1f}×")
    return out


def bench_minhash(docs: list[str]) -> dict:
    import xxhash
    from datasketch import MinHash

    from curation.dedup.minhash import MinHasher

    num_perm, seed, n = 26 * 11, 1, 5
    ours = MinHasher(num_perm, seed, n)
    ours.signatures(docs[:2])
    word_re = re.compile(r"[^\W_]+")
    perms = MinHash(num_perm=num_perm, seed=seed).permutations

    def datasketch_all(hashfunc: Callable | None = None) -> None:
        for d in docs:
            ws = word_re.findall(d.lower())
            shingles = [" ".join(ws[i:i + n]).encode() for i in range(max(1, len(ws) - n + 1))]
            m = MinHash(num_perm=num_perm, seed=seed, permutations=perms, scheme="affine32", hashfunc=hashfunc)
            m.update_batch(shingles)

    def ours_all() -> None:
        for i in range(0, len(docs), 256):
            ours.signatures(docs[i:i + 256])

    # Rounds interleave the three, so load on the shared machine hits them alike; ratios per round.
    t_ours, t_ds, t_ds_xx = [], [], []
    for _ in range(3):
        t_ours += _times(ours_all, 1)
        t_ds_xx += _times(lambda: datasketch_all(xxhash.xxh32_intdigest), 1)
        t_ds += _times(datasketch_all, 1)
    n_docs = len(docs)
    out = {"docs": n_docs, "num_perm": num_perm, "ours_sig_per_s": _rates(n_docs, t_ours),
           "datasketch_xxh32_sig_per_s": _rates(n_docs, t_ds_xx), "datasketch_sig_per_s": _rates(n_docs, t_ds),
           "ratio_vs_xxh32": _ratios(t_ds_xx, t_ours), "ratio": _ratios(t_ds, t_ours)}
    x, d = out["ratio_vs_xxh32"], out["ratio"]
    print(f"minhash: ours {out['ours_sig_per_s']['median']:.0f} sig/s; vs datasketch given xxh32 "
          f"{x['median']:.2f}× ({x['min']:.2f}-{x['max']:.2f}), vs its default sha1 {d['median']:.2f}× "
          f"({d['min']:.2f}-{d['max']:.2f})")
    return out


def _ratios(anchor: list[float], ours: list[float]) -> dict:
    r = [a / o for a, o in zip(anchor, ours, strict=True)]
    return {"median": statistics.median(r), "min": min(r), "max": max(r)}


def run_parts(files: list[str], skip: list[str]) -> dict:
    results: dict = {}
    docs = web_texts()
    if "extract" not in skip:
        results["extract"] = bench_extract(files)
    if "minhash" not in skip:
        results["minhash"] = bench_minhash(docs)
    if "pii" not in skip:
        from benchmarks.pii_bench import bench_pii

        results["pii"] = bench_pii(docs)
    return results
