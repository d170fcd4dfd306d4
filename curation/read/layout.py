"""How an archive's bytes are laid out, and where the next record starts after damage.

Three layouts: plain (uncompressed), one gzip member per record (Common Crawl; a record's offset
is the offset of its member, as in the CC index) and one gzip stream for the whole file (older
crawls; offsets are positions in the decompressed stream). Each layout offers the stream the
record parser reads and the two questions the reader asks after a fault: did the last record end
where its Content-Length says (`record_end`), and where does the next readable record start
(`next_record`): the next gzip member that decompresses whole into a WARC record, else the next
`WARC/x.y` header line. A whole-file gzip stream cannot be resumed past a corrupt byte (every byte
after it depends on it), so that layout reads up to the damage and ends there, cleanly.
"""

from __future__ import annotations

import io
import re
import zlib
from collections.abc import Callable
from typing import BinaryIO

GZIP_MAGIC = b"\x1f\x8b\x08"  # ID1 ID2 CM=deflate: how every gzip member starts
_GZIP_START = re.compile(re.escape(GZIP_MAGIC))
_WARC_HEADER = re.compile(rb"WARC/\d\.\d{1,2}\r?\n")
_SCAN_OVERLAP = 16  # longer than any match, so a match cut by a chunk end is found in the next one
_SCAN_CHUNK = 1 << 20
_HEAD_BYTES = 64 << 10  # FastWARC refuses WARC headers over 32 KiB
_IN_CHUNK = 1 << 16
# A gzip file whose first member is still open after this much input is treated as one stream.
_MEMBER_PROBE_BYTES = 4 << 20


class Layout:
    """The stream the record parser reads, and fault recovery in that stream's offsets."""

    def __init__(self, raw: BinaryIO, stream: BinaryIO) -> None:
        self.raw = raw
        self.stream = stream

    def next_record(self, start: int) -> int | None:
        """Offset of the first plausible record start at or after `start`, or None."""
        return _find(self.stream, start, _WARC_HEADER)

    def record_end(self, pos: int, content_length: int) -> int | None:
        """Where the record at `pos` ends if its header, `content_length` bytes and the closing
        blank lines are all where they should be; None if its length does not fit (damage)."""
        self.stream.seek(pos)
        head = self.stream.read(_HEAD_BYTES)
        blank = head.find(b"\r\n\r\n")
        if blank < 0:
            return None
        end = pos + blank + 4 + content_length
        self.stream.seek(end)
        return end + 4 if self.stream.read(4) == b"\r\n\r\n" else None

    def size(self) -> int:
        return _length(self.stream)

    def fault(self) -> str | None:
        """Why the stream ended early, for layouts that end reading at damage rather than raise."""
        return None


class PlainLayout(Layout):
    def __init__(self, raw: BinaryIO) -> None:
        super().__init__(raw, raw)


class MemberLayout(Layout):
    """One gzip member per record: FastWARC reads the raw file and reports member offsets."""

    def __init__(self, raw: BinaryIO) -> None:
        super().__init__(raw, raw)

    def next_record(self, start: int) -> int | None:
        return _find(self.raw, start, _GZIP_START, self._holds_record)

    def record_end(self, pos: int, content_length: int) -> int | None:
        member = _inflate_member(self.raw, pos, keep=_HEAD_BYTES + content_length + 4)
        if member is None:
            return None
        out, end = member
        blank = out.find(b"\r\n\r\n")
        at = blank + 4 + content_length
        return end if blank >= 0 and out[at:at + 4] == b"\r\n\r\n" else None

    def _holds_record(self, pos: int) -> bool:
        member = _inflate_member(self.raw, pos, keep=8)
        return member is not None and member[0].startswith(b"WARC/")


class StreamLayout(Layout):
    """One gzip stream for the whole file, read through a decompressor that stops at damage."""

    def __init__(self, raw: BinaryIO) -> None:
        self._gunzip = GunzipReader(raw)
        super().__init__(raw, io.BufferedReader(self._gunzip, buffer_size=_IN_CHUNK))

    def fault(self) -> str | None:
        return self._gunzip.fault


def open_layout(raw: BinaryIO) -> tuple[Layout, bytes]:
    """The layout of `raw` and the first 16 bytes of its (decompressed) content."""
    head = raw.read(2)
    raw.seek(0)
    if head != GZIP_MAGIC[:2]:
        first = raw.read(16)
        raw.seek(0)
        return PlainLayout(raw), first
    multi = _multi_member(raw)
    if multi is None:  # the first member is damaged: one member per record if another one is whole
        multi = MemberLayout(raw).next_record(1) is not None
        raw.seek(0)
    if multi:
        member = _inflate_member(raw, 0, keep=16, whole=False)
        raw.seek(0)
        return MemberLayout(raw), member[0] if member else b""
    layout = StreamLayout(raw)
    first = layout.stream.read(16)
    layout.stream.seek(0)
    return layout, first


class GunzipReader(io.RawIOBase):
    """A gzip file (one or more members) decompressed on the fly. Where the data stops being
    readable (a cut, a corrupt byte, trailing junk) it ends like a file, and `fault` says why:
    the record parser then sees a record cut short and reports it, with the records before it."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._rewind()

    def _rewind(self) -> None:
        self._raw.seek(0)
        self._d = zlib.decompressobj(wbits=31)
        self._in = b""
        self._out = b""
        self._out_at = 0
        self._pos = 0
        self._member_open = False
        self._done = False
        self.fault: str | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        while self._out_at >= len(self._out) and not self._done:
            self._fill(len(b))
        n = min(len(b), len(self._out) - self._out_at)
        b[:n] = memoryview(self._out)[self._out_at:self._out_at + n]
        self._out_at += n
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        skip = memoryview(bytearray(_IN_CHUNK))
        if whence == io.SEEK_CUR:
            offset += self._pos
        elif whence == io.SEEK_END:
            while self.readinto(skip):  # the length is known only once decompressed
                pass
            offset += self._pos
        if offset < self._pos:
            self._rewind()  # deflate cannot run backwards: decompress again from the start
        while self._pos < offset and self.readinto(skip[:min(_IN_CHUNK, offset - self._pos)]):
            pass
        return self._pos

    def _fill(self, want: int) -> None:
        if not self._in:
            self._in = self._raw.read(_IN_CHUNK)
            if not self._in:
                if self._member_open:
                    self.fault = "gzip stream cut off (truncated file)"
                self._done = True
                return
        if self._d.eof:  # the next member of a concatenation, or padding, or junk
            if not self._in.strip(b"\0"):
                self._in = b""
                return
            self._d = zlib.decompressobj(wbits=31)
        before = self._d.copy()
        try:
            self._out = self._d.decompress(self._in, max(want, _IN_CHUNK))
        except zlib.error as e:
            self._out = _inflate_until_error(before, self._in)
            self._out_at = 0
            self.fault = f"gzip stream corrupt: {e}"
            self._done = True
            return
        self._out_at = 0
        self._member_open = not self._d.eof
        self._in = self._d.unused_data if self._d.eof else self._d.unconsumed_tail


def _inflate_until_error(d: zlib._Decompress, data: bytes, step: int = 512) -> bytes:
    """What `data` decompresses to before the byte that breaks it (fed in small steps, since a
    failing call returns none of its output)."""
    out = bytearray()
    try:
        for i in range(0, len(data), step):
            out += d.decompress(data[i:i + step])
    except zlib.error:
        pass
    return bytes(out)


def _length(stream: BinaryIO) -> int:
    at = stream.tell()
    end = stream.seek(0, io.SEEK_END)
    stream.seek(at)
    return end


def _find(f: BinaryIO, start: int, pattern: re.Pattern[bytes],
          accept: Callable[[int], bool] | None = None) -> int | None:
    """First offset >= `start` where `pattern` matches in `f` and `accept(offset)` holds."""
    offset = start
    while True:
        f.seek(offset)
        chunk = f.read(_SCAN_CHUNK)
        last = len(chunk) < _SCAN_CHUNK
        # Matches starting in the overlap are left to the next chunk, which sees them whole.
        limit = len(chunk) if last else len(chunk) - _SCAN_OVERLAP
        for m in pattern.finditer(chunk):
            if m.start() >= limit:
                break
            found = offset + m.start()
            if accept is None or accept(found):
                return found
        if last:
            return None
        offset += limit


def _inflate_member(raw: BinaryIO, pos: int, keep: int, whole: bool = True) -> tuple[bytes, int] | None:
    """Decompress the gzip member at `pos`: (its first `keep` bytes of output, the offset where the
    member ends). None if it is corrupt or cut off. `whole=False` stops once `keep` bytes are out."""
    raw.seek(pos)
    d = zlib.decompressobj(wbits=31)
    out = bytearray()
    fed = 0
    try:
        while not d.eof:
            data = d.unconsumed_tail or raw.read(_IN_CHUNK)
            if not data:
                return None
            if not d.unconsumed_tail:
                fed += len(data)
            out += d.decompress(data, _IN_CHUNK)[:max(keep - len(out), 0)]
            if not whole and len(out) >= keep:
                return bytes(out), -1
    except zlib.error:
        return None
    return bytes(out), pos + fed - len(d.unused_data)


def _multi_member(raw: BinaryIO) -> bool | None:
    """True when the first gzip member ends before the file does (one member per record), None
    when the first member is corrupt."""
    d = zlib.decompressobj(wbits=31)
    read = 0
    try:
        while read < _MEMBER_PROBE_BYTES:
            chunk = raw.read(_IN_CHUNK)
            if not chunk:
                return False
            read += len(chunk)
            d.decompress(chunk, 1 << 16)
            # Drain what the output cap held back, so `eof` reflects the whole chunk.
            while d.unconsumed_tail and not d.eof:
                d.decompress(d.unconsumed_tail, 1 << 16)
            if d.eof:
                return bool(d.unused_data) or bool(raw.read(1))
        return False
    except zlib.error:
        return None
    finally:
        raw.seek(0)
