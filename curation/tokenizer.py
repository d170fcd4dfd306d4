"""Train a byte-level BPE tokenizer on a corpus, or load any existing `tokenizer.json`.

Our own tokenizers reserve the first ids for special tokens, in this order (the ids are part of
the token-shard contract, so later stages can rely on them):

    0 <|bos|>  1 <|eos|>  2 <|pad|>  3 <|system|>  4 <|user|>  5 <|assistant|>  6 <|end|>

BOS/EOS/PAD are also written to a `tokenizer_config.json` beside the `tokenizer.json` (the
Hugging Face convention, so `transformers.AutoTokenizer` loads the folder). Any other
`tokenizer.json` (a user's Llama or OLMo tokenizer) is accepted: `load_tokenizer` finds its EOS/BOS
from that config if present, else by the common token names below.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from functools import cached_property
from pathlib import Path

import orjson
import pyarrow.parquet as pq
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from curation.corpus import curated_files
from curation.writer import atomic_write_text, tmp_path

log = logging.getLogger(__name__)

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
SPECIAL_TOKENS = (BOS, EOS, PAD, *CHAT_TOKENS)

# Names used by common tokenizers, most specific first: ours, Llama 3, GPT-2/NeoX/OLMo, Llama 2 /
# Mistral (sentencepiece), Gemma.
EOS_NAMES = (EOS, "<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>")
BOS_NAMES = (BOS, "<|begin_of_text|>", "<s>", "<bos>", "<|endoftext|>")
PAD_NAMES = (PAD, "<|finetune_right_pad_id|>", "<pad>", "[PAD]")

TEXT_SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz", ".json.gz", ".txt")
# Plain-text files are fed to the trainer in pieces of about this many characters, so a large
# book never has to sit in memory whole.
TXT_CHUNK_CHARS = 1 << 20


def _is_text_file(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and p.name.endswith(TEXT_SUFFIXES)


def input_files(inputs: Iterable[str | Path]) -> list[Path]:
    """Expand inputs (files or directories searched recursively) into a sorted file list.

    A directory of a curation output yields exactly the document files its run wrote (see
    `curation.corpus`), never its `_work/` files.
    """
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            curated = curated_files(p, TEXT_SUFFIXES)
            found = curated if curated is not None else sorted(f for f in p.rglob("*") if _is_text_file(f))
            if not found:
                raise FileNotFoundError(f"no text files ({', '.join(TEXT_SUFFIXES)}) under {p}")
            files.extend(found)
        elif p.is_file():
            if not p.name.endswith(TEXT_SUFFIXES):
                raise ValueError(f"unsupported input {p}: expected one of {', '.join(TEXT_SUFFIXES)}")
            files.append(p)
        else:
            raise FileNotFoundError(f"tokenizer input not found: {p}")
    return files


def iter_texts(path: str | Path) -> Iterator[str]:
    """Stream the texts of one file: Parquet `text` column, JSON lines' `text`, or plain text."""
    path = Path(path)
    name = path.name
    if name.endswith(".parquet"):
        pf = pq.ParquetFile(path)
        if "text" not in pf.schema_arrow.names:
            raise ValueError(f"{path} has no 'text' column, so it is not a corpus shard")
        for batch in pf.iter_batches(columns=["text"], batch_size=1024):
            yield from (t for t in batch.column(0).to_pylist() if t)
    elif name.endswith((".jsonl.gz", ".json.gz", ".jsonl")):
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rb") as f:
            for line in f:
                if line.strip():
                    text = orjson.loads(line).get("text")
                    if isinstance(text, str) and text:
                        yield text
    else:
        with open(path, encoding="utf-8", errors="replace") as f:
            while True:
                chunk = f.read(TXT_CHUNK_CHARS)
                if not chunk:
                    break
                # Finish the current line so no word is cut in two.
                yield chunk + f.readline()


def _iter_corpus(files: list[Path], max_chars: int | None) -> Iterator[str]:
    seen = 0
    for f in files:
        for text in iter_texts(f):
            yield text
            seen += len(text)
            if max_chars is not None and seen >= max_chars:
                return


def train_tokenizer(
    inputs: list[str | Path],
    vocab_size: int,
    output: str | Path,
    min_frequency: int = 2,
    max_chars: int | None = None,
) -> Path:
    """Train a byte-level BPE tokenizer and write `output` (a tokenizer.json) atomically.

    `inputs` are corpus directories, .parquet / .jsonl(.gz) files with a `text` field, or .txt
    files; they are streamed, never loaded whole. `max_chars` stops after that many characters
    (a sample is enough to learn merges on a large corpus). Returns the written path.
    """
    # 256 byte symbols are the base alphabet; below that, BPE cannot represent every input.
    min_vocab = 256 + len(SPECIAL_TOKENS)
    if vocab_size < min_vocab:
        raise ValueError(f"vocab_size {vocab_size} is too small: byte-level BPE needs at least "
                         f"{min_vocab} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    files = input_files(inputs)
    output = Path(output)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    log.info("tokenizer: training a %d-token BPE on %d file(s)%s", vocab_size, len(files),
             f", the first {max_chars:,} characters" if max_chars else "")
    t0 = time.perf_counter()
    tok.train_from_iterator(_iter_corpus(files, max_chars), trainer=trainer)
    log.info("tokenizer: trained in %.1f s", time.perf_counter() - t0)
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i, f"special token {name} did not get id {i}"

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(output)
    tok.save(str(tmp))
    os.replace(tmp, output)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "additional_special_tokens": list(CHAT_TOKENS),
        "clean_up_tokenization_spaces": False,
    }
    atomic_write_text(output.with_name("tokenizer_config.json"), json.dumps(config, indent=2) + "\n")
    return output


class TextTokenizer:
    """A `tokenizers.Tokenizer` plus the ids the data pipeline needs (EOS, BOS, PAD, vocab size).

    With `split_special_tokens` (the default, for pretraining text), special-token strings inside
    a document (a web page quoting "<|endoftext|>") are split like any other text, so only the EOS
    we append marks a boundary. Chat formatting (SFT) turns it off to encode role tokens.
    """

    def __init__(self, tokenizer: Tokenizer, eos_id: int, bos_id: int | None, pad_id: int | None,
                 path: Path | None = None, split_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.tokenizer.encode_special_tokens = split_special_tokens
        self.eos_id = eos_id
        self.bos_id = bos_id
        self.pad_id = pad_id
        self.path = path

    @cached_property
    def vocab_size(self) -> int:
        """One more than the largest id, so an embedding of this size covers every token."""
        return max(self.tokenizer.get_vocab(with_added_tokens=True).values()) + 1

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # encode_batch_fast skips offset tracking, which we never use; rayon parallelises it.
        return [e.ids for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def _config_token(config: dict, key: str) -> str | None:
    value = config.get(key)
    if isinstance(value, dict):  # transformers' AddedToken serialisation
        value = value.get("content")
    return value if isinstance(value, str) else None


def _find(tok: Tokenizer, configured: str | None, names: tuple[str, ...]) -> int | None:
    for name in ((configured,) if configured else ()) + names:
        tid = tok.token_to_id(name)
        if tid is not None:
            return tid
    return None


def load_tokenizer(path: str | Path, eos_token: str | None = None,
                   split_special_tokens: bool = True) -> TextTokenizer:
    """Load a `tokenizer.json` (ours or any Hugging Face one) and find its special ids.

    EOS/BOS/PAD come from `eos_token` if given, else from a `tokenizer_config.json` beside the
    file, else from the common names in EOS_NAMES / BOS_NAMES / PAD_NAMES. A tokenizer without
    an EOS is an error: documents could not be separated in the token stream.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer not found: {path}")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise ValueError(f"cannot read tokenizer {path}: {e}") from e
    config: dict = {}
    cfg_path = path.with_name("tokenizer_config.json")
    if cfg_path.is_file():
        config = json.loads(cfg_path.read_text())
    eos_name = eos_token or _config_token(config, "eos_token")
    if eos_token is not None and tok.token_to_id(eos_token) is None:
        raise ValueError(f"eos_token {eos_token!r} is not in the vocabulary of {path}")
    eos_id = _find(tok, eos_name, EOS_NAMES)
    if eos_id is None:
        raise ValueError(f"tokenizer {path} has no EOS token (looked for {', '.join(EOS_NAMES)}); "
                         "pass eos_token= or add eos_token to a tokenizer_config.json beside it")
    bos_id = _find(tok, _config_token(config, "bos_token"), BOS_NAMES)
    pad_id = _find(tok, _config_token(config, "pad_token"), PAD_NAMES)
    return TextTokenizer(tok, eos_id=eos_id, bos_id=bos_id, pad_id=pad_id, path=path,
                         split_special_tokens=split_special_tokens)
