"""Corpus shards: Parquet and Dolma layouts round-trip, writes are atomic."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow.parquet as pq

from curation.document import Document
from curation.writer import (
    BASE_SCHEMA,
    clean_tmp,
    documents_table,
    dolma_lines,
    read_documents,
    write_parquet_docs,
)


def _docs() -> list[Document]:
    return [
        Document(id=f"d{i}", text=f"text {i}", source="cc", added="2026-01-01", created="2024-05-01",
                 metadata={"url": f"https://e.x/{i}", "lang": "en"},
                 attributes={"gopher.word_count": i, "_exact_hash": i * 7})
        for i in range(5)
    ]


def test_parquet_round_trip_keeps_fields_and_public_attributes(tmp_path: Path) -> None:
    out = tmp_path / "a.parquet"
    assert write_parquet_docs(_docs(), out) == 5
    back = list(read_documents(out))
    assert [d.id for d in back] == [f"d{i}" for i in range(5)]
    assert back[2].metadata["url"] == "https://e.x/2"
    assert back[2].attributes == {"gopher.word_count": 2}  # internal '_' attributes are not public
    assert pq.read_schema(out).names == BASE_SCHEMA.names


def test_internal_attributes_become_columns_when_asked(tmp_path: Path) -> None:
    out = tmp_path / "stage1.parquet"
    write_parquet_docs(_docs(), out, internal=True, batch_rows=2)
    table = pq.read_table(out)
    assert table["_exact_hash"].to_pylist() == [0, 7, 14, 21, 28]


def test_empty_stream_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "empty.parquet"
    assert write_parquet_docs(iter([]), out) == 0
    assert not out.exists() and not list(tmp_path.iterdir())


def test_failed_write_leaves_no_partial_file(tmp_path: Path) -> None:
    def broken():
        yield from _docs()[:2]
        raise RuntimeError("killed")

    out = tmp_path / "x.parquet"
    try:
        write_parquet_docs(broken(), out, batch_rows=1)
    except RuntimeError:
        pass
    assert not out.exists() and not list(tmp_path.iterdir())


def test_parquet_is_read_back_batch_by_batch_in_file_order(tmp_path: Path) -> None:
    out = tmp_path / "a.parquet"
    write_parquet_docs(_docs(), out, batch_rows=2)
    stream = read_documents(out, batch_rows=2)
    assert next(stream).id == "d0"  # lazily: the rest of the file is not read yet
    assert [d.id for d in stream] == [f"d{i}" for i in range(1, 5)]


def test_dolma_layout_is_gzip_jsonl_with_nested_metadata(tmp_path: Path) -> None:
    out = tmp_path / "documents" / "a.jsonl.gz"
    out.parent.mkdir()
    with gzip.open(out, "wb") as f:
        f.writelines(dolma_lines(documents_table(_docs())))
    rows = [json.loads(line) for line in gzip.open(out, "rt")]
    assert set(rows[0]) == {"id", "text", "source", "added", "created", "metadata"}
    assert rows[3]["metadata"]["attributes"] == {"gopher.word_count": 3}  # '_' attributes stay out
    back = list(read_documents(out))
    assert [d.id for d in back] == [f"d{i}" for i in range(5)]
    assert back[3].attributes == {"gopher.word_count": 3} and back[3].metadata == {"url": "https://e.x/3", "lang": "en"}


def test_clean_tmp_removes_leftovers_of_a_killed_run(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".tmp-123-x.parquet").write_text("partial")
    (tmp_path / "sub" / "keep.parquet").write_text("done")
    clean_tmp(tmp_path)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["keep.parquet"]


def test_clean_tmp_leaves_files_it_did_not_write(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    mine = [tmp_path / ".tmp-77-stats.json", tmp_path / "sub" / ".tmp-123-00001-x.jsonl.gz"]
    theirs = [tmp_path / "sub" / ".tmp-draft.txt", tmp_path / ".tmp-notes", tmp_path / ".tmp-12-essay.txt"]
    for p in mine + theirs:
        p.write_text("x")
    assert sorted(clean_tmp(tmp_path)) == sorted(mine)
    assert all(p.exists() for p in theirs)
    (tmp_path / "sub" / ".tmp-5-y.parquet").write_text("x")
    assert clean_tmp(tmp_path, recursive=False) == []  # only the folder itself when asked
