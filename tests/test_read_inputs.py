"""Input expansion (paths, globs, Common Crawl listings, URLs) and the download cache."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import pytest

from curation.read import inputs
from curation.read.inputs import LocalPathInListing, MissingBackend, cache_path, expand_inputs, open_input


def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_glob_expands_sorted_absolute_and_deduplicated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ["b.warc.gz", "a.warc.gz", "c.warc.gz", "notes.txt"]:
        _touch(tmp_path / "in" / name)
    monkeypatch.chdir(tmp_path)
    out = expand_inputs(["in/*.warc.gz", "in/a.warc.gz", str(tmp_path / "in" / "b.warc.gz")])
    assert out == [str(tmp_path / "in" / n) for n in ["a.warc.gz", "b.warc.gz", "c.warc.gz"]]


def test_recursive_glob_finds_nested_files(tmp_path: Path) -> None:
    _touch(tmp_path / "x" / "y" / "deep.warc")
    _touch(tmp_path / "top.warc")
    assert expand_inputs([str(tmp_path / "**" / "*.warc")]) == [
        str(tmp_path / "top.warc"), str(tmp_path / "x" / "y" / "deep.warc")]


def test_glob_matching_nothing_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="matched no files"):
        expand_inputs([str(tmp_path / "*.warc.gz")])


def test_missing_local_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        expand_inputs([str(tmp_path / "nope.warc.gz")])


def test_urls_pass_through_unchanged() -> None:
    urls = ["https://example.org/a.warc.gz", "http://mirror.example/crawl/b.warc.gz", "https://example.org/a.warc.gz"]
    assert expand_inputs(urls) == urls[:2]


def test_one_file_reached_through_a_symlink_and_a_glob_is_listed_once(tmp_path: Path) -> None:
    real = _touch(tmp_path / "crawl" / "a.warc.gz")
    _touch(tmp_path / "crawl" / "b.warc.gz")
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "same-as-a.warc.gz").symlink_to(real)
    (tmp_path / "mirror").symlink_to(tmp_path / "crawl", target_is_directory=True)
    out = expand_inputs([str(tmp_path / "links" / "same-as-a.warc.gz"), str(tmp_path / "**" / "*.warc.gz")])
    # The first occurrence fixes the order; every later spelling of the same file is dropped.
    assert out == [str(real), str(tmp_path / "crawl" / "b.warc.gz")]


def test_directory_input_reads_its_archives_recursively_in_sorted_order(tmp_path: Path) -> None:
    for name in ["b.warc.gz", "a.arc.gz", "sub/c.wet.gz", "sub/deeper/d.warc", "notes.txt", "x.warc.wat.gz"]:
        _touch(tmp_path / "in" / name)
    assert expand_inputs([str(tmp_path / "in")]) == [
        str(tmp_path / "in" / n) for n in ["a.arc.gz", "b.warc.gz", "sub/c.wet.gz", "sub/deeper/d.warc"]]


def test_directory_without_archives_says_so(tmp_path: Path) -> None:
    _touch(tmp_path / "in" / "readme.txt")
    with pytest.raises(FileNotFoundError, match="holds no web archives"):
        expand_inputs([str(tmp_path / "in")])


def _listing(tmp_path: Path, *lines: str) -> Path:
    return _touch(tmp_path / "warc.paths", ("\n".join(lines) + "\n").encode())


@pytest.mark.parametrize("line", ["file:///etc/passwd.warc.gz", "FILE:///srv/x.warc.gz",
                                  "simplecache::file:///srv/x.warc.gz", "local:///srv/x.warc", "/srv/x.warc.gz",
                                  "~/x.warc.gz"])
def test_listing_naming_a_local_file_is_refused(tmp_path: Path, line: str) -> None:
    listing = _listing(tmp_path, "crawl-data/a.warc.gz", line)
    with pytest.raises(LocalPathInListing, match=r"line 2 names a local file.*allow_local_in_listings"):
        expand_inputs([str(listing)])


def test_remote_listing_naming_a_local_file_never_reaches_the_cache(tmp_path: Path) -> None:
    secret = _touch(tmp_path / "private" / "secret.warc.gz", b"not for the corpus")
    listing = _touch(tmp_path / "src" / "warc.paths.gz", gzip.compress(secret.as_uri().encode() + b"\n"))
    cache = tmp_path / "cache"
    with pytest.raises(LocalPathInListing):
        expand_inputs([listing.as_uri()], cache_dir=cache)
    assert [p.name for p in cache.iterdir()] == [cache_path(listing.as_uri(), cache).name]


def test_local_files_in_a_listing_are_read_in_place_when_allowed(tmp_path: Path) -> None:
    a = _touch(tmp_path / "data" / "a.warc.gz")
    b = _touch(tmp_path / "data" / "b.warc.gz")
    listing = _listing(tmp_path, a.as_uri(), str(b), "crawl-data/c.warc.gz")
    assert expand_inputs([str(listing)], allow_local_in_listings=True) == [
        str(a), str(b), "https://data.commoncrawl.org/crawl-data/c.warc.gz"]
    with pytest.raises(FileNotFoundError, match="line 1 names a local file that does not exist"):
        expand_inputs([str(_listing(tmp_path, str(tmp_path / "gone.warc.gz")))], allow_local_in_listings=True)


def test_s3_input_without_s3fs_says_which_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if not installed, whatever this machine has
    with pytest.raises(MissingBackend, match=r"pip install 'refinery\[s3\]'") as e:
        expand_inputs(["s3://commoncrawl/crawl-data/x.warc.gz"])
    assert "rerun" not in str(e.value)
    with pytest.raises(MissingBackend, match=r"pip install 'refinery\[s3\]'"):
        inputs.fetch("s3://commoncrawl/crawl-data/x.warc.gz", io.BytesIO())


def test_unknown_protocol_is_named() -> None:
    with pytest.raises(MissingBackend, match="unknown protocol nosuch://"):
        expand_inputs(["nosuch://host/x.warc.gz"])


def test_local_listing_lines_become_commoncrawl_urls(tmp_path: Path) -> None:
    listing = tmp_path / "warc.paths.gz"
    listing.write_bytes(gzip.compress(b"crawl-data/CC-MAIN-2024-22/a.warc.gz\n\n"
                                      b"crawl-data/CC-MAIN-2024-22/b.warc.gz\nhttps://mirror.example/c.warc.gz\n"))
    assert expand_inputs([str(listing)]) == [
        "https://data.commoncrawl.org/crawl-data/CC-MAIN-2024-22/a.warc.gz",
        "https://data.commoncrawl.org/crawl-data/CC-MAIN-2024-22/b.warc.gz",
        "https://mirror.example/c.warc.gz",
    ]


def test_listing_of_non_archives_is_rejected_with_the_line(tmp_path: Path) -> None:
    listing = tmp_path / "warc.paths.gz"
    listing.write_bytes(gzip.compress(b"crawl-data/a.warc.gz\ncc-index/table/part-0.parquet\n"))
    with pytest.raises(ValueError, match="line 2 is not a WARC/WET/ARC path"):
        expand_inputs([str(listing)])


@pytest.mark.integration
def test_real_cc_main_2024_22_listing_names_parquet_files_and_is_rejected(shared_data: Path) -> None:
    # The file shipped as CC-MAIN-2024-22.warc.paths.gz (from whirlwind-python) actually lists
    # the crawl's 300 cc-index parquet parts, not WARCs (checked with `zcat | head`): expanding it
    # must fail loudly instead of queueing 300 downloads that no WARC reader can parse.
    listing = shared_data / "warc" / "commoncrawl" / "CC-MAIN-2024-22.warc.paths.gz"
    lines = gzip.decompress(listing.read_bytes()).decode().splitlines()
    assert len(lines) == 300 and lines[0].endswith(".parquet")
    with pytest.raises(ValueError, match="line 1 is not a WARC/WET/ARC path"):
        expand_inputs([str(listing)])


def test_remote_listing_is_downloaded_through_the_cache(tmp_path: Path) -> None:
    listing = _touch(tmp_path / "src" / "wet.paths.gz", gzip.compress(b"crawl-data/x.wet.gz\n"))
    cache = tmp_path / "cache"
    assert expand_inputs([listing.as_uri()], cache_dir=cache) == ["https://data.commoncrawl.org/crawl-data/x.wet.gz"]
    assert cache_path(listing.as_uri(), cache).is_file()


def test_local_file_opens_directly_without_touching_the_cache(tmp_path: Path) -> None:
    f = _touch(tmp_path / "a.warc", b"WARC/1.0\r\n")
    cache = tmp_path / "cache"
    with open_input(str(f), cache) as fh:
        assert fh.read() == b"WARC/1.0\r\n"
    assert not cache.exists()


def test_remote_file_is_fetched_once_then_read_from_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _touch(tmp_path / "remote" / "shard.warc.gz", b"payload bytes")
    calls: list[str] = []
    real_fetch = inputs.fetch

    def counting_fetch(url: str, dest) -> None:  # type: ignore[no-untyped-def]
        calls.append(url)
        real_fetch(url, dest)

    monkeypatch.setattr(inputs, "fetch", counting_fetch)
    cache = tmp_path / "cache"
    for _ in range(3):
        with open_input(src.as_uri(), cache) as fh:
            assert fh.read() == b"payload bytes"
    assert calls == [src.as_uri()]
    # Only the finished file is in the cache: no temp files left behind.
    assert [p.name for p in cache.iterdir()] == [cache_path(src.as_uri(), cache).name]


def test_failed_download_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_fetch(url: str, dest) -> None:  # type: ignore[no-untyped-def]
        dest.write(b"half a file")
        raise ConnectionError("connection reset")

    monkeypatch.setattr(inputs, "fetch", broken_fetch)
    cache = tmp_path / "cache"
    with pytest.raises(ConnectionError):
        open_input("https://example.org/x.warc.gz", cache)
    assert list(cache.iterdir()) == []


def test_same_basename_from_two_urls_gets_two_cache_entries(tmp_path: Path) -> None:
    a = cache_path("https://one.example/crawl/x.warc.gz", tmp_path)
    b = cache_path("https://two.example/crawl/x.warc.gz", tmp_path)
    assert a != b and a.name.endswith("x.warc.gz") and b.name.endswith("x.warc.gz")
