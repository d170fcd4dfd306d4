"""The one training loop. Every stage runs on it; a stage supplies an objective (training/objectives/).

``train(cfg)`` runs one stage in this process (one rank of a ``torchrun`` job when the torchrun
environment is set); ``train_from_cli(stage, config_path, overrides)`` is what ``refinery train STAGE
CONFIG [key=value ...]`` calls, and ``python -m training.engine`` (or ``training.loop``) is the same for
``torchrun``.

Here, once: model build and start weights, LoRA adapters, activation checkpointing, compile, DDP/FSDP2,
AdamW, the schedule, gradient accumulation, clipping, a finite check every step, evaluation, metrics,
the progress bar, checkpoints and exact resume, export.

One optimizer step = ``optim.grad_accum`` micro-batches of ``train.batch_size`` rows (summed over
ranks). The objective returns each micro-batch's loss as a sum over its units (tokens, pairs) and the
unit count before the forward; the engine divides by the step's global count W and multiplies by the
world size (DDP/FSDP average gradients over ranks), so the update is that of Σ loss / W over the whole
global batch: the same for 1 or N ranks and for any split into micro-batches.

Weight decay applies to matrices of the linear layers only: not to norm gains (decaying a gain pulls it
towards 0, a scale the next layer must undo) and not to the embedding table, following OLMo 2
(arXiv:2501.00656 section 3.2, "no weight decay on embeddings" for stability). With tied embeddings the
LM head is the embedding table, so it is not decayed either.
"""

from __future__ import annotations

import gc
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from training.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_model_file,
    load_model_weights,
    save_checkpoint,
)
from training.config import STAGES, ConfigError, ModelSection, TrainConfig, TrainSection, load_config
from training.distributed import DistInfo, barrier, broadcast_object, cleanup, init_distributed, no_grad_sync
from training.distributed import parallelize as parallelize_model
from training.flops import mfu, peak_flops
from training.metrics import MetricsLog
from training.model import ModelConfig
from training.objectives import objective_class
from training.objectives.base import Batch, Objective, RunContext
from training.schedule import lr_at

# Fields that a run from train.init_from may change (context extension); any other architecture field
# must match the checkpoint.
CONTEXT_FIELDS = ("max_seq_len", "rope_theta", "rope_scaling")
_ARCH_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "norm_eps",
                "tie_embeddings")


# ---------------------------------------------------------------------------------------------- model


def _section_overrides(section: ModelSection, names: tuple[str, ...]) -> dict[str, Any]:
    return {n: getattr(section, n) for n in names if getattr(section, n) is not None}


def build_model_config(cfg: TrainConfig, vocab_size: int | None,
                       base: dict[str, Any] | None = None) -> ModelConfig:
    """The model config of a run. ``base`` is the config stored in the ``init_from`` checkpoint: its
    architecture is kept and only context fields may change."""
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
    """AdamW groups over trainable parameters: decay on linear-layer matrices, none on norms, biases
    and embeddings."""
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


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "bf16" and device.type != "cuda":
        raise ConfigError("train.precision=bf16 needs a CUDA device (bf16 autocast is CUDA-only here); "
                          "use auto or fp32 on CPU")
    return precision


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


def _on_main(info: DistInfo, fn: Any) -> Any:
    """``fn()`` on rank 0, its result (or its error, raised on every rank) everywhere."""
    result: Any = None
    error: Exception | None = None
    if info.is_main:
        try:
            result = fn()
        except Exception as e:
            error = e
    error, result = broadcast_object((error, result), info)
    if error is not None:
        raise error
    return result


def _all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        dist.all_reduce(t)
    return t


class _Weights:
    """The start weights of a run (train.init_from, adapted by the objective, or the seed init)."""

    def __init__(self, cfg: TrainConfig, info: DistInfo, objective: Objective, mcfg: ModelConfig) -> None:
        self.cfg, self.info, self.objective, self.mcfg = cfg, info, objective, mcfg

    def build(self) -> nn.Module:
        """A new model with the start weights (collective when init_from loads: rank 0 reads)."""
        with torch.random.fork_rng(devices=[]):  # the seed init, without moving the run's RNG
            torch.manual_seed(self.cfg.train.seed)
            with torch.device(self.info.device):
                model = self.objective.build_model(self.mcfg)
        self.load_into(model)
        return model

    def load_into(self, model: nn.Module) -> None:
        if not self.cfg.train.init_from:
            return
        state, strict = None, True
        if self.info.is_main:
            state, strict = self.objective.adapt_init_state(load_model_file(self.cfg.train.init_from)["model"])
        strict = broadcast_object(strict, self.info)
        load_model_weights(model, state, self.info, strict=strict)


# ------------------------------------------------------------------------------------------------ run


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
    # Rank 0 decides where the weights come from and the others follow.
    resume_name, base_cfg = _on_main(info, lambda: _resume_decision(t, ckpt_root))

    weights: _Weights | None = None
    run = RunContext(cfg, info, precision, initial_model=lambda: weights.build())  # type: ignore[union-attr]
    objective: Objective = objective_class(cfg.stage)(cfg, run)
    data_info = objective.data_info()
    mcfg = build_model_config(cfg, data_info.vocab_size, base_cfg)
    for name, length in (("data.seq_len", d.seq_len), ("data.eval_seq_len", d.eval_seq_len or d.seq_len)):
        if length > mcfg.max_seq_len:
            raise ConfigError(f"{name}={length} exceeds model.max_seq_len={mcfg.max_seq_len}; raise "
                              f"model.max_seq_len (and rope_theta/rope_scaling to extend the context)")
    run.model_config = mcfg
    weights = _Weights(cfg, info, objective, mcfg)

    torch.manual_seed(t.seed)  # identical initial weights on every rank
    with torch.device(device):
        model = objective.build_model(mcfg)
    if resume_name is None:
        weights.load_into(model)  # fine-tuning / mid-training: weights only, the rest starts fresh
    lora = cfg.has_section("lora")
    if lora:
        from training.adapters import apply_adapters

        model = apply_adapters(model, cfg.section("lora"))
        if info.is_main:
            from training.adapters import adapter_summary

            print(f"{cfg.stage}: {adapter_summary(model)}", file=sys.stderr)
    flops_per_token = model.flops_per_token(d.seq_len) if hasattr(model, "flops_per_token") else None
    n_params = model.num_params() if hasattr(model, "num_params") else sum(p.numel() for p in model.parameters())
    param_dtype = torch.bfloat16 if precision == "bf16" and t.parallel == "fsdp" else None
    model = parallelize_model(model, info, parallel=t.parallel, compile=t.compile,
                              activation_checkpointing=t.activation_checkpointing, param_dtype=param_dtype)
    optimizer = build_optimizer(model, cfg, device)
    objective.setup(model)

    start_step, tokens = 0, 0
    metrics = MetricsLog(out_dir / "metrics.jsonl", enabled=info.is_main)
    if resume_name is not None:
        state = load_checkpoint(Path(resume_name) if info.is_main else None, model, optimizer, info)
        start_step, tokens = state["step"], state["tokens"]
        objective.load_state_dict(state["data"])
        objective.load_extra_state(state["extra"])
        metrics.truncate_after(start_step)
    elif info.is_main and metrics.path.exists():
        metrics.path.unlink()  # a fresh run (no checkpoint to resume) starts a fresh log

    has_eval = bool(d.eval)
    peak = peak_flops(device) if device.type == "cuda" else None
    end_step = t.steps if t.stop_after is None else min(t.steps, t.stop_after)
    bar = None
    if t.progress and info.is_main:
        from tqdm import tqdm

        bar = tqdm(total=t.steps, initial=start_step, desc=cfg.stage, dynamic_ncols=True, file=sys.stderr)

    initial_eval: dict[str, float | None] = {}
    if t.eval_at_start and has_eval and start_step == 0:
        # The baseline a later stage is judged against: the loaded weights on the new data, before any update.
        initial_eval = objective.evaluate(model)
        metrics.log({"step": 0, **initial_eval})

    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    last_loss = float("nan")
    last_eval: dict[str, float | None] = {}
    losses: dict[int, float] = {}
    window_tokens, window_time = 0, 0.0
    last_ckpt: str | None = resume_name
    for step in range(start_step, end_step):
        t0 = time.perf_counter()
        lr = lr_at(step, schedule=o.schedule, peak=o.lr, warmup=o.warmup, total=t.steps,
                   min_ratio=o.min_lr_ratio, decay_fraction=o.decay_fraction, decay_shape=o.decay_shape)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro = _next_batches(objective, o.grad_accum, step)
        counts = _all_reduce_sum(torch.tensor([float(sum(b.weight for b in micro)),
                                               float(sum(b.tokens for b in micro))], dtype=torch.float64,
                                              device=device), info).tolist()
        scale = info.world_size / max(counts[0], 1.0)
        loss_sum = torch.zeros((), device=device, dtype=torch.float32)
        metric_sums: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(micro):
            batch.tensors = {k: v.to(device, non_blocking=True) for k, v in batch.tensors.items()}
            with no_grad_sync(model, i == len(micro) - 1), run.autocast():
                out = objective.loss(model, batch)
                (out.loss * scale).backward()
            loss_sum += out.loss.detach().float()
            for k, v in out.metrics.items():
                metric_sums[k] = metric_sums.get(k, 0) + v.detach().float()
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, o.grad_clip if o.grad_clip > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a replicated DTensor
            grad_norm = grad_norm.full_tensor()
        names = sorted(metric_sums)
        sums = _all_reduce_sum(torch.stack([loss_sum, *(metric_sums[k] for k in names)]), info)
        values = (sums / max(counts[0], 1.0)).tolist()  # syncs the device: one transfer per step
        step_loss, grad_norm_value = values[0], float(grad_norm)
        done = step + 1
        # Every rank sees the same reduced loss and global norm, so all stop together, before the update:
        # a non-finite loss, or a finite loss with a non-finite gradient (an overflow inside the forward,
        # e.g. RMSNorm's mean square), never reaches the weights, so no checkpoint can hold it.
        if not (math.isfinite(step_loss) and math.isfinite(grad_norm_value)):
            if bar is not None:
                bar.close()
            raise FloatingPointError(_divergence_message(step_loss, grad_norm_value, done, last_ckpt))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        objective.after_step(done, model)
        step_tokens = int(counts[1])
        tokens += step_tokens
        window_tokens += step_tokens
        window_time += time.perf_counter() - t0

        is_log = done % t.log_every == 0 or done == end_step
        is_eval = has_eval and ((t.eval_every and done % t.eval_every == 0) or done == t.steps)
        record: dict[str, Any] | None = None
        if is_log or is_eval:
            tps = window_tokens / window_time if window_time > 0 else 0.0
            last_loss = step_loss
            losses[done] = step_loss
            flops = flops_per_token if flops_per_token is not None else 0.0
            record = {"step": done, "loss": step_loss, "lr": lr, "grad_norm": grad_norm_value,
                      "tokens": tokens, "tokens_per_s": tps,
                      "mfu": mfu(tps, flops, peak * info.world_size if peak else None),
                      **dict(zip(names, values[1:], strict=True))}
            window_tokens, window_time = 0, 0.0
        if is_eval:
            last_eval = objective.evaluate(model)
            assert record is not None
            record.update(last_eval)
        if record is not None:
            metrics.log(record)
            if bar is not None:
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
        if bar is not None:
            bar.update(1)
        is_ckpt = (t.checkpoint_every and done % t.checkpoint_every == 0) or done == end_step
        if is_ckpt:
            path = save_checkpoint(ckpt_root, done, model, optimizer, info=info, model_config=mcfg.to_dict(),
                                   config=cfg.to_dict(), data_state=objective.state_dict(), tokens=tokens,
                                   keep=t.keep_checkpoints, extra=objective.extra_state())
            last_ckpt = broadcast_object(str(path) if path else None, info)  # named in a divergence error
    if bar is not None:
        bar.close()

    finished = end_step >= t.steps
    export_dir = _export(model, mcfg, out_dir, info, objective, cfg) if finished and t.export_hf else None
    summary = {"stage": cfg.stage, "start_step": start_step, "step": end_step, "finished": finished,
               "loss": last_loss, "losses": losses, "tokens": tokens, "params": n_params,
               "checkpoint": last_ckpt, "hf_dir": export_dir, "out_dir": str(out_dir),
               "model_config": mcfg.to_dict(), **last_eval,
               **{f"initial_{k}": v for k, v in initial_eval.items()}}
    return broadcast_object(summary, info)


def _next_batches(objective: Objective, n: int, step: int) -> list[Batch]:
    batches = []
    for micro in range(n):
        try:
            batches.append(objective.next_batch())
        except StopIteration:
            raise RuntimeError(f"the data ran out at step {step} (micro-batch {micro}); lower "
                               f"train.steps or raise the mix's repetition caps") from None
    return batches


def _divergence_message(loss: float, grad_norm: float, step: int, last_ckpt: str | None) -> str:
    where = (f"resume from the last good checkpoint {last_ckpt}" if last_ckpt else
             "start again: no checkpoint was written before it")
    what = (f"training loss is {loss} at step {step}" if not math.isfinite(loss) else
            f"the gradient norm is {grad_norm} (loss {loss:.4f}) at step {step}")
    return (f"{what}; lower optim.lr or raise optim.warmup, then {where} "
            "(the step was not applied; no checkpoint holds non-finite weights)")


def _export(model: nn.Module, mcfg: ModelConfig, out_dir: Path, info: DistInfo, objective: Objective,
            cfg: TrainConfig) -> str | None:
    """Export of the final weights (collective gather, rank 0 writes): a LoRA run writes its adapter,
    any other the objective's export (a Hugging Face folder)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=info.distributed))
    if not info.is_main:
        return None
    if cfg.has_section("lora"):
        from training.adapters import export_adapters

        return str(export_adapters(state, mcfg, cfg.section("lora"), out_dir / "adapter",
                                   base_model_name_or_path=cfg.train.init_from))
    return objective.export(state, mcfg, out_dir)


def train_from_cli(stage: str, config_path: str, overrides: list[str]) -> dict[str, Any]:
    """Entry point of ``refinery train STAGE CONFIG [section.key=value ...]``."""
    return train(load_config(config_path, overrides, stage=stage))


def main(argv: list[str] | None = None, prog: str = "training.engine") -> int:
    """``python -m training.engine STAGE CONFIG [overrides]``: the script ``torchrun`` launches."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2 or args[0] not in STAGES:
        print(f"usage: python -m {prog} {'|'.join(STAGES)} CONFIG [section.key=value ...]", file=sys.stderr)
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


__all__ = ["train", "train_from_cli", "build_model_config", "param_groups", "build_optimizer", "main"]
