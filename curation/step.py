"""The step contract: a generator of documents in, a generator out, with stats built in.

Modelled on datatrove's PipelineStep / BaseFilter: a step declares its name, a filter returns
`None` to keep a document or a short reason string to drop it, and the base class counts
documents in/out, drops per reason and seconds, so no step hand-writes its bookkeeping.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from curation.document import Document

log = logging.getLogger(__name__)

# Documents per `annotate_batch` call when a batching filter names no size.
DEFAULT_BATCH_SIZE = 256


@dataclass
class StepStats:
    name: str
    docs_in: int = 0
    docs_out: int = 0
    seconds: float = 0.0
    dropped: Counter = field(default_factory=Counter)
    # Counted, non-fatal problems (malformed records, extraction time-outs, ...), by kind.
    errors: Counter = field(default_factory=Counter)
    # Free-form counters a step wants reported (e.g. pii.replaced, bytes_read).
    counters: Counter = field(default_factory=Counter)
    # A few details of errors (file, offset, message) so a report can point at the fault.
    samples: list[dict[str, Any]] = field(default_factory=list)

    MAX_SAMPLES: ClassVar[int] = 50

    def error(self, kind: str, **detail: Any) -> None:
        """Count a non-fatal error and keep its first details."""
        self.errors[kind] += 1
        if len(self.samples) < self.MAX_SAMPLES:
            self.samples.append({"kind": kind, **detail})

    def merge(self, other: StepStats) -> None:
        self.docs_in += other.docs_in
        self.docs_out += other.docs_out
        self.seconds += other.seconds
        self.dropped.update(other.dropped)
        self.errors.update(other.errors)
        self.counters.update(other.counters)
        room = self.MAX_SAMPLES - len(self.samples)
        if room > 0:
            self.samples.extend(other.samples[:room])

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "docs_in": self.docs_in,
            "docs_out": self.docs_out,
            "seconds": round(self.seconds, 4),
            "dropped": dict(sorted(self.dropped.items())),
            "errors": dict(sorted(self.errors.items())),
            "counters": dict(sorted(self.counters.items())),
            "samples": list(self.samples),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StepStats:
        return cls(
            name=d["name"],
            docs_in=d["docs_in"],
            docs_out=d["docs_out"],
            seconds=d["seconds"],
            dropped=Counter(d.get("dropped", {})),
            errors=Counter(d.get("errors", {})),
            counters=Counter(d.get("counters", {})),
            samples=list(d.get("samples", [])),
        )


class Step:
    """A document transformer. Subclasses implement `run`; `__call__` adds the bookkeeping."""

    name: ClassVar[str] = "step"
    # What one task running this step needs (`cpus`, `gpus`, `memory_gb`); a config's
    # `resources:` overrides it, and a phase's tasks ask for the max over their steps.
    resources: ClassVar[dict[str, float]] = {}
    # Documents per `annotate_batch` call (Filter); None for a step that scores one at a time.
    batch_size: ClassVar[int | None] = None
    # What recomputing this step's output costs, for `refinery refilter`: "cheap" (a text
    # heuristic, rerun on stored text when a document never reached the step) or "model" (never rerun:
    # a document without its stored scores keeps its old decision).
    rescoring_cost: ClassVar[str] = "cheap"
    # Receives (document, reason) for every document the step drops, when set: `--keep-rejected`
    # sets it per shard to write the document to `rejected/`. None (the default) costs nothing.
    on_drop: Callable[[Document, str], None] | None = None

    def __init__(self) -> None:
        self.stats = StepStats(self.name)

    def drop(self, doc: Document, reason: str) -> None:
        """Count `doc` as dropped for `reason` and hand it to `on_drop`. A step that drops in its own
        `run` calls this rather than counting by hand, so no kept reject is missed."""
        self.stats.dropped[reason] += 1
        if self.on_drop is not None:
            self.on_drop(doc, reason)

    def run(self, docs: Iterable[Document]) -> Iterator[Document]:
        raise NotImplementedError

    def __call__(self, docs: Iterable[Document]) -> Iterator[Document]:
        stats = self.stats
        # Time only this step's own work: the clock stops while upstream steps produce.
        upstream = _Counted(docs, stats)
        it = self.run(upstream)
        while True:
            t0 = time.perf_counter()
            try:
                doc = next(it)
            except StopIteration:
                stats.seconds += time.perf_counter() - t0 - upstream.pull_seconds
                upstream.pull_seconds = 0.0
                return
            stats.seconds += time.perf_counter() - t0 - upstream.pull_seconds
            upstream.pull_seconds = 0.0
            stats.docs_out += 1
            yield doc


class _Counted:
    """Wraps the upstream iterator to count documents in and time spent upstream."""

    def __init__(self, docs: Iterable[Document], stats: StepStats) -> None:
        self._it = iter(docs)
        self._stats = stats
        self.pull_seconds = 0.0

    def __iter__(self) -> _Counted:
        return self

    def __next__(self) -> Document:
        t0 = time.perf_counter()
        try:
            doc = next(self._it)
        finally:
            self.pull_seconds += time.perf_counter() - t0
        self._stats.docs_in += 1
        return doc


class Filter(Step):
    """Scores a document (`annotate`), then decides from scores and thresholds (`reject`).

    `annotate` writes attributes (the scores); `reject` reads only attributes and thresholds and
    returns `None` to keep or a short reason (`gopher.word_count`) to drop. Keeping the two apart
    means a new threshold never recomputes a score.
    """

    name: ClassVar[str] = "filter"
    # Parameters only `reject` reads (thresholds): `refinery refilter` applies a new value to stored
    # scores. Any other parameter changes what the scores mean, and refilter refuses to change it.
    decision_params: ClassVar[frozenset[str]] = frozenset()

    def has_scores(self, doc: Document) -> bool:
        """Whether `doc` holds this filter's scores (refilter decides from them). The default trusts
        `reject`, which raises KeyError when a score it reads is missing."""
        return True

    def annotate(self, doc: Document) -> None:
        """Compute this filter's scores into `doc.attributes`. Default: nothing to score."""

    def annotate_batch(self, docs: list[Document]) -> None:
        """Score a batch at once (one model call for many documents). A filter that overrides it
        is fed batches of `batch_size`; it must still implement `annotate`, which scores the
        documents one by one when the batch call raises, so one bad document is one counted drop."""
        for doc in docs:
            self.annotate(doc)

    def reject(self, doc: Document) -> str | None:
        raise NotImplementedError

    def run(self, docs: Iterable[Document]) -> Iterator[Document]:
        if type(self).annotate_batch is Filter.annotate_batch:
            scored: Iterator[tuple[Document, str | None]] = ((d, self._annotate_one(d)) for d in docs)
        else:
            scored = self._annotated_batches(docs)
        for doc, failed in scored:
            reason = failed
            if reason is None:
                try:
                    reason = self.reject(doc)
                except Exception as e:  # one bad document is a counted drop, never a dead job
                    reason = self._error(doc, e)
            if reason is None:
                self.on_keep(doc)
                yield doc
            else:
                self.drop(doc, reason)

    def _annotated_batches(self, docs: Iterable[Document]) -> Iterator[tuple[Document, str | None]]:
        """Each document after `annotate_batch` scored its batch, with the drop reason if scoring
        it failed. A batch that raises is scored again one by one, to find the bad document."""
        for batch in batched(docs, self.batch_size or DEFAULT_BATCH_SIZE):
            try:
                self.annotate_batch(batch)
            except Exception as e:
                self.stats.counters[f"{self.name}.batch_retried"] += 1
                log.debug("%s: a batch of %d failed (%r); scoring it one by one", self.name, len(batch), e)
                yield from ((d, self._annotate_one(d)) for d in batch)
            else:
                yield from ((d, None) for d in batch)

    def _annotate_one(self, doc: Document) -> str | None:
        """Score one document; returns the drop reason if scoring raised."""
        try:
            self.annotate(doc)
        except Exception as e:  # one bad document is a counted drop, never a dead job
            return self._error(doc, e)
        return None

    def _error(self, doc: Document, e: Exception) -> str:
        self.stats.error(f"{self.name}.exception", id=doc.id, message=repr(e)[:300])
        return f"{self.name}.error"

    def on_keep(self, doc: Document) -> None:
        """Called for each kept document; filters that also rewrite kept text do it here."""


class Mapper(Step):
    """A step that edits each document in place (line modifiers, PII masking)."""

    name: ClassVar[str] = "mapper"

    def apply(self, doc: Document) -> Document | str | None:
        """Return the edited document to keep it, a reason string to drop it, or None to drop it as
        `<name>.empty` (nothing left)."""
        raise NotImplementedError

    def run(self, docs: Iterable[Document]) -> Iterator[Document]:
        stats = self.stats
        for doc in docs:
            try:
                out = self.apply(doc)
            except Exception as e:  # one bad document is a counted drop, never a dead job
                stats.error(f"{self.name}.exception", id=doc.id, message=repr(e)[:300])
                self.drop(doc, f"{self.name}.error")
                continue
            if out is None:
                self.drop(doc, f"{self.name}.empty")
            elif isinstance(out, str):
                self.drop(doc, out)
            else:
                yield out


def batched(docs: Iterable[Document], size: int) -> Iterator[list[Document]]:
    """Consecutive lists of `size` documents (the last one shorter), pulled lazily."""
    batch: list[Document] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def built_once(cache: dict[str, list[Any]], key: str, build: Callable[[], list[Any]]) -> list[Any]:
    """The steps `build` makes for `key` (a config), built once per process so models load once:
    `cache` keeps one config's steps, a new key replaces them. Each step (None entries aside) gets
    fresh stats, as every shard's counts are its own."""
    if key not in cache:
        cache.clear()
        cache[key] = build()
    steps = cache[key]
    for step in steps:
        if step is not None:
            step.stats = StepStats(step.name)
    return steps
