"""The `refinery` command line. Subcommands import their stage lazily, so `--help` is instant."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"


def _add_executor(p: argparse.ArgumentParser) -> None:
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: in-process; ray: ray.init() locally, or join --ray-address")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (e.g. auto, ray://host:10001)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refinery", description=__doc__)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("curate", help="WARC/ARC/WET files → a clean, deduplicated corpus")
    p.add_argument("config", help="pipeline YAML, e.g. pipelines/configs/web.yaml")
    p.add_argument("--input", "-i", nargs="+", required=True,
                   help="paths, globs, warc.paths.gz listings, https:// or s3:// URLs")
    p.add_argument("--output", "-o", required=True, help="output directory (resumes if it holds this run)")
    p.add_argument("--format", choices=["parquet", "dolma"], default=None, help="override output.format")
    _add_executor(p)

    tok = sub.add_parser("tokenizer", help="tokenizer utilities")
    toksub = tok.add_subparsers(dest="tokenizer_command", required=True)
    p = toksub.add_parser("train", help="train a byte-level BPE tokenizer")
    p.add_argument("--input", "-i", nargs="+", required=True, help="corpus dirs, .txt or .jsonl(.gz) files")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--output", "-o", required=True, help="path of the tokenizer.json to write")

    p = sub.add_parser("tokenize", help="corpus → token shards (.npy) + manifest.json")
    p.add_argument("--corpus", required=True, help="curated corpus directory")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json")
    p.add_argument("--output", "-o", required=True)
    _add_executor(p)

    p = sub.add_parser("train", help="run a training stage from a YAML config")
    p.add_argument("stage", choices=["pretrain", "midtrain"])
    p.add_argument("config", help="training YAML, e.g. training/configs/pretrain_tiny.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides: optim.lr=3e-4 train.steps=100")

    p = sub.add_parser("export", help="checkpoint → Hugging Face Llama (safetensors + config.json)")
    p.add_argument("checkpoint", help="checkpoint directory (or a training run directory)")
    p.add_argument("--output", "-o", required=True)
    p.add_argument("--tokenizer", default=None)

    p = sub.add_parser("import", help="Hugging Face Llama checkpoint → refinery checkpoint")
    p.add_argument("hf_dir")
    p.add_argument("--output", "-o", required=True)

    p = sub.add_parser("generate", help="sample from a checkpoint or exported model")
    p.add_argument("model", help="checkpoint or HF directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("demo", help="the main job on sample data: curate on local Ray, then train")
    p.add_argument("--output", "-o", default="demo_out")
    p.add_argument("--data", default=None, help="the shared data folder (default: ../shared/data)")
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    progress = not args.quiet
    from curation.registry import ConfigError

    try:
        if args.command in ("train", "export", "import", "generate"):
            from training.checkpoint import CheckpointError

            try:
                return _dispatch(args, progress)
            except CheckpointError as e:  # a missing or unreadable checkpoint is the user's input
                raise ValueError(str(e)) from e
        return _dispatch(args, progress)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"refinery: error: {e}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace, progress: bool) -> int:
    if args.command == "curate":
        from curation.pipeline import curate

        stats = curate(args.config, args.input, args.output, executor=args.executor,
                       ray_address=args.ray_address, output_format=args.format, progress=progress)
        print(f"{stats['documents_read']:,} documents read, {stats['documents_written']:,} written to "
              f"{args.output} in {stats['wall_seconds']} s; report: {Path(args.output) / 'report.md'}")
        if stats["inputs_unavailable"]:
            print(f"refinery: warning: {len(stats['inputs_unavailable'])} inputs could not be opened; "
                  "rerun the same command to retry them", file=sys.stderr)
            return 1
        return 0
    if args.command == "tokenizer":
        from curation.tokenizer import train_tokenizer

        path = train_tokenizer(args.input, args.vocab_size, args.output)
        print(f"tokenizer written to {path}")
        return 0
    if args.command == "tokenize":
        from curation.executor import make_executor
        from curation.tokenize import tokenize_corpus

        ex = make_executor(args.executor, ray_address=args.ray_address, progress=progress)
        try:
            manifest = tokenize_corpus(args.corpus, args.tokenizer, args.output, executor=ex)
        finally:
            ex.shutdown()
        print(f"{manifest['total_tokens']:,} tokens in {manifest['shards']} shards → {args.output}")
        if manifest.get("failed"):
            print(f"refinery: error: {len(manifest['failed'])} input files failed: {manifest['failed']}",
                  file=sys.stderr)
            return 1
        return 0
    if args.command == "train":
        from training.loop import train_from_cli

        summary = train_from_cli(args.stage, args.config, args.overrides)
        print({k: v for k, v in summary.items() if not isinstance(v, list | dict)})
        return 0
    if args.command == "export":
        from training.export import export_checkpoint

        out = export_checkpoint(args.checkpoint, args.output, tokenizer_path=args.tokenizer)
        print(f"exported to {out}")
        return 0
    if args.command == "import":
        from training.export import import_to_checkpoint

        out = import_to_checkpoint(args.hf_dir, args.output)
        print(f"imported to {out}")
        return 0
    if args.command == "generate":
        from training.generate import generate_text

        print(generate_text(args.model, args.prompt, tokenizer_path=args.tokenizer,
                            max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, greedy=args.greedy, seed=args.seed))
        return 0
    if args.command == "demo":
        from pipelines.demo import run_demo

        run_demo(Path(args.output), Path(args.data) if args.data else None, progress=progress)
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
