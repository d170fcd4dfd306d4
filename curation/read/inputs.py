"""Turn the user's `--input` arguments into a list of archive paths, and open them.

Accepted forms: local paths, directories (their archives, recursively), globs (`data/*.warc.gz`,
`**` allowed), Common Crawl listings (`warc.paths.gz`, `wet.paths.gz`: one path per line,
relative to `https://data.commoncrawl.org/`), and remote URLs (`https://`, `http://`, `s3://`,
any fsspec protocol). Remote files are downloaded once into a local cache (temp name, then
rename, so a killed download never leaves a partial file that a later run would trust) and read
from there. HTTP(S) goes through the standard library; `s3://` needs the `refinery[s3]` extra.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
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
# What a directory contributes: the archives that hold documents (WAT files hold only metadata).
DIRECTORY_SUFFIXES = (".warc", ".warc.gz", ".wet", ".wet.gz", ".arc", ".arc.gz")
_LOCAL_SCHEMES = ("file:", "local:")
_HTTP_SCHEMES = ("http", "https")
# fsspec protocols whose backend ships as a refinery extra.
_EXTRAS = {"s3": "s3", "s3a": "s3"}
_HTTP_TIMEOUT_S = 60
_CHUNK = 1 << 20


class MissingBackend(ValueError):
    """A remote input whose protocol needs a package that is not installed."""


class InputUnavailable(FileNotFoundError):
    """A remote input that could not be fetched (an HTTP error status, a network failure). A
    FileNotFoundError like a missing local file, so callers and the CLI treat both alike."""


class LocalPathInListing(ValueError):
    """A listing line that names a file on this machine."""


def is_remote(path: str) -> bool:
    """True for URLs (`https://`, `s3://`, `file://`, ...); plain and relative paths are local."""
    return "://" in path


def is_listing(path: str) -> bool:
    """Common Crawl path listings: `warc.paths.gz`, `wet.paths.gz`, also uncompressed `.paths`."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return name.endswith(".paths.gz") or name.endswith(".paths")


def expand_inputs(patterns: list[str], cache_dir: str | Path | None = None,
                  allow_local_in_listings: bool = False,
                  files_in: Callable[[str], list[str]] | None = None) -> list[str]:
    """Expand paths, directories, globs, listings and URLs into archive paths, in order, once each.

    Local paths come back absolute with symlinks resolved, so Ray workers with another working
    directory find them and one file reached twice (a symlink and a `**` glob) is read once. A
    glob, path or directory that yields no archive is an error (a typo should not yield an empty
    corpus); a listing is read (downloaded first if remote) and each line becomes a URL. Listing
    lines naming local files are refused unless `allow_local_in_listings` (see `read_listing`).
    Every remote URL's protocol is checked up front, so a missing backend fails here, once.
    `files_in(directory)` says what a directory holds for the reader in use (a corpus's document
    files, a dataset's Arrow files; see `curation.read.base.Reader.files_in`); by default its web
    archives.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    out: list[str] = []
    seen: set[str] = set()

    def add(p: str) -> None:
        if is_remote(p):
            check_backend(p)
        if p not in seen:
            seen.add(p)
            out.append(p)

    for pattern in patterns:
        for path in _expand_one(str(pattern), files_in):
            if is_listing(path):
                for url in read_listing(path, cache_dir, allow_local=allow_local_in_listings):
                    add(url)
            else:
                add(path)
    return out


def _expand_one(pattern: str, files_in: Callable[[str], list[str]] | None = None) -> list[str]:
    if is_remote(pattern):
        return [pattern]
    expanded = os.path.expanduser(pattern)
    if _GLOB_CHARS.intersection(expanded):
        matches = [os.path.realpath(m) for m in sorted(glob.glob(expanded, recursive=True)) if os.path.isfile(m)]
        if not matches:
            raise FileNotFoundError(f"input pattern matched no files: {pattern!r}")
        return matches
    if os.path.isdir(expanded):
        if files_in is not None:
            return [os.path.realpath(p) for p in files_in(expanded)]
        return archives_in(expanded, pattern)
    if not os.path.isfile(expanded):
        raise FileNotFoundError(f"input file not found: {pattern!r}")
    return [os.path.realpath(expanded)]


def archives_in(directory: str, pattern: str) -> list[str]:
    """The archives under `directory`, recursively, sorted by path."""
    found = sorted(
        os.path.join(root, name)
        for root, _, names in os.walk(directory)
        for name in names
        if name.endswith(DIRECTORY_SUFFIXES)
    )
    if not found:
        raise FileNotFoundError(
            f"input directory {pattern!r} holds no web archives (looked for {', '.join(DIRECTORY_SUFFIXES)} "
            "in it and its subdirectories)"
        )
    return [os.path.realpath(p) for p in found]


def read_listing(path: str, cache_dir: str | Path | None = None, allow_local: bool = False) -> list[str]:
    """Lines of a Common Crawl listing as URLs; lines that are already URLs are kept as they are.

    Every line must name a web archive (`ARCHIVE_SUFFIXES`), else ValueError with the line.
    Relative lines are Common Crawl paths. A line naming a local file (`file://`, or an absolute
    path) is refused with LocalPathInListing unless `allow_local`: a listing fetched from
    elsewhere must not be able to pull this machine's files into the corpus.
    """
    with open_input(path, cache_dir) as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    urls = []
    for lineno, line in enumerate(data.decode("utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not line.endswith(ARCHIVE_SUFFIXES):
            raise ValueError(f"{path}: line {lineno} is not a WARC/WET/ARC path: {line[:120]!r}")
        local = _local_path(line)
        if local is None:
            urls.append(line if is_remote(line) else COMMONCRAWL_PREFIX + line)
            continue
        if not allow_local:
            raise LocalPathInListing(
                f"{path}: line {lineno} names a local file ({line[:120]!r}); listings may only name remote "
                "archives. Pass local files as inputs, or set `read.allow_local_in_listings: true` to allow it"
            )
        if not os.path.isfile(local):
            raise FileNotFoundError(f"{path}: line {lineno} names a local file that does not exist: {line[:120]!r}")
        urls.append(os.path.realpath(local))
    return urls


def _local_path(line: str) -> str | None:
    """The local path a listing line names (`file://`, `local://`, chained `x::file://`, `/abs`,
    `~/x`), or None for a remote URL or a relative Common Crawl path."""
    for part in line.split("::"):
        if part.lower().startswith(_LOCAL_SCHEMES):
            return urllib.request.url2pathname(part.split(":", 1)[1].removeprefix("//"))
    if is_remote(line):
        return None
    if line.startswith(("/", "~", "\\")):
        return os.path.expanduser(line)
    return None


def check_backend(url: str) -> None:
    """Raise MissingBackend (saying what to install) if `url`'s protocol cannot be read here."""
    protocol = url.split("://", 1)[0].split("::")[-1].lower()
    if protocol in _HTTP_SCHEMES or f"{protocol}:" in _LOCAL_SCHEMES:
        return
    import fsspec

    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as e:
        extra = _EXTRAS.get(protocol)
        hint = f"pip install 'refinery[{extra}]'" if extra else str(e)
        raise MissingBackend(f"reading {protocol}:// inputs needs a package that is not installed: {hint} "
                             f"(input {url})") from None
    except ValueError:
        raise MissingBackend(f"unknown protocol {protocol}:// in input {url}") from None


def cache_path(url: str, cache_dir: str | Path | None = None) -> Path:
    """Where a remote file lands in the cache: a hash of the full URL keeps equal basenames apart."""
    root = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    digest = hashlib.sha1(url.encode("utf-8")).hexdigest()[:16]
    name = url.rstrip("/").rsplit("/", 1)[-1] or "index"
    return root / f"{digest}-{name}"


def fetch(url: str, dest: BinaryIO) -> None:
    """Copy a remote file into `dest`: HTTP(S) with the standard library, the rest via fsspec."""
    if url.split("://", 1)[0].lower() in _HTTP_SCHEMES:
        _fetch_http(url, dest)
        return
    check_backend(url)
    import fsspec

    with fsspec.open(url, "rb") as src:
        shutil.copyfileobj(src, dest, _CHUNK)


def _fetch_http(url: str, dest: BinaryIO) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": "refinery (+https://commoncrawl.org/)"})
    try:
        with urllib.request.urlopen(request, timeout=_HTTP_TIMEOUT_S) as response:
            expected = response.headers.get("Content-Length")
            copied = 0
            while chunk := response.read(_CHUNK):
                dest.write(chunk)
                copied += len(chunk)
    except urllib.error.HTTPError as e:
        raise InputUnavailable(f"{url} is unavailable: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise InputUnavailable(f"{url} is unavailable: {reason}") from None
    if expected is not None and expected.isdigit() and copied != int(expected):
        raise InputUnavailable(f"{url} is unavailable: connection closed after {copied} of {expected} bytes")


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
