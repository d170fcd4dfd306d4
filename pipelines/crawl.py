"""A Common Crawl crawl named on the command line (`--input CC-MAIN-2024-22`): its `warc.paths.gz`
listing and its first N WARC files, downloaded with a progress bar into the local input cache that
curation reads remote inputs through (`curation.read.inputs.cache_path`, ~/.cache/refinery/inputs),
so a second run downloads nothing. Offline, the first download fails with an error saying so.
"""

from __future__ import annotations

import gzip
import os
import re
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from curation.read.inputs import cache_path

CRAWL_NAME = re.compile(r"^CC-MAIN-\d{4}-\d{2}$")
BASE_URL = "https://data.commoncrawl.org/"
TIMEOUT_S = 60
_CHUNK = 1 << 20


class CrawlUnavailable(ValueError):
    """A crawl's listing or WARC could not be downloaded; the message says what to do instead."""


def is_crawl_name(item: str) -> bool:
    return bool(CRAWL_NAME.match(item))


def listing_url(crawl: str) -> str:
    return f"{BASE_URL}crawl-data/{crawl}/warc.paths.gz"


def fetch_crawl(crawl: str, n: int, cache_dir: str | Path | None = None, progress: bool = True) -> list[Path]:
    """The local paths of the first `n` WARC files of `crawl`, downloaded unless cached."""
    if not is_crawl_name(crawl):
        raise CrawlUnavailable(f"{crawl!r} is not a Common Crawl crawl name like CC-MAIN-2024-22")
    if n < 1:
        raise CrawlUnavailable(f"input.crawl_warcs must be >= 1, got {n}")
    listing = download(listing_url(crawl), cache_dir, progress, crawl)
    with gzip.open(listing, "rt", encoding="utf-8") as f:
        paths = [line.strip() for _, line in zip(range(n), f, strict=False) if line.strip()]
    if not paths:
        raise CrawlUnavailable(f"the listing of {crawl} ({listing_url(crawl)}) names no WARC files")
    return [download(BASE_URL + p, cache_dir, progress, crawl) for p in paths]


def download(url: str, cache_dir: str | Path | None, progress: bool, crawl: str) -> Path:
    """`url` into the cache (temp name, then rename: a killed download leaves nothing a rerun trusts)."""
    from tqdm import tqdm

    target = cache_path(url, cache_dir)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    request = urllib.request.Request(url, headers={"User-Agent": "refinery (+https://commoncrawl.org/)"})
    try:
        with os.fdopen(fd, "wb") as dest, urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            size = response.headers.get("Content-Length")
            with tqdm(total=int(size) if size and size.isdigit() else None, unit="B", unit_scale=True,
                      desc=url.rsplit("/", 1)[-1][:40], disable=not progress, file=sys.stderr) as bar:
                while chunk := response.read(_CHUNK):
                    dest.write(chunk)
                    bar.update(len(chunk))
        os.replace(tmp, target)
    except (urllib.error.URLError, OSError) as e:
        Path(tmp).unlink(missing_ok=True)
        reason = getattr(e, "reason", None) or e
        raise CrawlUnavailable(f"cannot download {url} ({reason}): fetching crawl {crawl} needs internet access to "
                               f"{BASE_URL}; offline, pass local WARC files with --input PATH instead") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
