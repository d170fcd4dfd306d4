"""Tokenize a curated corpus into flat token shards the trainer memory-maps.

Output layout (the token-shard contract; `training/data.py` reads it without importing this):

    OUTPUT/manifest.json          format, tokenizer, vocab_size, eos_id, dtype, shards, totals;
                                  `complete` false (and `failed` listing why) if any input failed,
                                  which the trainer refuses
    OUTPUT/tokenizer.json         a copy of the tokenizer used (+ tokenizer_config.json if any)
    OUTPUT/<rel>.npy              1-D uint16 (vocab <= 65,536) or uint32 tokens; EOS after every
                                  document, so boundaries survive packing
    OUTPUT/<rel>.idx.npy          uint64 end offset (exclusive) of each document in that shard
    OUTPUT/<rel>.done             completion marker: JSON with the records of that input's shards

`<rel>` is the input file's path relative to the corpus without its suffix, so partitions
(source / topic / quality) keep their folders. An input larger than `shard_tokens` is split at a
document boundary into `<rel>.npy`, `<rel>.1.npy`, ... Each file is written under a `.tmp-*`
name and renamed when complete; the marker is written last, so a killed run leaves no partial
shard in the manifest and a rerun skips every input whose marker exists.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import logging
import os
import shutil
import struct
import time
from collections import Counter
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow.parquet as pq

from curation.corpus import curated_files
from curation.executor import Executor, LocalExecutor
from curation.tokenizer import TextTokenizer, load_tokenizer
from curation.writer import atomic_write_text, clean_tmp, tmp_path

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "refinery.tokens/1"
CORPUS_SUFFIXES = (".parquet", ".jsonl.gz", ".json.gz", ".jsonl")
# NPY v1.0 header padded to a fixed 128 bytes (a multiple of 64, as the format asks), so the
# header can be rewritten with the final length after the tokens were streamed behind it.
_NPY_HEADER_BYTES = 128


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every token id of a vocabulary of this size."""
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if vocab_size <= 1 << 32:
        return np.dtype(np.uint32)
    raise ValueError(f"vocab_size {vocab_size} does not fit in uint32 token shards")


def _sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


class _NpyStream:
    """Append-only writer of a 1-D .npy file whose length is known only at the end."""

    def __init__(self, final: Path, dtype: np.dtype) -> None:
        self.final = final
        self.tmp = tmp_path(final)
        self.dtype = dtype
        self.count = 0
        final.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.tmp, "wb")  # closed in close() or abort()
        self.f.write(self._header(0))

    def _header(self, n: int) -> bytes:
        body = repr({"descr": self.dtype.str, "fortran_order": False, "shape": (n,)}).encode("latin1")
        pad = _NPY_HEADER_BYTES - 10 - len(body) - 1
        return b"\x93NUMPY\x01\x00" + struct.pack("<H", _NPY_HEADER_BYTES - 10) + body + b" " * pad + b"\n"

    def write(self, arr: np.ndarray) -> None:
        self.f.write(np.ascontiguousarray(arr, dtype=self.dtype).tobytes())
        self.count += len(arr)

    def close(self) -> int:
        self.f.seek(0)
        self.f.write(self._header(self.count))
        self.f.close()
        os.replace(self.tmp, self.final)
        return self.final.stat().st_size

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


def corpus_files(corpus: str | Path, suffixes: tuple[str, ...] = CORPUS_SUFFIXES,
                 exclude: Path | None = None) -> list[Path]:
    """Corpus shards under `corpus`, sorted.

    In a curation output (the output itself, its `documents/` or one source folder in it) these
    are exactly the document files the run wrote, never its `_work/` files; elsewhere every file
    with one of `suffixes`, hidden and `.tmp-*` files skipped.
    """
    corpus = Path(corpus)
    if not corpus.is_dir():
        raise FileNotFoundError(f"corpus directory not found: {corpus}")
    curated = curated_files(corpus, suffixes)
    if curated is not None:
        return curated
    excl = exclude.resolve() if exclude is not None else None
    files = []
    for p in sorted(corpus.rglob("*")):
        if not p.is_file() or p.name.startswith(".") or not p.name.endswith(suffixes):
            continue
        if excl is not None and excl in p.resolve().parents:
            continue
        files.append(p)
    return files


def _strip_suffix(rel: Path, suffixes: tuple[str, ...]) -> str:
    name = rel.as_posix()
    for s in sorted(suffixes, key=len, reverse=True):
        if name.endswith(s):
            return name[: -len(s)]
    return name


def _read_docs(path: Path, batch_docs: int, skipped: Counter[str]) -> Iterator[tuple[list[str], list[str]]]:
    """Yield (texts, sources) batches; empty or malformed documents are counted, not fatal."""
    name = path.name
    if name.endswith(".parquet"):
        pf = pq.ParquetFile(path)
        if "text" not in pf.schema_arrow.names:
            raise ValueError(f"{path} has no 'text' column, so it is not a corpus shard")
        cols = ["text"] + (["source"] if "source" in pf.schema_arrow.names else [])
        for batch in pf.iter_batches(columns=cols, batch_size=batch_docs):
            texts = batch.column(0).to_pylist()
            sources = batch.column(1).to_pylist() if len(cols) == 2 else [""] * len(texts)
            keep = [(t, s or "") for t, s in zip(texts, sources, strict=True) if t]
            skipped["empty_text"] += len(texts) - len(keep)
            if keep:
                yield [k[0] for k in keep], [k[1] for k in keep]
    elif name.endswith((".jsonl.gz", ".json.gz", ".jsonl")):
        opener = gzip.open if name.endswith(".gz") else open
        texts, sources = [], []
        with opener(path, "rb") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    row = orjson.loads(line)
                except orjson.JSONDecodeError:
                    skipped["bad_json"] += 1
                    continue
                text = row.get("text") if isinstance(row, dict) else None
                if not isinstance(text, str) or not text:
                    skipped["empty_text"] += 1
                    continue
                texts.append(text)
                sources.append(str(row.get("source") or ""))
                if len(texts) >= batch_docs:
                    yield texts, sources
                    texts, sources = [], []
        if texts:
            yield texts, sources
    elif name.endswith(".txt"):
        # A plain-text file is one document (a book, an article): held-out text for evaluation.
        text = path.read_text(encoding="utf-8", errors="replace")
        if text:
            yield [text], [path.parent.name]
        else:
            skipped["empty_text"] += 1
    else:
        raise ValueError(f"not a corpus shard ({', '.join(CORPUS_SUFFIXES)}, .txt): {path}")


@lru_cache(maxsize=4)
def _cached_tokenizer(path: str, eos_token: str) -> TextTokenizer:
    # The driver resolved the EOS (perhaps from an explicit eos_token); workers use the same one.
    return load_tokenizer(path, eos_token=eos_token)


def _shard_paths(out_base: str, part: int) -> tuple[Path, Path]:
    stem = out_base if part == 0 else f"{out_base}.{part}"
    return Path(stem + ".npy"), Path(stem + ".idx.npy")


# Task fields that change the tokens written: a marker made with other values is redone.
_SETTINGS = ("eos_token", "add_bos", "dtype", "shard_tokens")


def _settings(task: dict[str, Any]) -> dict[str, Any]:
    return {k: task[k] for k in _SETTINGS}


def _marker_valid(marker: Path, root: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The marker's record if it was made with `settings` and every shard it names is intact,
    else None (redo)."""
    try:
        record = json.loads(marker.read_text())
        if record.get("settings") != settings:
            return None
        for s in record["shards"]:
            if (root / s["path"]).stat().st_size != s["nbytes"] or not (root / s["index"]).is_file():
                return None
        return record
    except (OSError, ValueError, KeyError):
        return None


def tokenize_shard(task: dict[str, Any]) -> dict[str, Any]:
    """Tokenize one input file (an executor item). Never raises: a bad file becomes a 'failed' record."""
    root = Path(task["root"])
    marker = root / (task["out_base"] + ".done")
    if marker.is_file():
        record = _marker_valid(marker, root, _settings(task))
        if record is not None:
            return {**record, "status": "resumed"}
    try:
        result = _tokenize_input(task, root, marker)
    except Exception as e:  # a corrupt input must not crash the whole job; it is reported
        log.warning("tokenize: %s failed (%s: %s); the manifest is marked incomplete", task["rel"],
                    type(e).__name__, e)
        return {"input": task["rel"], "status": "failed", "error": f"{type(e).__name__}: {e}"}
    log.info("tokenize: %s: %d tokens in %d shard(s)", task["rel"], sum(s["tokens"] for s in result["shards"]),
             len(result["shards"]))
    return result


def _tokenize_input(task: dict[str, Any], root: Path, marker: Path) -> dict[str, Any]:
    tok = _cached_tokenizer(task["tokenizer"], task["eos_token"])
    dtype = np.dtype(task["dtype"])
    eos, bos = tok.eos_id, tok.bos_id if task["add_bos"] else None
    skipped: Counter[str] = Counter()
    shards: list[dict[str, Any]] = []
    part = 0
    writer: _NpyStream | None = None
    ends: list[int] = []
    sources: Counter[str] = Counter()
    text_bytes = 0

    def finish() -> None:
        nonlocal writer, ends, sources, text_bytes, part
        assert writer is not None
        npy, idx = _shard_paths(task["out_base"], part)
        idx_stream = _NpyStream(root / idx, np.dtype(np.uint64))
        idx_stream.write(np.asarray(ends, dtype=np.uint64))
        idx_stream.close()
        nbytes = writer.close()
        shards.append({
            "path": npy.as_posix(), "index": idx.as_posix(), "input": task["rel"],
            "tokens": writer.count, "documents": len(ends), "text_bytes": text_bytes,
            "source": next(iter(sources)) if len(sources) == 1 else "mixed",
            "sources": dict(sorted(sources.items())), "dtype": dtype.name, "nbytes": nbytes,
        })
        writer, ends, sources, text_bytes, part = None, [], Counter(), 0, part + 1

    try:
        for texts, srcs in _read_docs(Path(task["input"]), task["batch_docs"], skipped):
            batch = tok.encode_batch(texts)
            for ids in batch:
                if bos is not None:
                    ids.insert(0, bos)
                ids.append(eos)
            lengths = np.fromiter((len(ids) for ids in batch), dtype=np.int64, count=len(batch))
            i = 0
            while i < len(batch):
                if writer is None:
                    writer = _NpyStream(root / _shard_paths(task["out_base"], part)[0], dtype)
                cum = np.cumsum(lengths[i:])
                # Documents that still fit this shard; a document longer than a whole shard gets
                # one of its own rather than being cut.
                take = int(np.searchsorted(cum, task["shard_tokens"] - writer.count, side="right"))
                if take == 0 and writer.count == 0:
                    take = 1
                if take:
                    n = int(cum[take - 1])
                    flat = np.fromiter(itertools.chain.from_iterable(batch[i:i + take]), dtype=dtype, count=n)
                    ends.extend((writer.count + cum[:take]).tolist())
                    writer.write(flat)
                    sources.update(srcs[i:i + take])
                    text_bytes += sum(len(t.encode("utf-8")) for t in texts[i:i + take])
                    i += take
                if i < len(batch):
                    finish()
        if writer is not None and writer.count:
            finish()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    record = {"input": task["rel"], "shards": shards, "skipped": dict(skipped), "settings": _settings(task)}
    atomic_write_text(marker, json.dumps(record))
    return {**record, "status": "done"}


def tokenize_corpus(
    corpus: str | Path,
    tokenizer: str | Path,
    output: str | Path,
    executor: Executor | None = None,
    shard_tokens: int = 50_000_000,
    dtype: str | None = None,
    add_bos: bool = False,
    eos_token: str | None = None,
    suffixes: tuple[str, ...] = CORPUS_SUFFIXES,
    batch_docs: int = 1024,
) -> dict[str, Any]:
    """Tokenize every corpus shard under `corpus` into `output`; resumable; returns a run summary.

    One output shard per input file (split at a document boundary past `shard_tokens` tokens).
    `dtype` defaults to uint16 when the vocabulary fits, else uint32; forcing a dtype too small
    for the vocabulary is an error. `add_bos` also puts BOS before each document (EOS always
    follows one). Pass `suffixes=(..., ".txt")` to include plain-text files, one document each.
    """
    t0 = time.perf_counter()
    corpus, output = Path(corpus), Path(output)
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    tok = load_tokenizer(tokenizer, eos_token=eos_token)
    auto = dtype_for_vocab(tok.vocab_size)
    chosen = np.dtype(dtype) if dtype is not None else auto
    if chosen.kind != "u" or chosen.itemsize < auto.itemsize:
        raise ValueError(f"tokenizer {tok.path} has a vocabulary of {tok.vocab_size} ids, which does not "
                         f"fit {chosen.name} token shards (needs {auto.name})")
    if add_bos and tok.bos_id is None:
        raise ValueError(f"add_bos=True but tokenizer {tok.path} has no BOS token")
    files = corpus_files(corpus, suffixes, exclude=output)
    if not files:
        raise FileNotFoundError(f"no corpus shards ({', '.join(suffixes)}) under {corpus}")

    output.mkdir(parents=True, exist_ok=True)
    clean_tmp(output, suffixes=(".npy", ".done", ".json"))  # left by a killed run; only our names
    tok_copy = output / "tokenizer.json"
    assert tok.path is not None
    if tok_copy.is_file() and tok_copy.resolve() != tok.path.resolve() \
            and _sha1(tok_copy) != _sha1(tok.path):
        raise ValueError(f"{output} already holds shards made with a different tokenizer; "
                         "use a new output directory")
    if tok_copy.resolve() != tok.path.resolve():
        shutil.copyfile(tok.path, tmp_path(tok_copy))
        os.replace(tmp_path(tok_copy), tok_copy)
        cfg = tok.path.with_name("tokenizer_config.json")
        if cfg.is_file():
            shutil.copyfile(cfg, tmp_path(output / cfg.name))
            os.replace(tmp_path(output / cfg.name), output / cfg.name)

    bases: dict[str, str] = {}
    tasks = []
    for f in files:
        rel = f.relative_to(corpus)
        base = _strip_suffix(rel, suffixes)
        if base in bases:
            raise ValueError(f"inputs {bases[base]} and {rel} would write the same shard {base}.npy")
        bases[base] = rel.as_posix()
        tasks.append({
            "input": str(f), "rel": rel.as_posix(), "root": str(output), "out_base": base,
            "tokenizer": str(tok_copy), "eos_token": tok.tokenizer.id_to_token(tok.eos_id), "add_bos": add_bos,
            "dtype": chosen.name, "shard_tokens": shard_tokens, "batch_docs": batch_docs,
        })

    executor = executor or LocalExecutor()
    results = executor.map(tokenize_shard, tasks, desc="tokenize")

    shards = [s for r in results if r["status"] != "failed" for s in r["shards"]]
    failed = [{"input": r["input"], "error": r["error"]} for r in results if r["status"] == "failed"]
    skipped: Counter[str] = Counter()
    for r in results:
        skipped.update(r.get("skipped", {}))
    manifest = {
        "format": MANIFEST_FORMAT,
        "tokenizer": "tokenizer.json",
        "tokenizer_sha1": _sha1(tok_copy),
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "bos_id": tok.bos_id,
        "pad_id": tok.pad_id,
        "add_bos": add_bos,
        "dtype": chosen.name,
        "total_tokens": sum(s["tokens"] for s in shards),
        "total_documents": sum(s["documents"] for s in shards),
        "total_text_bytes": sum(s["text_bytes"] for s in shards),
        "skipped_documents": dict(sorted(skipped.items())),
        "shards": shards,
        # A run with failed inputs still records what it did (a rerun redoes only those), but
        # the manifest says it is incomplete and the trainer refuses it.
        "complete": not failed,
        "failed": failed,
    }
    manifest_path = output / "manifest.json"
    atomic_write_text(manifest_path, json.dumps(manifest, indent=1) + "\n")
    seconds = time.perf_counter() - t0
    new_tokens = sum(s["tokens"] for r in results if r["status"] == "done" for s in r["shards"])
    log.info("tokenize: %d tokens from %d inputs (%d resumed, %d failed) in %.1f s", manifest["total_tokens"],
             len(results), sum(r["status"] == "resumed" for r in results), len(failed), seconds)
    return {
        "manifest": str(manifest_path),
        "total_tokens": manifest["total_tokens"],
        "total_documents": manifest["total_documents"],
        "shards": len(shards),
        "inputs_done": sum(r["status"] == "done" for r in results),
        "inputs_resumed": sum(r["status"] == "resumed" for r in results),
        "failed": failed,
        "seconds": seconds,
        "tokens_per_second": new_tokens / seconds if seconds > 0 else 0.0,
    }
