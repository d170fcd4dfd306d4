"""Exact dedup: documents whose normalized text is identical, across all shards.

Normalization (our choice, kept small so that only formatting differences merge): lowercase,
replace every character that is neither a letter/digit nor whitespace (punctuation, symbols,
underscore) by a space, then collapse runs of whitespace to one space and trim. "Hello,  World!"
and "hello world" are the same document; "colour" and "color" are not. The hash is xxHash3-64 of
the UTF-8 bytes, stored as a signed int64 (`_exact_hash`) so Parquet keeps it as int64; two
different texts share it with probability ~n²/2⁶⁵, so no text comparison follows.

Phase 2: one map task per shard sends (hash, key, id, created) rows to partitions by hash; one
task per partition keeps one survivor per hash group and sends the other rows to their shards'
drop lists (`cluster.py`). No task and no driver holds more than one partition.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from curation.dedup.cluster import (
    DedupStep,
    check_survivor_rule,
    doc_keys,
    group_drops,
    hash_partition,
    read_columns,
    read_partition,
    write_drops_by_shard,
    write_partitioned,
)
from curation.document import Document
from curation.executor import Executor

ATTR = "_exact_hash"
_NOT_WORD_OR_SPACE = re.compile(r"[^\w\s]|_")
_SHUFFLE_SCHEMA = pa.schema([("hash", pa.int64()), ("key", pa.int64()), ("id", pa.string()),
                             ("created", pa.string())])


def normalize(text: str) -> str:
    return " ".join(_NOT_WORD_OR_SPACE.sub(" ", text.lower()).split())


def exact_hash(text: str) -> int:
    """Signed 64-bit xxHash3 of the normalized text."""
    h = xxhash.xxh3_64_intdigest(normalize(text).encode("utf-8", "surrogatepass"))
    return h - (1 << 64) if h >= 1 << 63 else h


class ExactDedup(DedupStep):
    name: ClassVar[str] = "dedup_exact"
    reason: ClassVar[str] = "dedup.exact"

    def __init__(self, survivor: str = "earliest", partitions: int = 16) -> None:
        super().__init__()
        self.survivor = check_survivor_rule(survivor)
        if partitions < 1:
            raise ValueError("partitions must be >= 1")
        self.partitions = partitions

    def annotate(self, doc: Document) -> None:
        doc.attributes[ATTR] = exact_hash(doc.text)

    def find_drops(self, root: Path, shards: list[str], executor: Executor) -> int:
        # Task arguments travel as small tuples in the items (not functools.partial), so any
        # executor that can ship a top-level function can run them.
        counts = executor.map(
            _map_shard,
            [(i, path, str(root), self.partitions) for i, path in enumerate(shards)],
            desc="exact dedup: hash shuffle",
        )
        results = executor.map(
            _reduce_partition,
            [(p, str(root), self.survivor, self.reason) for p in range(self.partitions)],
            desc="exact dedup: groups",
        )
        c = self.stats.counters
        c[f"{self.name}.docs"] += sum(x["docs"] for x in counts)
        c[f"{self.name}.no_hash"] += sum(x["no_hash"] for x in counts)
        c[f"{self.name}.groups"] += sum(x["groups"] for x in results)
        return sum(x["drops"] for x in results)


def _map_shard(task: tuple[int, str, str, int]) -> dict[str, int]:
    """Map task: one shard's (hash, key, id, created) rows into `partitions` files by hash."""
    index, path, root, partitions = task
    table = read_columns(path, ["id", "created", ATTR], ExactDedup.name)
    keys = doc_keys(index, table.num_rows)
    valid = pc.is_valid(table[ATTR]).to_numpy(zero_copy_only=False)
    table = table.filter(pa.array(valid))
    hashes = table[ATTR].to_numpy().astype(np.int64)
    out = pa.table(
        {"hash": hashes, "key": keys[valid], "id": table["id"].cast(pa.string()),
         "created": pc.fill_null(table["created"].cast(pa.string()), "")},
        schema=_SHUFFLE_SCHEMA,
    )
    write_partitioned(out, hash_partition(hashes, partitions), Path(root) / "shuffle", index)
    return {"docs": len(valid), "no_hash": int((~valid).sum())}


def _reduce_partition(task: tuple[int, str, str, str]) -> dict[str, int]:
    """Reduce task: one partition's rows grouped by hash; all but one survivor per group drop,
    written towards their shards' drop lists."""
    p, root, rule, reason = task
    table = read_partition(Path(root) / "shuffle", p, _SHUFFLE_SCHEMA)
    drops, groups = group_drops(
        table["hash"].to_numpy(), table["key"].to_numpy(), table["id"].to_pylist(),
        table["created"].to_pylist(), rule, reason,
    )
    return {"groups": groups, "drops": write_drops_by_shard(drops, Path(root), p)}
