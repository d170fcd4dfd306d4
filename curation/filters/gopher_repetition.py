"""Gopher repetition rules (Rae et al. 2021, appendix A, table A1).

Same rules, order, reasons and defaults as datatrove 0.10.1's `GopherRepetitionFilter`. Table A1:

    duplicate line fraction                 0.30    duplicate paragraph fraction            0.30
    duplicate line character fraction       0.20    duplicate paragraph character fraction  0.20
    top 2-gram character fraction           0.20    duplicate 5-gram character fraction     0.15
    top 3-gram character fraction           0.18    duplicate 6-gram character fraction     0.14
    top 4-gram character fraction           0.16    duplicate 7-gram character fraction     0.13
                                                    duplicate 8 / 9 / 10-gram               0.12 / 0.11 / 0.10

n-grams are counted on integer word ids with numpy instead of joined strings (text_stats).
`per_language` sets other thresholds and the word split for a language (`per_language.py`), as
FineWeb-2 does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from curation.document import Document
from curation.filters.per_language import PerLanguage
from curation.filters.words import word_splitter
from curation.step import Filter
from curation.text_stats import (
    duplicated_ngram_chars,
    find_duplicates,
    first_ngram_chars,
    top_ngram_chars,
    view,
)

_PARAGRAPH_SPLIT = re.compile(r"\n{2,}")
_LINE_SPLIT = re.compile(r"\n+")


def _pairs(value: Sequence[Sequence[float]]) -> tuple[tuple[int, float], ...]:
    """(n, fraction) pairs, accepting YAML lists of lists."""
    out = []
    for item in value:
        n, frac = item
        if int(n) < 1:
            raise ValueError(f"n-gram size must be >= 1, got {n!r}")
        out.append((int(n), float(frac)))
    return tuple(out)


class GopherRepetitionFilter(PerLanguage, Filter):
    name: ClassVar[str] = "gopher_repetition"
    # A new n-gram size has no stored score: refilter recomputes it where it can, else counts it missing.
    decision_params: ClassVar[frozenset[str]] = frozenset({
        "dup_line_frac", "dup_para_frac", "dup_line_char_frac", "dup_para_char_frac", "top_n_grams", "dup_n_grams",
        "languages"})

    def __init__(
        self,
        dup_line_frac: float | None = 0.3,  # Gopher A1
        dup_para_frac: float | None = 0.3,  # Gopher A1
        dup_line_char_frac: float | None = 0.2,  # Gopher A1
        dup_para_char_frac: float | None = 0.2,  # Gopher A1
        top_n_grams: Sequence[Sequence[float]] = ((2, 0.2), (3, 0.18), (4, 0.16)),  # Gopher A1
        dup_n_grams: Sequence[Sequence[float]] = (  # Gopher A1
            (5, 0.15),
            (6, 0.14),
            (7, 0.13),
            (8, 0.12),
            (9, 0.11),
            (10, 0.10),
        ),
        languages: Sequence[str] | None = None,  # judge only these `lid.lang`s (None: all)
        per_language: Mapping[str, Any] | None = None,  # {lang: {param: value}}
    ) -> None:
        super().__init__()
        self.dup_line_frac = dup_line_frac
        self.dup_para_frac = dup_para_frac
        self.dup_line_char_frac = dup_line_char_frac
        self.dup_para_char_frac = dup_para_char_frac
        self.top_n_grams = _pairs(top_n_grams)
        self.dup_n_grams = _pairs(dup_n_grams)
        self.init_languages(languages, per_language)

    def annotate(self, doc: Document) -> None:
        t = self.settings(doc, count=True)
        if t is None:
            return
        text = doc.text
        a = doc.attributes
        n_chars = len(text)
        if not n_chars:
            a["gopher_rep.empty"] = 1
            return
        paragraphs = _PARAGRAPH_SPLIT.split(text.strip())
        dup, dup_chars = find_duplicates(paragraphs)
        a["gopher_rep.dup_para_frac"] = dup / len(paragraphs)
        a["gopher_rep.dup_para_char_frac"] = dup_chars / n_chars
        lines = _LINE_SPLIT.split(text)
        dup, dup_chars = find_duplicates(lines)
        a["gopher_rep.dup_line_frac"] = dup / len(lines)
        a["gopher_rep.dup_line_char_frac"] = dup_chars / n_chars
        v = view(text, word_splitter(t.lang))
        # Increasing n: once no n-gram repeats, no longer one does (skip the counting).
        all_unique = False
        for n in sorted(n for n, _ in t.top_n_grams):
            if all_unique:
                chars = first_ngram_chars(v, n)
            else:
                chars, best = top_ngram_chars(v, n)
                all_unique = best == 1
            a[f"gopher_rep.top_{n}gram_frac"] = chars / n_chars
        none_repeat = False
        for n in sorted(n for n, _ in t.dup_n_grams):
            chars = 0
            if not none_repeat:
                chars, repeated = duplicated_ngram_chars(v, n)
                none_repeat = repeated == 0
            a[f"gopher_rep.dup_{n}gram_frac"] = chars / n_chars

    def reject(self, doc: Document) -> str | None:
        t = self.settings(doc)
        if t is None:
            return None
        a = doc.attributes
        if a.get("gopher_rep.empty"):
            return "gopher_rep.empty"
        if t.dup_para_frac and a["gopher_rep.dup_para_frac"] > t.dup_para_frac:
            return "gopher_rep.dup_para_frac"
        if t.dup_para_char_frac and a["gopher_rep.dup_para_char_frac"] > t.dup_para_char_frac:
            return "gopher_rep.dup_para_char_frac"
        if t.dup_line_frac and a["gopher_rep.dup_line_frac"] > t.dup_line_frac:
            return "gopher_rep.dup_line_frac"
        if t.dup_line_char_frac and a["gopher_rep.dup_line_char_frac"] > t.dup_line_char_frac:
            return "gopher_rep.dup_line_char_frac"
        for n, frac in t.top_n_grams:
            if a[f"gopher_rep.top_{n}gram_frac"] > frac:
                return f"gopher_rep.top_{n}_gram"
        for n, frac in t.dup_n_grams:
            if a[f"gopher_rep.dup_{n}gram_frac"] > frac:
                return f"gopher_rep.duplicated_{n}_n_grams"
        return None
