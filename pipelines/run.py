"""`refinery run [CONFIG]`: every stage of the main job, chained through files, resumable stage by stage.

The stages (pipelines/stages.py, pipelines/ablate.py, pipelines/report_html.py) run in STAGES' order.
Each reads what earlier stages wrote, writes OUTPUT/<stage>/, and records in OUTPUT/.run/<stage>.json
its status and a fingerprint of its settings and inputs (its config section, the input files, and the
fingerprints of the stages it reads). A rerun skips a stage whose marker says done with the same
fingerprint; a stage marked running with the same fingerprint was interrupted and resumes (every stage
function resumes: curation by shard, training from its last checkpoint, the sweep by proxy); a stage
whose fingerprint changed starts over in an emptied folder. `--from S` reruns S and the stages after it,
`--until S` stops after S; a stage outside the range that a selected one reads must be done already.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import glob
import hashlib
import json
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = Path(__file__).resolve().parent / "configs" / "quickstart.yaml"
MARKER_DIR = ".run"
MARKER_FORMAT = "refinery.run-stage/1"
DATA_VAR = "${data}"


class RunConfigError(ValueError):
    """A run config, input or stage selection that cannot be used as written; the message says what to change."""


def default_data_dir() -> Path:
    """The sample data beside the checkout: ../shared/data."""
    return REPO.parent / "shared" / "data"


@dataclass(frozen=True)
class Stage:
    name: str
    reads: tuple[str, ...]  # the stages whose files this one reads
    # The run config's sections (besides the stage's own) that its fingerprint covers.
    sections: tuple[str, ...] = ()
    folder: str = ""  # its folder under OUTPUT (default: its name)
    outputs: tuple[str, ...] = ()  # every path under OUTPUT it owns (default: its folder)

    def owned(self, out: Path) -> list[Path]:
        return [out / p for p in (self.outputs or (self.folder or self.name,))]


STAGES: tuple[Stage, ...] = (
    Stage("classify", ()),
    Stage("curate", ("classify",), sections=("input",)),
    Stage("tokenizer", ("curate",)),
    Stage("mix", ("classify", "curate", "tokenizer")),
    # Training stages answer the report's prompts when they finish: its section is one of their settings.
    Stage("pretrain", ("mix",), sections=("report",)),
    Stage("midtrain", ("pretrain", "mix"), sections=("tasks", "report")),
    Stage("sft", ("midtrain",), sections=("report",)),
    Stage("dpo", ("sft",), sections=("report",)),
    Stage("grpo", ("dpo", "midtrain"), sections=("report",)),
    Stage("export", ("grpo",), folder="model"),
    Stage("ablate", ("curate", "tokenizer", "mix")),
    Stage("report", ("classify", "curate", "tokenizer", "mix", "pretrain", "midtrain", "sft", "dpo", "grpo",
                     "export", "ablate"), folder="report_files", outputs=("report.html", "report.md", "report_files")),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
BY_NAME = {s.name: s for s in STAGES}
TOP_KEYS = ("name", "output", "seed", "threads", "data", "input", *STAGE_NAMES, "tasks")


@dataclass
class RunConfig:
    path: Path
    raw: dict[str, Any]  # the YAML with ${data} expanded and stage sections filled in
    out: Path
    data: Path
    inputs: list[str]  # --input or input.paths: paths, globs, listings, URLs, crawl names

    def section(self, name: str) -> dict[str, Any]:
        return copy.deepcopy(self.raw.get(name) or {})

    def resolve(self, path: str) -> Path:
        """A path named in the config: relative ones are relative to the config file."""
        p = Path(path)
        return p if p.is_absolute() else (self.path.parent / p).resolve()


def load_run_config(path: str | Path | None = None, *, output: str | Path | None = None,
                    inputs: list[str] | None = None, data: str | Path | None = None) -> RunConfig:
    path = Path(path) if path is not None else QUICKSTART
    if not path.is_file():
        raise RunConfigError(f"run config not found: {path}; give a YAML like {QUICKSTART.relative_to(REPO)}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RunConfigError(f"{path}: invalid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(raw, dict):
        raise RunConfigError(f"{path}: expected a mapping of stages at the top level")
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise RunConfigError(f"{path}: unknown top-level key {unknown[0]!r}; known: {', '.join(TOP_KEYS)}")
    data_dir = Path(data) if data is not None else (Path(raw["data"]) if raw.get("data") else default_data_dir())
    uses_data = DATA_VAR in path.read_text()
    given_inputs = list(inputs) if inputs else None
    if uses_data and not data_dir.is_dir():
        if given_inputs is None:
            raise RunConfigError(f"no input: the sample data is not at {data_dir}; pass --input with WARC files, "
                                 "URLs or a crawl name (CC-MAIN-2024-22), and --data DIR pointing at a copy of the "
                                 "sample data folder (its classifier, chat and evaluation text)")
        raise RunConfigError(f"{path} reads the sample data (classifier, chat and evaluation text) at {data_dir}, "
                             "which does not exist; pass --data DIR pointing at a copy of it")
    expanded = _expand(raw, str(data_dir.resolve()))
    inp = expanded.get("input") or {}
    if not isinstance(inp, dict):
        raise RunConfigError(f"{path}: `input` must be a mapping (paths, crawl_warcs)")
    config_inputs = inp.get("paths") or []
    if isinstance(config_inputs, str):
        config_inputs = [config_inputs]
    final_inputs = given_inputs if given_inputs is not None else list(config_inputs)
    if not final_inputs:
        raise RunConfigError(f"no input: {path} names no input.paths; pass --input with WARC files, URLs or a "
                             "crawl name such as CC-MAIN-2024-22")
    expanded["input"] = {**inp, "paths": final_inputs}
    for name in STAGE_NAMES:
        section = expanded.get(name)
        if section is None:
            raise RunConfigError(f"{path}: stage {name!r} has no section; every stage is named (an empty one: "
                                 f"`{name}: {{}}`)")
        if not isinstance(section, dict):
            raise RunConfigError(f"{path}: section {name!r} must be a mapping, got {section!r}")
    out = Path(output) if output is not None else Path(expanded.get("output") or "runs/quickstart")
    return RunConfig(path=path.resolve(), raw=expanded, out=out.resolve(), data=data_dir.resolve(),
                     inputs=final_inputs)


def _expand(value: Any, data: str) -> Any:
    if isinstance(value, str):
        return value.replace(DATA_VAR, data)
    if isinstance(value, list):
        return [_expand(v, data) for v in value]
    if isinstance(value, dict):
        return {k: _expand(v, data) for k, v in value.items()}
    return value


# ------------------------------------------------------------------------------------------- fingerprints

def _digest(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def input_signature(inputs: list[str]) -> list[Any]:
    """What identifies the inputs without reading them: local matches with size and mtime, URLs and
    crawl names as written."""
    from pipelines.crawl import is_crawl_name

    sig: list[Any] = []
    for item in inputs:
        if "://" in item or is_crawl_name(item):
            sig.append(item)
            continue
        matches = sorted(glob.glob(item, recursive=True)) or [item]
        for m in matches:
            p = Path(m)
            if p.is_dir():
                files = sorted(f for f in p.rglob("*") if f.is_file())
                sig.append([str(p.resolve()), sum(f.stat().st_size for f in files),
                            max((f.stat().st_mtime_ns for f in files), default=0)])
            elif p.is_file():
                st = p.stat()
                sig.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
            else:
                sig.append([m, None])
    return sig


def fingerprint(stage: Stage, cfg: RunConfig, upstream: dict[str, str]) -> str:
    parts: dict[str, Any] = {"stage": stage.name, "section": cfg.raw.get(stage.name),
                             "seed": cfg.raw.get("seed", 0), "reads": {r: upstream[r] for r in stage.reads}}
    for name in stage.sections:
        parts[name] = cfg.raw.get(name)
    if stage.name == "curate":
        parts["inputs"] = input_signature(cfg.inputs)
    return _digest(parts)


# ------------------------------------------------------------------------------------------------ markers

def marker_path(out: Path, stage: str) -> Path:
    return out / MARKER_DIR / f"{stage}.json"


def read_marker(out: Path, stage: str) -> dict[str, Any] | None:
    try:
        return json.loads(marker_path(out, stage).read_text())
    except (OSError, ValueError):
        return None


def write_marker(out: Path, stage: str, record: dict[str, Any]) -> None:
    path = marker_path(out, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps({"format": MARKER_FORMAT, "stage": stage, **record}, indent=1, default=str) + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def hold_run(out: Path) -> Iterator[None]:
    """One run per output folder at a time (an advisory lock, released when the process ends)."""
    lock_path = out / MARKER_DIR / "lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunConfigError(f"another `refinery run` is writing {out}; wait for it or choose another "
                                 "--output") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------------------- the run

@dataclass
class StageContext:
    """What a stage function gets: the config, where to write, and where earlier stages wrote."""

    cfg: RunConfig
    stage: Stage
    progress: bool
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)  # of earlier stages

    @property
    def out(self) -> Path:
        return self.cfg.out

    @property
    def dir(self) -> Path:
        return self.cfg.out / (self.stage.folder or self.stage.name)

    @property
    def section(self) -> dict[str, Any]:
        return self.cfg.section(self.stage.name)

    def log(self, message: str) -> None:
        print(f"  {self.stage.name}: {message}", file=sys.stderr, flush=True)


def select_stages(start: str | None, until: str | None, only: list[str] | None = None) -> list[str]:
    """The stages to run, in order: `only` and what it reads (transitively), or the range start..until."""
    for name in (start, until, *(only or [])):
        if name is not None and name not in BY_NAME:
            raise RunConfigError(f"unknown stage {name!r}; stages: {', '.join(STAGE_NAMES)}")
    if only:
        wanted: set[str] = set()
        todo = list(only)
        while todo:
            name = todo.pop()
            if name not in wanted:
                wanted.add(name)
                todo.extend(BY_NAME[name].reads)
        return [n for n in STAGE_NAMES if n in wanted]
    lo = STAGE_NAMES.index(start) if start else 0
    hi = STAGE_NAMES.index(until) if until else len(STAGE_NAMES) - 1
    if lo > hi:
        raise RunConfigError(f"--from {start} comes after --until {until}; stages run in this order: "
                             f"{', '.join(STAGE_NAMES)}")
    return list(STAGE_NAMES[lo:hi + 1])


def stage_function(name: str) -> Callable[[StageContext], dict[str, Any]]:
    if name == "ablate":
        from pipelines.ablate import run_ablate_stage

        return run_ablate_stage
    if name == "report":
        from pipelines.report_html import run_report_stage

        return run_report_stage
    from pipelines import stages

    return getattr(stages, f"run_{name}")


def _cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run_pipeline(config: str | Path | None = None, *, output: str | Path | None = None,
                 inputs: list[str] | None = None, data: str | Path | None = None, start: str | None = None,
                 until: str | None = None, only: list[str] | None = None, progress: bool = True,
                 print_summary: bool = True) -> dict[str, Any]:
    """Run the selected stages of `config` (default: the quickstart); returns the run summary
    (also written to OUTPUT/summary.json)."""
    cfg = load_run_config(config, output=output, inputs=inputs, data=data)
    selected = select_stages(start, until, only)
    rerun = set(selected) if start else set()
    cfg.out.mkdir(parents=True, exist_ok=True)
    with hold_run(cfg.out):
        return _run(cfg, selected, rerun, progress, print_summary)


def _run(cfg: RunConfig, selected: list[str], rerun: set[str], progress: bool, print_summary: bool) -> dict[str, Any]:
    prints: dict[str, str] = {}
    summaries: dict[str, dict[str, Any]] = {}
    records: dict[str, dict[str, Any]] = {}
    needed = {r for name in selected for r in BY_NAME[name].reads} - set(selected)
    t_run = time.perf_counter()
    shown = [s for s in STAGES if s.name in selected]
    for stage in STAGES:
        fp = fingerprint(stage, cfg, prints)
        prints[stage.name] = fp
        marker = read_marker(cfg.out, stage.name)
        done = marker is not None and marker.get("status") == "done" and marker.get("fingerprint") == fp
        if stage.name not in selected:
            if done:
                summaries[stage.name] = marker.get("summary") or {}
                records[stage.name] = {"status": "done before", "seconds": marker.get("seconds")}
            elif stage.name in needed:
                why = "has not run" if marker is None else (
                    "ran with other settings or inputs" if marker.get("fingerprint") != fp else "did not finish")
                raise RunConfigError(f"stage {stage.name} {why}, and a selected stage reads it; run it first "
                                     f"(e.g. --from {stage.name})")
            continue
        index = shown.index(stage) + 1
        if done and stage.name not in rerun:
            summaries[stage.name] = marker.get("summary") or {}
            records[stage.name] = {"status": "skipped (done)", "seconds": marker.get("seconds")}
            print(f"[{index}/{len(shown)}] {stage.name}: done before ({marker.get('seconds')} s), skipped",
                  file=sys.stderr, flush=True)
            continue
        resume = (marker is not None and marker.get("fingerprint") == fp and marker.get("status") == "running"
                  and stage.name not in rerun)
        if not resume:
            for p in stage.owned(cfg.out):
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        verb = "resuming" if resume else "running"
        print(f"[{index}/{len(shown)}] {stage.name}: {verb}", file=sys.stderr, flush=True)
        started = datetime.now(UTC).isoformat(timespec="seconds")
        write_marker(cfg.out, stage.name, {"status": "running", "fingerprint": fp, "started": started})
        t0, c0 = time.perf_counter(), _cpu_seconds()
        ctx = StageContext(cfg, stage, progress, summaries)
        summary = stage_function(stage.name)(ctx)
        seconds, cpu = round(time.perf_counter() - t0, 1), round(_cpu_seconds() - c0, 1)
        write_marker(cfg.out, stage.name, {"status": "done", "fingerprint": fp, "started": started,
                                           "seconds": seconds, "cpu_seconds": cpu, "resumed": resume,
                                           "summary": summary})
        summaries[stage.name] = summary
        records[stage.name] = {"status": "resumed" if resume else "ran", "seconds": seconds, "cpu_seconds": cpu}
        print(f"[{index}/{len(shown)}] {stage.name}: finished in {seconds} s", file=sys.stderr, flush=True)
    result = {"config": str(cfg.path), "output": str(cfg.out), "stages": records, "summaries": summaries,
              "wall_seconds": round(time.perf_counter() - t_run, 1)}
    tmp = cfg.out / ".tmp-summary.json"
    tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
    os.replace(tmp, cfg.out / "summary.json")
    if print_summary:
        print(summary_text(result))
    return result


# ----------------------------------------------------------------------------------------------- summary

def _f(x: Any, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def stage_figures(name: str, s: dict[str, Any]) -> str:
    """The one line of figures the summary table shows for a stage."""
    if not s:
        return ""
    if name == "classify":
        return (f"quality acc {_f(s.get('quality', {}).get('accuracy'))}, "
                f"topic acc {_f(s.get('topic', {}).get('accuracy'))}")
    if name == "curate":
        return f"{s.get('documents_read', 0):,} docs in → {s.get('documents_written', 0):,} out"
    if name == "tokenizer":
        return f"vocab {s.get('vocab_size')}"
    if name == "mix":
        return (f"{s.get('pools')} pools, {s.get('tokens', 0):,} tokens; {s.get('proxies_ok')} proxies, "
                f"Spearman {_f(s.get('spearman'))} ({s.get('fit_model')})")
    if name in ("pretrain", "midtrain", "sft", "dpo"):
        line = f"loss {_f(s.get('initial_loss'))} → {_f(s.get('loss'))}"
        if s.get("eval_loss") is not None:
            start = f"{_f(s['initial_eval_loss'])} → " if s.get("initial_eval_loss") is not None else ""
            line += f", held-out {start}{_f(s.get('eval_loss'))}"
        if s.get("eval_accuracy") is not None:
            line += f", pair accuracy {_f(s.get('eval_accuracy'))}"
        return line
    if name == "grpo":
        return (f"held-out reward {_f(s.get('initial_eval_reward'))} → {_f(s.get('eval_reward'))}; "
                f"train reward {_f(s.get('first_reward'))} → {_f(s.get('last_reward'))}")
    if name == "export":
        return f"{s.get('path')} (transformers: {s.get('transformers', '-')})"
    if name == "ablate":
        return "; ".join(f"{arm} {_f(v.get('mean'))}" for arm, v in (s.get("objective") or {}).items())
    if name == "report":
        return str(s.get("html", ""))
    return ""


def summary_text(result: dict[str, Any]) -> str:
    lines = [f"refinery run → {result['output']} ({result['wall_seconds']} s)", "",
             f"{'stage':<10} {'status':<15} {'wall s':>8}  figures"]
    for name, rec in result["stages"].items():
        lines.append(f"{name:<10} {rec['status']:<15} {_f(rec.get('seconds'), 1):>8}  "
                     f"{stage_figures(name, result['summaries'].get(name, {}))}")
    cur = result["summaries"].get("curate")
    mix = result["summaries"].get("mix")
    if cur:
        lines += ["", f"documents: {cur.get('documents_read', 0):,} read, {cur.get('documents_written', 0):,} kept"
                  + (f"; tokens: {mix.get('tokens', 0):,} in {mix.get('pools')} pools" if mix else "")]
    rep = result["summaries"].get("report")
    if rep:
        lines.append(f"report: {rep.get('html')} and {rep.get('markdown')}")
    exp = result["summaries"].get("export")
    if exp:
        lines.append(f"model: {exp.get('path')}  (refinery generate {exp.get('path')} --prompt ...)")
    return "\n".join(lines)


__all__ = ["STAGES", "STAGE_NAMES", "RunConfig", "RunConfigError", "StageContext", "load_run_config", "run_pipeline",
           "select_stages", "summary_text", "default_data_dir", "QUICKSTART"]
