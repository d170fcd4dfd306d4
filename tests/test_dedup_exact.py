"""Exact dedup: the normalization, the hash, and the global drop table across shards."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import xxhash

from curation.dedup.exact import ExactDedup, exact_hash, normalize
from curation.document import Document
from curation.executor import LocalExecutor
from curation.writer import write_parquet_docs


def write_phase1(path: Path, docs: list[Document], step: ExactDedup) -> str:
    """A phase-1 shard written by the pipeline's own writer: Dolma fields + '_' columns."""
    write_parquet_docs(step.run(docs), path, internal=True)
    return str(path)


def doc(i: str, text: str, created: str = "2020-01-01") -> Document:
    return Document(id=i, text=text, source="test", created=created)


def test_case_whitespace_and_punctuation_do_not_make_a_document_new() -> None:
    base = "The cat sat on the mat. It was happy!"
    for variant in ["the cat sat on the mat it was happy", "THE  CAT\tsat on the mat...\nIt was happy",
                    "  The cat sat on the mat; it was happy?  ", "The-cat sat on the mat. It_was happy"]:
        assert normalize(variant) == normalize(base)
        assert exact_hash(variant) == exact_hash(base)
    assert exact_hash("The cat sat on the hat.") != exact_hash(base)


def test_hash_is_signed_xxh3_of_the_normalized_text() -> None:
    h = exact_hash("Hello, World!")
    unsigned = xxhash.xxh3_64_intdigest(b"hello world")
    assert h == (unsigned - (1 << 64) if unsigned >= 1 << 63 else unsigned)
    assert -(1 << 63) <= h < 1 << 63


def test_copies_across_shards_drop_and_the_earliest_stays(tmp_path: Path) -> None:
    step = ExactDedup(partitions=3)
    s1 = write_phase1(tmp_path / "a.parquet", [
        doc("a1", "Breaking news: markets rally.", "2021-05-01"),
        doc("a2", "A unique page about gardening.", "2021-05-01"),
    ], step)
    s2 = write_phase1(tmp_path / "b.parquet", [
        doc("b1", "breaking NEWS -- markets   rally", "2020-01-01"),
        doc("b2", "Breaking news: markets rally.", "2022-01-01"),
        doc("b3", "Another unique page, about cooking.", "2019-01-01"),
    ], step)
    out = step.find_duplicates([s1, s2], tmp_path / "work", LocalExecutor(progress=False))
    assert out.column_names == ["shard", "row", "id", "reason", "duplicate_of"]
    assert out.to_pylist() == [
        {"shard": s1, "row": 0, "id": "a1", "reason": "dedup.exact", "duplicate_of": "b1"},
        {"shard": s2, "row": 1, "id": "b2", "reason": "dedup.exact", "duplicate_of": "b1"},
    ]
    assert step.stats.counters["dedup_exact.groups"] == 1


def test_latest_rule_keeps_the_newest_copy_and_ties_go_to_the_smallest_id(tmp_path: Path) -> None:
    step = ExactDedup(survivor="latest")
    shard = write_phase1(tmp_path / "a.parquet", [
        doc("x3", "same text", "2020-01-01"),
        doc("x2", "Same text.", "2023-06-01"),
        doc("x1", "SAME TEXT", "2023-06-01"),
        doc("x0", "same text", ""),  # no date: never preferred over a dated copy
    ], step)
    out = step.find_duplicates([shard], tmp_path / "work", LocalExecutor(progress=False))
    assert {r["id"]: r["duplicate_of"] for r in out.to_pylist()} == {"x0": "x1", "x2": "x1", "x3": "x1"}


def test_copies_that_share_an_id_keep_exactly_one_row(tmp_path: Path) -> None:
    # The same archive given under two names: every document twice, with the same id.
    docs = [doc("r1", "A page about rivers.", "2021-01-01"), doc("r2", "A page about lakes.", "2021-01-01")]
    s1 = write_phase1(tmp_path / "a.parquet", docs, ExactDedup())
    s2 = write_phase1(tmp_path / "b.parquet", docs, ExactDedup())
    step = ExactDedup(partitions=2)
    out = step.find_duplicates([s2, s1], tmp_path / "work", LocalExecutor(progress=False))
    # Dates and ids tie, so the row key decides: the copy in the first shard (by path) stays.
    assert [(r["shard"], r["row"], r["id"], r["duplicate_of"]) for r in out.to_pylist()] == [
        (s2, 0, "r1", "r1"), (s2, 1, "r2", "r2")]
    assert step.stats.counters["dedup_exact.groups"] == 2


def test_rows_without_a_hash_are_counted_not_fatal(tmp_path: Path) -> None:
    table = pa.table({"id": ["a", "b", "c"], "text": ["t", "t", "u"], "created": ["", "", ""],
                      "_exact_hash": pa.array([5, None, 5], pa.int64())})
    pq.write_table(table, tmp_path / "s.parquet")
    step = ExactDedup()
    out = step.find_duplicates([str(tmp_path / "s.parquet")], tmp_path / "work", LocalExecutor(progress=False))
    assert out["id"].to_pylist() == ["c"]
    assert step.stats.counters["dedup_exact.no_hash"] == 1


def test_shard_written_without_the_exact_step_is_a_clear_error(tmp_path: Path) -> None:
    pq.write_table(pa.table({"id": ["a"], "text": ["t"], "created": [""]}), tmp_path / "s.parquet")
    with pytest.raises(ValueError, match="_exact_hash"):
        ExactDedup().find_duplicates([str(tmp_path / "s.parquet")], tmp_path / "w", LocalExecutor(progress=False))
