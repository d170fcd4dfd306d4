"""Fast text statistics shared by the heuristic filters: words, lines and n-gram repetition.

Several filters read the same word list, so it is computed once per text and kept in a small
cache keyed by the text itself (an edited text is a new key, so a stale entry is never read),
not in `doc.attributes`, which are written to disk.

Words. datatrove 0.10.1 splits English with spaCy's blank "en" tokenizer (`split_into_words`)
and drops whitespace tokens. We match that tokenizer rather than a plain `\\w+` split because
the Gopher rules are sensitive to it: the alphabetic-word ratio counts every punctuation token
in its denominator (typical English prose sits near 0.85 against a 0.8 threshold), so "don't",
"U.S.", "well-known", "3.5" and URLs must come out as spaCy cuts them. spaCy's algorithm is
per whitespace-separated chunk: match special cases (abbreviations, contractions), otherwise
peel prefixes and suffixes one at a time, keep what is left whole if it is a URL, else split
its infixes. `_split_chunk` reproduces those rules (the English prefix / suffix / infix lists
and exceptions; simplified: a few emoticons only, no special-case matching across tokens, all
Unicode letters where spaCy lists scripts); 0.04% of the whitespace chunks of our web text
split differently. Chunks repeat, so each is split once and memoised (set and map operations
in C for the rest): on our 4,020 web documents 6x faster than spaCy's tokenizer from a cold
cache, 19x once warm, with the same keep/drop decisions on >= 99.9% of documents
(tests/test_filters_parity.py measures it and explains the differences).
"""

from __future__ import annotations

import re
import sys
import unicodedata
from collections import OrderedDict
from collections.abc import Callable
from itertools import chain

import numpy as np

# datatrove.utils.text.PUNCTUATION (+ its TERMINAL_PUNCTUATION): a word made only of these
# characters is a "symbol word" that Gopher's word count skips.
_PUNCTUATION = (
    "!/—”:％１〈&(、━\\【#%「」，】；+^]~“《„';’{|∶´[=-`*．（–？！：$～«〉,><》)?）。…@_.\"}►»"
    + "".join(map(chr, (x for a, b in ((0, 9), (11, 13), (13, 32), (127, 160)) for x in range(a, b))))
)
# Sentence-ending marks: Unicode's Sentence_Terminal characters, the set datatrove calls
# TERMINAL_PUNCTUATION (FineWeb's line-punctuation rule, C4's sentence count).
TERMINAL_PUNCTUATION = frozenset(
    "!.?\u0589\u061d\u061e\u061f\u06d4\u0700\u0701\u0702\u07f9\u0837\u0839\u083d\u083e\u0964\u0965"
    "\u104a\u104b\u1362\u1367\u1368\u166e\u1735\u1736\u17d4\u17d5\u17d6\u17d9\u17da\u1803\u1809\u1944"
    "\u1945\u1aa8\u1aa9\u1aaa\u1aab\u1b5a\u1b5b\u1b5e\u1b5f\u1b7d\u1b7e\u1c3b\u1c3c\u1c7e\u1c7f\u203c"
    "\u203d\u2047\u2048\u2049\u2e2e\u2e3c\u2e53\u2e54\u3002\ua4ff\ua60e\ua60f\ua6f3\ua6f7\ua876\ua877"
    "\ua8ce\ua8cf\ua92f\ua9c8\ua9c9\uaa5d\uaa5e\uaa5f\uaaf0\uaaf1\uabeb\ufe52\ufe56\ufe57\uff01\uff0e"
    "\uff1f\uff61\U00010a56\U00010a57\U00010f55\U00010f56\U00010f57\U00010f58\U00010f59\U00010f86"
    "\U00010f87\U00010f88\U00010f89\U00011047\U00011048\U000110be\U000110bf\U000110c0\U000110c1"
    "\U00011141\U00011142\U00011143\U000111c5\U000111c6\U000111cd\U000111de\U000111df\U00011238"
    "\U00011239\U0001123b\U0001123c\U000112a9\U0001144b\U0001144c\U000115c2\U000115c3\U000115c9"
    "\U000115ca\U000115cb\U000115cc\U000115cd\U000115ce\U000115cf\U000115d0\U000115d1\U000115d2"
    "\U000115d3\U000115d4\U000115d5\U000115d6\U000115d7\U00011641\U00011642\U0001173c\U0001173d"
    "\U0001173e\U00011944\U00011946\U00011a42\U00011a43\U00011a9b\U00011a9c\U00011c41\U00011c42"
    "\U00011ef7\U00011ef8\U00011f43\U00011f44\U00016a6e\U00016a6f\U00016af5\U00016b37\U00016b38"
    "\U00016b44\U00016e98\U0001bc9f\U0001da88"
)
PUNCTUATION_SET = frozenset(_PUNCTUATION) | TERMINAL_PUNCTUATION


def _char_classes() -> dict[str, str]:
    """Regex class bodies (as ranges) for the Unicode categories spaCy's rules are written in."""
    wanted = {
        "So": "icons",
        "Lu": "upper",
        "Lt": "upper",
        "Ll": "lower",
        "Lo": "lower",
        "Lm": "lower",
        "Mn": "lower",
        "Mc": "lower",
    }
    ranges: dict[str, list[list[int]]] = {"icons": [], "upper": [], "lower": []}
    for c in range(sys.maxunicode + 1):
        name = wanted.get(unicodedata.category(chr(c)))
        if name is None:
            continue
        rs = ranges[name]
        if rs and rs[-1][1] == c - 1:
            rs[-1][1] = c
        else:
            rs.append([c, c])
    return {
        k: "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in rs)
        for k, rs in ranges.items()
    }


# spaCy's LIST_ICONS (category So), ALPHA_LOWER (lowercase and uncased letters: Hangul, Arabic,
# CJK...) and ALPHA_UPPER.
_CLASSES = _char_classes()
_ICONS = _CLASSES["icons"]
_LOWER = _CLASSES["lower"]
_UPPER = _CLASSES["upper"]
_ALPHA = _LOWER + _UPPER
_QUOTES = "'\"”“`‘´’‚,„»«「」『』（）〔〕【】《》〈〉⟦⟧"
_PUNCT = "…,:;!?¿؟¡()\\[\\]{}<>_#*&。？！，、；：～·।،۔؛٪"
_CURRENCY = r"\$|£|€|¥|฿|US\$|C\$|A\$|₽|﷼|₴|₹|₩|₪|₫|₱|₺|₿"
_UNITS = (
    "km|km²|km³|m|m²|m³|dm|dm²|dm³|cm|cm²|cm³|mm|mm²|mm³|ha|µm|nm|yd|in|ft|kg|g|mg|µg|t|lb|oz|m/s|"
    "km/h|kmh|mph|hPa|Pa|mbar|mb|MB|kb|KB|gb|GB|tb|TB|T|G|M|K|%"
)
# spacy.lang.punctuation TOKENIZER_PREFIXES / SUFFIXES / INFIXES and the English suffix rules.
_PREFIX_RE = re.compile(
    rf"(?:US\$|C\$|A\$|\.\.+|……|[§%=—–…{_PUNCT}{re.escape(_QUOTES)}$£€¥฿₽₹₩₪₫₱₺₿{_ICONS}]|\+(?![0-9]))"
)
_SUFFIX_RE = re.compile(
    rf"(?:\.\.+|……|[…{_PUNCT}{re.escape(_QUOTES)}{_ICONS}—–]|['’][sS]"
    rf"|(?<=[0-9])\+|(?<=°[FfCcKk])\.|(?<=[0-9])(?:{_CURRENCY})|(?<=[0-9])(?:{_UNITS})"
    rf"|(?<=[0-9{_LOWER}%²\-+{re.escape(_QUOTES)}{_PUNCT}])\.|(?<=[{_UPPER}][{_UPPER}])\.)$"
)
_INFIX_RE = re.compile(
    rf"\.\.+|…|[{_ICONS}]|(?<=[0-9])[+\-*^](?=[0-9-])"
    rf"|(?<=[{_LOWER}{re.escape(_QUOTES)}])\.(?=[{_UPPER}{re.escape(_QUOTES)}])"
    rf"|(?<=[{_ALPHA}]),(?=[{_ALPHA}])"
    rf"|(?<=[{_ALPHA}0-9])(?:---|--|——|-|–|—|~)(?=[{_ALPHA}])"
    rf"|(?<=[{_ALPHA}0-9])[:<>=/](?=[{_ALPHA}])"
)
# spaCy's URL_MATCH, simplified: optional scheme, optional user@, dotted host with a
# letter-only top-level domain, optional port and path.
_URL_RE = re.compile(
    r"(?:[\w+\-.]{2,}://)?(?:\S+(?::\S*)?@)?"
    rf"(?:(?:[^\W_](?:[\w-]{{0,62}}[^\W_])?\.)+[{_LOWER}]{{2,63}}|\d{{1,3}}(?:\.\d{{1,3}}){{3}})"
    r"(?::\d{2,5})?(?:[/?#]\S*)?"
)

# Abbreviations spaCy keeps whole with their final period (English tokenizer exceptions).
_ABBREVIATIONS = frozenset(
    """Adm. Ak. Ala. Apr. Ariz. Ark. Aug. Bros. Calif. Co. Colo. Conn. Corp. D.C. Dec. Del. Dr. E.G. E.g.
    Feb. Fla. Ga. Gen. Gov. I.E. I.e. Ia. Id. Ill. Inc. Ind. Jan. Jr. Jul. Jun. Kan. Kans. Ky. La. Ltd.
    Mar. Mass. Md. Messrs. Mich. Minn. Miss. Mo. Mont. Mr. Mrs. Ms. Mt. N.C. N.D. N.H. N.J. N.M. N.Y.
    Neb. Nebr. Nev. Nov. Oct. Okla. Ore. Pa. Ph.D. Prof. Rep. Rev. S.C. Sen. Sep. Sept. St. Tenn. Va.
    Wash. Wis. a.m. co. e.g. i.e. p.m. v.s. vs. ä. ö. ü. and/or w/o C++ o'clock O'clock ma'am Ma'am
    :) :( ;) :-) :-( :P :D :/ (: ): =) <3 8) :p ^_^ -_-""".split()
) | frozenset(f"{c}." for c in "abcdefghijklmnopqrstuvwxyz")
# Contractions spaCy splits (its English exceptions), written as the split parts.
_CONTRACTIONS = """ai|nt are|nt can|not ca|nt ca|nt|ve could|nt could|nt|ve could|ve dare|nt did|nt
did|nt|ve does|nt does|nt|ve do|nt do|nt|ve gon|na got|ta had|nt had|nt|ve has|nt have|nt he|d he|d|ve
he|ll|ve he|s how|d how|d|ve how|ll how|ll|ve how|re how|s how|ve i|d i|d|ve i|ll|ve i|m i|m|a is|nt
it|d it|d|ve it|ll it|ll|ve i|ve may|nt may|nt|ve might|nt might|nt|ve might|ve must|nt must|nt|ve
must|ve need|nt need|nt|ve not|ve ought|nt ought|nt|ve sha|nt sha|nt|ve she|d|ve she|ll|ve she|s
should|nt should|nt|ve should|ve that|d that|d|ve that|ll that|ll|ve that|s there|d there|d|ve there|ll
there|ll|ve there|re there|s there|ve these|d these|d|ve these|ll these|ll|ve these|re these|ve they|d
they|d|ve they|ll they|ll|ve they|re they|ve this|d this|d|ve this|ll this|ll|ve this|s those|d
those|d|ve those|ll those|ll|ve those|re those|ve was|nt we|d we|d|ve we|ll|ve were|nt we|ve what|d
what|d|ve what|ll what|ll|ve what|re what|s what|ve when|d when|d|ve when|ll when|ll|ve when|re when|s
when|ve where|d where|d|ve where|ll where|ll|ve where|re where|s where|ve who|d who|d|ve who|ll who|ll|ve
who|s who|ve why|d why|d|ve why|ll why|ll|ve why|re why|s why|ve wo|nt wo|nt|ve would|nt would|nt|ve
would|ve you|d you|d|ve you|ll you|ll|ve you|re you|ve""".split()
_PRONOUNS = "i you he she it we they that there these this those what when where who why how".split()
_CLITIC = {"nt": "n't", "d": "'d", "ll": "'ll", "re": "'re", "s": "'s", "ve": "'ve", "m": "'m"}


def _special_cases() -> dict[str, tuple[str, ...]]:
    special: dict[str, tuple[str, ...]] = {a: (a,) for a in _ABBREVIATIONS}
    for entry in _CONTRACTIONS:
        parts = entry.split("|")
        for cased in (parts, [parts[0].capitalize(), *parts[1:]]):
            special["".join(cased)] = tuple(cased)
            if all(p in _CLITIC for p in cased[1:]) and cased[1] != "not":
                for apo in ("'", "’"):
                    clitics = [_CLITIC[p].replace("'", apo) for p in cased[1:]]
                    special[cased[0] + "".join(clitics)] = (cased[0], *clitics)
    for base in _PRONOUNS:  # "we're" -> "we", "'re"
        for cased in (base, base.capitalize(), base.upper()):
            for clitic in ("'d", "'ll", "'re", "'ve", "'m"):
                for apo in ("'", "’"):
                    special.setdefault(cased + clitic.replace("'", apo), (cased, clitic.replace("'", apo)))
    for h in range(1, 13):  # "10am" -> "10", "am"
        for suffix in ("am", "pm", "a.m.", "p.m."):
            special[f"{h}{suffix}"] = (str(h), suffix)
    return special


_SPECIAL = _special_cases()
# Chunks that are one plain word (the vast majority) skip the affix machinery.
_PLAIN = re.compile(r"[^\W\d_]+|[0-9]+").fullmatch


def _suffix_len(s: str, start: int) -> int:
    """Length of the suffix spaCy peels off `s[start:]` (0 if none)."""
    if s.endswith(".."):  # a run of dots is one suffix, however long
        return min(len(s) - len(s.rstrip(".")), len(s) - start)
    # Every other suffix is at most 4 characters: search only the tail (lookbehinds still see
    # the characters before it).
    m = _SUFFIX_RE.search(s, max(start, len(s) - 6))
    return len(s) - m.start() if m else 0


def _maybe_url(s: str) -> bool:
    return ("." in s or ":" in s) and _URL_RE.fullmatch(s) is not None


def _split_chunk(chunk: str) -> tuple[str, ...]:
    """Split one whitespace-free chunk like spaCy's English tokenizer (see the module docstring)."""
    special = _SPECIAL.get(chunk)
    if special is not None:
        return special
    prefixes: list[str] = []
    suffixes: list[str] = []
    s = chunk
    last = -1
    while s and len(s) != last:
        if s in _SPECIAL:
            break
        last = len(s)
        pre = _PREFIX_RE.match(s)
        pre_len = pre.end() if pre else 0
        if pre_len and s[pre_len:] in _SPECIAL:
            prefixes.append(s[:pre_len])
            s = s[pre_len:]
            break
        suf_len = _suffix_len(s, pre_len)
        if suf_len and s[:-suf_len] in _SPECIAL:
            suffixes.append(s[-suf_len:])
            s = s[:-suf_len]
            break
        if pre_len and suf_len and pre_len + suf_len <= len(s):
            prefixes.append(s[:pre_len])
            suffixes.append(s[-suf_len:])
            s = s[pre_len:-suf_len]
        elif pre_len:
            prefixes.append(s[:pre_len])
            s = s[pre_len:]
        elif suf_len:
            suffixes.append(s[-suf_len:])
            s = s[:-suf_len]
    middle: list[str] = []
    if s:
        if s in _SPECIAL:
            middle.extend(_SPECIAL[s])
        elif _maybe_url(s):
            middle.append(s)
        else:
            start = 0
            for m in _INFIX_RE.finditer(s):
                if m.start() == 0 and m.end() == len(s):
                    break
                if m.start() > start:
                    middle.append(s[start : m.start()])
                if m.end() > m.start():
                    middle.append(m.group())
                start = m.end()
            if start < len(s):
                middle.append(s[start:])
    return (*prefixes, *middle, *reversed(suffixes))


_CHUNK_CACHE: dict[str, tuple[str, ...]] = {}
_CHUNK_CACHE_MAX = 500_000


_SIMPLE_LEAD = frozenset('("“‘[{')
_SIMPLE_TRAIL = frozenset(',;:!?)"”’]}')


def _split_new(chunk: str) -> tuple[str, ...]:
    """`_split_chunk`, with shortcuts for the common shapes: "word", "(word", "word," / "word."."""
    if chunk in _SPECIAL:
        return _SPECIAL[chunk]
    if _PLAIN(chunk):
        return (chunk,)
    lead = chunk[0] if chunk[0] in _SIMPLE_LEAD else ""
    core = chunk[len(lead) :]
    trail = ""
    if core and core[-1] in _SIMPLE_TRAIL:
        trail, core = core[-1], core[:-1]
    elif core.endswith(".") and _PLAIN(core[:-1]):
        body = core[:-1]
        # spaCy splits a final "." after a digit, a lower-case / uncased letter or two capitals.
        if not body[-1].isupper() or (len(body) > 1 and body[-2].isupper()):
            trail, core = ".", body
    if (lead or trail) and _PLAIN(core) and core not in _SPECIAL and core + trail not in _SPECIAL:
        return tuple(x for x in (lead, core, trail) if x)
    return _split_chunk(chunk)


def split_cached(text: str, cache: dict[str, tuple[str, ...]], split_missing: Callable[[set[str]], None],
                 max_size: int = _CHUNK_CACHE_MAX) -> list[str]:
    """The words of `text`, split at whitespace into chunks and each chunk into words through
    `cache`; `split_missing(chunks)` puts the chunks never seen before into the cache. Set and map
    operations run in C, so only new chunks reach Python code (words repeat across documents)."""
    chunks = text.split()
    missing = set(chunks).difference(cache)
    if missing:
        if len(cache) + len(missing) > max_size:
            cache.clear()
            missing = set(chunks)
        split_missing(missing)
    return list(chain.from_iterable(map(cache.__getitem__, chunks)))


def _split_english(chunks: set[str]) -> None:
    _CHUNK_CACHE.update((chunk, _split_new(chunk)) for chunk in chunks)


def split_words(text: str) -> list[str]:
    """The words of `text` as datatrove's English `split_into_words` would return them."""
    return split_cached(text, _CHUNK_CACHE, _split_english)


class TextView:
    """Lazily computed views of one text, shared by every filter that reads it."""

    __slots__ = ("text", "split", "_words", "_lengths", "_ids", "_vocab", "_ngrams")

    def __init__(self, text: str, split: Callable[[str], list[str]] = split_words) -> None:
        self.text = text
        self.split = split  # the word split: English by default, another language's (filters/words.py)
        self._words: list[str] | None = None
        self._lengths: np.ndarray | None = None
        self._ids: np.ndarray | None = None
        self._vocab: dict[str, int] | None = None
        self._ngrams: tuple[int, np.ndarray] | None = None  # the last (n, n-gram hashes)

    @property
    def words(self) -> list[str]:
        if self._words is None:
            self._words = self.split(self.text)
        return self._words

    @property
    def word_lengths(self) -> np.ndarray:
        if self._lengths is None:
            words = self.words
            self._lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        return self._lengths

    @property
    def word_ids(self) -> np.ndarray:
        """Each word as a small integer (equal words, equal ids): n-grams become integer tuples."""
        if self._ids is None:
            words = self.words
            vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
            self._ids = np.fromiter(map(vocab.__getitem__, words), dtype=np.uint64, count=len(words))
            self._vocab = vocab
        return self._ids

    @property
    def vocab(self) -> dict[str, int]:
        """Distinct words, mapped to their id (insertion order = first occurrence)."""
        if self._vocab is None:
            self.word_ids  # noqa: B018 - computes both
        assert self._vocab is not None
        return self._vocab


_VIEWS: OrderedDict[tuple[str, Callable[[str], list[str]]], TextView] = OrderedDict()
_VIEWS_MAX = 4


def view(text: str, split: Callable[[str], list[str]] = split_words) -> TextView:
    """The shared `TextView` of `text` split by `split`: a few most recent are kept (one pipeline,
    one doc)."""
    key = (text, split)
    v = _VIEWS.get(key)
    if v is None:
        v = TextView(text, split)
        _VIEWS[key] = v
        if len(_VIEWS) > _VIEWS_MAX:
            _VIEWS.popitem(last=False)
    return v


_MULT = np.uint64(0x9E3779B97F4A7C15)


def ngram_hashes(v: TextView, n: int) -> np.ndarray:
    """A 64-bit polynomial hash per word n-gram (collisions ~ m^2 / 2^64: negligible).

    h_n[i] = h_(n-1)[i] * M + id[i + n - 1] + 1, so the last hashes computed for this text are
    extended instead of recomputed when n grows (the filters ask for n = 2, 3, 4, 5, ... 10).
    """
    ids = v.word_ids
    m = len(ids) - n + 1
    if m <= 0:
        return np.empty(0, dtype=np.uint64)
    k, h = (
        v._ngrams
        if v._ngrams is not None and v._ngrams[0] <= n
        else (0, np.zeros(len(ids) + 1, dtype=np.uint64))
    )
    with np.errstate(over="ignore"):
        while k < n:
            k += 1
            mk = len(ids) - k + 1
            h = h[:mk] * _MULT + ids[k - 1 : k - 1 + mk] + np.uint64(1)
    v._ngrams = (n, h)
    return h


def top_ngram_chars(v: TextView, n: int) -> tuple[int, int]:
    """(characters covered by the most frequent n-gram: len(" ".join(gram)) * count, that count).

    Ties go to the n-gram seen first, as `Counter.most_common` does in datatrove. When every
    n-gram is unique (count 1) so is every longer one: callers can skip the counting then.
    """
    h = ngram_hashes(v, n)
    if not len(h):
        return 0, 0
    _, first, counts = np.unique(h, return_index=True, return_counts=True)
    best = int(counts.max())
    pos = int(first[counts == best].min())
    return (int(v.word_lengths[pos : pos + n].sum()) + n - 1) * best, best


def first_ngram_chars(v: TextView, n: int) -> int:
    """len(" ".join(first n-gram)): datatrove's top n-gram when no n-gram repeats."""
    if len(v.words) < n:
        return 0
    return int(v.word_lengths[:n].sum()) + n - 1


def duplicated_ngram_chars(v: TextView, n: int) -> tuple[int, int]:
    """(characters in repeated n-grams counted like datatrove's `find_all_duplicate`, number of
    positions whose n-gram occurs more than once).

    datatrove walks the words left to right: an n-gram already seen adds its characters and the
    walk jumps past it (the n-grams it overlaps are never recorded); a new one is recorded.
    Only n-grams occurring more than once can change the result, so we walk just those
    positions, in order, with the same jump rule. A repeated (n+1)-gram starts with a repeated
    n-gram: when no n-gram repeats, callers can skip every longer n.
    """
    h = ngram_hashes(v, n)
    if len(h) < 2:
        return 0, 0
    _, inverse, counts = np.unique(h, return_inverse=True, return_counts=True)
    repeated = np.flatnonzero(counts[inverse] > 1)
    if not len(repeated):
        return 0, 0
    cum = np.concatenate(([0], np.cumsum(v.word_lengths)))
    chars = (cum[repeated + n] - cum[repeated]).tolist()
    keys = inverse[repeated].tolist()
    seen: set[int] = set()
    total = 0
    next_free = 0
    for pos, key, c in zip(repeated.tolist(), keys, chars, strict=True):
        if pos < next_free:
            continue
        if key in seen:
            total += c
            next_free = pos + n
        else:
            seen.add(key)
            next_free = pos + 1
    return total, len(repeated)


def find_duplicates(items: list[str]) -> tuple[int, int]:
    """(number of repeated items, characters in them), first occurrences not counted."""
    seen: set[str] = set()
    dup = dup_chars = 0
    for x in items:
        if x in seen:
            dup += 1
            dup_chars += len(x)
        else:
            seen.add(x)
    return dup, dup_chars
