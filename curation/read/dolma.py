"""Read Dolma document files: one JSON object per line, plain, gzip or zstd.

Dolma's layout (`id, text, source, added, created, metadata`) is also what `refinery curate
--format dolma` writes, so a curated corpus re-curates through this reader with its stored
scores (see `rows.py`). Files are streamed line by line, never loaded whole. A line that is not
a JSON object, or has no string `text`, is a counted `read.bad_row` (file and line number in the
sample); a file that ends mid-stream (a truncated gzip) keeps the documents before the fault and
counts one `read.malformed` error.
"""

from __future__ import annotations

import gzip
import io
import zlib
from collections.abc import Iterator
from functools import partial
from typing import IO, Any, ClassVar

import orjson

from curation.document import Document
from curation.read.inputs import MissingBackend, open_input
from curation.read.rows import BadRow, RowReader

# `.json.gz` is Dolma's own spelling of a gzip JSON-lines file.
DOLMA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst", ".json")
_FILE_FAULTS = (OSError, EOFError, zlib.error, UnicodeError)


class DolmaReader(RowReader):
    """Documents of Dolma `*.jsonl[.gz|.zst]` / `*.json.gz` files (one JSON object per line)."""

    suffixes: ClassVar[tuple[str, ...]] = DOLMA_SUFFIXES

    def read(self, path: str) -> Iterator[Document]:
        raw = self.opened(path, partial(open_input, path, self.cache_dir))
        if raw is None:
            return
        lines = 0
        try:
            with raw, _decompressed(raw, str(path)) as f:
                for doc in self.documents(_parsed(f), str(path), unit="line"):
                    lines += 1
                    yield doc
        except _FILE_FAULTS as e:
            self.stats.error("read.malformed", file=str(path), after_documents=lines,
                             message=f"{type(e).__name__}: {e}"[:300])


def _decompressed(raw: IO[bytes], path: str) -> IO[bytes]:
    """A line-iterable binary stream of the file's content, by its magic bytes (not its name)."""
    head = raw.peek(4)[:4] if isinstance(raw, io.BufferedReader) else b""
    if head[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw)
    if head == b"\x28\xb5\x2f\xfd":
        try:
            import zstandard
        except ImportError:
            raise MissingBackend(f"{path} is zstd-compressed; install the reader for it: pip install zstandard") from None
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw))
    return raw


def _parsed(lines: IO[bytes]) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object or BadRow) for every non-blank line."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield lineno, orjson.loads(line)
        except orjson.JSONDecodeError as e:
            yield lineno, BadRow(f"not valid JSON: {e}")
