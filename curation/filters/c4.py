"""C4's line and page rules (Raffel et al. 2020, "Exploring the Limits of Transfer Learning", 2.2).

Same rules, order and defaults as datatrove 0.10.1's `C4QualityFilter` (itself following
tensorflow_datasets' c4_utils): a line is removed when it has a word over 1000 characters, does
not end in terminal punctuation (or ends in "..."), has fewer than 3 words, mentions
"javascript", or mentions a cookie / terms-of-use phrase; Wikipedia-style citations ("[1]",
"[edit]") are cut from every line. The page is dropped when a kept line holds "lorem ipsum" or
"{", or when fewer than 5 sentences remain. Kept pages get the cleaned text.

Line rules edit the text, so they run in `annotate`; the page decisions are made in `reject`
from the attributes (`c4.sentences`, `c4.lorem_ipsum`, `c4.curly_bracket`). Line removals are
counted per rule in `stats.counters` (`c4.line_<rule>`).

The rules are English ones (terminal punctuation, "javascript", cookie phrases); FineWeb-2 applies
none of them to other languages, which a config says with `languages: [en]` (other languages pass
with their text untouched). `per_language` adapts them instead (`per_language.py`).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

from curation.document import Document
from curation.filters.per_language import PerLanguage
from curation.filters.words import word_splitter
from curation.step import Filter
from curation.text_stats import TERMINAL_PUNCTUATION, split_words

CITATION_REGEX = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
END_PUNCTUATION = (".", "?", "!", '"', "'")
ELLIPSIS = "..."
POLICY_SUBSTRINGS = (
    "terms of use",
    "privacy policy",
    "cookie policy",
    "uses cookies",
    "use of cookies",
    "use cookies",
)


def count_sentences(line: str, split: Callable[[str], list[str]] = split_words) -> int:
    """Sentences in a line as spaCy's rule-based sentencizer cuts them (what datatrove counts).

    A new sentence starts at the first word that is not punctuation after a sentence-ending
    mark; the line's first word always starts one.
    """
    words = split(line)
    if not words:
        return 0
    n = 1
    seen_end = False
    for w in words:
        if w in TERMINAL_PUNCTUATION:
            seen_end = True
        elif seen_end and not _is_punct(w):
            n += 1
            seen_end = False
    return n


_PUNCT_CACHE: dict[str, bool] = {}


def _is_punct(word: str) -> bool:
    """spaCy's `is_punct`: every character is in a Unicode punctuation category (P*)."""
    p = _PUNCT_CACHE.get(word)
    if p is None:
        p = all(unicodedata.category(c).startswith("P") for c in word)
        if len(_PUNCT_CACHE) < 100_000:
            _PUNCT_CACHE[word] = p
    return p


class C4Filter(PerLanguage, Filter):
    name: ClassVar[str] = "c4"

    def __init__(
        self,
        remove_citations: bool = True,  # C4 code (tfds c4_utils): strip "[1]", "[edit]", ...
        filter_no_terminal_punct: bool = True,  # C4 paper: keep lines ending in . ? ! "
        min_num_sentences: int = 5,  # C4 paper: drop pages with < 5 sentences; -1 disables
        min_words_per_line: int = 3,  # C4 paper: keep lines with >= 3 words; -1 disables
        max_word_length: int = 1000,  # C4 code: drop lines with a word > 1000 chars; -1 disables
        filter_lorem_ipsum: bool = True,  # C4 paper: drop pages with "lorem ipsum"
        filter_javascript: bool = True,  # C4 paper: drop lines mentioning javascript
        filter_curly_bracket: bool = True,  # C4 paper: drop pages with "{" (code)
        filter_policy: bool = True,  # C4 code: drop cookie / terms-of-use lines
        policy_substrings: Iterable[str] = POLICY_SUBSTRINGS,
        languages: Sequence[str] | None = None,  # judge only these `lid.lang`s (None: all)
        per_language: Mapping[str, Any] | None = None,  # {lang: {param: value}}
    ) -> None:
        super().__init__()
        self.remove_citations = remove_citations
        self.filter_no_terminal_punct = filter_no_terminal_punct
        self.min_num_sentences = min_num_sentences
        self.min_words_per_line = min_words_per_line
        self.max_word_length = max_word_length
        self.filter_lorem_ipsum = filter_lorem_ipsum
        self.filter_javascript = filter_javascript
        self.filter_curly_bracket = filter_curly_bracket
        self.filter_policy = filter_policy
        self.policy_substrings = tuple(policy_substrings)
        # The current page's kept lines, between annotate and on_keep (None: a page not judged).
        self._cleaned: str | None = None
        self.init_languages(languages, per_language)

    def clean(self, doc: Document) -> str:
        """Apply the line rules: write the page attributes, count removals, return the kept text.
        Runs on the instance holding the page's settings; counts go to the filter's own stats."""
        counters = self.stats.counters
        split = word_splitter(self.lang)
        kept: list[str] = []
        sentences = 0
        lorem = curly = 0
        removed = 0
        for raw in doc.text.splitlines():
            line = raw.strip()
            words = line.split()
            if self.max_word_length != -1 and any(len(w) > self.max_word_length for w in words):
                counters["c4.line_too_long_word"] += 1
                removed += 1
                continue
            if self.remove_citations:
                line = CITATION_REGEX.sub("", line)
            if self.filter_no_terminal_punct and (
                not line.endswith(END_PUNCTUATION) or line.endswith(ELLIPSIS)
            ):
                counters["c4.line_no_terminal_punct"] += 1
                removed += 1
                continue
            if len(words) < self.min_words_per_line:
                counters["c4.line_too_few_words"] += 1
                removed += 1
                continue
            lower = line.lower()
            if self.filter_lorem_ipsum and "lorem ipsum" in lower:
                lorem = 1
            if self.filter_javascript and "javascript" in lower:
                counters["c4.line_javascript"] += 1
                removed += 1
                continue
            if self.filter_curly_bracket and "{" in line:
                curly = 1
            if self.filter_policy and any(p in lower for p in self.policy_substrings):
                counters["c4.line_policy"] += 1
                removed += 1
                continue
            if self.min_num_sentences != -1:
                sentences += count_sentences(line, split)
            kept.append(line)
        counters["c4.line_kept"] += len(kept)
        a = doc.attributes
        a["c4.lines_kept"] = len(kept)
        a["c4.lines_removed"] = removed
        a["c4.sentences"] = sentences
        a["c4.lorem_ipsum"] = lorem
        a["c4.curly_bracket"] = curly
        return "\n".join(kept).strip()

    def annotate(self, doc: Document) -> None:
        """Scores, and the kept lines, which replace the text if the page is kept (`on_keep`)."""
        t = self.settings(doc, count=True)
        self._cleaned = None if t is None else t.clean(doc)

    def on_keep(self, doc: Document) -> None:
        if self._cleaned is not None:
            doc.text = self._cleaned

    def reject(self, doc: Document) -> str | None:
        t = self.settings(doc)
        if t is None:
            return None
        a = doc.attributes
        if a["c4.lorem_ipsum"]:
            return "c4.lorem_ipsum"
        if a["c4.curly_bracket"]:
            return "c4.curly_bracket"
        if a["c4.sentences"] < t.min_num_sentences:
            return "c4.too_few_sentences"
        return None
