"""Dolma 3-style line modifiers: remove boilerplate lines, keep the document.

The defaults follow the line stage of AllenAI's Dolma 3 / OLMo 3 "all dressed" web pipeline
(datamap-rs `configs/all_dressed/all_dressed_config.yaml`), applied in this order:

1. `max_consecutive_newlines=2`: runs of blank lines collapse to one blank line (extraction
   leaves layout gaps that carry no text and waste tokens).
2. `strip_whitespace`: trailing / leading spaces of each line go (invisible, tokenizer noise).
3. `max_uppercase_ratio=0.5`: a line whose characters are more than half capitals is dropped
   (menus, banners, "ADD TO CART", shouting).
4. `max_numeric_ratio=0.999999`: a line made only of digits is dropped (page numbers, counters,
   table debris); `drop_symbol_lines` extends this to lines with no letter or digit at all
   ("-----", "| | |", "»").
5. `counter_regex`: social counters ("12 likes", "3.4K views", "1,024 followers") are dropped.
6. `min_words_per_line=2`: one-word lines are dropped (navigation items, "Home", "Share").
7. `substrings`: fixed boilerplate fragments are cut out of short lines (<= 10 words): "items in
   cart" anywhere, "Read more..." at the end, "Sign-in" at the start.
8. `boilerplate_phrases` (ours, off by default in Dolma): short lines (<= `boilerplate_max_words`)
   containing cookie / JavaScript / sign-up notices are dropped; C4 drops such lines only when
   they end in punctuation.
9. `edge_max_words` (ours, 0 = off): leading and trailing lines of at most that many words and no
   final punctuation are dropped (breadcrumbs and footers at the document edges).
10. `max_removed_words_ratio=0.05`: a document that lost more than 5% of its words to the rules
    above is dropped as mostly boilerplate (Dolma's word_removal_ratio_filter); so is one left
    empty. Both are counted (`line_modifiers.too_many_words_removed`, `line_modifiers.empty`).

Lines removed are counted per rule in `stats.counters` (`line_modifiers.<rule>`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import ClassVar

from curation.document import Document
from curation.step import Mapper
from curation.text_stats import TERMINAL_PUNCTUATION

# datamap-rs RegexLineModifier's default (matched on the lower-cased line).
COUNTER_REGEX = (
    r"^\W*\d(?:,|\.|\d)*(?:k|m|b)?\s+(?:likes|shares|comments|retweets|reposts|quotes|bookmarks|upvotes"
    r"|downvotes|downloads|views|followers)\W*$"
)
# (text, where) pairs removed from short lines: Dolma 3's substring_line_modifier entries.
SUBSTRINGS: tuple[tuple[str, str], ...] = (
    ("items in cart", "any"),
    ("Read more...", "suffix"),
    ("Sign-in", "prefix"),
)
BOILERPLATE_PHRASES = (
    "cookie",
    "javascript",
    "enable js",
    "all rights reserved",
    "skip to content",
    "skip to main content",
    "sign up for our newsletter",
    "subscribe to our newsletter",
    "back to top",
)
# Unicode "words" (UAX 29 style: runs of letters/digits, inner apostrophes and periods kept),
# the unit Dolma's word counts use.
_WORD = re.compile(r"\w+(?:['’.]\w+)*")
_BLANK_RUN_CACHE: dict[int, re.Pattern[str]] = {}


def _words(line: str) -> int:
    return len(_WORD.findall(line))


class LineModifiers(Mapper):
    name: ClassVar[str] = "line_modifiers"

    def __init__(
        self,
        max_consecutive_newlines: int | None = 2,  # Dolma 3 newline_removal_modifier
        strip_whitespace: bool = True,
        max_uppercase_ratio: float | None = 0.5,  # Dolma 3 ratio_line_modifier (uppercase)
        max_numeric_ratio: float | None = 0.999999,  # Dolma 3 ratio_line_modifier (numeric)
        drop_symbol_lines: bool = True,
        counter_regex: str | None = COUNTER_REGEX,  # Dolma 3 regex_line_modifier
        min_words_per_line: int | None = 2,  # Dolma 3 line_len_modifier
        substrings: Iterable[Iterable[str]] = SUBSTRINGS,  # Dolma 3 substring_line_modifier
        substring_max_words: int = 10,  # Dolma 3: only lines of <= 10 words are edited
        boilerplate_phrases: Iterable[str] = BOILERPLATE_PHRASES,
        boilerplate_max_words: int = 12,
        edge_max_words: int = 0,
        max_removed_words_ratio: float | None = 0.05,  # Dolma 3 word_removal_ratio_filter
    ) -> None:
        super().__init__()
        self.max_consecutive_newlines = max_consecutive_newlines
        self.strip_whitespace = strip_whitespace
        self.max_uppercase_ratio = max_uppercase_ratio
        self.max_numeric_ratio = max_numeric_ratio
        self.drop_symbol_lines = drop_symbol_lines
        self.counter_re = re.compile(counter_regex) if counter_regex else None
        self.min_words_per_line = min_words_per_line
        self.substring_max_words = substring_max_words
        self.substring_res: list[tuple[re.Pattern[str], str]] = []
        for text, where in (tuple(s) for s in substrings):
            if where not in ("any", "prefix", "suffix"):
                raise ValueError(f"substring location must be any, prefix or suffix, got {where!r}")
            esc = re.escape(text)
            pattern = {"prefix": rf"^(?:{esc})\s?", "suffix": rf"\s?(?:{esc})$", "any": rf"\s?(?:{esc})\s?"}[
                where
            ]
            self.substring_res.append((re.compile(pattern), " " if where == "any" else ""))
        self.boilerplate_phrases = tuple(p.lower() for p in boilerplate_phrases)
        self.boilerplate_max_words = boilerplate_max_words
        self.edge_max_words = edge_max_words
        self.max_removed_words_ratio = max_removed_words_ratio

    def _collapse_newlines(self, text: str) -> str:
        n = self.max_consecutive_newlines
        if not n:
            return text
        pat = _BLANK_RUN_CACHE.get(n)
        if pat is None:
            pat = _BLANK_RUN_CACHE[n] = re.compile(f"\n{{{n + 1},}}")
        return pat.sub("\n" * n, text)

    def _line_rule(self, line: str) -> str | None:
        """The rule that removes this (non-empty) line, or None to keep it."""
        n = len(line)
        if (
            self.max_uppercase_ratio is not None
            and sum(c.isupper() for c in line) / n > self.max_uppercase_ratio
        ):
            return "uppercase"
        digits = sum(c.isdigit() for c in line)
        if self.max_numeric_ratio is not None and digits / n > self.max_numeric_ratio:
            return "numeric"
        if self.drop_symbol_lines and not any(c.isalnum() for c in line):
            return "symbols"
        if self.counter_re is not None and self.counter_re.match(line.lower()):
            return "counter"
        words = _words(line)
        if self.min_words_per_line and words < self.min_words_per_line:
            return "too_few_words"
        if self.boilerplate_phrases and words <= self.boilerplate_max_words:
            lower = line.lower()
            if any(p in lower for p in self.boilerplate_phrases):
                return "boilerplate"
        return None

    def modify(self, doc: Document) -> tuple[str, int, int]:
        """(edited text, words before, words after); counts removals per rule."""
        counters = self.stats.counters
        text = self._collapse_newlines(doc.text)
        words_before = _words(text)
        out: list[str] = []
        for raw in text.split("\n"):
            line = raw.strip() if self.strip_whitespace else raw
            if not line.strip():
                out.append("")
                continue
            rule = self._line_rule(line)
            if rule is None and self.substring_res and _words(line) <= self.substring_max_words:
                for pat, repl in self.substring_res:
                    line = pat.sub(repl, line)
                if self.strip_whitespace:
                    line = line.strip()
                if not line.strip():
                    rule = "substring"
            if rule is not None:
                counters[f"line_modifiers.{rule}"] += 1
                continue
            out.append(line)
        if self.edge_max_words:
            out = self._trim_edges(out)
        new = self._collapse_newlines("\n".join(out)).strip("\n")
        return new, words_before, _words(new)

    def _is_edge_junk(self, line: str) -> bool:
        s = line.strip()
        return bool(s) and _words(s) <= self.edge_max_words and s[-1] not in TERMINAL_PUNCTUATION

    def _trim_edges(self, lines: list[str]) -> list[str]:
        counters = self.stats.counters
        start, end = 0, len(lines)
        while start < end and (not lines[start].strip() or self._is_edge_junk(lines[start])):
            counters["line_modifiers.edge"] += bool(lines[start].strip())
            start += 1
        while end > start and (not lines[end - 1].strip() or self._is_edge_junk(lines[end - 1])):
            counters["line_modifiers.edge"] += bool(lines[end - 1].strip())
            end -= 1
        return lines[start:end]

    def apply(self, doc: Document) -> Document | str | None:
        new, before, after = self.modify(doc)
        removed = (before - after) / before if before else 0.0
        doc.attributes["line_modifiers.removed_words_ratio"] = removed
        if not new.strip():
            return None
        if self.max_removed_words_ratio is not None and removed > self.max_removed_words_ratio:
            return "line_modifiers.too_many_words_removed"
        doc.text = new
        return doc
