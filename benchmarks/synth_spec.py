"""Model Spec mid-training at tiny scale: does a synthetic spec pool move held-out spec loss, and at what
cost on web text, against mid-training on web data alone at equal tokens?

Runs the recipe of docs/training.md ("Model Spec mid-training") end to end through the `refinery` CLI,
on ../shared/data only (nothing downloads), in --work (default /tmp/synth_spec_bench); a rerun resumes
every stage. Figures: docs/training.md, "Measured at tiny scale".

1. a 4k BPE tokenizer (with the chat role tokens) and token shards of web text: pretraining (C4
   sample, Dolma CC heads), a mid-training web pool (C4 train first 1,000) and a held-out web set
   (Paloma C4 The Guardian); the 1m model pretrained on the first;
2. the spec pool, twice: from our own generator (the base + SFT on GPTeacher role-play, Self-Instruct
   and Alpaca seed tasks; no real instruct model is available offline) and from `StandIn`, a local
   server that rearranges the spec sentences each prompt quotes. Each: `refinery synth spec
   pipelines/specs/assistant_spec.md` with Q&A documents of 20% of the Q&A prompts held out
   (`--holdout 0.2 --holdout-types qa`: the "spec questions"), tokenized, and a mid-training run on
   spec-synthetic 0.3 + web 0.7;
3. one mid-training run on web alone from the same base, the same steps and tokens;
4. held-out loss (nats/token) of the base and the mid-trained models on the held-out spec questions,
   on the spec's own text and on held-out web text.

    .venv/bin/python benchmarks/synth_spec.py [--work DIR] [--documents 320] [--threads 2]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SPEC = REPO / "pipelines" / "specs" / "assistant_spec.md"


def cli(*args: str) -> None:
    from pipelines.cli import main

    print("$ refinery " + " ".join(args), flush=True)
    t0 = time.perf_counter()
    code = main(["-q", *args])
    if code != 0:
        raise SystemExit(f"refinery {args[0]} failed with exit status {code}")
    print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)


def link_corpus(folder: Path, files: list[Path]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        target = folder / f.name
        if not target.exists():
            target.symlink_to(f)
    return folder


def losses(model_dir: Path, manifests: dict[str, Path], seq_len: int = 256) -> dict[str, float]:
    """Mean next-token loss of a checkpoint on every window of each manifest (all of it, no sampling)."""
    import torch

    from training.checkpoint import load_transformer
    from training.data import TokenShards
    from training.objectives.lm import evaluate

    model = load_transformer(model_dir)
    out = {}
    for name, manifest in manifests.items():
        shards = TokenShards(manifest)
        n = (shards.total_tokens - 1) // seq_len
        windows = [torch.from_numpy(shards.read(i * seq_len, seq_len + 1)) for i in range(n)]
        batches = [(torch.stack([w[:-1] for w in windows[i:i + 16]]), torch.stack([w[1:] for w in windows[i:i + 16]]))
                   for i in range(0, n, 16)]
        out[name] = round(evaluate(model, batches, torch.device("cpu"), "fp32"), 4)
        out[f"{name}_tokens"] = n * seq_len
    return out


def midtrain(w: Path, mix: Path, out: Path, args: argparse.Namespace, eval_manifest: Path | None = None) -> None:
    cli("train", "midtrain", str(REPO / "training/configs/midtrain_spec_tiny.yaml"), f"data.mix={mix}",
        f"data.eval={eval_manifest or w / 'tok_web_heldout'}", f"train.init_from={w / 'pretrain'}",
        f"train.steps={args.midtrain_steps}", "train.batch_size=8", "train.eval_batches=4", "train.eval_every=40",
        "train.checkpoint_every=40", f"train.out_dir={out}", "train.progress=false", "train.log_every=20")


def spec_pool(w: Path, tok: Path, sub: Path, generator: str, args: argparse.Namespace) -> Path:
    """synth → token shards (pool and held-out spec questions) → the spec-mix mid-training run."""
    cli("synth", "spec", str(SPEC), "--generator", generator, "--documents", str(args.documents),
        "--output", str(sub / "synth"), "--holdout", "0.2", "--holdout-types", "qa", "--max-new-tokens", "128",
        "--batch-size", "32", "--min-words", "20")
    cli("tokenize", "--corpus", str(sub / "synth"), "--tokenizer", str(tok), "--output", str(sub / "tok_synth"))
    cli("tokenize", "--corpus", str(sub / "synth" / "heldout"), "--tokenizer", str(tok), "--output",
        str(sub / "tok_heldout"))
    (sub / "midtrain_mix.yaml").write_text(
        "pools:\n  - {name: spec-synthetic, manifest: tok_synth, weight: 0.3, max_repetition: 4}\n"
        f"  - {{name: web, manifest: {w / 'tok_web'}, weight: 0.7}}\n")
    midtrain(w, sub / "midtrain_mix.yaml", sub / "midtrain_spec", args, sub / "tok_heldout")
    return sub / "midtrain_spec"


def read_first_doc(synth: Path) -> dict[str, str]:
    stats = json.loads((synth / "stats.json").read_text())
    with gzip.open(synth / stats["files"][0]["path"], "rt") as f:
        doc = json.loads(f.readline())
    return {"doc_type": doc["metadata"]["doc_type"], "text": doc["text"][:400]}


_SECTION = re.compile(r'Section "[^"]+" of the spec says:\n\n(.*?)\n\n(?=Section "|On priorities|Write )', re.S)
_CONNECTIVES = ("This matters because users rely on the assistant.", "In practice the assistant applies it every day.",
                "The spec states it plainly.", "A good reply shows this without saying so.",
                "Consider how this plays out in a real conversation.", "That is the heart of the rule.")


class StandIn:
    """An extractive stand-in for an instruct model (no real one is available offline): an OpenAI-compatible
    server on 127.0.0.1 that answers each prompt with the spec sentences the prompt quotes, rearranged in a
    template of the requested document type. Its documents restate the spec verbatim."""

    def __enter__(self) -> str:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        def compose(body: dict[str, Any]) -> str:
            prompt = body["messages"][-1]["content"]
            rng = random.Random(f"{body['seed']}:{prompt}")
            sentences = [" ".join(line.split()) for block in _SECTION.findall(prompt)
                         for line in re.split(r"\n(?=[-*]|\d+\.)", block)]
            sentences = [re.sub(r"^([-*]|\d+\.)\s*", "", x) for x in sentences if x.strip()]
            instruction = prompt.rsplit("\n\n", 1)[-1]
            quoted = re.findall(r'"([^"]+)"', instruction)  # the title, section names and principles
            principle = max(quoted, key=len) if quoted else rng.choice(sentences)
            picked = rng.sample(sentences, min(len(sentences), 3))
            if "question-and-answer" in instruction:
                qs = ["What does the spec ask here?", "Why does it ask this?", "How does it show in practice?",
                      "What should the assistant avoid?"]
                return "\n".join(f"Q: {q}\nA: {a}" for q, a in zip(qs, [principle, *picked], strict=False))
            opener = {"scenario": "A user brings the assistant a request where one rule decides the reply.",
                      "essay": "Why should an assistant hold to this principle?",
                      "discussion": "Two of the spec's principles can seem to pull apart."}
            kind = next((v for k, v in opener.items() if k in instruction), "This part of the spec is about one idea.")
            parts = [kind, f"The principle reads: {principle}", *picked, rng.choice(_CONNECTIVES)]
            return " ".join(parts)

        class Handler(BaseHTTPRequestHandler):
            def _send(self, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                self._send({"data": [{"id": "extractive-stand-in"}]})

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                self._send({"choices": [{"message": {"role": "assistant", "content": compose(body)},
                                         "finish_reason": "stop"}]})

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/synth_spec_bench"))
    parser.add_argument("--documents", type=int, default=320)
    parser.add_argument("--pretrain-steps", type=int, default=100)
    parser.add_argument("--sft-steps", type=int, default=40)
    parser.add_argument("--midtrain-steps", type=int, default=80)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="JSON results (default: WORK/results.json)")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(args.threads)
    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    web = DATA / "web_text"
    pre = link_corpus(w / "web_pre", [web / "c4_en_sample" / "c4-sample.00000-of-00001.json.gz",
                                      web / "dolma_cc_fixtures" / "cc_en_head-0091.jsonl",
                                      web / "dolma_cc_fixtures" / "cc_en_head-0174.jsonl"])
    mid = link_corpus(w / "web_mid", [web / "c4_en_sample" / "c4_en_train_first1000.jsonl"])
    held = link_corpus(w / "web_heldout", [web / "c4_en_sample" / "paloma_c4_100_domains_theguardian_val.jsonl.gz"])
    tok = w / "tokenizer.json"
    if not tok.is_file():
        cli("tokenizer", "train", "--input", str(pre), "--vocab-size", "4096", "--output", str(tok))
    for name, corpus in (("tok_pre", pre), ("tok_web", mid), ("tok_web_heldout", held)):
        cli("tokenize", "--corpus", str(corpus), "--tokenizer", str(tok), "--output", str(w / name))

    common = ["train.progress=false", "train.log_every=25"]
    cli("train", "pretrain", str(REPO / "training/configs/pretrain_tiny.yaml"), f"data.mix={w / 'tok_pre'}",
        f"data.eval={w / 'tok_web_heldout'}", "data.seq_len=512", "train.batch_size=4",
        f"train.steps={args.pretrain_steps}", "optim.warmup=10", "train.eval_every=50", "train.eval_batches=2",
        "train.checkpoint_every=50", f"train.out_dir={w / 'pretrain'}", *common)
    sft = DATA / "sft"
    cli("chat", "tokenize", "--input", str(sft / "gpteacher_roleplay_instruct.json"),
        str(sft / "self_instruct_user_oriented_instructions.jsonl"), str(sft / "alpaca_seed_tasks.jsonl"),
        "--tokenizer", str(tok), "--output", str(w / "chat"), "--holdout", "0.05")
    cli("train", "sft", str(REPO / "training/configs/sft_tiny.yaml"), f"data.mix={w / 'chat'}",
        f"data.eval={w / 'chat' / 'heldout'}", "data.seq_len=512", "train.batch_size=4", "optim.lr=1e-3", "optim.warmup=5",
        f"train.steps={args.sft_steps}", "train.eval_every=40", "train.checkpoint_every=40", "train.eval_batches=4",
        f"train.init_from={w / 'pretrain'}", f"train.out_dir={w / 'sft'}", *common)

    from curation.tokenize import tokenize_corpus

    spec_text = w / "spec_text"
    spec_text.mkdir(exist_ok=True)
    shutil.copyfile(SPEC, spec_text / "assistant_spec.txt")  # plain text: one document
    tokenize_corpus(spec_text, tok, w / "tok_spec_text", suffixes=(".txt",))
    web_run = w / "midtrain_web"
    midtrain(w, w / "tok_web", web_run, args)

    results: dict[str, Any] = {"tokens": {n: json.loads((w / n / "manifest.json").read_text())["total_tokens"]
                                          for n in ("tok_pre", "tok_web", "tok_spec_text")}}
    with StandIn() as url:
        for variant, generator in (("generator: our SFT model", str(w / "sft" / "hf")),
                                   ("generator: extractive stand-in", url)):
            sub = w / ("synth_sft" if url != generator else "synth_standin")
            spec_run = spec_pool(w, tok, sub, generator, args)
            evals = {"spec_questions": sub / "tok_heldout", "spec_text": w / "tok_spec_text",
                     "web_heldout": w / "tok_web_heldout"}
            models = {"base (pretrained)": w / "pretrain", "mid-trained: spec 0.3 + web 0.7": spec_run,
                      "mid-trained: web only": web_run}
            if url != generator:
                models["generator (base + SFT)"] = w / "sft"
            stats = json.loads((sub / "synth" / "stats.json").read_text())
            results[variant] = {
                "synth": {k: stats[k] for k in ("documents_requested", "documents_written", "heldout_written",
                                                 "dropped", "truncated_kept", "kept_by_doc_type")},
                "tokens": {n: json.loads((sub / n / "manifest.json").read_text())["total_tokens"]
                           for n in ("tok_synth", "tok_heldout")},
                "midtrain_tokens": {name: json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["tokens"]
                                    for name, run in (("spec", spec_run), ("web", web_run))},
                "sample": read_first_doc(sub / "synth"),
                "losses": {name: losses(path, evals) for name, path in models.items()},
            }
    print(json.dumps(results, indent=1))
    print("\n| pool from | model | held-out spec questions | spec text | held-out web |\n|---|---|---:|---:|---:|")
    for variant, block in results.items():
        for name, row in block.get("losses", {}).items() if isinstance(block, dict) else ():
            print(f"| {variant} | {name} | {row['spec_questions']:.3f} | {row['spec_text']:.3f} | "
                  f"{row['web_heldout']:.3f} |")
    (args.out or w / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
