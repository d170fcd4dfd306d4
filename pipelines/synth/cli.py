"""`refinery synth spec`: the CLI side of synthetic-document generation."""

from __future__ import annotations

import argparse
import os
import sys

from pipelines.synth.prompts import DOC_TYPES


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The `synth` subcommand (called from pipelines/cli.py's build_parser)."""
    synth = sub.add_parser("synth", help="synthetic training documents written by an instruct model")
    synthsub = synth.add_subparsers(dest="synth_command", required=True)
    p = synthsub.add_parser("spec", help="a Model Spec (markdown) → documents that explain it, as a corpus")
    p.add_argument("spec", help="the spec, markdown with a heading per section (e.g. "
                                "pipelines/specs/assistant_spec.md)")
    p.add_argument("--generator", required=True,
                   help="instruct model: a local Hugging Face Llama dir, or an OpenAI-compatible base URL "
                        "such as http://localhost:8000/v1 (vLLM, llama.cpp, TGI)")
    p.add_argument("--documents", "-n", type=int, required=True, help="prompts to send (documents before drops)")
    p.add_argument("--output", "-o", required=True, help="output directory (resumes if it holds this run)")
    p.add_argument("--model", default=None, help="model name at the endpoint (default: the first it serves)")
    p.add_argument("--api-key-env", default=None, metavar="VAR",
                   help="environment variable that holds the endpoint's API key")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per batch (one completion marker each)")
    p.add_argument("--concurrency", type=int, default=8, help="HTTP requests in flight")
    p.add_argument("--max-new-tokens", type=int, default=768)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--doc-types", nargs="+", choices=list(DOC_TYPES), default=None,
                   help="document types to write (default: all)")
    p.add_argument("--min-words", type=int, default=20, help="drop generations shorter than this")
    p.add_argument("--dedup-threshold", type=float, default=0.8, help="MinHash: true Jaccard of a near-duplicate")
    p.add_argument("--holdout", type=float, default=0.0,
                   help="share of prompts whose documents go to OUTPUT/heldout (an evaluation corpus)")
    p.add_argument("--holdout-types", nargs="+", choices=list(DOC_TYPES), default=None,
                   help="document types the held-out split draws from (default: all)")
    p.add_argument("--device", default="auto", help="local generator: cpu, cuda, ... (default: cuda if present)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over: replace what an earlier run wrote in --output")


def run(args: argparse.Namespace, progress: bool) -> int:
    from pipelines.synth.run import SynthSettings, synthesize_spec
    from training.llm_client import make_client

    settings = SynthSettings(
        documents=args.documents, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, seed=args.seed, doc_types=tuple(args.doc_types or ()),
        min_words=args.min_words, dedup_threshold=args.dedup_threshold, holdout=args.holdout,
        holdout_types=tuple(args.holdout_types or ()))
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise ValueError(f"--api-key-env {args.api_key_env}: that environment variable is not set")
    client = make_client(args.generator, model=args.model, api_key=api_key, concurrency=args.concurrency,
                         device=args.device, max_batch=args.batch_size)
    stats = synthesize_spec(args.spec, client, args.output, settings, progress=progress, overwrite=args.overwrite)
    dropped = ", ".join(f"{k} {v}" for k, v in stats["dropped"].items()) or "none"
    held = f", {stats['heldout_written']:,} held out" if settings.holdout else ""
    print(f"{stats['documents_requested']:,} prompts → {stats['documents_written']:,} documents{held} in "
          f"{args.output} (dropped: {dropped})")
    if not stats["documents_written"]:
        print("refinery: error: the run kept no documents; see dropped.jsonl.gz", file=sys.stderr)
        return 1
    return 0
