"""Tokenizing a curated corpus into token shards: counts, boundaries, resume, bad input."""

from __future__ import annotations

import gzip
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from curation.executor import LocalExecutor
from curation.tokenize import tokenize_corpus
from curation.tokenizer import load_tokenizer, train_tokenizer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def corpus(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """3 Parquet shards of C4 in partition folders and one Dolma jsonl.gz; returns all texts in order."""
    root = tmp_path_factory.mktemp("corpus")
    c4 = shared_data / "web_text" / "c4_en_sample" / "c4_en_train_first1000.jsonl"
    rows = [json.loads(line) for line in c4.open()][:240]
    texts: list[str] = []
    for i in range(3):
        part = rows[i * 80:(i + 1) * 80]
        table = pa.table({
            "id": [f"c4-{i}-{j}" for j in range(len(part))],
            "text": [r["text"] for r in part],
            "source": ["c4"] * len(part),
            "metadata": [json.dumps({"url": r.get("url")}) for r in part],
        })
        (root / "c4" / f"q{i}").mkdir(parents=True)
        pq.write_table(table, root / "c4" / f"q{i}" / "part-0.parquet")
        texts += [r["text"] for r in part]
    dolma = shared_data / "web_text" / "dolma_cc_fixtures" / "CC-MAIN-20190717121559-20190717143559-00140.jsonl.gz"
    (root / "documents").mkdir()
    with gzip.open(dolma, "rb") as f, gzip.open(root / "documents" / "cc-0000.jsonl.gz", "wb") as g:
        for k, line in enumerate(f):
            if k >= 60:
                break
            g.write(line)
            if json.loads(line)["text"]:  # empty documents are skipped and counted
                texts.append(json.loads(line)["text"])
    return root, texts


@pytest.fixture(scope="module")
def tokenizer(corpus: tuple[Path, list[str]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tokenizer([corpus[0]], vocab_size=1000, output=tmp_path_factory.mktemp("tok") / "tokenizer.json")


def _docs(out: Path, manifest: dict[str, Any]) -> list[list[int]]:
    """Documents recovered from the shards by their end offsets, in manifest order."""
    docs = []
    for s in manifest["shards"]:
        tokens = np.load(out / s["path"])
        start = 0
        for end in np.load(out / s["index"]):
            docs.append(tokens[start:end].tolist())
            start = int(end)
    return docs


def test_manifest_counts_match_the_shards_and_the_corpus(corpus, tokenizer, tmp_path: Path) -> None:
    root, texts = corpus
    summary = tokenize_corpus(root, tokenizer, tmp_path / "out", executor=LocalExecutor(progress=False))
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["total_documents"] == summary["total_documents"] == len(texts)
    assert m["total_documents"] + m["skipped_documents"].get("empty_text", 0) == 240 + 60
    assert [s["input"] for s in m["shards"]] == ["c4/q0/part-0.parquet", "c4/q1/part-0.parquet",
                                                "c4/q2/part-0.parquet", "documents/cc-0000.jsonl.gz"]
    assert [s["path"] for s in m["shards"]][-1] == "documents/cc-0000.npy"
    assert m["dtype"] == "uint16" and m["vocab_size"] == 1000 and m["eos_id"] == 1
    assert m["shards"][0]["source"] == "c4" and m["shards"][0]["documents"] == 80
    assert m["total_text_bytes"] == sum(len(t.encode()) for t in texts)
    total = 0
    for s in m["shards"]:
        arr = np.load(tmp_path / "out" / s["path"], mmap_mode="r")
        assert arr.dtype == np.uint16 and len(arr) == s["tokens"]
        assert (tmp_path / "out" / s["path"]).stat().st_size == s["nbytes"]
        total += len(arr)
    assert total == m["total_tokens"] == summary["total_tokens"]
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == tokenizer.read_bytes()


def test_every_document_ends_with_eos_and_decodes_back(corpus, tokenizer, tmp_path: Path) -> None:
    root, texts = corpus
    tokenize_corpus(root, tokenizer, tmp_path / "out", executor=LocalExecutor(progress=False))
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    tok = load_tokenizer(tmp_path / "out" / "tokenizer.json")
    docs = _docs(tmp_path / "out", m)
    assert len(docs) == len(texts)
    for doc, text in zip(docs, texts, strict=True):
        assert doc[-1] == tok.eos_id and tok.eos_id not in doc[:-1]
        assert tok.decode(doc[:-1]) == text


def test_large_input_splits_into_shards_at_document_boundaries(corpus, tokenizer, tmp_path: Path) -> None:
    root, texts = corpus
    whole = tokenize_corpus(root, tokenizer, tmp_path / "whole", executor=LocalExecutor(progress=False))
    tokenize_corpus(root, tokenizer, tmp_path / "split", executor=LocalExecutor(progress=False),
                    shard_tokens=20_000)
    m = json.loads((tmp_path / "split" / "manifest.json").read_text())
    assert len(m["shards"]) > 4
    # Only a single document longer than a shard may exceed it.
    assert all(s["tokens"] <= 20_000 or s["documents"] == 1 for s in m["shards"])
    assert m["total_tokens"] == whole["total_tokens"]
    whole_m = json.loads((tmp_path / "whole" / "manifest.json").read_text())
    assert _docs(tmp_path / "split", m) == _docs(tmp_path / "whole", whole_m)


class CrashAfterFirst:
    """An executor that finishes the first item and then dies, like a killed job."""

    name = "crash"

    def map(self, fn: Callable, items: Sequence, desc: str = "") -> list:
        fn(items[0])
        raise RuntimeError("simulated crash")

    def shutdown(self) -> None:
        pass


def test_rerun_after_a_crash_skips_finished_shards_and_matches_a_clean_run(corpus, tokenizer, tmp_path: Path) -> None:
    root, _ = corpus
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated crash"):
        tokenize_corpus(root, tokenizer, out, executor=CrashAfterFirst())
    assert (out / "c4" / "q0" / "part-0.done").is_file()
    assert not (out / "manifest.json").exists()
    # A shard killed mid-write leaves only a temp file, which the rerun removes.
    (out / "c4" / "q1").mkdir(parents=True, exist_ok=True)
    (out / "c4" / "q1" / ".tmp-999-part-0.npy").write_bytes(b"partial")
    first_mtime = (out / "c4" / "q0" / "part-0.npy").stat().st_mtime_ns

    summary = tokenize_corpus(root, tokenizer, out, executor=LocalExecutor(progress=False))
    assert (summary["inputs_resumed"], summary["inputs_done"]) == (1, 3)
    assert (out / "c4" / "q0" / "part-0.npy").stat().st_mtime_ns == first_mtime
    assert not list(out.rglob(".tmp-*"))

    clean = tmp_path / "clean"
    tokenize_corpus(root, tokenizer, clean, executor=LocalExecutor(progress=False))
    assert (out / "manifest.json").read_text() == (clean / "manifest.json").read_text()
    for f in sorted(clean.rglob("*.npy")):
        assert (out / f.relative_to(clean)).read_bytes() == f.read_bytes()
    again = tokenize_corpus(root, tokenizer, out, executor=LocalExecutor(progress=False))
    assert (again["inputs_resumed"], again["inputs_done"]) == (4, 0)


def test_truncated_finished_shard_is_redone_on_rerun(corpus, tokenizer, tmp_path: Path) -> None:
    root, _ = corpus
    out = tmp_path / "out"
    tokenize_corpus(root, tokenizer, out, executor=LocalExecutor(progress=False))
    good = (out / "c4" / "q0" / "part-0.npy").read_bytes()
    (out / "c4" / "q0" / "part-0.npy").write_bytes(good[:-10])
    summary = tokenize_corpus(root, tokenizer, out, executor=LocalExecutor(progress=False))
    assert summary["inputs_done"] == 1
    assert (out / "c4" / "q0" / "part-0.npy").read_bytes() == good


def test_corrupt_input_is_reported_and_the_rest_tokenized(corpus, tokenizer, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    root, texts = corpus
    bad_corpus = tmp_path / "corpus"
    bad_corpus.mkdir()
    (bad_corpus / "good.parquet").write_bytes((root / "c4" / "q0" / "part-0.parquet").read_bytes())
    (bad_corpus / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    with gzip.open(bad_corpus / "lines.jsonl.gz", "wt") as f:
        f.write('{"id": "1", "text": "fine"}\n{not json\n{"id": "3"}\n')
    with caplog.at_level(logging.INFO, logger="curation.tokenize"):
        summary = tokenize_corpus(bad_corpus, tokenizer, tmp_path / "out", executor=LocalExecutor(progress=False))
    assert [f["input"] for f in summary["failed"]] == ["broken.parquet"]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and warned[0].startswith("tokenize: broken.parquet failed"), warned
    assert any("3 inputs (0 resumed, 1 failed)" in r.getMessage() for r in caplog.records), caplog.text
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["total_documents"] == 80 + 1
    assert m["skipped_documents"] == {"bad_json": 1, "empty_text": 1}
    assert not (tmp_path / "out" / "broken.done").exists()


def test_plain_text_files_are_one_document_each(shared_data: Path, tokenizer: Path, tmp_path: Path) -> None:
    text_dir = shared_data / "text" / "wikitext2"
    tokenize_corpus(text_dir, tokenizer, tmp_path / "out", suffixes=(".txt",),
                    executor=LocalExecutor(progress=False))
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [(s["input"], s["documents"]) for s in m["shards"]] == [("test.txt", 1), ("valid.txt", 1)]
    assert m["total_text_bytes"] == sum(len(p.read_text().encode()) for p in sorted(text_dir.glob("*.txt")))


def _big_vocab_tokenizer(path: Path, size: int) -> Path:
    vocab = {f"w{i}": i for i in range(size)}
    vocab["<|endoftext|>"] = size
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(path))
    return path


def test_vocab_beyond_uint16_gets_uint32_and_forcing_uint16_is_an_error(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    pq.write_table(pa.table({"id": ["a"], "text": ["w1 w70000 w5"], "source": ["s"]}), corpus / "p.parquet")
    big = _big_vocab_tokenizer(tmp_path / "tokenizer.json", 70_001)
    with pytest.raises(ValueError, match="does not fit uint16"):
        tokenize_corpus(corpus, big, tmp_path / "out16", dtype="uint16", executor=LocalExecutor(progress=False))
    tokenize_corpus(corpus, big, tmp_path / "out", executor=LocalExecutor(progress=False))
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["dtype"] == "uint32" and m["eos_id"] == 70_001
    assert np.load(tmp_path / "out" / "p.npy").tolist() == [1, 70_000, 5, 70_001]


def _two_doc_corpus_and_bertlike_tokenizer(tmp_path: Path) -> Path:
    """A two-document corpus and, at tmp_path/tokenizer.json, a word-level tokenizer whose EOS is
    not named like any we recognise (`[SEP]`) and whose BOS is `<s>`."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["hi there", "there"]}), corpus / "p.parquet")
    vocab = {"[CLS]": 0, "[SEP]": 1, "<s>": 2, "hi": 3, "there": 4, "[UNK]": 5}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["[CLS]", "[SEP]", "<s>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    return corpus


def test_explicit_eos_token_and_bos_reach_the_workers(tmp_path: Path) -> None:
    corpus = _two_doc_corpus_and_bertlike_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="no EOS"):
        tokenize_corpus(corpus, tmp_path / "tokenizer.json", tmp_path / "out")
    tokenize_corpus(corpus, tmp_path / "tokenizer.json", tmp_path / "out", eos_token="[SEP]", add_bos=True,
                    executor=LocalExecutor(progress=False))
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert (m["eos_id"], m["bos_id"]) == (1, 2)
    assert np.load(tmp_path / "out" / "p.npy").tolist() == [2, 3, 4, 1, 2, 4, 1]
    assert np.load(tmp_path / "out" / "p.idx.npy").tolist() == [4, 7]


def test_output_made_with_another_tokenizer_is_refused(corpus, tokenizer, tmp_path: Path) -> None:
    root, _ = corpus
    tokenize_corpus(root, tokenizer, tmp_path / "out", executor=LocalExecutor(progress=False))
    other = _big_vocab_tokenizer(tmp_path / "other.json", 10)
    with pytest.raises(ValueError, match="different tokenizer"):
        tokenize_corpus(root, other, tmp_path / "out", executor=LocalExecutor(progress=False))


def test_rerun_with_other_bos_or_eos_settings_redoes_finished_inputs(tmp_path: Path) -> None:
    corpus = _two_doc_corpus_and_bertlike_tokenizer(tmp_path)
    out = tmp_path / "out"
    ex = LocalExecutor(progress=False)
    tokenize_corpus(corpus, tmp_path / "tokenizer.json", out, eos_token="[SEP]", executor=ex)
    assert np.load(out / "p.npy").tolist() == [3, 4, 1, 4, 1]
    # Same output folder, now with BOS: the finished input must not be resumed without it.
    summary = tokenize_corpus(corpus, tmp_path / "tokenizer.json", out, eos_token="[SEP]", add_bos=True,
                              executor=ex)
    assert (summary["inputs_done"], summary["inputs_resumed"]) == (1, 0)
    assert np.load(out / "p.npy").tolist() == [2, 3, 4, 1, 2, 4, 1]
    summary = tokenize_corpus(corpus, tmp_path / "tokenizer.json", out, eos_token="[CLS]", add_bos=True,
                              executor=ex)
    assert summary["inputs_done"] == 1
    assert np.load(out / "p.npy").tolist() == [2, 3, 4, 0, 2, 4, 0]
    again = tokenize_corpus(corpus, tmp_path / "tokenizer.json", out, eos_token="[CLS]", add_bos=True,
                            executor=ex)
    assert (again["inputs_done"], again["inputs_resumed"]) == (0, 1)
