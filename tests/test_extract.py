"""Extract: decoding, main-text extraction, counted drops, the per-page time limit (enforced on C
code by killing the extraction process), and the score of both extractors on the trafilatura
evaluation set (../shared/data/extraction/evaldata.json)."""

from __future__ import annotations

import json
import logging
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from curation.document import Document
from curation.extract import Extract, ExtractorUnavailable, _resiliparse_text, decode_html
from curation.read import WarcReader

ARTICLE = (
    "<html><head><title>News</title></head><body>"
    "<nav><a href='/'>Home</a> <a href='/about'>About us</a> <a href='/impressum'>Impressum</a></nav>"
    "<article><h1>The river rose overnight</h1>"
    "<p>Residents of the old town woke to water in their cellars after two days of heavy rain.</p>"
    "<p>The fire brigade pumped out more than forty houses and reopened the bridge by noon.</p>"
    "</article><footer>Copyright 2024 Example Media. All rights reserved.</footer></body></html>"
)


def _doc(raw: bytes | None, charset: str | None = None, text: str = "") -> Document:
    return Document(id="d1", text=text, source="test", raw=raw, charset=charset, metadata={"url": "http://x/"})


def test_html_becomes_main_text_and_raw_is_cleared() -> None:
    step = Extract()
    (doc,) = step([_doc(ARTICLE.encode(), "utf-8")])
    assert "heavy rain" in doc.text and "forty houses" in doc.text
    assert "Impressum" not in doc.text and "All rights reserved" not in doc.text
    assert doc.raw is None and doc.charset is None
    assert (step.stats.docs_in, step.stats.docs_out) == (1, 1)


def test_wet_text_passes_through_untouched() -> None:
    wet = _doc(None, text="Already extracted.\nSecond line.")
    wet.metadata["cc_lang"] = "eng"
    step = Extract()
    (out,) = step([wet])
    assert out is wet and out.text == "Already extracted.\nSecond line." and out.metadata["cc_lang"] == "eng"
    assert not step.stats.dropped


CYRILLIC = "Привет, мир! Это длинный абзац текста о погоде в Москве и Санкт-Петербурге."


def test_declared_charset_decodes_the_page() -> None:
    raw = f"<html><body><p>{CYRILLIC}</p></body></html>".encode("cp1251")
    assert CYRILLIC in decode_html(raw, "cp1251")


def test_meta_charset_is_used_when_the_header_is_silent() -> None:
    raw = f'<html><head><meta charset="windows-1251"></head><body><p>{CYRILLIC}</p></body></html>'.encode("cp1251")
    assert CYRILLIC in decode_html(raw, None)


def test_wrong_declared_charset_falls_back_to_the_page_declaration() -> None:
    text = "Grüße aus Köln, schöne Straße"
    raw = f'<html><head><meta charset="windows-1252"></head><body><p>{text}</p></body></html>'.encode("cp1252")
    assert text in decode_html(raw, "utf-8")  # cp1252 umlauts are invalid UTF-8


def test_declared_latin1_decodes_as_windows_1252_like_browsers() -> None:
    # WHATWG maps the iso-8859-1 / us-ascii labels to windows-1252: 0x93 / 0x94 are curly quotes,
    # not C1 control characters.
    raw = b"<html><body><p>He said \x93caf\xe9\x94 \x96 twice.</p></body></html>"
    for label in ("ISO-8859-1", "latin1", "iso8859-1"):
        assert "He said \u201ccaf\u00e9\u201d \u2013 twice." in decode_html(raw, label)


def test_byte_order_mark_beats_every_declaration() -> None:
    raw = "\ufeff<html><head><meta charset='iso-8859-1'></head><body>Grüße</body></html>".encode("utf-8")
    assert decode_html(raw, "iso-8859-1").startswith("<html>") and "Grüße" in decode_html(raw, "iso-8859-1")


def test_drops_are_counted_by_reason() -> None:
    step = Extract(max_html_bytes=len(ARTICLE) + 10, min_chars=20)
    docs = [
        _doc(ARTICLE.encode() + b" " * 100),  # too large
        _doc(b"<html><body><script>var x = 1;</script></body></html>"),  # no text at all
        _doc(b"<html><body><p>Too short.</p></body></html>"),  # under min_chars
        _doc(None),  # neither HTML nor text
        _doc(ARTICLE.encode()),
    ]
    out = list(step(docs))
    assert len(out) == 1
    assert dict(step.stats.dropped) == {"extract.too_large": 1, "extract.empty": 3}


def _explode_on_broken(html: str) -> str:
    """An extractor that raises on one page (module level: it travels to the extraction process)."""
    if "BROKEN" in html:
        raise RuntimeError("parser exploded")
    return _resiliparse_text(html)


def _die_on_crash(html: str) -> str:
    """An extractor whose process dies on one page, as a segfault in C code would."""
    if "CRASH" in html:
        import os

        os._exit(139)
    return _resiliparse_text(html)


def test_extractor_failure_is_counted_and_the_run_goes_on() -> None:
    step = Extract()
    step._extract = _explode_on_broken
    out = list(step([_doc(b"<p>BROKEN</p>"), _doc(ARTICLE.encode())]))
    assert len(out) == 1 and step.stats.dropped["extract.error"] == 1
    assert "RuntimeError: parser exploded" in step.stats.samples[0]["message"]


def test_a_dying_extraction_process_costs_only_its_page() -> None:
    step = Extract()
    step._extract = _die_on_crash
    out = list(step([_doc(ARTICLE.encode()), _doc(b"<p>CRASH</p>"), _doc(ARTICLE.encode())]))
    assert len(out) == 2 and step.stats.dropped == {"extract.error": 1}
    assert "the extraction process died (exit code 139)" in step.stats.samples[0]["message"]


def test_an_extractor_that_cannot_reach_the_process_fails_the_step_at_once() -> None:
    step = Extract()
    step._extract = lambda html: html  # a lambda cannot be pickled to the extraction process
    with pytest.raises(ExtractorUnavailable, match="cannot be sent"):
        list(step([_doc(ARTICLE.encode())]))


def _nested_divs(depth: int) -> bytes:
    """resiliparse's time grows steeply with nesting: 20,000 divs take ~20 s, 100,000 ~500 s."""
    return (b"<html><body><p>Before the divs.</p>" + b"<div>" * depth + b"deep" + b"</div>" * depth
            + b"</body></html>")


def _run_with_slow_page(timeout_s: float = 0.5) -> Extract:
    step = Extract(timeout_s=timeout_s)
    t0 = time.monotonic()
    out = list(step([_doc(_nested_divs(20_000)), _doc(ARTICLE.encode())]))
    assert time.monotonic() - t0 < 10
    assert len(out) == 1 and "heavy rain" in out[0].text
    return step


def test_slow_page_times_out_in_the_main_thread_and_the_next_page_is_extracted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert threading.current_thread() is threading.main_thread()
    with caplog.at_level(logging.WARNING, logger="curation.extract"):
        step = _run_with_slow_page()
    assert step.stats.dropped["extract.timeout"] == 1 and step.stats.errors["extract.timeout"] == 1
    assert [r.getMessage() for r in caplog.records if "extract.timeout" in r.getMessage()], caplog.text


def test_slow_page_times_out_in_a_worker_thread_too() -> None:
    result: dict[str, object] = {}

    def work() -> None:
        try:
            result["step"] = _run_with_slow_page()
        except BaseException as e:  # noqa: BLE001 - surface the failure in the main thread
            result["error"] = e

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert "error" not in result, result.get("error")
    assert result["step"].stats.dropped["extract.timeout"] == 1  # type: ignore[attr-defined]


def test_time_limit_leaves_the_callers_alarm_alone() -> None:
    calls: list[int] = []

    def outer(signum: int, frame: object) -> None:
        calls.append(signum)

    previous = signal.signal(signal.SIGALRM, outer)
    signal.setitimer(signal.ITIMER_REAL, 60)
    try:
        _run_with_slow_page(timeout_s=0.2)
        assert signal.getsignal(signal.SIGALRM) is outer and calls == []
        assert 0 < signal.getitimer(signal.ITIMER_REAL)[0] <= 60
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.integration
def test_page_that_would_take_minutes_in_c_code_is_stopped_near_its_limit_and_the_shard_finishes(
    shared_data: Path,
) -> None:
    # 1.2 MB of 100,000 nested divs: resiliparse's C code ran 494 s on it, deaf to the old
    # signal-based limit. Now its process is killed at the limit and replaced for the next page.
    pages = list(WarcReader().read(str(shared_data / "warc" / "pages" / "web_pages-00000.warc.gz")))
    baseline = Extract()
    expected = [d.text for d in baseline(_copies(pages))]
    nasty = _doc(_nested_divs(100_000))
    assert 1_100_000 < len(nasty.raw or b"") < 1_300_000
    docs = _copies(pages)
    docs.insert(len(docs) // 2, nasty)
    spent: dict[str, float] = {}

    def timed() -> Iterator[Document]:
        for d in docs:
            if "nasty" in spent and "next" not in spent:
                spent["next"] = time.monotonic()  # the step asks for the next page: done with it
            if d is nasty:
                spent["nasty"] = time.monotonic()
            yield d

    step = Extract(timeout_s=2)
    t0 = time.monotonic()
    out = [d.text for d in step(timed())]
    total = time.monotonic() - t0
    print(f"\nnested-div page: {spent['next'] - spent['nasty']:.2f} s (limit 2 s); shard of {len(docs)} pages: {total:.2f} s")
    assert spent["next"] - spent["nasty"] < 4
    assert total < 20  # ~3 s on a quiet machine: the limit, one restart, 261 ordinary pages
    assert step.stats.dropped == baseline.stats.dropped + Counter({"extract.timeout": 1})
    assert out == expected


def _copies(docs: list[Document]) -> list[Document]:
    return [Document(id=d.id, text="", source=d.source, metadata=dict(d.metadata), raw=d.raw, charset=d.charset)
            for d in docs]


def test_control_characters_are_stripped_from_extracted_text_and_counted() -> None:
    step = Extract()
    (doc,) = step([_doc(b"<html><body><p>bell\x07 escape\x1b[0m group\x1dsep</p></body></html>")])
    assert doc.text == "bell escape[0m groupsep"
    assert step.stats.counters["control_chars_removed"] == 3


def test_unknown_extractor_is_rejected_at_construction() -> None:
    with pytest.raises(ValueError, match="unknown extractor"):
        Extract(extractor="boilerpipe")


# -- evaluation on real pages -------------------------------------------------------------------

_WS = re.compile(r"\s+")


def _norm(s: str) -> str:
    return _WS.sub(" ", s).strip()


def _page_url(key: str) -> list[str]:
    """evaldata keys are URLs with stray spaces, an 'x' typo, or bare names the WARC prefixed."""
    key = key.strip()
    if key.startswith("xhttp"):
        key = key[1:]
    return [key] if "://" in key else [key, "https://" + key]


@pytest.fixture(scope="module")
def eval_pages(shared_data: Path) -> tuple[list[tuple[str, dict]], dict[str, Document]]:  # type: ignore[type-arg]
    pages: dict[str, Document] = {}
    reader = WarcReader()
    for path in sorted((shared_data / "warc" / "pages").glob("*.warc.gz")):
        for doc in reader.read(str(path)):
            pages.setdefault(doc.metadata["url"], doc)  # 11 URLs were fetched twice: keep the first
    evaldata = json.loads((shared_data / "extraction" / "evaldata.json").read_text())
    entries = []
    for key, entry in evaldata.items():
        url = next(u for u in _page_url(key) if u in pages)
        entries.append((url, entry))
    return entries, pages


def _score(extractor: str, entries: list[tuple[str, dict]], pages: dict[str, Document]) -> tuple[float, float, float]:  # type: ignore[type-arg]
    urls = sorted({u for u, _ in entries})
    docs = [Document(id=pages[u].id, text="", source="t", metadata=dict(pages[u].metadata),
                     raw=pages[u].raw, charset=pages[u].charset) for u in urls]
    step = Extract(extractor=extractor)
    t0 = time.perf_counter()
    texts = {d.metadata["url"]: _norm(d.text) for d in step(docs)}
    pages_per_s = len(docs) / (time.perf_counter() - t0)
    found = total_with = avoided = total_without = 0
    for url, entry in entries:
        text = texts.get(url, "")  # a dropped page finds nothing and avoids everything
        total_with += len(entry["with"])
        found += sum(_norm(s) in text for s in entry["with"])
        total_without += len(entry["without"])
        avoided += sum(_norm(s) not in text for s in entry["without"])
    return found / total_with, avoided / total_without, pages_per_s


@pytest.mark.integration
def test_every_evaldata_entry_maps_to_a_page_in_the_warc_shards(eval_pages) -> None:  # type: ignore[no-untyped-def]
    entries, pages = eval_pages
    assert len(entries) == 990 and len(pages) == 1033


@pytest.mark.integration
def test_resiliparse_finds_must_have_snippets_and_avoids_boilerplate(eval_pages) -> None:  # type: ignore[no-untyped-def]
    entries, pages = eval_pages
    found, avoided, pps = _score("resiliparse", entries, pages)
    print(f"\nresiliparse on all {len(entries)} evaldata entries ({len({u for u, _ in entries})} pages): "
          f"must-have found {found:.1%}, "
          f"must-not avoided {avoided:.1%}, {pps:.0f} pages/s")
    # Measured 95.3% / 74.3% (2026-11-28); floors a little under.
    assert found >= 0.94
    assert avoided >= 0.72


@pytest.mark.integration
def test_trafilatura_finds_must_have_snippets_and_avoids_boilerplate(eval_pages) -> None:  # type: ignore[no-untyped-def]
    entries, pages = eval_pages
    sample = entries[::8]  # trafilatura runs ~14 pages/s here: every 8th entry keeps this test short
    found, avoided, pps = _score("trafilatura", sample, pages)
    print(f"\ntrafilatura on {len(sample)} of {len(entries)} evaldata entries: must-have found {found:.1%}, "
          f"must-not avoided {avoided:.1%}, {pps:.1f} pages/s")
    # Full set measured 92.3% / 90.1%; this sample: see the printed figures. Floors a little under.
    assert found >= 0.88
    assert avoided >= 0.86


@pytest.mark.parametrize("extractor", ["resiliparse", "trafilatura"])
def test_step_survives_pickling_for_ray_workers(extractor: str) -> None:
    import pickle

    step = pickle.loads(pickle.dumps(Extract(extractor=extractor)))
    (doc,) = step([_doc(ARTICLE.encode(), "utf-8")])
    assert "forty houses" in doc.text
