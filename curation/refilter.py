"""`refinery refilter CORPUS CONFIG --output NEW`: new thresholds on a finished corpus's stored scores.

Every document of CORPUS (its kept documents, and its kept rejects in `rejected/` when the run had
`--keep-rejected`) is decided again by CONFIG's filters, from the scores stored in
`metadata["attributes"]`, without rerunning a model. A document resumes the pipeline where the
corpus's run left it:

- a step it already went through (every step for a kept document; the steps before its drop for a
  reject) decides from its stored scores with the new thresholds; a step that rewrites text
  (a mapper such as `line_modifiers` or `pii`, or `c4`'s line rules) is not applied again: its edits
  are in the stored text;
- a step it never reached (a reject that now passes the step that dropped it) runs for real when it
  is cheap (a text heuristic, `Step.rescoring_cost == "cheap"`): a filter scores the stored text, a
  mapper edits it, as a fresh `refinery curate` would. A model step (`"model"`: language ID, the
  classifier) is never run: the document keeps its old decision, counted as
  `refilter.missing_scores.<step>`. So is a document whose stored scores lack one the step reads
  (e.g. a new n-gram size), where the stored text is no longer the text the step saw.
- dedup is never rerun: dedup's drops stay out, and documents newly kept are not deduplicated
  (counted `not_deduplicated`; the report says so).

What CONFIG may change, checked before any work (else a `RefilterError` naming the step): a
filter's thresholds (`Filter.decision_params`), and removing a filter that does not rewrite text;
adding a cheap filter that does not rewrite text. Anything else (a step that rewrites text with
other parameters or gone, a model path, another dedup, steps reordered, a model step the corpus
never ran) changes what the stored text or scores mean and needs `refinery curate`. The corpus's
config comes from its `_work/run.json` (or a refiltered corpus's `stats.json`).

A reject written here records where its stored text stands when that is not the step that dropped
it: `metadata["rejected"]["resume_at"]` names the first step that has not rewritten it (null: every
step has), so refiltering a refiltered corpus resumes each document at the right place.

The output is a new corpus directory in the corpus layout (`documents/` partitioned as the config
says, `stats.json` listing the files, `report.md` with the funnel), built in a temporary sibling
directory and renamed into place: CORPUS is never modified, and NEW appears whole or not at all.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from curation.config import CurationConfig, StepSpec, validate_buildable
from curation.corpus import (
    DOCUMENTS_DIR,
    RUN_FILE,
    STATS_FILE,
    WORK_DIR,
    CorpusError,
    curation_root,
    listed_files,
)
from curation.document import Document
from curation.executor import make_executor
from curation.partition import PartitionedWriter, Partitioner
from curation.registry import DEDUP_STEPS, DOC_STEPS, ConfigError, build, resolve
from curation.rejected import REJECTED_DIR
from curation.step import Filter, Mapper, StepStats, built_once
from curation.writer import (
    DOCUMENT_SUFFIXES,
    atomic_write_text,
    read_documents,
    rows_table,
    shard_name,
    stored_metadata,
    stored_row,
)

log = logging.getLogger(__name__)

# The place of the dedup steps in a config's sequence of steps (`steps`, dedup, `after_dedup`).
DEDUP = "<dedup>"
REPORT_FILE = "report.md"
WRITE_BATCH_ROWS = 2000
# What `refilter` and `_publish` name their directories beside the output.
_TMP_DIR = re.compile(r"\.(tmp|old)-(?P<pid>\d+)-(?P<name>.+)")


class RefilterError(ConfigError):
    """A corpus or config that refilter cannot work from; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# the plan: CONFIG's steps matched to the corpus's, checked before any work


@dataclass(frozen=True)
class PlanStep:
    """One step of CONFIG's sequence and where it sits in the corpus's sequence."""

    name: str
    params: dict[str, Any]
    kind: str  # "filter", "mapper", "step" (another document step, e.g. extract) or "dedup"
    # Its index in the corpus's sequence; None for a filter the corpus never ran.
    old_index: int | None
    # Where it sits in the corpus's sequence: old_index, or for a new filter the next matched step's.
    pos: int
    edits_text: bool
    cheap: bool


@dataclass(frozen=True)
class Plan:
    steps: tuple[PlanStep, ...]
    old_names: tuple[str, ...]  # the corpus's sequence, DEDUP for its dedup steps
    old_edits: tuple[bool, ...]  # which of those rewrite text
    old_filters: tuple[bool, ...]  # which of those are filters
    dedup_names: frozenset[str]
    has_dedup: bool

    @property
    def dedup_index(self) -> int:
        return self.old_names.index(DEDUP)


def _sequence(cfg: CurationConfig) -> list[StepSpec]:
    return [*cfg.steps, StepSpec(DEDUP), *cfg.after_dedup]


def _kind(cls: type) -> str:
    return "filter" if issubclass(cls, Filter) else "mapper" if issubclass(cls, Mapper) else "step"


def _edits_text(cls: type) -> bool:
    """Steps that rewrite text: every non-filter step, and filters that edit kept text (c4)."""
    return not issubclass(cls, Filter) or cls.on_keep is not Filter.on_keep


def _plain(value: Any) -> Any:
    """YAML lists and Python tuples compare equal."""
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def effective_params(cls: type, params: dict[str, Any]) -> dict[str, Any]:
    """A step's parameters with its constructor's defaults filled in."""
    out = {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
           if name != "self" and p.default is not inspect.Parameter.empty}
    out.update(params)
    return {k: _plain(v) for k, v in out.items()}


def _changes(cls: type, old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    a, b = effective_params(cls, old), effective_params(cls, new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def plan_refilter(old: CurationConfig, new: CurationConfig) -> Plan:
    """Match CONFIG's steps to the corpus's in order; refuse what stored scores cannot answer."""
    old_dedup = [(s.name, effective_params(resolve(s.name, DEDUP_STEPS), s.params)) for s in old.dedup]
    new_dedup = [(s.name, effective_params(resolve(s.name, DEDUP_STEPS), s.params)) for s in new.dedup]
    if old_dedup != new_dedup:
        raise RefilterError(f"CONFIG's dedup ({[n for n, _ in new_dedup] or 'none'}) differs from the corpus's "
                            f"({[n for n, _ in old_dedup] or 'none'}); refilter never reruns dedup: copy the "
                            "corpus's dedup section, or rerun `refinery curate` for another dedup")
    old_seq = _sequence(old)
    old_cls = [None if s.name == DEDUP else resolve(s.name, DOC_STEPS) for s in old_seq]
    steps: list[PlanStep] = []
    i = 0
    for spec in _sequence(new):
        if spec.name == DEDUP:
            t = next(k for k, s in enumerate(old_seq) if s.name == DEDUP)
            for k in range(i, t):
                _check_removable(old_seq[k], old_cls[k])
            steps.append(PlanStep(DEDUP, {}, "dedup", t, t, False, True))
            i = t + 1
            continue
        cls = resolve(spec.name, DOC_STEPS)
        t = next((k for k in range(i, len(old_seq)) if old_seq[k].name == spec.name), None)
        if t is None:
            if any(s.name == spec.name for s in old_seq[:i]):
                raise RefilterError(f"step `{spec.name}` comes later in CONFIG than in the corpus's config; refilter "
                                    "keeps the corpus's order of steps (rerun `refinery curate` to reorder)")
            _check_addable(spec.name, cls)
            steps.append(PlanStep(spec.name, spec.params, "filter", None, -1, False, True))
            continue
        for k in range(i, t):
            _check_removable(old_seq[k], old_cls[k])
        _check_params(spec.name, cls, old_seq[t].params, spec.params)
        steps.append(PlanStep(spec.name, spec.params, _kind(cls), t, t, _edits_text(cls),
                              cls.rescoring_cost == "cheap"))
        i = t + 1
    for k in range(i, len(old_seq)):
        _check_removable(old_seq[k], old_cls[k])
    # A new filter sits where the next matched step sits in the corpus's sequence.
    placed: list[PlanStep] = []
    for j, p in enumerate(steps):
        if p.old_index is None:
            nxt = next((q.old_index for q in steps[j + 1:] if q.old_index is not None), len(old_seq))
            p = PlanStep(p.name, p.params, p.kind, None, nxt, p.edits_text, p.cheap)
        placed.append(p)
    return Plan(
        steps=tuple(placed),
        old_names=tuple(s.name for s in old_seq),
        old_edits=tuple(c is not None and _edits_text(c) for c in old_cls),
        old_filters=tuple(c is not None and issubclass(c, Filter) for c in old_cls),
        dedup_names=frozenset(s.name for s in old.dedup),
        has_dedup=bool(old.dedup),
    )


def _check_removable(spec: StepSpec, cls: type | None) -> None:
    if cls is None or not issubclass(cls, Filter) or _edits_text(cls):
        raise RefilterError(f"the corpus's step `{spec.name}` is missing from CONFIG (or moved): it rewrote the "
                            "stored text, which refilter cannot undo; keep it, in place, with the corpus's "
                            "parameters (or rerun `refinery curate`)")


def _check_addable(name: str, cls: type) -> None:
    if not issubclass(cls, Filter):
        raise RefilterError(f"step `{name}` is not in the corpus's config and is not a filter: refilter only "
                            "decides again from stored scores; add it with `refinery curate`")
    if cls.rescoring_cost != "cheap":
        raise RefilterError(f"step `{name}` is not in the corpus's config, so no document has its scores, and it "
                            "runs a model, which refilter never does; add it with `refinery curate`")
    if _edits_text(cls):
        raise RefilterError(f"step `{name}` is not in the corpus's config and rewrites kept text: refilter keeps "
                            "the corpus's text; add it with `refinery curate`")


def _check_params(name: str, cls: type, old: dict[str, Any], new: dict[str, Any]) -> None:
    changed = _changes(cls, old, new)
    allowed = getattr(cls, "decision_params", frozenset())
    bad = {k: v for k, v in changed.items() if k not in allowed}
    if not bad:
        return
    shown = ", ".join(f"`{k}` {a!r} → {b!r}" for k, (a, b) in bad.items())
    if allowed:
        why = (f"these change what its stored scores mean (they came from the corpus's setting); only its "
               f"thresholds can change here: {', '.join(sorted(allowed))}")
    elif issubclass(cls, Filter):
        why = "this filter declares no threshold that refilter may change"
    else:
        why = "the step rewrote the stored text with the corpus's parameters"
    raise RefilterError(f"step `{name}` differs from the corpus's config ({shown}): {why}; rerun `refinery curate` "
                        "for this change")


# ---------------------------------------------------------------------------------------------
# the corpus: its config and files


def corpus_config(root: Path) -> CurationConfig:
    """The config that made the corpus: `_work/run.json` of a curate run, else stats.json's `config`."""
    for path, what in ((root / WORK_DIR / RUN_FILE, "run record"), (root / STATS_FILE, "stats")):
        if path.is_file():
            raw = json.loads(path.read_text()).get("config")
            if raw is not None:
                try:
                    return CurationConfig.from_dict(raw, where=f"{path} (the corpus's config)")
                except ConfigError as e:
                    raise RefilterError(f"the {what} {path} holds a config this refinery cannot read: {e}") from e
    raise RefilterError(f"{root} does not record the config that made it (no {WORK_DIR}/{RUN_FILE}, no `config` in "
                        f"{STATS_FILE}); refilter needs it to know which scores are stored")


def corpus_root(corpus: str | Path) -> Path:
    path = Path(corpus)
    if not path.is_dir():
        raise CorpusError(f"corpus not found: {path} is not a directory")
    root = curation_root(path)
    if root is None:
        raise CorpusError(f"{path} is not a curation output (no {STATS_FILE} listing its files); give the "
                          "--output directory of a finished `refinery curate` or `refinery refilter`")
    if not (root / STATS_FILE).is_file():
        raise CorpusError(f"the curation run in {root} has not finished (no {STATS_FILE}); rerun the same "
                          "`refinery curate` command to finish it before refiltering")
    return root


def _listed(root: Path, stats: dict[str, Any], key: str) -> list[tuple[str, str]]:
    """(shard, path relative to `root`) of every file `stats` lists under `key`."""
    out = []
    for rel in listed_files(root, stats, key):
        shard = shard_name(rel.rsplit("/", 1)[-1])
        if shard is None:
            raise CorpusError(f"{root / rel}: not a corpus file (expected {' or '.join(DOCUMENT_SUFFIXES)})")
        out.append((shard, rel))
    return out


@dataclass(frozen=True)
class Unit:
    """One shard of the corpus: its kept files (one per partition folder) and its rejected files."""

    key: str
    kept: tuple[str, ...]
    rejected: tuple[str, ...]


def units_of(root: Path, stats: dict[str, Any]) -> list[Unit]:
    kept: dict[str, list[str]] = {}
    rejected: dict[str, list[str]] = {}
    for shard, rel in _listed(root, stats, "files"):
        kept.setdefault(shard, []).append(rel)
    for shard, rel in _listed(root, stats, "rejected_files"):
        rejected.setdefault(shard, []).append(rel)
    return [Unit(k, tuple(kept.get(k, ())), tuple(rejected.get(k, ()))) for k in sorted(set(kept) | set(rejected))]


# ---------------------------------------------------------------------------------------------
# one shard: decide every document again


@dataclass(frozen=True)
class RefilterContext:
    """Everything a shard task needs; small and picklable."""

    corpus: str
    output: str  # the temporary output directory
    config: dict[str, Any]
    plan: Plan
    keep_rejected: bool


_BUILT: dict[str, list[Any]] = {}


def _build_steps(ctx: RefilterContext) -> list[Any]:
    """CONFIG's steps (None for dedup), built once per process (refilter never calls a model)."""
    return built_once(_BUILT, json.dumps(ctx.config, sort_keys=True, default=str), lambda: [
        None if p.kind == "dedup" else build(p.name, p.params, DOC_STEPS) for p in ctx.plan.steps])


class _Missing:
    """A step's verdict when its scores are not stored and cannot be recomputed."""


MISSING = _Missing()


@dataclass
class _Tally:
    """One shard's funnel counters."""

    counts: Counter = field(default_factory=Counter)
    newly_dropped: Counter = field(default_factory=Counter)
    newly_kept: Counter = field(default_factory=Counter)  # by the reason the corpus dropped them for
    still_dropped: Counter = field(default_factory=Counter)
    missing_scores: Counter = field(default_factory=Counter)
    dedup: Counter = field(default_factory=Counter)


def _resume(rec: dict[str, Any] | None, plan: Plan) -> tuple[int, int, str | None]:
    """Where a document stands in the corpus's sequence: the index of the first step that has not
    rewritten its stored text (len = every one has), the index of the step that dropped it (len for
    a kept one), and its fate when it cannot be decided again ("dedup", "unknown_step", "unchanged":
    dropped by a step that rewrites text, whose parameters refilter keeps, so it would drop it again)."""
    n = len(plan.old_names)
    if rec is None:
        return n, n, None
    step = rec.get("step")
    if step in plan.dedup_names:
        return plan.dedup_index, plan.dedup_index, "dedup"
    if step not in plan.old_names:
        return n, n, "unknown_step"
    k = plan.old_names.index(step)
    if "resume_at" in rec:  # written by refilter: null = the text of a document that passed every step
        at = rec["resume_at"]
        if at is None:
            return n, n, None
        return (plan.old_names.index(at), k, None) if at in plan.old_names else (n, n, "unknown_step")
    if plan.old_edits[k] and not plan.old_filters[k]:
        return k, k, "unchanged"
    return next((i for i in range(k, n) if plan.old_edits[i]), n), k, None


def _exact(p: PlanStep, resume: int, plan: Plan) -> bool:
    """Whether the stored text is the text step `p` would see: no step between it and the document's
    resume point rewrote it (past the resume point, the loop has just applied those steps)."""
    return not any(plan.old_edits[i] for i in range(p.pos, resume))


def _error(step: Any, doc: Document, e: Exception) -> str:
    step.stats.error(f"{step.name}.exception", id=doc.id, message=repr(e)[:300])
    return f"{step.name}.error"


def _score(step: Filter, doc: Document) -> str | None:
    """Run a cheap filter for real on the stored text: score, decide, and edit kept text."""
    step.stats.counters["refilter.rescored"] += 1
    try:
        step.annotate(doc)
        reason = step.reject(doc)
    except Exception as e:  # one bad document is a counted drop, never a dead job
        return _error(step, doc, e)
    if reason is None:
        step.on_keep(doc)
    return reason


def _filter_verdict(p: PlanStep, step: Filter, doc: Document, resume: int, plan: Plan) -> str | None | _Missing:
    applied = p.old_index is not None and p.old_index < resume
    if p.edits_text and not applied:  # its edit of kept text is not in the stored text: run it
        return _score(step, doc) if p.cheap else MISSING
    if p.old_index is not None and step.has_scores(doc):
        try:
            reason = step.reject(doc)
        except KeyError:
            pass  # a score it reads is not stored
        except Exception as e:
            return _error(step, doc, e)
        else:
            step.stats.counters["refilter.from_stored_scores"] += 1
            return reason
    if p.cheap and _exact(p, resume, plan):
        return _score(step, doc)
    return MISSING


def _other_verdict(p: PlanStep, step: Any, doc: Document, resume: int) -> Document | str | _Missing:
    """A step that rewrites text: skipped where the stored text already holds its edit, else applied
    (a cheap mapper) or missing (anything else: extraction needs the raw page)."""
    if p.old_index is not None and p.old_index < resume:
        return doc
    if not (p.kind == "mapper" and p.cheap):
        return MISSING
    step.stats.counters["refilter.applied"] += 1
    try:
        out = step.apply(doc)
    except Exception as e:  # one bad document is a counted drop, never a dead job
        return _error(step, doc, e)
    return f"{step.name}.empty" if out is None else out


def decide(doc: Document, resume: int, from_kept: bool, steps: list[Any], plan: Plan
           ) -> tuple[Document, int | None, str | None]:
    """Run `doc` through the plan from its resume point. Returns the document (a mapper may replace
    it), the plan index of the step that dropped it and the reason, or (doc, None, None) if kept. A
    step whose scores are missing keeps the old decision: a kept document passes it, a reject stays out."""
    for j, (p, step) in enumerate(zip(plan.steps, steps, strict=True)):
        if step is None:  # dedup: never rerun
            continue
        stats = step.stats
        stats.docs_in += 1
        t0 = time.perf_counter()
        verdict: Any
        if p.kind == "filter":
            verdict = _filter_verdict(p, step, doc, resume, plan)
        else:
            verdict = _other_verdict(p, step, doc, resume)
            if isinstance(verdict, Document):
                doc, verdict = verdict, None
        stats.seconds += time.perf_counter() - t0
        if verdict is MISSING:
            stats.counters[f"refilter.missing_scores.{p.name}"] += 1
            if not from_kept:
                return doc, j, f"refilter.missing_scores.{p.name}"
        elif verdict is not None:
            stats.dropped[verdict] += 1
            return doc, j, verdict
        stats.docs_out += 1
    return doc, None, None


def _resume_at(j: int, resume: int, plan: Plan) -> tuple[bool, str | None]:
    """Whether a reject dropped at plan step j needs `resume_at`, and its value: the first step at or
    after j whose edit is not in the stored text, when that is not what `step` alone implies."""
    steps = plan.steps
    n = len(steps)
    actual = next((i for i in range(j, n) if steps[i].edits_text
                   and (steps[i].old_index is None or steps[i].old_index >= resume)), n)
    implied = next((i for i in range(j, n) if steps[i].edits_text), n)
    if actual == implied:
        return False, None
    return True, steps[actual].name if actual < n else None


class _Rows:
    """Documents → BASE_SCHEMA tables for a PartitionedWriter, in batches."""

    def __init__(self, writer: PartitionedWriter, partitioner: Partitioner) -> None:
        self.writer = writer
        self.partitioner = partitioner
        self.rows: list[tuple[str, str, str, str, str, str]] = []
        self.folders: list[str] = []
        self.languages: Counter = Counter()
        self.chars = 0

    def add(self, doc: Document, rejected: dict[str, Any] | None) -> None:
        meta = stored_metadata(doc)
        if rejected is not None:
            meta["rejected"] = rejected
        else:
            self.languages[meta.get("lang", "unknown")] += 1
            self.chars += len(doc.text)
        self.folders.append(self.partitioner.folder(doc.source, meta))
        self.rows.append(stored_row(doc, meta))
        if len(self.rows) >= WRITE_BATCH_ROWS:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.writer.write(self.folders, rows_table(self.rows))
            self.rows, self.folders = [], []


def refilter_shard(ctx: RefilterContext, unit: Unit) -> dict[str, Any]:
    """Decide one shard's documents again; write its kept documents (and rejects) to ctx.output."""
    t0 = time.perf_counter()
    cfg = CurationConfig.from_dict(ctx.config)
    plan = ctx.plan
    steps = _build_steps(ctx)
    out = Path(ctx.output)
    kept = _Rows(PartitionedWriter(out / DOCUMENTS_DIR, unit.key, cfg.format),
                 Partitioner(cfg.output.get("partition_by"), cfg.output.get("buckets")))
    # Rejects go to rejected/<source>/, whatever the corpus's partitioning (as `curate` writes them).
    rejects = _Rows(PartitionedWriter(out / REJECTED_DIR, unit.key, cfg.format), Partitioner()) \
        if ctx.keep_rejected else None
    tally = _Tally()
    try:
        for rel, from_kept in [(r, True) for r in unit.kept] + [(r, False) for r in unit.rejected]:
            for doc in read_documents(Path(ctx.corpus) / rel):
                old = doc.metadata.pop("rejected", None) if not from_kept else None
                _one(doc, old, from_kept, steps, plan, tally, kept, rejects)
        kept.flush()
        files = kept.writer.close()
        rejected_files: dict[str, int] = {}
        if rejects is not None:
            rejects.flush()
            rejected_files = rejects.writer.close()
    except BaseException:
        kept.writer.abort()
        if rejects is not None:
            rejects.writer.abort()
        raise
    seconds = time.perf_counter() - t0
    log.info("refilter %s: %d of %d documents kept in %.2f s", unit.key, sum(files.values()), tally.counts["in"],
             seconds)
    return {
        "shard": unit.key,
        "seconds": round(seconds, 3),
        "steps": [s.stats.to_dict() for s in steps if s is not None],
        "files": files,
        "rejected_files": rejected_files,
        "languages": dict(kept.languages),
        "chars": kept.chars,
        "tally": {name: dict(getattr(tally, name)) for name in
                  ("counts", "newly_dropped", "newly_kept", "still_dropped", "missing_scores", "dedup")},
    }


def _one(doc: Document, old: dict[str, Any] | None, from_kept: bool, steps: list[Any], plan: Plan,
         tally: _Tally, kept: _Rows, rejects: _Rows | None) -> None:
    tally.counts["in"] += 1
    tally.counts["in_kept" if from_kept else "in_rejected"] += 1
    if not from_kept and not isinstance(old, dict):
        old = {"step": "unknown", "reason": "unknown"}
    resume, reached, fate = _resume(old, plan)
    if fate is not None:  # cannot be decided again: stays out as it was
        assert old is not None
        if fate == "dedup":
            tally.dedup[old.get("step", "dedup")] += 1
        else:
            tally.still_dropped[old.get("reason", fate)] += 1
            tally.counts[fate] += 1
        if rejects is not None:
            rejects.add(doc, old)
        return
    doc, j, reason = decide(doc, resume, from_kept, steps, plan)
    if j is None:
        if from_kept:
            tally.counts["kept_again"] += 1
        else:
            assert old is not None
            tally.newly_kept[old.get("reason", "unknown")] += 1
            if plan.has_dedup and reached < plan.dedup_index:
                tally.counts["not_deduplicated"] += 1
        kept.add(doc, None)
        return
    assert reason is not None
    if reason.startswith("refilter.missing_scores."):
        tally.missing_scores[plan.steps[j].name] += 1
    (tally.newly_dropped if from_kept else tally.still_dropped)[reason] += 1
    if rejects is not None:
        rec: dict[str, Any] = {"step": plan.steps[j].name, "reason": reason}
        needed, at = _resume_at(j, resume, plan)
        if needed:
            rec["resume_at"] = at
        rejects.add(doc, rec)


# ---------------------------------------------------------------------------------------------
# driver


def _check_output(output: Path, root: Path, overwrite: bool) -> None:
    out, src = output.resolve(), root.resolve()
    if out == src or src in out.parents or out in src.parents:
        raise RefilterError(f"--output {output} overlaps the corpus {root}; refilter never modifies its input: "
                            "choose a directory outside it")
    if output.exists() and not output.is_dir():
        raise RefilterError(f"--output {output} is a file; choose a directory")
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            raise RefilterError(f"--output {output} is not empty; pass --overwrite to replace it, or choose "
                                "another directory")
        if not (output / STATS_FILE).is_file():
            # --overwrite replaces the whole directory: never one that is not a corpus (a home directory).
            raise RefilterError(f"--output {output} holds files but no corpus ({STATS_FILE}); --overwrite only "
                                "replaces a corpus directory: choose an empty or new directory")


def _remove_stale_tmp(parent: Path, name: str) -> None:
    """Directories that killed refilter runs into the same output left (their process is gone): a
    half-built `.tmp-<pid>-NAME`, and the `.old-<pid>-NAME` that `_publish` moves a replaced output to."""
    for p in [*parent.glob(f".tmp-*-{name}"), *parent.glob(f".old-*-{name}")]:
        m = _TMP_DIR.fullmatch(p.name)
        if not (m and m["name"] == name and p.is_dir()):
            continue
        pid = int(m["pid"])
        alive = True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            alive = False
        except PermissionError:
            pass
        if not alive or pid == os.getpid():
            shutil.rmtree(p, ignore_errors=True)


def _publish(tmp: Path, output: Path) -> None:
    """Rename the finished temporary directory to `output`, replacing what was there."""
    old = None
    if output.exists():
        old = output.with_name(f".old-{os.getpid()}-{output.name}")
        os.replace(output, old)
    os.replace(tmp, output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def refilter(
    corpus: str | Path,
    config: CurationConfig | str | Path,
    output: str | Path,
    executor: str = "local",
    ray_address: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
    keep_rejected: bool = False,
) -> dict[str, Any]:
    """Decide every document of `corpus` again with `config`'s thresholds; write a new corpus to
    `output`. Returns its stats (also in `output/stats.json`)."""
    root = corpus_root(corpus)
    cfg = config if isinstance(config, CurationConfig) else CurationConfig.load(config)
    validate_buildable(cfg)
    plan = plan_refilter(corpus_config(root), cfg)
    stats_in = json.loads((root / STATS_FILE).read_text())
    units = units_of(root, stats_in)
    output = Path(output)
    _check_output(output, root, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(output.parent, output.name)
    tmp = output.with_name(f".tmp-{os.getpid()}-{output.name}")
    tmp.mkdir()
    ctx = RefilterContext(corpus=str(root.resolve()), output=str(tmp.resolve()), config=cfg.to_dict(),
                          plan=plan, keep_rejected=keep_rejected)
    t0 = time.perf_counter()
    try:
        ex = make_executor(executor, ray_address=ray_address, progress=progress)
        try:
            results = ex.map(partial(refilter_shard, ctx), units, desc="refilter")
        finally:
            ex.shutdown()
        stats = assemble_stats(cfg, root, stats_in, plan, results, time.perf_counter() - t0, executor,
                               keep_rejected)
        write_report(stats, tmp)
        atomic_write_text(tmp / STATS_FILE, json.dumps(stats, indent=1))
        _publish(tmp, output)
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        raise
    log.info("refilter: %d documents in, %d kept, %.1f s", stats["documents_read"], stats["documents_written"],
             stats["wall_seconds"])
    return stats


def assemble_stats(cfg: CurationConfig, root: Path, stats_in: dict[str, Any], plan: Plan, results: list[dict],
                   wall: float, executor: str, keep_rejected: bool) -> dict[str, Any]:
    merged = [StepStats(p.name) for p in plan.steps if p.kind != "dedup"]
    tally: dict[str, Counter] = {}
    langs: Counter = Counter()
    files: dict[str, int] = {}
    rejected_files: dict[str, int] = {}
    for r in results:
        for m, d in zip(merged, r["steps"], strict=True):
            m.merge(StepStats.from_dict(d))
        for name, counts in r["tally"].items():
            tally.setdefault(name, Counter()).update(counts)
        langs.update(r["languages"])
        files.update(r["files"])
        rejected_files.update(r["rejected_files"])
    counts = tally.get("counts", Counter())
    kept = sum(files.values())
    funnel = {
        "from_kept": counts["in_kept"],
        "from_rejected": counts["in_rejected"],
        "kept_again": counts["kept_again"],
        "newly_kept": sum(tally["newly_kept"].values()) if "newly_kept" in tally else 0,
        "newly_dropped": sum(tally["newly_dropped"].values()) if "newly_dropped" in tally else 0,
        "still_dropped": sum(tally["still_dropped"].values()) if "still_dropped" in tally else 0,
        "dedup_dropped": sum(tally["dedup"].values()) if "dedup" in tally else 0,
        "not_deduplicated": counts["not_deduplicated"],
        "unknown_step": counts["unknown_step"],
        "newly_dropped_by_reason": dict(tally.get("newly_dropped", Counter()).most_common()),
        "newly_kept_by_old_reason": dict(tally.get("newly_kept", Counter()).most_common()),
        "still_dropped_by_reason": dict(tally.get("still_dropped", Counter()).most_common()),
        "dedup_dropped_by_step": dict(tally.get("dedup", Counter()).most_common()),
        "missing_scores": {f"refilter.missing_scores.{k}": v
                           for k, v in tally.get("missing_scores", Counter()).most_common()},
    }
    stats: dict[str, Any] = {
        "name": cfg.name,
        "format": cfg.format,
        "executor": executor,
        "refiltered_from": str(root.resolve()),
        "corpus_had_rejected": bool(stats_in.get("rejected_files")),
        "input_files": len(results),
        "documents_read": counts["in"],
        "documents_written": kept,
        "characters_written": sum(r["chars"] for r in results),
        "wall_seconds": round(wall, 2),
        "docs_per_second": round(counts["in"] / wall, 1) if wall > 0 else 0.0,
        "refilter": funnel,
        "steps": [m.to_dict() for m in merged],
        "languages": dict(langs.most_common()),
        # What a later refilter of this corpus reads as the config that made it.
        "config": cfg.to_dict(),
        "files": [{"path": p, "documents": n} for p, n in sorted(files.items())],
    }
    if keep_rejected:
        stats["rejected_files"] = [{"path": p, "documents": n} for p, n in sorted(rejected_files.items())]
    return stats


def write_report(stats: dict[str, Any], output: Path) -> Path:
    f = stats["refilter"]
    lines = [
        f"# Refilter report: {stats['name']}",
        "",
        f"From {stats['refiltered_from']}: {stats['documents_read']:,} documents decided again from their stored "
        f"scores in {stats['wall_seconds']} s ({stats['docs_per_second']:,} docs/s, {stats['executor']} "
        f"executor); {stats['documents_written']:,} kept.",
    ]
    if not stats["corpus_had_rejected"]:
        lines += ["", "The corpus kept no rejects (`refinery curate --keep-rejected`): only its kept documents "
                  "were decided again, so thresholds can only get stricter here."]
    lines += [
        "",
        "## Funnel",
        "",
        "| | documents |",
        "|---|---:|",
        f"| in: kept by the corpus | {f['from_kept']:,} |",
        f"| in: rejected by the corpus (`rejected/`) | {f['from_rejected']:,} |",
        f"| kept again | {f['kept_again']:,} |",
        f"| newly kept | {f['newly_kept']:,} |",
        f"| newly dropped | {f['newly_dropped']:,} |",
        f"| still dropped | {f['still_dropped']:,} |",
        f"| dropped by dedup (never rerun) | {f['dedup_dropped']:,} |",
        f"| **written** | **{stats['documents_written']:,}** |",
    ]
    if f["not_deduplicated"]:
        lines += ["", f"{f['not_deduplicated']:,} newly kept documents never went through dedup (refilter does "
                  "not rerun it): a fresh `refinery curate` may drop some as duplicates."]
    for title, key in (("Newly dropped, by reason", "newly_dropped_by_reason"),
                       ("Newly kept, by the reason the corpus dropped them", "newly_kept_by_old_reason"),
                       ("Still dropped, by reason", "still_dropped_by_reason"),
                       ("Scores missing: old decision kept", "missing_scores")):
        if f[key]:
            lines += ["", f"## {title}", "", "| reason | documents |", "|---|---:|"]
            lines += [f"| {k} | {v:,} |" for k, v in f[key].items()]
    lines += ["", "## Per step", "", "| step | docs in | docs out | drops by reason | counters |", "|---|---:|---:|---|---|"]
    for s in stats["steps"]:
        drops = ", ".join(f"{k} {v:,}" for k, v in sorted(s["dropped"].items(), key=lambda kv: -kv[1]))
        counters = ", ".join(f"{k} {v:,}" for k, v in sorted(s["counters"].items()))
        lines.append(f"| {s['name']} | {s['docs_in']:,} | {s['docs_out']:,} | {drops or '-'} | {counters or '-'} |")
    path = output / REPORT_FILE
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
