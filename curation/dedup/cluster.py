"""Shared machinery of the global dedup phase: the step base class, the file shuffle, the survivor
rule, and the per-shard drop lists every step ends with.

No corpus-wide structure ever meets on one node, the driver included: map tasks read one shard's
columns and write rows into partition files keyed by a hash; reduce tasks read one partition
each; the rows a step drops are shuffled once more, by the shard they belong to, and one task
per shard writes that shard's drop list. The driver sees only counts and file names. Every file
is written under a temporary name and renamed, so a retried task (Ray retries) never leaves a
half-written file.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq

from curation.document import Document
from curation.executor import Executor
from curation.step import Step
from curation.writer import tmp_path
from curation.writer import write_parquet_table as write_table_atomic

SURVIVOR_RULES = ("earliest", "latest")

# A document's key in phase 2: its shard's position in the sorted shard list, then its row.
# Sorting the shard paths first makes keys, and every tie broken by them, independent of the
# order in which shards are given.
ROW_BITS = 32

# A drop names a row (its phase-1 shard as given, and its row in that shard), not an id: two rows
# can share an id (the same archive read under two names), and dropping by id would drop both.
DROP_SCHEMA = pa.schema([("shard", pa.string()), ("row", pa.int64()), ("id", pa.string()),
                         ("reason", pa.string()), ("duplicate_of", pa.string())])
# The same rows on their way to their shard's list: named by key until the shard task names them.
_KEYED_DROP_SCHEMA = pa.schema([("key", pa.int64()), ("id", pa.string()), ("reason", pa.string()),
                                ("duplicate_of", pa.string())])
SHARD_LIST = "shards.json"
DROPS_DIR = "drops"  # the per-shard drop lists, the only files a step leaves behind
_BY_SHARD = "by_shard"  # drops shuffled by shard, before each shard's task sorts them into its list


@dataclass(frozen=True)
class ShardDrops:
    """What a step found for one phase-1 shard: its drop list (DROP_SCHEMA, sorted by row; ""
    when nothing drops) and the number of rows in it."""

    shard: str
    file: str
    rows: int


class DedupStep(Step):
    """A dedup step: `annotate` stores a per-document signal in an internal ("_") attribute in
    phase 1; `drop_rows` reads those columns back from every phase-1 shard and writes, per shard,
    the rows to drop (DROP_SCHEMA: shard, row, id, reason, and the id of the copy that stays).

    Subclasses implement `annotate` and `find_drops`."""

    name: ClassVar[str] = "dedup"
    reason: ClassVar[str] = "dedup"

    def annotate(self, doc: Document) -> None:
        raise NotImplementedError

    def run(self, docs: Iterable[Document]) -> Iterator[Document]:
        for doc in docs:
            self.annotate(doc)
            yield doc

    def find_drops(self, root: Path, shards: list[str], executor: Executor) -> int:
        """Find the rows to drop among `shards` (sorted; a shard's index is its key prefix) and
        write them with `write_drops_by_shard` under `root`; return how many were written."""
        raise NotImplementedError

    def drop_rows(self, shards: Sequence[str], workdir: Path | str, executor: Executor) -> list[ShardDrops]:
        """Run the step over all `shards`; one ShardDrops per shard, in the order given.

        The lists are left in `workdir/<name>/drops/`; every intermediate file is removed. What
        comes back to the caller is O(shards), whatever the corpus size."""
        root, ordered = prepare_workdir(workdir, self.name, shards)
        found = [{"rows": 0, "file": ""}] * len(ordered)
        if self.find_drops(root, ordered, executor):
            found = executor.map(_shard_drops_task, [(i, path, str(root)) for i, path in enumerate(ordered)],
                                 desc=f"{self.name}: drops per shard")
        for sub in root.iterdir():
            if sub.is_dir() and sub.name != DROPS_DIR:
                shutil.rmtree(sub)
        by_path = {p: ShardDrops(p, r["file"], r["rows"]) for p, r in zip(ordered, found, strict=True)}
        return [by_path[str(s)] for s in shards]

    def find_duplicates(self, shards: Sequence[str], workdir: Path | str, executor: Executor) -> pa.Table:
        """All drops in one table, ordered by key (shard path, then row). For tests and small
        inputs: the pipeline reads each shard's list on its own (`drop_rows`)."""
        drops = sorted(self.drop_rows(shards, workdir, executor), key=lambda d: d.shard)
        tables = [pq.read_table(d.file, schema=DROP_SCHEMA) for d in drops if d.file]
        return pa.concat_tables(tables) if tables else DROP_SCHEMA.empty_table()


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
    (root / SHARD_LIST).write_text(json.dumps(ordered))
    return root, ordered


def load_shard_list(root: Path) -> list[str]:
    return json.loads((root / SHARD_LIST).read_text())


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


def write_shuffle_file(table: pa.Table, final: Path) -> None:
    """One shuffle file, atomically. Arrow IPC with LZ4, not Parquet: a shuffle writes up to
    sources × partitions small files, read once, and IPC writes them ~3× and reads them ~9× faster."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(final)
    feather.write_feather(table, tmp, compression="lz4")
    os.replace(tmp, final)


def write_partitioned(table: pa.Table, part: np.ndarray, root: Path, source: int) -> None:
    """Shuffle map side: row i goes to partition part[i], file root/p{part}/s{source}.arrow.

    Only partitions that receive rows get a file, so a shuffle into one partition per shard
    (hundreds of thousands) costs what the rows cost."""
    part = np.asarray(part, dtype=np.int64)
    if not len(part):
        return
    order = np.argsort(part, kind="stable")
    sorted_part = part[order]
    bounds = np.flatnonzero(np.concatenate([[True], sorted_part[1:] != sorted_part[:-1], [True]]))
    for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        rows = table.take(pa.array(order[lo:hi]))
        write_shuffle_file(rows, root / f"p{int(sorted_part[lo]):05d}" / f"s{source:06d}.arrow")


def read_partition(root: Path, p: int, schema: pa.Schema) -> pa.Table:
    """Shuffle reduce side: every map task's file for partition p, in source order."""
    folder = root / f"p{p:05d}"
    files = sorted(folder.glob("s*.arrow")) if folder.is_dir() else []
    if not files:
        return schema.empty_table()
    return pa.concat_tables([feather.read_table(f).cast(schema) for f in files])


def hash_partition(hashes: np.ndarray, partitions: int) -> np.ndarray:
    """Partition of an already uniform 64-bit hash."""
    return (np.asarray(hashes).view(np.uint64) % np.uint64(partitions)).astype(np.int64)


def key_partition(keys: np.ndarray, partitions: int) -> np.ndarray:
    """Partition of a document key (or a component label): keys of one shard are consecutive
    numbers, so they are mixed first (Fibonacci hashing, the top 32 bits of key·2⁶⁴/φ)."""
    mixed = np.asarray(keys, dtype=np.int64).view(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return ((mixed >> np.uint64(32)) % np.uint64(partitions)).astype(np.int64)


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


def group_drops(
    group_of: np.ndarray, keys: np.ndarray, ids: Sequence[str], created: Sequence[str], rule: str, reason: str
) -> tuple[list[tuple[int, str, str, str]], int]:
    """For rows labelled by group, keep one survivor per group and list every other row as a
    drop (key, id, reason, survivor's id). Returns the drops and the number of groups.

    Members are rows, so copies that share an id (the same archive read twice) are deduplicated
    like any others: the survivor rule's last tie-break, the key, keeps exactly one of them.
    """
    order = np.lexsort((keys, group_of))
    g = group_of[order]
    bounds = np.flatnonzero(np.concatenate([[True], g[1:] != g[:-1], [True]]))
    drops: list[tuple[int, str, str, str]] = []
    groups = 0
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        if hi - lo < 2:
            continue
        groups += 1
        idx = order[lo:hi].tolist()
        m_ids = [ids[i] for i in idx]
        m_keys = [int(keys[i]) for i in idx]
        keep = survivor_index([created[i] for i in idx], m_ids, m_keys, rule)
        drops.extend((m_keys[j], m_ids[j], reason, m_ids[keep]) for j in range(len(idx)) if j != keep)
    return drops, groups


def write_drops_by_shard(drops: Sequence[tuple[int, str, str, str]], root: Path, source: int) -> int:
    """One task's drops (key, id, reason, survivor's id) → the shuffle by shard that
    `drop_rows` collects into per-shard lists. Returns how many were written."""
    if not drops:
        return 0
    keys = np.array([d[0] for d in drops], dtype=np.int64)
    table = pa.table(
        {"key": keys, "id": [d[1] for d in drops], "reason": [d[2] for d in drops],
         "duplicate_of": [d[3] for d in drops]},
        schema=_KEYED_DROP_SCHEMA,
    )
    write_partitioned(table, split_keys(keys)[0], root / _BY_SHARD, source)
    return len(drops)


def _shard_drops_task(task: tuple[int, str, str]) -> dict[str, int | str]:
    """One shard's drops from every task that found some → its list, sorted by row."""
    index, path, root = task
    table = read_partition(Path(root) / _BY_SHARD, index, _KEYED_DROP_SCHEMA)
    if not table.num_rows:
        return {"rows": 0, "file": ""}
    table = table.sort_by("key")
    _, rows = split_keys(table["key"].to_numpy())
    out = pa.table(
        {"shard": pa.array([path] * table.num_rows, pa.string()), "row": rows, "id": table["id"],
         "reason": table["reason"], "duplicate_of": table["duplicate_of"]},
        schema=DROP_SCHEMA,
    )
    file = Path(root) / DROPS_DIR / f"s{index:06d}.parquet"
    write_table_atomic(out, file)
    return {"rows": out.num_rows, "file": str(file)}
