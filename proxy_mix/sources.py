"""Reading pool documents from files: curated corpora (with their attributes) and named sources.

`proxy_mix` reads corpora as files and never imports `curation` (see docs/decisions.md): a curated
corpus is Parquet (`metadata` a JSON string holding `attributes`) or Dolma JSON lines (`metadata`
an object); other sources are plain text (cut at paragraph breaks into documents), Python code
(one document per file), CSV (one column) or JSON lines with a `text` field.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from proxy_mix.config import MixConfigError

log = logging.getLogger(__name__)

DOC_SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz", ".json.gz", ".jsonl.zst")
TEXT_SUFFIXES = (".txt", ".raw", ".md")
CODE_SUFFIXES = (".py",)
TEXT_FIELDS = ("text", "content", "contents")
STDLIB = "stdlib"


@dataclass
class Doc:
    id: str
    text: str
    attributes: dict[str, Any] = field(default_factory=dict)


def resolve_path(path: str) -> Path:
    """A config path; `stdlib` is the Python standard library's sources on this machine."""
    return Path(sysconfig.get_paths()["stdlib"]) if path == STDLIB else Path(path)


def _files(path: Path, suffixes: tuple[str, ...]) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise MixConfigError(f"path not found: {path}")
    documents = path / "documents"
    if documents.is_dir():  # a curation output: its documents, never its _work files
        path = documents
    out = []
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).parts
        # Hidden and underscore folders hold caches and work files (_work, __pycache__, .tmp-*).
        if any(part.startswith((".", "_")) and part != "__init__.py" for part in rel):
            continue
        if p.is_file() and p.name.endswith(suffixes):
            out.append(p)
    return out


def _open_lines(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
    if path.name.endswith(".zst"):
        import zstandard

        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True),
                                encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _attributes(row: dict[str, Any]) -> dict[str, Any]:
    meta = row.get("metadata")
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except ValueError:
            meta = None
    attrs = meta.get("attributes") if isinstance(meta, dict) else None
    return dict(attrs) if isinstance(attrs, dict) else {}


def _row_doc(row: Any, fallback_id: str) -> Doc | None:
    if not isinstance(row, dict):
        return None
    text = next((row[f] for f in TEXT_FIELDS if isinstance(row.get(f), str) and row[f].strip()), None)
    if text is None:
        return None
    return Doc(str(row.get("id") or fallback_id), text, _attributes(row))


def read_documents(path: Path, files: list[Path] | None = None) -> Iterator[Doc]:
    """Documents of a corpus file or folder (Parquet / JSON lines), with their attributes; `files`,
    when given, are the document files to read (a curation output's listed files)."""
    for f in files if files is not None else _files(path, DOC_SUFFIXES):
        if f.name.endswith(".parquet"):
            pf = pq.ParquetFile(f)
            cols = [c for c in ("id", "text", "content", "metadata") if c in pf.schema_arrow.names]
            n = 0
            for batch in pf.iter_batches(columns=cols, batch_size=1024):
                for row in batch.to_pylist():
                    doc = _row_doc(row, f"{f.name}:{n}")
                    n += 1
                    if doc is not None:
                        yield doc
        else:
            yield from _json_lines_docs(f)


def _json_lines_docs(f: Path) -> Iterator[Doc]:
    """Documents of a JSON-lines file; a line that is not JSON is skipped, counted and logged."""
    bad, first = 0, 0
    try:
        with _open_lines(f) as fh:
            for n, line in enumerate(fh):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    bad += 1
                    first = first or n + 1
                    continue
                doc = _row_doc(row, f"{f.name}:{n}")
                if doc is not None:
                    yield doc
    finally:  # also when the reader stops early (a source's document cap)
        if bad:
            log.warning("%s: skipped %d lines that are not valid JSON (the first is line %d)", f, bad, first)


def split_text(text: str, chunk_chars: int) -> Iterator[str]:
    """A long text (a book, a Wikipedia dump) as documents of about `chunk_chars` characters, cut at
    paragraph breaks."""
    parts: list[str] = []
    size = 0
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if not para:
            continue
        parts.append(para)
        size += len(para)
        if size >= chunk_chars:
            yield "\n\n".join(parts)
            parts, size = [], 0
    if parts:
        yield "\n\n".join(parts)


def _csv_docs(path: Path, column: str) -> Iterator[str]:
    csv.field_size_limit(1 << 24)
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        rows = csv.DictReader(f)
        if rows.fieldnames is None or column not in rows.fieldnames:
            raise MixConfigError(f"{path} has no column {column!r} (columns: {rows.fieldnames}); set text_column")
        title = next((c for c in ("title", "titles") if c in rows.fieldnames), None)
        for row in rows:
            text = row.get(column) or ""
            if text.strip():
                yield f"{row[title]}\n\n{text}" if title and row.get(title) else text


def _format_of(path: Path) -> str:
    name = path.name
    if name.endswith(DOC_SUFFIXES):
        return "documents"
    if name.endswith(CODE_SUFFIXES):
        return "code"
    if name.endswith(".csv"):
        return "csv"
    return "text"


def read_source(paths: list[str], fmt: str = "auto", chunk_chars: int = 4000, text_column: str = "abstract",
                max_documents: int | None = None, max_bytes: int | None = None) -> Iterator[Doc]:
    """Documents of a named source, in a fixed order (sorted files), up to the document / byte caps."""
    suffixes = {"documents": DOC_SUFFIXES, "text": TEXT_SUFFIXES, "code": CODE_SUFFIXES, "csv": (".csv",),
                "auto": DOC_SUFFIXES + TEXT_SUFFIXES + CODE_SUFFIXES + (".csv",)}[fmt]
    count, size = 0, 0
    for raw in paths:
        root = resolve_path(raw)
        files = _files(root, suffixes)
        if raw == STDLIB:  # the interpreter's own library only, not the packages installed beside it
            files = [f for f in files if not {"site-packages", "dist-packages"} & set(f.relative_to(root).parts)]
        if not files:
            raise MixConfigError(f"{root}: no files of format {fmt} ({', '.join(suffixes)})")
        for f in files:
            kind = _format_of(f) if fmt == "auto" else fmt
            if kind == "documents":
                docs: Iterator[Doc] = read_documents(f)
            elif kind == "code":
                docs = iter([Doc(str(f), f.read_text(encoding="utf-8", errors="replace"))])
            elif kind == "csv":
                docs = (Doc(f"{f}:{i}", t) for i, t in enumerate(_csv_docs(f, text_column)))
            else:
                text = f.read_text(encoding="utf-8", errors="replace")
                docs = (Doc(f"{f}:{i}", t) for i, t in enumerate(split_text(text, chunk_chars)))
            for doc in docs:
                if not doc.text.strip():
                    continue
                yield doc
                count += 1
                size += len(doc.text.encode("utf-8"))
                if (max_documents is not None and count >= max_documents) or (
                        max_bytes is not None and size >= max_bytes):
                    return
