"""Writes documents to Parquet (zstd) or Dolma `*.jsonl.gz`, atomically (temp name, then rename).

A reader never sees a half-written shard: the file appears under its final name only once it is
complete, and a crash leaves only `.tmp-<pid>-<final name>` files, which a rerun deletes.
"""

from __future__ import annotations

import gzip
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from curation.document import Document, parse_metadata
from curation.step import batched

# Parquet keeps `metadata` as a JSON string: shards written by different steps (or with different
# attribute sets) then share one schema, and readers need no schema merging.
BASE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.string()),
        ("source", pa.string()),
        ("added", pa.string()),
        ("created", pa.string()),
        ("metadata", pa.string()),
    ]
)


# A corpus file's ending by `output.format`; the name before it is the shard the file holds.
FORMAT_SUFFIXES = {"parquet": ".parquet", "dolma": ".jsonl.gz"}
DOCUMENT_SUFFIXES = tuple(FORMAT_SUFFIXES.values())


def shard_name(file_name: str) -> str | None:
    """The shard a corpus file holds (`00003-x.parquet` → `00003-x`); None for another kind of file."""
    return next((file_name.removesuffix(s) for s in DOCUMENT_SUFFIXES if file_name.endswith(s)), None)


def dumps(obj: Any) -> str:
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS).decode()


# What the stages write under a temporary name: shards, markers, tables, reports, token files.
WRITTEN_SUFFIXES = (".parquet", ".jsonl.gz", ".json", ".md", ".npy", ".done")
_TMP_NAME = re.compile(r"\.tmp-\d+-(?P<final>.+)")


def tmp_path(final: Path) -> Path:
    return final.with_name(f".tmp-{os.getpid()}-{final.name}")


def clean_tmp(directory: Path, suffixes: tuple[str, ...] = WRITTEN_SUFFIXES, recursive: bool = True) -> list[Path]:
    """Remove temp files a killed writer left in `directory`; returns them.

    Only names `tmp_path` makes (`.tmp-<pid>-<final name>`, the final name ending with one of
    `suffixes`) are touched: a user's `.tmp-draft.txt` in the same folder is not ours to delete.
    """
    if not directory.is_dir():
        return []
    removed = []
    for p in directory.rglob(".tmp-*") if recursive else directory.glob(".tmp-*"):
        m = _TMP_NAME.fullmatch(p.name)
        if m and m["final"].endswith(suffixes) and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def atomic_write_text(final: Path, text: str) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(final)
    tmp.write_text(text)
    os.replace(tmp, final)


def stored_metadata(doc: Document) -> dict[str, Any]:
    """What `doc` keeps in its written `metadata`: its own, plus its public attributes (scores) under
    `attributes`; '_' attributes are the pipeline's internal columns, never part of a corpus."""
    meta = dict(doc.metadata)
    public = {k: v for k, v in doc.attributes.items() if not k.startswith("_")}
    if public:
        meta["attributes"] = public
    return meta


def stored_row(doc: Document, meta: dict[str, Any]) -> tuple[str, str, str, str, str, str]:
    """`doc` as a BASE_SCHEMA row (column order) whose metadata is `meta` (`stored_metadata(doc)`,
    perhaps with more keys, e.g. a reject's `rejected`)."""
    return doc.id, doc.text, doc.source, doc.added, doc.created, dumps(meta)


def rows_table(rows: list[tuple[str, str, str, str, str, str]]) -> pa.Table:
    """`stored_row` rows as a BASE_SCHEMA table."""
    if not rows:
        return BASE_SCHEMA.empty_table()
    return pa.table([list(c) for c in zip(*rows, strict=True)], schema=BASE_SCHEMA)


def documents_table(docs: list[Document]) -> pa.Table:
    """Documents as a BASE_SCHEMA table, as a corpus stores them."""
    return rows_table([stored_row(d, stored_metadata(d)) for d in docs])


def table_documents(table: pa.Table | pa.RecordBatch) -> Iterator[Document]:
    """The Documents of a BASE_SCHEMA table (the inverse of `documents_table`)."""
    for row in table.to_pylist():
        yield Document.from_row(row)


def dolma_lines(table: pa.Table) -> Iterator[bytes]:
    """A BASE_SCHEMA table in Dolma's layout: one JSON object per row, metadata as a nested object."""
    for row in table.to_pylist():
        row["metadata"] = parse_metadata(row.get("metadata"))
        yield orjson.dumps(row) + b"\n"


def write_parquet_docs(docs: Iterable[Document], final: Path, batch_rows: int = 2000,
                       internal: bool = False) -> int:
    """Write documents to one Parquet file. With `internal`, '_' attributes become columns.

    Returns the number of rows; writes nothing (and returns 0) for an empty stream.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(final)
    writer: pq.ParquetWriter | None = None
    internal_names: list[str] = []
    rows = 0
    try:
        for batch in batched(docs, batch_rows):
            table = documents_table(batch)
            if writer is None and internal:
                internal_names = sorted(k for k in batch[0].attributes if k.startswith("_"))
            for name in internal_names:
                table = table.append_column(name, pa.array([d.attributes.get(name) for d in batch]))
            if writer is None:
                table = table.cast(_schema_for(table))
                writer = pq.ParquetWriter(tmp, table.schema, compression="zstd")
            else:
                table = table.cast(writer.schema)
            writer.write_table(table)
            rows += len(batch)
    except BaseException:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
        raise
    if writer is None:
        return 0
    writer.close()
    os.replace(tmp, final)
    return rows


def _schema_for(table: pa.Table) -> pa.Schema:
    fields = [BASE_SCHEMA.field(n) if n in BASE_SCHEMA.names else table.schema.field(n)
              for n in table.column_names]
    return pa.schema(fields)


def write_parquet_table(table: pa.Table, final: Path) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(final)
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, final)


def read_documents(path: str | Path, batch_rows: int = 2000) -> Iterator[Document]:
    """Read back a Parquet or Dolma shard written by this module, `batch_rows` Parquet rows at a time."""
    path = Path(path)
    if path.suffix == ".parquet":
        with pq.ParquetFile(path) as pf:
            for batch in pf.iter_batches(batch_rows, columns=BASE_SCHEMA.names):
                yield from table_documents(batch)
    elif path.name.endswith(".jsonl.gz"):
        with gzip.open(path, "rb") as f:
            for line in f:
                if line.strip():
                    yield Document.from_row(orjson.loads(line))
    else:
        raise ValueError(f"not a corpus shard (expected .parquet or .jsonl.gz): {path}")
