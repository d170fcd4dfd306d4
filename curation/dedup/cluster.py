"""Shared machinery of the global dedup phase: the step base class, the file shuffle, union-find
and the survivor rule.

Phase 2 never holds a corpus-wide structure on one node: map tasks read one shard's columns and
write rows into `partitions` files keyed by a hash; reduce tasks read one partition each. Only
the small outputs (candidate edges, drops) meet on the driver. Every file is written under a
temporary name and renamed, so a retried task (Ray retries) never leaves a half-written file.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation.document import Document
from curation.executor import Executor
from curation.step import Step
from curation.writer import write_parquet_table as write_table_atomic

SURVIVOR_RULES = ("earliest", "latest")

# A document's key in phase 2: its shard's position in the sorted shard list, then its row.
# Sorting the shard paths first makes keys, and every tie broken by them, independent of the
# order in which shards are given.
ROW_BITS = 32

DROP_SCHEMA = pa.schema([("id", pa.string()), ("reason", pa.string()), ("duplicate_of", pa.string())])


class DedupStep(Step):
    """A dedup step: `annotate` stores a per-document signal in an internal ("_") attribute in
    phase 1; `find_duplicates` reads those columns back from every phase-1 shard and returns the
    documents to drop, with the id of the copy that stays."""

    name: ClassVar[str] = "dedup"
    reason: ClassVar[str] = "dedup"

    def annotate(self, doc: Document) -> None:
        raise NotImplementedError

    def run(self, docs: Iterable[Document]) -> Iterator[Document]:
        for doc in docs:
            self.annotate(doc)
            yield doc

    def find_duplicates(self, shards: Sequence[str], workdir: Path, executor: Executor) -> pa.Table:
        raise NotImplementedError


def check_survivor_rule(survivor: str) -> str:
    if survivor not in SURVIVOR_RULES:
        raise ValueError(f"survivor must be one of {SURVIVOR_RULES}, got {survivor!r}")
    return survivor


def prepare_workdir(workdir: Path | str, name: str, shards: Sequence[str]) -> tuple[Path, list[str]]:
    """Make an empty scratch folder for one step and record the sorted shard list in it.

    Returns the folder and the sorted shards; a shard's index in that list is its key prefix.
    """
    ordered = sorted(str(s) for s in shards)
    if len(set(ordered)) != len(ordered):
        raise ValueError("the same phase-1 shard is listed twice")
    root = Path(workdir) / name
    if root.exists():
        shutil.rmtree(root)  # stale files of an earlier, interrupted run
    root.mkdir(parents=True)
    (root / "shards.json").write_text(json.dumps(ordered))
    return root, ordered


def load_shard_list(root: Path) -> list[str]:
    return json.loads((root / "shards.json").read_text())


def doc_keys(shard_index: int, n_rows: int) -> np.ndarray:
    return (np.int64(shard_index) << np.int64(ROW_BITS)) + np.arange(n_rows, dtype=np.int64)


def split_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Key → (shard index, row)."""
    keys = np.asarray(keys, dtype=np.int64)
    return keys >> np.int64(ROW_BITS), keys & np.int64((1 << ROW_BITS) - 1)


def read_columns(path: str, columns: Sequence[str], step: str) -> pa.Table:
    """Read columns of a phase-1 shard, with an error that says which step's column is missing."""
    schema = pq.read_schema(path)
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise ValueError(f"{path}: phase-1 shard lacks column(s) {missing}; was {step} in the shard phase?")
    return pq.read_table(path, columns=list(columns))


def read_rows(path: str, rows: np.ndarray, columns: Sequence[str]) -> pa.Table:
    """Read only `rows` (sorted or not) of a Parquet file: only the row groups that hold them."""
    pf = pq.ParquetFile(path)
    sizes = np.array([pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= starts[-1]):
        raise ValueError(f"{path}: row out of range (file has {starts[-1]} rows)")
    groups = np.searchsorted(starts, rows, side="right") - 1
    needed = np.unique(groups)
    table = pf.read_row_groups(needed.tolist(), columns=list(columns))
    # Where each needed row group begins inside the table just read.
    base = np.zeros(len(sizes), dtype=np.int64)
    base[needed] = np.concatenate([[0], np.cumsum(sizes[needed])[:-1]])
    return table.take(pa.array(rows - starts[groups] + base[groups]))


def write_partitioned(table: pa.Table, part: np.ndarray, partitions: int, root: Path, shard_index: int) -> None:
    """Shuffle map side: row i goes to partition part[i], file root/p{p}/s{shard}.parquet."""
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(partitions + 1))
    for p in range(partitions):
        lo, hi = bounds[p], bounds[p + 1]
        if hi > lo:
            write_table_atomic(table.take(pa.array(order[lo:hi])), root / f"p{p:05d}" / f"s{shard_index:06d}.parquet")


def read_partition(root: Path, p: int, schema: pa.Schema) -> pa.Table:
    """Shuffle reduce side: every map task's file for partition p, in shard order."""
    folder = root / f"p{p:05d}"
    files = sorted(folder.glob("s*.parquet")) if folder.is_dir() else []
    if not files:
        return schema.empty_table()
    return pa.concat_tables([pq.read_table(f, schema=schema) for f in files])


def hash_partition(hashes: np.ndarray, partitions: int) -> np.ndarray:
    return (np.asarray(hashes).view(np.uint64) % np.uint64(partitions)).astype(np.int64)


def connected_components(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Union-find over the edges (a[i], b[i]) of int64 keys.

    Returns (nodes, root) with nodes sorted and root[i] the smallest key in nodes[i]'s component,
    so component labels do not depend on edge order.
    """
    nodes, inv = np.unique(np.concatenate([a, b]).astype(np.int64), return_inverse=True)
    parent = np.arange(len(nodes), dtype=np.int64)
    ea, eb = inv[: len(a)].tolist(), inv[len(a):].tolist()
    par = parent.tolist()

    def find(x: int) -> int:
        while par[x] != x:
            par[x] = par[par[x]]  # path halving
            x = par[x]
        return x

    for x, y in zip(ea, eb, strict=True):
        rx, ry = find(x), find(y)
        if rx != ry:
            # The smaller index (= smaller key, nodes are sorted) becomes the root.
            if rx < ry:
                par[ry] = rx
            else:
                par[rx] = ry
    roots = np.array([find(i) for i in range(len(nodes))], dtype=np.int64)
    return nodes, nodes[roots] if len(nodes) else roots


def survivor_index(created: Sequence[str], ids: Sequence[str], keys: Sequence[int], rule: str) -> int:
    """The member of a duplicate group that stays.

    `earliest`: the earliest `created`; `latest`: the latest. Ties, then smallest id, then key.
    Dates compare as strings (ISO 8601 in one time zone sorts correctly); a member without a date
    loses to any dated one under both rules, since its age is unknown.
    """
    members = range(len(ids))
    dated = [i for i in members if created[i]]
    pool = dated or list(members)
    if rule == "latest" and dated:
        newest = max(created[i] for i in dated)
        pool = [i for i in dated if created[i] == newest]
    return min(pool, key=lambda i: (created[i] == "", created[i], ids[i], keys[i]))


def drops_table(rows: Iterable[tuple[str, str, str]]) -> pa.Table:
    """(id, reason, duplicate_of) rows → the contract's table, sorted by id for stable output."""
    rows = sorted(rows)
    return pa.table(
        {
            "id": pa.array([r[0] for r in rows], pa.string()),
            "reason": pa.array([r[1] for r in rows], pa.string()),
            "duplicate_of": pa.array([r[2] for r in rows], pa.string()),
        },
        schema=DROP_SCHEMA,
    )


def group_drops(
    group_of: np.ndarray, keys: np.ndarray, ids: Sequence[str], created: Sequence[str], rule: str, reason: str
) -> tuple[list[tuple[str, str, str]], dict[str, Any]]:
    """For rows labelled by group, keep one survivor per group and list the others as drops.

    A dropped row whose id equals its survivor's id is skipped (dropping by id would also drop
    the survivor) and counted instead.
    """
    order = np.lexsort((keys, group_of))
    g = group_of[order]
    bounds = np.flatnonzero(np.concatenate([[True], g[1:] != g[:-1], [True]]))
    drops: list[tuple[str, str, str]] = []
    same_id = 0
    groups = 0
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        if hi - lo < 2:
            continue
        groups += 1
        idx = order[lo:hi].tolist()
        m_ids = [ids[i] for i in idx]
        m_created = [created[i] for i in idx]
        keep = survivor_index(m_created, m_ids, [int(keys[i]) for i in idx], rule)
        for j, doc_id in enumerate(m_ids):
            if j == keep:
                continue
            if doc_id == m_ids[keep]:
                same_id += 1
                continue
            drops.append((doc_id, reason, m_ids[keep]))
    return drops, {"groups": groups, "same_id_skipped": same_id}
