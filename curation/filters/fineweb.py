"""FineWeb quality rules (Penedo et al. 2024, "The FineWeb Datasets", section 3.3).

Same rules, order, reasons and defaults as datatrove 0.10.1's `FineWebQualityFilter`, the
filters FineWeb added on top of Gopher and C4 after ablations on their own crawl. `per_language`
sets other thresholds and the word split for a language (`per_language.py`), as FineWeb-2 does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

from curation.document import Document
from curation.filters.per_language import PerLanguage
from curation.filters.words import word_splitter
from curation.step import Filter
from curation.text_stats import TERMINAL_PUNCTUATION, find_duplicates, view


class FineWebFilter(PerLanguage, Filter):
    name: ClassVar[str] = "fineweb"
    decision_params: ClassVar[frozenset[str]] = frozenset({
        "line_punct_thr", "line_punct_exclude_zero", "short_line_thr", "char_duplicates_ratio", "new_line_ratio",
        "languages"})

    def __init__(
        self,
        line_punct_thr: float = 0.12,  # FineWeb: drop if < 12% of lines end in terminal punctuation
        line_punct_exclude_zero: bool = False,  # FineWeb: a 0 ratio is dropped too
        stop_chars: Iterable[str] | None = None,  # terminal punctuation (Unicode Sentence_Terminal)
        short_line_thr: float = 0.67,  # FineWeb: drop if > 67% of lines are short ...
        short_line_length: int = 30,  # ... i.e. at most 30 characters
        char_duplicates_ratio: float = 0.01,  # FineWeb: drop if > 1% of characters sit in repeated lines
        new_line_ratio: float = 0.3,  # FineWeb: drop if newlines / words > 0.3 (lists, menus)
        languages: Sequence[str] | None = None,  # judge only these `lid.lang`s (None: all)
        per_language: Mapping[str, Any] | None = None,  # {lang: {param: value}}
    ) -> None:
        super().__init__()
        self.line_punct_thr = line_punct_thr
        self.line_punct_exclude_zero = line_punct_exclude_zero
        self.stop_chars = tuple(TERMINAL_PUNCTUATION if stop_chars is None else stop_chars)
        self.short_line_thr = short_line_thr
        self.short_line_length = short_line_length
        self.char_duplicates_ratio = char_duplicates_ratio
        self.new_line_ratio = new_line_ratio
        self.init_languages(languages, per_language)

    def annotate(self, doc: Document) -> None:
        t = self.settings(doc, count=True)
        if t is None:
            return
        text = doc.text
        a = doc.attributes
        lines = [line for line in text.split("\n") if line.strip()]
        if not lines:
            a["fineweb.empty"] = 1
            return
        n = len(lines)
        stop = t.stop_chars
        a["fineweb.line_punct_ratio"] = sum(1 for line in lines if line.endswith(stop)) / n
        a["fineweb.short_line_ratio"] = sum(1 for line in lines if len(line) <= t.short_line_length) / n
        a["fineweb.char_dup_ratio"] = find_duplicates(lines)[1] / (len(text) - text.count("\n"))
        a["fineweb.list_ratio"] = text.count("\n") / (len(view(text, word_splitter(t.lang)).words) or 1)

    def reject(self, doc: Document) -> str | None:
        t = self.settings(doc)
        if t is None:
            return None
        a = doc.attributes
        if a.get("fineweb.empty"):
            return "fineweb.empty"
        ratio = a["fineweb.line_punct_ratio"]
        if ratio < t.line_punct_thr and not (ratio == 0 and t.line_punct_exclude_zero):
            return "fineweb.line_punct_ratio"
        if a["fineweb.short_line_ratio"] > t.short_line_thr:
            return "fineweb.short_line_ratio"
        if a["fineweb.char_dup_ratio"] > t.char_duplicates_ratio:
            return "fineweb.char_dup_ratio"
        if a["fineweb.list_ratio"] > t.new_line_ratio:
            return "fineweb.list_ratio"
        return None
