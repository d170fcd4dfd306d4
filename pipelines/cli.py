"""The `refinery` command line. Subcommands import their stage lazily, so `--help` is instant."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).parent / "configs"


def _add_executor(p: argparse.ArgumentParser) -> None:
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: in-process; ray: ray.init() locally, or join --ray-address")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (e.g. auto, ray://host:10001)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refinery", description=__doc__)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, and log warnings only")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages too")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of one line")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("curate", help="WARC/ARC/WET files → a clean, deduplicated corpus")
    p.add_argument("config", help="pipeline YAML, e.g. pipelines/configs/web.yaml")
    p.add_argument("--input", "-i", nargs="+", required=True,
                   help="paths, globs, warc.paths.gz listings, https:// or s3:// URLs")
    p.add_argument("--output", "-o", required=True, help="output directory (resumes if it holds this run)")
    p.add_argument("--format", choices=["parquet", "dolma"], default=None, help="override output.format")
    p.add_argument("--overwrite", action="store_true",
                   help="replace what an earlier run wrote in --output (documents/, stats.json, report, "
                        "_work/) instead of refusing another config or inputs; other files stay")
    p.add_argument("--keep-rejected", action="store_true",
                   help="also write every dropped document, with its step, reason and scores, to "
                        "OUTPUT/rejected/ (a run is resumed with the same choice)")
    _add_executor(p)

    p = sub.add_parser("refilter", help="new thresholds on a curated corpus's stored scores → a new corpus")
    p.add_argument("corpus", help="a finished `refinery curate` (or refilter) output directory; never modified")
    p.add_argument("config", help="the corpus's config with new thresholds (steps, order and models unchanged)")
    p.add_argument("--output", "-o", required=True, help="the new corpus directory (new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace --output when it already holds a corpus")
    p.add_argument("--keep-rejected", action="store_true",
                   help="also write what the new thresholds drop to OUTPUT/rejected/ (to refilter it again)")
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

    chat = sub.add_parser("chat", help="chat / instruction / preference data")
    chatsub = chat.add_subparsers(dest="chat_command", required=True)
    p = chatsub.add_parser("tokenize", help="chat or preference files → masked token shards + manifest.json")
    p.add_argument("--input", "-i", nargs="+", required=True, help="JSON / JSON-lines files or directories")
    p.add_argument("--format", default="auto",
                   choices=["auto", "messages", "alpaca", "gpteacher", "self-instruct", "completion", "hh"])
    p.add_argument("--tokenizer", required=True, help="tokenizer.json with the chat role tokens")
    p.add_argument("--output", "-o", required=True, help="shard directory (resumes if it holds this run)")
    p.add_argument("--max-len", type=int, default=1024, help="drop conversations longer than this many tokens")
    p.add_argument("--kind", choices=["chat", "preference"], default=None,
                   help="default: preference if every input holds chosen/rejected pairs, else chat")
    p.add_argument("--holdout", type=float, default=0.0, help="fraction written to OUTPUT/heldout")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split")

    from training.objectives import STAGE_OBJECTIVES  # a table of names: imports no torch

    p = sub.add_parser("train", help="run a training stage from a YAML config")
    p.add_argument("stage", choices=list(STAGE_OBJECTIVES), help="the objective (training/objectives/)")
    p.add_argument("config", help="training YAML, e.g. training/configs/pretrain_tiny.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides: optim.lr=3e-4 train.steps=100")

    p = sub.add_parser("export", help="checkpoint → Hugging Face Llama (safetensors + config.json)")
    p.add_argument("checkpoint", help="checkpoint directory (or a training run directory)")
    p.add_argument("--output", "-o", required=True)
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory whole")

    p = sub.add_parser("merge", help="base model + LoRA adapter → merged Hugging Face Llama export")
    p.add_argument("base", help="the adapter's base: a checkpoint (run/step dir) or a Hugging Face Llama dir")
    p.add_argument("adapter", help="PEFT adapter dir (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--output", "-o", required=True)
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the one beside base or adapter)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory whole")

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

    from pipelines.run import STAGE_NAMES

    p = sub.add_parser("run", help="every stage, WARCs to an exported post-trained model and a report")
    p.add_argument("config", nargs="?", default=None, help="run YAML (default: pipelines/configs/quickstart.yaml)")
    p.add_argument("--input", "-i", nargs="+", default=None,
                   help="WARC paths, globs, listings, https:// URLs or a crawl name (CC-MAIN-2024-22)")
    p.add_argument("--output", "-o", default=None, help="output directory (default: the config's `output`)")
    p.add_argument("--data", default=None, help="the sample data folder (default: ../shared/data)")
    p.add_argument("--from", dest="start", choices=STAGE_NAMES, default=None,
                   help="rerun this stage and the ones after it (the ones before must be done)")
    p.add_argument("--until", choices=STAGE_NAMES, default=None, help="stop after this stage")

    p = sub.add_parser("ablate", help="the data-quality proof: raw vs curated vs curated+mixed, equal models")
    p.add_argument("config", nargs="?", default=None, help="run YAML (default: pipelines/configs/quickstart.yaml)")
    p.add_argument("--input", "-i", nargs="+", default=None, help="as for `refinery run`")
    p.add_argument("--output", "-o", default=None, help="output directory (default: the config's `output`)")
    p.add_argument("--data", default=None, help="the sample data folder (default: ../shared/data)")

    p = sub.add_parser("demo", help="`refinery run` of the quickstart on the sample data (an alias)")
    p.add_argument("--output", "-o", default="demo_out")
    p.add_argument("--data", default=None, help="the shared data folder (default: ../shared/data)")

    from pipelines.mix import add_parsers as add_mix_parsers  # `classify ...` and `mix ...`

    add_mix_parsers(sub, _add_executor)
    from pipelines.synth.cli import add_parsers as add_synth_parsers  # `synth spec`

    add_synth_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    # Default INFO: one line per finished shard; -q keeps warnings (read errors), -v adds debug.
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    progress = not args.quiet
    try:
        return _dispatch(args, progress)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("refinery: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:
        failure = user_error(e)
        if failure is None or args.debug:
            raise
        message, code = failure
        print(f"refinery: error: {message}", file=sys.stderr)
        return code


def user_error(e: BaseException) -> tuple[str, int] | None:
    """One line and an exit status for an error the user can fix (2: the command or its inputs,
    1: the machine, e.g. a full disk), or None for a bug, which keeps its traceback."""
    # A Ray task re-raises the task's exception wrapped, with the remote traceback in its text.
    ray_exceptions = sys.modules.get("ray.exceptions")
    if ray_exceptions is not None and isinstance(e, ray_exceptions.RayTaskError) and e.cause is not None:
        e = e.cause
    from curation.executor import RayUnavailableError
    from curation.registry import ConfigError

    user_classes: list[type[BaseException]] = [ConfigError, RayUnavailableError, ValueError]
    # Training's errors count only if training ran (imported): importing it here costs seconds.
    if "training.checkpoint" in sys.modules:
        user_classes.append(sys.modules["training.checkpoint"].CheckpointError)
    if "yaml" in sys.modules:
        user_classes.append(sys.modules["yaml"].YAMLError)
    if isinstance(e, tuple(user_classes)):
        return _one_line(str(e)), 2
    if not isinstance(e, OSError):
        return None
    path = e.filename
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"disk full{f' at {path}' if path else ''}; free some space or choose another --output", 1
    usage = isinstance(e, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError
                       | FileExistsError)
    if path is None:  # raised with a message of its own
        return _one_line(str(e)) + ("" if usage else " (rerun with --debug for the traceback)"), 2 if usage else 1
    if isinstance(e, FileNotFoundError):
        return f"no such file or directory: {path}", 2
    if isinstance(e, PermissionError):
        return f"permission denied: {path}; check its permissions or choose another path", 2
    if isinstance(e, IsADirectoryError):
        return f"{path} is a directory; give a file", 2
    if isinstance(e, NotADirectoryError):
        return f"{path}: part of this path is a file, not a directory; choose another path", 2
    if isinstance(e, FileExistsError):
        return f"{path} already exists; choose another path or remove it", 2
    return f"{e.strerror or type(e).__name__}: {path} (rerun with --debug for the traceback)", 1


def _one_line(message: str) -> str:
    return " ".join(message.split()) or "unknown error (rerun with --debug for the traceback)"


# A run that loses more than this share of what it read to errors (not to filters) failed.
MAX_ERROR_LOSS = 0.5


def curate_verdict(stats: dict[str, Any], report: Path) -> tuple[list[str], int]:
    """The stderr lines and exit status a finished curate run deserves: read errors are a warning;
    inputs that could not be opened, a run that kept nothing, or one that lost most documents to
    errors exit 1, so a script or scheduler sees the failure without reading the report."""
    lines: list[str] = []
    code = 0
    steps = stats["steps"]
    reader = steps[0] if steps and steps[0]["name"] == "read" else None
    read_errors = {k: v for k, v in (reader or {}).get("errors", {}).items() if k != "read.unavailable"}
    if read_errors:
        from curation.step import StepStats

        # Files are named in the error samples, which are capped: past the cap, count at least.
        samples = reader["samples"] if reader else []
        files = len({s["file"] for s in samples if s.get("kind") in read_errors and "file" in s})
        files = files or min(sum(read_errors.values()), stats["input_files"])
        some = "at least " if len(samples) >= StepStats.MAX_SAMPLES else ""
        lines.append(f"refinery: warning: {some}{files} of {stats['input_files']} input files had read "
                     f"errors ({_counts(read_errors)}); see {report}")
    if stats["inputs_unavailable"]:
        lines.append(f"refinery: warning: {len(stats['inputs_unavailable'])} inputs could not be opened; "
                     "rerun the same command to retry them")
        code = 1
    read, kept = stats["documents_read"], stats["documents_written"]
    # Drops by errors (extract.error, extract.timeout, <step>.error), not by a filter's decision.
    lost: Counter[str] = Counter()
    for step in steps[1:]:
        lost.update({r: n for r, n in step["dropped"].items() if r.endswith((".error", ".timeout"))})
    if read and sum(lost.values()) > MAX_ERROR_LOSS * read:
        share = 100 * sum(lost.values()) / read
        lines.append(f"refinery: error: {sum(lost.values()):,} of {read:,} documents ({share:.0f}%) were lost "
                     f"to errors ({_counts(lost)}); see the error samples in {report}")
        code = 1
    elif not kept:
        if not read:
            n = stats["input_files"]
            why = f"no documents were read from {n} input file{'s' if n != 1 else ''}"
        else:
            drops: Counter[str] = Counter()
            for step in steps[1:]:
                drops.update(step["dropped"])
            why = f"all {read:,} documents read were dropped ({_counts(drops)})"
        lines.append(f"refinery: error: the run kept no documents: {why}; see {report}")
        code = 1
    return lines, code


def _counts(counter: dict[str, int], top: int = 3) -> str:
    ranked = Counter(counter).most_common()
    shown = ", ".join(f"{k} {v:,}" for k, v in ranked[:top])
    return shown + (f", {len(ranked) - top} more" if len(ranked) > top else "")


def _dispatch(args: argparse.Namespace, progress: bool) -> int:
    if args.command in ("classify", "mix"):
        from pipelines.mix import run as run_mix

        return run_mix(args, progress)
    if args.command == "synth":
        from pipelines.synth.cli import run as run_synth

        return run_synth(args, progress)
    if args.command == "curate":
        from curation.config import CurationConfig, check_extract_for_inputs
        from curation.pipeline import curate

        check_extract_for_inputs(CurationConfig.load(args.config), args.input)
        stats = curate(args.config, args.input, args.output, executor=args.executor,
                       ray_address=args.ray_address, output_format=args.format, progress=progress,
                       overwrite=args.overwrite, keep_rejected=args.keep_rejected)
        print(f"{stats['documents_read']:,} documents read, {stats['documents_written']:,} written to "
              f"{args.output} in {stats['wall_seconds']} s; report: {Path(args.output) / 'report.md'}")
        if "rejected_files" in stats:
            print(f"{sum(f['documents'] for f in stats['rejected_files']):,} dropped documents kept in "
                  f"{Path(args.output) / 'rejected'}")
        lines, code = curate_verdict(stats, Path(args.output) / "report.md")
        for line in lines:
            print(line, file=sys.stderr)
        return code
    if args.command == "refilter":
        from curation.refilter import refilter

        stats = refilter(args.corpus, args.config, args.output, executor=args.executor,
                         ray_address=args.ray_address, progress=progress, overwrite=args.overwrite,
                         keep_rejected=args.keep_rejected)
        f = stats["refilter"]
        print(f"{stats['documents_read']:,} documents decided again, {stats['documents_written']:,} kept "
              f"({f['newly_kept']:,} newly kept, {f['newly_dropped']:,} newly dropped), written to {args.output} "
              f"in {stats['wall_seconds']} s; report: {Path(args.output) / 'report.md'}")
        if not stats["documents_written"]:
            print(f"refinery: error: the new thresholds keep no documents; see {Path(args.output) / 'report.md'}",
                  file=sys.stderr)
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
    if args.command == "chat":
        from training.chat import tokenize_chat

        summary = tokenize_chat(args.input, args.tokenizer, args.output, fmt=args.format, kind=args.kind,
                                max_len=args.max_len, holdout=args.holdout, seed=args.seed, progress=progress)
        print(f"{summary['summary']} → {args.output}")
        return 0
    if args.command == "train":
        from training.engine import train_from_cli

        summary = train_from_cli(args.stage, args.config, args.overrides)
        print({k: v for k, v in summary.items() if not isinstance(v, list | dict)})
        return 0
    if args.command == "export":
        from training.export import export_checkpoint

        out = export_checkpoint(args.checkpoint, args.output, tokenizer_path=args.tokenizer, force=args.force)
        print(f"exported to {out}")
        return 0
    if args.command == "merge":
        from training.adapters import merge_to_hf

        out = merge_to_hf(args.base, args.adapter, args.output, tokenizer_path=args.tokenizer, force=args.force)
        print(f"merged {args.adapter} into {args.base} → {out}")
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
    if args.command in ("run", "demo"):
        from pipelines.run import run_pipeline

        if args.command == "demo":
            run_pipeline(None, output=args.output, data=args.data, progress=progress)
        else:
            run_pipeline(args.config, output=args.output, inputs=args.input, data=args.data, start=args.start,
                         until=args.until, progress=progress)
        return 0
    if args.command == "ablate":
        from pipelines.ablate import markdown_of, run_ablate

        print(markdown_of(run_ablate(args.config, output=args.output, inputs=args.input, data=args.data,
                                     progress=progress)))
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
