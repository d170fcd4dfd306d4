"""URL filter: UT1 adult/spam blocklists plus banned words in the URL, as datatrove 0.10.1 does.

The lists are the ones datatrove's wheel ships in `datatrove/assets/`: the UT1 blocklist
(Université Toulouse 1, `url_filterblacklistsv0_3_0.tar.gz`: ~4.6M domains and ~20k URLs) and
the banned / soft-banned word and subword lists FineWeb used. A document is dropped when, in
this order (datatrove's reasons):

- `domain`: its registered domain (bbc.co.uk) is listed;
- `subdomain`: its full host name (news.bbc.co.uk) is listed (both lower-cased first: host names
  are case-insensitive, datatrove compares them as written);
- `url`: the URL itself is listed (UT1 lists URLs without a scheme, so we also try that form:
  datatrove compares only the raw URL, which never matches a URL that has a scheme);
- `hard_blacklisted`: a banned word is one of the URL's alphanumeric runs;
- `soft_blacklisted`: at least `soft_word_threshold` soft-banned words are;
- `blacklisted_subword`: a banned subword occurs in the URL lower-cased with non-alphanumerics
  removed.

The domain list is held as a sorted array of 64-bit hashes (~37 MB instead of ~500 MB for a set
of strings), read straight from the tarball once per process. tldextract runs offline
(`suffix_list_urls=()`: the public suffix list snapshot bundled with it).
"""

from __future__ import annotations

import functools
import re
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import IO, ClassVar

import numpy as np
import xxhash

from curation.document import Document
from curation.step import Filter

_NON_ALNUM = re.compile(r"[^a-zA-Z0-9]+")


def assets_dir() -> Path:
    """datatrove's bundled assets (the lists), found without importing datatrove's pipeline."""
    import importlib.util

    spec = importlib.util.find_spec("datatrove")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "url_filter needs the blocklists shipped in the datatrove wheel: pip install datatrove"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "assets"


def normalize(text: str) -> str:
    """Lower-case and drop every non-alphanumeric character (datatrove's url_filter.normalize)."""
    return _NON_ALNUM.sub("", text).lower()


def _word_list(lines: Iterable[str], do_normalize: bool = True) -> set[str]:
    """datatrove's parse_list: one entry a line, '#' starts a comment line."""
    out = set()
    for line in lines:
        if not line or line[0] == "#":
            continue
        out.add(normalize(line) if do_normalize else line.strip())
    return out


def _hash(s: str) -> int:
    return xxhash.xxh3_64_intdigest(s.encode("utf-8", "surrogatepass"))


def _hash_lines(f: IO[bytes], block: int = 1 << 23) -> np.ndarray:
    """Sorted uint64 hashes of the non-comment lines of a stream, read in blocks (low peak memory)."""
    parts: list[np.ndarray] = []
    rest = b""
    while True:
        buf = f.read(block)
        data = rest + buf
        if buf:
            cut = data.rfind(b"\n") + 1
            data, rest = data[:cut], data[cut:]
        # Domains hold no spaces: a whitespace split is datatrove's per-line strip minus empty lines.
        lines = data.split()
        if b"#" in data:
            lines = [ln for ln in lines if not ln.startswith(b"#")]
        parts.append(np.fromiter(map(xxhash.xxh3_64_intdigest, lines), dtype=np.uint64, count=len(lines)))
        if not buf:
            break
    hashes = np.concatenate(parts)
    hashes.sort()
    return hashes


@functools.lru_cache(maxsize=2)
def load_blocklists(tar_path: str) -> tuple[np.ndarray, frozenset[str]]:
    """(sorted uint64 hashes of the listed domains, the listed URLs), shared by every instance."""
    with tarfile.open(tar_path, "r:gz") as tar:
        domains_f = tar.extractfile("domains")
        urls_f = tar.extractfile("urls")
        if domains_f is None or urls_f is None:
            raise ValueError(f"{tar_path}: expected 'domains' and 'urls' files in the blocklist archive")
        hashes = _hash_lines(domains_f)
        urls = frozenset(
            _word_list(urls_f.read().decode("utf-8", "replace").splitlines(), do_normalize=False)
        )
    return hashes, urls


def _in_sorted(arr: np.ndarray, value: int) -> bool:
    i = int(np.searchsorted(arr, np.uint64(value)))
    return i < len(arr) and int(arr[i]) == value


class UrlFilter(Filter):
    name: ClassVar[str] = "url_filter"
    decision_params: ClassVar[frozenset[str]] = frozenset({"soft_word_threshold", "missing_url"})

    def __init__(
        self,
        soft_word_threshold: int = 2,  # datatrove / FineWeb: 2 soft-banned words drop a URL
        extra_domains: Iterable[str] | None = None,
        extra_urls: Iterable[str] | None = None,
        banned_words: Iterable[str] | None = None,
        banned_subwords: Iterable[str] | None = None,
        soft_banned_words: Iterable[str] | None = None,
        use_integrated_lists: bool = True,  # the UT1 + word lists shipped with datatrove
        match_url_without_scheme: bool = True,  # see the module docstring (`url`)
        missing_url: str = "keep",  # a document without metadata["url"]: "keep" or "drop" (counted)
    ) -> None:
        super().__init__()
        if missing_url not in ("keep", "drop"):
            raise ValueError(f"missing_url must be 'keep' or 'drop', got {missing_url!r}")
        from tldextract import TLDExtract

        self.soft_word_threshold = soft_word_threshold
        self.match_url_without_scheme = match_url_without_scheme
        self.missing_url = missing_url
        self.extra_domains = frozenset(_word_list(extra_domains or (), do_normalize=False))
        self.extra_urls = frozenset(_word_list(extra_urls or (), do_normalize=False))
        self.banned_words = _word_list(banned_words or ())
        self.banned_subwords = _word_list(banned_subwords or ())
        self.soft_banned_words = _word_list(soft_banned_words or ())
        self.domain_hashes = np.empty(0, dtype=np.uint64)
        self.blocked_urls: frozenset[str] = frozenset()
        if use_integrated_lists:
            assets = assets_dir()
            self.domain_hashes, self.blocked_urls = load_blocklists(
                str(assets / "url_filterblacklistsv0_3_0.tar.gz")
            )
            for attr, fname in (
                ("banned_words", "banned_words.txt"),
                ("banned_subwords", "banned_subwords.txt"),
                ("soft_banned_words", "soft_banned_words.txt"),
            ):
                with open(assets / fname, encoding="utf-8") as f:
                    getattr(self, attr).update(_word_list(f))
        self.banned_words.discard("")
        self.soft_banned_words.discard("")
        self.banned_subwords.discard("")
        # One alternation of the subwords: the regex engine scans the URL once (datatrove uses
        # an Aho-Corasick automaton; only "is there a match" matters).
        subwords = sorted(self.banned_subwords, key=len, reverse=True)
        self._subword_re = re.compile("|".join(map(re.escape, subwords))) if subwords else None
        self._tld = TLDExtract(suffix_list_urls=(), cache_dir=None)

    def _domain_listed(self, domain: str) -> bool:
        if not domain:
            return False
        return domain in self.extra_domains or _in_sorted(self.domain_hashes, _hash(domain))

    def annotate(self, doc: Document) -> None:
        a = doc.attributes
        url = doc.metadata.get("url")
        if not url or not isinstance(url, str):
            a["url.missing"] = 1
            return
        info = self._tld(url)
        registered = getattr(info, "top_domain_under_public_suffix", None)
        if registered is None:  # tldextract < 5.3
            registered = info.registered_domain
        listed = ""
        # Host names are case-insensitive and the lists lower-case (datatrove compares as given,
        # so "BadSite.COM" slipped through).
        if self._domain_listed(registered.lower()):
            listed = "domain"
        elif self._domain_listed(info.fqdn.lower()):
            listed = "subdomain"
        elif url in self.blocked_urls or url in self.extra_urls:
            listed = "url"
        elif self.match_url_without_scheme:
            bare = url.split("://", 1)[-1]
            if bare in self.blocked_urls or bare in self.extra_urls:
                listed = "url"
        a["url.blocklist"] = listed
        words = set(_NON_ALNUM.split(url))
        a["url.banned_words"] = len(self.banned_words.intersection(words))
        a["url.soft_banned_words"] = len(self.soft_banned_words.intersection(words))
        a["url.banned_subword"] = int(bool(self._subword_re and self._subword_re.search(normalize(url))))

    def reject(self, doc: Document) -> str | None:
        a = doc.attributes
        if a.get("url.missing"):
            self.stats.counters["url.missing"] += 1
            return "url.missing" if self.missing_url == "drop" else None
        if a["url.blocklist"]:
            return f"url.{a['url.blocklist']}"
        if a["url.banned_words"]:
            return "url.hard_blacklisted"
        if a["url.soft_banned_words"] >= self.soft_word_threshold:
            return "url.soft_blacklisted"
        if a["url.banned_subword"]:
            return "url.blacklisted_subword"
        return None
