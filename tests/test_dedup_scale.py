"""Dedup at cluster scale: the driver receives counts and file names only (never a document), each
write task reads only its own shard's drops, components resolve across many shards and along
long chains, and the distributed result equals a plain in-memory computation of the same rule."""

from __future__ import annotations

import pickle
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from curation.config import CurationConfig
from curation.dedup.cluster import read_partition, survivor_index
from curation.dedup.components import EDGE_SCHEMA, label_components, node_labels, step_dir, write_edges
from curation.dedup.exact import ExactDedup
from curation.dedup.minhash import MinHashDedup, band_hashes, decode_signatures, jaccard, shingle_sets
from curation.document import Document
from curation.executor import LocalExecutor
from curation.pipeline import RunContext, Shard, run_dedup, stage1_path, write_shard
from curation.writer import write_parquet_docs

LOCAL = LocalExecutor(progress=False)


def write_phase1(path: Path, docs: Sequence[Document], steps: list) -> str:
    """A phase-1 shard as the pipeline writes it (Dolma fields + '_' columns), small row groups."""
    docs = [replace(d, attributes={}) for d in docs]
    for step in steps:
        docs = list(step.run(docs))
    write_parquet_docs(docs, path, batch_rows=16, internal=True)
    return str(path)


def spread(folder: Path, docs: list[Document], n_shards: int, steps: list, seed: int = 0) -> list[str]:
    """Documents dealt in a shuffled order over `n_shards` phase-1 shards."""
    folder.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(seed).permutation(len(docs))
    return [write_phase1(folder / f"shard-{s}.parquet", [docs[i] for i in order[s::n_shards]], steps)
            for s in range(n_shards)]


def duplicate_corpus(n_base: int, seed: int) -> list[Document]:
    """Random-word pages with every kind of duplicate: exact copies (some reusing the original's id,
    as the same archive read twice does), near copies (one word in 150 changed, Jaccard ≈ 0.93),
    triples, and dates that tie."""
    rng = np.random.default_rng(seed)
    dates = ["2019-01-01", "2020-06-01", "2020-06-01", ""]
    base = [" ".join(f"w{x}" for x in rng.integers(0, 20_000, 150)) for _ in range(n_base)]
    docs = [Document(id=f"b{i}", text=t, source="t", created=dates[i % 4]) for i, t in enumerate(base)]
    for i, text in enumerate(base):
        kind = i % 10
        if kind in (0, 1):
            docs.append(Document(id=f"b{i}" if kind == 0 else f"x{i}", text=text, source="t",
                                 created=dates[(i + 1) % 4]))
        elif kind in (2, 3, 4):
            copies = 2 if kind == 4 else 1
            for c in range(copies):
                ws = text.split()
                ws[int(rng.integers(5, 145))] = f"edit{c}"
                docs.append(Document(id=f"n{i}.{c}", text=" ".join(ws), source="t", created=dates[(i + c) % 4]))
    return docs


# ---------------------------------------------------------------------------------------------
# an executor that watches the driver


class WatchedExecutor:
    """In-process tasks, with a flag that says whether code runs inside a task, every task result
    kept, and the Parquet files each task read."""

    name = "local"

    def __init__(self) -> None:
        self.in_task = False
        self.results: list[Any] = []
        self.reads: list[list[str]] = []

    def map(self, fn: Callable, items: Sequence, desc: str = "") -> list:
        out = []
        for item in items:
            self.in_task = True
            self.reads.append([])
            try:
                out.append(fn(item))
            finally:
                self.in_task = False
        self.results += out
        return out

    def shutdown(self) -> None:
        pass


@pytest.fixture
def watched(monkeypatch: pytest.MonkeyPatch) -> Iterator[WatchedExecutor]:
    """Every data-file read (Parquet, or the Arrow IPC of the shuffles) outside a task fails the
    test: the driver may not read data."""
    ex = WatchedExecutor()
    readers = [(pq, n) for n in ("read_table", "ParquetFile", "read_metadata", "read_schema")]
    for module, name in [*readers, (feather, "read_table")]:
        real = getattr(module, name)

        def guarded(path: Any, *args: Any, _real: Callable = real, _name: str = name, **kwargs: Any) -> Any:
            assert ex.in_task, f"the driver called {_real.__module__}.{_name}({path})"
            ex.reads[-1].append(str(path))
            return _real(path, *args, **kwargs)

        monkeypatch.setattr(module, name, guarded)
    yield ex


def _stage1_run(root: Path, docs: list[Document], n_shards: int) -> tuple[RunContext, list[Shard]]:
    """Phase-1 shards where the pipeline keeps them, for a config of both dedup steps."""
    cfg = CurationConfig.from_dict({"dedup": [{"dedup_exact": {"partitions": 3}},
                                              {"dedup_minhash": {"partitions": 3}}]})
    ctx = RunContext(config=cfg.to_dict(), work=str(root / "_work"), output=str(root), added="t")
    shards = [Shard(f"{i:05d}-in{i}", f"in{i}") for i in range(n_shards)]
    order = np.random.default_rng(1).permutation(len(docs))
    for i, s in enumerate(shards):
        path = stage1_path(ctx, s)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_phase1(path, [docs[j] for j in order[i::n_shards]], [ExactDedup(), MinHashDedup()])
    return ctx, shards


def test_the_dedup_phase_returns_counts_per_shard_not_per_document(
    watched: WatchedExecutor, tmp_path: Path
) -> None:
    returned = {}
    for n_base in (100, 400):  # 4× the documents and 4× the drops, the same 4 shards
        docs = duplicate_corpus(n_base, seed=n_base)
        ctx, shards = _stage1_run(tmp_path / str(n_base), docs, n_shards=4)
        watched.results.clear()
        watched.reads.clear()
        stats = run_dedup(ctx, shards, "phase1-digest", watched)
        n_tasks = len(watched.reads)
        written = watched.map(partial(write_shard, ctx, "phase1-digest"), shards)

        # Every number adds up, so the small results really carry the whole outcome.
        dropped = sum(s["docs_in"] - s["docs_out"] for s in stats)
        assert stats[0]["docs_in"] == len(docs)
        assert dropped == n_base // 10 * 6  # exact copies 2, near copies 3 + 1 for the triples
        assert sum(r["rows"] for r in written) == len(docs) - dropped
        # ... and each result is a few numbers and names.
        sizes = [len(pickle.dumps(r)) for r in watched.results]
        assert max(sizes) < 1000
        returned[n_base] = sum(sizes) + len(pickle.dumps(stats))
        # Each write task read its own phase-1 shard and its own drop list, nothing else.
        for shard, reads in zip(shards, watched.reads[n_tasks:], strict=True):
            assert reads and all(shard.key in Path(p).name for p in reads), reads
    # 4× the corpus, the same size of what came back (component rounds may add a few counts)
    assert returned[400] < 1.25 * returned[100]


def test_a_step_hands_back_one_entry_per_shard(watched: WatchedExecutor, tmp_path: Path) -> None:
    docs = duplicate_corpus(200, seed=3)
    shards = spread(tmp_path / "s", docs, 5, [MinHashDedup(), ExactDedup()])
    for step in (MinHashDedup(partitions=4), ExactDedup(partitions=4)):
        found = step.drop_rows(shards[::-1], tmp_path / "w", watched)
        assert [d.shard for d in found] == shards[::-1]
        assert sum(d.rows for d in found) > 0
        # only the drop lists stay behind
        left = {p.relative_to(tmp_path / "w" / step.name).parts[0] for p in (tmp_path / "w" / step.name).rglob("*")}
        assert left == {"drops", "shards.json"}


# ---------------------------------------------------------------------------------------------
# components


def test_a_chain_across_many_shards_keeps_one_survivor(tmp_path: Path) -> None:
    """Pages cut from one long text, each overlapping the next (Jaccard 0.86) but not the one after
    (0.73): only the chain links them, through shards in random key order."""
    rng = np.random.default_rng(5)
    stream = [f"w{x}" for x in rng.integers(0, 50_000, 15 * 40 + 200)]
    texts = [" ".join(stream[15 * i : 15 * i + 200]) for i in range(40)]
    a, b, c = shingle_sets(texts[:3], 5)
    assert jaccard(a, b) > 0.85 and jaccard(a, c) < 0.75
    docs = [Document(id=f"c{i:02d}", text=t, source="t", created=f"2020-01-01T00:{i:02d}")
            for i, t in enumerate(texts)]
    # 40 bands of 3 rows: every link (0.86) is a candidate for certain, and so are most pairs two
    # and three apart (0.73, 0.63), which verification must reject
    step = MinHashDedup(bands=40, rows=3, partitions=4)
    shards = spread(tmp_path / "s", docs, 8, [step], seed=2)
    out = step.find_duplicates(shards, tmp_path / "w", LOCAL)
    c_ = step.stats.counters
    assert c_["dedup_minhash.verified_pairs"] == 39 and c_["dedup_minhash.false_candidates"] > 39
    assert c_["dedup_minhash.clusters"] == 1
    assert sorted(out["id"].to_pylist()) == [f"c{i:02d}" for i in range(1, 40)]
    assert set(out["duplicate_of"].to_pylist()) == {"c00"}  # the earliest page of the chain


def _reference_components(a: np.ndarray, b: np.ndarray) -> dict[int, int]:
    nodes, inv = np.unique(np.concatenate([a, b]), return_inverse=True)
    graph = coo_matrix((np.ones(len(a)), (inv[: len(a)], inv[len(a) :])), shape=(len(nodes), len(nodes)))
    _, comp = connected_components(graph, directed=False)
    smallest = {c: nodes[comp == c].min() for c in np.unique(comp)}
    return {int(n): int(smallest[c]) for n, c in zip(nodes, comp, strict=True)}


class CountingExecutor(LocalExecutor):
    def __init__(self) -> None:
        super().__init__(progress=False)
        self.calls = 0

    def map(self, fn: Callable, items: Sequence, desc: str = "") -> list:
        self.calls += 1
        return super().map(fn, items, desc)


def _distributed_components(a: np.ndarray, b: np.ndarray, root: Path, partitions: int) -> tuple[dict, int]:
    """Node → label by the distributed steps (edges written by 3 sources), and the steps taken."""
    for source, part in enumerate(np.array_split(np.arange(len(a)), 3)):
        write_edges(a[part], b[part], step_dir(root, 0), partitions, source)
    ex = CountingExecutor()
    final = label_components(root, partitions, ex)
    labels: dict[int, int] = {}
    for p in range(partitions):
        nodes, label = node_labels(read_partition(final, p, EDGE_SCHEMA))
        labels.update(zip(nodes.tolist(), label.tolist(), strict=True))
    return labels, ex.calls


@pytest.mark.parametrize("n", [2, 64, 4096])
def test_a_chain_in_random_key_order_resolves_in_logarithmic_steps(n: int, tmp_path: Path) -> None:
    rng = np.random.default_rng(n)
    keys = (rng.permutation(10 * n)[:n].astype(np.int64) << 20) + 7  # keys spread like real ones
    labels, steps = _distributed_components(keys[:-1], keys[1:], tmp_path, partitions=4)
    assert labels == dict.fromkeys(keys.tolist(), int(keys.min()))
    assert steps <= 4 + 2.5 * np.log2(n)  # measured: 3, 14, 22


def test_components_of_random_graphs_equal_a_union_find(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for trial, (nodes, edges) in enumerate([(50, 30), (2000, 1500), (2000, 3000)]):
        a, b = rng.integers(0, nodes, edges), rng.integers(0, nodes, edges)
        a, b = a[a != b], b[a != b]
        labels, _ = _distributed_components(a, b, tmp_path / str(trial), partitions=5)
        assert labels == _reference_components(a, b)


# ---------------------------------------------------------------------------------------------
# the distributed result is the in-memory rule


def _reference_minhash(shards: list[str], step: MinHashDedup) -> list[tuple[str, int, str, str]]:
    """The whole MinHash rule in one process: band buckets, pairs (star edges from the smallest
    key in buckets over the cap), true-Jaccard check, components, one survivor each."""
    ordered = sorted(shards)
    keys, texts, ids, created, sig_rows = [], [], [], [], []
    for s, path in enumerate(ordered):
        t = pq.read_table(path)
        sigs, ok = decode_signatures(t["_minhash"], step.bands * step.rows)
        keys += [(s << 32) + r for r in np.flatnonzero(ok)]
        texts += [x for x, k in zip(t["text"].to_pylist(), ok, strict=True) if k]
        ids += [x for x, k in zip(t["id"].to_pylist(), ok, strict=True) if k]
        created += [x or "" for x, k in zip(t["created"].to_pylist(), ok, strict=True) if k]
        sig_rows.append(sigs)
    bh = band_hashes(np.concatenate(sig_rows), step.bands, step.rows)
    buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i in range(len(keys)):
        for band in range(step.bands):
            buckets[(band, int(bh[i, band]))].append(i)
    pairs = set()
    for members in buckets.values():
        if len(members) > step.max_bucket_size:
            pairs |= {(members[0], m) for m in members[1:]}
        else:
            pairs |= {(x, y) for j, x in enumerate(members) for y in members[j + 1 :]}
    sets = shingle_sets(texts, step.ngram_size)
    edges = [(x, y) for x, y in sorted(pairs) if jaccard(sets[x], sets[y]) >= step.jaccard_threshold]
    parent = list(range(len(keys)))

    def find(x: int) -> int:
        while parent[x] != x:
            x = parent[x]
        return x

    for x, y in edges:
        parent[max(find(x), find(y))] = min(find(x), find(y))
    groups: dict[int, list[int]] = defaultdict(list)
    for x in {v for e in edges for v in e}:
        groups[find(x)].append(x)
    drops = []
    for members in groups.values():
        keep = members[survivor_index([created[m] for m in members], [ids[m] for m in members],
                                      [keys[m] for m in members], step.survivor)]
        drops += [(ordered[keys[m] >> 32], keys[m] & 0xFFFFFFFF, ids[m], ids[keep]) for m in members if m != keep]
    return sorted(drops)


@pytest.mark.parametrize("rule", ["earliest", "latest"])
def test_distributed_minhash_equals_the_in_memory_rule(rule: str, tmp_path: Path) -> None:
    docs = duplicate_corpus(300, seed=11)
    # a bucket cap of 3 turns the triples' buckets into star edges
    step = MinHashDedup(survivor=rule, partitions=5, max_bucket_size=3)
    shards = spread(tmp_path / "s", docs, 6, [step])
    out = step.find_duplicates(shards, tmp_path / "w", LOCAL)
    got = [(r["shard"], r["row"], r["id"], r["duplicate_of"]) for r in out.to_pylist()]
    assert got == _reference_minhash(shards, step)
    assert len(got) == 300 // 10 * 6  # every planted copy (exact ones too), nothing else
