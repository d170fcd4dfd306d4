"""Readers as steps: re-curating existing corpora (Dolma, Parquet, a Hugging Face dataset on disk)
keeps their stored scores, and a row that cannot be a document is a counted skip."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.config import CurationConfig, check_extract_for_inputs
from curation.pipeline import curate
from curation.read.dolma import DolmaReader
from curation.read.hf_dataset import HfDatasetReader, datasets_installed
from curation.read.parquet import ParquetReader
from curation.registry import READERS, ConfigError, build_reader
from curation.writer import read_documents

DOLMA_CC = "web_text/dolma_cc_fixtures/CC-MAIN-20190717121559-20190717143559-00140.jsonl.gz"
# The first curation keeps every document a language is found for and stores every score.
FIRST = {
    "name": "first",
    "source": "dolma-cc",
    "reader": {"dolma": {}},
    "steps": [{"language": {"languages": None, "min_score": 0.0}}, {"gopher_repetition": {}},
              {"gopher_quality": {}}],
}
# The stricter one reruns two of the three steps with new thresholds; gopher_repetition's stored
# scores must survive it untouched.
STRICT_STEPS = [{"language": {"languages": ["en"], "min_score": 0.8}}, {"gopher_quality": {"min_doc_words": 200}}]

EN = "The committee met on Tuesday to discuss the new budget for the public library and its opening hours."
DE = "Der Ausschuss hat sich am Dienstag getroffen, um den neuen Haushalt der Stadtbibliothek zu besprechen."
FR = "Le comité s'est réuni mardi pour discuter du nouveau budget de la bibliothèque municipale."


def _documents(out: Path) -> dict[str, Any]:
    files = [out / f["path"] for f in json.loads((out / "stats.json").read_text())["files"]]
    return {d.id: d for f in files for d in read_documents(f)}


@pytest.fixture(scope="module", params=["parquet", "dolma"])
def first_corpus(request: pytest.FixtureRequest, shared_data: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A corpus written by `curate` (through the dolma reader from real Dolma CC documents)."""
    out = tmp_path_factory.mktemp(f"first-{request.param}")
    cfg = CurationConfig.from_dict({**FIRST, "output": {"format": request.param}})
    curate(cfg, [str(shared_data / DOLMA_CC)], out, progress=False)
    return request.param, out


@pytest.mark.integration
def test_recurating_a_corpus_with_a_stricter_config_keeps_the_expected_subset_and_stored_scores(
        first_corpus: tuple[str, Path], tmp_path: Path) -> None:
    fmt, first = first_corpus
    before = _documents(first)
    assert len(before) > 100 and len({d.attributes["lid.lang"] for d in before.values()}) > 5
    expected = {i for i, d in before.items() if d.attributes["lid.lang"] == "en" and d.attributes["lid.score"] >= 0.8
                and d.attributes["gopher.word_count"] >= 200}
    assert 0 < len(expected) < len(before) - 40

    cfg = CurationConfig.from_dict({"name": "strict", "source": "dolma-cc", "reader": {fmt: {}},
                                    "steps": STRICT_STEPS})
    # The corpus folder itself is the input: read file by file through its stats.json.
    stats = curate(cfg, [str(first)], tmp_path / "strict", progress=False)
    after = _documents(tmp_path / "strict")
    assert set(after) == expected
    assert stats["input_files"] == len(json.loads((first / "stats.json").read_text())["files"])
    assert stats["steps"][0]["docs_out"] == len(before) and not stats["steps"][0]["errors"]
    for i, doc in after.items():
        old = before[i]
        assert doc.text == old.text and doc.source == old.source == "test_gz" and doc.added == old.added
        assert doc.metadata["url"] == old.metadata["url"]
        # Scores of a step the stricter config does not run are kept as they were stored.
        rep = {k: v for k, v in old.attributes.items() if k.startswith("gopher_rep")}
        assert rep and all(doc.attributes[k] == v for k, v in rep.items())


@pytest.mark.integration
def test_dolma_reader_restores_attributes_and_metadata_of_real_dolma_documents(shared_data: Path) -> None:
    reader = DolmaReader(source="fallback")
    docs = list(reader.read(str(shared_data / DOLMA_CC)))
    assert len(docs) == 697 == reader.stats.docs_out == reader.stats.counters["rows"]
    first = docs[0]
    assert first.id == "blj5uzvcoa4iybpd5o6kom5nir6ngmoj" and first.source == "test_gz"
    assert first.created == "2019-07-17T13:39:42.000Z" and first.metadata["url"].startswith("16thfleet")
    # Dolma keeps taggers' spans in a top-level `attributes`; they become the document's attributes.
    assert first.attributes == {"cc_re__cc_re__cc_by_sa_3_0": [[39944, 40015, 1.0]]}
    assert first.metadata["version"] == "v0"


def test_a_corrupt_line_is_a_counted_skip_naming_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl.gz"
    lines = [
        orjson.dumps({"id": "a", "text": "first", "metadata": {"attributes": {"q": 0.5}}}),
        b'{"id": "b", "text": "cut off',
        b"",
        orjson.dumps({"id": "c", "text": None}),
        orjson.dumps(["not", "an", "object"]),
        orjson.dumps({"id": "d", "text": "last", "metadata": "not a mapping"}),
        orjson.dumps({"text": "no id"}),
    ]
    path.write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))
    reader = DolmaReader(source="mine", added="2026-01-01")
    docs = list(reader.read(str(path)))
    assert [(d.id, d.text, d.source, d.added) for d in docs] == [
        ("a", "first", "mine", "2026-01-01"), ("docs.jsonl.gz#7", "no id", "mine", "2026-01-01")]
    assert docs[0].attributes == {"q": 0.5} and "attributes" not in docs[0].metadata
    assert reader.stats.errors == {"read.bad_row": 4}
    assert [(s["line"], s["file"]) for s in reader.stats.samples] == [(2, str(path)), (4, str(path)),
                                                                      (5, str(path)), (6, str(path))]
    assert "not valid JSON" in reader.stats.samples[0]["message"]
    assert "`text` is missing" in reader.stats.samples[1]["message"]


def test_a_truncated_gzip_keeps_the_documents_before_the_fault(tmp_path: Path) -> None:
    body = b"".join(orjson.dumps({"id": str(i), "text": f"document {i} " * 50}) + b"\n" for i in range(200))
    packed = gzip.compress(body)
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(packed[: len(packed) // 2])
    reader = DolmaReader()
    docs = list(reader.read(str(path)))
    assert 0 < len(docs) < 200 and [d.id for d in docs] == [str(i) for i in range(len(docs))]
    assert reader.stats.errors == {"read.malformed": 1}
    missing = DolmaReader()
    assert list(missing.read(str(tmp_path / "gone.jsonl.gz"))) == []
    assert missing.stats.errors == {"read.unavailable": 1}


def test_parquet_reader_reads_any_table_with_a_text_column(tmp_path: Path) -> None:
    path = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"content": ["one", None, "three"], "doc_id": [1, 2, 3],
                             "url": ["http://a/1", "http://a/2", None], "blob": [b"x", b"y", b"z"]}), path)
    reader = ParquetReader(source="foreign", text_key="content", id_key="doc_id")
    docs = list(reader.read(str(path)))
    assert [(d.id, d.text) for d in docs] == [("1", "one"), ("3", "three")]
    assert docs[0].metadata == {"url": "http://a/1", "blob": "<1 bytes>"} and docs[1].metadata == {"blob": "<1 bytes>"}
    assert reader.stats.errors == {"read.bad_row": 1} and reader.stats.samples[0]["row"] == 1
    wrong = ParquetReader()
    assert list(wrong.read(str(path))) == []
    assert wrong.stats.errors == {"read.malformed": 1} and "set the reader's text_key" in wrong.stats.samples[0]["message"]
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    junk = ParquetReader()
    assert list(junk.read(str(tmp_path / "junk.parquet"))) == [] and junk.stats.errors == {"read.malformed": 1}


def _save_dataset(folder: Path) -> None:
    import datasets

    texts = [EN, DE, FR, EN.upper(), DE + " " + DE]
    datasets.Dataset.from_dict({
        "text": texts, "id": [f"r{i}" for i in range(len(texts))], "url": [f"http://x/{i}" for i in range(len(texts))],
    }).save_to_disk(str(folder))


needs_datasets = pytest.mark.skipif(not datasets_installed(), reason="the datasets library makes the fixture")


@needs_datasets
@pytest.mark.parametrize("backend", ["datasets", "pyarrow"])
def test_hf_dataset_saved_to_disk_is_curated_with_either_backend(tmp_path: Path, backend: str) -> None:
    _save_dataset(tmp_path / "ds")
    cfg = CurationConfig.from_dict({"name": "hf", "source": "hf", "reader": {"hf_dataset": {"backend": backend}},
                                    "steps": [{"language": {"languages": ["de"]}}]})
    stats = curate(cfg, [str(tmp_path / "ds")], tmp_path / "out", progress=False)
    kept = _documents(tmp_path / "out")
    assert sorted(kept) == ["r1", "r4"] and stats["steps"][0]["docs_out"] == 5
    assert kept["r1"].text == DE and kept["r1"].metadata["url"] == "http://x/1" and kept["r1"].metadata["lang"] == "de"


@needs_datasets
def test_hf_dataset_dict_reads_the_chosen_splits(tmp_path: Path) -> None:
    import datasets

    part = datasets.Dataset.from_dict({"text": [EN, DE], "id": ["a", "b"]})
    datasets.DatasetDict({"train": part, "test": part}).save_to_disk(str(tmp_path / "dd"))
    reader = HfDatasetReader(splits=["test"], backend="pyarrow")
    files = reader.files_in(str(tmp_path / "dd"))
    assert [Path(f).parent.name for f in files] == ["test"]
    assert [d.id for f in files for d in reader.read(f)] == ["a", "b"]
    assert len(HfDatasetReader().files_in(str(tmp_path / "dd"))) == 2
    with pytest.raises(ValueError, match="no split 'dev'"):
        HfDatasetReader(splits=["dev"]).files_in(str(tmp_path / "dd"))


def test_reader_spec_forms_and_errors() -> None:
    assert CurationConfig.from_dict({"reader": "dolma"}).reader.name == "dolma"
    cfg = CurationConfig.from_dict({"reader": {"parquet": {"text_key": "content"}}})
    assert cfg.reader.params == {"text_key": "content"} and cfg.read == {"text_key": "content"}
    assert CurationConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()
    # Today's `read:` section is the WARC reader's parameters, and keeps today's fingerprint shape.
    warc = CurationConfig.from_dict({"read": {"statuses": [200]}})
    assert warc.reader.name == "warc" and "reader" not in warc.to_dict() and warc.to_dict()["read"] == {"statuses": [200]}
    with pytest.raises(ConfigError, match="under `reader:` only"):
        CurationConfig.from_dict({"read": {"statuses": [200]}, "reader": {"warc": {}}})
    with pytest.raises(ConfigError, match="unknown reader 'dolmaa'.*did you mean 'dolma'"):
        CurationConfig.from_dict({"reader": "dolmaa"})
    with pytest.raises(ConfigError, match="`source` is not a reader parameter"):
        CurationConfig.from_dict({"reader": {"dolma": {"source": "x"}}})
    with pytest.raises(ConfigError, match="has no parameter 'text_keys'.*did you mean 'text_key'"):
        build_reader(CurationConfig.from_dict({"reader": {"parquet": {"text_keys": "t"}}}).reader, "s", "", None)
    assert set(READERS) == {"warc", "dolma", "parquet", "hf_dataset"}


def test_corpus_readers_need_no_extract_step(tmp_path: Path) -> None:
    (tmp_path / "a.warc.gz").write_bytes(b"")
    for name in ("dolma", "parquet", "hf_dataset"):
        check_extract_for_inputs(CurationConfig.from_dict({"reader": name}), [str(tmp_path / "a.warc.gz")])
    with pytest.raises(ConfigError, match="no `extract` step"):
        check_extract_for_inputs(CurationConfig.from_dict({}), [str(tmp_path / "a.warc.gz")])


def test_an_unfinished_corpus_is_refused_as_input(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    (corpus / "_work").mkdir(parents=True)
    (corpus / "_work" / "run.json").write_text("{}")
    (corpus / "documents").mkdir()
    (corpus / "documents" / "x.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match="has not finished"):
        curate(CurationConfig.from_dict({"reader": "parquet"}), [str(corpus)], tmp_path / "out", progress=False)
