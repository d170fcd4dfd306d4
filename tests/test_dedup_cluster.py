"""Global dedup across shards: planted near-duplicates in real web text, survivor rules,
determinism across shard order and executors, verification of candidates, and the helpers."""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.dedup.cluster import read_partition, read_rows, survivor_index
from curation.dedup.components import EDGE_SCHEMA, label_components, node_labels, step_dir, write_edges
from curation.dedup.exact import ExactDedup
from curation.dedup.minhash import MinHashDedup, jaccard, shingle_sets, words
from curation.document import Document
from curation.executor import LocalExecutor
from curation.writer import write_parquet_docs

LOCAL = LocalExecutor(progress=False)


def write_phase1(path: Path, docs: list[Document], steps: list) -> str:
    """A phase-1 shard written by the pipeline's own writer (Dolma fields + '_' columns), in small
    row groups so that reading candidates back has to pick row groups."""
    # fresh copies: fixture documents are shared between tests and annotation writes into them
    docs = [replace(d, attributes={}) for d in docs]
    for step in steps:
        docs = list(step.run(docs))
    write_parquet_docs(docs, path, batch_rows=16, internal=True)
    return str(path)


def write_shards(folder: Path, docs: list[Document], n_shards: int, steps: list, seed: int = 0) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(seed).permutation(len(docs))
    return [write_phase1(folder / f"shard-{s}.parquet", [docs[i] for i in order[s::n_shards]], steps)
            for s in range(n_shards)]


def _ascii_upper(text: str) -> str:
    return "".join(c.upper() if c.isascii() else c for c in text)


@pytest.fixture(scope="module")
def planted(shared_data: Path) -> dict:
    """200 distinct real C4 pages plus planted copies: 60 near copies (one word in 100 edited, at least 2), 40 exact
    copies, 40 copies in other case and whitespace. Originals are older than their copies."""
    with open(shared_data / "web_text" / "c4_en_sample" / "c4_en_train_first1000.jsonl") as f:
        texts = [json.loads(line)["text"] for line in f]
    texts = [t for t in texts if len(words(t)) >= 150]
    sets = shingle_sets(texts, 5)
    chosen: list[int] = []
    for i in range(len(texts)):  # distinct: no chosen page shares more than 30% of shingles
        if all(jaccard(sets[i], sets[j]) < 0.3 for j in chosen):
            chosen.append(i)
        if len(chosen) == 200:
            break
    assert len(chosen) == 200
    rng = np.random.default_rng(1)
    originals = [Document(id=f"orig-{k:03d}", text=texts[i], source="c4", created="2019-04-01T00:00:00Z")
                 for k, i in enumerate(chosen)]
    copies: list[Document] = []
    expected: dict[str, str] = {}
    for k, o in enumerate(originals):
        if k < 60:
            tokens = o.text.split(" ")
            for p in rng.choice(len(tokens), max(2, len(tokens) // 100), replace=False):
                tokens[p] = f"edited{p}"
            text, kind = " ".join(tokens), "near"
            a, b = shingle_sets([o.text, text], 5)
            assert jaccard(a, b) >= 0.85, "a planted near copy must be a near duplicate"
        elif k < 100:
            text, kind = o.text, "exact"
        elif k < 140:
            text, kind = "  " + _ascii_upper(o.text).replace(" ", "  ").replace("\n", " \n\n "), "case"
        else:
            continue
        copy_id = f"{kind}-{k:03d}"
        copies.append(Document(id=copy_id, text=text, source="c4", created=f"2021-0{1 + k % 9}-01T00:00:00Z"))
        expected[copy_id] = o.id
    return {"originals": originals, "copies": copies, "expected": expected}


@pytest.mark.integration
def test_planted_near_duplicates_are_removed_and_every_distinct_page_kept(planted: dict, tmp_path: Path) -> None:
    minhash, exact = MinHashDedup(partitions=5), ExactDedup(partitions=5)
    shards = write_shards(tmp_path / "s", planted["originals"] + planted["copies"], 4, [exact, minhash])
    out = minhash.find_duplicates(shards, tmp_path / "w", LOCAL)
    dropped = {r["id"]: r for r in out.to_pylist()}
    assert set(dropped) == set(planted["expected"])  # every copy out, every original in
    assert all(r["duplicate_of"] == planted["expected"][i] and r["reason"] == "dedup.minhash"
               for i, r in dropped.items())
    assert minhash.stats.counters["dedup_minhash.clusters"] == 140

    # exact dedup catches the exact and the case/whitespace copies, not the edited ones
    out = exact.find_duplicates(shards, tmp_path / "w", LOCAL)
    assert dict(zip(out["id"].to_pylist(), out["duplicate_of"].to_pylist(), strict=True)) == {
        i: o for i, o in planted["expected"].items() if not i.startswith("near")}


@pytest.mark.integration
def test_latest_rule_keeps_the_newest_copy(planted: dict, tmp_path: Path) -> None:
    docs = planted["originals"][:20] + [c for c in planted["copies"] if int(c.id[-3:]) < 20]
    step = MinHashDedup(survivor="latest", partitions=3)
    shards = write_shards(tmp_path / "s", docs, 2, [step])
    out = step.find_duplicates(shards, tmp_path / "w", LOCAL)
    # every copy is newer than its original, so the originals are the ones dropped
    copy_of = {o: c for c, o in planted["expected"].items() if int(c[-3:]) < 20}
    assert dict(zip(out["id"].to_pylist(), out["duplicate_of"].to_pylist(), strict=True)) == copy_of


@pytest.mark.integration
def test_result_does_not_depend_on_shard_order_or_bucket_cap(planted: dict, tmp_path: Path) -> None:
    docs = planted["originals"][:50] + [c for c in planted["copies"] if int(c.id[-3:]) < 50]
    # triplicate some pages so buckets hold more than two documents
    docs += [Document(id=f"third-{d.id}", text=d.text + " extra words at the end", source="c4",
                      created="2020-01-01") for d in planted["originals"][:10]]
    shards = write_shards(tmp_path / "s", docs, 3, [MinHashDedup()])
    first = MinHashDedup(partitions=4).find_duplicates(shards, tmp_path / "w1", LOCAL)
    reversed_ = MinHashDedup(partitions=7).find_duplicates(shards[::-1], tmp_path / "w2", LOCAL)
    capped = MinHashDedup(max_bucket_size=2).find_duplicates(shards, tmp_path / "w3", LOCAL)
    assert first.num_rows == 50 + 10
    assert first.equals(reversed_)
    assert first.equals(capped)


def _s_curve(j: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """Probability that a pair at Jaccard j shares at least one band: 1 - (1 - j^rows)^bands."""
    return 1 - (1 - j**rows) ** bands


@pytest.fixture(scope="module")
def threshold_band(shared_data: Path) -> dict:
    """400 real C4 pages (at least 200 words) and, for each, a copy edited to a word-5-gram Jaccard
    in [0.75, 0.85]: the neighbourhood of the 0.8 threshold, where LSH is least sure. Copies are
    the pages' words with some replaced by words of other pages; originals are older."""
    c4 = shared_data / "web_text" / "c4_en_sample"
    with open(c4 / "c4_en_train_first1000.jsonl") as f:
        texts = [json.loads(line)["text"] for line in f]
    with gzip.open(c4 / "c4-sample.00000-of-00001.json.gz", "rt") as f:
        texts += [json.loads(line)["text"] for line in f]
    texts = [t for t in texts if len(words(t)) >= 200][:400]
    vocab = sorted({w for t in texts for w in words(t)})
    rng = np.random.default_rng(7)
    docs, jac = [], {}
    for i, text in enumerate(texts):
        ws = words(text)
        shingles = len(ws) - 4
        target = rng.uniform(0.75, 0.85)
        # k words replaced far apart change 5k shingles each way: J = (S - 5k) / (S + 5k)
        k = round(shingles * (1 - target) / (5 * (1 + target)))
        positions = rng.choice(len(ws), len(ws), replace=False)
        for _ in range(20):
            edited = list(ws)
            for p in positions[:k]:
                edited[p] = vocab[rng.integers(len(vocab))]
            copy = " ".join(edited)
            j = jaccard(*shingle_sets([text, copy], 5))
            if 0.75 <= j <= 0.85:
                break
            k += 1 if j > 0.85 else -1
        else:
            continue
        docs += [Document(id=f"orig-{i:03d}", text=text, source="c4", created="2019-04-01"),
                 Document(id=f"copy-{i:03d}", text=copy, source="c4", created="2021-01-01")]
        jac[f"copy-{i:03d}"] = j
    return {"docs": docs, "jaccard": jac}


@pytest.mark.integration
def test_pairs_near_the_threshold_are_caught_as_the_s_curve_predicts_and_never_below_it(
    threshold_band: dict, tmp_path: Path
) -> None:
    step = MinHashDedup(partitions=4)  # the default: 26 bands × 11 rows, true Jaccard ≥ 0.8
    shards = write_shards(tmp_path / "s", threshold_band["docs"], 4, [step])
    out = step.find_duplicates(shards, tmp_path / "w", LOCAL)
    jac = threshold_band["jaccard"]
    j = np.array(list(jac.values()))
    positive = {c for c, x in jac.items() if x >= 0.8}
    assert len(jac) >= 380 and 0.3 < len(positive) / len(jac) < 0.7  # both sides of 0.8 are sampled
    dropped = out["id"].to_pylist()
    # precision: only copies at or above the threshold drop, each for its own original
    assert set(dropped) <= positive and len(dropped) == len(set(dropped))
    assert all(d == "orig-" + c[5:] for c, d in zip(dropped, out["duplicate_of"].to_pylist(), strict=True))
    # below the threshold, most pairs were candidates, and verification kept them apart
    assert step.stats.counters["dedup_minhash.false_candidates"] >= 0.5 * (len(jac) - len(positive))
    # recall: what the S-curve predicts for these pairs, within 3 standard deviations
    p = _s_curve(j[j >= 0.8], 26, 11)
    assert len(dropped) >= p.sum() - 3 * np.sqrt((p * (1 - p)).sum())


def test_candidate_pair_below_the_jaccard_threshold_is_kept(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    vocab = [f"w{i}" for i in range(5000)]
    base = list(rng.choice(vocab, 400))
    half = base[:200] + list(rng.choice(vocab, 200))  # true Jaccard of 5-grams ≈ 0.33
    other = list(rng.choice(vocab, 400))
    docs = [Document(id=i, text=" ".join(t), source="t", created="2020-01-01")
            for i, t in [("base", base), ("half", half), ("other", other)]]
    # 32 bands of 2 rows: a pair at Jaccard 0.33 shares a band with probability ≈ 0.97
    step = MinHashDedup(bands=32, rows=2, jaccard_threshold=0.8)
    shards = write_shards(tmp_path / "s", docs, 2, [step])
    out = step.find_duplicates(shards, tmp_path / "w", LOCAL)
    c = step.stats.counters
    assert c["dedup_minhash.candidate_pairs"] >= 1 and c["dedup_minhash.false_candidates"] >= 1
    assert c["dedup_minhash.verified_pairs"] == 0
    assert out.num_rows == 0


def test_documents_without_words_are_never_near_duplicates(tmp_path: Path) -> None:
    docs = [Document(id=f"e{i}", text=t, source="t") for i, t in enumerate(["", "...", "  "])]
    docs.append(Document(id="w", text="some words here", source="t"))
    step = MinHashDedup()
    shards = write_shards(tmp_path / "s", docs, 1, [step])
    assert step.find_duplicates(shards, tmp_path / "w", LOCAL).num_rows == 0
    assert step.stats.counters["dedup_minhash.no_signature"] == 3


def test_an_empty_shard_changes_nothing(tmp_path: Path) -> None:
    docs = [Document(id=i, text="one two three four five six seven", source="t", created=c)
            for i, c in [("a", "2020"), ("b", "2019")]]
    shards = write_shards(tmp_path / "s", docs, 1, [MinHashDedup(), ExactDedup()])
    empty = tmp_path / "empty.parquet"
    pq.write_table(pq.read_table(shards[0]).slice(0, 0), empty)
    for step in (MinHashDedup(), ExactDedup()):
        out = step.find_duplicates([str(empty), *shards], tmp_path / "w", LOCAL)
        assert out.to_pylist() == [{"shard": shards[0], "row": 0, "id": "a", "reason": step.reason,
                                    "duplicate_of": "b"}]


def test_near_copies_that_share_an_id_keep_exactly_one_row(tmp_path: Path) -> None:
    words_ = " ".join(f"w{i}" for i in range(60))
    docs = [Document(id="p1", text=words_, source="t", created="2020-01-01"),
            Document(id="p2", text="nothing alike at all here", source="t", created="2020-01-01")]
    step = MinHashDedup(partitions=2)
    # the same archive under two names: both shards hold the same rows with the same ids
    shards = [write_phase1(tmp_path / f"{name}.parquet", docs, [step]) for name in ("x", "y")]
    out = step.find_duplicates(shards[::-1], tmp_path / "w", LOCAL)
    # dates and ids tie, so the row key decides: the copies in the first shard (by path) stay
    assert [(r["shard"], r["row"], r["id"], r["duplicate_of"]) for r in out.to_pylist()] == [
        (shards[1], 0, "p1", "p1"), (shards[1], 1, "p2", "p2")]
    assert step.stats.counters["dedup_minhash.clusters"] == 2


@pytest.mark.integration
def test_local_and_ray_executors_give_the_same_drops(planted: dict, tmp_path: Path) -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from curation.executor import RayExecutor

    # pages 50..109: 10 near copies, 40 exact copies, 10 case/whitespace copies
    docs = planted["originals"][50:110] + [c for c in planted["copies"] if 50 <= int(c.id[-3:]) < 110]
    shards = write_shards(tmp_path / "s", docs, 3, [ExactDedup(), MinHashDedup()])
    local_m = MinHashDedup(partitions=3).find_duplicates(shards, tmp_path / "lm", LOCAL)
    local_e = ExactDedup(partitions=3).find_duplicates(shards, tmp_path / "le", LOCAL)
    ray = RayExecutor(num_cpus=2, progress=False)
    try:
        ray_m = MinHashDedup(partitions=3).find_duplicates(shards, tmp_path / "rm", ray)
        ray_e = ExactDedup(partitions=3).find_duplicates(shards, tmp_path / "re", ray)
    finally:
        ray.shutdown()
    assert local_m.num_rows == 60 and local_e.num_rows == 50
    assert local_m.equals(ray_m)
    assert local_e.equals(ray_e)


def components_of(a: np.ndarray, b: np.ndarray, root: Path, partitions: int = 3) -> dict[int, int]:
    """Node → label, by the distributed components (edges written by several sources)."""
    for source, (lo, hi) in enumerate([(0, len(a) // 2), (len(a) // 2, len(a))]):
        write_edges(a[lo:hi], b[lo:hi], step_dir(root, 0), partitions, source)
    final = label_components(root, partitions, LOCAL)
    labels: dict[int, int] = {}
    for p in range(partitions):
        nodes, label = node_labels(read_partition(final, p, EDGE_SCHEMA))
        labels.update(zip(nodes.tolist(), label.tolist(), strict=True))
    return labels


def test_components_are_labelled_by_their_smallest_key(tmp_path: Path) -> None:
    labels = components_of(np.array([9, 3, 20]), np.array([3, 7, 21]), tmp_path)
    assert labels == {3: 3, 7: 3, 9: 3, 20: 20, 21: 20}


def test_survivor_rule_orders_by_date_then_id() -> None:
    created, ids, keys = ["2021", "2020", "2020", ""], ["d", "c", "b", "a"], [0, 1, 2, 3]
    assert survivor_index(created, ids, keys, "earliest") == 2  # 2020, then smallest id "b"
    assert survivor_index(created, ids, keys, "latest") == 0
    assert survivor_index(["", ""], ["y", "x"], [0, 1], "latest") == 1  # undated: smallest id


def test_read_rows_takes_only_the_asked_rows_in_the_asked_order(tmp_path: Path) -> None:
    pq.write_table(pa.table({"n": list(range(100))}), tmp_path / "t.parquet", row_group_size=7)
    got = read_rows(str(tmp_path / "t.parquet"), np.array([3, 99, 50, 51, 0]), ["n"])
    assert got["n"].to_pylist() == [3, 99, 50, 51, 0]
