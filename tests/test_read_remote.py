"""Remote inputs over real HTTP: a server on 127.0.0.1 serves a real Common Crawl WARC and a listing
that names it; what is read through the download cache must equal the local read."""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from curation.read import WarcReader
from curation.read.inputs import InputUnavailable, expand_inputs

WARC = "resiliparse_CC-MAIN-2020-34_warcfile.warc.gz"


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)  # 127.0.0.1 must be reached directly


@pytest.fixture
def server(shared_data: Path, tmp_path: Path) -> Iterator[str]:
    root = tmp_path / "www"
    root.mkdir()
    (root / WARC).symlink_to(shared_data / "warc" / "commoncrawl" / WARC)  # served, not copied
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    (root / "warc.paths").write_text(f"{base}/{WARC}\n")
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield base
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def _docs(reader: WarcReader, path: str) -> list[tuple[str, bytes | None, str]]:
    return [(d.id, d.raw, d.metadata["url"]) for d in reader.read(path)]


@pytest.mark.integration
def test_http_listing_and_warc_read_the_same_documents_as_the_local_file(
    server: str, shared_data: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    urls = expand_inputs([f"{server}/warc.paths"], cache_dir=cache)
    assert urls == [f"{server}/{WARC}"]
    remote = WarcReader(cache_dir=str(cache))
    got = _docs(remote, urls[0])
    assert not remote.stats.errors
    assert got == _docs(WarcReader(), str(shared_data / "warc" / "commoncrawl" / WARC))
    assert len(got) == 16


@pytest.mark.integration
def test_missing_remote_warc_is_a_counted_unavailable_input_naming_url_and_status(server: str, tmp_path: Path) -> None:
    reader = WarcReader(cache_dir=str(tmp_path / "cache"))
    url = f"{server}/gone.warc.gz"
    assert list(reader.read(url)) == []
    assert reader.stats.errors == {"read.unavailable": 1}
    (sample,) = reader.stats.samples
    assert sample["file"] == url and url in sample["message"] and "HTTP 404" in sample["message"]
    assert not list((tmp_path / "cache").iterdir())  # no partial file left to be trusted later


@pytest.mark.integration
def test_missing_remote_listing_is_a_clear_error(server: str, tmp_path: Path) -> None:
    url = f"{server}/nope/warc.paths.gz"
    with pytest.raises(InputUnavailable, match=rf"{url} is unavailable: HTTP 404"):
        expand_inputs([url], cache_dir=tmp_path / "cache")


def test_unreachable_host_is_unavailable_not_a_crash(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    reader = WarcReader(cache_dir=str(tmp_path / "cache"))
    assert list(reader.read(f"http://127.0.0.1:{port}/x.warc.gz")) == []
    assert reader.stats.errors == {"read.unavailable": 1}
    assert "is unavailable" in reader.stats.samples[0]["message"]
