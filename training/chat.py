"""The chat template, chat / preference token shards with a loss mask, and their readers.

Template `refinery.chat/1`, built on the role tokens our tokenizers reserve (looked up by name in
the tokenizer.json; training never imports curation):

    [<|bos|>] <|system|> text <|end|> <|user|> text <|end|> <|assistant|> text <|end|> ...

Each message's text is encoded on its own (special-token strings inside it stay plain text, so a
user cannot forge a turn) and put between its role token and <|end|>. `render_prompt(messages)`
is the same rendering followed by <|assistant|>: the ids a model continues at inference, and
exactly the prefix of the training sequence it was taught on. Generation stops at <|end|>.
An imported tokenizer without these tokens is refused with ChatTemplateError (adding tokens would
mean resizing the model's embeddings, a decision for the user, not a silent fallback).

Shard directory (`tokenize_chat`; read by ChatShards / PreferenceShards):

    DIR/manifest.json        format refinery.chat/1, kind chat|preference, split, template, tokenizer,
                             vocab_size, dtype, max_len, shards, examples, dropped {reason: n}, inputs
    DIR/tokenizer.json       a copy of the tokenizer (+ tokenizer_config.json), so the template is
                             rebuilt from the directory alone
    DIR/<base>.tokens.npy    flat uint16/uint32 token ids of every sequence, back to back
    DIR/<base>.mask.npy      flat uint8, 1 = a trained target: assistant text + its <|end|>
    DIR/<base>.idx.npy       int64 end offset (exclusive) of each sequence
    DIR/<base>.done          completion marker of one input (written last; a rerun skips it)
    DIR/heldout/...          the same layout for the held-out split (with --holdout > 0)

kind "chat": one sequence per conversation, every assistant turn trained. kind "preference":
sequences in pairs, 2i chosen and 2i+1 rejected, each prompt + final assistant turn, only that
turn trained. The model predicts token t+1 at position t; the loss at t counts iff mask[t+1].
Rows that cannot be used are counted by reason in the train manifest's "dropped" (drops happen
before the split; the held-out manifest's "dropped" is empty). The held-out split is chosen by a
seeded hash of each example's prompt, so one prompt never lands in both splits.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from array import array
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from training.atomic import TMP_PREFIX, atomic_save_npy, atomic_write, atomic_write_text
from training.chat_formats import (
    FORMATS,
    PAIR_FORMATS,
    TOO_LONG,
    Conversation,
    Dropped,
    Example,
    Message,
    PreferencePair,
    holds_pairs,
    input_files,
    parse_row,
    read_rows,
    sniff_format,
)

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "refinery.chat/1"
TEMPLATE_NAME = "refinery.chat/1"
KINDS = ("chat", "preference")
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<|end|>", "<|bos|>", "<|eos|>", "<|pad|>"
HELDOUT_DIR = "heldout"
_BATCH = 256  # examples encoded per tokenizer call


class ChatTemplateError(ValueError):
    """The tokenizer cannot express the chat template (missing role tokens)."""


class ChatTemplate:
    """refinery.chat/1 on one tokenizer: renders messages to ids and a loss mask."""

    def __init__(self, tokenizer: Tokenizer, source: str = "tokenizer") -> None:
        wanted = (*ROLE_TOKENS.values(), END_TOKEN)
        missing = [t for t in wanted if tokenizer.token_to_id(t) is None]
        if missing:
            raise ChatTemplateError(
                f"{source} lacks the chat role tokens {', '.join(missing)}; the refinery chat template "
                "needs all of " + ", ".join(wanted) + ". Train the tokenizer with `refinery tokenizer "
                "train` (it reserves them), or add them as special tokens and resize the model's embeddings")
        tokenizer.encode_special_tokens = True  # "<|end|>" typed in a message stays text
        self.tokenizer = tokenizer
        self.source = source
        self.role_ids = {role: int(tokenizer.token_to_id(t)) for role, t in ROLE_TOKENS.items()}
        self.end_id = int(tokenizer.token_to_id(END_TOKEN))
        self.bos_id: int | None = tokenizer.token_to_id(BOS_TOKEN)
        self.eos_id: int | None = tokenizer.token_to_id(EOS_TOKEN)
        self.pad_id: int | None = tokenizer.token_to_id(PAD_TOKEN)
        self.vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1

    @classmethod
    def load(cls, path: str | Path) -> ChatTemplate:
        """From a tokenizer.json, or a directory holding one (a shard directory, an export)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer not found: {path}")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise ValueError(f"cannot read tokenizer {path}: {e}") from e
        return cls(tok, source=str(path))

    @property
    def stop_ids(self) -> list[int]:
        """Token ids that end an assistant turn at generation time."""
        return [self.end_id]

    def encode_texts(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]

    def assemble(self, messages: Sequence[Message], encoded: Sequence[list[int]],
                 train: str = "all") -> tuple[list[int], list[int]]:
        """(ids, mask) from messages whose texts are already encoded. `train`: "all" assistant
        turns, "last" (only the final message, which must be an assistant turn) or "none"."""
        ids = [self.bos_id] if self.bos_id is not None else []
        mask = [0] * len(ids)
        last = len(messages) - 1
        for i, (m, content) in enumerate(zip(messages, encoded, strict=True)):
            trained = m["role"] == "assistant" and (train == "all" or (train == "last" and i == last))
            ids.append(self.role_ids[m["role"]])
            ids.extend(content)
            ids.append(self.end_id)
            mask.append(0)
            mask.extend([int(trained)] * (len(content) + 1))
        return ids, mask

    def render(self, messages: Sequence[Message], train: str = "all") -> tuple[list[int], list[int]]:
        """(ids, mask) of a whole conversation, as it is written to chat shards."""
        return self.assemble(messages, self.encode_texts([m["content"] for m in messages]), train)

    def render_prompt(self, messages: Sequence[Message]) -> list[int]:
        """The ids a model continues to answer `messages`: the rendering plus <|assistant|>."""
        return self.render(messages, train="none")[0] + [self.role_ids["assistant"]]

    def decode_response(self, ids: Sequence[int]) -> str:
        """The text of a generated assistant turn: ids up to the first <|end|>."""
        ids = list(ids)
        if self.end_id in ids:
            ids = ids[: ids.index(self.end_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def jinja(self) -> str:
        """The same template for Hugging Face `apply_chat_template` (tokenizer_config chat_template)."""
        tokens = ", ".join(f"'{role}': '{tok}'" for role, tok in ROLE_TOKENS.items())
        return (
            (BOS_TOKEN if self.bos_id is not None else "")
            + "{% set tokens = {" + tokens + "} %}{% for message in messages %}"
            "{% if message['role'] not in tokens %}{{ raise_exception('unknown role ' + message['role']) }}"
            "{% endif %}{{ tokens[message['role']] + message['content'] + '" + END_TOKEN + "' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '" + ROLE_TOKENS["assistant"] + "' }}{% endif %}")

    def spec(self) -> dict[str, Any]:
        """What the manifest records, so inference can check it rebuilds the same template."""
        return {
            "name": TEMPLATE_NAME,
            "bos": BOS_TOKEN if self.bos_id is not None else None,
            "roles": dict(ROLE_TOKENS),
            "end": END_TOKEN,
            "ids": {t: self.tokenizer.token_to_id(t) for t in (BOS_TOKEN, *ROLE_TOKENS.values(), END_TOKEN)
                    if self.tokenizer.token_to_id(t) is not None},
            "stop": [END_TOKEN],
            "mask": "assistant text + its <|end|>",
            "chat_template": self.jinja(),
        }


def render_prompt(messages: Sequence[Message], template: ChatTemplate | str | Path) -> list[int]:
    """Prompt ids ending with <|assistant|>; `template` may be a ChatTemplate, a tokenizer.json or a
    directory holding one (a chat shard directory or an exported model)."""
    if not isinstance(template, ChatTemplate):
        template = ChatTemplate.load(template)
    return template.render_prompt(messages)


# ---------------------------------------------------------------------------------------------
# Writing shards


def _dtype_for_vocab(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class _ShardWriter:
    """Accumulates sequences of one input and one split; writes a shard every `shard_tokens`."""

    def __init__(self, root: Path, base: str, dtype: np.dtype, shard_tokens: int, rel: str) -> None:
        self.root, self.base, self.dtype, self.shard_tokens, self.rel = root, base, dtype, shard_tokens, rel
        self.tokens = array("H" if dtype == np.uint16 else "I")
        self.mask = bytearray()
        self.ends: list[int] = []
        self.records: list[dict[str, Any]] = []

    def add(self, seqs: list[tuple[list[int], list[int]]]) -> None:
        """Append sequences that belong together (a preference pair is never split across shards)."""
        for ids, mask in seqs:
            self.tokens.extend(ids)
            self.mask.extend(mask)
            self.ends.append(len(self.tokens))
        if len(self.tokens) >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.ends:
            return
        part = len(self.records)
        stem = self.base if part == 0 else f"{self.base}.{part}"
        names = {k: f"{stem}.{k}.npy" for k in ("tokens", "mask", "idx")}
        mask = np.frombuffer(self.mask, dtype=np.uint8)
        nbytes = [
            atomic_save_npy(self.root / names["tokens"], np.frombuffer(self.tokens, dtype=self.dtype)),
            atomic_save_npy(self.root / names["mask"], mask),
            atomic_save_npy(self.root / names["idx"], np.asarray(self.ends, dtype=np.int64)),
        ]
        self.records.append({**names, "input": self.rel, "sequences": len(self.ends),
                             "num_tokens": len(self.tokens), "target_tokens": int(mask.sum()),
                             "nbytes": nbytes})
        self.tokens = array(self.tokens.typecode)
        self.mask, self.ends = bytearray(), []


def _in_heldout(prompt: Sequence[Message], seed: int, fraction: float) -> bool:
    if fraction <= 0:
        return False
    key = json.dumps([seed, list(prompt)], ensure_ascii=False, sort_keys=True).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") / 2.0**64 < fraction


def _prompt_of(ex: Example) -> list[Message]:
    if isinstance(ex, PreferencePair):
        return ex.prompt
    last = max(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")
    return ex.messages[:last]


def _encode_batch(template: ChatTemplate, batch: list[Example], max_len: int,
                  ) -> list[list[tuple[list[int], list[int]]] | None]:
    """Sequences of each example (one for a conversation, chosen + rejected for a pair), or None
    when one is longer than max_len. Every text is encoded once, in one tokenizer call."""
    texts: list[str] = []
    for ex in batch:
        msgs = ex.messages if isinstance(ex, Conversation) else [*ex.prompt, ex.chosen, ex.rejected]
        texts.extend(m["content"] for m in msgs)
    encoded = template.encode_texts(texts)
    out: list[list[tuple[list[int], list[int]]] | None] = []
    pos = 0
    for ex in batch:
        if isinstance(ex, Conversation):
            n = len(ex.messages)
            seqs = [template.assemble(ex.messages, encoded[pos:pos + n], train="all")]
        else:
            n = len(ex.prompt)
            prompt_ids = encoded[pos:pos + n]
            seqs = [template.assemble([*ex.prompt, ex.chosen], [*prompt_ids, encoded[pos + n]], train="last"),
                    template.assemble([*ex.prompt, ex.rejected], [*prompt_ids, encoded[pos + n + 1]],
                                      train="last")]
            n += 2
        pos += n
        out.append(None if any(len(ids) > max_len for ids, _ in seqs) else seqs)
    return out


def _base_names(files: list[Path]) -> list[str]:
    stems = []
    for f in files:
        name = f.name
        for suffix in (".jsonl.gz", ".json.gz", ".jsonl", ".json", ".gz"):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
                break
        stems.append(name)
    dup = {s for s in stems if stems.count(s) > 1}
    return [f"{s}-{hashlib.sha1(str(f.resolve()).encode()).hexdigest()[:8]}" if s in dup else s
            for s, f in zip(stems, files, strict=True)]


def _marker_record(marker: Path, settings: dict[str, Any], roots: dict[str, Path]) -> dict[str, Any] | None:
    """The marker's record if it was made with these settings and its shards are intact."""
    try:
        record = json.loads(marker.read_text())
        if record["settings"] != settings:
            return None
        for split, root in roots.items():
            for s in record[split]:
                sizes = [(root / s[k]).stat().st_size for k in ("tokens", "mask", "idx")]
                if sizes != s["nbytes"]:
                    return None
        return record
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _copy_tokenizer(src: Path, out: Path, template: ChatTemplate) -> str:
    """Copy the tokenizer into a shard directory, with a tokenizer_config.json (the source's, if any)
    that carries the template as `chat_template`, so transformers renders prompts the same way.
    Returns the tokenizer's sha1."""
    sha = hashlib.sha1(src.read_bytes()).hexdigest()
    dst = out / "tokenizer.json"
    if dst.is_file() and hashlib.sha1(dst.read_bytes()).hexdigest() != sha:
        raise ValueError(f"{out} already holds chat shards made with a different tokenizer; "
                         "use a new output directory")
    if src.resolve() != dst.resolve():
        atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))
    cfg_src = src.with_name("tokenizer_config.json")
    config = json.loads(cfg_src.read_text()) if cfg_src.is_file() else {}
    config["chat_template"] = template.jinja()
    atomic_write_text(out / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    return sha


def _resolve_kind(files: list[Path], fmt: str, kind: str | None) -> str:
    if kind is not None:
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
        return kind
    # Default: preference when every input holds chosen/rejected pairs, chat otherwise.
    pairs = all((fmt in PAIR_FORMATS or fmt == "auto") and holds_pairs(f) for f in files)
    return "preference" if pairs else "chat"


def tokenize_chat(
    inputs: Sequence[str | Path],
    tokenizer: str | Path,
    output: str | Path,
    fmt: str = "auto",
    kind: str | None = None,
    max_len: int = 1024,
    holdout: float = 0.0,
    seed: int = 0,
    shard_tokens: int = 50_000_000,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize chat / instruction / preference files into masked token shards under `output`.

    `fmt` is one of chat_formats.FORMATS or "auto" (per file, from its first row). `kind` defaults
    to "preference" when every input holds chosen/rejected pairs, else "chat" (pair data then
    trains on the chosen transcript). Sequences longer than `max_len` tokens are dropped, not cut.
    `holdout` (a fraction) writes a held-out split to `output/heldout`. Resumable: an input whose
    completion marker matches these settings is not tokenized again. Returns a run summary.
    """
    t0 = time.perf_counter()
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"unknown chat format {fmt!r}; expected auto or one of {', '.join(FORMATS)}")
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2 tokens, got {max_len}")
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout is a fraction in [0, 1), got {holdout}")
    files = input_files(list(inputs))
    if not files:
        raise ValueError("no chat input files given")
    kind = _resolve_kind(files, fmt, kind)
    tok_path = Path(tokenizer)
    tok_path = tok_path / "tokenizer.json" if tok_path.is_dir() else tok_path
    template = ChatTemplate.load(tok_path)
    formats = [fmt if fmt != "auto" else sniff_format(f) for f in files]
    if kind == "preference":
        for f, ff in zip(files, formats, strict=True):
            if ff not in PAIR_FORMATS:
                raise ValueError(f"{f} is {ff} data, which has no chosen/rejected pairs; --kind preference "
                                 f"needs {' or '.join(PAIR_FORMATS)} rows with chosen and rejected")

    out = Path(output)
    roots = {"train": out, **({HELDOUT_DIR: out / HELDOUT_DIR} if holdout > 0 else {})}
    for root in roots.values():
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{TMP_PREFIX}*"):  # left by a killed run
            stale.unlink(missing_ok=True)
        tok_sha = _copy_tokenizer(tok_path, root, template)
    if holdout == 0 and (out / HELDOUT_DIR / "manifest.json").is_file():
        shutil.rmtree(out / HELDOUT_DIR)  # an earlier run's split that this run would contradict
    dtype = _dtype_for_vocab(template.vocab_size)

    results = []
    for f, ff, base in zip(files, formats, _base_names(files), strict=True):
        settings = {"input": str(f.resolve()), "input_bytes": f.stat().st_size, "format": ff, "kind": kind,
                    "max_len": max_len, "holdout": holdout, "seed": seed, "shard_tokens": shard_tokens,
                    "tokenizer_sha1": tok_sha, "template": template.spec()}
        marker = out / f"{base}.done"
        record = _marker_record(marker, settings, roots) if marker.is_file() else None
        if record is not None:
            results.append({**record, "status": "resumed"})
            continue
        writers = {split: _ShardWriter(root, base, dtype, shard_tokens, f.name) for split, root in roots.items()}
        stats = _tokenize_file(f, ff, kind, template, max_len, holdout, seed, writers, progress)
        for w in writers.values():
            w.flush()
        record = {"settings": settings, "stats": stats, **{s: w.records for s, w in writers.items()}}
        atomic_write_text(marker, json.dumps(record))
        results.append({**record, "status": "done"})
        dropped = ", ".join(f"{r} {n}" for r, n in sorted(stats["dropped"].items())) or "none"
        log.info("%s (%s): %d rows, %d kept, %d held out, dropped: %s", f.name, ff, stats["rows"],
                 stats["examples"], stats["heldout"], dropped)

    return _write_manifests(results, roots, kind, template, tok_sha, dtype, max_len, holdout, seed, t0)


def _tokenize_file(path: Path, fmt: str, kind: str, template: ChatTemplate, max_len: int, holdout: float,
                   seed: int, writers: dict[str, _ShardWriter], progress: bool) -> dict[str, Any]:
    rows, total = read_rows(path)
    dropped: Counter[str] = Counter()
    counts = {"rows": 0, "train": 0, HELDOUT_DIR: 0}
    batch: list[Example] = []

    def flush_batch() -> None:
        for ex, seqs in zip(batch, _encode_batch(template, batch, max_len), strict=True):
            if seqs is None:
                dropped[TOO_LONG] += 1
                continue
            split = HELDOUT_DIR if _in_heldout(_prompt_of(ex), seed, holdout) else "train"
            writers[split].add(seqs)
            counts[split] += 1
        batch.clear()

    for row in tqdm(rows, total=total, desc=f"chat {path.name}", unit="row", disable=not progress, leave=False):
        counts["rows"] += 1
        for ex in parse_row(row, fmt, pairs=kind == "preference"):
            if isinstance(ex, Dropped):
                dropped[ex.reason] += 1
            else:
                batch.append(ex)
        if len(batch) >= _BATCH:
            flush_batch()
    flush_batch()
    return {"input": str(path), "format": fmt, "rows": counts["rows"], "examples": counts["train"],
            "heldout": counts[HELDOUT_DIR], "dropped": dict(sorted(dropped.items()))}


def _write_manifests(results: list[dict[str, Any]], roots: dict[str, Path], kind: str, template: ChatTemplate,
                     tok_sha: str, dtype: np.dtype, max_len: int, holdout: float, seed: int,
                     t0: float) -> dict[str, Any]:
    dropped: Counter[str] = Counter()
    for r in results:
        dropped.update(r["stats"]["dropped"])
    inputs = [r["stats"] for r in results]
    per_example = 2 if kind == "preference" else 1
    manifests = {}
    for split, root in roots.items():
        shards = [s for r in results for s in r[split]]
        sequences = sum(s["sequences"] for s in shards)
        manifest = {
            "format": MANIFEST_FORMAT, "kind": kind, "split": split,
            "tokenizer": "tokenizer.json", "tokenizer_sha1": tok_sha, "vocab_size": template.vocab_size,
            "dtype": dtype.name, "template": template.spec(), "max_len": max_len,
            "bos_id": template.bos_id, "eos_id": template.eos_id, "pad_id": template.pad_id,
            "end_id": template.end_id,
            "examples": sequences // per_example, "sequences": sequences,
            "total_tokens": sum(s["num_tokens"] for s in shards),
            "target_tokens": sum(s["target_tokens"] for s in shards),
            "dropped": dict(sorted(dropped.items())) if split == "train" else {},
            "holdout": {"fraction": holdout, "seed": seed, "path": HELDOUT_DIR if holdout > 0 else None},
            "inputs": inputs,
            "shards": shards,
        }
        atomic_write_text(root / "manifest.json", json.dumps(manifest, indent=1) + "\n")
        manifests[split] = manifest
    summary = {
        "manifest": str(roots["train"] / "manifest.json"), "kind": kind,
        "examples": manifests["train"]["examples"],
        "heldout_examples": manifests[HELDOUT_DIR]["examples"] if HELDOUT_DIR in manifests else 0,
        "total_tokens": manifests["train"]["total_tokens"],
        "rows": sum(i["rows"] for i in inputs), "dropped": dict(sorted(dropped.items())), "inputs": inputs,
        "inputs_resumed": sum(r["status"] == "resumed" for r in results),
        "seconds": time.perf_counter() - t0,
    }
    summary["summary"] = summary_line(summary)
    return summary


def summary_line(summary: dict[str, Any]) -> str:
    """One line: rows read, examples kept per split, drops by reason."""
    unit = "pairs" if summary["kind"] == "preference" else "conversations"
    drops = sum(summary["dropped"].values())
    why = ", ".join(f"{r} {n:,}" for r, n in summary["dropped"].items())
    held = f" + {summary['heldout_examples']:,} held out" if summary["heldout_examples"] else ""
    files = f"{len(summary['inputs'])} file" + ("s" if len(summary["inputs"]) != 1 else "")
    return (f"{summary['rows']:,} rows from {files} → {summary['examples']:,} {unit}{held} "
            f"({summary['total_tokens']:,} tokens); dropped {drops:,}" + (f" ({why})" if why else ""))


# ---------------------------------------------------------------------------------------------
# Reading shards


class _MaskedSequences:
    """Memory-mapped sequences of a chat shard directory (one split)."""

    kind = ""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        self.path = path / "manifest.json" if path.is_dir() else path
        if not self.path.is_file():
            raise FileNotFoundError(f"chat shard manifest not found: {self.path}")
        m = json.loads(self.path.read_text())
        if m.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"{self.path} is not a chat shard manifest (format {m.get('format')!r}, expected "
                             f"{MANIFEST_FORMAT}); make one with `refinery chat tokenize`")
        if m.get("kind") != self.kind:
            raise ValueError(f"{self.path} holds {m.get('kind')!r} shards, not {self.kind!r}; "
                             f"tokenize with --kind {self.kind}")
        self.manifest = m
        self.root = self.path.parent
        self.vocab_size = int(m["vocab_size"])
        self._tokens, self._mask, self._starts, self._ends = [], [], [], []
        for s in m["shards"]:
            tokens = np.load(self.root / s["tokens"], mmap_mode="r")
            mask = np.load(self.root / s["mask"], mmap_mode="r")
            ends = np.load(self.root / s["idx"])
            if len(tokens) != len(mask) or len(ends) != s["sequences"] or (len(ends) and ends[-1] != len(tokens)):
                raise ValueError(f"{self.root / s['tokens']}: tokens, mask and idx disagree; re-run tokenize")
            self._tokens.append(tokens)
            self._mask.append(mask)
            self._ends.append(ends)
            self._starts.append(np.concatenate([[0], ends[:-1]]).astype(np.int64))
        counts = np.array([len(e) for e in self._ends], dtype=np.int64)
        self._first = np.concatenate([[0], np.cumsum(counts)])  # global index of each shard's 1st sequence
        self.lengths = (np.concatenate([e - s for s, e in zip(self._starts, self._ends, strict=True)])
                        if self._ends else np.zeros(0, dtype=np.int64))

    @property
    def num_sequences(self) -> int:
        return int(self._first[-1])

    def sequence(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64, mask bool) of the j-th sequence."""
        if not 0 <= j < self.num_sequences:
            raise IndexError(f"sequence {j} out of range ({self.num_sequences})")
        shard = int(np.searchsorted(self._first, j, side="right")) - 1
        k = j - int(self._first[shard])
        a, b = int(self._starts[shard][k]), int(self._ends[shard][k])
        return (np.asarray(self._tokens[shard][a:b], dtype=np.int64),
                np.asarray(self._mask[shard][a:b], dtype=bool))

    def template(self) -> ChatTemplate:
        """The template these shards were made with, rebuilt from the tokenizer copy and checked."""
        t = ChatTemplate.load(self.root / self.manifest["tokenizer"])
        if t.spec() != self.manifest["template"]:
            raise ValueError(f"{self.root}: the tokenizer beside the shards does not give the template "
                             "recorded in manifest.json")
        return t


class ChatShards(_MaskedSequences):
    """kind "chat": `shards[i] -> (ids, mask)`, mask True on trained targets."""

    kind = "chat"

    def __len__(self) -> int:
        return self.num_sequences

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.sequence(i)


class PreferenceShards(_MaskedSequences):
    """kind "preference": `shards[i] -> (chosen_ids, chosen_mask, rejected_ids, rejected_mask)`."""

    kind = "preference"

    def __len__(self) -> int:
        return self.num_sequences // 2

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(f"pair {i} out of range ({len(self)})")
        return (*self.sequence(2 * i), *self.sequence(2 * i + 1))
