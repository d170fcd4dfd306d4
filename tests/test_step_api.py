"""The step contract: bookkeeping of docs in/out, drop reasons, errors and timing."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import pytest

from curation.document import Document
from curation.registry import ConfigError, check_params
from curation.step import Filter, Mapper, StepStats


def _docs(n: int) -> list[Document]:
    return [Document(id=str(i), text="x" * i, source="t") for i in range(n)]


class ShortFilter(Filter):
    name = "short"

    def __init__(self, min_len: int = 3) -> None:
        super().__init__()
        self.min_len = min_len

    def annotate(self, doc: Document) -> None:
        doc.attributes["short.len"] = len(doc.text)

    def reject(self, doc: Document) -> str | None:
        return "short.too_short" if doc.attributes["short.len"] < self.min_len else None


class Exploding(Filter):
    name = "boom"

    def reject(self, doc: Document) -> str | None:
        if doc.id == "2":
            raise RuntimeError("bad document")
        return None


class Upper(Mapper):
    name = "upper"

    def apply(self, doc: Document) -> Document | None:
        if not doc.text:
            return None
        doc.text = doc.text.upper()
        return doc


def test_filter_counts_in_out_and_reasons() -> None:
    f = ShortFilter(min_len=3)
    kept = list(f(_docs(10)))
    assert [d.id for d in kept] == [str(i) for i in range(3, 10)]
    assert f.stats.docs_in == 10 and f.stats.docs_out == 7
    assert f.stats.dropped == {"short.too_short": 3}
    assert all("short.len" in d.attributes for d in kept)


def test_exception_in_one_document_is_a_counted_drop_not_a_crash() -> None:
    f = Exploding()
    kept = list(f(_docs(5)))
    assert len(kept) == 4
    assert f.stats.dropped == {"boom.error": 1}
    assert f.stats.errors == {"boom.exception": 1}
    assert f.stats.samples[0]["id"] == "2"


def test_mapper_drops_empty_results_with_a_reason() -> None:
    m = Upper()
    out = list(m(_docs(3)))
    assert [d.text for d in out] == ["X", "XX"]
    assert m.stats.dropped == {"upper.empty": 1}


class Sleepy(Filter):
    name = "sleepy"

    def annotate(self, doc: Document) -> None:
        time.sleep(0.02)

    def reject(self, doc: Document) -> str | None:
        return None if doc.text else "sleepy.empty"


def test_chained_steps_time_only_their_own_work() -> None:
    """The slow upstream step is charged its sleep; the fast step pulling from it is not."""
    a, b = Sleepy(), Upper()
    list(b(a(_docs(25))))
    assert a.stats.docs_out == b.stats.docs_in == 24
    slept = 25 * 0.02
    assert a.stats.seconds >= slept
    assert b.stats.seconds < slept / 2, b.stats.seconds


def test_stats_round_trip_and_merge() -> None:
    s = StepStats("x", docs_in=3, docs_out=2, seconds=0.5)
    s.dropped["x.r"] += 1
    s.error("x.bad", file="f", offset=10)
    t = StepStats.from_dict(s.to_dict())
    t.merge(s)
    assert t.docs_in == 6 and t.dropped["x.r"] == 2 and t.errors["x.bad"] == 2
    assert t.samples[0] == {"kind": "x.bad", "file": "f", "offset": 10}


class TooLong(Mapper):
    name = "cap"

    def apply(self, doc: Document) -> Document | str | None:
        return "cap.too_long" if len(doc.text) > 2 else doc


class Trimming(Filter):
    name = "trim"

    def annotate(self, doc: Document) -> None:
        self._trimmed = doc.text[:1]

    def reject(self, doc: Document) -> str | None:
        return "trim.empty" if not doc.text else None

    def on_keep(self, doc: Document) -> None:
        doc.text = self._trimmed


def test_mapper_drops_with_the_reason_it_returns() -> None:
    m = TooLong()
    assert [d.id for d in m(_docs(5))] == ["0", "1", "2"]
    assert m.stats.dropped == {"cap.too_long": 2}


def test_filter_rewrites_only_the_documents_it_keeps() -> None:
    f = Trimming()
    out = list(f(_docs(3)))
    assert [d.text for d in out] == ["x", "x"] and f.stats.dropped == {"trim.empty": 1}


class Thresholded(Filter):
    name = "thresholded"

    def __init__(self, threshold: float = 0.5, labels: Sequence[str] = ("a",)) -> None:
        super().__init__()
        self.threshold, self.labels = threshold, labels

    @staticmethod
    def validate_params(params: dict[str, Any]) -> None:
        if not 0 <= params.get("threshold", 0.5) <= 1:
            raise ValueError(f"parameter `threshold` must be in [0, 1], got {params['threshold']}")

    def reject(self, doc: Document) -> str | None:
        return None


def test_a_steps_signature_is_its_parameter_schema() -> None:
    table = {"thresholded": f"{__name__}:Thresholded"}
    with pytest.raises(ConfigError, match=r"step `thresholded`: parameter `threshold` must be a number, got str"):
        check_params("thresholded", {"threshold": "0.7"}, table)
    with pytest.raises(ConfigError, match=r"parameter `labels` must be a list of strings, got str 'b'"):
        check_params("thresholded", {"labels": "b"}, table)
    with pytest.raises(ConfigError, match=r"step `thresholded`: parameter `threshold` must be in \[0, 1\]"):
        check_params("thresholded", {"threshold": 7}, table)
    assert check_params("thresholded", {"threshold": 1, "labels": ["b"]}, table) is Thresholded
