"""The stages of `refinery run` (pipelines/run.py): each calls the public functions that its CLI
subcommand calls and reads only files that earlier stages wrote.

    classify   curation.classify_train.train_classifier        OUT/classify/{quality,topic}/
    curate     curation.pipeline.curate (+ a classify step)     OUT/curate/corpus/
    tokenizer  curation.tokenizer.train_tokenizer               OUT/tokenizer/tokenizer.json
    mix        pipelines.mix.build_pools, proxy_mix run_sweep / run_fit / run_upsample   OUT/mix/
    pretrain … grpo   training.engine.train_from_cli (+ refinery chat tokenize for SFT / DPO data)
    export     training.export                                  OUT/model/

A training stage writes OUT/<stage>/config.yaml (the complete training config it ran, so
`refinery train STAGE OUT/<stage>/config.yaml` reruns it alone) and samples.json (the report's
prompts answered by the stage's model).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from pipelines.run import RunConfigError, StageContext

CHAT_STAGES = ("sft", "dpo", "grpo")
# Keys of a training stage's section that configure the run around it, not the trainer.
RUN_KEYS = {"pretrain": (), "midtrain": ("weights",), "sft": ("chat",), "dpo": ("pairs",), "grpo": ()}
# Training config keys the run sets from the stages before; a section setting them is refused.
RUN_OWNED = (("data", "mix"), ("data", "eval"), ("train", "out_dir"), ("train", "init_from"))


class StageError(ValueError):
    """A stage that ran but produced nothing usable; the message names the stage and what to check
    (a ValueError, so the CLI prints it as one line)."""


def _bar(total: int, desc: str, progress: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not progress, dynamic_ncols=True, file=sys.stderr)


def _write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, path)
    return path


def _write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return path


# -------------------------------------------------------------------------------------------- classify

def run_classify(ctx: StageContext) -> dict[str, Any]:
    from curation.classify_train import Source, default_sources, train_classifier

    section = ctx.section
    summary: dict[str, Any] = {}
    with _bar(2, "classify", ctx.progress) as bar:
        for kind in ("quality", "topic"):
            opts = dict(section.get(kind) or {})
            if kind == "quality" and ("positive" in opts or "negative" in opts):
                sources = ([Source(Path(p), "hq") for p in opts.pop("positive", [])]
                           + [Source(Path(p), "lq") for p in opts.pop("negative", [])])
            elif kind == "topic" and "labelled" in opts:
                sources = [Source(Path(p)) for p in opts.pop("labelled")]
            else:
                sources = default_sources(kind, ctx.cfg.data)
            opts.setdefault("seed", ctx.cfg.raw.get("seed", 0))
            meta = train_classifier(kind, sources, ctx.dir / kind, **opts)
            h = meta["heldout"]
            summary[kind] = {"accuracy": h["accuracy"], "auc": h["auc"], "examples": h["examples"],
                             "majority": h["majority_baseline"], "labels": meta["labels"],
                             "model": str(ctx.dir / kind)}
            bar.update(1)
    return summary


# ---------------------------------------------------------------------------------------------- curate

def resolve_inputs(ctx: StageContext) -> list[str]:
    """--input as curate takes it, with Common Crawl crawl names fetched into the local cache first."""
    from pipelines.crawl import fetch_crawl, is_crawl_name

    n = int((ctx.cfg.raw.get("input") or {}).get("crawl_warcs", 1))
    out: list[str] = []
    for item in ctx.cfg.inputs:
        if is_crawl_name(item):
            out += [str(p) for p in fetch_crawl(item, n, progress=ctx.progress)]
        else:
            out.append(item)
    return out


def curation_config(ctx: StageContext) -> dict[str, Any]:
    """The curate section's config (a path beside the run config, or inline) with a classify step
    that tags every document with the classify stage's models, after dedup: the tagger only sees
    the documents that survive."""
    from curation.config import CurationConfig

    given = ctx.cfg.section("curate").get("config", "web.yaml")
    if isinstance(given, dict):
        base = CurationConfig.from_dict(given, where="curate.config").to_dict()
    else:
        base = CurationConfig.load(ctx.cfg.resolve(given)).to_dict()
    classify_dir = ctx.out / "classify"
    steps = [s for s in base["steps"] if "classify" not in s]
    after = [s for s in base.get("after_dedup", []) if "classify" not in s]
    after.append({"classify": {"quality_model": str(classify_dir / "quality"),
                               "topic_model": str(classify_dir / "topic")}})
    return {**base, "steps": steps, "after_dedup": after}


def run_curate(ctx: StageContext) -> dict[str, Any]:
    from curation.config import CurationConfig, check_extract_for_inputs
    from curation.pipeline import curate
    from pipelines.cli import curate_verdict

    section = ctx.section
    config_path = _write_yaml(ctx.dir / "curate.yaml", curation_config(ctx))
    inputs = resolve_inputs(ctx)
    check_extract_for_inputs(CurationConfig.load(config_path), inputs)
    corpus = ctx.dir / "corpus"
    stats = curate(config_path, inputs, corpus, executor=section.get("executor", "ray"),
                   ray_address=section.get("ray_address"), progress=ctx.progress)
    lines, code = curate_verdict(stats, corpus / "report.md")
    for line in lines:
        ctx.log(line)
    if code:
        raise StageError(f"curate: the run failed ({lines[-1] if lines else 'see the report'}); check --input")
    return {"corpus": str(corpus), "documents_read": stats["documents_read"],
            "documents_written": stats["documents_written"], "characters_written": stats["characters_written"],
            "input_files": stats["input_files"], "languages": stats["languages"],
            "executor": stats["executor"], "curation_seconds": stats["wall_seconds"]}


# ------------------------------------------------------------------------------------------- tokenizer

def run_tokenizer(ctx: StageContext) -> dict[str, Any]:
    from curation.tokenizer import train_tokenizer

    section = ctx.section
    vocab = int(section.get("vocab_size", 4096))
    inputs = [ctx.out / "curate" / "corpus", *(Path(p) for p in section.get("extra") or [])]
    with _bar(1, "tokenizer", ctx.progress) as bar:
        path = train_tokenizer(inputs, vocab, ctx.dir / "tokenizer.json", max_chars=section.get("max_chars"))
        bar.update(1)
    return {"path": str(path), "vocab_size": vocab, "inputs": [str(p) for p in inputs]}


def tokenizer_path(ctx: StageContext) -> Path:
    return ctx.out / "tokenizer" / "tokenizer.json"


# ------------------------------------------------------------------------------------------------- mix

def mix_config(ctx: StageContext) -> dict[str, Any]:
    """The mixing config: the mix section plus the paths the run owns."""
    section = ctx.section
    for key in ("executor", "workers", "ray_address"):
        section.pop(key, None)
    for key in ("output", "tokenizer"):
        if key in section:
            raise RunConfigError(f"mix.{key} is set by the run (to OUTPUT/mix and the tokenizer stage's file); "
                                 "remove it")
    web = dict(section.get("web") or {})
    for key in ("corpus", "quality_model", "topic_model"):
        if key in web:
            raise RunConfigError(f"mix.web.{key} is set by the run (the curated corpus and the classify stage's "
                                 "models); remove it")
    topic_model = ctx.out / "classify" / "topic"
    labels = json.loads((topic_model / "model.json").read_text())["labels"]
    topics = web.get("topics")
    if topics:
        covered = {lab for labs in topics.values() for lab in labs}
        missing = [lab for lab in labels if lab not in covered]
        if missing:
            raise RunConfigError(f"mix.web.topics leaves the topic classifier's label(s) {missing} out, so their "
                                 "documents would be in no pool; add them to a topic")
    web.update({"corpus": [str(ctx.out / "curate" / "corpus")], "quality_model": str(ctx.out / "classify" / "quality"),
                "topic_model": str(topic_model)})
    return {"name": ctx.cfg.raw.get("name", "run"), "output": str(ctx.dir), "tokenizer": str(tokenizer_path(ctx)),
            **section, "web": web}


def run_mix(ctx: StageContext) -> dict[str, Any]:
    from pipelines.mix import build_pools
    from proxy_mix.config import load_config
    from proxy_mix.fit import run_fit
    from proxy_mix.sweep import run_sweep
    from proxy_mix.upsample import run_upsample

    section = ctx.section
    cfg = load_config(_write_yaml(ctx.dir / "mix.yaml", mix_config(ctx)))
    log = ctx.log if ctx.progress else _quiet
    with _bar(4, "mix", ctx.progress) as bar:
        bar.set_postfix_str("pools")
        pools = build_pools(cfg, ctx.progress)
        bar.update(1)
        bar.set_postfix_str("sweep")
        executor = section.get("executor", "ray")
        if executor == "ray":
            from curation.executor import check_ray_address

            check_ray_address(section.get("ray_address"))
        sweep = run_sweep(cfg, pools, executor=executor, address=section.get("ray_address"),
                          workers=section.get("workers"), progress=ctx.progress, log=log)
        if sweep["failed"]:
            raise StageError(f"mix: {sweep['failed']} of {sweep['total']} proxies failed (errors in "
                             f"{sweep['results_csv']}); rerun to retry them")
        bar.update(1)
        bar.set_postfix_str("fit")
        fit = run_fit(cfg, pools, log=log)
        bar.update(1)
        bar.set_postfix_str("upsample")
        up = run_upsample(cfg, pools)
        bar.update(1)
    from training.data import load_mix

    specs, _ = load_mix(up["manifest"])
    upsampled = {s.name: s.weight for s in specs}
    s = fit["summary"]
    return {"pools": len(pools["pools"]), "tokens": sum(p["tokens"] for p in pools["pools"]),
            "pool_tokens": {p["name"]: p["tokens"] for p in pools["pools"]},
            "proxies_ok": sweep["ok"], "proxies": sweep["total"], "fit_model": s["chosen_model"],
            "spearman": s["kfold_spearman"][s["chosen_model"]], "predicted_bpb": s["predicted_bpb"],
            "weights": {**fit["weights"], "upsampled": {n: upsampled.get(n, 0.0) for n in fit["pools"]}},
            "manifest": up["manifest"], "targets": {t["name"]: t["manifest"] for t in pools["targets"]}}


def _quiet(_: str) -> None:
    pass


# ------------------------------------------------------------------------------------------- training

def training_config(ctx: StageContext, *, mix: str, eval_: str | None, init_from: str | None) -> dict[str, Any]:
    """The stage's section as a complete training config, with the paths the run owns filled in."""
    name = ctx.stage.name
    section = {k: v for k, v in ctx.section.items() if k not in RUN_KEYS[name]}
    for group, key in RUN_OWNED:
        if key in (section.get(group) or {}):
            raise RunConfigError(f"{name}.{group}.{key} is set by the run from the stages before; remove it")
    section.pop("stage", None)
    data = {**(section.get("data") or {}), "mix": mix, "eval": eval_}
    train = {"seed": ctx.cfg.raw.get("seed", 0), **(section.get("train") or {}), "out_dir": str(ctx.dir),
             "progress": ctx.progress}
    if init_from is not None:
        train["init_from"] = init_from
    return {"stage": name, **section, "data": data, "train": train}


def train_stage(ctx: StageContext, *, mix: str, eval_: str | None, init_from: str | None) -> dict[str, Any]:
    import torch

    from training.engine import train_from_cli
    from training.metrics import read_metrics

    config = _write_yaml(ctx.dir / "config.yaml", training_config(ctx, mix=mix, eval_=eval_, init_from=init_from))
    threads = ctx.cfg.raw.get("threads")
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        result = train_from_cli(ctx.stage.name, str(config), [])
    finally:
        torch.set_num_threads(before)
    if not result.get("finished") or not result.get("hf_dir"):
        raise StageError(f"{ctx.stage.name}: training stopped at step {result.get('step')} without its export; rerun")
    records = read_metrics(ctx.dir / "metrics.jsonl")
    losses = [r["loss"] for r in records if r.get("loss") is not None]
    summary = {k: v for k, v in result.items() if isinstance(v, int | float | str | bool) or v is None}
    summary.update({"initial_loss": losses[0] if losses else None, "loss": losses[-1] if losses else None,
                    "run": str(ctx.dir), "config": str(config)})
    report = ctx.cfg.section("report")
    prompts = report.get("prompts") or []
    if prompts:
        samples = sample_generations(Path(result["hf_dir"]), prompts, chat=ctx.stage.name in CHAT_STAGES,
                                     max_new_tokens=int(report.get("max_new_tokens", 40)),
                                     seed=int(ctx.cfg.raw.get("seed", 0)))
        _write_json(ctx.dir / "samples.json", samples)
        summary["samples"] = samples
    return summary


def sample_generations(hf_dir: Path, prompts: list[str], *, chat: bool, max_new_tokens: int,
                       seed: int) -> list[dict[str, str]]:
    """Each prompt continued by the exported model (sampled at temperature 0.7 with a fixed seed): as
    plain text by a base model, as the user's turn of the chat template by a chat stage's model."""
    from tokenizers import Tokenizer

    from training.export import import_hf
    from training.generate import generate

    model = import_hf(hf_dir)
    model.eval()
    cfg = json.loads((hf_dir / "config.json").read_text())
    out = []
    template: Any = None
    if chat:
        from training.chat import ChatTemplate

        template = ChatTemplate.load(hf_dir)
        tok = template.tokenizer
        stop: list[int] = list(template.stop_ids)
    else:
        tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
        eos = cfg.get("eos_token_id")
        stop = [eos] if isinstance(eos, int) else list(eos or [])
    for i, prompt in enumerate(prompts):
        ids = template.render_prompt([{"role": "user", "content": prompt}]) if chat else tok.encode(prompt).ids
        room = model.cfg.max_seq_len - len(ids)
        new = generate(model, [ids], max_new_tokens=max(0, min(max_new_tokens, room)), temperature=0.7, top_p=0.95,
                       eos_id=stop, seed=seed + i)[0]
        text = template.decode_response(new) if chat else tok.decode([t for t in new if t not in stop])
        out.append({"prompt": prompt, "completion": text})
    return out


def _mix_summary(ctx: StageContext) -> dict[str, Any]:
    summary = ctx.summaries.get("mix")
    if not summary:
        raise RunConfigError("the mix stage's summary is missing; rerun with --from mix")
    return summary


def reference_eval(ctx: StageContext) -> str:
    """Held-out clean text for the language-modelling stages: the mix's first target."""
    targets = _mix_summary(ctx)["targets"]
    return str(next(iter(targets.values())))


def run_pretrain(ctx: StageContext) -> dict[str, Any]:
    return train_stage(ctx, mix=_mix_summary(ctx)["manifest"], eval_=reference_eval(ctx), init_from=None)


def task_files(ctx: StageContext, root: Path) -> dict[str, Path]:
    """The verifiable task as GSM8K rows (tasks.jsonl, test.jsonl), chat rows (sft.jsonl) and plain-text
    documents (pretrain/): synthetic arithmetic (training.rl_synthetic.write_task_files, its keyword
    arguments from the tasks section), or GSM8K-format files given as tasks.train / tasks.test."""
    from training.rl_synthetic import PLAIN_TEMPLATE, write_task_files

    t = ctx.cfg.section("tasks")
    kind = t.pop("kind", "arithmetic")
    if kind == "arithmetic":
        try:
            return write_task_files(root, seed=int(ctx.cfg.raw.get("seed", 0)), **t)
        except TypeError as e:
            raise RunConfigError(f"tasks: {e} (the keys are write_task_files' arguments in "
                                 "training/rl_synthetic.py)") from None
    if kind != "gsm8k":
        raise RunConfigError(f"tasks.kind must be arithmetic or gsm8k, got {kind!r}")
    rows = {}
    for split in ("train", "test"):
        src = t.get(split)
        if not isinstance(src, str) or not Path(src).is_file():
            raise RunConfigError(f"tasks.kind gsm8k needs tasks.{split}: a GSM8K-format jsonl file; got {src!r}")
        limit = t.get(f"max_{split}")
        rows[split] = [json.loads(line) for line in Path(src).read_text().splitlines() if line.strip()][:limit]
    paths = {"tasks": root / "tasks.jsonl", "test": root / "test.jsonl", "sft": root / "sft.jsonl",
             "pretrain": root / "pretrain" / "corpus.jsonl"}
    _write_lines(paths["tasks"], rows["train"])
    _write_lines(paths["test"], rows["test"])
    _write_lines(paths["sft"], [{"messages": [{"role": "user", "content": r["question"]},
                                              {"role": "assistant", "content": r["answer"]}]} for r in rows["train"]])
    _write_lines(paths["pretrain"], [{"id": f"task-{i}", "text": PLAIN_TEMPLATE.format(question=r["question"])
                                      + " " + r["answer"]} for i, r in enumerate(rows["train"])])
    return paths


def _write_lines(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def run_midtrain(ctx: StageContext) -> dict[str, Any]:
    from curation.executor import LocalExecutor
    from curation.tokenize import tokenize_corpus
    from training.data import load_mix

    weights = ctx.section.get("weights") or {"web": 0.6, "tasks": 0.4}
    if set(weights) != {"web", "tasks"} or any(not isinstance(w, int | float) or w < 0 for w in weights.values()):
        raise RunConfigError(f"midtrain.weights must give `web` and `tasks` a weight >= 0, got {weights}")
    total = weights["web"] + weights["tasks"]
    if total <= 0:
        raise RunConfigError("midtrain.weights must not all be 0")
    files = task_files(ctx, ctx.dir / "tasks")
    text = files["pretrain"]
    manifest = tokenize_corpus(text.parent, tokenizer_path(ctx), ctx.dir / "tokens_tasks",
                               executor=LocalExecutor(progress=False), suffixes=("".join(text.suffixes),))
    pools = []
    specs, _ = load_mix(_mix_summary(ctx)["manifest"])
    for s in specs:
        if s.weight > 0:
            pools.append({"name": s.name, "manifest": str(s.manifest), "weight": s.weight * weights["web"] / total,
                          "max_repetition": s.max_repetition})
    pools.append({"name": "tasks", "manifest": str(ctx.dir / "tokens_tasks" / "manifest.json"),
                  "weight": weights["tasks"] / total, "max_repetition": None})
    mix = _write_json(ctx.dir / "mix.json", {"name": "midtrain", "pools": [p for p in pools if p["weight"] > 0]})
    summary = train_stage(ctx, mix=str(mix), eval_=reference_eval(ctx), init_from=str(ctx.out / "pretrain"))
    summary["task_tokens"] = manifest["total_tokens"]
    summary["tasks"] = {k: str(v) for k, v in files.items()}
    return summary


def _chat_data(ctx: StageContext, key: str, out: Path, kind: str, extra: list[Path]) -> dict[str, Any]:
    from training.chat import tokenize_chat

    spec = ctx.section.get(key) or {}
    inputs = [*(spec.get("inputs") or []), *(str(p) for p in extra)]
    if not inputs:
        raise RunConfigError(f"{ctx.stage.name}.{key}.inputs names no files")
    return tokenize_chat(inputs, tokenizer_path(ctx), out, fmt=spec.get("format", "auto"), kind=kind,
                         max_len=int(spec.get("max_len", 256)), holdout=float(spec.get("holdout", 0.05)),
                         seed=int(ctx.cfg.raw.get("seed", 0)), progress=ctx.progress)


def _tasks(ctx: StageContext) -> dict[str, str]:
    tasks = (ctx.summaries.get("midtrain") or {}).get("tasks")
    if not tasks:
        raise RunConfigError("the midtrain stage's task files are missing; rerun with --from midtrain")
    return tasks


def run_sft(ctx: StageContext) -> dict[str, Any]:
    chat = ctx.dir / "chat"
    data = _chat_data(ctx, "chat", chat, "chat", [Path(_tasks(ctx)["sft"])])
    summary = train_stage(ctx, mix=str(chat), eval_=str(chat / "heldout"), init_from=str(ctx.out / "midtrain"))
    summary["data"] = data.get("summary")
    return summary


def run_dpo(ctx: StageContext) -> dict[str, Any]:
    pairs = ctx.dir / "pairs"
    data = _chat_data(ctx, "pairs", pairs, "preference", [])
    summary = train_stage(ctx, mix=str(pairs), eval_=str(pairs / "heldout"), init_from=str(ctx.out / "sft"))
    summary["data"] = data.get("summary")
    return summary


def run_grpo(ctx: StageContext) -> dict[str, Any]:
    from training.metrics import read_metrics
    from training.objectives import STAGE_OBJECTIVES

    if "grpo" not in STAGE_OBJECTIVES:
        raise StageError("this installation has no grpo training stage (training/objectives/__init__.py)")
    tasks = _tasks(ctx)
    summary = train_stage(ctx, mix=tasks["tasks"], eval_=tasks["test"], init_from=str(ctx.out / "dpo"))
    rewards = [r["reward"] for r in read_metrics(ctx.dir / "metrics.jsonl") if r.get("reward") is not None]
    summary.update({"first_reward": rewards[0] if rewards else None, "last_reward": rewards[-1] if rewards else None})
    return summary


# ----------------------------------------------------------------------------------------------- export

def run_export(ctx: StageContext) -> dict[str, Any]:
    """The final (GRPO) checkpoint as a Hugging Face Llama folder, with the chat template's special ids and
    tokenizer_config.json, then loaded back with transformers to check it computes our model's logits."""
    from training.checkpoint import load_model_file, resolve_checkpoint
    from training.export import export_hf
    from training.model import ModelConfig

    run = ctx.out / "grpo"
    trained_hf = run / "hf"
    special = json.loads((trained_hf / "config.json").read_text())
    with _bar(2, "export", ctx.progress) as bar:
        data = load_model_file(run)
        path = export_hf((data["model"], ModelConfig.from_dict(data["model_config"])), ctx.dir,
                         tokenizer_path=trained_hf / "tokenizer.json", bos_id=special.get("bos_token_id"),
                         eos_id=special.get("eos_token_id"), pad_id=special.get("pad_token_id"), force=True)
        chat_config = ctx.out / "sft" / "chat" / "tokenizer_config.json"
        if chat_config.is_file():
            shutil.copyfile(chat_config, path / "tokenizer_config.json")
        bar.update(1)
        check = check_with_transformers(path)
        bar.update(1)
    return {"path": str(path), "checkpoint": str(resolve_checkpoint(run)), **check}


def check_with_transformers(path: Path) -> dict[str, Any]:
    """Load the export with transformers and compare its logits with ours on a few tokens."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return {"transformers": "not installed"}
    import torch
    from transformers import AutoModelForCausalLM

    from training.export import import_hf

    hf = AutoModelForCausalLM.from_pretrained(path)
    ours = import_hf(path)
    ids = torch.arange(1, 17, dtype=torch.long)[None, :] % hf.config.vocab_size
    with torch.no_grad():
        diff = float((hf(ids).logits - ours(ids)).abs().max())
    return {"transformers": f"loads as {type(hf).__name__}, max |Δlogit| {diff:.1e}", "max_logit_diff": diff}

