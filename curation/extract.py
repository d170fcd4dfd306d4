"""Step 2 of curation: HTML bytes to main text (resiliparse by default; trafilatura, or hybrid:
resiliparse plus a line classifier, curation/extract_hybrid.py, as options).

Decoding follows the WHATWG order browsers use: a byte-order mark, then the charset the HTTP
header declared (if the bytes decode with it), then the page's `<meta charset>`, then detection
(uchardet, via resiliparse). Each page is extracted under a size limit and a time limit; a page
that breaks either is dropped with a counted reason (`extract.too_large`, `extract.timeout`),
never failing the job. Documents that arrive with text and no HTML (WET records) pass through.

The time limit has to stop C code (resiliparse spent 494 s on 100,000 nested `<div>`s; a signal
or an exception raised in the thread waits until the C call returns), so decoding and extraction
run in a child process that lives as long as the step: pages go to it through a pipe, and one
that overruns its limit gets the child killed and replaced. A child that dies (a crash in C code)
costs only its page, counted as `extract.error`.
"""

from __future__ import annotations

import codecs
import logging
import os
import pickle
import select
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any, ClassVar

from curation.document import Document
from curation.read.control_chars import strip_control_chars
from curation.step import Step

log = logging.getLogger(__name__)

EXTRACTORS = ("resiliparse", "trafilatura", "hybrid")

# resiliparse options, chosen on ../shared/data/extraction/evaldata.json (tests/test_extract.py;
# must-have snippets found / must-not snippets avoided): this set 95.3% / 74.3%. Alt texts on:
# 95.6% / 72.0%; links: 93.7% / 75.0%; comments: 95.5% / 70.7%; noscript, form fields, hidden
# elements and skip selectors for dates, share buttons, headers or teasers moved both shares by
# under 1.5 points in opposite directions. List bullets do not change the score and are kept:
# the Gopher bullet-line rule downstream needs them.
RESILIPARSE_OPTIONS: dict[str, Any] = {
    "preserve_formatting": True,
    "main_content": True,
    "list_bullets": True,
    "alt_texts": False,
    "links": False,
    "form_fields": False,
    "noscript": False,
    "comments": False,
}

_BOMS = (
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)

_WHATWG_LABELS = {"iso8859-1": "cp1252", "ascii": "cp1252"}


class ExtractTimeout(Exception):
    """An extraction that ran past its time limit (its process was killed)."""


class ExtractorFailed(Exception):
    """The extractor raised, or its process died; the message says which and why."""


class ExtractorUnavailable(RuntimeError):
    """The extraction process could not be started: a setup problem, not a page's fault."""


class Extract(Step):
    """Decodes `doc.raw`, extracts the main text into `doc.text`, clears `raw` and `charset`.

    Drops, counted in `stats.dropped`: `extract.too_large` (HTML over `max_html_bytes`),
    `extract.timeout` (over `timeout_s`), `extract.empty` (fewer than `min_chars` characters of
    text), `extract.error` (the extractor raised, or its process died). Timeouts and errors are
    also counted in `stats.errors`, whose samples name the page (id, url, message) for the report.
    Control characters removed from extracted text are counted in `counters`.
    """

    name: ClassVar[str] = "extract"

    def __init__(
        self,
        extractor: str = "resiliparse",
        timeout_s: float = 5.0,
        max_html_bytes: int = 5_000_000,
        min_chars: int = 1,
    ) -> None:
        super().__init__()
        if extractor not in EXTRACTORS:
            raise ValueError(f"unknown extractor {extractor!r}; choose one of {EXTRACTORS}")
        self.extractor = extractor
        # 5 s per page: resiliparse needs ~5 ms for a typical page and trafilatura ~70 ms
        # (measured on the pages shards), so only pathological documents reach it.
        self.timeout_s = timeout_s
        # 5 MB of HTML: Common Crawl cuts payloads at a few MiB itself, so this mostly drops
        # what other crawlers stored in full; parse time grows with size.
        self.max_html_bytes = max_html_bytes
        self.min_chars = min_chars
        # Fail at construction, not deep inside a run, when the chosen backend is missing.
        self._extract: Callable[[str], str] = _extractor(extractor)
        self._process: ExtractorProcess | None = None

    def __getstate__(self) -> dict[str, Any]:
        # The child process stays behind: a copy (a Ray worker) starts its own on first use.
        return {**self.__dict__, "_process": None}

    def run(self, docs: Iterable[Document]) -> Iterator[Document]:
        for doc in docs:
            if doc.raw is None:
                if doc.text:
                    yield doc  # already text (WET): nothing to extract
                else:
                    self.drop(doc, "extract.empty")
                continue
            if len(doc.raw) > self.max_html_bytes:
                self.drop(doc, "extract.too_large")
                continue
            try:
                text = self._text(doc.raw, doc.charset)
            except ExtractorUnavailable:
                raise  # every page would fail the same way
            except ExtractTimeout:
                self.drop(doc, "extract.timeout")
                self.stats.error("extract.timeout", id=doc.id, url=doc.metadata.get("url"))
                log.warning("extract: page %s (%s) took over %s s; dropped as extract.timeout", doc.id,
                            doc.metadata.get("url"), self.timeout_s)
                continue
            except Exception as e:  # noqa: BLE001 - one broken page must not end the job
                self.drop(doc, "extract.error")
                self.stats.error("extract.error", id=doc.id, url=doc.metadata.get("url"),
                                 message=f"{type(e).__name__}: {e}")
                log.warning("extract: page %s (%s) failed (%s: %s); dropped as extract.error", doc.id,
                            doc.metadata.get("url"), type(e).__name__, e)
                continue
            text, removed = strip_control_chars(text.strip())
            if removed:
                self.stats.counters["control_chars_removed"] += removed
            if len(text) < self.min_chars:
                self.drop(doc, "extract.empty")
                continue
            doc.text = text
            doc.raw = None
            doc.charset = None
            yield doc

    def _text(self, raw: bytes, charset: str | None) -> str:
        if not self.timeout_s or self.timeout_s <= 0:  # no limit: no process either
            return self._extract(decode_html(raw, charset))
        if self._process is None:
            self._process = ExtractorProcess(self._extract)
        return self._process.extract(raw, charset, self.timeout_s)

    def close(self) -> None:
        """Stop the extraction process now (it also stops when the step is garbage collected)."""
        if self._process is not None:
            self._process.close()
            self._process = None


# -- decoding -----------------------------------------------------------------------------------


def decode_html(raw: bytes, declared: str | None = None) -> str:
    """Bytes to str: BOM, then the declared (HTTP) charset, then `<meta charset>` / detection."""
    from resiliparse.parse.encoding import bytes_to_str, detect_encoding

    for bom, enc in _BOMS:
        if raw.startswith(bom):
            return raw[len(bom):].decode(enc, errors="replace")
    if declared:
        try:
            # WHATWG decodes the iso-8859-1 and us-ascii labels as windows-1252 (0x93 is a curly
            # quote, not a C1 control); undefined cp1252 bytes fall through to detection.
            return raw.decode(_WHATWG_LABELS.get(codecs.lookup(declared).name, declared))
        except (UnicodeDecodeError, LookupError):
            pass  # the header lied (common): fall through to the page's own declaration
    encoding = detect_encoding(raw, from_html_meta=True)
    # bytes_to_str falls back to UTF-8 and cp1252 before decoding with replacement characters.
    return bytes_to_str(raw, encoding, errors="replace")


# -- extractors ---------------------------------------------------------------------------------


def _extractor(name: str) -> Callable[[str], str]:
    if name == "trafilatura":
        return _Trafilatura()
    if name == "hybrid":
        from curation.extract_hybrid import hybrid_text

        return hybrid_text
    return _resiliparse_text


def _resiliparse_text(html: str) -> str:
    from resiliparse.extract.html2text import extract_plain_text

    return extract_plain_text(html, **RESILIPARSE_OPTIONS)


class _Trafilatura:
    """trafilatura as a picklable callable (steps travel to Ray workers); config built lazily."""

    def __init__(self) -> None:
        import trafilatura  # noqa: F401 - fail at construction when the option is not installed

        self._config: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"_config": None}

    def __call__(self, html: str) -> str:
        import trafilatura

        if self._config is None:
            from trafilatura.settings import use_config

            config = use_config()
            # trafilatura's own minimum sizes would silently return nothing for short pages;
            # min_chars and the quality filters downstream decide on length instead.
            config.set("DEFAULT", "MIN_EXTRACTED_SIZE", "0")
            config.set("DEFAULT", "MIN_OUTPUT_SIZE", "0")
            config.set("DEFAULT", "EXTRACTION_TIMEOUT", "0")
            self._config = config
        return trafilatura.extract(html, config=self._config, include_comments=False, include_tables=True) or ""


# -- the extraction process --------------------------------------------------------------------

# A tiny page the child extracts before it reports ready, so lazy imports and config building do
# not count against the first real page's limit.
_WARMUP = "<html><body><p>warm up</p></body></html>"
_READY_TIMEOUT_S = 120.0
_FRAME = struct.Struct("<Q")
_PAGE = struct.Struct("<QH")  # HTML bytes, charset label bytes
_PIPE_BYTES = 1 << 20  # fewer context switches per page than the 64 KiB default
_F_SETPIPE_SZ = 1031  # Linux fcntl


class ExtractorProcess:
    """A child process running one extractor on the pages sent to it, one at a time.

    `extract(raw, charset, timeout_s)` returns the page's text, raises ExtractTimeout after
    killing a child that overran (the next page starts a fresh one), or ExtractorFailed when the
    extractor raised or the child died. The extractor travels to the child pickled, so it must be
    a module-level function or a picklable object.
    """

    def __init__(self, extractor: Callable[[str], str]) -> None:
        # Pickled now, so an extractor that cannot travel fails here, not in the child.
        try:
            self._extractor = pickle.dumps(extractor, protocol=pickle.HIGHEST_PROTOCOL)
        except (pickle.PicklingError, TypeError, AttributeError) as e:
            raise ExtractorUnavailable(f"the extractor cannot be sent to the extraction process: {e}") from None
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._finalizer: weakref.finalize | None = None

    def extract(self, raw: bytes, charset: str | None, timeout_s: float) -> str:
        with self._lock:
            proc = self._proc or self._start()
            assert proc.stdin is not None and proc.stdout is not None
            deadline = time.monotonic() + timeout_s
            try:
                _send_page(proc.stdin, raw, charset)
                status, value = _receive(proc.stdout, deadline)
            except TimeoutError:
                self._stop()
                raise ExtractTimeout(f"extraction took longer than {timeout_s} s") from None
            except (OSError, EOFError, pickle.UnpicklingError):
                code = self._stop()
                raise ExtractorFailed(f"the extraction process died ({_exit_reason(code)})") from None
        if status != "ok":
            raise ExtractorFailed(value)
        return value

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _start(self) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        # The child imports what the parent can (the project, a test module's extractor).
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        proc = subprocess.Popen(
            [sys.executable, "-c", "from curation.extract import serve_extractor; serve_extractor()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True,
        )
        assert proc.stdin is not None and proc.stdout is not None
        for pipe in (proc.stdin, proc.stdout):
            _widen(pipe)
        self._proc = proc
        self._finalizer = weakref.finalize(self, _kill, proc)
        try:
            _send_bytes(proc.stdin, self._extractor)
            status, value = _receive(proc.stdout, time.monotonic() + _READY_TIMEOUT_S)
        except (OSError, EOFError, TimeoutError, pickle.UnpicklingError) as e:
            code = self._stop()
            raise ExtractorUnavailable(f"the extraction process did not start ({_exit_reason(code)}, "
                                       f"{type(e).__name__})") from None
        if status != "ready":
            self._stop()
            raise ExtractorUnavailable(f"the extraction process did not start: {value}")
        return proc

    def _stop(self) -> int | None:
        proc, self._proc = self._proc, None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        return _kill(proc) if proc is not None else None


def serve_extractor() -> None:
    """The child's loop: the extractor arrives first, then `(raw, charset)` pages; each gets
    `("ok", text)` or `("error", message)` back. Ends when the parent closes the pipe."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a stray print in an extractor must not corrupt the replies
    src = sys.stdin.buffer
    try:
        extractor = _receive(src, None)
        extractor(_WARMUP)
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
        _send(out, ("error", f"{type(e).__name__}: {e}"))
        return
    _send(out, ("ready", None))
    while True:
        try:
            raw, charset = _receive_page(src)
        except EOFError:
            return
        try:
            reply = ("ok", extractor(decode_html(raw, charset)))
        except Exception as e:  # noqa: BLE001 - the page is dropped and counted by the parent
            reply = ("error", f"{type(e).__name__}: {e}")
        _send(out, reply)


def _send(pipe: IO[bytes], obj: Any) -> None:
    _send_bytes(pipe, pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def _send_bytes(pipe: IO[bytes], data: bytes) -> None:
    _write_all(pipe.fileno(), [_FRAME.pack(len(data)), data])


def _send_page(pipe: IO[bytes], raw: bytes, charset: str | None) -> None:
    """A page as a header and its bytes as they are: no pickling copy of up to 5 MB of HTML."""
    label = (charset or "").encode("ascii", "replace")
    _write_all(pipe.fileno(), [_PAGE.pack(len(raw), len(label)), label, raw])


def _receive_page(pipe: IO[bytes]) -> tuple[bytes, str | None]:
    size, label_size = _PAGE.unpack(_read_exactly(pipe, _PAGE.size, None))
    label = _read_exactly(pipe, label_size, None).decode("ascii") if label_size else None
    return _read_exactly(pipe, size, None), label


def _write_all(fd: int, parts: list[bytes]) -> None:
    """Write `parts` to `fd` unbuffered (reads and writes on these pipes all go through the fd)."""
    views = [memoryview(p) for p in parts if p]
    while views:
        n = os.writev(fd, views)
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


def _receive(pipe: IO[bytes], deadline: float | None) -> Any:
    """One framed object from `pipe`; TimeoutError once `deadline` (monotonic) has passed."""
    size = _FRAME.unpack(_read_exactly(pipe, _FRAME.size, deadline))[0]
    return pickle.loads(_read_exactly(pipe, size, deadline))


def _read_exactly(pipe: IO[bytes], n: int, deadline: float | None) -> bytes:
    fd = pipe.fileno()
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
        read = os.readv(fd, [view[got:]])
        if not read:
            raise EOFError("pipe closed")
        got += read
    return bytes(buf)


def _widen(pipe: IO[bytes]) -> None:
    try:
        import fcntl

        fcntl.fcntl(pipe.fileno(), _F_SETPIPE_SZ, _PIPE_BYTES)
    except (ImportError, OSError):
        pass  # not Linux, or over /proc/sys/fs/pipe-max-size: the default works, a little slower


def _kill(proc: subprocess.Popen[bytes]) -> int | None:
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            try:
                pipe.close()
            except OSError:
                pass
    if proc.poll() is None:
        proc.kill()
    return proc.wait()


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "not started"
    return f"killed by signal {-code}" if code < 0 else f"exit code {code}"
