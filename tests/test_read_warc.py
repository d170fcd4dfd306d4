"""WarcReader: record selection, fields, gzip layouts, ARC, WET, and damaged files.

Hand-written archives (built with warcio's writer) prove each rule; the real archives under
../shared/data prove the counts, checked against an independent warcio pass over the same bytes.
"""

from __future__ import annotations

import gzip
import io
import re
import sys
import zlib
from collections import Counter
from pathlib import Path

import pytest
from warcio.archiveiterator import ArchiveIterator
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from curation.read import WarcReader

HTML = "<html><head><title>t</title></head><body><p>Grüße aus Köln</p></body></html>".encode()
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
ISO_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


def _response(writer: WARCWriter, url: str, body: bytes, status: str = "200 OK",
              headers: list[tuple[str, str]] | None = None):  # type: ignore[no-untyped-def]
    if headers is None:
        headers = [("Content-Type", "text/html; charset=utf-8")]
    http = StatusAndHeaders(status, headers, protocol="HTTP/1.1")
    return writer.create_warc_record(url, "response", payload=io.BytesIO(body), http_headers=http,
                                     warc_headers_dict={"WARC-Date": "2024-05-17T23:31:22Z"})


def _build(records: list[tuple], per_record_gzip: bool) -> bytes:  # type: ignore[type-arg]
    buf = io.BytesIO()
    writer = WARCWriter(buf, gzip=per_record_gzip)
    writer.write_record(writer.create_warcinfo_record("t.warc", {"software": "test"}))
    for kind, *args in records:
        if kind == "response":
            writer.write_record(_response(writer, *args))
        else:
            url, body = args
            writer.write_record(writer.create_warc_record(url, kind, payload=io.BytesIO(body)))
    return buf.getvalue()


def _chunked(data: bytes, size: int = 7) -> bytes:
    parts = [b"%x\r\n%s\r\n" % (len(data[i:i + size]), data[i:i + size]) for i in range(0, len(data), size)]
    return b"".join(parts) + b"0\r\n\r\n"


MIXED = [
    ("response", "http://a.example/", HTML),
    ("request", "http://a.example/", b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n"),
    ("response", "http://a.example/missing", b"<html>gone</html>", "404 Not Found"),
    ("response", "http://a.example/moved", b"", "301 Moved Permanently", [("Location", "http://b.example/")]),
    ("response", "http://a.example/doc.pdf", b"%PDF-1.4 ...", "200 OK", [("Content-Type", "application/pdf")]),
    ("response", "http://a.example/enc", _chunked(gzip.compress(HTML)), "200 OK",
     [("Content-Type", "application/xhtml+xml"), ("Transfer-Encoding", "chunked"), ("Content-Encoding", "gzip")]),
    ("response", "http://a.example/untyped", b"  <!DOCTYPE html><html><body>x</body></html>", "200 OK", []),
    ("metadata", "http://a.example/", b"fetchTimeMs: 12\r\n"),
]


@pytest.fixture(params=["plain", "per_record_gzip", "whole_file_gzip"])
def mixed_warc(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    layout = request.param
    data = _build(MIXED, per_record_gzip=layout == "per_record_gzip")
    if layout == "whole_file_gzip":
        data = gzip.compress(data)
    path = tmp_path / ("mixed.warc" + ("" if layout == "plain" else ".gz"))
    path.write_bytes(data)
    return path


def test_keeps_html_200_responses_and_counts_every_skip(mixed_warc: Path) -> None:
    reader = WarcReader(source="cc", added="2026-11-28T00:00:00Z")
    docs = list(reader.read(str(mixed_warc)))
    assert [d.metadata["url"] for d in docs] == ["http://a.example/", "http://a.example/enc", "http://a.example/untyped"]
    c = reader.stats.counters
    assert (c["records"], c["skipped.warcinfo"], c["skipped.request"], c["skipped.metadata"]) == (9, 1, 1, 1)
    assert (c["skipped.status_404"], c["skipped.status_301"], c["skipped.non_html"]) == (1, 1, 1)
    assert reader.stats.docs_out == 3 and not reader.stats.errors


def test_same_documents_from_every_gzip_layout(tmp_path: Path) -> None:
    plain = _build(MIXED, per_record_gzip=False)
    variants = {"a.warc": plain, "b.warc.gz": _build(MIXED, per_record_gzip=True), "c.warc.gz": gzip.compress(plain)}
    seen = []
    for name, data in variants.items():
        (tmp_path / name).write_bytes(data)
        seen.append([(d.metadata["url"], d.raw) for d in WarcReader().read(str(tmp_path / name))])
    assert seen[0] == seen[1] == seen[2]


def test_document_fields_follow_the_record(tmp_path: Path) -> None:
    path = tmp_path / "one.warc.gz"
    path.write_bytes(_build(MIXED[:1], per_record_gzip=True))
    (doc,) = WarcReader(source="cc", added="2026-11-28T00:00:00Z").read(str(path))
    record = next(r for r in ArchiveIterator(io.BytesIO(path.read_bytes())) if r.rec_type == "response")
    assert doc.id == record.rec_headers.get_header("WARC-Record-ID")[len("<urn:uuid:"):-1]
    assert UUID_RE.match(doc.id)
    assert (doc.source, doc.added, doc.created, doc.text) == ("cc", "2026-11-28T00:00:00Z", "2024-05-17T23:31:22Z", "")
    assert doc.raw == HTML and doc.charset == "utf-8"
    assert doc.metadata == {
        "url": "http://a.example/", "warc_date": "2024-05-17T23:31:22Z",
        "warc_record_id": record.rec_headers.get_header("WARC-Record-ID"), "warc_file": "one.warc.gz",
        "warc_offset": doc.metadata["warc_offset"], "content_type": "text/html", "status": 200,
    }
    # Per-record gzip: the offset is where the record's gzip member starts, as in the CC index.
    member = path.read_bytes()[doc.metadata["warc_offset"]:]
    record_bytes = zlib.decompressobj(wbits=31).decompress(member)
    assert record_bytes.startswith(b"WARC/1.0\r\n") and b"WARC-Type: response\r\n" in record_bytes[:200]


def test_chunked_gzip_payload_is_decoded(tmp_path: Path) -> None:
    path = tmp_path / "enc.warc"
    path.write_bytes(_build([MIXED[5]], per_record_gzip=False))
    (doc,) = WarcReader().read(str(path))
    assert doc.raw == HTML and doc.metadata["content_type"] == "application/xhtml+xml"


def test_statuses_and_content_types_are_configurable(tmp_path: Path) -> None:
    path = tmp_path / "m.warc"
    path.write_bytes(_build(MIXED, per_record_gzip=False))
    reader = WarcReader(statuses=(200, 404), content_types=("application/pdf",))
    urls = [d.metadata["url"] for d in reader.read(str(path))]
    assert urls == ["http://a.example/doc.pdf", "http://a.example/untyped"]


def test_payload_over_the_limit_is_skipped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "big.warc"
    path.write_bytes(_build([("response", "http://a.example/big", b"<html>" + b"x" * 5000 + b"</html>")], False))
    reader = WarcReader(max_payload_bytes=1000)
    assert list(reader.read(str(path))) == []
    assert reader.stats.counters["skipped.too_large"] == 1


@pytest.mark.parametrize("cut", ["in_header", "in_payload"])
def test_truncated_file_yields_records_before_the_fault_then_one_counted_error(tmp_path: Path, cut: str) -> None:
    data = _build([("response", f"http://a.example/{i}", HTML) for i in range(3)], per_record_gzip=False)
    third = data.index(b"WARC/1.0", data.index(b"http://a.example/2") - 400)
    end = data.index(b"Content-Type: application/http", third) if cut == "in_header" else len(data) - 20
    path = tmp_path / "cut.warc"
    path.write_bytes(data[:end])
    reader = WarcReader()
    docs = list(reader.read(str(path)))
    assert [d.metadata["url"] for d in docs] == ["http://a.example/0", "http://a.example/1"]
    assert reader.stats.errors == Counter({"read.malformed": 1})
    (sample,) = reader.stats.samples
    assert sample["file"] == str(path) and sample["offset"] == third and "truncated" in sample["message"]


def test_unreadable_input_is_a_counted_error_not_an_exception(tmp_path: Path) -> None:
    reader = WarcReader()
    (tmp_path / "junk.warc.gz").write_bytes(gzip.compress(b"<html>not an archive</html>"))
    assert list(reader.read(str(tmp_path / "junk.warc.gz"))) == []
    assert list(reader.read(str(tmp_path / "absent.warc.gz"))) == []
    # Junk is malformed (offset 0); a missing file is unavailable, which a rerun retries.
    assert reader.stats.errors == {"read.malformed": 1, "read.unavailable": 1}
    assert reader.stats.samples[0]["offset"] == 0 and reader.stats.samples[1]["kind"] == "read.unavailable"


# -- real archives ------------------------------------------------------------------------------


def _expected_by_warcio(path: Path) -> list[str]:
    """Record ids (WARC) or URLs (ARC) our reader must yield, found by an independent warcio pass.

    The whole file is gunzipped first (warcio refuses single-stream gzip), then: responses with
    HTTP status 200 and an HTML Content-Type, plus every WET conversion record.
    """
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    keys = []
    for rec in ArchiveIterator(io.BytesIO(data), arc2warc=True):
        if rec.rec_type == "conversion":
            keys.append(rec.rec_headers.get_header("WARC-Record-ID"))
        elif rec.rec_type == "response" and rec.http_headers is not None:
            ctype = (rec.http_headers.get_header("Content-Type") or "").split(";")[0].strip().lower()
            if rec.http_headers.get_statuscode() == "200" and ctype in ("text/html", "application/xhtml+xml"):
                is_arc = path.name.endswith((".arc", ".arc.gz"))
                keys.append(rec.rec_headers.get_header("WARC-Target-URI") if is_arc
                            else rec.rec_headers.get_header("WARC-Record-ID"))
    return keys


# Documents per file, hand-verified: warcio record-type counts from PROVENANCE/*.md, then status
# and Content-Type per response (e.g. pages: 1,118 responses, 1,044 HTML 200 per data README).
EXPECTED_DOCS = {
    "warc/commoncrawl/cmoncrawl_CC-MAIN-2022-05_mini.warc.gz": 1,
    "warc/commoncrawl/eugeneware_CC-MAIN-20140820021334-00006.warc": 3,
    "warc/commoncrawl/jwarc_cc.warc.gz": 1,
    "warc/commoncrawl/resiliparse_CC-MAIN-2020-34_warcfile.warc.gz": 16,
    "warc/commoncrawl/whirlwind_CC-MAIN-2024-22.warc.gz": 1,
    "warc/other/aut_IAH-2008-archive.org-shallow_example.warc.gz": 94,
    "warc/other/aut_example.arc.gz": 94,
    "warc/other/dolma_wget_sample-0000.warc.gz": 22,
    "warc/other/dolma_wget_sample-0001.warc.gz": 15,
    "warc/other/ukwa_BL-20140325121225068-00000.warc.gz": 32,
    "warc/other/ukwa_wikipedia_mona_lisa.warc.gz": 2,
    "warc/pages/web_pages-00000.warc.gz": 261,
    "warc/pages/web_pages-00001.warc.gz": 261,
    "warc/pages/web_pages-00002.warc.gz": 261,
    "warc/pages/web_pages-00003.warc.gz": 261,
    "wet/eugeneware_CC-MAIN-20140820021334-00006.warc.wat": 0,
    "wet/eugeneware_CC-MAIN-20140820021334-00006.warc.wet": 3,
    "wet/jeffharwell_CC-MAIN-2016-50_filter_test_1.wet.gz": 25,
    "wet/jeffharwell_CC-MAIN-2016-50_fragment3.wet.gz": 5,
    "wet/whirlwind_CC-MAIN-2024-22.warc.wat.gz": 0,
    "wet/whirlwind_CC-MAIN-2024-22.warc.wet.gz": 1,
}


@pytest.mark.integration
def test_every_real_archive_is_listed_here(shared_data: Path) -> None:
    on_disk = {str(p.relative_to(shared_data)) for d in ("warc/commoncrawl", "warc/other", "warc/pages", "wet")
               for p in (shared_data / d).iterdir() if p.name.endswith((".warc", ".warc.gz", ".arc.gz", ".wet",
                                                                         ".wet.gz", ".wat", ".wat.gz"))}
    assert on_disk == set(EXPECTED_DOCS)


@pytest.mark.integration
@pytest.mark.parametrize("rel", sorted(EXPECTED_DOCS))
def test_real_archive_yields_exactly_the_records_warcio_finds(shared_data: Path, rel: str) -> None:
    path = shared_data / rel
    reader = WarcReader()
    docs = list(reader.read(str(path)))
    is_arc = rel.endswith(".arc.gz")
    got = [d.metadata["url"] if is_arc else d.metadata["warc_record_id"] for d in docs]
    assert got == _expected_by_warcio(path)
    assert len(docs) == EXPECTED_DOCS[rel]
    assert not reader.stats.errors
    assert all(UUID_RE.match(d.id) or re.match(r"^[0-9a-f]{40}$", d.id) for d in docs)
    assert all(ISO_RE.match(d.created) for d in docs)
    is_wet = ".wet" in rel
    assert all((d.raw is None and d.text) if is_wet else (d.raw and d.text == "") for d in docs)


@pytest.mark.integration
def test_pages_shards_hold_1118_responses_of_which_1044_html_200(shared_data: Path) -> None:
    reader = WarcReader()
    docs = [d for p in sorted((shared_data / "warc" / "pages").glob("*.warc.gz")) for d in reader.read(str(p))]
    c = reader.stats.counters
    # Figures from ../shared/data/README.md: 28 redirects, 26 not-found, 20 non-HTML payloads.
    assert len(docs) == 1044
    assert (c["skipped.status_301"], c["skipped.status_404"], c["skipped.non_html"]) == (28, 26, 20)
    assert len(docs) + c["skipped.status_301"] + c["skipped.status_404"] + c["skipped.non_html"] == 1118
    assert len({d.metadata["url"] for d in docs}) == 1044 - 11  # 11 URLs fetched twice
    assert len({d.id for d in docs}) == 1044
    assert reader.stats.docs_out == 1044


@pytest.mark.integration
def test_arc_and_warc_of_the_same_crawl_give_the_same_pages_with_stable_ids(shared_data: Path) -> None:
    other = shared_data / "warc" / "other"
    from_warc = list(WarcReader().read(str(other / "aut_IAH-2008-archive.org-shallow_example.warc.gz")))
    from_arc = list(WarcReader().read(str(other / "aut_example.arc.gz")))
    assert sorted(d.metadata["url"] for d in from_arc) == sorted(d.metadata["url"] for d in from_warc)
    # ARC has no record ids: ids are a hash of url and date, so a second read gives the same ones.
    assert [d.id for d in from_arc] == [d.id for d in WarcReader().read(str(other / "aut_example.arc.gz"))]
    assert len({d.id for d in from_arc}) == len(from_arc)
    assert {d.raw for d in from_arc} == {d.raw for d in from_warc}


@pytest.mark.integration
def test_arc_reads_the_same_plain_per_record_gzip_or_whole_file_gzip(shared_data: Path, tmp_path: Path) -> None:
    original = shared_data / "warc" / "other" / "aut_example.arc.gz"
    plain = gzip.decompress(original.read_bytes())
    (tmp_path / "a.arc").write_bytes(plain)
    (tmp_path / "a.arc.gz").write_bytes(gzip.compress(plain, compresslevel=1))
    expected = [(d.id, d.raw) for d in WarcReader().read(str(original))]
    assert len(expected) == 94
    for name in ("a.arc", "a.arc.gz"):
        reader = WarcReader()
        assert [(d.id, d.raw) for d in reader.read(str(tmp_path / name))] == expected
        assert not reader.stats.errors


# Malformed files: (documents read, offsets of the damaged stretches; empty when the file is sound).
# The jeffharwell "corrupt" files are corrupt only for a parser that insists on warcinfo first;
# every record in them is whole, so all are kept. Offsets are where the damage starts (the faulty
# record, or 0 for a file that does not start with one): per-record gzip files count compressed
# bytes, single-stream gzip files decompressed bytes. fragment2 starts mid-record: the reader
# resumes at the next record header (7,429 decompressed bytes in) and keeps its one document,
# then meets the cut-off last record (the old reader stopped at byte 0 with nothing).
MALFORMED = {
    "jeffharwell_appended_zip_fragment_unexpected_eof.wet.gz": (15, (49258,)),
    "jeffharwell_corrupt_starts_with_conversion.wet.gz": (5, ()),
    "jeffharwell_corrupt_two_warcinfo.wet.gz": (5, ()),
    "jeffharwell_fragment1_incomplete_last.wet.gz": (1, (3211,)),
    "jeffharwell_fragment2_no_header.wet.gz": (1, (0, 17004)),
    "resiliparse_clipped.warc.gz": (0, (0,)),  # one gzip stream cut inside its first (88 KB) record
}


@pytest.mark.integration
def test_every_malformed_file_is_covered(shared_data: Path) -> None:
    assert {p.name for p in (shared_data / "warc" / "malformed").iterdir()} == set(MALFORMED)


@pytest.mark.integration
@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_file_yields_every_whole_record_and_one_counted_error_per_damaged_stretch(
    shared_data: Path, name: str
) -> None:
    path = shared_data / "warc" / "malformed" / name
    n_docs, offsets = MALFORMED[name]
    reader = WarcReader()
    docs = list(reader.read(str(path)))
    assert len(docs) == n_docs
    assert all(d.text for d in docs)
    assert reader.stats.errors == (Counter({"read.malformed": len(offsets)}) if offsets else Counter())
    assert [s["offset"] for s in reader.stats.samples] == list(offsets)
    assert all(s["file"] == str(path) and s["message"] for s in reader.stats.samples)
    raw = path.read_bytes()
    for offset in offsets:
        if offset:
            # The offset points at the start of the damaged record, in either gzip layout.
            d = zlib.decompressobj(wbits=31)
            tail = d.decompress(raw[offset:], 64) if raw[offset:offset + 2] == b"\x1f\x8b" else b""
            if not tail.startswith(b"WARC/"):
                tail = gzip.GzipFile(fileobj=io.BytesIO(raw)).read(offset + 64)[offset:]
            assert tail.startswith(b"WARC/1.0")
    for sample in reader.stats.samples:
        if "resumed_at" in sample:
            # Reading resumed at a record header, and the document there is that record.
            at = sample["resumed_at"]
            plain = zlib.decompressobj(wbits=31).decompress(raw)
            assert plain[at:].startswith(b"WARC/1.0\r\n")
            assert any(d.metadata["warc_offset"] == at and d.metadata["warc_record_id"].encode() in plain[at:at + 400]
                       for d in docs)


@pytest.mark.integration
def test_reading_continues_with_the_next_file_after_a_malformed_one(shared_data: Path) -> None:
    reader = WarcReader()
    paths = [shared_data / "warc" / "malformed" / "resiliparse_clipped.warc.gz",
             shared_data / "warc" / "commoncrawl" / "resiliparse_CC-MAIN-2020-34_warcfile.warc.gz"]
    docs = [d for p in paths for d in reader.read(str(p))]
    assert len(docs) == 16 and reader.stats.errors["read.malformed"] == 1


def test_corrupt_brotli_payload_is_a_counted_skip_and_reading_continues(tmp_path: Path) -> None:
    import brotli

    path = tmp_path / "br.warc"
    records = [
        ("response", "http://a.example/bad-br", b"not brotli at all \x00\xff" * 4, "200 OK",
         [("Content-Type", "text/html"), ("Content-Encoding", "br")]),
        ("response", "http://a.example/good-br", brotli.compress(HTML), "200 OK",
         [("Content-Type", "text/html"), ("Content-Encoding", "br")]),
        MIXED[0],
    ]
    path.write_bytes(_build(records, per_record_gzip=False))
    reader = WarcReader()
    docs = list(reader.read(str(path)))
    assert [d.metadata["url"] for d in docs] == ["http://a.example/good-br", "http://a.example/"]
    assert docs[0].raw == HTML
    assert reader.stats.counters["skipped.bad_encoding"] == 1 and not reader.stats.errors


def test_brotli_payload_over_the_limit_is_skipped(tmp_path: Path) -> None:
    import brotli

    path = tmp_path / "bomb.warc"
    body = brotli.compress(b"<html>" + b"x" * 50_000 + b"</html>")
    path.write_bytes(_build([("response", "http://a.example/bomb", body, "200 OK",
                              [("Content-Type", "text/html"), ("Content-Encoding", "br")])], False))
    reader = WarcReader(max_payload_bytes=10_000)
    assert list(reader.read(str(path))) == []
    assert reader.stats.counters["skipped.bad_encoding"] == 1


def test_missing_brotli_is_a_setup_error_not_bad_encoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the brotli module the reader refuses to start, naming what to install; it never
    counts `br` pages as `skipped.bad_encoding`, not even when the module goes missing after start."""
    import brotli

    from curation.read.inputs import MissingBackend
    from curation.read.warc import decode_http_payload

    path = tmp_path / "br.warc"
    path.write_bytes(_build([("response", "http://a.example/br", brotli.compress(HTML), "200 OK",
                              [("Content-Type", "text/html"), ("Content-Encoding", "br")])], False))
    reader = WarcReader()
    monkeypatch.setitem(sys.modules, "brotli", None)  # `import brotli` now raises ImportError
    with pytest.raises(MissingBackend, match="pip install brotli"):
        WarcReader()
    with pytest.raises(ImportError):
        decode_http_payload(brotli.compress(HTML), None, "br", 10_000)
    # A reader built before the module vanished: the file ends as `read.error` (not data damage).
    assert list(reader.read(str(path))) == []
    assert reader.stats.counters["skipped.bad_encoding"] == 0 and reader.stats.errors == {"read.error": 1}
