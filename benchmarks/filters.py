"""Heuristic and URL filters, ours vs datatrove, docs/s on the same real web documents.

    python benchmarks/filters.py [--out results.json]

Each (implementation, filter) pair runs in a fresh process so one-time loading (blocklists) is
reported apart as setup seconds and neither side warms the other's caches. Documents: every
document of ../shared/data/web_text (C4, Dolma CC, HPLT, OSCAR, Pile, RedPajama), ~4,000.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
FILTERS = ("gopher_quality", "gopher_repetition", "c4", "fineweb", "url", "chain")


def _jsonl(path: Path) -> Iterator[dict]:
    if path.suffix == ".gz":
        f = gzip.open(path, "rt", encoding="utf-8")
    elif path.suffix == ".zst":
        import zstandard

        f = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")), encoding="utf-8",
                             errors="replace")
    else:
        f = open(path, encoding="utf-8")
    with f:
        yield from (json.loads(line) for line in f if line.strip())


def load_docs() -> list[tuple[str, str, str | None]]:
    """(id, text, url or None) for every web_text document."""
    w = DATA / "web_text"
    out: list[tuple[str, str, str | None]] = []
    for p in sorted((w / "c4_en_sample").iterdir()):
        if p.name.endswith((".jsonl", ".json.gz", ".jsonl.gz")):
            out += [(f"{p.name}:{i}", r["text"], r.get("url")) for i, r in enumerate(_jsonl(p))]
    for p in sorted((w / "dolma_cc_fixtures").iterdir()):
        if p.name.endswith((".jsonl", ".json.gz", ".jsonl.gz")):
            for i, r in enumerate(_jsonl(p)):
                url = (r.get("metadata") or {}).get("url") or (r["id"] if str(r["id"]).startswith("http") else None)
                out.append((f"{p.name}:{i}", r["text"], url))
    for p in sorted((w / "hplt_cc_random_sample100").glob("*.jsonl.zst")):
        out += [(f"{p.name}:{i}", r.get("t") or "", r.get("u")) for i, r in enumerate(_jsonl(p))]
    for i, r in enumerate(_jsonl(w / "oscar_sample_annotated" / "oscar_data.jsonl")):
        out.append((f"oscar:{i}", r["content"], r["warc_headers"].get("warc-target-uri")))
    for i, r in enumerate(_jsonl(w / "pile_toy_sample" / "toy_pile_data.jsonl")):
        out.append((f"pile:{i}", r["contents"], None))
    for p in sorted((w / "redpajama_tiny_samples").glob("*.jsonl")):
        out += [(f"{p.name}:{i}", r["text"], None) for i, r in enumerate(_jsonl(p))]
    return out


def run_one(impl: str, name: str) -> dict:
    docs = load_docs()
    if name == "url":
        docs = [d for d in docs if d[2]]
    t0 = time.perf_counter()
    if impl == "ours":
        from curation.document import Document
        from curation.filters.c4 import C4Filter
        from curation.filters.fineweb import FineWebFilter
        from curation.filters.gopher_quality import GopherQualityFilter
        from curation.filters.gopher_repetition import GopherRepetitionFilter
        from curation.filters.url import UrlFilter

        classes = {"gopher_quality": [GopherQualityFilter], "gopher_repetition": [GopherRepetitionFilter],
                   "c4": [C4Filter], "fineweb": [FineWebFilter], "url": [UrlFilter],
                   "chain": [UrlFilter, GopherQualityFilter, GopherRepetitionFilter, C4Filter, FineWebFilter]}[name]
        steps = [c() for c in classes]
        setup = time.perf_counter() - t0
        t0 = time.perf_counter()
        stream: Iterator = (Document(id=i, text=t, source="b", metadata={"url": u} if u else {}) for i, t, u in docs)
        for s in steps:  # the Step API: C4 rewrites the text the next step sees
            stream = s(stream)
        kept = sum(1 for _ in stream)
    else:
        warnings.filterwarnings("ignore")
        from datatrove.data import Document as DtDocument
        from datatrove.pipeline import filters as F
        from tldextract import TLDExtract

        classes = {"gopher_quality": [F.GopherQualityFilter], "gopher_repetition": [F.GopherRepetitionFilter],
                   "c4": [F.C4QualityFilter], "fineweb": [F.FineWebQualityFilter], "url": [F.URLFilter],
                   "chain": [F.URLFilter, F.GopherQualityFilter, F.GopherRepetitionFilter, F.C4QualityFilter,
                             F.FineWebQualityFilter]}[name]
        filters = [c() for c in classes]
        for f in filters:
            if isinstance(f, F.URLFilter):  # offline: no public-suffix download
                f.tldextractor = TLDExtract(suffix_list_urls=(), cache_dir=None)
                f.download_data()
        setup = time.perf_counter() - t0
        t0 = time.perf_counter()
        kept = 0
        for i, t, u in docs:
            doc = DtDocument(text=t, id=i, metadata={"url": u or "http://example.com/"})
            ok = True
            for f in filters:
                r = f.filter(doc)
                if not (r is True or (isinstance(r, tuple) and r[0])):
                    ok = False
                    break
            kept += ok
    dt = time.perf_counter() - t0
    return {"impl": impl, "filter": name, "docs": len(docs), "kept": kept, "seconds": dt,
            "docs_per_s": len(docs) / dt, "setup_s": setup}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--one", nargs=2, metavar=("IMPL", "FILTER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(*args.one)))
        return
    rows = []
    for name in FILTERS:
        res = {}
        for impl in ("ours", "datatrove"):
            proc = subprocess.run([sys.executable, __file__, "--one", impl, name], capture_output=True, text=True,
                                  cwd=REPO, check=True)
            res[impl] = json.loads(proc.stdout.strip().splitlines()[-1])
        ratio = res["ours"]["docs_per_s"] / res["datatrove"]["docs_per_s"]
        rows.append({"filter": name, **{k: v for k, v in res.items()}, "ratio": ratio})
        print(f"{name:18s} ours {res['ours']['docs_per_s']:8.0f} docs/s  datatrove "
              f"{res['datatrove']['docs_per_s']:7.0f}  → {ratio:5.1f}×  (kept {res['ours']['kept']} vs "
              f"{res['datatrove']['kept']} of {res['ours']['docs']})")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
