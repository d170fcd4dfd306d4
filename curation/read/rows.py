"""Table rows (a JSON line, a Parquet or Arrow row) → Documents, for the readers of existing corpora.

A row in Dolma's layout (`id, text, source, added, created, metadata`) comes back as the
Document it was written from: `metadata["attributes"]` (the scores stored by `refinery curate`)
become `Document.attributes` again, so a stricter config re-thresholds stored scores and keeps
those of steps it does not rerun; a top-level `attributes` (Dolma's mixer output) joins them.
`metadata` may be a mapping or a JSON string (our Parquet). Any other column of a foreign table
(`url`, `timestamp` in C4) goes into `metadata`; a document's own `source` and `added` are kept.

A row that cannot be a document (text missing or not a string, metadata that is not a mapping)
is a counted `read.bad_row` with a sample naming file and row, never a dead task.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterable, Iterator
from typing import Any

import orjson

from curation.document import Document, parse_metadata
from curation.read.base import Reader
from curation.read.control_chars import strip_control_chars

# Dolma's fields, and `attributes`, which Dolma's mixer output keeps beside `metadata`.
_DOLMA_FIELDS = frozenset({"id", "text", "source", "added", "created", "metadata", "attributes"})


class BadRow(ValueError):
    """A row that cannot become a Document; the message says why."""


class RowReader(Reader):
    """Base of the readers whose files hold one document per row: `text_key` names the text,
    `id_key` the id (a row without one gets `<file name>#<row>`)."""

    def __init__(
        self,
        source: str = "common-crawl",
        added: str = "",
        cache_dir: str | None = None,
        text_key: str = "text",
        id_key: str = "id",
    ) -> None:
        super().__init__(source=source, added=added, cache_dir=cache_dir)
        if not text_key:
            raise ValueError("text_key must name the column that holds the text")
        self.text_key = text_key
        self.id_key = id_key

    def documents(self, rows: Iterable[tuple[int, Any]], path: str, unit: str = "row") -> Iterator[Document]:
        """Documents of `rows`, pairs of a position (`unit` names it in samples: row, line) and a
        row, or a BadRow for one that could not even be parsed; bad rows are counted and skipped.
        `stats.seconds` gets the reader's own time, not the consumer's."""
        stats = self.stats
        name = path.rstrip("/").rsplit("/", 1)[-1]
        t0 = time.perf_counter()
        for position, row in rows:
            stats.counters["rows"] += 1
            try:
                if isinstance(row, BadRow):
                    raise row
                doc = self.document(row, f"{name}#{position}")
            except BadRow as e:
                stats.error("read.bad_row", file=path, **{unit: position}, message=str(e)[:300])
                continue
            stats.docs_out += 1
            stats.seconds += time.perf_counter() - t0
            yield doc
            t0 = time.perf_counter()
        stats.seconds += time.perf_counter() - t0

    def document(self, row: Any, fallback_id: str) -> Document:
        """One row as a Document; raises BadRow when it cannot be one."""
        if not isinstance(row, dict):
            raise BadRow(f"expected an object, got {type(row).__name__}")
        text = row.get(self.text_key)
        if not isinstance(text, str):
            what = "missing" if text is None else f"a {type(text).__name__}, not a string"
            raise BadRow(f"`{self.text_key}` is {what}")
        text, removed = strip_control_chars(text)
        if removed:
            self.stats.counters["control_chars_removed"] += removed
        try:
            meta = parse_metadata(row.get("metadata"))
        except orjson.JSONDecodeError as e:
            raise BadRow(f"`metadata` is not valid JSON: {e}") from None
        except TypeError as e:
            raise BadRow(str(e)) from None
        for key, value in row.items():  # a foreign table's other columns
            if key not in _DOLMA_FIELDS and key not in (self.text_key, self.id_key) and value is not None:
                meta.setdefault(key, _plain(value))
        attrs = {}
        for where, found in (("attributes", row.get("attributes")), ("metadata.attributes", meta.pop("attributes", None))):
            if found is not None and not isinstance(found, dict):
                raise BadRow(f"`{where}` is a {type(found).__name__}, not a mapping")
            attrs.update(found or {})
        doc_id = row.get(self.id_key)
        return Document(
            id=str(doc_id) if doc_id is not None and doc_id != "" else fallback_id,
            text=text,
            source=_text(row.get("source")) or self.source,
            added=_text(row.get("added")) or self.added,
            created=_text(row.get("created")),
            metadata=meta,
            attributes=attrs,
        )


def _text(value: Any) -> str:
    """A Dolma string field from whatever the table holds (Parquet timestamps included)."""
    if value is None:
        return ""
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    return str(value)


def _plain(value: Any) -> Any:
    """A column value as something the writer can store in metadata JSON."""
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, bytes | bytearray):
        return f"<{len(value)} bytes>"
    return value
