"""Kept rejects (`refinery curate --keep-rejected`): every document a step drops, with the step, the
reason and every score computed up to the drop, so a user can read what a filter removed, and
re-threshold stored scores (`refinery refilter`) without rerunning a model.

A rejected row has the corpus's columns (BASE_SCHEMA) and `metadata["rejected"] = {"step": ...,
"reason": ...}` (dedup drops add `duplicate_of`, the id of the copy that stayed). Phase 1 streams a
shard's drops to `_work/rejected1/<shard>.parquet`; the write phase adds the shard's dedup drops (rows
of its phase-1 shard) and the drops of the steps after dedup, and writes
`rejected/<source>/<shard>.<ext>` beside the corpus, listed in stats.json's `rejected_files`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import Any

import orjson
import pyarrow as pa

from curation.document import Document
from curation.writer import dumps, rows_table, stored_metadata, stored_row

REJECTED_DIR = "rejected"
# Rejects buffered before they are handed on: a shard's rejects are never all in memory at once.
BATCH_ROWS = 500


def rejection(step: str, reason: str, **extra: Any) -> dict[str, Any]:
    return {"step": step, "reason": reason, **extra}


class RejectSink:
    """Collects the documents steps drop as rows and hands them to `emit` as BASE_SCHEMA tables of
    `batch_rows`. `hook(step)` is the `on_drop` callback for one step; `counts` holds, per step,
    how many documents it handed over (compared with its stats to catch a step that counts drops
    by hand instead of calling `Step.drop`)."""

    def __init__(self, emit: Callable[[pa.Table], None], batch_rows: int = BATCH_ROWS) -> None:
        self.emit = emit
        self.batch_rows = batch_rows
        self.counts: Counter[str] = Counter()
        self._rows: list[tuple[str, str, str, str, str, str]] = []

    def hook(self, step: str) -> Callable[[Document, str], None]:
        return partial(self.add, step)

    def add(self, step: str, doc: Document, reason: str) -> None:
        meta = stored_metadata(doc)
        meta["rejected"] = rejection(step, reason)
        row = stored_row(doc, meta)
        if not isinstance(doc.text, str):  # a text no step could decode: the reject is kept, empty
            row = (row[0], "", *row[2:])
        self._rows.append(row)
        self.counts[step] += 1
        if len(self._rows) >= self.batch_rows:
            self.flush()

    def flush(self) -> None:
        if self._rows:
            table = rows_table(self._rows)
            self._rows = []
            self.emit(table)

    @property
    def rows(self) -> int:
        return sum(self.counts.values())


def mark_rejected(table: pa.Table, rejections: list[dict[str, Any]]) -> pa.Table:
    """`table`'s rows (BASE_SCHEMA, e.g. phase-1 rows that dedup dropped) with each row's
    rejection added to its metadata."""
    metas = [dumps({**(orjson.loads(m) if m else {}), "rejected": r})
             for m, r in zip(table["metadata"].to_pylist(), rejections, strict=True)]
    return table.set_column(table.schema.get_field_index("metadata"), "metadata", pa.array(metas, pa.string()))
