"""Deduplication, global across shards: exact (normalized-text hash) and MinHash near-duplicates.

Phase 1 (per shard): `step.annotate(doc)` stores the step's signal in an internal attribute
(`_exact_hash`: signed int64; `_minhash`: little-endian uint32 signature bytes), which the shard
writer keeps as a Parquet column. Phase 2 (global): `step.drop_rows(shards, workdir, executor)`
writes, per shard, a list (`shard`, `row`, `id`, `reason`, `duplicate_of`) of the rows to drop:
rows, not ids, since two documents can share an id (the same archive given under two names). All
of it runs in tasks through files; the caller gets one entry per shard (`cluster.ShardDrops`).
"""

from curation.dedup.cluster import DedupStep
from curation.dedup.exact import ExactDedup
from curation.dedup.minhash import MinHashDedup

__all__ = ["DedupStep", "ExactDedup", "MinHashDedup"]
