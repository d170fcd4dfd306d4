"""Turn the user's `--input` arguments into a list of archive paths, and open them.

Accepted forms: local paths, globs (`data/*.warc.gz`, `**` allowed), Common Crawl listings
(`warc.paths.gz`, `wet.paths.gz`: one path per line, relative to `https://data.commoncrawl.org/`),
and remote URLs (`https://`, `http://`, `s3://`, any fsspec protocol). Remote files are downloaded
once into a local cache (temp name, then rename, so a killed download never leaves a partial file
that a later run would trust) and read from there.
"""

from __future__ import annotations

import glob
import hashlib
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO

# Common Crawl's listings hold paths relative to this prefix; the HTTPS endpoint needs no
# credentials, unlike s3://commoncrawl/.
COMMONCRAWL_PREFIX = "https://data.commoncrawl.org/"
DEFAULT_CACHE_DIR = Path(os.environ.get("REFINERY_CACHE", Path.home() / ".cache" / "refinery" / "inputs"))
_GLOB_CHARS = frozenset("*?[")
# What a listing line must name: a web archive, plain or gzip (checked, because a listing of
# something else, e.g. the cc-index parquet files, would otherwise send workers downloading GBs).
ARCHIVE_SUFFIXES = (".warc", ".warc.gz", ".wet", ".wet.gz", ".wat", ".wat.gz", ".arc", ".arc.gz")
_CHUNK = 1 << 20


def is_remote(path: str) -> bool:
    """True for URLs (`https://`, `s3://`, `file://`, ...); plain and relative paths are local."""
    return "://" in path


def is_listing(path: str) -> bool:
    """Common Crawl path listings: `warc.paths.gz`, `wet.paths.gz`, also uncompressed `.paths`."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return name.endswith(".paths.gz") or name.endswith(".paths")


def expand_inputs(patterns: list[str], cache_dir: str | Path | None = None) -> list[str]:
    """Expand paths, globs, listings and URLs into archive paths, in order, without duplicates.

    Local paths come back absolute, so Ray workers with another working directory find them.
    A glob or local path that matches nothing is an error (a typo should not yield an empty
    corpus); a listing is read (downloaded first if remote) and each line becomes a URL.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    out: list[str] = []
    seen: set[str] = set()

    def add(p: str) -> None:
        if p not in seen:
            seen.add(p)
            out.append(p)

    for pattern in patterns:
        for path in _expand_one(str(pattern)):
            if is_listing(path):
                for url in read_listing(path, cache_dir):
                    add(url)
            else:
                add(path)
    return out


def _expand_one(pattern: str) -> list[str]:
    if is_remote(pattern):
        return [pattern]
    expanded = os.path.expanduser(pattern)
    if _GLOB_CHARS.intersection(expanded):
        matches = sorted(os.path.abspath(m) for m in glob.glob(expanded, recursive=True) if os.path.isfile(m))
        if not matches:
            raise FileNotFoundError(f"input pattern matched no files: {pattern!r}")
        return matches
    if not os.path.isfile(expanded):
        raise FileNotFoundError(f"input file not found: {pattern!r}")
    return [os.path.abspath(expanded)]


def read_listing(path: str, cache_dir: str | Path | None = None) -> list[str]:
    """Lines of a Common Crawl listing as URLs; lines that are already URLs are kept as they are.

    Every line must name a web archive (`ARCHIVE_SUFFIXES`), else ValueError with the line.
    """
    with open_input(path, cache_dir) as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        import gzip

        data = gzip.decompress(data)
    urls = []
    for lineno, line in enumerate(data.decode("utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not line.endswith(ARCHIVE_SUFFIXES):
            raise ValueError(f"{path}: line {lineno} is not a WARC/WET/ARC path: {line[:120]!r}")
        urls.append(line if is_remote(line) else COMMONCRAWL_PREFIX + line.lstrip("/"))
    return urls


def cache_path(url: str, cache_dir: str | Path | None = None) -> Path:
    """Where a remote file lands in the cache: a hash of the full URL keeps equal basenames apart."""
    root = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    digest = hashlib.sha1(url.encode("utf-8")).hexdigest()[:16]
    name = url.rstrip("/").rsplit("/", 1)[-1] or "index"
    return root / f"{digest}-{name}"


def fetch(url: str, dest: BinaryIO) -> None:
    """Copy a remote file into `dest` through fsspec (s3:// needs `s3fs`, gs:// `gcsfs`)."""
    import fsspec

    with fsspec.open(url, "rb") as src:
        shutil.copyfileobj(src, dest, _CHUNK)


def download(url: str, cache_dir: str | Path | None = None) -> Path:
    """Download `url` into the cache unless it is there already; returns the local path."""
    target = cache_path(url, cache_dir)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Temp file in the same directory, so the rename is atomic and concurrent workers fetching
    # the same URL each publish a complete file (the last rename wins, both are identical).
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as dest:
            fetch(url, dest)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def open_input(path: str | Path, cache_dir: str | Path | None = None) -> io.BufferedReader:
    """Open an input for binary reading: local files directly, remote ones through the cache."""
    path = str(path)
    if is_remote(path):
        return open(download(path, cache_dir), "rb")
    return open(path, "rb")
