"""MinHash signatures: bit-for-bit parity with datasketch, tokenization, encoding, estimates."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from datasketch import MinHash

from curation.dedup.minhash import (
    MinHashDedup,
    MinHasher,
    _chunks,
    decode_signatures,
    jaccard,
    shingle_hash32_py,
    shingle_hash_py,
    shingle_hashes,
    shingle_sets,
    shingles_py,
    words,
)
from curation.document import Document

EDGE_TEXTS = [
    "",  # no word at all
    "!!! ... ---",  # no word either
    "Only three words",  # fewer words than the n-gram: one shingle
    "snake_case and ALL CAPS,with-punctuation…and “quotes” 42nd",
    "Straße İstanbul ΣΑΣ 東京は日本の首都です ﬁle naïve café 12,5 %",
    "lone surrogate \ud800 inside text",
]


def _real_texts(data: Path) -> list[str]:
    web = data / "web_text"
    texts = []
    with open(web / "c4_en_sample" / "c4_en_train_first1000.jsonl") as f:
        texts += [json.loads(line)["text"] for _, line in zip(range(25), f, strict=False)]
    cc = web / "dolma_cc_fixtures" / "CC-MAIN-20190717121559-20190717143559-00140.jsonl.gz"
    with gzip.open(cc, "rt") as f:  # Common Crawl, ~60% not English
        texts += [json.loads(line)["text"] for _, line in zip(range(25), f, strict=False)]
    with open(web / "oscar_sample_annotated" / "oscar_data.jsonl") as f:
        texts += [json.loads(line)["content"] for _, line in zip(range(8), f, strict=False)]
    wiki = (data / "text" / "wikipedia_en" / "taylorswift_wikipedia.txt").read_text()
    texts += [wiki[i : i + 3000] for i in range(0, 15000, 3000)]
    book = (data / "text" / "gutenberg_nltk" / "austen-emma.txt").read_text()
    texts.append(book[:20000])  # long enough to cross the permutation block size
    return texts


@pytest.mark.integration
def test_signatures_equal_datasketch_minhash_on_real_text(shared_data: Path) -> None:
    texts = _real_texts(shared_data) + EDGE_TEXTS
    hasher = MinHasher(num_perm=286, seed=1, ngram_size=5)
    sigs, has_words = hasher.signatures(texts)
    reference = MinHash(num_perm=286, seed=1)
    assert np.array_equal(hasher.a, reference.permutations[0])
    assert np.array_equal(hasher.b, reference.permutations[1])
    for i, text in enumerate(texts):
        m = MinHash(num_perm=286, seed=1, hashfunc=shingle_hash32_py)
        shingles = shingles_py(text, 5)
        m.update_batch(shingles)
        assert np.array_equal(sigs[i], m.hashvalues), f"text {i} differs from datasketch"
        assert has_words[i] == bool(shingles)


@pytest.mark.integration
def test_vectorized_shingles_match_the_plain_python_reference(shared_data: Path) -> None:
    texts = _real_texts(shared_data)[:40] + EDGE_TEXTS
    hashes, offsets = shingle_hashes(texts, 5)
    for i, text in enumerate(texts):
        # the documented tokenizer: lowercase, runs of letters/digits (regex [^\W_]+)
        assert words(text) == re.findall(r"[^\W_]+", text.lower())
        expected = [shingle_hash_py(s) for s in shingles_py(text, 5)]
        assert hashes[offsets[i] : offsets[i + 1]].tolist() == expected


def test_short_document_is_one_shingle_of_all_its_words() -> None:
    assert shingles_py("Only three words", 5) == [("only", "three", "words")]
    hashes, offsets = shingle_hashes(["Only three words", "x"], 5)
    assert offsets.tolist() == [0, 1, 2]
    assert hashes[0] == shingle_hash_py(("only", "three", "words"))


def test_batching_does_not_change_signatures() -> None:
    texts = ["alpha beta gamma delta epsilon zeta eta", "", "one two", "theta iota kappa lambda mu nu"] * 3
    hasher = MinHasher(num_perm=64, seed=7)
    together, _ = hasher.signatures(texts)
    alone = np.stack([hasher.signatures([t])[0][0] for t in texts])
    assert np.array_equal(together, alone)


def test_long_inputs_are_split_into_bounded_chunks_covering_every_text_once() -> None:
    texts = ["a" * 30, "b" * 30, "c" * 100, "d", "e" * 10]
    chunks = list(_chunks(texts, max_chars=50))
    assert chunks == [(0, 1), (1, 2), (2, 3), (3, 5)]  # a text longer than the bound is alone


@pytest.mark.integration
def test_estimated_jaccard_tracks_true_jaccard(shared_data: Path) -> None:
    with open(shared_data / "web_text" / "c4_en_sample" / "c4_en_train_first1000.jsonl") as f:
        docs = [json.loads(line)["text"] for _, line in zip(range(200), f, strict=False)]
    docs = [d for d in docs if len(words(d)) > 300][:10]
    rng = np.random.default_rng(0)
    hasher = MinHasher(num_perm=286, seed=1)
    errors = []
    for doc in docs:
        ws = words(doc)
        for frac in (0.02, 0.1, 0.3):
            edited = list(ws)
            for p in rng.choice(len(ws), int(frac * len(ws)), replace=False):
                edited[p] = f"edit{p}"
            pair = [" ".join(ws), " ".join(edited)]
            sigs, _ = hasher.signatures(pair)
            estimate = float(np.mean(sigs[0] == sigs[1]))
            a, b = shingle_sets(pair, 5)
            errors.append(abs(estimate - jaccard(a, b)))
    # standard error of a 286-permutation estimate is at most 0.5/sqrt(286) ≈ 0.03
    assert max(errors) < 0.12
    assert float(np.mean(errors)) < 0.04


def test_annotate_stores_little_endian_uint32_signature_bytes() -> None:
    step = MinHashDedup(bands=4, rows=3)
    doc = Document(id="a", text="the quick brown fox jumps over the lazy dog", source="t")
    empty = Document(id="b", text=" -- ", source="t")
    out = list(step.run([doc, empty]))
    assert [d.id for d in out] == ["a", "b"]
    raw = doc.attributes["_minhash"]
    assert isinstance(raw, bytes) and len(raw) == 12 * 4
    expected, _ = step.hasher.signatures([doc.text])
    assert np.array_equal(np.frombuffer(raw, dtype="<u4"), expected[0])
    assert empty.attributes["_minhash"] == b""
    sigs, ok = decode_signatures(pa.array([raw, b"", None], pa.binary()), 12)
    assert ok.tolist() == [True, False, False]
    assert np.array_equal(sigs[0], expected[0])


def test_signature_of_another_bands_rows_setting_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="bands/rows"):
        decode_signatures(pa.array([b"\x00" * 40], pa.binary()), 12)


@pytest.mark.parametrize(
    "kwargs",
    [{"survivor": "oldest"}, {"bands": 0}, {"jaccard_threshold": 1.5}, {"partitions": 0}, {"max_bucket_size": 1}],
)
def test_bad_settings_are_rejected_when_the_step_is_built(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        MinHashDedup(**kwargs)
