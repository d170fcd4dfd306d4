"""Reading resumes after damage: a corrupt gzip member, junk between records, a wrong Content-Length.

Each damaged stretch costs the records inside it and nothing else, is one counted
`read.malformed` error, and is measured in `read.resynced` / `read.bytes_skipped`. No record is
ever passed on with bytes that are not its own.
"""

from __future__ import annotations

import gzip
import io
import logging
import random
import re
import zlib
from collections import Counter
from pathlib import Path

import pytest
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from curation.read import WarcReader

CC_WARC = "warc/commoncrawl/resiliparse_CC-MAIN-2020-34_warcfile.warc.gz"


def _members(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each gzip member, found with zlib alone."""
    spans, pos = [], 0
    while pos < len(data):
        d = zlib.decompressobj(wbits=31)
        d.decompress(data[pos:])
        end = len(data) - len(d.unused_data)
        spans.append((pos, end))
        pos = end
    return spans


def _read(path: Path) -> tuple[dict[str, bytes | str | None], WarcReader]:
    reader = WarcReader()
    docs = {d.id: d.raw if d.raw is not None else d.text for d in reader.read(str(path))}
    return docs, reader


@pytest.mark.integration
def test_one_flipped_byte_in_a_real_cc_warc_costs_at_most_its_own_record(shared_data: Path, tmp_path: Path) -> None:
    data = (shared_data / CC_WARC).read_bytes()
    members = _members(data)
    assert len(members) == 50
    clean, _ = _read(shared_data / CC_WARC)
    assert len(clean) == 16
    rng = random.Random(20261129)
    recovered = []
    for trial in range(20):
        start, end = members[rng.randrange(len(members))]
        damaged = bytearray(data)
        damaged[rng.randrange(start, end)] ^= rng.randrange(1, 256)
        path = tmp_path / f"trial{trial}.warc.gz"
        path.write_bytes(bytes(damaged))
        docs, reader = _read(path)
        # Whatever is read is byte for byte what the undamaged file holds.
        assert all(clean.get(doc_id) == raw for doc_id, raw in docs.items())
        assert reader.stats.errors["read.malformed"] <= 1  # a flip in the gzip MTIME field harms nothing
        if reader.stats.errors:  # the damaged stretch is that member alone; reading resumes after it
            assert reader.stats.counters["read.resynced"] == (0 if end == len(data) else 1)
            assert 0 < reader.stats.counters["read.bytes_skipped"] <= end - start
        recovered.append(len(docs) / len(clean))
    # Measured with this seed: 99.1% mean, 15 of 16 at worst, the one lost page being the damaged
    # member itself (the reader before resynchronizing: 39.1% mean, 0 of 16 at worst).
    assert sum(recovered) / len(recovered) >= 0.9
    assert min(recovered) >= 15 / 16


# -- hand-built damage ---------------------------------------------------------------------------


def _records(n: int = 5) -> list[bytes]:
    """A warcinfo record and `n` HTML responses, each serialized on its own (uncompressed)."""
    out = []
    for i in range(n + 1):
        buf = io.BytesIO()
        w = WARCWriter(buf, gzip=False)
        if i == 0:
            w.write_record(w.create_warcinfo_record("t.warc", {"software": "test"}))
        else:
            http = StatusAndHeaders("200 OK", [("Content-Type", "text/html")], protocol="HTTP/1.1")
            body = f"<html><body><p>Page {i}: " .encode() + b"word " * (40 * i) + b"</p></body></html>"
            w.write_record(w.create_warc_record(f"http://a.example/{i}", "response", payload=io.BytesIO(body),
                                                http_headers=http))
        out.append(buf.getvalue())
    return out


def _file(records: list[bytes], layout: str) -> bytes:
    return b"".join(records) if layout == "plain" else b"".join(gzip.compress(r) for r in records)


def _set_length(record: bytes, delta: int) -> bytes:
    def change(m: re.Match[bytes]) -> bytes:
        return b"Content-Length: %d" % (int(m.group(1)) + delta)

    return re.sub(rb"Content-Length: (\d+)", change, record, count=1)


def _urls(path: Path) -> tuple[list[str], WarcReader]:
    reader = WarcReader()
    return [d.metadata["url"] for d in reader.read(str(path))], reader


ALL = [f"http://a.example/{i}" for i in range(1, 6)]


@pytest.mark.parametrize("layout", ["plain", "gzip_per_record"])
def test_junk_between_records_is_skipped_and_counted(tmp_path: Path, layout: str,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    records = _records()
    junk = b"\x00garbage that is not a record\r\n\r\n" * 3
    head = _file(records[:3], layout)
    path = tmp_path / ("j.warc" if layout == "plain" else "j.warc.gz")
    path.write_bytes(head + junk + _file(records[3:], layout))
    with caplog.at_level(logging.INFO, logger="curation.read.warc"):
        urls, reader = _urls(path)
    # The damage and the resync are logged, naming the file and both offsets.
    logged = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert (logging.WARNING, f"{path}: damaged at offset {len(head)}") in [(lv, m.split(" (")[0]) for lv, m in logged]
    assert (logging.INFO, f"{path}: resumed reading at offset {len(head) + len(junk)} "
            f"({len(junk)} damaged bytes skipped)") in logged
    assert urls == ALL
    assert reader.stats.errors == Counter({"read.malformed": 1})
    c = reader.stats.counters
    assert (c["read.resynced"], c["read.bytes_skipped"], c["skipped.damaged"]) == (1, len(junk), 0)
    (sample,) = reader.stats.samples
    assert (sample["offset"], sample["resumed_at"]) == (len(head), len(head) + len(junk))


@pytest.mark.parametrize("layout", ["plain", "gzip_per_record"])
@pytest.mark.parametrize("delta", [+300, -300, +5000])
def test_record_with_a_wrong_content_length_is_dropped_and_the_rest_kept(tmp_path: Path, layout: str,
                                                                          delta: int) -> None:
    records = _records()
    good = tmp_path / ("good.warc" if layout == "plain" else "good.warc.gz")
    good.write_bytes(_file(records, layout))
    clean = {d.metadata["url"]: d.raw for d in WarcReader().read(str(good))}
    records[2] = _set_length(records[2], delta)  # the second response
    path = tmp_path / ("cl.warc" if layout == "plain" else "cl.warc.gz")
    path.write_bytes(_file(records, layout))
    reader = WarcReader()
    docs = list(reader.read(str(path)))
    assert [d.metadata["url"] for d in docs] == [u for u in ALL if u != "http://a.example/2"]
    assert all(d.raw == clean[d.metadata["url"]] for d in docs)  # nobody carries a neighbour's bytes
    assert reader.stats.errors == Counter({"read.malformed": 1})
    assert reader.stats.counters["skipped.damaged"] == 1 and reader.stats.counters["read.resynced"] == 1
    assert reader.stats.samples[0]["offset"] == len(_file(records[:2], layout))


def test_corrupt_first_member_loses_only_the_warcinfo(tmp_path: Path) -> None:
    data = bytearray(_file(_records(), "gzip_per_record"))
    data[20] ^= 0xFF  # inside the deflate data of the warcinfo member
    path = tmp_path / "first.warc.gz"
    path.write_bytes(bytes(data))
    urls, reader = _urls(path)
    assert urls == ALL
    assert reader.stats.errors == Counter({"read.malformed": 1}) and reader.stats.samples[0]["offset"] == 0


def test_leading_junk_before_the_first_record_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "lead.warc"
    path.write_bytes(b"HTTP/1.1 200 OK\r\n\r\nleft over from a bad copy" + _file(_records(), "plain"))
    urls, reader = _urls(path)
    assert urls == ALL and reader.stats.errors == Counter({"read.malformed": 1})


def test_whole_file_gzip_reads_up_to_a_corrupt_byte_then_reports_it(tmp_path: Path) -> None:
    records = _records()
    plain = _file(records, "plain")
    data = bytearray(gzip.compress(plain))
    data[len(data) * 3 // 4] ^= 0xFF  # one stream: nothing after the damage can be decoded
    path = tmp_path / "stream.warc.gz"
    path.write_bytes(bytes(data))
    urls, reader = _urls(path)
    assert urls == ALL[:len(urls)] and len(urls) < 5
    assert reader.stats.errors == Counter({"read.malformed": 1})
    assert "gzip stream" in reader.stats.samples[0]["message"]


def test_whole_file_gzip_cut_short_keeps_the_records_before_the_cut(tmp_path: Path) -> None:
    records = _records()
    compressed = gzip.compress(_file(records, "plain"))
    path = tmp_path / "cut.warc.gz"
    path.write_bytes(compressed[:-40])  # the trailer and the end of the last record
    urls, reader = _urls(path)
    assert urls == ALL[:4]
    assert reader.stats.errors == Counter({"read.malformed": 1})
    assert reader.stats.samples[0]["offset"] == len(_file(records[:5], "plain"))


def test_wet_text_loses_nul_and_other_control_characters(tmp_path: Path) -> None:
    buf = io.BytesIO()
    w = WARCWriter(buf, gzip=True)
    text = b"Title\x00 with NUL\r\nPage one\x0cPage two\x1b[0m\tend\x07"
    w.write_record(w.create_warc_record("http://a.example/", "conversion", payload=io.BytesIO(text),
                                        warc_content_type="text/plain"))
    path = tmp_path / "c.wet.gz"
    path.write_bytes(buf.getvalue())
    reader = WarcReader()
    (doc,) = reader.read(str(path))
    assert doc.text == "Title with NUL\r\nPage one\nPage two[0m\tend"
    assert reader.stats.counters["control_chars_removed"] == 4
