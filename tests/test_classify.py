"""Quality and topic classifiers: trained here from ../shared/data, better than chance on held-out
text, and the `classify` step writes scores apart from its thresholds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from curation.classify import Classifier, ClassifierError, ClassifyTagger, normalize
from curation.classify_train import (
    ClassifierDataError,
    Source,
    chunk_text,
    default_sources,
    read_examples,
    roc_auc,
    train_classifier,
)
from curation.document import Document
from curation.registry import DOC_STEPS, ConfigError, build

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def quality_model(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("quality")
    train_classifier("quality", default_sources("quality", shared_data), out, max_per_source=400,
                     threads=1, holdout=0.2)
    return out


@pytest.fixture(scope="module")
def topic_model(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("topic")
    train_classifier("topic", default_sources("topic", shared_data), out, max_per_source=1200,
                     threads=1, holdout=0.2)
    return out


def test_quality_classifier_beats_chance_on_heldout_text(quality_model: Path) -> None:
    meta = json.loads((quality_model / "model.json").read_text())
    held = meta["heldout"]
    assert meta["heldout_examples"]["hq"] == meta["heldout_examples"]["lq"] >= 50  # balanced classes
    assert held["majority_baseline"] == 0.5
    assert held["accuracy"] > 0.75 and held["auc"] > 0.85, held


def test_topic_classifier_beats_chance_on_heldout_text(topic_model: Path) -> None:
    meta = json.loads((topic_model / "model.json").read_text())
    held = meta["heldout"]
    assert {"world", "sports", "business", "sci_tech", "math"} <= set(meta["labels"])
    assert held["accuracy"] > held["majority_baseline"] + 0.2, held
    assert held["auc"] > 0.85
    assert held["recall"]["sports"] > 0.6  # not one big class answered everywhere


def test_quality_score_ranks_reference_text_above_raw_web_text(quality_model: Path, shared_data: Path) -> None:
    """Held-out sources (never in training): a Wikipedia-like article vs. the low-quality CC sample."""
    clf = Classifier(quality_model, kind="quality")
    good = [t for t, _ in read_examples(shared_data / "text/wikipedia_en/taylorswift_wikipedia.txt")][:20]
    rows = [json.loads(x) for x in (shared_data / "web_text/redpajama_tiny_samples/redpajama-c4-refined.jsonl")
            .read_text().splitlines()[:10]]
    web = clf.quality_scores([r["text"] for r in rows])
    ref = clf.quality_scores(good)
    assert ref.mean() > web.mean()
    assert roc_auc([1] * len(ref) + [0] * len(web), list(ref) + list(web)) > 0.7


def test_classify_step_writes_scores_and_thresholds_decide(quality_model: Path, topic_model: Path) -> None:
    docs = [Document(id="a", text="The team won the championship final after a late goal in extra time.",
                     source="t"),
            Document(id="b", text="click here buy now cheap best price free shipping login cart " * 5, source="t"),
            Document(id="c", text="Let G be a finite group and H a normal subgroup; we prove the quotient is "
                                  "solvable whenever the Sylow subgroups are cyclic.", source="t")]
    keep_all = ClassifyTagger(quality_model=str(quality_model), topic_model=str(topic_model))
    kept = list(keep_all(docs))
    assert [d.id for d in kept] == ["a", "b", "c"]
    for d in kept:
        assert 0.0 <= d.attributes["quality.score"] <= 1.0
        probs = d.attributes["topic.probs"]
        assert d.attributes["topic.label"] == max(probs, key=probs.get)
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-4)
    assert kept[0].attributes["topic.label"] == "sports"
    assert kept[2].attributes["topic.label"] == "math"
    # The same scores, a threshold: only the decision changes.
    strict = ClassifyTagger(quality_model=str(quality_model), topic_model=str(topic_model),
                            min_quality=kept[1].attributes["quality.score"] + 1e-6, topics=["sports", "math"])
    again = list(strict([Document(id=d.id, text=d.text, source="t") for d in docs]))
    assert "b" not in [d.id for d in again]
    assert sum(strict.stats.dropped.values()) == 3 - len(again)


def test_classify_is_a_registered_pipeline_step(quality_model: Path, topic_model: Path) -> None:
    assert "classify" in DOC_STEPS
    step = build("classify", {"quality_model": str(quality_model)}, DOC_STEPS)
    assert isinstance(step, ClassifyTagger)
    with pytest.raises(ConfigError, match="is a topic classifier"):
        build("classify", {"quality_model": str(topic_model)}, DOC_STEPS)
    with pytest.raises(ConfigError, match="not labels of"):
        build("classify", {"topic_model": str(topic_model), "topics": ["cooking"]}, DOC_STEPS)


def test_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ClassifierError, match="refinery classify train"):
        Classifier(tmp_path / "nope")
    with pytest.raises(ConfigError, match="not a classifier directory"):
        build("classify", {"quality_model": str(tmp_path)}, DOC_STEPS)


def test_one_class_cannot_train_a_quality_model(tmp_path: Path) -> None:
    f = tmp_path / "good.txt"
    f.write_text("\n\n".join(f"Paragraph {i} has a handful of ordinary words in it for the test." for i in range(50)))
    with pytest.raises(ClassifierDataError, match="positive .* and negative"):
        train_classifier("quality", [Source(f, "hq")], tmp_path / "m")
    with pytest.raises(ClassifierDataError, match="no topic labels"):
        train_classifier("topic", [Source(f)], tmp_path / "m")


def test_normalize_and_chunking() -> None:
    assert normalize("Hello, World!\nNew line") == "hello , world ! new line"
    text = " = Heading = \n\n" + "\n\n".join("word " * 60 for _ in range(5)) + "\n\n a 1 @,@ 000 b"
    chunks = list(chunk_text(text, chunk_words=100, min_words=1))
    assert all("Heading" not in c for c in chunks)
    assert [len(c.split()) for c in chunks][:2] == [120, 120]
    assert chunks[-1].endswith("a 1,000 b")
