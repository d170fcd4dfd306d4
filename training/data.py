"""Token shards and the mixture data loader the trainer reads.

Reads the token-shard contract written by `refinery tokenize` (see `curation/tokenize.py`; this
module does not import it): a `manifest.json` with `format`, `dtype`, `vocab_size`, `eos_id`,
`total_tokens`, `total_text_bytes` and `shards` (each `path`, `tokens`, `nbytes`, `dtype`), beside
flat 1-D `.npy` token files with EOS after every document. A manifest marked incomplete
(`complete: false`, or a non-empty `failed`: some inputs failed to tokenize) is refused.

Sampling (`MixtureLoader`):
- A pool is one token manifest, read as one concatenated token stream, cut into windows of
  `seq_len + 1` tokens starting every seq_len tokens (window k covers [k*seq_len, (k+1)*seq_len];
  inputs are its first seq_len tokens, targets its last seq_len, so neighbours share one token and
  each token is a target once per epoch). Windows cross document boundaries: documents are
  packed, separated by EOS.
- Each epoch of a pool visits its windows in a fresh permutation seeded by (seed, pool, epoch).
- Each row of a global batch picks a pool with probability proportional to its weight among the
  pools not yet exhausted. A pool is exhausted after `max_repetition` epochs (may be fractional;
  `null` means unlimited); its weight is then shared by the others in proportion to theirs. When
  every pool is exhausted the loader stops, dropping the incomplete last batch on every rank.
- Every rank computes the same global batch from (seed, step) and keeps rows rank::world_size, so
  the global batch does not depend on the number of processes, and `state_dict()` (step and
  windows consumed per pool) is all a resumed run needs to continue with the same batches.
"""

from __future__ import annotations

import json
import math
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

MANIFEST_FORMAT_PREFIX = "refinery.tokens/"
MIX_KEYS = {"pools", "seed", "name", "description"}
POOL_KEYS = {"name", "manifest", "weight", "max_repetition", "description"}


def _manifest_path(path: str | Path) -> Path:
    path = Path(path)
    return path / "manifest.json" if path.is_dir() else path


class TokenShards:
    """The shards of one token manifest, memory-mapped and checked against the manifest."""

    def __init__(self, manifest: str | Path, max_open: int = 128) -> None:
        self.path = _manifest_path(manifest)
        self.max_open = max_open
        if not self.path.is_file():
            raise FileNotFoundError(f"token manifest not found: {self.path}")
        m = json.loads(self.path.read_text())
        if not str(m.get("format", "")).startswith(MANIFEST_FORMAT_PREFIX):
            raise ValueError(f"{self.path} is not a token manifest (format {m.get('format')!r}, "
                             f"expected {MANIFEST_FORMAT_PREFIX}*)")
        if m.get("complete") is False or m.get("failed"):
            failed = m.get("failed") or []
            first = f" (first: {failed[0].get('input')}: {failed[0].get('error')})" if failed else ""
            raise ValueError(f"{self.path} is from a tokenize run that did not finish: {len(failed)} input "
                             f"files failed{first}; fix or remove them and rerun `refinery tokenize`")
        self.manifest = m
        self.root = self.path.parent
        self.dtype = np.dtype(m["dtype"])
        self.vocab_size = int(m["vocab_size"])
        self.eos_id = int(m["eos_id"])
        self.bos_id = m.get("bos_id")
        self.tokenizer_sha1 = m.get("tokenizer_sha1")
        if self.dtype.kind != "u" or self.vocab_size > np.iinfo(self.dtype).max + 1:
            raise ValueError(f"{self.path}: vocab_size {self.vocab_size} does not fit dtype {self.dtype.name}")
        self.shards = [s for s in m["shards"] if s["tokens"] > 0]
        # Headers are checked now; data is memory-mapped on first read and at most `max_open`
        # maps are kept, so a corpus of thousands of shards does not exhaust file descriptors.
        self._layout = [self._check(s) for s in self.shards]
        self._maps: OrderedDict[int, np.memmap] = OrderedDict()
        lengths = np.array([s["tokens"] for s in self.shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(lengths)])
        self.total_tokens = int(self.starts[-1])
        if "total_tokens" in m and int(m["total_tokens"]) != self.total_tokens:
            raise ValueError(f"{self.path}: total_tokens {m['total_tokens']} disagrees with its shards "
                             f"({self.total_tokens})")
        self.text_bytes = m.get("total_text_bytes")

    def _check(self, s: dict[str, Any]) -> tuple[Path, int]:
        """Validate one shard against the manifest; returns its path and data offset."""
        p = self.root / s["path"]
        if not p.is_file():
            raise FileNotFoundError(f"token shard {p} listed in {self.path} is missing")
        size = p.stat().st_size
        if "nbytes" in s and size != s["nbytes"]:
            raise ValueError(f"token shard {p} is {size} bytes but {self.path} says {s['nbytes']}: "
                             "truncated or overwritten; re-run tokenize")
        try:
            with open(p, "rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read_header(f)
                offset = f.tell()
        except ValueError as e:
            raise ValueError(f"token shard {p} is not a readable .npy file: {e}") from e
        want = np.dtype(s.get("dtype", self.dtype))
        if dtype != want or dtype != self.dtype:
            raise ValueError(f"token shard {p} has dtype {dtype.name}, but {self.path} says "
                             f"{want.name} (manifest dtype {self.dtype.name})")
        if len(shape) != 1 or shape[0] != s["tokens"] or size < offset + shape[0] * dtype.itemsize:
            raise ValueError(f"token shard {p} ({size} bytes, header shape {shape}) does not hold the "
                             f"{s['tokens']} tokens {self.path} lists: truncated or overwritten; re-run tokenize")
        return p, offset

    def _array(self, i: int) -> np.memmap:
        arr = self._maps.pop(i, None)
        if arr is None:
            p, offset = self._layout[i]
            arr = np.memmap(p, dtype=self.dtype, mode="r", offset=offset, shape=(self.shards[i]["tokens"],))
            if len(self._maps) >= self.max_open:
                self._maps.popitem(last=False)
        self._maps[i] = arr
        return arr

    def __len__(self) -> int:
        return self.total_tokens

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the concatenated stream, as int64."""
        if start < 0 or start + length > self.total_tokens:
            raise IndexError(f"range [{start}, {start + length}) outside {self.total_tokens} tokens")
        out = np.empty(length, dtype=np.int64)
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        filled = 0
        while filled < length:
            lo = start + filled - int(self.starts[i])
            arr = self._array(i)
            take = min(length - filled, len(arr) - lo)
            out[filled:filled + take] = arr[lo:lo + take]
            filled += take
            i += 1
        return out

    @property
    def bytes_per_token(self) -> float | None:
        """UTF-8 text bytes per token (EOS included in tokens), for bits per byte; None if unknown."""
        if not self.text_bytes or not self.total_tokens:
            return None
        return self.text_bytes / self.total_tokens


def bytes_per_token(manifest: str | Path) -> float | None:
    """UTF-8 bytes of the tokenized text per token, from the manifest alone (no shard reads).

    Bits per byte = (mean loss in nats per token / ln 2) / bytes_per_token.
    """
    m = json.loads(_manifest_path(manifest).read_text())
    tokens, text_bytes = m.get("total_tokens"), m.get("total_text_bytes")
    return text_bytes / tokens if tokens and text_bytes else None


@dataclass
class PoolSpec:
    name: str
    manifest: Path
    weight: float = 1.0
    max_repetition: float | None = None  # epochs; None = unlimited


def load_mix(mix: str | Path | dict[str, Any]) -> tuple[list[PoolSpec], int | None]:
    """Read a mix manifest (JSON/YAML dict, or a path to one) or a single token manifest.

    Returns the pools and the mix's seed (None if it gives none). Relative manifest paths are
    resolved against the mix file's folder. Unknown keys are errors, so a typo never goes unseen.
    """
    base = Path.cwd()
    if not isinstance(mix, dict):
        path = Path(mix)
        if path.is_dir() or path.name == "manifest.json":
            mp = _manifest_path(path)
            return [PoolSpec(name=mp.parent.name, manifest=mp)], None
        if not path.is_file():
            raise FileNotFoundError(f"mix manifest not found: {path}")
        text = path.read_text()
        data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
        if isinstance(data, dict) and "shards" in data:  # a token manifest under another name
            return [PoolSpec(name=path.parent.name, manifest=path)], None
        base = path.parent
        mix = data
    if not isinstance(mix, dict) or not isinstance(mix.get("pools"), list) or not mix["pools"]:
        raise ValueError("a mix manifest needs a non-empty 'pools' list")
    if unknown := set(mix) - MIX_KEYS:
        raise ValueError(f"unknown mix keys {sorted(unknown)}; allowed: {sorted(MIX_KEYS)}")
    pools = []
    for i, p in enumerate(mix["pools"]):
        if unknown := set(p) - POOL_KEYS:
            raise ValueError(f"pool {i}: unknown keys {sorted(unknown)}; allowed: {sorted(POOL_KEYS)}")
        if "manifest" not in p:
            raise ValueError(f"pool {i} has no 'manifest'")
        manifest = _manifest_path(base / p["manifest"])
        weight = float(p.get("weight", 1.0))
        rep = p.get("max_repetition")
        if weight < 0 or not math.isfinite(weight):
            raise ValueError(f"pool {i}: weight must be a finite number >= 0, got {weight}")
        if rep is not None and not (math.isfinite(float(rep)) and float(rep) > 0):
            raise ValueError(f"pool {i}: max_repetition must be a finite number > 0 or null (unlimited), "
                             f"got {rep}")
        pools.append(PoolSpec(name=str(p.get("name", manifest.parent.name)), manifest=manifest,
                              weight=weight, max_repetition=None if rep is None else float(rep)))
    names = [p.name for p in pools]
    if len(set(names)) != len(names):
        raise ValueError(f"pool names must be unique, got {names}")
    if sum(p.weight for p in pools) <= 0:
        raise ValueError("at least one pool needs a positive weight")
    seed = mix.get("seed")
    return pools, None if seed is None else int(seed)


class MixtureLoader:
    """Yields `(inputs, targets)` LongTensors of shape [global_batch_size // world_size, seq_len].

    See the module docstring for the sampling rules. `vocab_size`, if given (the model's), is
    checked against every pool's tokenizer so an out-of-range id fails here, not in the embedding.
    """

    def __init__(
        self,
        mix: str | Path | dict[str, Any],
        seq_len: int,
        global_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int | None = None,
        vocab_size: int | None = None,
    ) -> None:
        if seq_len < 1 or global_batch_size < 1:
            raise ValueError(f"seq_len and global_batch_size must be positive, got {seq_len}, {global_batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if global_batch_size % world_size:
            raise ValueError(f"global_batch_size {global_batch_size} is not divisible by world_size {world_size}")
        specs, mix_seed = load_mix(mix)
        self.seed = seed if seed is not None else (mix_seed if mix_seed is not None else 0)
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        self.seq_len = seq_len
        self.global_batch_size = global_batch_size
        self.rank, self.world_size = rank, world_size
        self.names = [s.name for s in specs]
        self.shards = [TokenShards(s.manifest) for s in specs]
        first = self.shards[0]
        for sp, sh in zip(specs, self.shards, strict=True):
            same = (sh.tokenizer_sha1 == first.tokenizer_sha1 if sh.tokenizer_sha1 and first.tokenizer_sha1
                    else (sh.vocab_size, sh.eos_id) == (first.vocab_size, first.eos_id))
            if not same:
                raise ValueError(f"pool {sp.name} was tokenized with a different tokenizer than pool {specs[0].name}")
            if vocab_size is not None and sh.vocab_size > vocab_size:
                raise ValueError(f"pool {sp.name} has token ids up to {sh.vocab_size - 1}, "
                                 f"beyond the model's vocab_size {vocab_size}")
            if len(sh) < seq_len + 1:
                raise ValueError(f"pool {sp.name} has {len(sh)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
        self.weights = np.array([s.weight for s in specs], dtype=np.float64)
        self.windows = [(len(sh) - 1) // seq_len for sh in self.shards]
        # Rounded before the floor: 0.58 epochs of 50 windows is 28.999999999999996 in floats, not 28.
        self.limits = [None if s.max_repetition is None else math.floor(round(s.max_repetition * n, 6))
                       for s, n in zip(specs, self.windows, strict=True)]
        self.step = 0
        self.consumed = [0] * len(specs)
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.world_size

    def _alive(self, consumed: list[int]) -> list[int]:
        return [i for i, lim in enumerate(self.limits)
                if self.weights[i] > 0 and (lim is None or consumed[i] < lim)]

    def _window(self, pool: int, k: int) -> int:
        epoch, pos = divmod(k, self.windows[pool])
        key = (pool, epoch)
        if key not in self._perm_cache:
            # Keep only the current epoch of each pool: memory stays one permutation per pool.
            self._perm_cache = {kk: v for kk, v in self._perm_cache.items() if kk[0] != pool}
            pool_key = zlib.crc32(self.names[pool].encode())
            rng = np.random.default_rng([self.seed, pool_key, epoch])
            self._perm_cache[key] = rng.permutation(self.windows[pool])
        return int(self._perm_cache[key][pos])

    def plan(self) -> list[tuple[int, int]] | None:
        """The (pool, window) of every row of the next global batch, or None when data runs out."""
        u = np.random.default_rng([self.seed, self.step]).random(self.global_batch_size)
        consumed = list(self.consumed)
        rows = []
        for b in range(self.global_batch_size):
            alive = self._alive(consumed)
            if not alive:
                return None
            cdf = np.cumsum(self.weights[alive])
            j = min(int(np.searchsorted(cdf, u[b] * cdf[-1], side="right")), len(alive) - 1)
            pool = alive[j]
            rows.append((pool, self._window(pool, consumed[pool])))
            consumed[pool] += 1
        return rows

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.plan()
        if rows is None:
            raise StopIteration
        for pool, _ in rows:
            self.consumed[pool] += 1
        self.step += 1
        mine = rows[self.rank::self.world_size]
        x = np.stack([self.shards[p].read(w * self.seq_len, self.seq_len + 1) for p, w in mine])
        t = torch.from_numpy(x)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def epochs(self) -> dict[str, float]:
        """Epochs consumed so far per pool (for logs and the report)."""
        return {n: c / w for n, c, w in zip(self.names, self.consumed, self.windows, strict=True)}

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "consumed": dict(zip(self.names, self.consumed, strict=True)),
            "seed": self.seed,
            "seq_len": self.seq_len,
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "seq_len", "global_batch_size"):
            if state[key] != getattr(self, key):
                raise ValueError(f"cannot resume: checkpoint has {key}={state[key]}, this loader {getattr(self, key)}")
        if sorted(state["consumed"]) != sorted(self.names):
            raise ValueError(f"cannot resume: checkpoint pools {sorted(state['consumed'])} differ from "
                             f"this mix's {sorted(self.names)}")
        self.step = int(state["step"])
        self.consumed = [int(state["consumed"][n]) for n in self.names]


def eval_batches(
    manifest: str | Path, seq_len: int, batch_size: int, max_batches: int | None = None,
    vocab_size: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed held-out batches: contiguous windows from the start of the stream, in order.

    The same manifest always gives the same batches, so evaluations are comparable across steps
    and runs. The last batch may be smaller than `batch_size`. `vocab_size`, if given (the model's),
    is checked as in `MixtureLoader`.
    """
    shards = TokenShards(manifest)
    if vocab_size is not None and shards.vocab_size > vocab_size:
        raise ValueError(f"{shards.path} has token ids up to {shards.vocab_size - 1}, beyond the model's "
                         f"vocab_size {vocab_size}")
    n = (len(shards) - 1) // seq_len
    if n < 1:
        raise ValueError(f"{shards.path} has {len(shards)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    if max_batches is not None:
        n = min(n, max_batches * batch_size)
    for lo in range(0, n, batch_size):
        x = np.stack([shards.read(k * seq_len, seq_len + 1) for k in range(lo, min(lo + batch_size, n))])
        t = torch.from_numpy(x)
        yield t[:, :-1].contiguous(), t[:, 1:].contiguous()
