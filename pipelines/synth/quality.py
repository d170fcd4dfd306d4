"""Which generated documents to keep: failed, empty, too short or refused generations are dropped
with a reason, and near-duplicates are removed with our MinHash.

A refusal is recognized at the opening of a reply only ("I'm sorry, but I can't…", "As an AI…"):
documents about a spec quote refusals in their scenarios, and those must stay.

Near-duplicates: the signatures, band hashes, shingle sets and Jaccard of
`curation.dedup.minhash` (the curate pipeline's functions, so the same pair is a duplicate here and
there), with its defaults (word 5-grams, 26 bands × 11 rows, true Jaccard ≥ 0.8). A synthetic run is
small (thousands to a few hundred thousand documents), so candidate pairs are found in memory rather
than through the shuffle files the corpus-scale step writes. Of each connected group of duplicates
the document of the earliest prompt stays.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from curation.dedup.minhash import MinHasher, band_hashes, jaccard, shingle_sets, words

DROP_ERROR, DROP_EMPTY, DROP_SHORT, DROP_REFUSAL, DROP_DUPLICATE = (
    "generator_error", "empty", "too_short", "refusal", "dedup.minhash")

_REFUSAL = re.compile(
    r"^\W*(?:(?:i'?m|i am)\s+(?:really\s+|very\s+)?sorry\b|sorry,|i\s+apologi[sz]e\b|as an ai\b"
    r"|i\s+(?:can\s?not|can'?t|won'?t|will not|am unable to|'?m unable to|am not able to|must decline)\b"
    r"|unfortunately,?\s+i\s+(?:can'?t|cannot|am unable))",
    re.IGNORECASE,
)


def is_refusal(text: str) -> bool:
    return bool(_REFUSAL.match(text[:200].replace("\u2019", "'")))


def clean(text: str) -> str:
    """The document as kept: surrounding whitespace and a wrapping code fence removed."""
    text = text.strip()
    fenced = re.fullmatch(r"```[a-z]*\n(.*)\n```", text, flags=re.DOTALL)
    return fenced.group(1).strip() if fenced else text


def drop_reason(text: str | None, min_words: int) -> str | None:
    """Why a generation is not a document, or None to keep it."""
    if text is None:
        return DROP_ERROR
    n = len(words(text))
    if n == 0:
        return DROP_EMPTY
    if is_refusal(text):
        return DROP_REFUSAL
    if n < min_words:
        return DROP_SHORT
    return None


def near_duplicates(texts: Sequence[str], bands: int = 26, rows: int = 11, threshold: float = 0.8,
                    ngram_size: int = 5, seed: int = 1) -> dict[int, int]:
    """{index: index of the survivor it duplicates} for every text to drop; the survivor of each group
    of texts linked by Jaccard ≥ threshold is the one with the smallest index."""
    if len(texts) < 2:
        return {}
    sigs, has_words = MinHasher(bands * rows, seed, ngram_size).signatures(list(texts))
    buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, row in enumerate(band_hashes(sigs, bands, rows)):
        if has_words[i]:
            for b, h in enumerate(row.tolist()):
                buckets[(b, h)].append(i)
    candidates = {(m[0], other) for m in buckets.values() if len(m) > 1 for other in m[1:]}
    candidates |= {(a, b) for m in buckets.values() if 2 < len(m) <= 64
                   for x, a in enumerate(m) for b in m[x + 1:]}
    if not candidates:
        return {}
    members = sorted({i for pair in candidates for i in pair})
    sets = dict(zip(members, shingle_sets([texts[i] for i in members], ngram_size), strict=True))
    parent = list(range(len(texts)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in sorted(candidates):
        if jaccard(sets[a], sets[b]) >= threshold:
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)  # the smallest index is every group's root
    roots = np.array([find(i) for i in range(len(texts))])
    return {i: int(r) for i, r in enumerate(roots.tolist()) if r != i}
