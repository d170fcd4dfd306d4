"""Train the fastText quality and topic classifiers from labelled text on this machine.

Quality (as DCLM and Dolma 3): positives are clean reference or instruction-like text (books,
Wikipedia, good SFT answers), negatives raw extracted web text; the score is P(hq). Topic: text
labelled with its topic (AG News' four news topics, arXiv archives) or files the user labels.

Examples are read from many formats (`read_examples`): plain text (split into document-sized chunks
at paragraph breaks), JSON / JSON lines (gz, zst) with a text field, CSV in the AG News or arXiv
layout, Python sources. Each source contributes at most `max_per_source` examples, so one large
book collection does not become the whole positive class, and quality classes are balanced. A
seeded, stratified split holds out `holdout` of the examples; held-out accuracy and AUC go into
`model.json` beside `model.bin`.
"""

from __future__ import annotations

import ast
import csv
import gzip
import io
import json
import os
import random
import re
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from curation.classify import (
    DEFAULT_MAX_CHARS,
    LABEL_PREFIX,
    META_FILE,
    META_FORMAT,
    MODEL_FILE,
    QUALITY_NEGATIVE,
    QUALITY_POSITIVE,
    Classifier,
    forget_model,
    normalize,
)
from curation.writer import atomic_write_text

# Row fields that hold a document's text, in order of preference (web dumps, SFT answers, abstracts).
TEXT_FIELDS = ("text", "content", "contents", "t", "response", "output", "completion", "abstract", "summaries")
LABEL_FIELDS = ("label", "topic")
SUFFIXES = (".txt", ".raw", ".py", ".jsonl", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json", ".csv")
_HEADING = re.compile(r"^\s*=+ .* =+\s*$")
_WIKITEXT_JOIN = re.compile(r" @(.)@ ")  # WikiText's " @-@ ", " @,@ ", " @.@ "
_LABEL_OK = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


class ClassifierDataError(ValueError):
    """Training data that cannot make a classifier: no examples, one class only, a bad label."""


@dataclass(frozen=True)
class Source:
    """Files to read examples from; `label` set means every example gets it (else read from rows)."""

    path: Path
    label: str | None = None


def clean_label(raw: str) -> str:
    """`Sci/Tech` → `sci_tech`: fastText labels are single tokens and topic names become pool names."""
    label = re.sub(r"[^a-z0-9_.-]+", "_", raw.strip().lower()).strip("_")
    if not _LABEL_OK.match(label):
        raise ClassifierDataError(f"label {raw!r} has no letters or digits; name labels like 'sports'")
    return label


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"classifier training input not found: {path}")
    return [p for p in sorted(path.rglob("*")) if p.is_file() and p.name.endswith(SUFFIXES)
            and not p.name.startswith(".")]


def chunk_text(text: str, chunk_words: int = 200, min_words: int = 10) -> Iterator[str]:
    """Document-sized pieces of a long text: paragraphs joined until `chunk_words` words.

    Headings (WikiText's `= = Title = =`) are dropped and WikiText's split tokens (`@-@`) joined,
    so reference text does not differ from web text by artifacts the classifier could learn.
    """
    text = _WIKITEXT_JOIN.sub(r"\1", text)
    parts: list[str] = []
    words = 0
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if not para or _HEADING.match(para):
            continue
        parts.append(para)
        words += len(para.split())
        if words >= chunk_words:
            yield "\n\n".join(parts)
            parts, words = [], 0
    if words >= min_words:
        yield "\n\n".join(parts)


def _open_text(path: Path) -> io.TextIOBase:
    name = path.name
    if name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
    if name.endswith(".zst"):
        import zstandard

        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True),
                                encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _row_example(row: Any) -> tuple[str, str | None] | None:
    if not isinstance(row, dict):
        return None
    text = next((row[f] for f in TEXT_FIELDS if isinstance(row.get(f), str) and row[f].strip()), None)
    if text is None:
        return None
    label = next((str(row[f]) for f in LABEL_FIELDS if row.get(f) not in (None, "")), None)
    return text, label


def _csv_examples(path: Path) -> Iterator[tuple[str, str | None]]:
    """AG News (`"class","title","description"`, no header; names in classes.txt beside it) or an
    arXiv export with a header (`abstract`/`summaries` and `tags`/`terms`: the primary archive)."""
    csv.field_size_limit(1 << 24)
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        rows = csv.reader(f)
        first = next(rows, None)
        if first is None:
            return
        header = [h.strip().lower() for h in first]
        text_col = next((header.index(c) for c in ("abstract", "summaries", "text") if c in header), None)
        if text_col is not None:
            label_col = next((header.index(c) for c in ("tags", "terms", "label") if c in header), None)
            title_col = next((header.index(c) for c in ("title", "titles") if c in header), None)
            for row in rows:
                if len(row) != len(header):
                    continue
                text = row[text_col]
                if title_col is not None:
                    text = f"{row[title_col]}\n\n{text}"
                yield text, _arxiv_archive(row[label_col]) if label_col is not None else None
            return
        if len(first) == 3 and first[0].strip().isdigit():
            names_file = path.parent / "classes.txt"
            names = names_file.read_text().split("\n") if names_file.is_file() else []
            names = [n.strip() for n in names if n.strip()]
            for row in [first, *rows]:
                if len(row) != 3 or not row[0].strip().isdigit():
                    continue
                k = int(row[0])
                label = names[k - 1] if 0 < k <= len(names) else row[0]
                # AG News writes line breaks as a backslash.
                yield f"{row[1]}. {row[2]}".replace("\\", " "), label
            return
        raise ClassifierDataError(f"{path}: a CSV needs a header with 'abstract'/'summaries'/'text' (and "
                                  "'tags'/'terms'/'label'), or AG News' three columns class,title,description")


def _arxiv_archive(tags: str) -> str | None:
    """`['math.ST', 'stat.ML']` → `math`: the archive of the primary category."""
    try:
        parsed = ast.literal_eval(tags) if tags.strip().startswith("[") else [tags]
    except (ValueError, SyntaxError):
        parsed = [tags]
    if not parsed:
        return None
    return str(parsed[0]).split(".")[0]


def read_examples(path: str | Path, chunk_words: int = 200, min_words: int = 10) -> Iterator[tuple[str, str | None]]:
    """(text, label or None) examples from a file or directory of supported files."""
    for f in _files(Path(path)):
        name = f.name
        if name.endswith((".txt", ".raw")):
            yield from ((c, None) for c in chunk_text(f.read_text(encoding="utf-8", errors="replace"),
                                                       chunk_words, min_words))
        elif name.endswith(".py"):
            text = f.read_text(encoding="utf-8", errors="replace")
            if len(text.split()) >= min_words:
                yield text, None
        elif name.endswith(".csv"):
            yield from ((t, lab) for t, lab in _csv_examples(f) if len(t.split()) >= min_words)
        elif name.endswith(".json"):
            with open(f, encoding="utf-8", errors="replace") as fh:
                data = json.load(fh)
            for row in data if isinstance(data, list) else [data]:
                ex = _row_example(row)
                if ex is not None and len(ex[0].split()) >= min_words:
                    yield ex
        else:
            with _open_text(f) as fh:
                for line in fh:
                    if not line.strip():
                        continue
                    try:
                        ex = _row_example(json.loads(line))
                    except ValueError:
                        continue
                    if ex is not None and len(ex[0].split()) >= min_words:
                        yield ex


def default_sources(kind: str, data_dir: str | Path) -> list[Source]:
    """The training sources used when none are given, from the shared data folder (see its README)."""
    d = Path(data_dir)
    if kind == "quality":
        pos = [d / "text/wikipedia_en", d / "text/gutenberg_nltk", d / "text/misc/cs336_high_quality_wiki_reference.txt",
               d / "sft/gpteacher_roleplay_instruct.json", d / "sft/gpteacher_toolformer_sim0.6.json"]
        # C4's second file, Dolma's CC-2019 shard and RedPajama stay out: they are the web corpus
        # the mixing guide classifies, which must not be training data.
        neg = [d / "web_text/c4_en_sample/c4_en_train_first1000.jsonl", d / "web_text/hplt_cc_random_sample100",
               d / "web_text/oscar_sample_annotated", d / "web_text/dolma_cc_fixtures/cc_en_head-0091.jsonl",
               d / "web_text/dolma_cc_fixtures/cc_en_head-0174.jsonl",
               d / "web_text/dolma_cc_fixtures/documents.json.gz"]
        return [Source(p, QUALITY_POSITIVE) for p in pos] + [Source(p, QUALITY_NEGATIVE) for p in neg]
    if kind == "topic":
        return [Source(d / "domains/ag_news/test.csv"), Source(d / "domains/arxiv_abstracts")]
    raise ClassifierDataError(f"unknown classifier kind {kind!r}; choose quality or topic")


def collect_examples(sources: Sequence[Source], max_per_source: int = 1000, seed: int = 0,
                     chunk_words: int = 200, min_words: int = 10) -> list[tuple[str, str]]:
    """(label, text) examples, at most `max_per_source` from each source (a seeded sample)."""
    rng = random.Random(seed)
    out: list[tuple[str, str]] = []
    for src in sources:
        got = []
        for text, row_label in read_examples(src.path, chunk_words, min_words):
            label = src.label if src.label is not None else row_label
            if label is None:
                raise ClassifierDataError(f"{src.path} has no topic labels in its rows; give its label as "
                                          f"LABEL={src.path}")
            got.append((clean_label(label), text))
        if not got:
            raise ClassifierDataError(f"{src.path}: no examples of at least {min_words} words found "
                                      f"(supported: {', '.join(SUFFIXES)})")
        if len(got) > max_per_source:
            got = rng.sample(got, max_per_source)
        out.extend(got)
    return out


def balance(examples: list[tuple[str, str]], seed: int = 0, to: str = "min") -> list[tuple[str, str]]:
    """Subsample labels larger than the smallest (`min`) or the median (`median`) label's count, so
    the prior does not decide scores (quality: `min`; topic: `median`, keeping rare topics' siblings)."""
    by_label: dict[str, list[tuple[str, str]]] = {}
    for ex in examples:
        by_label.setdefault(ex[0], []).append(ex)
    sizes = sorted(len(v) for v in by_label.values())
    n = sizes[0] if to == "min" else sizes[len(sizes) // 2]
    rng = random.Random(seed)
    out = []
    for label in sorted(by_label):
        items = by_label[label]
        out.extend(items if len(items) <= n else rng.sample(items, n))
    return out


def split(examples: list[tuple[str, str]], holdout: float, seed: int = 0
          ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """A stratified, seeded train / held-out split (at least one held-out example per label)."""
    rng = random.Random(seed)
    by_label: dict[str, list[tuple[str, str]]] = {}
    for ex in examples:
        by_label.setdefault(ex[0], []).append(ex)
    train, held = [], []
    for label in sorted(by_label):
        items = list(by_label[label])
        rng.shuffle(items)
        k = max(1, round(holdout * len(items))) if len(items) > 1 else 0
        held.extend(items[:k])
        train.extend(items[k:])
    rng.shuffle(train)
    return train, held


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties averaged."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sx = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def roc_auc(y_true: np.ndarray, score: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney U with tied scores counted half); None without both classes."""
    y = np.asarray(y_true, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if not n_pos or not n_neg:
        return None
    r = _ranks(np.asarray(score, dtype=np.float64))
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def evaluate(clf: Classifier, held: list[tuple[str, str]]) -> dict[str, Any]:
    """Held-out accuracy, AUC (quality: of P(hq); topic: macro one-vs-rest) and per-label recall."""
    labels = [lab for lab, _ in held]
    probs = clf.predict_proba([t for _, t in held])
    pred = [clf.labels[j] for j in probs.argmax(axis=1)]
    y = np.array(labels)
    acc = float(np.mean(np.array(pred) == y))
    per_label_auc = {lab: roc_auc(y == lab, probs[:, j]) for j, lab in enumerate(clf.labels)}
    if clf.kind == "quality":
        auc = per_label_auc[QUALITY_POSITIVE]
    else:
        present = [v for v in per_label_auc.values() if v is not None]
        auc = float(np.mean(present)) if present else None
    recall = {lab: float(np.mean(np.array(pred)[y == lab] == lab)) for lab in sorted(set(labels))}
    counts = Counter(labels)
    chance = max(counts.values()) / len(labels)  # always answering the most common label
    return {"examples": len(held), "accuracy": round(acc, 4), "auc": None if auc is None else round(auc, 4),
            "majority_baseline": round(chance, 4), "recall": {k: round(v, 4) for k, v in recall.items()},
            "auc_per_label": {k: None if v is None else round(v, 4) for k, v in per_label_auc.items()}}


def train_classifier(
    kind: str,
    sources: Sequence[Source],
    output: str | Path,
    *,
    holdout: float = 0.1,
    max_per_source: int = 4000,
    min_label_examples: int = 50,
    seed: int = 0,
    epoch: int = 20,
    lr: float = 0.5,
    dim: int = 64,
    word_ngrams: int = 2,
    bucket: int = 200_000,
    min_count: int = 2,
    threads: int | None = None,
    chunk_words: int = 200,
    max_chars: int = DEFAULT_MAX_CHARS,
) -> dict[str, Any]:
    """Train, evaluate on the held-out split, and write `model.bin` + `model.json` to `output`.

    Hyper-parameters follow DCLM's fastText quality filter (word bigrams, softmax), with a smaller
    `dim` and hash `bucket` so a model is ~50 MB, not ~2 GB, and more epochs at a higher rate, as
    fastText advises for a few thousand examples: 5 epochs at lr 0.1 gave held-out accuracy 0.73
    (quality) and 0.39 (topic, the majority class everywhere) on the default sources, 20 at 0.5 gives
    0.94-0.96 and 0.91 (0.88 with topics balanced to the median label). Topic labels with fewer than `min_label_examples`
    examples are dropped (listed in `model.json`): a class seen a few dozen times is never predicted.
    """
    if kind not in ("quality", "topic"):
        raise ClassifierDataError(f"unknown classifier kind {kind!r}; choose quality or topic")
    if not 0.0 < holdout < 1.0:
        raise ClassifierDataError(f"holdout must be a fraction in (0, 1), got {holdout}")
    t0 = time.perf_counter()
    examples = collect_examples(sources, max_per_source=max_per_source, seed=seed, chunk_words=chunk_words)
    counts = Counter(lab for lab, _ in examples)
    dropped = {}
    if kind == "topic":
        dropped = {lab: n for lab, n in sorted(counts.items()) if n < min_label_examples}
        examples = [ex for ex in examples if ex[0] not in dropped]
    labels = sorted({lab for lab, _ in examples})
    if kind == "quality":
        if set(labels) != {QUALITY_POSITIVE, QUALITY_NEGATIVE}:
            raise ClassifierDataError(f"a quality classifier needs positive ({QUALITY_POSITIVE}) and negative "
                                      f"({QUALITY_NEGATIVE}) examples; got labels {labels}")
        examples = balance(examples, seed)
    elif len(labels) < 2:
        raise ClassifierDataError(f"a topic classifier needs at least two labels; got {labels}")
    else:
        examples = balance(examples, seed, to="median")
    train, held = split(examples, holdout, seed)

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    train_file = out / f".tmp-train-{os.getpid()}.txt"
    try:
        with open(train_file, "w", encoding="utf-8") as f:
            for label, text in train:
                f.write(f"{LABEL_PREFIX}{label} {normalize(text, max_chars)}\n")
        import fasttext

        model = fasttext.train_supervised(
            input=str(train_file), epoch=epoch, lr=lr, dim=dim, wordNgrams=word_ngrams, bucket=bucket,
            minCount=min_count, minn=0, maxn=0, loss="softmax", seed=seed,
            thread=threads or max(1, min(4, os.cpu_count() or 1)), verbose=0)
    finally:
        train_file.unlink(missing_ok=True)
    tmp_model = out / f".tmp-{MODEL_FILE}"
    model.save_model(str(tmp_model))
    os.replace(tmp_model, out / MODEL_FILE)
    forget_model(out)  # a model loaded earlier in this process from the same path is stale now
    meta: dict[str, Any] = {
        "format": META_FORMAT, "kind": kind, "labels": labels, "max_chars": max_chars,
        "normalize": "lowercase; \\w+ and single punctuation tokens (curation.classify.normalize)",
        "sources": [{"path": str(s.path), "label": s.label} for s in sources],
        "dropped_labels": dropped,
        "train_examples": dict(sorted(Counter(lab for lab, _ in train).items())),
        "heldout_examples": dict(sorted(Counter(lab for lab, _ in held).items())),
        "params": {"epoch": epoch, "lr": lr, "dim": dim, "word_ngrams": word_ngrams, "bucket": bucket,
                   "min_count": min_count, "seed": seed, "holdout": holdout, "max_per_source": max_per_source,
                   "min_label_examples": min_label_examples,
                   "chunk_words": chunk_words},
    }
    atomic_write_text(out / META_FILE, json.dumps(meta, indent=1) + "\n")
    metrics = evaluate(Classifier(out, kind=kind), held)
    meta["heldout"] = metrics
    meta["seconds"] = round(time.perf_counter() - t0, 2)
    atomic_write_text(out / META_FILE, json.dumps(meta, indent=1) + "\n")
    return meta
