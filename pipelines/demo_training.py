"""The demo's training stages: tokenizer → token shards → pretraining → export → a sample."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PRETRAIN_CONFIG = REPO / "training" / "configs" / "pretrain_tiny.yaml"
log = logging.getLogger("refinery.demo")


def run_training_stages(output: Path, data: Path, progress: bool = True, train_steps: int = 300) -> dict:
    from curation.executor import LocalExecutor
    from curation.tokenize import tokenize_corpus
    from curation.tokenizer import train_tokenizer

    corpus = output / "corpus" / "documents"
    books = data / "text" / "gutenberg_nltk"
    heldout = data / "text" / "wikipedia_en"
    summary: dict = {}

    tok_path = output / "tokenizer.json"
    if not tok_path.exists():
        log.info("stage 2/5: train a byte-level BPE tokenizer on the curated corpus and books")
        train_tokenizer([str(corpus), str(books)], vocab_size=4096, output=tok_path)

    log.info("stage 3/5: tokenize the corpus, the books and held-out Wikipedia")
    ex = LocalExecutor(progress=progress)
    web_m = tokenize_corpus(corpus, tok_path, output / "tokens" / "web", executor=ex)
    books_m = tokenize_corpus(books, tok_path, output / "tokens" / "books", executor=ex, suffixes=(".txt",))
    eval_m = tokenize_corpus(heldout, tok_path, output / "tokens" / "heldout", executor=ex,
                             suffixes=(".txt",))
    summary["tokens"] = {"web": web_m["total_tokens"], "books": books_m["total_tokens"],
                         "heldout": eval_m["total_tokens"]}

    # The curated web corpus is the point of the demo, but it is small: cap its repetition and let
    # the books fill the rest.
    mix = {"name": "demo", "seed": 0, "pools": [
        {"name": "web", "manifest": "tokens/web", "weight": 0.5, "max_repetition": 4},
        {"name": "books", "manifest": "tokens/books", "weight": 0.5, "max_repetition": 4},
    ]}
    (output / "mix.yaml").write_text(yaml.safe_dump(mix, sort_keys=False))

    log.info("stage 4/5: pretrain the 1m model for %d steps (resumes if interrupted)", train_steps)
    from training.loop import train_from_cli

    run_dir = output / "pretrain"
    result = train_from_cli("pretrain", str(PRETRAIN_CONFIG), [
        f"data.mix={output / 'mix.yaml'}", f"data.eval={output / 'tokens' / 'heldout'}",
        f"train.out_dir={run_dir}", f"train.steps={train_steps}", "train.batch_size=16",
        "train.eval_every=100", "train.checkpoint_every=100", "optim.warmup=30",
    ])
    summary["pretrain"] = {k: result.get(k) for k in ("step", "loss", "eval_loss", "eval_bpb", "params")}

    log.info("stage 5/5: sample from the exported Hugging Face model")
    from training.generate import generate_text

    hf_dir = result.get("hf_dir") or str(run_dir / "hf")
    sample = generate_text(hf_dir, "The history of the", tokenizer_path=str(tok_path), max_new_tokens=40,
                           temperature=0.8, top_p=0.95, seed=0)
    summary["sample"] = sample
    summary["hf_dir"] = hf_dir
    (output / "training_summary.json").write_text(json.dumps(summary, indent=1))
    return summary
