"""`refinery classify ...` and `refinery mix ...`: the CLI side of classification and mixture search.

Only `pipelines` knows both `curation` and `proxy_mix`: here curation's tokenizer and classifiers are
handed to `proxy_mix.pools` as plain functions, so `proxy_mix` itself reads corpora only as files.
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path
from typing import Any

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def add_parsers(sub: argparse._SubParsersAction, add_executor: Any) -> None:
    """The `classify` and `mix` subcommands (called from pipelines/cli.py's build_parser)."""
    clf = sub.add_parser("classify", help="train the fastText quality / topic classifiers")
    clfsub = clf.add_subparsers(dest="classify_command", required=True)
    p = clfsub.add_parser("train", help="train a classifier; held-out accuracy and AUC go to DIR/model.json")
    p.add_argument("--kind", choices=["quality", "topic"], required=True)
    p.add_argument("--output", "-o", required=True, help="model directory (model.bin + model.json)")
    p.add_argument("--positive", nargs="+", default=None, help="quality: clean / reference / good answer text")
    p.add_argument("--negative", nargs="+", default=None, help="quality: raw extracted web text")
    p.add_argument("--labelled", nargs="+", default=None,
                   help="topic: files whose rows carry labels (AG News / arXiv CSV, JSON lines with `label`)")
    p.add_argument("--label", nargs="+", default=None, metavar="LABEL=PATH",
                   help="topic: files all of one label, e.g. code=/usr/lib/python3.11")
    p.add_argument("--data", default=None,
                   help="shared data folder for the default sources when none are given (default ../shared/data)")
    p.add_argument("--holdout", type=float, default=0.1, help="held-out share for accuracy / AUC")
    p.add_argument("--max-per-source", type=int, default=4000)
    p.add_argument("--epoch", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)

    mix = sub.add_parser("mix", help="pools, proxy sweep, regression + search, upsampling, validation")
    mixsub = mix.add_subparsers(dest="mix_command", required=True)
    p = mixsub.add_parser("pools", help="classified corpus + sources → topic × quality pools, tokenized once")
    p.add_argument("config", help="mixing YAML (see docs/mixing.md)")
    p = mixsub.add_parser("sweep", help="train one proxy per sampled mixture (Ray tasks); results table")
    p.add_argument("config")
    _add_ray(p, add_executor)
    p = mixsub.add_parser("fit", help="regress target loss on weights, k-fold Spearman, search the simplex")
    p.add_argument("config")
    p = mixsub.add_parser("upsample", help="quality-aware upsampling per topic → a mix manifest")
    p.add_argument("config")
    p.add_argument("--mix", default=None, help="mixture giving the topic shares (default: the searched one)")
    p = mixsub.add_parser("validate", help="a larger model on searched / natural / uniform mixtures")
    p.add_argument("config")
    p.add_argument("--mix", nargs="+", default=None, metavar="NAME=PATH", help="more mixtures to compare")
    _add_ray(p, add_executor)


def _add_ray(p: argparse.ArgumentParser, add_executor: Any) -> None:
    add_executor(p)
    p.set_defaults(executor="ray")  # proxies are Ray tasks by default (local Ray unless --ray-address)
    p.add_argument("--workers", type=int, default=None,
                   help="proxies at once on a local Ray (default: as many as the CPUs allow)")


def run(args: argparse.Namespace, progress: bool) -> int:
    if args.command == "classify":
        return _classify(args)
    return _mix(args, progress)


def _classify(args: argparse.Namespace) -> int:
    from curation.classify_train import ClassifierDataError, Source, default_sources, train_classifier

    if args.kind == "quality":
        if args.labelled or args.label:
            raise ClassifierDataError("--labelled / --label are for --kind topic; quality takes --positive/--negative")
        if (args.positive is None) != (args.negative is None):
            raise ClassifierDataError("give both --positive and --negative (or neither, for the default sources)")
        sources = ([Source(Path(p), "hq") for p in args.positive] + [Source(Path(p), "lq") for p in args.negative]
                   if args.positive else None)
    else:
        if args.positive or args.negative:
            raise ClassifierDataError("--positive / --negative are for --kind quality; topic takes --labelled/--label")
        sources = [Source(Path(p)) for p in args.labelled or []]
        for item in args.label or []:
            label, sep, path = item.partition("=")
            if not sep or not label or not path:
                raise ClassifierDataError(f"--label takes LABEL=PATH, got {item!r}")
            sources.append(Source(Path(path), label))
        sources = sources or None
    if sources is None:
        data = Path(args.data) if args.data else DEFAULT_DATA
        if not data.is_dir():
            raise ClassifierDataError(f"no training data given and the shared data folder {data} is missing; "
                                      "pass --positive/--negative (quality) or --labelled (topic)")
        sources = default_sources(args.kind, data)
    meta = train_classifier(args.kind, sources, args.output, holdout=args.holdout, max_per_source=args.max_per_source,
                            epoch=args.epoch, seed=args.seed, threads=args.threads)
    h = meta["heldout"]
    print(f"{args.kind} classifier → {args.output}: held-out accuracy {h['accuracy']:.3f} (majority "
          f"{h['majority_baseline']:.3f}), AUC {h['auc']}, {h['examples']} examples; labels {meta['labels']}")
    return 0


def tokenize_fn(tokenizer: str) -> Any:
    from curation.executor import LocalExecutor
    from curation.tokenize import tokenize_corpus

    return lambda docs, out: tokenize_corpus(docs, tokenizer, out, executor=LocalExecutor(progress=False))


def score_fn(quality_model: str | None, topic_model: str | None) -> Any:
    """texts → (P(hq) scores, topic labels) with the configured classifiers (None for a missing one)."""
    if quality_model is None and topic_model is None:
        return None
    from curation.classify import Classifier

    quality = Classifier(quality_model, kind="quality") if quality_model else None
    topic = Classifier(topic_model, kind="topic") if topic_model else None

    def score(texts: list[str]) -> tuple[list[float] | None, list[str] | None]:
        q = quality.quality_scores(texts).tolist() if quality is not None else None
        t = None
        if topic is not None:
            t = [topic.labels[j] for j in topic.predict_proba(texts).argmax(axis=1)]
        return q, t

    return score


def build_pools(cfg: Any, progress: bool) -> dict[str, Any]:
    from curation.corpus import curated_files
    from proxy_mix.pools import build_pools as build
    from proxy_mix.sources import DOC_SUFFIXES

    web = cfg.web
    score = score_fn(web.quality_model, web.topic_model) if web is not None else None
    return build(cfg, tokenize_fn(cfg.tokenizer), score, list_files=partial(curated_files, suffixes=DOC_SUFFIXES),
                 log=print if progress else _quiet)


def _quiet(_: str) -> None:
    pass


def _check_ray(args: argparse.Namespace) -> None:
    if args.executor == "ray":
        from curation.executor import check_ray_address

        check_ray_address(args.ray_address)


def _mix(args: argparse.Namespace, progress: bool) -> int:
    from proxy_mix.config import load_config

    cfg = load_config(args.config)
    log = print if progress else _quiet
    cmd = args.mix_command
    if cmd == "pools":
        summary = build_pools(cfg, progress)
        for p in summary["pools"]:
            print(f"{p['name']:<24} {p['documents']:>8,} docs {p['tokens']:>12,} tokens  held-out {p['heldout_tokens']:,}")
        print(f"{len(summary['pools'])} pools, {len(summary['targets'])} targets → {cfg.out / 'pools'}")
        return 0
    if cmd == "sweep":
        from proxy_mix.sweep import run_sweep

        _check_ray(args)
        pools = build_pools(cfg, progress)
        s = run_sweep(cfg, pools, executor=args.executor, address=args.ray_address, workers=args.workers,
                      progress=progress, log=log)
        print(f"sweep: {s['ok']}/{s['total']} proxies ok ({s['trained_now']} trained now, {s['skipped']} before), "
              f"{s['failed']} failed, {s['wall_seconds']} s → {s['results_csv']}")
        return 1 if s["failed"] else 0
    if cmd == "fit":
        from proxy_mix.fit import run_fit
        from proxy_mix.pools import load_pools

        report = run_fit(cfg, load_pools(cfg), log=log)
        print(json.dumps(report["summary"], indent=1))
        return 0
    if cmd == "upsample":
        from proxy_mix.pools import load_pools
        from proxy_mix.upsample import run_upsample

        out = run_upsample(cfg, load_pools(cfg), mix=args.mix)
        print(f"upsampled mixture → {out['manifest']}")
        return 0
    if cmd == "validate":
        from proxy_mix.pools import load_pools
        from proxy_mix.validate import run_validate

        _check_ray(args)
        extra = {}
        for item in args.mix or []:
            name, sep, path = item.partition("=")
            if not sep:
                raise ValueError(f"--mix takes NAME=PATH, got {item!r}")
            extra[name] = path
        report = run_validate(cfg, load_pools(cfg), extra=extra, executor=args.executor, address=args.ray_address,
                              workers=args.workers, progress=progress, log=log)
        print(report["table"])
        return 1 if report["failed"] else 0
    raise AssertionError(cmd)


__all__ = ["add_parsers", "run", "build_pools", "tokenize_fn", "score_fn"]
