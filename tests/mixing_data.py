"""Small real inputs for the mixing tests: a classified web corpus, a reference text and a tokenizer.

The web corpus is C4 documents from ../shared/data with `quality.score` / `topic.label` attributes
as the `classify` step writes them (values from a hash, so tests need no classifier), in the
curation output's Dolma layout. Not a test module: the test files build it in a fixture.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path
from typing import Any


def _unit(text: str, salt: str) -> float:
    return int.from_bytes(hashlib.blake2b(f"{salt}{text}".encode(), digest_size=8).digest(), "little") / 2**64


def make_inputs(shared_data: Path, root: Path, docs: int = 240) -> dict[str, Path]:
    """Write the corpus, a reference text file and a 512-token tokenizer under `root`."""
    from curation.tokenizer import train_tokenizer

    rows = [json.loads(line) for line in
            (shared_data / "web_text/c4_en_sample/c4_en_train_first1000.jsonl").read_text().splitlines()[:docs]]
    corpus = root / "curated" / "documents"
    corpus.mkdir(parents=True)
    with gzip.open(corpus / "00000-c4.jsonl.gz", "wt") as f:
        for i, r in enumerate(rows):
            attrs = {"quality.score": round(_unit(r["text"], "q"), 6),
                     "topic.label": "news" if _unit(r["text"], "t") < 0.5 else "science"}
            f.write(json.dumps({"id": f"c4-{i}", "text": r["text"], "source": "c4",
                                "metadata": {"url": r["url"], "attributes": attrs}}) + "\n")
    ref = root / "reference.txt"
    ref.write_text((shared_data / "text/tinyshakespeare/input.txt").read_text()[:120_000])
    tok = train_tokenizer([corpus, ref], 512, root / "tokenizer" / "tokenizer.json", max_chars=300_000)
    return {"corpus": root / "curated", "reference": ref, "tokenizer": Path(tok)}


def mix_config(inputs: dict[str, Path], out: Path, **overrides: Any) -> dict[str, Any]:
    """A mixing config over those inputs with budgets small enough for a test."""
    cfg: dict[str, Any] = {
        "name": "test", "output": str(out), "tokenizer": str(inputs["tokenizer"]), "holdout": 0.1,
        "web": {"corpus": [str(inputs["corpus"])], "buckets": 2},
        "sources": [{"name": "reference", "paths": [str(inputs["reference"])], "format": "text",
                     "chunk_chars": 2000}],
        "targets": [{"name": "ref", "pool": "reference"}, {"name": "web", "pool": "news.q1"}],
        "sweep": {"proxies": 4, "tokens": 4096, "seq_len": 32, "batch_size": 4, "eval_batches": 2},
        "fit": {"candidates": 500, "top_k": 10, "folds": 2},
        "validate": {"model": "1m", "tokens": 4096, "seq_len": 32, "batch_size": 4, "eval_batches": 2},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg
