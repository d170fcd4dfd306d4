"""Per-step curation benchmarks against their anchors (called by benchmarks/curation.py)."""

from __future__ import annotations

import gzip
import json
import re
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def _best_of(fn: Callable[[], object], rounds: int = 3) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


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
    out = {}
    for name in ("resiliparse", "trafilatura"):
        step = Extract(extractor=name)

        def run(step: Extract = step) -> None:
            for d in pages:
                d2 = type(d)(id=d.id, text="", source=d.source, metadata=dict(d.metadata), raw=d.raw,
                             charset=d.charset)
                list(step([d2]))

        secs = _best_of(run, rounds=1 if name == "trafilatura" else 2)
        out[name] = {"pages": len(pages), "pages_per_s": len(pages) / secs}
    out["ratio"] = out["resiliparse"]["pages_per_s"] / out["trafilatura"]["pages_per_s"]
    print(f"extraction: resiliparse {out['resiliparse']['pages_per_s']:.0f} pages/s, trafilatura "
          f"{out['trafilatura']['pages_per_s']:.0f} → {out['ratio']:.1f}×")
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

    t_ours = _best_of(lambda: [ours.signatures(docs[i:i + 256]) for i in range(0, len(docs), 256)])
    t_ds = _best_of(datasketch_all)
    t_ds_xx = _best_of(lambda: datasketch_all(xxhash.xxh32_intdigest))
    out = {"docs": len(docs), "num_perm": num_perm, "ours_sig_per_s": len(docs) / t_ours,
           "datasketch_sig_per_s": len(docs) / t_ds, "ratio": t_ds / t_ours,
           "datasketch_xxh32_sig_per_s": len(docs) / t_ds_xx, "ratio_vs_xxh32": t_ds_xx / t_ours}
    print(f"minhash: ours {out['ours_sig_per_s']:.0f} sig/s, datasketch {out['datasketch_sig_per_s']:.0f} "
          f"→ {out['ratio']:.1f}× (datasketch with an xxh32 hash: {out['ratio_vs_xxh32']:.1f}×)")
    return out


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
