"""The step contract: a generator of documents in, a generator out, with stats built in.

Modelled on datatrove's PipelineStep / BaseFilter: a step declares its name, a filter returns
`None` to keep a document or a short reason string to drop it, and the base class counts
documents in/out, drops per reason and seconds, so no step hand-writes its bookkeeping.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from curation.document import Document


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

    def __init__(self) -> None:
        self.stats = StepStats(self.name)

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

    def annotate(self, doc: Document) -> None:
        """Compute this filter's scores into `doc.attributes`. Default: nothing to score."""

    def reject(self, doc: Document) -> str | None:
        raise NotImplementedError

    def run(self, docs: Iterable[Document]) -> Iterator[Document]:
        stats = self.stats
        dropped = stats.dropped
        for doc in docs:
            try:
                self.annotate(doc)
                reason = self.reject(doc)
            except Exception as e:  # one bad document is a counted drop, never a dead job
                stats.error(f"{self.name}.exception", id=doc.id, message=repr(e)[:300])
                reason = f"{self.name}.error"
            if reason is None:
                self.on_keep(doc)
                yield doc
            else:
                dropped[reason] += 1

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
        dropped = stats.dropped
        for doc in docs:
            try:
                out = self.apply(doc)
            except Exception as e:  # one bad document is a counted drop, never a dead job
                stats.error(f"{self.name}.exception", id=doc.id, message=repr(e)[:300])
                dropped[f"{self.name}.error"] += 1
                continue
            if out is None:
                dropped[f"{self.name}.empty"] += 1
            elif isinstance(out, str):
                dropped[out] += 1
            else:
                yield out
