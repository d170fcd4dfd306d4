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

from curation.document import Document

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


def _doc_columns(docs: list[Document], internal: list[str]) -> dict[str, list[Any]]:
    cols: dict[str, list[Any]] = {name: [] for name in BASE_SCHEMA.names}
    for name in internal:
        cols[name] = []
    for d in docs:
        cols["id"].append(d.id)
        cols["text"].append(d.text)
        cols["source"].append(d.source)
        cols["added"].append(d.added)
        cols["created"].append(d.created)
        meta = dict(d.metadata)
        public = {k: v for k, v in d.attributes.items() if not k.startswith("_")}
        if public:
            meta["attributes"] = public
        cols["metadata"].append(dumps(meta))
        for name in internal:
            cols[name].append(d.attributes.get(name))
    return cols


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
        for batch in _batched(docs, batch_rows):
            if writer is None:
                if internal:
                    internal_names = sorted(k for k in batch[0].attributes if k.startswith("_"))
                table = pa.table(_doc_columns(batch, internal_names))
                table = table.cast(_schema_for(table))
                writer = pq.ParquetWriter(tmp, table.schema, compression="zstd")
            else:
                table = pa.table(_doc_columns(batch, internal_names)).cast(writer.schema)
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


def write_dolma_table(table: pa.Table, final: Path) -> None:
    """Dolma layout: one JSON object per line, gzip, metadata as a nested object."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(final)
    with gzip.open(tmp, "wb", compresslevel=6) as f:
        for row in table.to_pylist():
            row["metadata"] = orjson.loads(row["metadata"]) if row.get("metadata") else {}
            f.write(orjson.dumps(row) + b"\n")
    os.replace(tmp, final)


def read_documents(path: str | Path) -> Iterator[Document]:
    """Read back a Parquet or Dolma shard written by this module."""
    path = Path(path)
    if path.suffix == ".parquet":
        for row in pq.read_table(path, columns=BASE_SCHEMA.names).to_pylist():
            row["metadata"] = orjson.loads(row["metadata"]) if row["metadata"] else {}
            yield Document.from_row(row)
    elif path.name.endswith(".jsonl.gz"):
        with gzip.open(path, "rb") as f:
            for line in f:
                if line.strip():
                    yield Document.from_row(orjson.loads(line))
    else:
        raise ValueError(f"not a corpus shard (expected .parquet or .jsonl.gz): {path}")


def _batched(docs: Iterable[Document], n: int) -> Iterator[list[Document]]:
    batch: list[Document] = []
    for d in docs:
        batch.append(d)
        if len(batch) >= n:
            yield batch
            batch = []
    if batch:
        yield batch
