"""PII detection and masking: emails, phone numbers, IP addresses, credit cards, IBANs.

Two engines (tests/test_pii.py scores both on a labelled fixture and compares them on real text):

* `presidio` — the reference: presidio-analyzer's own pattern recognizers in an `AnalyzerEngine`
  with its `NoOpNlpEngine` (no spaCy model, nothing downloaded). About 0.2-0.3M chars/s here.
* `fast` — the hot path (~40x faster), built from the same patterns and validators but arranged
  so that almost no text pays for them: cheap gates (`"@" in text`, one scan for runs of 4+
  digits, one for IPv6-like colons, one for IBAN-like prefixes) pick a few candidates, and only
  those run the full pattern and its check (Luhn, ISO 7064 mod-97, `ipaddress`, the public-suffix
  list). Emails, IPs, cards and IBANs come out as presidio's. Phones are validated by
  `phonenumbers.PhoneNumberMatcher`, the call presidio makes, but only on digit runs that look
  like a written phone number (see `_PHONE_SHAPE_RE`), in a small window, once per distinct
  region: presidio's extra "phones" on web text are years, page ranges, dates, coordinates and
  ISBNs, which we leave alone.

Masking replaces each span with `placeholder.format(kind=...)` (Dolma's `|||EMAIL_ADDRESS|||`
style); a document with more than `max_matches` spans is dropped as `pii.too_many` (Dolma's
PII rule drops documents with more than 5 matches).
"""

from __future__ import annotations

import bisect
import ipaddress
import logging
import re
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any, ClassVar, NamedTuple, Protocol

from curation.document import Document
from curation.step import Mapper

log = logging.getLogger(__name__)

EMAIL = "EMAIL_ADDRESS"
PHONE = "PHONE_NUMBER"
IP = "IP_ADDRESS"
CARD = "CREDIT_CARD"
IBAN = "IBAN_CODE"
KINDS: tuple[str, ...] = (EMAIL, PHONE, IP, CARD, IBAN)
# On equal spans a kind checked by a checksum or strict syntax beats the looser phone match.
_PRIORITY: tuple[str, ...] = (EMAIL, IBAN, CARD, IP, PHONE)
# Attribute names (`pii.<short>`), one column per kind in the written corpus.
SHORT = {EMAIL: "email", PHONE: "phone", IP: "ip", CARD: "credit_card", IBAN: "iban"}
# presidio PhoneRecognizer.DEFAULT_SUPPORTED_REGIONS.
PHONE_REGIONS: tuple[str, ...] = ("US", "GB", "DE", "FR", "IL", "IN", "CA", "BR")


class Span(NamedTuple):
    start: int
    end: int
    kind: str


class Detector(Protocol):
    kinds: tuple[str, ...]

    def detect(self, text: str) -> list[Span]: ...


def resolve_overlaps(spans: Iterable[Span]) -> list[Span]:
    """Non-overlapping spans in text order: the longest wins, then the kind with a checksum.

    Both engines go through this, so a number that is both a phone and a card counts once.
    """
    prio = {k: i for i, k in enumerate(_PRIORITY)}
    ranked = sorted(set(spans), key=lambda s: (-(s.end - s.start), prio.get(s.kind, len(prio)), s.start))
    taken: list[Span] = []  # kept sorted by start; a bisect finds the neighbours to check
    for s in ranked:
        i = bisect.bisect_right(taken, s.start, key=lambda t: t.start)
        if (i == 0 or taken[i - 1].end <= s.start) and (i == len(taken) or s.end <= taken[i].start):
            taken.insert(i, s)
    return taken


# --- validators (shared with nothing: the fast engine must not import presidio, ~5 s of spaCy) -----


def luhn_ok(digits: str) -> bool:
    """Luhn (ISO/IEC 7812-1) check over a string of digits (any script: `int` reads them all)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


# IBAN length per country, from the SWIFT IBAN registry (ISO 13616), the countries presidio's
# `iban_patterns.regex_per_country` knows.
IBAN_LENGTHS: dict[str, int] = {
    "AL": 28, "AD": 24, "AT": 20, "AZ": 28, "BH": 22, "BY": 28, "BE": 16, "BA": 20, "BR": 29,
    "BG": 22, "CR": 22, "HR": 21, "CY": 28, "CZ": 24, "DK": 18, "DO": 28, "TL": 23, "EE": 20,
    "FO": 18, "FI": 18, "FR": 27, "GE": 22, "DE": 22, "GI": 23, "GR": 27, "GL": 18, "GT": 28,
    "HU": 28, "IS": 26, "IQ": 23, "IE": 22, "IL": 23, "IT": 27, "JO": 30, "KZ": 20, "XK": 20,
    "KW": 30, "LV": 21, "LB": 28, "LI": 21, "LT": 20, "LU": 20, "MK": 19, "MT": 31, "MR": 27,
    "MU": 30, "MD": 24, "MC": 27, "ME": 22, "NL": 18, "NO": 15, "PK": 24, "PS": 29, "PL": 28,
    "PT": 25, "QA": 29, "RO": 24, "SM": 27, "LC": 32, "ST": 25, "SA": 24, "RS": 22, "SC": 31,
    "SK": 24, "SI": 19, "ES": 24, "SE": 24, "CH": 21, "TN": 24, "TR": 26, "UA": 29, "AE": 23,
    "GB": 22, "VG": 24, "EG": 29, "LY": 25, "SD": 18, "SV": 28, "VA": 22,
}  # fmt: skip


def iban_ok(compact: str) -> bool:
    """Known country, its exact length, alphanumeric BBAN, and ISO 7064 mod 97-10 == 1."""
    if IBAN_LENGTHS.get(compact[:2]) != len(compact) or not compact[2:4].isdigit():
        return False
    rearranged = compact[4:] + compact[:4]
    if not rearranged.isalnum() or not rearranged.isascii():
        return False
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def ip_ok(candidate: str) -> bool:
    try:
        ipaddress.ip_interface(candidate)
    except ValueError:
        return False
    return True


@lru_cache(maxsize=1)
def _tld_extractor() -> Any:
    import tldextract

    # The bundled public-suffix snapshot only: the default extractor fetches the list over the
    # network on first use (suffix_list_urls=()) and caches it under ~/.cache (cache_dir=None).
    return tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)


def email_domain_ok(candidate: str) -> bool:
    """presidio's EmailRecognizer check: the address ends in a known public suffix."""
    return _tld_extractor()(candidate).fqdn != ""


# --- patterns (presidio-analyzer 2.2's, kept verbatim so the engines agree) ----------------------

# EmailRecognizer.
_EMAIL_RE = re.compile(
    r"\b((([!#$%&'*+\-/=?^_`{|}~\w])|([!#$%&'*+\-/=?^_`{|}~\w][!#$%&'*+\-/=?^_`{|}~\.\w]{0,}"
    r"[!#$%&'*+\-/=?^_`{|}~\w]))[@]\w+(?:-+\w+)*(?:\.\w+(?:-+\w+)*)+)\b",
    re.IGNORECASE,
)
# CreditCardRecognizer ("All Credit Cards (weak)"), then Luhn.
_CARD_RE = re.compile(
    r"\b(?!1\d{12}(?!\d))((4\d{3})|(5[0-5]\d{2})|(6\d{3})|(1\d{3})|(3\d{3}))[- ]?(\d{3,4})[- ]?(\d{3,4})"
    r"[- ]?(\d{3,5})\b"
)
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?)"
_V4 = rf"(?:{_OCTET}\.){{3}}{_OCTET}"
_P6 = r"(?:/(?:12[0-8]|1[01]\d|[1-9]?\d))?"
_H = r"[0-9A-Fa-f]{1,4}"
# IpRecognizer: IPv4, IPv4-mapped, IPv4-embedded, IPv6, unspecified "::"; then ip_interface().
_IPV4_RE = re.compile(rf"\b{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}(?:/(?:[0-2]?\d|3[0-2]))?\b")
_IPV6_RES = (
    re.compile(rf"(?<![\w:])::(?:ffff(?::0{{1,4}})?:)?{_V4}{_P6}\b", re.IGNORECASE),
    re.compile(rf"(?<![\w:])(?:(?:{_H}:){{1,5}}:(?:{_H}:){{0,4}}|(?:{_H}:){{6}}){_V4}{_P6}\b", re.IGNORECASE),
    re.compile(
        rf"(?<![\w:])(?:(?:{_H}:){{7}}{_H}|(?:{_H}:){{1,7}}:|:(?::{_H}){{1,7}}|(?:{_H}:){{1,6}}:{_H}"
        rf"|(?:{_H}:){{1,5}}(?::{_H}){{1,2}}|(?:{_H}:){{1,4}}(?::{_H}){{1,3}}|(?:{_H}:){{1,3}}(?::{_H}){{1,4}}"
        rf"|(?:{_H}:){{1,2}}(?::{_H}){{1,5}}|{_H}:(?::{_H}){{1,6}}|:(?::{_H}){{1,6}})"
        rf"(?:%[0-9a-zA-Z]+)?{_P6}(?![\w:]|\.\d)",
        re.IGNORECASE,
    ),
    re.compile(rf"(?<![\w:])::{_P6}(?![\w:])", re.IGNORECASE),
)
# IbanRecognizer "IBAN Generic": three groups so a failed check can retry a shorter span.
_IBAN_RE = re.compile(
    r"(?<![A-Z0-9])([A-Z]{2}[0-9]{2}(?:[ -]?[A-Z0-9]{4}){2,6})((?:[ -]?[A-Z0-9]{4})?)((?:[ -]?[A-Z0-9]{1,3})?)"
    r"(?![A-Z0-9])"
)

# Gates of the fast engine. Every match of the patterns above lies inside one of these.
# A run of 4+ digits joined by phone punctuation (phonenumbers' _VALID_PUNCTUATION); 4 digits is
# the least any kind needs (IPv4 "1.2.3.4"). Leading "+" / "(" are added back in code: a regex
# that starts with a digit scans 3x faster than one with an optional lead group.
_PHONE_PUNCT = (
    "-x\u2010\u2011\u2012\u2013\u2014\u2015\u2212\u30fc\uff0d\uff0e\uff0f \u00a0\u00ad\u200b\u2060\u3000"
    "()\uff08\uff09\uff3b\uff3d.[]/~\u2053\u223c\uff5e"
)
_RUN_RE = re.compile(rf"\d(?:[{re.escape(_PHONE_PUNCT)}+\uff0b]*\d){{3,}}")
_LEAD_CHARS = frozenset("+\uff0b([\uff08\uff3b")
_RUN_PREFIX_CHARS = frozenset(_PHONE_PUNCT + "+\uff0b")
# Two colons with at most 4 hex digits between: every IPv6 form has one ("::" or "a:b:").
_IPV6_HINT_RE = re.compile(r":[0-9A-Fa-f]{0,4}:")
_IPV6_CHARS = frozenset("0123456789abcdefABCDEF:.%/")
# Two capitals then two digits; spelt out, this scans 4x faster than with presidio's lookbehind.
_IBAN_HINT_RE = re.compile(r"[A-Z][A-Z][0-9][0-9]")
# The shapes people write phone numbers in. Only digit runs with one of them go to
# `phonenumbers` (about 90 us per parse, 7 regions): an international prefix (+49, 0049), a
# trunk-prefixed national number (030 1234567, 01 23 45 67 89, 020 7946 0958, 03-1234567),
# an area code in brackets ((212) 555-0123, (11) 91234-5678), NANP 3-3-4 (212.555.0123,
# 2125550123) and grouped mobiles (98765 43210, 11 91234-5678).
_SEP = r"[ \u00a0.\-/]"
_PHONE_SHAPE_RE = re.compile(
    r"(?:^|(?<=[ \u00a0(\[]))(?:\+|00)[ \u00a0]?[1-9]"
    rf"|(?:^|(?<=[ \u00a0(\[]))\(?0[1-9]\d{{0,4}}\)?{_SEP}?\d{{2,}}"
    r"|\(\d{2,5}\)[ \u00a0\-]?\d{3,}"
    rf"|(?<!\d)(?:1{_SEP}?)?(?:\(\d{{3}}\)|\d{{3}}){_SEP}?\d{{3}}{_SEP}?\d{{4}}(?!\d)"
    r"|(?<!\d)[6-9]\d{4}[ \u00a0]\d{5}(?!\d)"
    r"|(?<!\d)\d{2}[ \u00a0]9?\d{4}-\d{4}(?!\d)"
)
_MAX_PHONE_CHARS = 40
_PHONE_CACHE_SIZE = 100_000
# Calendar dates (optionally with the hour of a time stamp): `phonenumbers` accepts some
# ("05.05.2010" is a valid Israeli number to it) and presidio flags them; we do not.
_DATE_RE = re.compile(
    r"\(?(?:\d{1,2}[./-]\d{1,2}[./-](?:\d{2}|\d{4})|\d{4}[./-]\d{1,2}[./-]\d{1,2})\)?(?:[ \u00a0]+\d{1,2})?"
)


def _lead_start(text: str, s: int) -> int:
    """Move a run's start back over "+", "(" or "[" (and the punctuation after them): "(030) 12"."""
    start = j = s
    while j > 0 and s - j < 8 and text[j - 1] in _RUN_PREFIX_CHARS:
        j -= 1
        if text[j] in _LEAD_CHARS:
            start = j
    return start


def _distinct_parsing_regions(regions: Sequence[str]) -> tuple[str, ...]:
    """Drop regions that parse and validate exactly like an earlier one (CA after US: NANPA).

    `phonenumbers` parses a national number with the default region's country code and prefixes,
    then validates it against every region of that country code, so two regions with the same
    code and prefix rules find the same numbers (checked on 3,951 real digit runs: identical).
    """
    import phonenumbers

    seen: set[tuple[Any, ...]] = set()
    out = []
    for r in regions:
        md = phonenumbers.PhoneMetadata.metadata_for_region(r)
        if md is None:
            raise ValueError(f"unknown phone region {r!r}")
        key = (
            md.country_code,
            md.international_prefix,
            md.national_prefix_for_parsing,
            md.national_prefix_transform_rule,
        )
        if key not in seen:
            seen.add(key)
            out.append(r)
    return tuple(out)


class FastDetector:
    """Gated regexes plus checksums: presidio's recall on the fixture at ~40x its speed."""

    def __init__(
        self,
        kinds: Sequence[str] = KINDS,
        phone_regions: Sequence[str] = PHONE_REGIONS,
        # presidio's PhoneRecognizer default leniency (1 = phonenumbers Leniency.VALID).
        phone_leniency: int = 1,
        # Digit runs with fewer digits are not tried as phone numbers: 7 is the shortest valid
        # national number among the default regions (GB, IL, CA); below it presidio's hits on
        # web text are years and counts ("1648", "16-46").
        min_phone_digits: int = 7,
    ) -> None:
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown PII kinds {sorted(unknown)}; known: {KINDS}")
        self.kinds = tuple(kinds)
        self.phone_regions = tuple(phone_regions)
        self.phone_leniency = phone_leniency
        if min_phone_digits < 4:
            raise ValueError(f"min_phone_digits must be >= 4 (digit runs start at 4), got {min_phone_digits}")
        self.min_phone_digits = min_phone_digits
        self._match_regions = _distinct_parsing_regions(self.phone_regions)
        self._phone_cache: dict[str, list[tuple[int, int]]] = {}

    def detect(self, text: str) -> list[Span]:
        kinds = self.kinds
        spans: list[Span] = []
        if EMAIL in kinds and "@" in text:
            spans += self._emails(text)
        want_digits = PHONE in kinds or IP in kinds or CARD in kinds
        if want_digits:
            spans += self._digit_runs(text)
        if IP in kinds and ":" in text:
            spans += self._ipv6(text)
        if IBAN in kinds:
            spans += self._ibans(text)
        return resolve_overlaps(spans)

    def _emails(self, text: str) -> list[Span]:
        out = []
        end = 0
        find = text.find
        at = find("@")
        while at >= 0:
            # Scan a window around each "@" (a local part is at most 64 chars, a domain 255), so a
            # long run of word characters elsewhere never costs a quadratic scan.
            lo = max(end, at - 256)
            for m in _EMAIL_RE.finditer(text, lo, min(len(text), at + 256)):
                if m.start() <= at < m.end():
                    if email_domain_ok(m.group()):
                        out.append(Span(m.start(), m.end(), EMAIL))
                    end = m.end()
                    break
            at = find("@", max(at + 1, end))
        return out

    def _digit_runs(self, text: str) -> list[Span]:
        out: list[Span] = []
        kinds = self.kinds
        n = len(text)
        for m in _RUN_RE.finditer(text):
            s, e = m.span()
            s = _lead_start(text, s)
            if e - s < 7:  # shorter than "1.2.3.4": no IPv4, card (12+) or phone (7+ digits)
                continue
            run = text[s:e]
            lo, hi = max(0, s - 1), min(n, e + 1)
            if IP in kinds and run.count(".") >= 3:
                out += [
                    Span(x.start(), x.end(), IP) for x in _IPV4_RE.finditer(text, lo, hi) if ip_ok(x.group())
                ]
            ndigits = sum(map(str.isdigit, run))
            if CARD in kinds and ndigits >= 12:
                for x in _CARD_RE.finditer(text, lo, hi):
                    digits = x.group().replace("-", "").replace(" ", "")
                    if luhn_ok(digits):
                        out.append(Span(x.start(), x.end(), CARD))
            if PHONE in kinds and ndigits >= self.min_phone_digits and not _DATE_RE.fullmatch(run):
                out += self._phones(text, s, run)
        return out

    def _phones(self, text: str, s: int, run: str) -> list[Span]:
        """Phone numbers in the digit run `run` at `text[s:]`, via phonenumbers on small windows."""
        out: list[Span] = []
        done = s  # text before this offset is inside a phone already found
        for m in _PHONE_SHAPE_RE.finditer(run):
            a = s + m.start()
            if a < done:
                continue
            # The matcher's candidates start where the run starts, and it looks at one character
            # before (a latin letter there rejects it) and at ":dd" after (a time stamp): a window
            # from 1 before the run to 3 after decides as the whole text would. It stops 40
            # characters past the shape (longer than any written number), so a long table of
            # figures costs no more than a phone number.
            lo = max(0, (s if a - s < _MAX_PHONE_CHARS else a) - 1)
            window = text[lo : min(s + len(run), a + _MAX_PHONE_CHARS) + 3]
            found = self._phone_cache.get(window)
            if found is None:
                found = self._match_phones(window)
                if len(self._phone_cache) >= _PHONE_CACHE_SIZE:
                    self._phone_cache.clear()
                self._phone_cache[window] = found
            for x, y in found:
                if lo + x >= done:
                    out.append(Span(lo + x, lo + y, PHONE))
                    done = lo + y
        return out

    def _match_phones(self, window: str) -> list[tuple[int, int]]:
        import phonenumbers

        spans: set[tuple[int, int]] = set()
        for region in self._match_regions:
            for m in phonenumbers.PhoneNumberMatcher(window, region, leniency=self.phone_leniency):
                spans.add((m.start, m.end))
        return sorted(spans)

    def _ipv6(self, text: str) -> list[Span]:
        out: set[Span] = set()
        n = len(text)
        done = 0
        for h in _IPV6_HINT_RE.finditer(text):
            if h.start() < done:
                continue
            # The hex/colon/dot run around the hint (plus zone id and prefix length), and one
            # character beyond it for the patterns' lookahead.
            lo = h.start()
            while lo > 0 and text[lo - 1] in _IPV6_CHARS:
                lo -= 1
            hi = h.end()
            while hi < n and (text[hi] in _IPV6_CHARS or text[hi].isalnum()):
                hi += 1
            done = hi
            hi = min(n, hi + 1)
            for rx in _IPV6_RES:
                out.update(
                    Span(m.start(), m.end(), IP) for m in rx.finditer(text, lo, hi) if ip_ok(m.group())
                )
        return list(out)

    def _ibans(self, text: str) -> list[Span]:
        out = []
        match = _IBAN_RE.match
        for h in _IBAN_HINT_RE.finditer(text):
            m = match(text, h.start())
            if m is None or (out and m.start() < out[-1].end):
                continue
            start = m.start()
            # presidio's fallback: the whole match, then without the 1-3 char tail, then without
            # the last 4-char group.
            for g in (3, 2, 1):
                end = m.end(g) if m.end(g) > 0 else m.end()
                cand = text[start:end]
                if cand and iban_ok(cand.replace(" ", "").replace("-", "")):
                    out.append(Span(start, end, IBAN))
                    break
        return out

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_phone_cache"] = {}
        return state


class PresidioDetector:
    """presidio-analyzer's recognizers in its own engine, offline: the reference for `FastDetector`."""

    def __init__(self, kinds: Sequence[str] = KINDS, phone_regions: Sequence[str] = PHONE_REGIONS) -> None:
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown PII kinds {sorted(unknown)}; known: {KINDS}")
        self.kinds = tuple(kinds)
        self.phone_regions = tuple(phone_regions)
        self._engine: Any = None

    @property
    def engine(self) -> Any:
        if self._engine is None:
            self._engine = build_presidio_engine(self.phone_regions)
        return self._engine

    def detect(self, text: str) -> list[Span]:
        results = self.engine.analyze(text=text, language="en", entities=list(self.kinds))
        return resolve_overlaps(Span(r.start, r.end, r.entity_type) for r in results)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_engine"] = None
        return state


def build_presidio_engine(phone_regions: Sequence[str] = PHONE_REGIONS) -> Any:
    """An `AnalyzerEngine` with the five pattern recognizers and no NLP model (no download)."""
    try:
        from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
        from presidio_analyzer.nlp_engine import NoOpNlpEngine
        from presidio_analyzer.predefined_recognizers import (
            CreditCardRecognizer,
            EmailRecognizer,
            IbanRecognizer,
            IpRecognizer,
            PhoneRecognizer,
        )
    except ImportError as e:
        raise ImportError("engine='presidio' needs presidio-analyzer>=2.2 (a project dependency)") from e

    class OfflineEmailRecognizer(EmailRecognizer):
        # EmailRecognizer calls tldextract.extract, whose default fetches the suffix list online.
        def validate_result(self, pattern_text: str) -> bool:
            return email_domain_ok(pattern_text)

    recognizers = [
        OfflineEmailRecognizer(),
        PhoneRecognizer(supported_regions=tuple(phone_regions)),
        IpRecognizer(),
        CreditCardRecognizer(),
        IbanRecognizer(),
    ]
    registry = RecognizerRegistry(recognizers=recognizers, supported_languages=["en"])
    nlp = NoOpNlpEngine(models=[{"lang_code": "en", "model_name": "none"}])
    return AnalyzerEngine(registry=registry, nlp_engine=nlp, supported_languages=["en"])


def mask(text: str, spans: Sequence[Span], placeholder: str) -> str:
    """Replace non-overlapping, sorted spans with `placeholder.format(kind=...)`."""
    parts = []
    pos = 0
    for s in spans:
        parts.append(text[pos : s.start])
        parts.append(placeholder.format(kind=s.kind))
        pos = s.end
    parts.append(text[pos:])
    return "".join(parts)


class PiiMasker(Mapper):
    """Count PII per kind into `pii.<kind>` attributes, mask the spans, drop documents with too many.

    Attributes: `pii.email`, `pii.phone`, `pii.ip`, `pii.credit_card`, `pii.iban` (for the kinds
    asked for) and `pii.total`. Drop reason: `pii.too_many` when `pii.total > max_matches`.
    Counter `pii.replaced`: spans masked in kept documents.
    """

    name: ClassVar[str] = "pii"

    def __init__(
        self,
        kinds: Sequence[str] = KINDS,
        # Dolma's PII rule: documents with more than 5 PII matches are removed, the rest masked.
        max_matches: int = 5,
        placeholder: str = "|||{kind}|||",
        engine: str = "fast",
        phone_regions: Sequence[str] = PHONE_REGIONS,
    ) -> None:
        super().__init__()
        if engine == "fast":
            self.detector: Detector = FastDetector(kinds, phone_regions)
        elif engine == "presidio":
            self.detector = PresidioDetector(kinds, phone_regions)
        else:
            raise ValueError(f"engine must be 'fast' or 'presidio', got {engine!r}")
        if max_matches < 0:
            raise ValueError(f"max_matches must be >= 0, got {max_matches}")
        try:
            placeholder.format(kind=EMAIL)  # a bad template fails here, not mid-run
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"placeholder must be a str.format template using only {{kind}}: {e!r}") from e
        self.kinds = tuple(kinds)
        self.max_matches = max_matches
        self.placeholder = placeholder
        self.engine = engine

    def apply(self, doc: Document) -> Document | str | None:
        text = doc.text
        if not isinstance(text, str):
            self.stats.error("pii.bad_text", id=doc.id, type=type(text).__name__)
            log.warning("pii: document %s has %s text, not str; passed on unmasked", doc.id, type(text).__name__)
            return doc
        spans = self.detector.detect(text)
        counts = dict.fromkeys(self.kinds, 0)
        for s in spans:
            counts[s.kind] += 1
        for kind, c in counts.items():
            doc.attributes[f"pii.{SHORT[kind]}"] = c
        doc.attributes["pii.total"] = len(spans)
        if len(spans) > self.max_matches:
            return "pii.too_many"
        if spans:
            doc.text = mask(text, spans, self.placeholder)
            self.stats.counters["pii.replaced"] += len(spans)
        return doc

