"""The URL filter drops each kind of blocked URL and keeps ordinary ones, without network."""

from __future__ import annotations

import pytest

from curation.document import Document
from curation.filters.url import UrlFilter, normalize


def url_doc(url: str | None) -> Document:
    return Document(id="u", text="", source="test", metadata={} if url is None else {"url": url})


def decide(f: UrlFilter, url: str | None) -> str | None:
    d = url_doc(url)
    f.annotate(d)
    return f.reject(d)


@pytest.fixture(scope="module")
def small() -> UrlFilter:
    """Hand-written lists only: fast, and every rule is visible in the test."""
    return UrlFilter(
        use_integrated_lists=False,
        extra_domains=["badsite.com", "blog.mixed.org"],
        extra_urls=["mixed.org/bad-page"],
        banned_words=["casino"],
        soft_banned_words=["hot", "girls"],
        banned_subwords=["xxxvideo"],
    )


@pytest.fixture(scope="module")
def full() -> UrlFilter:
    """The UT1 blocklists and word lists that ship in datatrove's wheel."""
    return UrlFilter()


def test_keeps_ordinary_url(small: UrlFilter) -> None:
    assert decide(small, "https://www.bbc.co.uk/news/science-environment-123") is None


def test_drops_listed_registered_domain_and_any_host_under_it(small: UrlFilter) -> None:
    assert decide(small, "http://badsite.com/page") == "url.domain"
    assert decide(small, "https://shop.badsite.com/page") == "url.domain"


def test_listed_domain_matches_whatever_the_case_of_the_host(small: UrlFilter) -> None:
    # Host names are case-insensitive; the lists are lower-case.
    assert decide(small, "http://BadSite.COM/page") == "url.domain"
    assert decide(small, "https://Blog.Mixed.org/post/1") == "url.subdomain"


def test_drops_listed_host_but_not_its_siblings(small: UrlFilter) -> None:
    assert decide(small, "https://blog.mixed.org/post/1") == "url.subdomain"
    assert decide(small, "https://www.mixed.org/post/1") is None


def test_drops_listed_url_with_or_without_scheme(small: UrlFilter) -> None:
    assert decide(small, "mixed.org/bad-page") == "url.url"
    assert decide(small, "https://mixed.org/bad-page") == "url.url"
    assert decide(small, "https://mixed.org/good-page") is None


def test_scheme_matching_can_be_turned_off_like_datatrove() -> None:
    f = UrlFilter(
        use_integrated_lists=False, extra_urls=["mixed.org/bad-page"], match_url_without_scheme=False
    )
    assert decide(f, "https://mixed.org/bad-page") is None
    assert decide(f, "mixed.org/bad-page") == "url.url"


def test_drops_banned_word_only_as_a_whole_url_part(small: UrlFilter) -> None:
    assert decide(small, "https://example.com/online-casino/") == "url.hard_blacklisted"
    assert decide(small, "https://example.com/casinorama") is None


def test_drops_two_soft_banned_words_but_not_one(small: UrlFilter) -> None:
    assert decide(small, "https://example.com/hot-girls") == "url.soft_blacklisted"
    assert decide(small, "https://example.com/hot-weather") is None


def test_drops_banned_subword_anywhere_after_normalizing(small: UrlFilter) -> None:
    assert decide(small, "https://example.com/XXX-Video.html") == "url.blacklisted_subword"
    assert normalize("https://Ex-Ample.com/A_b") == "httpsexamplecomab"


def test_scores_are_attributes_and_thresholds_apply_without_rescoring(small: UrlFilter) -> None:
    d = url_doc("https://example.com/hot-girls")
    small.annotate(d)
    assert d.attributes["url.soft_banned_words"] == 2
    relaxed = UrlFilter(use_integrated_lists=False, soft_word_threshold=3)
    assert relaxed.reject(d) is None


def test_missing_url_is_kept_and_counted_by_default(small: UrlFilter) -> None:
    f = UrlFilter(use_integrated_lists=False)
    kept = list(f([url_doc(None)]))
    assert len(kept) == 1 and f.stats.counters["url.missing"] == 1


def test_missing_url_can_be_dropped() -> None:
    f = UrlFilter(use_integrated_lists=False, missing_url="drop")
    assert list(f([url_doc(None)])) == []
    assert f.stats.dropped["url.missing"] == 1
    with pytest.raises(ValueError, match="missing_url"):
        UrlFilter(use_integrated_lists=False, missing_url="maybe")


def test_integrated_ut1_lists_block_real_listed_domain_and_url(full: UrlFilter) -> None:
    listed_url = sorted(full.blocked_urls)[0]
    assert decide(full, listed_url) == "url.url"
    # The first UT1 domain entry (the list is sorted): an adult site.
    assert decide(full, "http://0-1avsex.com/") == "url.domain"
    assert len(full.domain_hashes) > 4_000_000


def test_integrated_word_lists_are_loaded(full: UrlFilter) -> None:
    assert full.banned_words and full.soft_banned_words and full.banned_subwords
    assert decide(full, "https://en.wikipedia.org/wiki/Python_(programming_language)") is None
