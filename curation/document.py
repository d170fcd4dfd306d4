"""The document record every curation step reads and writes (Dolma fields plus attributes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

# Dolma's document fields; `metadata` keeps url, warc_date, warc_record_id, lang, ... and, on
# write, every attribute (score) a tagger computed, so later stages can re-threshold for free.
DOLMA_FIELDS = ("id", "text", "source", "added", "created", "metadata")


@dataclass(slots=True)
class Document:
    id: str
    text: str
    source: str
    added: str = ""
    created: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    # Scores computed by taggers, e.g. {"gopher.word_count": 312, "lid.en": 0.97}. Filters decide
    # from these plus thresholds, so a new threshold never reruns a model.
    attributes: dict[str, Any] = field(default_factory=dict)
    # Raw payload before extraction (HTML bytes) and its declared charset; cleared by `extract`.
    raw: bytes | None = None
    charset: str | None = None

    def to_row(self) -> dict[str, Any]:
        """Flatten to the on-disk record: attributes go into metadata."""
        meta = dict(self.metadata)
        if self.attributes:
            meta["attributes"] = dict(self.attributes)
        return {
            "id": self.id,
            "text": self.text,
            "source": self.source,
            "added": self.added,
            "created": self.created,
            "metadata": meta,
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Document:
        """The Document a stored row (a Dolma line, a Parquet row) was written from: the scores in
        `metadata["attributes"]` become attributes again."""
        meta = parse_metadata(row.get("metadata"))
        attrs = meta.pop("attributes", None) or {}
        return cls(
            id=row["id"],
            text=row["text"],
            source=row.get("source", ""),
            added=row.get("added", "") or "",
            created=row.get("created", "") or "",
            metadata=meta,
            attributes=dict(attrs),
        )


def parse_metadata(value: Any) -> dict[str, Any]:
    """A row's `metadata` as a new dict: an object (Dolma), the JSON string our Parquet holds, or
    nothing. Raises orjson.JSONDecodeError (a ValueError) for bad JSON, TypeError for a non-mapping."""
    if isinstance(value, str | bytes):
        value = orjson.loads(value) if value else None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TypeError(f"`metadata` is a {type(value).__name__}, not a mapping")
    return dict(value)
