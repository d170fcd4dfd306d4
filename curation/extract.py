"""Step 2 of curation: HTML bytes to main text (resiliparse by default, trafilatura as an option).

Decoding follows the WHATWG order browsers use: a byte-order mark, then the charset the HTTP
header declared (if the bytes decode with it), then the page's `<meta charset>`, then detection
(uchardet, via resiliparse). Each page is extracted under a size limit and a time limit; a page
that breaks either is dropped with a counted reason (`extract.too_large`, `extract.timeout`),
never failing the job. Documents that arrive with text and no HTML (WET records) pass through.
"""

from __future__ import annotations

import codecs
import ctypes
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar, TypeVar

from curation.document import Document
from curation.step import Step

T = TypeVar("T")

EXTRACTORS = ("resiliparse", "trafilatura")

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
    """Raised inside an extraction that ran past its time limit."""


class Extract(Step):
    """Decodes `doc.raw`, extracts the main text into `doc.text`, clears `raw` and `charset`.

    Drops, counted in `stats.dropped`: `extract.too_large` (HTML over `max_html_bytes`),
    `extract.timeout` (over `timeout_s`), `extract.empty` (fewer than `min_chars` characters of
    text), `extract.error` (the extractor raised). Timeouts and errors are also counted in
    `stats.errors`, whose samples name the page (id, url, message) for the report.
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
        self._extract: Callable[[str], str] = _resiliparse_text if extractor == "resiliparse" else _Trafilatura()

    def run(self, docs: Iterable[Document]) -> Iterator[Document]:
        dropped = self.stats.dropped
        for doc in docs:
            if doc.raw is None:
                if doc.text:
                    yield doc  # already text (WET): nothing to extract
                else:
                    dropped["extract.empty"] += 1
                continue
            if len(doc.raw) > self.max_html_bytes:
                dropped["extract.too_large"] += 1
                continue
            try:
                html = decode_html(doc.raw, doc.charset)
                text = run_with_timeout(self._extract, html, self.timeout_s)
            except ExtractTimeout:
                dropped["extract.timeout"] += 1
                self.stats.error("extract.timeout", id=doc.id, url=doc.metadata.get("url"))
                continue
            except Exception as e:  # noqa: BLE001 - one broken page must not end the job
                dropped["extract.error"] += 1
                self.stats.error("extract.error", id=doc.id, url=doc.metadata.get("url"),
                                 message=f"{type(e).__name__}: {e}")
                continue
            text = text.strip()
            if len(text) < self.min_chars:
                dropped["extract.empty"] += 1
                continue
            doc.text = text
            doc.raw = None
            doc.charset = None
            yield doc


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


# -- time limit ---------------------------------------------------------------------------------


def run_with_timeout(fn: Callable[[Any], T], arg: Any, timeout_s: float) -> T:
    """`fn(arg)`, raising ExtractTimeout once `timeout_s` has passed.

    In the main thread (the in-process executor, and Ray tasks, which run on their worker's main
    thread) a SIGALRM interval timer interrupts the call. Elsewhere (threaded actors, thread
    pools) a timer thread raises the exception asynchronously in the calling thread. Both act
    between Python bytecodes: a long stretch inside C code (lxml, lexbor) is interrupted as soon
    as it returns, so a slow page is still dropped and counted, just a little late.
    """
    if timeout_s is None or timeout_s <= 0:
        return fn(arg)
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
        return _with_alarm(fn, arg, timeout_s)
    return _with_async_exc(fn, arg, timeout_s)


def _with_alarm(fn: Callable[[Any], T], arg: Any, timeout_s: float) -> T:
    armed = [True]

    def on_alarm(signum: int, frame: Any) -> None:
        if armed[0]:
            armed[0] = False  # one-shot: a late signal can never raise twice
            raise ExtractTimeout(f"extraction took longer than {timeout_s} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    started = time.monotonic()
    prev_delay, prev_interval = signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        try:
            return fn(arg)
        finally:
            armed[0] = False
            signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        signal.signal(signal.SIGALRM, previous)
        if prev_delay > 0:
            # Someone else's alarm (pytest-timeout, an outer limit) keeps its remaining time.
            left = prev_delay - (time.monotonic() - started)
            signal.setitimer(signal.ITIMER_REAL, max(left, 1e-3), prev_interval)


def _with_async_exc(fn: Callable[[Any], T], arg: Any, timeout_s: float) -> T:
    tid = ctypes.c_ulong(threading.get_ident())
    lock = threading.Lock()
    state = {"armed": True, "fired": False}

    def fire() -> None:
        with lock:
            if state["armed"]:
                state["fired"] = True
                ctypes.pythonapi.PyThreadState_SetAsyncExc(tid, ctypes.py_object(ExtractTimeout))

    timer = threading.Timer(timeout_s, fire)
    timer.daemon = True
    timer.start()
    try:
        try:
            return fn(arg)
        finally:
            with lock:
                state["armed"] = False
            timer.cancel()
            if state["fired"]:
                # Fired but maybe not yet delivered: clear it so it cannot hit later code.
                ctypes.pythonapi.PyThreadState_SetAsyncExc(tid, None)
    except ExtractTimeout:
        raise ExtractTimeout(f"extraction took longer than {timeout_s} s") from None
