"""MinHash near-duplicate removal, global across shards: vectorized signatures, LSH band buckets
shuffled through files, candidate pairs verified by true Jaccard, one survivor per component.

Shingles. Text is lowercased and split into words = maximal runs of Unicode letters/digits
(`str.isalnum`, the same as the regex `[^\\W_]+`); every other character separates words. A
shingle is `ngram_size` consecutive words; a document with fewer words is one shingle of all its
words; a document with no word has no signature and is never a near-duplicate.

Hashes. A word hashes to 64 bits as fmix64(Σ_j fmix64(cp_j·C1 + j·C2) ^ len·C3) over its code
points cp_j (a tabulation-style hash computed for a whole batch of documents at once in numpy; no
Python call per word). A shingle folds its word hashes (h = (h·M) ^ w, h ^= h >> 31) and ends
with fmix64. The 64-bit shingle hashes are the sets whose true Jaccard verifies candidates; their
top 32 bits feed MinHash. `shingle_hash_py` is the same function in plain Python, used as the
`hashfunc` of `datasketch.MinHash` in the parity test.

Permutations are datasketch's default "affine32" scheme, reproduced exactly: the 32-bit input is
pre-mixed by the MurmurHash3 finalizer, then h_k = a_k·x + b_k mod 2³² with a_k odd (a bijection)
and (a, b) drawn from `np.random.RandomState(seed)` as datasketch draws them. So for the same
shingles and seed our signature equals `datasketch.MinHash(num_perm, seed, hashfunc=...)`'s
hashvalues bit for bit; we only compute all documents × permutations in a few numpy calls. We
chose it over the older (a·x + b) mod (2⁶¹ - 1) scheme ("legacy" in datasketch ≥ 2.0) because
datasketch replaced that one as biased on large sets (its fold to 32 bits is not a bijection),
and because uint32 wrap-around needs no modulo: half the memory traffic of uint64.

`_minhash` attribute: the signature as little-endian uint32, bands·rows values (bytes), band b
being values [b·rows, (b+1)·rows); b"" when the document has no word.

Phase 2, through files only (no step holds a corpus-wide structure, the driver included):
1. band map (per shard): read only the `_minhash` column, hash each band's rows to 64 bits and
   write (band_hash, band, key) rows into partitions by band_hash; key = shard index in the sorted
   shard list << 32 | row;
2. buckets (per partition): equal (band, band_hash) → candidate pairs, sent to a verification
   partition by a hash of the pair (so a pair found in several bands meets itself), and a request
   for each member's text sent to the member's shard;
3. fetch (per shard): read the requested rows once (only their row groups) and send each text to
   the verification partitions that asked; ids and dates go to the partition of the key;
4. verify (per partition): keep the pairs whose true Jaccard of word-5-gram sets reaches the
   threshold, as edges of the component graph;
5. components (per partition, a few rounds): Large-Star / Small-Star (`components.py`) label
   each document with its component's smallest key;
6. survivors: labels meet ids and dates, each component meets in one task, and one survivor
   stays (`earliest`/`latest` `created`, then smallest id, then key, so two copies with one id
   still keep exactly one); the rest are sent to their shards' drop lists (`cluster.py`).

Defaults: Dolma 3 uses 26 bands × 11 rows with a true-Jaccard ≥ 0.8 check on word 5-grams (OLMo 3
report, Dolma 3 fuzzy dedup); FineWeb uses 14 × 8 on 5-grams with no Jaccard check (datatrove 0.10
`MinhashConfig`: n_grams=5, num_buckets=14, hashes_per_bucket=8). With 26 × 11 a pair at Jaccard
0.9 becomes a candidate with probability 1-(1-0.9¹¹)²⁶ ≈ 0.99994, at 0.8 ≈ 0.90, at 0.5 ≈ 0.013.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from functools import cache
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.dedup.cluster import (
    DedupStep,
    check_survivor_rule,
    doc_keys,
    group_drops,
    hash_partition,
    key_partition,
    read_columns,
    read_partition,
    read_rows,
    split_keys,
    write_drops_by_shard,
    write_partitioned,
)
from curation.dedup.components import EDGE_SCHEMA, label_components, node_labels, step_dir, write_edges
from curation.document import Document
from curation.executor import Executor

ATTR = "_minhash"
MASK64 = (1 << 64) - 1
MASK32 = (1 << 32) - 1
_C1, _C2, _C3 = 0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9
_M = 0xD6E8FEB86659FD93
# Largest shingle block multiplied by all permutations at once: bounds the temporary to
# num_perm × 4096 × 4 bytes (~4.7 MB at 286 permutations) for very long documents.
_BLOCK = 4096

_BAND_SCHEMA = pa.schema([("band_hash", pa.uint64()), ("band", pa.uint16()), ("key", pa.int64())])
_PAIR_SCHEMA = pa.schema([("key_a", pa.int64()), ("key_b", pa.int64())])
# A verification partition's request for a document's text, sent to the document's shard.
_REQUEST_SCHEMA = pa.schema([("key", pa.int64()), ("part", pa.int64())])
_TEXT_SCHEMA = pa.schema([("key", pa.int64()), ("text", pa.string())])
_DOCINFO_SCHEMA = pa.schema([("key", pa.int64()), ("id", pa.string()), ("created", pa.string())])
_MEMBER_SCHEMA = pa.schema([("label", pa.int64()), ("key", pa.int64()), ("id", pa.string()),
                            ("created", pa.string())])


# --------------------------------------------------------------------------------------------
# hashing: vectorized versions and their plain-Python references


def _fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer (in place on a uint64 array)."""
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xC4CEB9FE1A85EC53)
    h ^= h >> np.uint64(33)
    return h


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer, as datasketch's affine32 scheme applies it."""
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)
    return h


def _fmix64_py(h: int) -> int:
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & MASK64
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & MASK64
    return h ^ (h >> 33)


@cache
def _alnum_table() -> np.ndarray:
    """alnum[cp] for every code point: the word-character class of `str.isalnum` (~0.1 s, once)."""
    return np.frombuffer(
        bytes(chr(cp).isalnum() for cp in range(0x110000)), dtype=np.bool_
    )


def words(text: str) -> list[str]:
    """Reference tokenizer (plain Python): the words the vectorized path hashes."""
    low = text.lower()
    out, cur = [], []
    for ch in low:
        if ch.isalnum():
            cur.append(ch)
        elif cur:
            out.append("".join(cur))
            cur = []
    if cur:
        out.append("".join(cur))
    return out


def word_hash_py(word: str) -> int:
    acc = 0
    for j, ch in enumerate(word):
        acc = (acc + _fmix64_py((ord(ch) * _C1 + j * _C2) & MASK64)) & MASK64
    return _fmix64_py(acc ^ ((len(word) * _C3) & MASK64))


def shingle_hash_py(shingle: Sequence[str]) -> int:
    """64-bit hash of a shingle (a tuple of words): the reference for `shingle_hashes`."""
    hs = [word_hash_py(w) for w in shingle]
    h = hs[0]
    for w in hs[1:]:
        h = ((h * _M) & MASK64) ^ w
        h ^= h >> 31
    return _fmix64_py(h)


def shingle_hash32_py(shingle: Sequence[str]) -> int:
    """The 32 bits of a shingle hash that MinHash sees; pass as datasketch's `hashfunc`."""
    return shingle_hash_py(shingle) >> 32


def shingles_py(text: str, ngram_size: int) -> list[tuple[str, ...]]:
    ws = words(text)
    if not ws:
        return []
    if len(ws) < ngram_size:
        return [tuple(ws)]
    return [tuple(ws[i : i + ngram_size]) for i in range(len(ws) - ngram_size + 1)]


def _word_hashes(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of all words of all texts, in order, and each word's text index."""
    lows = [t.lower() for t in texts]
    big = " ".join(lows)  # a space never belongs to a word, so words never span two texts
    cps = np.frombuffer(big.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    idx = np.flatnonzero(_alnum_table()[cps])
    if idx.size == 0:
        return np.empty(0, np.uint64), np.empty(0, np.int64)
    first = np.empty(idx.size, dtype=np.bool_)
    first[0] = True
    np.not_equal(idx[1:], idx[:-1] + 1, out=first[1:])
    starts = np.flatnonzero(first)
    pos = np.arange(idx.size, dtype=np.int64) - starts[np.cumsum(first) - 1]
    v = cps[idx].astype(np.uint64) * np.uint64(_C1) + pos.astype(np.uint64) * np.uint64(_C2)
    wh = np.add.reduceat(_fmix64(v), starts)
    lengths = np.diff(np.append(starts, idx.size)).astype(np.uint64)
    wh = _fmix64(wh ^ (lengths * np.uint64(_C3)))
    text_start = np.cumsum([0] + [len(s) + 1 for s in lows[:-1]])
    text_of_word = np.searchsorted(text_start, idx[starts], side="right") - 1
    return wh, text_of_word


def _fold(h: np.ndarray, w: np.ndarray) -> np.ndarray:
    h *= np.uint64(_M)
    h ^= w
    h ^= h >> np.uint64(31)
    return h


def shingle_hashes(texts: Sequence[str], ngram_size: int) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of every shingle of every text (with repeats), grouped by text.

    Returns (hashes, offsets): text i's shingles are hashes[offsets[i]:offsets[i+1]].
    """
    n = ngram_size
    wh, tw = _word_hashes(texts)
    counts = np.bincount(tw, minlength=len(texts))
    span = len(wh) - n + 1
    if span > 0:
        h = wh[:span].copy()
        for k in range(1, n):
            h = _fold(h, wh[k : k + span])
        inside = tw[:span] == tw[n - 1 :]  # windows that do not cross into the next text
        hashes, owner = h[inside], tw[:span][inside]
    else:
        hashes, owner = np.empty(0, np.uint64), np.empty(0, np.int64)
    short = np.flatnonzero((counts > 0) & (counts < n))
    if short.size:
        # Texts with fewer than n words: one shingle of all their words.
        word_start = np.concatenate([[0], np.cumsum(counts)])
        extra = []
        for t in short:
            h1 = wh[word_start[t] : word_start[t] + 1].copy()
            for k in range(1, counts[t]):
                h1 = _fold(h1, wh[word_start[t] + k : word_start[t] + k + 1])
            extra.append(h1)
        hashes = np.concatenate([hashes, *extra])
        owner = np.concatenate([owner, short])
        order = np.argsort(owner, kind="stable")
        hashes, owner = hashes[order], owner[order]
    hashes = _fmix64(hashes)
    offsets = np.searchsorted(owner, np.arange(len(texts) + 1))
    return hashes, offsets


def _chunks(texts: Sequence[str], max_chars: int = 1 << 22) -> Iterator[tuple[int, int]]:
    """[lo, hi) ranges of texts with at most ~max_chars characters each (at least one text), so
    the per-character arrays of one vectorized call stay within a few hundred MB."""
    lo, size = 0, 0
    for i, t in enumerate(texts):
        if i > lo and size + len(t) > max_chars:
            yield lo, i
            lo, size = i, 0
        size += len(t)
    if lo < len(texts):
        yield lo, len(texts)


def shingle_sets(texts: Sequence[str], ngram_size: int) -> list[np.ndarray]:
    """Each text's set of shingle hashes (sorted, unique uint64)."""
    out: list[np.ndarray] = []
    for lo, hi in _chunks(texts):
        hashes, offsets = shingle_hashes(texts[lo:hi], ngram_size)
        out += [np.unique(hashes[offsets[i] : offsets[i + 1]]) for i in range(hi - lo)]
    return out


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """True Jaccard of two sorted unique shingle-hash sets (exact up to 64-bit collisions)."""
    if a.size == 0 and b.size == 0:
        return 1.0
    inter = np.intersect1d(a, b, assume_unique=True).size
    return inter / (a.size + b.size - inter)


# --------------------------------------------------------------------------------------------
# signatures and bands


class MinHasher:
    """All-at-once MinHash signatures with datasketch's affine32 permutations for `seed`."""

    def __init__(self, num_perm: int, seed: int = 1, ngram_size: int = 5) -> None:
        if num_perm < 1 or ngram_size < 1:
            raise ValueError("num_perm and ngram_size must be >= 1")
        self.num_perm = num_perm
        self.ngram_size = ngram_size
        gen = np.random.RandomState(seed)  # datasketch's MinHash._init_permutations, affine32
        a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
        b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
        self.a, self.b = a, b
        self._a_col, self._b_col = a[:, None].copy(), b[:, None].copy()

    def signatures(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(n, num_perm) uint32 signatures and a mask of texts that have at least one word."""
        out = np.full((len(texts), self.num_perm), MASK32, dtype=np.uint32)
        has_words = np.zeros(len(texts), dtype=np.bool_)
        for first, last in _chunks(texts):
            hashes, offsets = shingle_hashes(texts[first:last], self.ngram_size)
            x = _fmix32((hashes >> np.uint64(32)).astype(np.uint32))
            has_words[first:last] = np.diff(offsets) > 0
            for i in range(last - first):
                lo, hi = offsets[i], offsets[i + 1]
                row = out[first + i]
                for s in range(lo, hi, _BLOCK):
                    # (num_perm, block) in wrap-around uint32 arithmetic = mod 2^32, then min.
                    p = np.multiply.outer(self.a, x[s : min(hi, s + _BLOCK)])
                    p += self._b_col
                    np.minimum(row, p.min(axis=1), out=row)
        return out, has_words


def band_hashes(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n, bands) uint64 hash of each band's `rows` signature values.

    A collision of two different bands only adds a candidate pair, which verification rejects.
    """
    v = sigs.reshape(len(sigs), bands, rows).astype(np.uint64)
    h = np.full((len(sigs), bands), _C3, dtype=np.uint64)
    for r in range(rows):
        h = _fold(h, v[:, :, r])
    return _fmix64(h)


def decode_signatures(column: pa.ChunkedArray | pa.Array, num_perm: int) -> tuple[np.ndarray, np.ndarray]:
    """The `_minhash` column → (n, num_perm) uint32 and a mask of rows that have a signature."""
    values = column.to_pylist()
    width = num_perm * 4
    bad = {len(v) for v in values if v and len(v) != width}
    if bad:
        raise ValueError(
            f"_minhash values of {sorted(bad)} bytes, expected {width} (= bands·rows·4): phase 1 ran "
            "with another bands/rows setting"
        )
    ok = np.array([bool(v) for v in values], dtype=np.bool_)
    data = b"".join(v for v in values if v)
    sigs = np.frombuffer(data, dtype="<u4").reshape(-1, num_perm)
    return sigs, ok


# --------------------------------------------------------------------------------------------
# the step


class MinHashDedup(DedupStep):
    name: ClassVar[str] = "dedup_minhash"
    reason: ClassVar[str] = "dedup.minhash"

    def __init__(
        self,
        ngram_size: int = 5,
        bands: int = 26,
        rows: int = 11,
        jaccard_threshold: float = 0.8,
        survivor: str = "earliest",
        seed: int = 1,
        partitions: int = 16,
        *,
        max_bucket_size: int = 64,
        batch_size: int = 256,
    ) -> None:
        """`partitions`: hash partitions of every phase-2 shuffle (band buckets, verification,
        components); a partition task holds about docs·bands/partitions band rows, so raise it
        with the corpus to bound a worker's memory. `max_bucket_size`: a bucket with more members
        yields only the edges from its smallest key to the others (instead of all k² pairs),
        bounding work on templated pages; `batch_size`: documents per vectorized signature batch
        in `run`."""
        super().__init__()
        if bands < 1 or rows < 1 or ngram_size < 1 or partitions < 1:
            raise ValueError("ngram_size, bands, rows and partitions must be >= 1")
        if not 0.0 < jaccard_threshold <= 1.0:
            raise ValueError("jaccard_threshold must be in (0, 1]")
        if max_bucket_size < 2 or batch_size < 1:
            raise ValueError("max_bucket_size must be >= 2 and batch_size >= 1")
        self.ngram_size, self.bands, self.rows = ngram_size, bands, rows
        self.jaccard_threshold = jaccard_threshold
        self.survivor = check_survivor_rule(survivor)
        self.seed, self.partitions = seed, partitions
        self.max_bucket_size, self.batch_size = max_bucket_size, batch_size
        self.hasher = MinHasher(bands * rows, seed, ngram_size)

    # phase 1 --------------------------------------------------------------------------------

    def annotate(self, doc: Document) -> None:
        self.annotate_batch([doc])

    def annotate_batch(self, docs: Sequence[Document]) -> None:
        sigs, ok = self.hasher.signatures([d.text for d in docs])
        for doc, sig, has in zip(docs, sigs, ok, strict=True):
            doc.attributes[ATTR] = sig.astype("<u4").tobytes() if has else b""

    def run(self, docs: Iterable[Document]) -> Iterator[Document]:
        batch: list[Document] = []
        for doc in docs:
            batch.append(doc)
            if len(batch) >= self.batch_size:
                self.annotate_batch(batch)
                yield from batch
                batch = []
        if batch:
            self.annotate_batch(batch)
            yield from batch

    # phase 2 --------------------------------------------------------------------------------

    def find_drops(self, root: Path, shards: list[str], executor: Executor) -> int:
        c = self.stats.counters
        parts = self.partitions
        # Task arguments travel as small tuples in the items (not functools.partial), so any
        # executor that can ship a top-level function can run them.
        mapped = executor.map(
            _band_map_task,
            [(i, path, str(root), self.bands, self.rows, parts) for i, path in enumerate(shards)],
            desc="minhash: band shuffle",
        )
        c[f"{self.name}.docs"] += sum(m["docs"] for m in mapped)
        c[f"{self.name}.no_signature"] += sum(m["no_signature"] for m in mapped)
        reduced = executor.map(
            _bucket_reduce_task,
            [(p, str(root), self.max_bucket_size, parts) for p in range(parts)],
            desc="minhash: buckets",
        )
        c[f"{self.name}.large_buckets"] += sum(r["large_buckets"] for r in reduced)
        if not any(r["pairs"] for r in reduced):
            return 0
        executor.map(_fetch_task, [(i, path, str(root), parts) for i, path in enumerate(shards)],
                     desc="minhash: candidate texts")
        verified = executor.map(
            _verify_task,
            [(v, str(root), self.ngram_size, self.jaccard_threshold, parts) for v in range(parts)],
            desc="minhash: verify",
        )
        c[f"{self.name}.candidate_pairs"] += sum(v["pairs"] for v in verified)
        c[f"{self.name}.verified_pairs"] += sum(v["verified"] for v in verified)
        c[f"{self.name}.false_candidates"] += sum(v["pairs"] - v["verified"] for v in verified)
        if not any(v["verified"] for v in verified):
            return 0
        final = label_components(root / "components", parts, executor, desc="minhash: components")
        executor.map(_members_task, [(p, str(root), str(final), parts) for p in range(parts)],
                     desc="minhash: component members")
        grouped = executor.map(
            _survivor_task, [(q, str(root), self.survivor, self.reason) for q in range(parts)],
            desc="minhash: survivors",
        )
        c[f"{self.name}.clusters"] += sum(g["clusters"] for g in grouped)
        return sum(g["drops"] for g in grouped)


# --------------------------------------------------------------------------------------------
# phase-2 tasks (top-level functions, so Ray can pickle them)


def _band_map_task(task: tuple[int, str, str, int, int, int]) -> dict[str, int]:
    """One shard's signatures → (band_hash, band, key) rows, shuffled into partition files."""
    index, path, root, bands, rows, partitions = task
    table = read_columns(path, [ATTR], MinHashDedup.name)
    sigs, ok = decode_signatures(table[ATTR], bands * rows)
    keys = doc_keys(index, table.num_rows)[ok]
    bh = band_hashes(sigs, bands, rows)
    out = pa.table(
        {
            "band_hash": bh.ravel(),
            "band": np.tile(np.arange(bands, dtype=np.uint16), len(keys)),
            "key": np.repeat(keys, bands),
        },
        schema=_BAND_SCHEMA,
    )
    write_partitioned(out, hash_partition(bh.ravel(), partitions), Path(root) / "bands", index)
    return {"docs": table.num_rows, "no_signature": int((~ok).sum())}


def pair_partition(a: np.ndarray, b: np.ndarray, partitions: int) -> np.ndarray:
    """The verification partition of the pair (a, b), a < b: the same for every band that finds it."""
    return key_partition(np.asarray(a, dtype=np.int64) * np.int64(_M & MASK32) ^ np.asarray(b, dtype=np.int64),
                         partitions)


def _bucket_reduce_task(task: tuple[int, str, int, int]) -> dict[str, int]:
    """One partition: documents with an equal (band, band_hash) become candidate pairs, sent to
    their verification partition, with a request for each member's text to the member's shard."""
    p, root, max_bucket_size, partitions = task
    table = read_partition(Path(root) / "bands", p, _BAND_SCHEMA)
    h, band, key = (table[c].to_numpy() for c in ("band_hash", "band", "key"))
    order = np.lexsort((key, h, band))
    h, band, key = h[order], band[order], key[order]
    new = np.concatenate([[True], (h[1:] != h[:-1]) | (band[1:] != band[:-1]), [True]])
    bounds = np.flatnonzero(new)
    sizes = np.diff(bounds)
    starts = bounds[:-1]
    # Buckets of two (the common case) vectorized; larger ones one by one.
    two = starts[sizes == 2]
    pa_, pb_ = [key[two]], [key[two + 1]]
    large = 0
    for s, k in zip(starts[sizes > 2].tolist(), sizes[sizes > 2].tolist(), strict=True):
        members = key[s : s + k]
        if k > max_bucket_size:
            large += 1
            pa_.append(np.full(k - 1, members[0]))
            pb_.append(members[1:])
        else:
            i, j = _pairs_of(k)
            pa_.append(members[i])
            pb_.append(members[j])
    a, b = np.concatenate(pa_), np.concatenate(pb_)
    pairs = np.unique(np.stack([a, b], axis=1), axis=0) if len(a) else np.empty((0, 2), np.int64)
    a, b = pairs[:, 0], pairs[:, 1]
    v = pair_partition(a, b, partitions)
    write_partitioned(pa.table({"key_a": a, "key_b": b}, schema=_PAIR_SCHEMA), v, Path(root) / "pairs", p)
    req_key, req_v = np.concatenate([a, b]), np.concatenate([v, v])
    req = np.unique(np.stack([req_key, req_v], axis=1), axis=0) if len(a) else np.empty((0, 2), np.int64)
    write_partitioned(pa.table({"key": req[:, 0], "part": req[:, 1]}, schema=_REQUEST_SCHEMA),
                      split_keys(req[:, 0])[0], Path(root) / "requests", p)
    return {"pairs": len(a), "large_buckets": large}


@cache
def _pairs_of(k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(k, 1)


def _fetch_task(task: tuple[int, str, str, int]) -> dict[str, int]:
    """One shard: read the rows candidates asked for (only their row groups), once each, and send
    each text to every verification partition that asked for it; ids and dates go to the
    partition of the key, where the components' members meet them."""
    index, path, root, partitions = task
    req = read_partition(Path(root) / "requests", index, _REQUEST_SCHEMA)
    if not req.num_rows:
        return {"docs": 0}
    # A pair found in bands of several bucket partitions was asked for once by each of them
    asked = np.unique(np.stack([req["key"].to_numpy(), req["part"].to_numpy()], axis=1), axis=0)
    req_key, req_part = asked[:, 0], asked[:, 1]
    keys = np.unique(req_key)
    part = read_rows(path, split_keys(keys)[1], ["id", "text", "created"])
    texts = pc.fill_null(part["text"], "")
    at = pa.array(np.searchsorted(keys, req_key))
    write_partitioned(pa.table({"key": req_key, "text": pc.take(texts, at)}, schema=_TEXT_SCHEMA), req_part,
                      Path(root) / "texts", index)
    info = pa.table({"key": keys, "id": part["id"].cast(pa.string()),
                     "created": pc.fill_null(part["created"].cast(pa.string()), "")}, schema=_DOCINFO_SCHEMA)
    write_partitioned(info, key_partition(keys, partitions), Path(root) / "docinfo", index)
    return {"docs": len(keys)}


def _verify_task(task: tuple[int, str, int, float, int]) -> dict[str, int]:
    """One verification partition: its candidate pairs (each once) and their texts; the pairs whose
    true shingle Jaccard reaches the threshold become the edges of the component graph."""
    v, root, ngram_size, threshold, partitions = task
    pairs = read_partition(Path(root) / "pairs", v, _PAIR_SCHEMA)
    if not pairs.num_rows:
        return {"pairs": 0, "verified": 0}
    ab = np.unique(np.stack([pairs["key_a"].to_numpy(), pairs["key_b"].to_numpy()], axis=1), axis=0)
    a, b = ab[:, 0], ab[:, 1]
    texts = read_partition(Path(root) / "texts", v, _TEXT_SCHEMA).sort_by("key")
    keys = texts["key"].to_numpy()
    sets = shingle_sets(texts["text"].to_pylist(), ngram_size)
    ia, ib = np.searchsorted(keys, a), np.searchsorted(keys, b)
    jac = np.array([jaccard(sets[x], sets[y]) for x, y in zip(ia.tolist(), ib.tolist(), strict=True)])
    keep = jac >= threshold
    write_edges(a[keep], b[keep], step_dir(Path(root) / "components", 0), partitions, v)
    return {"pairs": len(a), "verified": int(keep.sum())}


def _members_task(task: tuple[int, str, str, int]) -> dict[str, int]:
    """One partition of nodes: each node's component label joined with its id and date, sent to
    the partition of the label so that each component meets in one task."""
    p, root, final, partitions = task
    nodes, labels = node_labels(read_partition(Path(final), p, EDGE_SCHEMA))
    if not len(nodes):
        return {"nodes": 0}
    info = read_partition(Path(root) / "docinfo", p, _DOCINFO_SCHEMA).sort_by("key")
    at = pa.array(np.searchsorted(info["key"].to_numpy(), nodes))
    members = pa.table({"label": labels, "key": nodes, "id": pc.take(info["id"], at),
                        "created": pc.take(info["created"], at)}, schema=_MEMBER_SCHEMA)
    write_partitioned(members, key_partition(labels, partitions), Path(root) / "members", p)
    return {"nodes": len(nodes)}


def _survivor_task(task: tuple[int, str, str, str]) -> dict[str, int]:
    """One partition of components: one survivor each; the other members' drops go to their shards."""
    q, root, rule, reason = task
    m = read_partition(Path(root) / "members", q, _MEMBER_SCHEMA)
    drops, clusters = group_drops(m["label"].to_numpy(), m["key"].to_numpy(), m["id"].to_pylist(),
                                  m["created"].to_pylist(), rule, reason)
    return {"clusters": clusters, "drops": write_drops_by_shard(drops, Path(root), q)}
