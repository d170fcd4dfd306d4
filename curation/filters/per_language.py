"""Per-language settings for a filter, chosen by the document's language (FineWeb-2's way).

FineWeb-2 (Penedo et al. 2025, github.com/huggingface/fineweb-2) keeps FineWeb's filters and tunes
them per language: a minimum language score, Gopher stop words, word-length, alphabetic-word,
repetition and line-punctuation thresholds per language (its `configs/{lang}_{script}.yml`), each
language's own word tokenizer, and no C4 rules at all. A filter that mixes in `PerLanguage` takes
two parameters for that, read against the `lid.lang` attribute the language step writes:

- `per_language: {de: {min_stop_words: 3}}`: overrides of the filter's own parameters for the
  documents of one language. A listed language also gets its own word split (`words.py`), even
  with no override (`de: {}`). Other languages get the filter's own parameters and the English
  split: a config without `per_language` decides exactly as before.
- `languages: [en]`: the languages the filter judges (default all). A document of another
  language passes unscored, counted in `<name>.other_language` (FineWeb-2 drops the C4 rules for
  every language but English this way). The language step's own `languages` keeps its meaning:
  the languages it keeps.

Each listed language is served by an instance of the same filter built with the merged
parameters, so every parameter is checked and normalised by the constructor as usual, and the
filter code reads a language's thresholds as it reads its own (`t = self.settings(doc)`).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from curation.document import Document
from curation.filters.words import word_splitter
from curation.param_types import param_error, param_hints
from curation.step import StepStats

# English names of the languages web crawls hold most, to suggest the code for a name in a config.
LANGUAGE_NAMES = {
    "english": "en", "german": "de", "deutsch": "de", "french": "fr", "spanish": "es", "italian": "it",
    "portuguese": "pt", "dutch": "nl", "russian": "ru", "polish": "pl", "czech": "cs", "slovak": "sk",
    "ukrainian": "uk", "swedish": "sv", "danish": "da", "norwegian": "no", "finnish": "fi",
    "hungarian": "hu", "romanian": "ro", "bulgarian": "bg", "greek": "el", "turkish": "tr",
    "arabic": "ar", "hebrew": "he", "persian": "fa", "farsi": "fa", "hindi": "hi", "bengali": "bn",
    "urdu": "ur", "tamil": "ta", "chinese": "zh", "mandarin": "zh", "japanese": "ja", "korean": "ko",
    "vietnamese": "vi", "thai": "th", "indonesian": "id", "malay": "ms", "catalan": "ca",
    "croatian": "hr", "serbian": "sr", "slovenian": "sl", "lithuanian": "lt", "latvian": "lv",
    "estonian": "et", "latin": "la", "esperanto": "eo", "swahili": "sw", "tagalog": "tl",
}


def check_language_codes(codes: Sequence[str], param: str, model_path: str | None = None) -> None:
    """Raise ValueError unless every code is a label of the language-ID model: a name such as
    `german` would match no document's `lid.lang`, silently."""
    from curation.filters.language import default_model_path, model_languages  # language.py imports us

    try:
        labels = model_languages(model_path or default_model_path())
    except FileNotFoundError:
        return  # the language step reports a missing model, with the install hint
    for code in codes:
        if not isinstance(code, str) or code not in labels:
            guess = LANGUAGE_NAMES.get(str(code).lower().strip())
            close = difflib.get_close_matches(str(code), sorted(labels), n=1)
            hint = f"; did you mean {guess or close[0]!r}?" if guess or close else ""
            raise ValueError(f"parameter `{param}`: {code!r} is not a language code of the language-ID model"
                             f"{hint} (use ISO 639 codes such as 'en', 'de', 'zh')")


class PerLanguage:
    """Mixin for a `Filter`: `languages` / `per_language` as described in the module docstring.

    A subclass calls `init_languages(...)` at the end of its constructor and reads its settings
    through `settings(doc)`. Its attributes must carry its parameters' names (`get_params`)."""

    name: ClassVar[str]
    # Parameters that cannot differ per language (besides `languages` and `per_language`).
    fixed_params: ClassVar[frozenset[str]] = frozenset()
    # Whether the filter counts words: a language under `per_language` then needs a word tokenizer.
    splits_words: ClassVar[bool] = True
    # Whether `languages` limits the documents judged (False for the language step, where it
    # lists the languages kept).
    judges_only_languages: ClassVar[bool] = True

    # The language whose settings this instance holds; None: the filter's own (English word split).
    lang: str | None = None
    languages: frozenset[str] | None
    per_language: dict[str, dict[str, Any]]
    _variants: dict[str, Any]

    @property
    def stats(self) -> StepStats:
        return self._stats

    @stats.setter
    def stats(self, value: StepStats) -> None:
        # The pipeline gives a step fresh stats per shard; a language's instance (c4's line rules run
        # on it) must count into those, not into the stats the step was built with.
        self._stats = value
        for variant in getattr(self, "_variants", {}).values():
            variant.stats = value

    @classmethod
    def overridable_params(cls) -> list[str]:
        fixed = {"self", "languages", "per_language"} | cls.fixed_params
        return [p for p in inspect.signature(cls.__init__).parameters if p not in fixed]

    def get_params(self) -> dict[str, Any]:
        """This instance's constructor arguments, read back from its attributes (scikit-learn's
        convention), without `per_language`: what a language's instance starts from."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p not in ("self", "per_language")]
        return {name: getattr(self, name) for name in names}

    def init_languages(
        self, languages: Sequence[str] | None, per_language: Mapping[str, Mapping[str, Any]] | None
    ) -> None:
        if self.judges_only_languages:
            self.languages = frozenset(languages) if languages is not None else None
        self.per_language = {lang: dict(over) for lang, over in (per_language or {}).items()}
        self._check_overrides(self.per_language, getattr(self, "languages", None))
        base = self.get_params()
        self._variants = {}
        for lang, overrides in self.per_language.items():
            if self.splits_words:
                word_splitter(lang)  # no tokenizer for the language: fail at build, not per document
            try:
                variant = type(self)(**{**base, **overrides})
            except (TypeError, ValueError) as e:
                raise ValueError(f"parameter `per_language.{lang}`: {e}") from e
            variant.lang = lang
            variant.stats = self.stats  # what it counts is this step's (see `stats`)
            self._variants[lang] = variant

    @classmethod
    def _check_overrides(cls, per_language: Mapping[str, Any], languages: Any) -> None:
        valid = cls.overridable_params()
        hints = param_hints(cls)
        for lang, overrides in per_language.items():
            where = f"per_language.{lang}"
            if not isinstance(overrides, Mapping):
                raise ValueError(f"parameter `{where}` must be a mapping of parameters such as "
                                 f"{{{valid[0]}: ...}}, got {type(overrides).__name__} {overrides!r}")
            if languages is not None and lang not in languages:
                raise ValueError(f"parameter `{where}`: {lang!r} is not in `languages` ({sorted(languages)}), "
                                 "so its settings would never apply; add it there or remove them")
            for key, value in overrides.items():
                if key not in valid:
                    close = difflib.get_close_matches(str(key), valid, n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    raise ValueError(f"parameter `{where}`: unknown setting {key!r}{hint}; "
                                     f"settings that can differ per language: {', '.join(valid)}")
                problem = param_error(value, hints[key]) if key in hints else None
                if problem:
                    raise ValueError(f"parameter `{where}.{key}` {problem}")

    @classmethod
    def validate_params(cls, params: dict[str, Any]) -> None:
        """Config-load check (curation.registry.check_params): language codes known to the
        language-ID model, override names and types, and a word tokenizer per listed language."""
        languages = params.get("languages")
        if isinstance(languages, str):
            languages = [languages]
        if languages is not None:
            check_language_codes(languages, "languages", params.get("model_path"))
        per_language = params.get("per_language") or {}
        if not isinstance(per_language, Mapping):
            return  # the type check of check_params reports it
        check_language_codes(list(per_language), "per_language", params.get("model_path"))
        cls._check_overrides(per_language, frozenset(languages) if languages is not None else None)
        if cls.splits_words:
            for lang in per_language:
                word_splitter(lang)

    def for_language(self, lang: str | None) -> Any:
        """The instance holding `lang`'s settings: its own when listed, else this one."""
        return self._variants.get(lang, self) if lang is not None else self

    def settings(self, doc: Document, count: bool = False) -> Any:
        """The instance whose parameters judge `doc` (this one, or its language's), or None when
        `doc`'s language is not among `languages`. `count` tallies documents without a language
        (scored with the filter's own settings) and unjudged ones; `annotate` counts, `reject`
        (also run alone by refilter) does not."""
        lang = doc.attributes.get("lid.lang")
        if lang is None:
            if count and (self.per_language or self.languages is not None):
                self.stats.counters[f"{self.name}.no_language"] += 1
            return self
        if self.languages is not None and lang not in self.languages:
            if count:
                self.stats.counters[f"{self.name}.other_language"] += 1
            return None
        return self._variants.get(lang, self)
