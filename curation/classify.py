"""Quality and topic classification with fastText models we train ourselves (`refinery classify train`).

A model directory holds `model.bin` (a fastText supervised model) and `model.json` (its kind,
labels, the normalization it was trained with, held-out metrics and where its data came from);
see `curation/classify_train.py`. Both kinds read text through the same `normalize`, so training
and scoring see identical tokens.

The `classify` pipeline step writes scores only, as every tagger: `quality.score` (probability of
the high-quality class, DCLM-style), `topic.label` (the most probable topic), `topic.score` (its
probability) and `topic.probs` (every topic's probability). Thresholds (`min_quality`, `topics`)
are separate parameters that decide from those attributes, so re-thresholding never reruns a model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from curation.document import Document
from curation.step import Filter

MODEL_FILE = "model.bin"
META_FILE = "model.json"
META_FORMAT = "refinery.classifier/1"
LABEL_PREFIX = "__label__"
# The positive class of a quality model: P(hq | text) is the quality score.
QUALITY_POSITIVE = "hq"
QUALITY_NEGATIVE = "lq"
KINDS = ("quality", "topic")
# The attributes the `classify` step writes.
SCORE_KEYS = ("quality.score", "topic.label", "topic.score", "topic.probs")
# Characters of a document the classifier reads: enough for a page's main content, and fastText
# cost stays bounded on a 1 MB outlier. DCLM also scores a prefix of long documents.
DEFAULT_MAX_CHARS = 20_000

_WORDS = re.compile(r"\w+|[^\w\s]")
# Loaded models, one per path and process: every step instance in a worker shares it.
_MODELS: dict[str, Any] = {}


class ClassifierError(ValueError):
    """A classifier model that is missing, of the wrong kind, or unreadable."""


def normalize(text: str, max_chars: int = DEFAULT_MAX_CHARS) -> str:
    """One line of lower-cased word and punctuation tokens, as fastText reads its input.

    Punctuation becomes its own token (`end.` and `end` are one word to the model) and newlines
    vanish (fastText reads one line per example).
    """
    return " ".join(_WORDS.findall(text[:max_chars].lower()))


def _model_dir(path: str | Path) -> Path:
    p = Path(path)
    return p.parent if p.name in (MODEL_FILE, META_FILE) else p


def read_meta(path: str | Path) -> dict[str, Any]:
    """The `model.json` of a classifier directory, checked."""
    d = _model_dir(path)
    meta_path, model_path = d / META_FILE, d / MODEL_FILE
    if not meta_path.is_file() or not model_path.is_file():
        raise ClassifierError(f"{d} is not a classifier directory (needs {MODEL_FILE} and {META_FILE}); "
                              "train one with `refinery classify train --kind quality|topic -o DIR`")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as e:
        raise ClassifierError(f"{meta_path} is not valid JSON: {e}") from e
    if meta.get("format") != META_FORMAT or meta.get("kind") not in KINDS:
        raise ClassifierError(f"{meta_path} is not a refinery classifier description (format "
                              f"{meta.get('format')!r}, kind {meta.get('kind')!r})")
    return meta


def forget_model(path: str | Path) -> None:
    """Drop a cached model (after it was retrained at the same path)."""
    _MODELS.pop(str((_model_dir(path) / MODEL_FILE).resolve()), None)


class Classifier:
    """A trained fastText classifier directory: batch probabilities over its labels."""

    def __init__(self, path: str | Path, kind: str | None = None) -> None:
        self.dir = _model_dir(path)
        self.meta = read_meta(self.dir)
        if kind is not None and self.meta["kind"] != kind:
            raise ClassifierError(f"{self.dir} is a {self.meta['kind']} classifier, not a {kind} one")
        self.kind: str = self.meta["kind"]
        self.labels: list[str] = list(self.meta["labels"])
        self.max_chars = int(self.meta.get("max_chars", DEFAULT_MAX_CHARS))
        self._model: Any = None

    def __getstate__(self) -> dict[str, Any]:  # Ray ships the path; the worker loads the model
        return {**self.__dict__, "_model": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    @property
    def model(self) -> Any:
        if self._model is None:
            key = str((self.dir / MODEL_FILE).resolve())
            if key not in _MODELS:
                # `_FastText` directly, as curation/filters/language.py: load_model only adds a print.
                from fasttext.FastText import _FastText

                _MODELS[key] = _FastText(key)
            self._model = _MODELS[key]
            got = sorted(lab[len(LABEL_PREFIX):] for lab in self._model.get_labels())
            if got != sorted(self.labels):
                raise ClassifierError(f"{self.dir}: {MODEL_FILE} has labels {got} but {META_FILE} says "
                                      f"{sorted(self.labels)}; the two files come from different runs")
        return self._model

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """Probabilities, shape [len(texts), len(self.labels)], columns in `self.labels` order."""
        out = np.zeros((len(texts), len(self.labels)), dtype=np.float64)
        if not texts:
            return out
        column = {LABEL_PREFIX + lab: j for j, lab in enumerate(self.labels)}
        lines = [normalize(t, self.max_chars) for t in texts]
        labels, probs = self.model.predict(lines, k=len(self.labels))
        for i, (labs, ps) in enumerate(zip(labels, probs, strict=True)):
            for lab, p in zip(labs, ps, strict=True):
                out[i, column[lab]] = p
        # fastText's softmax can round a hair above 1 and a missing label is 0: renormalize rows.
        sums = out.sum(axis=1, keepdims=True)
        np.divide(out, sums, out=out, where=sums > 0)
        return np.clip(out, 0.0, 1.0)

    def quality_scores(self, texts: Sequence[str]) -> np.ndarray:
        """P(high quality) per text (a quality classifier only)."""
        if self.kind != "quality":
            raise ClassifierError(f"{self.dir} is a {self.kind} classifier; quality scores need a quality one")
        return self.predict_proba(texts)[:, self.labels.index(QUALITY_POSITIVE)]


class ClassifyTagger(Filter):
    """Tag documents with `quality.score` and/or `topic.label` (+ `topic.score`, `topic.probs`).

    Give `quality_model`, `topic_model` or both (directories written by `refinery classify train`).
    Keeps every document unless thresholds are set: `min_quality` drops documents scoring below it
    (reason `classify.low_quality`) and `topics` keeps only the listed topics (reason
    `classify.topic.<label>`). Pools for mixing read the scores, not these decisions.
    """

    name: ClassVar[str] = "classify"
    decision_params: ClassVar[frozenset[str]] = frozenset({"min_quality", "topics", "batch_size"})
    rescoring_cost: ClassVar[str] = "model"

    def __init__(
        self,
        quality_model: str | None = None,
        topic_model: str | None = None,
        min_quality: float | None = None,
        topics: Sequence[str] | None = None,
        batch_size: int = 256,
    ) -> None:
        super().__init__()
        if quality_model is None and topic_model is None:
            raise ValueError("give quality_model, topic_model or both (directories from `refinery classify train`)")
        if min_quality is not None and not 0.0 <= min_quality <= 1.0:
            raise ValueError(f"min_quality must be in [0, 1], got {min_quality}")
        if min_quality is not None and quality_model is None:
            raise ValueError("min_quality needs a quality_model to score documents")
        if topics is not None and topic_model is None:
            raise ValueError("topics needs a topic_model to label documents")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        # Read both descriptions now, so a wrong path fails when the pipeline is built.
        self.quality = Classifier(quality_model, kind="quality") if quality_model is not None else None
        self.topic = Classifier(topic_model, kind="topic") if topic_model is not None else None
        if topics is not None:
            assert self.topic is not None
            unknown = sorted(set(topics) - set(self.topic.labels))
            if unknown:
                raise ValueError(f"topics {unknown} are not labels of {self.topic.dir} "
                                 f"(its labels: {self.topic.labels})")
        self.min_quality = min_quality
        self.topics = frozenset(topics) if topics is not None else None
        self.batch_size = batch_size

    @staticmethod
    def validate_params(params: dict[str, Any]) -> None:
        """When the config loads: both model directories exist and are of the right kind."""
        for key, kind in (("quality_model", "quality"), ("topic_model", "topic")):
            if params.get(key) is not None:
                meta = read_meta(params[key])
                if meta["kind"] != kind:
                    raise ValueError(f"parameter `{key}`: {params[key]} is a {meta['kind']} classifier")

    def annotate_batch(self, docs: list[Document]) -> None:
        """One fastText call per model for the batch (Filter.run feeds batches of `batch_size`);
        a document without string text gets no scores and is dropped as `classify.error`."""
        ok = [d for d in docs if isinstance(d.text, str)]
        self._tag(ok, [d.text for d in ok])
        for d in docs:
            if not isinstance(d.text, str):
                self.stats.error("classify.bad_text", id=d.id, type=type(d.text).__name__)
                for key in SCORE_KEYS:  # scores stored by an earlier run must not decide for it
                    d.attributes.pop(key, None)

    def _tag(self, ok: list[Document], texts: list[str]) -> None:
        if self.quality is not None:
            for d, s in zip(ok, self.quality.quality_scores(texts), strict=True):
                d.attributes["quality.score"] = round(float(s), 6)
        if self.topic is not None:
            probs = self.topic.predict_proba(texts)
            labels = self.topic.labels
            for d, row in zip(ok, probs, strict=True):
                j = int(np.argmax(row))
                d.attributes["topic.label"] = labels[j]
                d.attributes["topic.score"] = round(float(row[j]), 6)
                d.attributes["topic.probs"] = {lab: round(float(p), 6) for lab, p in zip(labels, row, strict=True)}

    def annotate(self, doc: Document) -> None:
        """One document alone: what runs when a batch failed, to find the document at fault."""
        self.annotate_batch([doc])

    def has_scores(self, doc: Document) -> bool:
        a = doc.attributes
        return (self.quality is None or "quality.score" in a) and (self.topic is None or "topic.label" in a)

    def reject(self, doc: Document) -> str | None:
        if (self.quality is not None and "quality.score" not in doc.attributes) or (
                self.topic is not None and "topic.label" not in doc.attributes):
            return "classify.error"  # unreadable text or a failed batch, counted in the errors
        if self.min_quality is not None and doc.attributes["quality.score"] < self.min_quality:
            return "classify.low_quality"
        if self.topics is not None:
            label = doc.attributes.get("topic.label")
            if label not in self.topics:
                return f"classify.topic.{label}"
        return None
