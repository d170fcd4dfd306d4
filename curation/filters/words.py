"""Words per language, as datatrove's `split_into_words(text, language)` cuts them.

The Gopher and FineWeb rules count words, so the word split decides what they measure: the English
split (`curation.text_stats.split_words`) cuts German "im" into "i" + "m" (an English contraction)
and leaves French "l'homme" whole, so German and French stop words would go uncounted. FineWeb-2
runs each language with its own tokenizer (datatrove's `load_word_tokenizer`: spaCy's blank
tokenizer of the language for de, fr, es and most others, a dedicated one for Chinese, Thai, ...).

We use the same tokenizers with the chunk cache of the English split: spaCy cuts each
whitespace-separated chunk on its own, so each distinct chunk is tokenized once (all of a document's
new chunks in one spaCy call) and remembered; plain words and numbers, which no rule of these
tokenizers cuts, skip spaCy altogether. The one exception, special cases that span a space (Spanish
"EE. UU."), sends the texts holding one to spaCy whole. The words are identical to datatrove's on every German,
French, Spanish and English page of the sample (tests/test_multilingual.py), at several times its
speed. Tokenizers that are not spaCy's are called on the whole text, as datatrove does.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable
from typing import Any

from curation.text_stats import split_cached, split_words

WordSplit = Callable[[str], list[str]]

# A chunk of letters only or digits only: spaCy keeps it whole unless it is a special case.
_PLAIN = re.compile(r"[^\W\d_]+|[0-9]+").fullmatch
# Joins a document's new chunks for one spaCy call: the newline is a token of its own, so no
# special case spanning a space ("EE. UU.") can join the end of one chunk to the next.
_JOIN = " \n "
_SPLITTERS: dict[str, WordSplit] = {}


class SpacyChunkSplit:
    """spaCy's blank tokenizer for one language, memoised per whitespace-separated chunk."""

    def __init__(self, spacy_code: str) -> None:
        self.spacy_code = spacy_code
        self._tokenizer: Any = None
        self._cache: dict[str, tuple[str, ...]] = {}
        # Plain chunks that a special case of the language cuts (e.g. Spanish "pal" -> "pa", "l").
        self._special: dict[str, tuple[str, ...]] = {}
        # Special cases spanning a space (Spanish "EE. UU."): a text holding one is cut whole.
        self._spanning: tuple[str, ...] = ()

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            import spacy  # imported on first use: English-only pipelines never pay for it

            tokenizer = spacy.blank(self.spacy_code).tokenizer
            self._special = {
                key: tuple(t.text for t in tokenizer(key))
                for key in tokenizer.rules
                if _PLAIN(key) and len(tokenizer(key)) > 1
            }
            self._spanning = tuple(k for k in tokenizer.rules if " " in k.strip())
            self._tokenizer = tokenizer
        return self._tokenizer

    def _add(self, chunks: set[str]) -> None:
        tokenizer = self.tokenizer
        cache, special = self._cache, self._special
        hard: list[str] = []
        for chunk in sorted(chunks):  # sorted: the same spaCy input whatever the set's order
            if _PLAIN(chunk):
                cache[chunk] = special.get(chunk, (chunk,))
            else:
                hard.append(chunk)
        if not hard:
            return
        starts: list[int] = []
        pos = 0
        for chunk in hard:
            starts.append(pos)
            pos += len(chunk) + len(_JOIN)
        parts: list[list[str]] = [[] for _ in hard]
        # Tokens never cross the joins, so each belongs to the chunk it starts in.
        for token in tokenizer(_JOIN.join(hard)):
            word = token.text.strip()  # datatrove's strip_strings
            if word:
                parts[bisect.bisect_right(starts, token.idx) - 1].append(word)
        for chunk, words in zip(hard, parts, strict=True):
            cache[chunk] = tuple(words)

    def __call__(self, text: str) -> list[str]:
        tokenizer = self.tokenizer
        if self._spanning and any(k in text for k in self._spanning):
            return [w for w in (t.text.strip() for t in tokenizer(text)) if w]
        return split_cached(text, self._cache, self._add)


def _build(lang: str) -> WordSplit:
    from datatrove.utils.word_tokenizers import SpaCyTokenizer, load_word_tokenizer

    try:
        tokenizer = load_word_tokenizer(lang)
    except ValueError as e:
        raise ValueError(f"no word tokenizer for language {lang!r} (datatrove's tokenizer_assignment.csv "
                         "lists none); leave it out of `per_language`") from e
    except ImportError as e:  # a tokenizer whose package is missing (pythainlp, kiwipiepy, ...)
        raise ValueError(f"the word tokenizer for language {lang!r} needs a package: {e}") from e
    if isinstance(tokenizer, SpaCyTokenizer) and tokenizer.config is None:
        return SpacyChunkSplit(tokenizer.language)
    return tokenizer.word_tokenize


def word_splitter(lang: str | None) -> WordSplit:
    """The word split for `lang`: the English rules for None and "en", else datatrove's tokenizer
    for the language. Raises ValueError when the language has no tokenizer (checked at build)."""
    if lang is None or lang == "en":
        return split_words
    split = _SPLITTERS.get(lang)
    if split is None:
        split = _SPLITTERS[lang] = _build(lang)
    return split
