"""Pools: topic × quality-bucket slices of the classified web corpus, plus named clean sources.

Build (`refinery mix pools CONFIG`), all under `OUTPUT/pools/`:
1. web pass 1 streams the corpus and reads each document's `quality.score` and `topic.label`
   attributes (scoring those that lack them with the configured classifiers); a seeded reservoir
   sample per topic sets the bucket edges at quantiles, so each topic's buckets hold about equal
   numbers of documents whatever the topic's score distribution;
2. web pass 2 streams the corpus again and writes each document to `<topic>.q<b>` (q0 the lowest
   quality); named sources are read into their own pools; a hash of each document sends
   `holdout` of every pool to its held-out slice (targets for the proxies);
3. each pool, held-out slice and target is tokenized once (`tokens/`, `heldout/`): mixtures are only
   weights over these manifests.

`pools.json` is written last and pins the config and the tokenizer; a rerun with the same config
returns it, one with another config is refused. Tokenization and classification are passed in by
the caller (`pipelines/mix.py` wires curation's, and its reader of a curation output's file list),
since `proxy_mix` reads corpora only as files.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from proxy_mix.config import MixConfig, MixConfigError
from proxy_mix.sources import Doc, read_documents, read_source

POOLS_FORMAT = "refinery.pools/1"
POOLS_FILE = "pools.json"
DOCS_MARKER = "docs.done.json"
SCORE_BATCH = 512
ALL_TOPICS = "all"

# (docs_dir, tokens_dir) -> the tokenize summary (`total_tokens`, `failed`, ...): curation.tokenize's.
TokenizeFn = Callable[[Path, Path], dict[str, Any]]
# texts -> (quality scores or None, topic labels or None): the classifiers of the web section.
ScoreFn = Callable[[list[str]], tuple[list[float] | None, list[str] | None]]
# path -> the document files of a curation output under it (exactly those its run listed), or None
# when the path is not part of one (then every document file under it is read).
ListFn = Callable[[Path], list[Path] | None]


def pools_dir(cfg: MixConfig) -> Path:
    return cfg.out / "pools"


def _sha1_file(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def _fingerprint(cfg: MixConfig) -> str:
    tok = Path(cfg.tokenizer)
    if not tok.is_file():
        raise MixConfigError(f"tokenizer not found: {tok}; train one with `refinery tokenizer train`")
    return f"{cfg.fingerprint('tokenizer', 'holdout', 'web', 'sources', 'targets')}-{_sha1_file(tok)[:12]}"


def is_heldout(doc: Doc, fraction: float) -> bool:
    """A fixed pseudo-random share of documents, decided by their id and text alone."""
    h = hashlib.blake2b(f"{doc.id}\0{doc.text[:2000]}".encode("utf-8", "replace"), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < fraction


class _DocWriter:
    """Gzipped JSON lines written under a temporary name and renamed on close."""

    def __init__(self, path: Path, source: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.tmp, self.source = path, path.with_name(f".tmp-{path.name}"), source
        self.f: IO[bytes] = gzip.open(self.tmp, "wb", compresslevel=3)
        self.documents = 0
        self.text_bytes = 0

    def write(self, doc: Doc) -> None:
        self.f.write(json.dumps({"id": doc.id, "text": doc.text, "source": self.source}).encode() + b"\n")
        self.documents += 1
        self.text_bytes += len(doc.text.encode("utf-8", "replace"))

    def close(self) -> None:
        self.f.close()
        os.replace(self.tmp, self.path)


class _PoolWriters:
    """A training and a held-out writer per pool, opened on first use."""

    def __init__(self, root: Path, holdout: float) -> None:
        self.root, self.holdout = root, holdout
        self.writers: dict[tuple[str, bool], _DocWriter] = {}

    def write(self, pool: str, doc: Doc) -> None:
        held = is_heldout(doc, self.holdout)
        key = (pool, held)
        if key not in self.writers:
            sub = "heldout_docs" if held else "docs"
            self.writers[key] = _DocWriter(self.root / pool / sub / "part-00000.jsonl.gz", pool)
        self.writers[key].write(doc)

    def close(self) -> dict[str, dict[str, int]]:
        counts: dict[str, dict[str, int]] = {}
        for (pool, held), w in self.writers.items():
            w.close()
            c = counts.setdefault(pool, {"documents": 0, "heldout_documents": 0})
            c["heldout_documents" if held else "documents"] = w.documents
        return counts


def _reservoir_add(sample: list[float], seen: int, value: float, size: int, rng: np.random.Generator) -> None:
    """Algorithm R: after n values, each is in `sample` with probability size/n."""
    if len(sample) < size:
        sample.append(value)
        return
    j = int(rng.integers(0, seen))
    if j < size:
        sample[j] = value


def _web_docs(cfg: MixConfig, list_files: ListFn | None) -> Iterator[Doc]:
    assert cfg.web is not None
    n = 0
    for path in cfg.web.corpus:
        files = list_files(Path(path)) if list_files is not None else None
        for doc in read_documents(Path(path), files):
            yield doc
            n += 1
            if cfg.web.max_documents is not None and n >= cfg.web.max_documents:
                return


def _label_to_topic(cfg: MixConfig) -> dict[str, str] | None:
    assert cfg.web is not None
    if cfg.web.topics is None:
        return None
    return {lab: topic for topic, labels in cfg.web.topics.items() for lab in labels}


def _score_web(cfg: MixConfig, score: ScoreFn | None,
               list_files: ListFn | None) -> tuple[np.ndarray, list[str | None], dict[str, Any]]:
    """Pass 1: (quality per document, pool topic per document or None, statistics)."""
    assert cfg.web is not None
    mapping = _label_to_topic(cfg)
    want_topic = cfg.web.topic_model is not None or mapping is not None
    quality: list[float] = []
    labels: list[str | None] = []
    pending: list[tuple[int, str]] = []  # (index, text) of documents lacking attributes
    scored = 0

    def flush() -> None:
        nonlocal scored
        if not pending:
            return
        if score is None:
            raise MixConfigError("web documents lack quality.score / topic.label attributes and no classifier "
                                 "is configured: set web.quality_model and web.topic_model, or run the `classify` "
                                 "step in the curation config")
        q, t = score([text for _, text in pending])
        for k, (i, _) in enumerate(pending):
            if q is not None and np.isnan(quality[i]):
                quality[i] = float(q[k])
            if t is not None and labels[i] is None:
                labels[i] = t[k]
        scored += len(pending)
        pending.clear()

    for doc in _web_docs(cfg, list_files):
        a = doc.attributes
        q = a.get("quality.score")
        lab = a.get("topic.label")
        quality.append(float(q) if isinstance(q, int | float) else float("nan"))
        labels.append(str(lab) if lab is not None else None)
        if quality[-1] != quality[-1] or (want_topic and lab is None):
            pending.append((len(quality) - 1, doc.text))
            if len(pending) >= SCORE_BATCH:
                flush()
    flush()
    if not quality:
        raise MixConfigError(f"web.corpus {cfg.web.corpus} holds no documents (Parquet or JSON lines with a "
                             "`text` field)")
    q_arr = np.asarray(quality, dtype=np.float64)
    if np.isnan(q_arr).any():
        raise MixConfigError("some web documents have no quality.score and web.quality_model is not set; "
                             "set it to a quality classifier (`refinery classify train --kind quality`)")
    label_counts: dict[str, int] = {}
    topics: list[str | None] = []
    for lab in labels:
        key = lab if lab is not None else ALL_TOPICS
        label_counts[key] = label_counts.get(key, 0) + 1
        if mapping is not None:
            topics.append(mapping.get(lab) if lab is not None else None)
        else:
            topics.append(lab if lab is not None else ALL_TOPICS)
    stats = {"documents_read": len(topics), "scored": scored, "labels": dict(sorted(label_counts.items())),
             "unassigned": sum(t is None for t in topics)}
    return q_arr, topics, stats


def _bucket_edges(cfg: MixConfig, quality: np.ndarray, topics: list[str | None]) -> dict[str, list[float]]:
    """Quantile edges per topic from a seeded reservoir sample of its scores (streaming, bounded memory)."""
    assert cfg.web is not None
    rng = np.random.default_rng(0)
    samples: dict[str, list[float]] = {}
    seen: dict[str, int] = {}
    for q, t in zip(quality, topics, strict=True):
        if t is None:
            continue
        seen[t] = seen.get(t, 0) + 1
        _reservoir_add(samples.setdefault(t, []), seen[t], float(q), cfg.web.sample, rng)
    b = cfg.web.buckets
    if cfg.web.topics is not None:
        empty = [t for t in cfg.web.topics if t not in samples]
        if empty:
            raise MixConfigError(f"pool topic {empty[0]!r} has no documents: the topic classifier gave none of "
                                 f"its labels {cfg.web.topics[empty[0]]}; drop it from web.topics or merge it "
                                 "into another topic")
    edges = {}
    for t, sample in sorted(samples.items()):
        if len(sample) < b:
            raise MixConfigError(f"topic {t!r} has {len(sample)} documents, fewer than web.buckets={b}; merge it "
                                 "with another topic under web.topics or lower web.buckets")
        edges[t] = [float(x) for x in np.quantile(np.asarray(sample), [k / b for k in range(1, b)])]
    return edges


def _bucket(edges: list[float], q: float) -> int:
    return int(np.searchsorted(np.asarray(edges), q, side="right"))


def _write_docs(cfg: MixConfig, root: Path, score: ScoreFn | None, list_files: ListFn | None) -> dict[str, Any]:
    """Passes 1 and 2 and the named sources: every pool's documents and held-out slice on disk."""
    writers = _PoolWriters(root, cfg.holdout)
    meta: dict[str, dict[str, Any]] = {}
    web_stats: dict[str, Any] = {}
    try:
        if cfg.web is not None:
            quality, topics, web_stats = _score_web(cfg, score, list_files)
            edges = _bucket_edges(cfg, quality, topics)
            web_stats["edges"] = edges
            b = cfg.web.buckets
            for t, e in edges.items():
                bounds = [0.0, *e, 1.0]
                for k in range(b):
                    meta[f"{t}.q{k}"] = {"kind": "web", "topic": t, "bucket": k, "buckets": b,
                                         "quality_range": [round(bounds[k], 6), round(bounds[k + 1], 6)]}
            clash = sorted({s.name for s in cfg.sources} & set(meta))
            if clash:
                raise MixConfigError(f"source name {clash[0]!r} is also a web pool's name; rename the source")
            _check_target_pools(cfg, [*meta, *(s.name for s in cfg.sources)])
            for i, doc in enumerate(_web_docs(cfg, list_files)):
                t = topics[i]
                if t is not None:
                    writers.write(f"{t}.q{_bucket(edges[t], quality[i])}", doc)
        else:
            _check_target_pools(cfg, [s.name for s in cfg.sources])
        for s in cfg.sources:
            meta[s.name] = {"kind": "source", "topic": None, "bucket": None, "paths": s.paths}
            for doc in read_source(s.paths, s.format, s.chunk_chars, s.text_column, s.max_documents, s.max_bytes):
                writers.write(s.name, doc)
    finally:
        counts = writers.close()
    for name, m in meta.items():
        m.update(counts.get(name, {"documents": 0, "heldout_documents": 0}))
        if m["documents"] == 0:
            where = (f"quality bucket {m['bucket']} of topic {m['topic']!r} (scores {m['quality_range']}; many "
                     "equal scores leave a quantile bucket empty: lower web.buckets)"
                     if m["kind"] == "web" else f"source paths {m['paths']}")
            raise MixConfigError(f"pool {name!r} has no documents: {where}")
    return {"pools": meta, "web": web_stats}


def _check_target_pools(cfg: MixConfig, pool_names: list[str]) -> None:
    for t in cfg.targets:
        if t.pool is not None and t.pool not in pool_names:
            raise MixConfigError(f"target {t.name!r} names pool {t.pool!r}, which does not exist; pools: "
                                 f"{sorted(pool_names)}")


def _tokenize(tokenize: TokenizeFn, docs: Path, out: Path, what: str) -> dict[str, Any]:
    summary = tokenize(docs, out)
    if summary.get("failed"):
        raise MixConfigError(f"tokenizing {what} failed: {summary['failed'][0]}")
    manifest = json.loads((out / "manifest.json").read_text())
    return {"manifest": str((out / "manifest.json").resolve()), "tokens": int(manifest["total_tokens"]),
            "text_bytes": int(manifest.get("total_text_bytes") or 0)}


def build_pools(cfg: MixConfig, tokenize: TokenizeFn, score: ScoreFn | None = None,
                list_files: ListFn | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write and tokenize every pool, held-out slice and target; returns (and writes) pools.json."""
    root = pools_dir(cfg)
    fingerprint = _fingerprint(cfg)
    done_file = root / POOLS_FILE
    if done_file.is_file():
        summary = json.loads(done_file.read_text())
        if summary.get("fingerprint") == fingerprint:
            return summary
        raise MixConfigError(f"{root} holds pools built from another config or tokenizer; use another `output` "
                             f"or delete {root} (and the sweep built on it) to rebuild")
    t0 = time.perf_counter()
    marker = root / DOCS_MARKER
    docs: dict[str, Any] | None = None
    if marker.is_file():
        docs = json.loads(marker.read_text())
        if docs.get("fingerprint") != fingerprint:
            docs = None
    if docs is None:
        if root.exists():
            shutil.rmtree(root)  # documents of an interrupted or other build: redo them whole
        root.mkdir(parents=True)
        log(f"pools: reading documents into {root}")
        docs = {"fingerprint": fingerprint, **_write_docs(cfg, root, score, list_files)}
        tmp = marker.with_name(f".tmp-{marker.name}")
        tmp.write_text(json.dumps(docs))
        os.replace(tmp, marker)

    pools = []
    for name, m in docs["pools"].items():
        log(f"pools: tokenizing {name} ({m['documents']:,} documents)")
        rec = {"name": name, **m, **_tokenize(tokenize, root / name / "docs", root / name / "tokens", f"pool {name}")}
        if m["heldout_documents"]:
            held = _tokenize(tokenize, root / name / "heldout_docs", root / name / "heldout", f"pool {name} held-out")
            rec.update({"heldout_manifest": held["manifest"], "heldout_tokens": held["tokens"]})
        else:
            rec.update({"heldout_manifest": None, "heldout_tokens": 0})
        pools.append(rec)
    targets = [_build_target(cfg, t, pools, tokenize, log) for t in cfg.targets]
    summary = {"format": POOLS_FORMAT, "fingerprint": fingerprint, "name": cfg.name,
               "tokenizer": str(Path(cfg.tokenizer).resolve()), "holdout": cfg.holdout, "pools": pools,
               "targets": targets, "web": docs["web"], "seconds": round(time.perf_counter() - t0, 2)}
    tmp = done_file.with_name(f".tmp-{done_file.name}")
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(tmp, done_file)
    return summary


def _build_target(cfg: MixConfig, t: Any, pools: list[dict[str, Any]], tokenize: TokenizeFn,
                  log: Callable[[str], None]) -> dict[str, Any]:
    if t.pool is not None:
        pool = next(p for p in pools if p["name"] == t.pool)
        if not pool["heldout_manifest"]:
            raise MixConfigError(f"target {t.name!r}: pool {t.pool!r} has no held-out documents (of "
                                 f"{pool['documents']:,}); raise `holdout` or use `paths:` text")
        return {"name": t.name, "kind": "pool", "pool": t.pool, "manifest": pool["heldout_manifest"],
                "tokens": pool["heldout_tokens"], "documents": pool["heldout_documents"]}
    root = cfg.out / "targets" / t.name
    docs_dir = root / "docs"
    if not (docs_dir / "part-00000.jsonl.gz").is_file():
        w = _DocWriter(docs_dir / "part-00000.jsonl.gz", t.name)
        try:
            for doc in read_source(t.paths, t.format, max_bytes=t.max_bytes):
                w.write(doc)
        finally:
            w.close()
        if not w.documents:
            w.path.unlink()
            raise MixConfigError(f"target {t.name!r}: no text found in {t.paths}")
    log(f"pools: tokenizing target {t.name}")
    tok = _tokenize(tokenize, docs_dir, root / "tokens", f"target {t.name}")
    return {"name": t.name, "kind": "files", "paths": t.paths, "manifest": tok["manifest"], "tokens": tok["tokens"]}


def load_pools(cfg: MixConfig) -> dict[str, Any]:
    """pools.json of this config, or a clear error when the pools are missing or from another config."""
    path = pools_dir(cfg) / POOLS_FILE
    if not path.is_file():
        raise MixConfigError(f"no pools in {pools_dir(cfg)}; run `refinery mix pools CONFIG` first")
    summary = json.loads(path.read_text())
    if summary.get("fingerprint") != _fingerprint(cfg):
        raise MixConfigError(f"{path} was built from another config or tokenizer; rerun `refinery mix pools` "
                             "with a new `output`")
    return summary
