"""Where a written document goes: its folder under `documents/` (or `rejected/`), and the writer
that puts one shard's rows into one file per folder.

Without `output.partition_by` a corpus is `documents/<source>/<shard>.<ext>`, the layout every
corpus had before partitioning existed. With it, each key is one folder level in Hive style,
`documents/<key1>=<v1>/<key2>=<v2>/<shard>.<ext>`, so Hive-aware readers (`pyarrow.dataset` with
`partitioning="hive"`) read the keys as columns. A key is `source` (the document's field), `lang` (metadata `lang`) or the name of
an attribute (metadata `attributes`, e.g. `topic.label`). A number is cut into buckets by
`output.buckets`: edges `[0.2, 0.5, 0.8]` name `q0` (below 0.2), `q1` ([0.2, 0.5)), `q2`
([0.5, 0.8)) and `q3` (0.8 and above). A missing value is `unknown`; values are made path-safe
(characters other than letters, digits, `-`, `_` and `.` become `_`).
"""

from __future__ import annotations

import gzip
import math
import os
from bisect import bisect_right
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.writer import BASE_SCHEMA, FORMAT_SUFFIXES, dolma_lines, tmp_path

UNKNOWN = "unknown"
# Keys read from the document itself rather than from its attributes.
DOCUMENT_KEYS = ("source", "lang")


class PartitionError(ValueError):
    """A document whose partition value cannot name a folder (a number without buckets, a list)."""


def path_safe(value: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in value)
    if not safe:
        return UNKNOWN
    return safe if safe.strip(".") else "_" * len(safe)  # "." and ".." are not folder names


def bucket_name(value: float, edges: Sequence[float]) -> str:
    return f"q{bisect_right(edges, value)}"


def check_partitioning(partition_by: Any, buckets: Any) -> str | None:
    """What is wrong with `output.partition_by` / `output.buckets`, or None. Checked when a config
    loads, so a bad key never surfaces in the write phase after hours of work."""
    if partition_by is None:
        return "buckets need partition_by (the keys they cut)" if buckets else None
    if not isinstance(partition_by, list) or not partition_by or not all(
            isinstance(k, str) and k for k in partition_by):
        return "partition_by must be a list of keys (source, lang or an attribute name such as topic.label)"
    if len(set(partition_by)) != len(partition_by):
        return f"partition_by lists a key twice: {partition_by}"
    buckets = buckets or {}
    if not isinstance(buckets, dict):
        return "buckets must map a key to its edges, e.g. {quality.score: [0.2, 0.5, 0.8]}"
    for key, edges in buckets.items():
        if key not in partition_by:
            return f"buckets.{key}: {key!r} is not in partition_by {partition_by}"
        if key in DOCUMENT_KEYS:
            return f"buckets.{key}: {key} is a label, not a number; it cannot be bucketed"
        if (not isinstance(edges, list) or not edges
                or not all(isinstance(e, int | float) and not isinstance(e, bool) for e in edges)):
            return f"buckets.{key} must be a list of numbers (the bucket edges), got {edges!r}"
        if any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
            return f"buckets.{key} must be strictly increasing, got {edges}"
    for key in partition_by:
        if key.endswith(".score") and key not in buckets:
            return (f"partition_by key {key!r} is a score (a number): give its bucket edges as "
                    f"buckets: {{{key}: [0.2, 0.5, 0.8]}}")
    return None


class Partitioner:
    """Maps a document (its source and parsed metadata) to its folder, relative to `documents/`."""

    def __init__(self, partition_by: Sequence[str] | None = None,
                 buckets: Mapping[str, Sequence[float]] | None = None) -> None:
        self.keys = list(partition_by) if partition_by else None
        self.buckets = {k: sorted(v) for k, v in (buckets or {}).items()}

    def folder(self, source: str, meta: Mapping[str, Any]) -> str:
        if self.keys is None:
            return path_safe(source or "")
        return "/".join(f"{path_safe(k)}={self._value(k, source, meta)}" for k in self.keys)

    def _value(self, key: str, source: str, meta: Mapping[str, Any]) -> str:
        if key == "source":
            value: Any = source
        elif key == "lang":
            value = meta.get("lang")
        else:
            value = (meta.get("attributes") or {}).get(key)
        if value is None or value == "":
            return UNKNOWN
        if key in self.buckets:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise PartitionError(f"output.buckets.{key}: a document holds {value!r}, not a number")
            return UNKNOWN if math.isnan(value) else bucket_name(value, self.buckets[key])
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, float):
            raise PartitionError(f"output.partition_by: {key!r} holds numbers ({value}); give its bucket "
                                 f"edges in output.buckets.{key}")
        if not isinstance(value, str | int):
            raise PartitionError(f"output.partition_by: {key!r} holds a {type(value).__name__}, not a label; "
                                 "partition by a label or a bucketed number")
        return path_safe(str(value))


class PartitionedWriter:
    """One shard's rows (BASE_SCHEMA tables), batch by batch, into `<root>/<folder>/<name>.<ext>`,
    one file per folder. Rows are buffered per folder up to `batch_rows` (few, large row groups);
    each file is written under a temp name and renamed by `close`, so no reader sees half a file."""

    def __init__(self, root: Path, name: str, fmt: str, batch_rows: int = 2000) -> None:
        self.root = root
        self.name = name
        self.parquet = fmt == "parquet"
        self.suffix = FORMAT_SUFFIXES[fmt]
        self.batch_rows = batch_rows
        self.counts: Counter[str] = Counter()
        self._sinks: dict[str, Any] = {}
        self._buffers: dict[str, list[pa.Table]] = {}

    def path(self, folder: str) -> Path:
        return self.root / folder / f"{self.name}{self.suffix}"

    def write(self, folders: Sequence[str], table: pa.Table) -> None:
        """Append `table`'s rows, row i to `folders[i]`, keeping their order within each folder."""
        if len(folders) != table.num_rows:
            raise ValueError(f"{len(folders)} folders for {table.num_rows} rows")
        if not folders:
            return
        if len(set(folders)) == 1:
            self._add(folders[0], table)
            return
        column = pa.array(folders, pa.string())
        for folder in dict.fromkeys(folders):
            self._add(folder, table.filter(pc.equal(column, folder)))

    def _add(self, folder: str, table: pa.Table) -> None:
        self.counts[folder] += table.num_rows
        buf = self._buffers.setdefault(folder, [])
        buf.append(table)
        if sum(t.num_rows for t in buf) >= self.batch_rows:
            self._flush(folder)

    def _flush(self, folder: str) -> None:
        tables = self._buffers.pop(folder, [])
        if not tables:
            return
        table = pa.concat_tables(tables).select(BASE_SCHEMA.names).cast(BASE_SCHEMA)
        sink = self._sinks.get(folder)
        if sink is None:
            tmp = tmp_path(self.path(folder))
            tmp.parent.mkdir(parents=True, exist_ok=True)
            sink = (pq.ParquetWriter(tmp, BASE_SCHEMA, compression="zstd") if self.parquet
                    else gzip.open(tmp, "wb", compresslevel=6))
            self._sinks[folder] = sink
        if self.parquet:
            sink.write_table(table)
        else:
            sink.writelines(dolma_lines(table))

    def close(self) -> dict[str, int]:
        """Finish every file; returns {path relative to the root's parent: rows}."""
        for folder in list(self._buffers):
            self._flush(folder)
        written = {}
        for folder, sink in self._sinks.items():
            sink.close()
            final = self.path(folder)
            os.replace(tmp_path(final), final)
            written[final.relative_to(self.root.parent).as_posix()] = self.counts[folder]
        self._sinks.clear()
        return dict(sorted(written.items()))

    def abort(self) -> None:
        for folder, sink in self._sinks.items():
            sink.close()
            tmp_path(self.path(folder)).unlink(missing_ok=True)
        self._sinks.clear()
        self._buffers.clear()
