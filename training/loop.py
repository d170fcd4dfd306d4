"""The training loop for pretraining and mid-training.

``train(cfg)`` runs one stage in this process (one rank of a ``torchrun`` job when the torchrun
environment is set); ``train_from_cli(stage, config_path, overrides)`` is what
``refinery train pretrain|midtrain CONFIG [key=value ...]`` calls, and ``python -m training.loop``
is the same for ``torchrun``.

One optimizer step = ``optim.grad_accum`` micro-batches of ``train.batch_size`` sequences (summed
over ranks) of ``data.seq_len`` tokens. The per-micro-batch loss is the token mean, scaled by
1/grad_accum, and DDP/FSDP average gradients over ranks, so the update equals one process running
the whole global batch.

Weight decay applies to matrices of the linear layers only: not to norm gains (decaying a gain
pulls it towards 0, a scale the next layer must undo) and not to the embedding table, following
OLMo 2 (arXiv:2501.00656 section 3.2, "no weight decay on embeddings" for stability). With tied
embeddings the LM head is the embedding table, so it is not decayed either.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training import data as data_mod
from training.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_model_file,
    load_model_weights,
    save_checkpoint,
)
from training.config import ConfigError, ModelSection, TrainConfig, TrainSection, load_config
from training.distributed import (
    DistInfo,
    all_reduce_mean,
    barrier,
    broadcast_object,
    cleanup,
    init_distributed,
    no_grad_sync,
    parallelize,
)
from training.flops import mfu, peak_flops
from training.metrics import MetricsLog, bits_per_byte
from training.model import ModelConfig, Transformer
from training.schedule import lr_at

# Fields that mid-training may change on a pretrained model (context extension); any other
# architecture field must match the checkpoint.
CONTEXT_FIELDS = ("max_seq_len", "rope_theta", "rope_scaling")
_ARCH_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "norm_eps",
                "tie_embeddings")


# ---------------------------------------------------------------------------------------------- model


def _section_overrides(section: ModelSection, names: tuple[str, ...]) -> dict[str, Any]:
    return {n: getattr(section, n) for n in names if getattr(section, n) is not None}


def build_model_config(cfg: TrainConfig, vocab_size: int | None,
                       base: dict[str, Any] | None = None) -> ModelConfig:
    """The model config of a run. ``base`` is the config stored in the ``init_from`` checkpoint
    (mid-training, continued pretraining): its architecture is kept and only context fields may
    change."""
    m = cfg.model
    if base is not None:
        for name in ("size", *_ARCH_FIELDS):
            value = getattr(m, name)
            if name == "size" and value is not None:
                raise ConfigError("model.size cannot be set when continuing from train.init_from: the "
                                  "architecture comes from the checkpoint")
            if value is not None and value != base[name]:
                raise ConfigError(f"model.{name}={value!r} differs from the checkpoint's {base[name]!r}; "
                                  f"a run from train.init_from may change only {', '.join(CONTEXT_FIELDS)}")
        merged = {**base, **_section_overrides(m, CONTEXT_FIELDS + ("init_std",))}
        if vocab_size is not None and vocab_size > merged["vocab_size"]:
            raise ConfigError(f"the data's tokenizer has {vocab_size} tokens but the checkpoint's model "
                              f"only {merged['vocab_size']}")
        return ModelConfig.from_dict(merged)
    vocab = m.vocab_size or vocab_size
    if vocab is None:
        raise ConfigError("model.vocab_size is unset and no tokenizer.json was found next to the data")
    if vocab_size is not None and vocab < vocab_size:
        raise ConfigError(f"model.vocab_size={vocab} is smaller than the tokenizer's {vocab_size}")
    fields = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "max_seq_len", "rope_theta",
              "rope_scaling", "norm_eps", "tie_embeddings", "init_std")
    overrides = _section_overrides(m, fields)
    try:
        if m.size is not None:
            return ModelConfig.named(m.size, vocab, **overrides)
        return ModelConfig(vocab_size=vocab, **overrides)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid model section: {e}") from e


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on linear-layer matrices, none on norms, biases and embeddings."""
    embedding_params = {id(p) for mod in model.modules() if isinstance(mod, nn.Embedding)
                        for p in mod.parameters(recurse=False)}
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # deduplicated: a tied head appears once
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or id(p) in embedding_params else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    o = cfg.optim
    # The fused kernel is one launch per step on CUDA; foreach (the default elsewhere) is the portable
    # multi-tensor path. Both give the same update up to rounding.
    impl = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps, **impl)


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if precision == "bf16":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "bf16" and device.type != "cuda":
        raise ConfigError("train.precision=bf16 needs a CUDA device (bf16 autocast is CUDA-only here); "
                          "use auto or fp32 on CPU")
    return precision


# ----------------------------------------------------------------------------------------------- data


def data_vocab(mix: str) -> tuple[int, Path | None]:
    """The vocabulary size of the training data (the largest over its pools) and the tokenizer.json
    beside the first pool's token manifest (copied into the HF export)."""
    pools, _ = data_mod.load_mix(mix)
    vocab, tokenizer = 0, None
    for i, pool in enumerate(pools):
        if not pool.manifest.is_file():
            raise FileNotFoundError(f"token manifest of pool {pool.name!r} not found: {pool.manifest}")
        manifest = json.loads(pool.manifest.read_text())
        vocab = max(vocab, int(manifest["vocab_size"]))
        if i == 0:
            path = pool.manifest.parent / manifest.get("tokenizer", "tokenizer.json")
            tokenizer = path if path.is_file() else None
    return vocab, tokenizer


# ----------------------------------------------------------------------------------------------- eval


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
             precision: str) -> float:
    """Mean next-token loss (nats) over all target tokens of ``batches``. Every rank evaluates every
    batch: FSDP needs all ranks in each forward, and the result is then the same everywhere."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for inputs, targets in batches:
        inputs, targets = inputs.to(device), targets.to(device)
        with _autocast(precision, device):
            logits = model(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")
        total += float(loss)
        count += targets.numel()
    model.train(was_training)
    return total / max(count, 1)


# ------------------------------------------------------------------------------------------------ run


def _full_state(model: nn.Module, info: DistInfo) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=info.distributed))


def _export(model: nn.Module, mcfg: ModelConfig, out_dir: Path, tokenizer: Path | None,
            info: DistInfo, special_ids: dict[str, int | None]) -> str | None:
    """HF export of the final weights (collective gather, rank 0 writes). `special_ids` (bos_id,
    eos_id, pad_id of the data's tokenizer) go into config.json, so HF's `generate` stops at EOS."""
    from training.export import export_hf

    state = _full_state(model, info)
    if not info.is_main:
        return None
    export_hf((state, mcfg), out_dir / "hf", tokenizer_path=tokenizer, **special_ids)
    return str(out_dir / "hf")


def _resume_decision(t: TrainSection, ckpt_root: Path) -> tuple[str | None, dict[str, Any] | None]:
    """(checkpoint to resume or None, model config of the ``init_from`` lineage or None)."""
    latest = latest_checkpoint(ckpt_root)
    if latest is not None and not t.resume:
        # Starting over in place would interleave two runs' checkpoints under one `latest`.
        raise ConfigError(f"{ckpt_root} holds checkpoints of an earlier run and train.resume=false; "
                          f"use a new train.out_dir or remove them")
    base = None
    if t.init_from:
        base = load_model_file(latest if latest is not None else t.init_from)["model_config"]
    return (str(latest) if latest is not None else None), base


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run one stage; returns a summary (the same on every rank)."""
    cfg.validate()
    info = init_distributed(cfg.train.device)
    try:
        summary = _train(cfg, info)
        # Free the wrapped model now: DDP/FSDP modules sit in reference cycles that hold the process
        # group, and one collected at interpreter exit, after the group was destroyed, can abort the
        # process ("terminate called without an active exception": about 1 in 6 two-rank gloo runs
        # without this, none in 18 with it). Then every rank is done communicating before the group goes.
        gc.collect()
        barrier(info)
        return summary
    finally:
        cleanup(info)


def _train(cfg: TrainConfig, info: DistInfo) -> dict[str, Any]:
    t, o, d = cfg.train, cfg.optim, cfg.data
    device = info.device
    precision = resolve_precision(t.precision, device)
    if t.batch_size % info.world_size:
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by the {info.world_size} ranks")
    out_dir = Path(t.out_dir)
    ckpt_root = out_dir / "checkpoints"

    # Rank 0 decides where the weights come from and the others follow; an error there is raised on
    # every rank, so no rank is left waiting in a collective.
    decision: tuple[str | None, dict[str, Any] | None] | None = None
    error: Exception | None = None
    if info.is_main:
        try:
            decision = _resume_decision(t, ckpt_root)
        except Exception as e:
            error = e
    error, decision = broadcast_object((error, decision), info)
    if error is not None:
        raise error
    assert decision is not None
    resume_name, base_cfg = decision
    resuming = resume_name is not None

    vocab, tokenizer = data_vocab(d.mix)
    mcfg = build_model_config(cfg, vocab, base_cfg)
    eval_seq_len = d.eval_seq_len or d.seq_len
    for name, length in (("data.seq_len", d.seq_len), ("data.eval_seq_len", eval_seq_len)):
        if length > mcfg.max_seq_len:
            raise ConfigError(f"{name}={length} exceeds model.max_seq_len={mcfg.max_seq_len}; raise "
                              f"model.max_seq_len (and rope_theta/rope_scaling to extend the context)")

    torch.manual_seed(t.seed)  # identical initial weights on every rank
    with torch.device(device):
        model: nn.Module = Transformer(mcfg)
    base_model = model
    flops_per_token = base_model.flops_per_token(d.seq_len)
    n_params = base_model.num_params()
    param_dtype = torch.bfloat16 if precision == "bf16" and t.parallel == "fsdp" else None
    model = parallelize(model, info, parallel=t.parallel, compile=t.compile,
                        activation_checkpointing=t.activation_checkpointing, param_dtype=param_dtype)
    optimizer = build_optimizer(model, cfg, device)

    loader = data_mod.MixtureLoader(d.mix, seq_len=d.seq_len, global_batch_size=t.batch_size,
                                    rank=info.rank, world_size=info.world_size, seed=t.seed,
                                    vocab_size=mcfg.vocab_size)
    start_step, tokens = 0, 0
    metrics = MetricsLog(out_dir / "metrics.jsonl", enabled=info.is_main)
    if resuming:
        state = load_checkpoint(Path(resume_name) if info.is_main else None, model, optimizer, info)
        start_step, tokens = state["step"], state["tokens"]
        loader.load_state_dict(state["data"])
        metrics.truncate_after(start_step)
    else:
        if t.init_from:
            # Mid-training / continued pretraining: weights only; optimizer, schedule, data start fresh.
            weights = load_model_file(t.init_from)["model"] if info.is_main else None
            load_model_weights(model, weights, info)
        if info.is_main and metrics.path.exists():
            metrics.path.unlink()  # a fresh run (no checkpoint to resume) starts a fresh log

    eval_batches: list[tuple[torch.Tensor, torch.Tensor]] = []
    eval_bytes_per_token: float | None = None
    if d.eval:
        eval_batches = list(data_mod.eval_batches(d.eval, seq_len=eval_seq_len,
                                                  batch_size=t.eval_batch_size or t.batch_size,
                                                  max_batches=t.eval_batches, vocab_size=mcfg.vocab_size))
        eval_bytes_per_token = data_mod.bytes_per_token(d.eval)

    def run_eval() -> dict[str, float | None]:
        if not eval_batches:
            return {}
        loss = evaluate(model, eval_batches, device, precision)
        return {"eval_loss": loss, "eval_bpb": bits_per_byte(loss, eval_bytes_per_token)}

    def checkpoint(step: int) -> str | None:
        path = save_checkpoint(ckpt_root, step, model, optimizer, info=info, model_config=mcfg.to_dict(),
                               config=cfg.to_dict(), data_state=loader.state_dict(), tokens=tokens,
                               keep=t.keep_checkpoints)
        return str(path) if path else None

    peak = peak_flops(device) if device.type == "cuda" else None
    tokens_per_step = t.batch_size * d.seq_len * o.grad_accum
    end_step = t.steps if t.stop_after is None else min(t.steps, t.stop_after)
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]] = iter(loader)
    bar = None
    if t.progress and info.is_main:
        from tqdm import tqdm

        bar = tqdm(total=t.steps, initial=start_step, desc=cfg.stage, dynamic_ncols=True, file=sys.stderr)

    initial_eval: dict[str, float | None] = {}
    if t.eval_at_start and eval_batches and start_step == 0:
        # The baseline a mid-training run is judged against: the loaded weights on the new data
        # and context length, before any update.
        initial_eval = run_eval()
        metrics.log({"step": 0, **initial_eval})

    model.train()
    last_loss = float("nan")
    last_eval: dict[str, float | None] = {}
    losses: dict[int, float] = {}
    window_tokens, window_time = 0, 0.0
    last_ckpt: str | None = None
    for step in range(start_step, end_step):
        t0 = time.perf_counter()
        lr = lr_at(step, schedule=o.schedule, peak=o.lr, warmup=o.warmup, total=t.steps,
                   min_ratio=o.min_lr_ratio, decay_fraction=o.decay_fraction, decay_shape=o.decay_shape)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for micro in range(o.grad_accum):
            try:
                inputs, targets = next(batches)
            except StopIteration:
                raise RuntimeError(f"the data ran out at step {step} (micro-batch {micro}); lower "
                                   f"train.steps or raise the mix's repetition caps") from None
            inputs = inputs.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            last_micro = micro == o.grad_accum - 1
            with no_grad_sync(model, last_micro), _autocast(precision, device):
                logits = model(inputs)
                loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
                (loss / o.grad_accum).backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                   o.grad_clip if o.grad_clip > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a replicated DTensor
            grad_norm = grad_norm.full_tensor()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += tokens_per_step
        done = step + 1
        window_tokens += tokens_per_step

        is_log = done % t.log_every == 0 or done == end_step
        is_eval = bool(eval_batches) and ((t.eval_every and done % t.eval_every == 0) or done == t.steps)
        record: dict[str, Any] | None = None
        if is_log or is_eval:
            step_loss = all_reduce_mean(float(loss_sum) / o.grad_accum, info)  # syncs the device too
            window_time += time.perf_counter() - t0
            tps = window_tokens / window_time if window_time > 0 else 0.0
            last_loss = step_loss
            losses[done] = step_loss
            record = {"step": done, "loss": step_loss, "lr": lr, "grad_norm": float(grad_norm),
                      "tokens": tokens, "tokens_per_s": tps,
                      "mfu": mfu(tps, flops_per_token, peak * info.world_size if peak else None)}
            window_tokens, window_time = 0, 0.0
        else:
            window_time += time.perf_counter() - t0
        if is_eval:
            last_eval = run_eval()
            assert record is not None
            record.update(last_eval)
        if record is not None:
            metrics.log(record)
            if bar is not None:
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
            if not math.isfinite(record["loss"]):
                # Every rank sees the same reduced loss, so all stop together; the last checkpoint
                # (before the divergence) stays the `latest` one.
                raise FloatingPointError(f"training loss is {record['loss']} at step {done}; lower optim.lr "
                                         f"or raise optim.warmup, then resume from the last checkpoint")
        if bar is not None:
            bar.update(1)
        if (t.checkpoint_every and done % t.checkpoint_every == 0) or done == end_step:
            last_ckpt = checkpoint(done)
    if bar is not None:
        bar.close()

    finished = end_step >= t.steps
    hf_dir = None
    if finished and t.export_hf:
        manifest = loader.shards[0].manifest
        special_ids = {k: manifest.get(k) for k in ("bos_id", "eos_id", "pad_id")}
        hf_dir = _export(model, mcfg, out_dir, tokenizer, info, special_ids)
    summary = {"stage": cfg.stage, "start_step": start_step, "step": end_step, "finished": finished,
               "loss": last_loss, "losses": losses, "tokens": tokens, "params": n_params,
               "checkpoint": last_ckpt, "hf_dir": hf_dir, "out_dir": str(out_dir),
               "model_config": mcfg.to_dict(), **last_eval,
               **{f"initial_{k}": v for k, v in initial_eval.items()}}
    return broadcast_object(summary, info)


def train_from_cli(stage: str, config_path: str, overrides: list[str]) -> dict[str, Any]:
    """Entry point of ``refinery train pretrain|midtrain CONFIG [section.key=value ...]``."""
    cfg = load_config(config_path, overrides, stage=stage)
    return train(cfg)


def main(argv: list[str] | None = None) -> int:
    """``python -m training.loop STAGE CONFIG [overrides]``: the script ``torchrun`` launches."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2 or args[0] not in ("pretrain", "midtrain"):
        print("usage: python -m training.loop pretrain|midtrain CONFIG [section.key=value ...]",
              file=sys.stderr)
        return 2
    try:
        summary = train_from_cli(args[0], args[1], args[2:])
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":
        line = f"{summary['stage']}: step {summary['step']} loss {summary['loss']:.4f}"
        if summary.get("eval_loss") is not None:
            line += f" eval_loss {summary['eval_loss']:.4f} eval_bpb {summary.get('eval_bpb')}"
        print(line + f" -> {summary['out_dir']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["train", "train_from_cli", "evaluate", "build_model_config", "param_groups", "data_vocab"]
