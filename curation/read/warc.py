"""Read web archives into Documents: WARC (0.17/1.0/1.1), WET and legacy ARC; plain or gzip.

WARC and WET go through FastWARC (measured 1.7x faster than warcio on the pages shards, see
`docs/benchmarks.md`); ARC, which FastWARC does not parse, goes through warcio's `arc2warc`.
Gzip comes in two layouts: one member per record (Common Crawl; record offsets then point at the
member, as in the CC index) or one stream for the whole file (older crawls, the CC-2016 WET
fragments). The latter is decompressed in Python first, so offsets are positions in the
decompressed stream, and warcio, which refuses such files, can read ARC in that layout too.

Only HTTP `response` records with an accepted status and an HTML content type, and WET
`conversion` records, become Documents. Everything else is counted in `stats.counters` under
`skipped.<why>` so the read funnel adds up.

Damage does not end a WARC/WET file: Common Crawl writes one gzip member per record, so after a
corrupt member, junk between records or a wrong Content-Length the reader resumes at the next
member that decompresses into a record, else at the next `WARC/x.y` header (`layout.py`). Each
damaged stretch is one counted `read.malformed` error (file, offset where it starts, message,
`resumed_at`), and `counters` keep `read.resynced` (stretches after which reading resumed),
`read.bytes_skipped` and `skipped.damaged` (records started but lost). A record is only yielded
once the next record's header parsed where its Content-Length said, so a record with a wrong
length is dropped, not passed on with its neighbour's bytes in it. ARC files (warcio) still end
at their first fault.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import logging
import os
import time
import zlib
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from functools import partial
from typing import Any

from curation.document import Document
from curation.read.base import Reader
from curation.read.control_chars import strip_control_chars
from curation.read.inputs import DIRECTORY_SUFFIXES, MissingBackend, archives_in, open_input
from curation.read.layout import Layout, open_layout
from curation.step import StepStats

log = logging.getLogger(__name__)
HTML_CONTENT_TYPES = ("text/html", "application/xhtml+xml")
_DRAIN_CHUNK = 1 << 16
_INPUT_FAULTS = (OSError, EOFError, zlib.error, UnicodeError)
_PARSER_FAULTS = frozenset({"ArchiveLoadFailed", "StatusAndHeadersParserException"})


class MalformedArchive(Exception):
    """A damaged record or stream at `offset`; WARC reading resumes after it where it can."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.offset = offset


class WarcReader(Reader):
    """Yields one Document per usable record of a WARC / WET / ARC file.

    `read(path)` counts into `self.stats` (a `StepStats("read")`): `docs_out` (documents it
    yielded), `seconds` (its own time, not the consumer's), `counters["records"]`,
    `counters["skipped.<why>"]`, the damage counters (`read.resynced`, `read.bytes_skipped`) and
    `control_chars_removed`, and `errors["read.malformed"]` with samples naming file and offset.
    `docs_in` stays 0: a reader has no upstream documents.
    """

    suffixes = DIRECTORY_SUFFIXES

    def __init__(
        self,
        source: str = "common-crawl",
        added: str = "",
        statuses: Iterable[int] = (200,),
        content_types: Iterable[str] = HTML_CONTENT_TYPES,
        max_payload_bytes: int = 10_000_000,
        cache_dir: str | None = None,
        allow_local_in_listings: bool = False,
    ) -> None:
        super().__init__(source=source, added=added, cache_dir=cache_dir)
        self.statuses = frozenset(int(s) for s in statuses)
        self.content_types = frozenset(c.lower() for c in content_types)
        # Larger payloads are skipped unread. Common Crawl cuts payloads at a few MiB itself
        # (marked WARC-Truncated), so 10 MB only bites on other crawls' videos and archives.
        self.max_payload_bytes = max_payload_bytes
        # Used where inputs are expanded (`expand_inputs`), before any reader runs; a parameter
        # here so that the config's `read:` section describes one object.
        self.allow_local_in_listings = allow_local_in_listings
        _require_brotli()

    def files_in(self, directory: str) -> list[str]:
        """The web archives under `directory` (a curation output holds none: it needs another reader)."""
        return archives_in(directory, directory)

    # -- public -------------------------------------------------------------------------------

    def read(self, path: str) -> Iterator[Document]:
        """Documents of one archive file, in file order. Never raises for a bad file."""
        fname = os.path.basename(str(path).rstrip("/"))
        stats = self.stats
        cursor = _Cursor()
        t0 = time.perf_counter()
        raw_file = self.opened(path, partial(open_input, path, self.cache_dir))
        if raw_file is None:
            return
        try:
            with raw_file as raw:
                layout, first = open_layout(raw)
                if first.startswith(b"filedesc://"):
                    records = self._arc(layout, fname, cursor)
                else:
                    records = self._warc(layout, first, fname, str(path))
                for doc in records:
                    stats.docs_out += 1
                    stats.seconds += time.perf_counter() - t0
                    yield doc
                    t0 = time.perf_counter()
        except MalformedArchive as e:
            stats.error("read.malformed", file=str(path), offset=e.offset, message=str(e))
            log.warning("%s: malformed at offset %s, the rest of the file is skipped: %s", path, e.offset, e)
        except Exception as e:  # noqa: BLE001 - one bad file must not end the job
            # I/O, gzip and parser faults (OSError, EOFError, zlib.error, warcio's ArchiveLoadFailed)
            # are damaged input; anything else is counted apart so a bug does not pass as bad data.
            kind = "read.malformed" if isinstance(e, _INPUT_FAULTS) or type(e).__name__ in _PARSER_FAULTS else "read.error"
            stats.error(kind, file=str(path), offset=cursor.offset, message=f"{type(e).__name__}: {e}")
            log.warning("%s: %s at offset %s, the rest of the file is skipped: %s: %s", path, kind, cursor.offset,
                        type(e).__name__, e)
        stats.seconds += time.perf_counter() - t0

    # -- WARC / WET (FastWARC) ----------------------------------------------------------------

    def _warc(self, layout: Layout, first: bytes, fname: str, path: str) -> Iterator[Document]:
        """Records from the start, resuming after each damaged stretch (see the module docstring)."""
        from fastwarc.warc import ArchiveIterator, WarcRecordType

        counters = self.stats.counters
        pos = 0
        damage: _Damage | None = None
        if not first.startswith(b"WARC/"):
            resume = layout.next_record(1)
            if resume is None:
                raise MalformedArchive(f"not a WARC or ARC file (starts with {first[:16]!r})", 0)
            damage = self._damaged(path, 0, f"no WARC record at the start of the file (starts with {first[:16]!r})")
            pos = resume
        while True:
            layout.stream.seek(pos)
            records = ArchiveIterator(layout.stream, record_types=WarcRecordType.any_type, parse_http=False,
                                      fsspec_args=False)
            pending: Document | None = None  # yielded once the next header proves its length right
            current: int | None = None  # offset of the record being read
            last: tuple[int, int] | None = None  # (offset, Content-Length) of the last whole record
            try:
                for rec in records:
                    current = rec.stream_pos
                    length = rec.content_length
                    if pending is not None:
                        yield pending
                        pending = None
                    if damage is not None:
                        counters["read.resynced"] += 1
                        counters["read.bytes_skipped"] += current - damage.start
                        log.info("%s: resumed reading at offset %d (%d damaged bytes skipped)", path, current,
                                 current - damage.start)
                        damage.resumed_at(current)
                        damage = None
                    counters["records"] += 1
                    pending = self._record(rec, fname)
                    last = (current, length)  # read before parse_http, which shrinks content_length
                    current = None
                if pending is not None:
                    yield pending
                if damage is not None:  # resumed at a header that led nowhere: damaged to the end
                    counters["read.bytes_skipped"] += max(layout.size() - damage.start, 0)
                    return
                stopped = layout.fault()
                if stopped is None:
                    return
                # A whole-file gzip stream ends at its damage: say so instead of ending quietly.
                raise MalformedArchive(stopped, last[0] if last else pos)
            except (MalformedArchive, *_INPUT_FAULTS) as e:
                message = str(e) if isinstance(e, MalformedArchive) else f"{type(e).__name__}: {e}"
                stopped = layout.fault()
                if stopped and stopped not in message:
                    message += f" ({stopped})"
                if current is not None:  # the record being read is damaged
                    counters["skipped.damaged"] += 1
                    bad, search = current, current + 1
                elif last is not None:  # the parser failed after `last`: check that `last` was whole
                    end = layout.record_end(*last)
                    if pending is not None:
                        if end is not None:
                            yield pending
                        else:
                            counters["skipped.damaged"] += 1
                    bad, search = (end, end) if end is not None else (last[0], last[0] + 1)
                else:  # nothing readable where we (re)started
                    bad, search = pos, pos + 1
                if damage is None:
                    damage = self._damaged(path, bad, message)
                resume = layout.next_record(search)
                if resume is None:
                    counters["read.bytes_skipped"] += max(layout.size() - damage.start, 0)
                    return
                pos = resume

    def _damaged(self, path: str, offset: int, message: str) -> _Damage:
        """Count one damaged stretch starting at `offset`; the sample learns where reading resumed."""
        samples = self.stats.samples
        n = len(samples)
        self.stats.error("read.malformed", file=path, offset=offset, message=message)
        log.warning("%s: damaged at offset %d (%s); looking for the next record", path, offset, message)
        return _Damage(offset, samples[-1] if len(samples) > n else None)

    def _record(self, rec: Any, fname: str) -> Document | None:
        """The Document of one WARC record, or None (counted) if it is not one to keep."""
        from fastwarc.warc import WarcRecordType

        if rec.headers.get("Content-Length") is None:
            # FastWARC accepts a header block cut off by the end of the file as a record.
            raise MalformedArchive("record header without Content-Length (truncated?)", rec.stream_pos)
        rtype = rec.record_type
        if rtype == WarcRecordType.response:
            return self._warc_response(rec, fname)
        if rtype == WarcRecordType.conversion:
            return self._warc_conversion(rec, fname)
        _drain(rec.reader, rec.content_length, rec.stream_pos)
        self.stats.counters[f"skipped.{_type_name(rtype)}"] += 1
        return None

    def _warc_response(self, rec: Any, fname: str) -> Document | None:
        counters = self.stats.counters
        try:
            rec.parse_http()
        except OSError:
            counters["skipped.bad_http"] += 1
            _drain(rec.reader, rec.content_length, rec.stream_pos)
            return None
        if not rec.is_http or rec.http_headers is None:  # dns:, whois:, ... captures
            counters["skipped.non_http"] += 1
            _drain(rec.reader, rec.content_length, rec.stream_pos)
            return None
        http = rec.http_headers
        status = http.status_code
        ctype = (rec.http_content_type or "").lower()
        reason = self._skip_reason(status, ctype, rec.content_length)
        if reason is not None:
            counters[reason] += 1
            _drain(rec.reader, rec.content_length, rec.stream_pos)
            return None
        body = _read_exact(rec.reader, rec.content_length, rec.stream_pos)
        body = self._decode_body(body, http.get("Transfer-Encoding"), http.get("Content-Encoding"))
        if body is None:
            return None
        if not ctype and not _looks_like_html(body):
            counters["skipped.non_html"] += 1
            return None
        headers = rec.headers
        if headers.get("WARC-Truncated"):
            counters["truncated_payload"] += 1  # kept: the start of a page still extracts well
        url = headers.get("WARC-Target-URI", "")
        date = _iso_date(headers.get("WARC-Date", ""))
        rid = _record_uuid(headers.get("WARC-Record-ID"), url, date)
        return self._doc(rid, url, date, fname, rec.stream_pos, ctype or None, status, raw=body,
                         charset=rec.http_charset, record_id=headers.get("WARC-Record-ID", ""))

    def _warc_conversion(self, rec: Any, fname: str) -> Document:
        body = _read_exact(rec.reader, rec.content_length, rec.stream_pos)
        headers = rec.headers
        url = headers.get("WARC-Target-URI", "")
        date = _iso_date(headers.get("WARC-Date", ""))
        rid = _record_uuid(headers.get("WARC-Record-ID"), url, date)
        ctype = (headers.get("Content-Type") or "text/plain").split(";")[0].strip().lower()
        doc = self._doc(rid, url, date, fname, rec.stream_pos, ctype, None, raw=None, charset=None,
                        record_id=headers.get("WARC-Record-ID", ""))
        # WET text is UTF-8 by Common Crawl's spec; replace rather than drop the odd bad byte.
        doc.text, removed = strip_control_chars(body.decode("utf-8", errors="replace"))
        if removed:
            self.stats.counters["control_chars_removed"] += removed
        lang = headers.get("WARC-Identified-Content-Language")
        if lang:
            doc.metadata["cc_lang"] = lang
        return doc

    # -- ARC (warcio) -------------------------------------------------------------------------

    def _arc(self, layout: Layout, fname: str, cursor: _Cursor) -> Iterator[Document]:
        from warcio.archiveiterator import ArchiveIterator

        counters = self.stats.counters
        it = ArchiveIterator(layout.stream, arc2warc=True)
        for rec in it:
            counters["records"] += 1
            if rec.rec_type != "response":
                rec.raw_stream.read()
                cursor.offset = it.get_record_offset()
                counters[f"skipped.{rec.rec_type}"] += 1
                continue
            http = rec.http_headers
            if http is None:
                rec.raw_stream.read()
                cursor.offset = it.get_record_offset()
                counters["skipped.non_http"] += 1
                continue
            try:
                status = int(http.get_statuscode() or 0)
            except ValueError:
                status = 0
            ctype_header = http.get_header("Content-Type") or ""
            ctype = ctype_header.split(";")[0].strip().lower()
            reason = self._skip_reason(status, ctype, rec.length)
            body = rec.raw_stream.read()
            # warcio only knows the offset once the record has been read to its end.
            cursor.offset = offset = it.get_record_offset()
            if reason is not None:
                counters[reason] += 1
                continue
            body = self._decode_body(body, http.get_header("Transfer-Encoding"), http.get_header("Content-Encoding"))
            if body is None:
                continue
            if not ctype and not _looks_like_html(body):
                counters["skipped.non_html"] += 1
                continue
            url = rec.rec_headers.get_header("WARC-Target-URI") or ""
            date = _iso_date(rec.rec_headers.get_header("WARC-Date") or "")
            # warcio's arc2warc invents a random WARC-Record-ID on every run: derive a stable id.
            rid = _record_uuid(None, url, date)
            yield self._doc(rid, url, date, fname, offset, ctype or None, status, raw=body,
                            charset=_charset_from_content_type(ctype_header), record_id="")
        if layout.fault():
            raise MalformedArchive(layout.fault() or "", cursor.offset)

    # -- shared -------------------------------------------------------------------------------

    def _skip_reason(self, status: int, ctype: str, length: int) -> str | None:
        if status not in self.statuses:
            return f"skipped.status_{status}"
        if ctype and ctype not in self.content_types:
            return "skipped.non_html"
        if length > self.max_payload_bytes:
            return "skipped.too_large"
        return None

    def _decode_body(self, body: bytes, transfer: str | None, content: str | None) -> bytes | None:
        try:
            return decode_http_payload(body, transfer, content, self.max_payload_bytes)
        except (ValueError, zlib.error, OSError) as e:  # never ImportError: see _require_brotli
            self.stats.counters["skipped.bad_encoding"] += 1
            if len(self.stats.samples) < StepStats.MAX_SAMPLES:
                self.stats.samples.append({"kind": "read.bad_encoding", "message": str(e)})
            return None

    def _doc(self, rid: str, url: str, date: str, fname: str, offset: int, ctype: str | None,
             status: int | None, *, raw: bytes | None, charset: str | None, record_id: str) -> Document:
        return Document(
            id=rid,
            text="",
            source=self.source,
            added=self.added,
            created=date,
            metadata={
                "url": url,
                "warc_date": date,
                "warc_record_id": record_id,
                "warc_file": fname,
                "warc_offset": offset,
                "content_type": ctype,
                "status": status,
            },
            raw=raw,
            charset=charset,
        )


class _Cursor:
    """Last known record offset, for the error report when a parser raises."""

    __slots__ = ("offset",)

    def __init__(self) -> None:
        self.offset = 0


class _Damage:
    """A damaged stretch of a file: where it starts, and the error sample to complete."""

    __slots__ = ("sample", "start")

    def __init__(self, start: int, sample: dict[str, Any] | None) -> None:
        self.start = start
        self.sample = sample

    def resumed_at(self, offset: int) -> None:
        if self.sample is not None:
            self.sample["resumed_at"] = offset


# -- record helpers -----------------------------------------------------------------------------


def _read_exact(reader: Any, length: int, offset: int) -> bytes:
    body = reader.read()
    if len(body) < length:
        raise MalformedArchive(f"record truncated: {len(body)} of {length} payload bytes", offset)
    return body


def _drain(reader: Any, length: int, offset: int) -> None:
    """Skip a record's payload, still noticing when the file ends inside it."""
    n = 0
    while True:
        chunk = reader.read(_DRAIN_CHUNK)
        if not chunk:
            break
        n += len(chunk)
    if n < length:
        raise MalformedArchive(f"record truncated: {n} of {length} payload bytes", offset)


def _type_name(rtype: Any) -> str:
    return str(rtype).rsplit(".", 1)[-1]


def _record_uuid(record_id: str | None, url: str, date: str) -> str:
    """The uuid of `<urn:uuid:...>`; without a record id, a stable sha1 of url and date."""
    if record_id:
        rid = record_id.strip().strip("<>")
        # UUIDs are case-insensitive; some crawlers (wget) write them upper-case.
        return rid[len("urn:uuid:"):].lower() if rid.startswith("urn:uuid:") else rid
    return hashlib.sha1(f"{url} {date}".encode()).hexdigest()


def _iso_date(value: str) -> str:
    """WARC-Date as ISO 8601 UTC (`2024-05-17T23:31:22Z`); ARC's 14-digit form converted."""
    value = value.strip()
    if not value:
        return ""
    try:
        if value.isdigit() and len(value) == 14:
            dt = datetime.strptime(value, "%Y%m%d%H%M%S").replace(tzinfo=UTC)
        else:
            dt = datetime.fromisoformat(value)
            dt = dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)
    except ValueError:
        return value
    return dt.isoformat().replace("+00:00", "Z")


def _charset_from_content_type(header: str) -> str | None:
    for part in header.split(";")[1:]:
        key, _, val = part.partition("=")
        if key.strip().lower() == "charset":
            name = val.strip().strip("\"'")
            try:
                return codecs.lookup(name).name
            except LookupError:
                return None
    return None


def _looks_like_html(body: bytes) -> bool:
    """Content sniffing for responses that declare no Content-Type."""
    head = body[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return head.startswith((b"<!doctype html", b"<html", b"<head", b"<!--")) or b"<html" in head


def decode_http_payload(body: bytes, transfer: str | None, content: str | None, limit: int) -> bytes:
    """Undo HTTP transfer and content codings (chunked, gzip, deflate, br), capped at `limit`."""
    if transfer and "chunked" in transfer.lower():
        body = _dechunk(body)
    if content:
        for coding in reversed([c.strip().lower() for c in content.split(",") if c.strip()]):
            if coding in ("gzip", "x-gzip"):
                # Crawlers (CC 2014 among them) often store the decoded body under the original
                # header: without the gzip magic there is nothing to undo.
                if body[:2] == b"\x1f\x8b":
                    body = _inflate(body, 31, limit)
            elif coding == "deflate":
                try:
                    body = _inflate(body, 15, limit)
                except zlib.error:  # servers often send raw deflate without the zlib header
                    body = _inflate(body, -15, limit)
            elif coding == "br":
                body = _unbrotli(body, limit)
            elif coding != "identity":
                raise ValueError(f"unsupported Content-Encoding {coding!r}")
    return body


def _inflate(data: bytes, wbits: int, limit: int) -> bytes:
    d = zlib.decompressobj(wbits=wbits)
    out = d.decompress(data, limit + 1)
    if len(out) > limit:
        raise ValueError(f"decoded payload exceeds {limit} bytes")
    return out


def _require_brotli() -> None:
    """A missing brotli module is a broken install, not bad data: fail before reading anything
    rather than count every `Content-Encoding: br` page as `skipped.bad_encoding`."""
    try:
        import brotli  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        raise MissingBackend("the WARC reader needs the brotli module to decode 'Content-Encoding: br' "
                             "payloads (it comes with fastwarc); install it: pip install brotli") from None


def _unbrotli(data: bytes, limit: int) -> bytes:
    import brotli  # type: ignore[import-not-found]

    # brotli.error derives from Exception only: as ValueError it is a counted skip of this
    # record, not a fault that ends the file. The output cap bounds a decompression bomb.
    try:
        out = brotli.Decompressor().process(data, output_buffer_limit=limit + 1)
    except brotli.error as e:
        raise ValueError(f"bad brotli payload: {e}") from e
    if len(out) > limit:
        raise ValueError(f"decoded payload exceeds {limit} bytes")
    return out


def _dechunk(body: bytes) -> bytes:
    """Decode HTTP/1.1 chunked framing. Archives sometimes store an already-dechunked body
    under a `chunked` header: if the framing does not parse, the body is kept as it is."""
    out = io.BytesIO()
    pos = 0
    n = len(body)
    while pos < n:
        eol = body.find(b"\r\n", pos)
        if eol < 0:
            return body
        size_field = body[pos:eol].split(b";", 1)[0].strip()
        try:
            size = int(size_field, 16)
        except ValueError:
            return body
        if size == 0:
            return out.getvalue()
        start = eol + 2
        out.write(body[start:start + size])
        pos = start + size + 2
    return out.getvalue()
