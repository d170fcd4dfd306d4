"""Gopher quality rules (Rae et al. 2021, "Scaling Language Models", appendix A, table A1).

Same rules, order, reasons and defaults as datatrove 0.10.1's `GopherQualityFilter`; words come
from `curation.text_stats.split_words` (datatrove's English spaCy split, reproduced). A threshold
set to None (or 0, as in datatrove) switches its rule off. `per_language` sets other thresholds,
stop words and the word split for a language (`per_language.py`), as FineWeb-2 does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from curation.document import Document
from curation.filters.per_language import PerLanguage
from curation.filters.words import word_splitter
from curation.step import Filter
from curation.text_stats import PUNCTUATION_SET, view

# Gopher's stop words (table A1 footnote: "the, be, to, of, and, that, have, with").
STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")

# Per distinct word: (has a non-punctuation character, has a letter). Words repeat across
# documents, so each is inspected once per process.
_FLAGS: dict[str, tuple[bool, bool]] = {}


def _word_flags(word: str) -> tuple[bool, bool]:
    f = _FLAGS.get(word)
    if f is None:
        if len(_FLAGS) > 1_000_000:
            _FLAGS.clear()
        f = (any(c not in PUNCTUATION_SET for c in word), any(c.isalpha() for c in word))
        _FLAGS[word] = f
    return f


class GopherQualityFilter(PerLanguage, Filter):
    name: ClassVar[str] = "gopher_quality"
    decision_params: ClassVar[frozenset[str]] = frozenset({
        "min_doc_words", "max_doc_words", "min_avg_word_length", "max_avg_word_length", "max_symbol_word_ratio",
        "max_bullet_lines_ratio", "max_ellipsis_lines_ratio", "min_alpha_words_ratio", "min_stop_words", "languages"})

    def __init__(
        self,
        min_doc_words: int | None = 50,  # Gopher A1: 50 <= words (non-symbol) <= 100,000
        max_doc_words: int | None = 100_000,
        min_avg_word_length: float | None = 3,  # Gopher A1: mean word length in [3, 10] chars
        max_avg_word_length: float | None = 10,
        max_symbol_word_ratio: float | None = 0.1,  # Gopher A1: "#" or ellipsis per word <= 0.1
        max_bullet_lines_ratio: float | None = 0.9,  # Gopher A1: <= 90% lines start with a bullet
        max_ellipsis_lines_ratio: float | None = 0.3,  # Gopher A1: <= 30% lines end with an ellipsis
        min_alpha_words_ratio: float | None = 0.8,  # Gopher A1: >= 80% words contain a letter
        min_stop_words: int | None = 2,  # Gopher A1: at least 2 of the stop words
        stop_words: Iterable[str] | None = None,
        languages: Sequence[str] | None = None,  # judge only these `lid.lang`s (None: all)
        per_language: Mapping[str, Any] | None = None,  # {lang: {param: value}}
    ) -> None:
        super().__init__()
        self.min_doc_words = min_doc_words
        self.max_doc_words = max_doc_words
        self.min_avg_word_length = min_avg_word_length
        self.max_avg_word_length = max_avg_word_length
        self.max_symbol_word_ratio = max_symbol_word_ratio
        self.max_bullet_lines_ratio = max_bullet_lines_ratio
        self.max_ellipsis_lines_ratio = max_ellipsis_lines_ratio
        self.min_alpha_words_ratio = min_alpha_words_ratio
        self.min_stop_words = min_stop_words
        self.stop_words = frozenset(STOP_WORDS if stop_words is None else stop_words)
        self.init_languages(languages, per_language)

    def annotate(self, doc: Document) -> None:
        t = self.settings(doc, count=True)
        if t is None:
            return
        text = doc.text
        v = view(text, word_splitter(t.lang))
        n_words = len(v.words)
        vocab = v.vocab
        flags = np.array(list(map(_word_flags, vocab)), dtype=bool).reshape(-1, 2)
        ids = v.word_ids.astype(np.intp)
        non_symbol = flags[ids, 0] if n_words else np.zeros(0, dtype=bool)
        n_non_symbol = int(non_symbol.sum())
        n_alpha = int(flags[ids, 1].sum()) if n_words else 0
        lines = text.splitlines()
        n_lines = len(lines)
        bullets = sum(1 for s in lines if s.lstrip().startswith(("•", "-")))
        end_ellipsis = sum(1 for s in lines if s.rstrip().endswith(("...", "…")))
        a = doc.attributes
        a["gopher.word_count"] = n_non_symbol
        a["gopher.mean_word_length"] = (
            float(v.word_lengths[non_symbol].sum()) / n_non_symbol if n_non_symbol else 0.0
        )
        a["gopher.hash_word_ratio"] = text.count("#") / n_words if n_words else 0.0
        a["gopher.ellipsis_word_ratio"] = (text.count("...") + text.count("…")) / n_words if n_words else 0.0
        a["gopher.bullet_lines_ratio"] = bullets / n_lines if n_lines else 0.0
        a["gopher.ellipsis_lines_ratio"] = end_ellipsis / n_lines if n_lines else 0.0
        a["gopher.alpha_ratio"] = n_alpha / n_words if n_words else 0.0
        a["gopher.stop_words"] = len(t.stop_words.intersection(vocab))

    def reject(self, doc: Document) -> str | None:
        t = self.settings(doc)
        if t is None:
            return None
        a = doc.attributes
        words = a["gopher.word_count"]
        if t.min_doc_words and words < t.min_doc_words:
            return "gopher.gopher_short_doc"
        if t.max_doc_words and words > t.max_doc_words:
            return "gopher.gopher_long_doc"
        mean = a["gopher.mean_word_length"]
        if t.min_avg_word_length and words and mean < t.min_avg_word_length:
            return "gopher.gopher_below_avg_threshold"
        if t.max_avg_word_length and words and mean > t.max_avg_word_length:
            return "gopher.gopher_above_avg_threshold"
        if t.max_symbol_word_ratio and a["gopher.hash_word_ratio"] > t.max_symbol_word_ratio:
            return "gopher.gopher_too_many_hashes"
        if t.max_symbol_word_ratio and a["gopher.ellipsis_word_ratio"] > t.max_symbol_word_ratio:
            return "gopher.gopher_too_many_ellipsis"
        if t.max_bullet_lines_ratio and a["gopher.bullet_lines_ratio"] > t.max_bullet_lines_ratio:
            return "gopher.gopher_too_many_bullets"
        if t.max_ellipsis_lines_ratio and a["gopher.ellipsis_lines_ratio"] > t.max_ellipsis_lines_ratio:
            return "gopher.gopher_too_many_end_ellipsis"
        if t.min_alpha_words_ratio and a["gopher.alpha_ratio"] < t.min_alpha_words_ratio:
            return "gopher.gopher_below_alpha_threshold"
        if t.min_stop_words and a["gopher.stop_words"] < t.min_stop_words:
            # datatrove's (misleading) name for "not enough stop words"
            return "gopher.gopher_enough_stop_words"
        return None
