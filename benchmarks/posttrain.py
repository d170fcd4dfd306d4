"""Post-training benchmarks, one part per method family; each part prints a table and returns rows.

    .venv/bin/python benchmarks/posttrain.py --part lora            # full fine-tuning vs LoRA vs QLoRA
    .venv/bin/python benchmarks/posttrain.py --part sft             # our SFT vs TRL SFTTrainer
    .venv/bin/python benchmarks/posttrain.py --part dpo             # our DPO vs TRL DPOTrainer
    .venv/bin/python benchmarks/posttrain.py --part all --out /tmp/posttrain.json

Parts: `lora`, `sft`, `dpo` (below). Another part is a function `bench_<name>(args) -> list[dict]`
registered in PARTS; `--part all` runs every registered part in order.

## lora
Full fine-tuning, LoRA and QLoRA of the same model (125m by default, 50k vocabulary, random weights and
random tokens: memory and time do not depend on what the weights know), a few AdamW steps each at a
small batch. Each variant runs in a fresh process, so one's allocations cannot hide in another's peak:
- `trainable`: parameters the optimizer updates;
- `weights/grads/adam MB`: bytes held by parameters (+ 4-bit quant state), gradients and AdamW moments,
  counted from the tensors themselves, so exact and independent of the allocator;
- `setup RSS`: the process after building the model and optimizer; `peak RSS`: the high-water mark
  during the steps (Linux VmHWM, reset after setup through /proc/self/clear_refs), which adds
  activations and the temporary dequantized weights of QLoRA;
- `step s` / `step CPU s`: median wall / process CPU time of a training step after one warm-up step
  (forward, float32 cross-entropy, backward, AdamW) at `--threads` CPU threads; on a shared machine
  the CPU time is the steadier of the two.
QLoRA builds the fp32 model first and quantizes it in place, as the engine does after loading
`init_from`; its setup RSS is measured after that memory has been handed back (malloc_trim).

## sft, dpo
Ours (`training.engine.train` on the stage's objective, as `refinery train` runs it) against TRL's
trainer, side by side on the same model, data and machine, each side in a fresh process:
- model: a seeded checkpoint of ours (10m, random weights; speed does not depend on what they know)
  and its `training.export` HF Llama, which TRL trains (sdpa attention, as ours);
- data: a tokenizer trained on tiny-shakespeare with our chat tokens; a pool of `--pool` examples drawn
  at random (seed 0) from those that fit a row whole (SFT: the conversations of `shared/data/sft`, at
  most seq + 1 tokens; DPO: HH-RLHF pairs, both sides at most seq tokens), so neither side truncates
  or skips any. Ours reads them as chat / preference shards made by `training.chat`. TRL's SFTTrainer
  gets the very ids and loss masks of those shards (pre-tokenized `input_ids` + `assistant_masks`, from
  which it builds its labels); the run stops if the loss-bearing tokens it prepared differ from ours.
  TRL's DPOTrainer gets the pairs as conversational rows and renders them with our chat template (the
  `chat_template` of the tokenizer_config.json training.chat writes); the run stops if any pair's
  ids or completion length differ from our shards;
- timing: one warm-up epoch over the pool, then `--repeats` timed epochs; per epoch the wall time and
  the process CPU time (the steadier on a shared machine) of its optimizer steps, each step's batch
  included, taken at the end of each optimizer step (our objective's `after_step`, TRL's
  `on_step_end`); median and min-max over the epochs. Every side trains every conversation / pair of
  the pool once per epoch (ours with packing may move the conversations that finish an epoch's last
  row into it, so an epoch's count can differ by part of a row; the rate counts what each step
  trained);
- useful tokens (SFT) = loss-bearing targets, counted the same way on both sides: positions whose
  next token is trained (our `Batch.weight`; TRL's `labels[..., 1:] != -100`); DPO counts steps
  (and pairs);
- equal settings: `--threads` torch threads, fp32 on CPU (bf16 autocast on CUDA), the same batch (rows
  for SFT, pairs for DPO), rows of seq (+1) tokens, no activation checkpointing (TRL's default turns
  it on: off here, like ours), constant LR, gradient clipping 1.0. Optimizers are each side's own
  (ours foreach AdamW, TRL's default fused AdamW); TRL also computes its default per-step metrics
  (entropy, token accuracy; DPO reward statistics);
- peak RSS (VmHWM) over the timed epochs; `--device cuda` adds peak CUDA memory and MFU
  (training/flops.py: non-pad input tokens/s x flops_per_token(seq) / the GPU's peak);
- DPO: ours caches the reference log-probs in one pass before training (its time is reported, and
  steps/s over a one-epoch run including it); TRL at its defaults (precompute_ref_log_probs=False) runs
  the reference model on every step.
`--profile` adds a torch.profiler table (self CPU time) of each side's timed epochs.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.model import ModelConfig, Transformer  # noqa: E402

LORA_VARIANTS = ("full", "lora", "qlora")
MB = 1024 * 1024


def _rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def _trim_heap() -> None:
    """Hand freed heap memory back to the OS, so RSS reflects what is still allocated."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS may include freed memory
        pass


def _tensor_bytes(tensors: Any) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None and t.numel():
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _weight_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters and buffers, plus the absmax/code tensors of 4-bit weights' quant states."""
    out = [*model.parameters(), *model.buffers()]
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        if state is not None:
            out += [state.absmax, state.code]
            if state.nested:
                out += [state.state2.absmax, state.state2.code]
    return out


def lora_worker(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """One variant, in this process: build, `--steps` + 1 training steps, measure."""
    # Imported by every variant, so the libraries' own memory is in every baseline alike.
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401

    from training.adapters import LoRASection, apply_lora, apply_qlora, parameter_counts, trainable_parameters

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig.named(args.size, vocab_size=args.vocab, max_seq_len=args.seq)
    model = Transformer(cfg)
    section = LoRASection(r=args.rank, alpha=2.0 * args.rank, dropout=0.05)
    if variant == "lora":
        apply_lora(model, section)
    elif variant == "qlora":
        apply_qlora(model, section)
    params = trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=generator)
               for _ in range(args.steps + 1)]
    _trim_heap()
    setup_rss = _rss_mb()
    _reset_peak_rss()

    times, cpu_times = [], []
    for tokens in batches:
        start, cpu_start = time.perf_counter(), time.process_time()
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        grads_bytes = _tensor_bytes(p.grad for p in params)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    peak_rss = _rss_mb("VmHWM")
    trainable, total = parameter_counts(model)
    adam_bytes = _tensor_bytes(t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)
                               and t.dim() > 0)
    return {
        "part": "lora", "variant": variant, "size": args.size, "vocab": args.vocab, "batch": args.batch,
        "seq": args.seq, "rank": args.rank, "threads": args.threads, "steps": args.steps,
        "trainable": trainable, "total": total, "weights_mb": _tensor_bytes(_weight_tensors(model)) / MB,
        "grads_mb": grads_bytes / MB, "adam_mb": adam_bytes / MB, "setup_rss_mb": setup_rss,
        "peak_rss_mb": peak_rss, "step_s": statistics.median(times[1:]),
        "step_cpu_s": statistics.median(cpu_times[1:]), "loss": loss.item(),
    }


def bench_lora(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for variant in LORA_VARIANTS:
        cmd = [sys.executable, __file__, "--worker", variant, "--size", args.size, "--vocab", str(args.vocab),
               "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
               "--rank", str(args.rank), "--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{variant} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    full = rows[0]
    print(f"\n## LoRA / QLoRA vs full fine-tuning: {args.size}, vocab {args.vocab}, batch {args.batch} x "
          f"{args.seq} tokens, r={args.rank}, {args.threads} thread(s), median of {args.steps} steps\n")
    print("| variant | trainable params | weights MB | grads MB | adam MB | setup RSS MB | peak RSS MB "
          "| step s | step CPU s | CPU vs full |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['trainable']:,} ({100 * r['trainable'] / r['total']:.2f}%) "
              f"| {r['weights_mb']:.0f} | {r['grads_mb']:.0f} | {r['adam_mb']:.0f} | {r['setup_rss_mb']:.0f} "
              f"| {r['peak_rss_mb']:.0f} | {r['step_s']:.2f} | {r['step_cpu_s']:.2f} "
              f"| {r['step_cpu_s'] / full['step_cpu_s']:.2f}x |")
    return rows


# ------------------------------------------------------------------------------------ sft / dpo: ours vs TRL

SFT_VARIANTS: dict[str, str] = {
    "ours": "ours: packed rows, block-diagonal attention (sft.packing, the default)",
    "ours-unpacked": "ours: one conversation per row (sft.packing=false)",
    "trl-default": "TRL SFTTrainer defaults: one conversation per row, padded to the batch's longest",
    "trl-padding-free": "TRL padding_free=True: the batch's conversations flattened into one row",
    "trl-packing": "TRL packing=True (bfd strategy, which turns padding_free on)",
}
DPO_VARIANTS: dict[str, str] = {
    "ours": "ours: reference log-probs cached before training (dpo.py + training/reference.py)",
    "trl-default": "TRL DPOTrainer defaults: reference forward every step (precompute_ref_log_probs=False)",
}
SFT_FILES = ("alpaca_seed_tasks.jsonl", "code_alpaca_2k.json", "gpteacher_codegen_instruct.json",
             "gpteacher_roleplay_instruct.json", "gpteacher_toolformer_sim0.6.json",
             "self_instruct_user_oriented_instructions.jsonl")
HH_PAIRS = "preference/harmless-base_test.jsonl.gz"
LR = 1e-5  # both sides; speed does not depend on it


@dataclasses.dataclass(frozen=True)
class Prepared:
    """What both sides train from, made once per setting under --work."""

    root: Path
    tokenizer: Path  # tokenizer.json (+ tokenizer_config.json) with our chat tokens
    checkpoint: Path  # our weights-only checkpoint (train.init_from)
    hf: Path  # the same weights exported by training.export: TRL's model
    jsonl: Path  # the part's pool as TRL rows (messages, or prompt / chosen / rejected)
    shards: Path  # the same pool as our chat / preference shards, tokenized by training.chat


def _pool_rows(args: argparse.Namespace, part: str, template: Any) -> list[dict[str, Any]]:
    """--pool examples drawn at random (seed 0) from those that fit a row whole, so that neither side
    truncates or skips any: SFT conversations (<= seq + 1 tokens: a row's inputs and its last target)
    or HH pairs (both sequences <= seq tokens, our data.seq_len cut)."""
    from training.chat_formats import Conversation, PreferencePair, read_examples

    data = Path(args.data)
    if part == "sft":
        found = [ex for f in SFT_FILES for ex in read_examples(data / "sft" / f)]
        rows = [{"messages": ex.messages} for ex in found
                if isinstance(ex, Conversation) and len(template.render(ex.messages)[0]) <= args.seq + 1]
    else:
        pairs = [ex for ex in read_examples(data / HH_PAIRS, fmt="hh", pairs=True)
                 if isinstance(ex, PreferencePair)]
        rows = [{"prompt": ex.prompt, "chosen": [ex.chosen], "rejected": [ex.rejected]} for ex in pairs
                if max(len(template.render([*ex.prompt, side], train="last")[0])
                       for side in (ex.chosen, ex.rejected)) <= args.seq]
    if len(rows) < args.pool:
        raise ValueError(f"only {len(rows)} {part} examples fit --seq {args.seq}; lower --pool")
    pick = sorted(np.random.default_rng(0).permutation(len(rows))[:args.pool])
    return [rows[i] for i in pick]


def _prepare(args: argparse.Namespace, part: str) -> Prepared:
    """Tokenizer, a seeded checkpoint and its HF export, and the part's pool (each made once)."""
    from curation.tokenizer import train_tokenizer
    from training.chat import ChatTemplate, tokenize_chat
    from training.checkpoint import write_model_checkpoint
    from training.export import export_hf

    root = Path(args.work) / f"{args.size}-v{args.vocab}-s{args.seq}"
    pool = root / f"{part}-{args.pool}"
    p = Prepared(root, root / "tok" / "tokenizer.json", root / "base", root / "base_hf",
                 pool.with_suffix(".jsonl"), pool)
    if not p.tokenizer.is_file():
        train_tokenizer([Path(args.data) / "text" / "tinyshakespeare" / "input.txt"], args.vocab, p.tokenizer)
    template = ChatTemplate.load(p.tokenizer)
    if not (p.checkpoint / "model.pt").is_file():
        # Random weights: time and memory do not depend on what the weights know.
        torch.manual_seed(0)
        cfg = ModelConfig.named(args.size, vocab_size=args.vocab, max_seq_len=max(args.seq + 1, 256))
        state = Transformer(cfg).state_dict()
        write_model_checkpoint(p.checkpoint, state, cfg.to_dict())
        export_hf((state, cfg), p.hf, tokenizer_path=p.tokenizer, bos_id=template.bos_id,
                  eos_id=template.end_id, pad_id=template.pad_id)
    if not (p.shards / "manifest.json").is_file():
        rows = _pool_rows(args, part, template)
        p.jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
        kind = "chat" if part == "sft" else "preference"
        summary = tokenize_chat([p.jsonl], p.tokenizer, p.shards, kind=kind, max_len=args.seq + 1,
                                progress=False)
        if summary["examples"] != len(rows):
            raise RuntimeError(f"training.chat kept {summary['examples']} of {len(rows)} rows: "
                               f"{summary['dropped']}")
    return p


class Timed(Exception):
    """Raised at the first batch after the timed epochs: ends our engine's run there."""


class StepClock:
    """Wall and CPU time at the end of every optimizer step, what each step trained on and the epoch of
    the pool it belongs to; the peak memory and an optional torch.profiler table over the timed epochs.
    Epoch 0 is the warm-up; epochs 1..repeats are the timed repeats."""

    def __init__(self, repeats: int, device: str, profile: bool) -> None:
        self.repeats, self.device, self.profile = repeats, device, profile
        self.ends, self.cpu_ends = [time.perf_counter()], [time.process_time()]
        self.useful: list[int] = []  # loss units of each step: target tokens (sft) or pairs (dpo)
        self.inputs: list[int] = []  # non-pad input positions the trained model processed
        self.epochs: list[int] = []
        self.threads: set[int] = set()
        self.profiler: Any = None
        self.profile_table = ""

    def batch(self, useful: int, inputs: int, epoch: int) -> None:
        """A step's batch, before its forward; raises Timed once the timed epochs are done."""
        if self.epochs and epoch != self.epochs[-1]:
            self._epoch_starts(epoch)
        if epoch > self.repeats:
            raise Timed
        self.useful.append(int(useful))
        self.inputs.append(int(inputs))
        self.epochs.append(epoch)

    def _epoch_starts(self, epoch: int) -> None:
        if epoch == 1:  # the timed epochs start: memory peaks and the profile cover them only
            _trim_heap()
            _reset_peak_rss()
            if self.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            if self.profile:
                self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                self.profiler.__enter__()
            self.ends[-1], self.cpu_ends[-1] = time.perf_counter(), time.process_time()  # not charged
        elif epoch == self.repeats + 1 and self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            averages = self.profiler.key_averages()
            self.profile_table = averages.table(sort_by="self_cpu_time_total", row_limit=15)
            self.profiler = None

    def step_end(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())
        self.threads.add(torch.get_num_threads())

    def summary(self) -> dict[str, Any]:
        if self.epochs[-1] == self.repeats:  # TRL stops by itself after the last timed epoch
            self._epoch_starts(self.repeats + 1)
        wall = [b - a for a, b in zip(self.ends, self.ends[1:], strict=False)]
        cpu = [b - a for a, b in zip(self.cpu_ends, self.cpu_ends[1:], strict=False)]
        blocks = []
        for epoch in range(1, self.repeats + 1):
            steps = [i for i, e in enumerate(self.epochs) if e == epoch]
            if not steps or steps[-1] >= len(wall):
                raise RuntimeError(f"epoch {epoch} was not timed whole ({len(wall)} steps timed)")
            seconds, cpu_seconds = sum(wall[i] for i in steps), sum(cpu[i] for i in steps)
            useful, inputs = sum(self.useful[i] for i in steps), sum(self.inputs[i] for i in steps)
            blocks.append({"steps": len(steps), "seconds": seconds, "cpu_seconds": cpu_seconds,
                           "useful": useful, "inputs": inputs, "steps_per_s": len(steps) / seconds,
                           "useful_per_s": useful / seconds, "inputs_per_s": inputs / seconds,
                           "steps_per_cpu_s": len(steps) / cpu_seconds,
                           "useful_per_cpu_s": useful / cpu_seconds})
        out: dict[str, Any] = {"epochs": blocks, "warmup_steps": self.epochs.count(0),
                               "threads_seen": sorted(self.threads), "peak_rss_mb": _rss_mb("VmHWM"),
                               "profile": self.profile_table}
        for key in ("steps_per_s", "useful_per_s", "inputs_per_s", "steps_per_cpu_s", "useful_per_cpu_s",
                    "seconds", "cpu_seconds", "useful", "inputs", "steps"):
            values = [b[key] for b in blocks]
            out[key] = statistics.median(values)
            out[key + "_min"], out[key + "_max"] = min(values), max(values)
        if self.device == "cuda":
            out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / MB
        return out


def _mfu(args: argparse.Namespace, inputs_per_s: float) -> float | None:
    """Model FLOPs utilisation of the trained model's tokens (training/flops.py); None on CPU."""
    from training.flops import mfu, peak_flops

    if args.device != "cuda":
        return None
    model = Transformer(ModelConfig.named(args.size, vocab_size=args.vocab, max_seq_len=args.seq + 1))
    return mfu(inputs_per_s, model.flops_per_token(args.seq), peak_flops("cuda"))


def _ours_job(stage: str, variant: str, args: argparse.Namespace, p: Prepared) -> dict[str, Any]:
    """Our engine (training.engine.train) on the stage's objective, timed from its own hooks."""
    import training.objectives.dpo as dpo_module
    import training.objectives.sft as sft_module
    from training.config import config_from_dict
    from training.engine import train

    objective = dpo_module.DPOObjective if stage == "dpo" else sft_module.SFTObjective
    clock = StepClock(args.repeats, args.device, args.profile)
    next_batch, after_step = objective.next_batch, objective.after_step

    def timed_next_batch(self: Any) -> Any:
        order = self.stream.order if stage == "dpo" else self.order
        epoch = order.epoch  # the pool's epoch of the step's first example
        batch = next_batch(self)
        clock.batch(batch.weight, batch.tokens, epoch)  # weight: target tokens (sft) or pairs (dpo)
        return batch

    def timed_after_step(self: Any, step: int, model: torch.nn.Module) -> None:
        after_step(self, step, model)
        clock.step_end()

    objective.next_batch, objective.after_step = timed_next_batch, timed_after_step
    cache: list[float] = []
    if stage == "dpo":
        score_pairs = dpo_module.score_pairs

        def timed_score_pairs(*a: Any, **kw: Any) -> torch.Tensor:
            start, cpu_start = time.perf_counter(), time.process_time()
            table = score_pairs(*a, **kw)
            if args.device == "cuda":
                torch.cuda.synchronize()
            cache.extend([time.perf_counter() - start, time.process_time() - cpu_start])
            return table

        dpo_module.score_pairs = timed_score_pairs
    out_dir = p.root / "runs" / f"{stage}-{variant}"
    shutil.rmtree(out_dir, ignore_errors=True)
    section = {"dpo": {"beta": 0.1, "loss": "sigmoid"}} if stage == "dpo" else {
        "sft": {"packing": variant == "ours"}}
    cfg = config_from_dict({
        "stage": stage,
        "data": {"mix": str(p.shards), "seq_len": args.seq},
        "optim": {"lr": LR, "warmup": 0, "schedule": "constant", "weight_decay": 0.0, "grad_clip": 1.0},
        # More steps than the epochs take: the clock ends the run after the last timed epoch.
        "train": {"steps": 10**6, "batch_size": args.batch, "seed": 0, "log_every": 10**6,
                  "out_dir": str(out_dir), "init_from": str(p.checkpoint), "export_hf": False,
                  "progress": False, "precision": "auto",
                  "device": args.device},
        **section,
    })
    try:
        train(cfg)
    except Timed:
        pass
    result = clock.summary()
    if cache:
        result["cache_pass_s"], result["cache_pass_cpu_s"] = cache
    return result


def _hf_args(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    """TrainingArguments both TRL trainers get: equal to ours where it bears on speed (no activation
    checkpointing, fp32 on CPU / bf16 autocast on CUDA, batch, epochs), nothing logged or saved."""
    return {"output_dir": str(run_dir), "per_device_train_batch_size": args.batch,
            "num_train_epochs": args.repeats + 1, "learning_rate": LR, "lr_scheduler_type": "constant",
            "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0, "gradient_checkpointing": False,
            "bf16": args.device == "cuda", "use_cpu": args.device == "cpu", "logging_strategy": "no",
            "save_strategy": "no", "report_to": "none", "disable_tqdm": True, "seed": 0,
            "dataloader_num_workers": 0}


def _trl_model(p: Prepared) -> Any:
    """The HF export of our checkpoint in fp32 (bf16=True autocasts on CUDA, as our engine does)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(p.hf, dtype=torch.float32, attn_implementation="sdpa")


def _timed_trainer(base: type, clock: StepClock, units: Callable[[dict[str, Any]], int]) -> type:
    """`base` (a TRL trainer) that hands each step's batch to the clock and its step ends too."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, *a: Any, **kw: Any) -> None:
            clock.ends, clock.cpu_ends = [time.perf_counter()], [time.process_time()]

        def on_step_end(self, *a: Any, **kw: Any) -> None:
            clock.step_end()

    class TimedTrainer(base):  # type: ignore[misc,valid-type]
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, callbacks=[Clock()], **kw)
            self.steps_per_epoch = len(self.get_train_dataloader())

        def compute_loss(self, model: Any, inputs: dict[str, Any], *a: Any, **kw: Any) -> Any:
            if model.training:
                clock.batch(units(inputs), _input_tokens(inputs), len(clock.useful) // self.steps_per_epoch)
            return super().compute_loss(model, inputs, *a, **kw)

    return TimedTrainer


def _trl_settings(trainer: Any) -> dict[str, Any]:
    """What the trainer resolved, recorded with the figures."""
    a = trainer.args
    return {"activation_checkpointing": bool(a.activation_checkpointing), "optim": str(a.optim.value),
            "bf16": bool(a.bf16), "attn": trainer.model.config._attn_implementation,
            "steps_per_epoch": trainer.steps_per_epoch}


def _input_tokens(inputs: dict[str, Any]) -> int:
    if "attention_mask" in inputs:
        return int(inputs["attention_mask"].sum())
    return int(inputs["input_ids"].numel())  # padding-free: one row, no padding


def _trl_sft_job(variant: str, args: argparse.Namespace, p: Prepared) -> dict[str, Any]:
    """TRL's SFTTrainer on the very token ids and loss masks of our shards (pre-tokenized input_ids +
    assistant_masks, from which TRL builds its labels)."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from training.chat import ChatShards

    clock = StepClock(args.repeats, args.device, args.profile)
    # HF shifts the labels by one: the loss sums over labels[1:] != -100, our target count.
    trainer_class = _timed_trainer(SFTTrainer, clock, lambda b: int((b["labels"][..., 1:] != -100).sum()))
    shards = ChatShards(p.shards)
    seqs = [shards[i] for i in range(len(shards))]
    dataset = Dataset.from_dict({"input_ids": [ids.tolist() for ids, _ in seqs],
                                 "assistant_masks": [m.astype(np.int8).tolist() for _, m in seqs]})
    # Every conversation already fits seq + 1 tokens; TRL refuses a max_length it would not enforce.
    options = {"trl-default": {}, "trl-padding-free": {"padding_free": True, "max_length": None},
               "trl-packing": {"packing": True}}
    config = SFTConfig(**{"max_length": args.seq + 1, **options[variant]},
                       **_hf_args(args, p.root / "runs" / f"sft-{variant}"))
    trainer = trainer_class(model=_trl_model(p), args=config, train_dataset=dataset,
                            processing_class=AutoTokenizer.from_pretrained(p.shards))
    prepared = trainer.train_dataset
    lengths = prepared["seq_lengths"] if "seq_lengths" in prepared.column_names else None
    result = {"pool_sequences": sum(len(x) for x in lengths) if lengths is not None else len(prepared),
              "pool_targets": sum(sum(label != -100 for label in row) for row in prepared["labels"]),
              "padding_free": trainer.padding_free, **_trl_settings(trainer)}
    torch.set_num_threads(args.threads)
    trainer.train()
    return {**result, **clock.summary()}


def _trl_dpo_job(args: argparse.Namespace, p: Prepared) -> dict[str, Any]:
    """TRL's DPOTrainer on the same pairs (conversational rows rendered with our chat template, which
    training.chat wrote into tokenizer_config.json); its tokens are checked against our shards."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from training.chat import PreferenceShards

    clock = StepClock(args.repeats, args.device, args.profile)
    trainer_class = _timed_trainer(DPOTrainer, clock, lambda b: b["input_ids"].shape[0] // 2)
    rows = [json.loads(line) for line in p.jsonl.read_text().splitlines()]
    config = DPOConfig(max_length=args.seq, beta=0.1, **_hf_args(args, p.root / "runs" / "dpo-trl"))
    trainer = trainer_class(model=_trl_model(p), args=config, train_dataset=Dataset.from_list(rows),
                            processing_class=AutoTokenizer.from_pretrained(p.shards))
    if trainer.args.precompute_ref_log_probs or trainer.ref_model is None:
        raise RuntimeError("TRL's DPOTrainer is not at its default (a reference model run every step)")
    shards = PreferenceShards(p.shards)
    mismatched = 0
    for i, ex in enumerate(trainer.train_dataset):
        chosen, chosen_mask, rejected, rejected_mask = shards[i]
        mismatched += bool(ex["prompt_ids"] + ex["chosen_ids"] != chosen.tolist()
                           or ex["prompt_ids"] + ex["rejected_ids"] != rejected.tolist()
                           or len(ex["chosen_ids"]) != chosen_mask.sum()
                           or len(ex["rejected_ids"]) != rejected_mask.sum())
    torch.set_num_threads(args.threads)
    trainer.train()
    return {"pairs": len(trainer.train_dataset), "token_mismatched_pairs": mismatched,
            **_trl_settings(trainer), **clock.summary()}


def _pool_stats(p: Prepared) -> dict[str, int]:
    """Examples and loss units of the pool in our shards: what one epoch trains on, on every side."""
    from training.chat import ChatShards, PreferenceShards

    if json.loads((p.shards / "manifest.json").read_text())["kind"] == "preference":
        return {"pool_examples": len(PreferenceShards(p.shards))}
    shards = ChatShards(p.shards)
    return {"pool_examples": len(shards),
            "pool_targets": int(sum(shards[i][1][1:].sum() for i in range(len(shards))))}


def posttrain_job(job: str, args: argparse.Namespace) -> dict[str, Any]:
    """One `part:variant` in this process (a child of bench_sft / bench_dpo)."""
    torch.set_num_threads(args.threads)
    part, variant = job.split(":")
    p = _prepare(args, part)
    start = time.perf_counter()
    if variant.startswith("ours"):
        result = _ours_job(part, variant, args, p)
    elif part == "sft":
        result = _trl_sft_job(variant, args, p)
    else:
        result = _trl_dpo_job(args, p)
    result["mfu"] = _mfu(args, result["inputs_per_s"])
    return {"part": part, "variant": variant, "size": args.size, "vocab": args.vocab, "batch": args.batch,
            "seq": args.seq, "pool": args.pool, "threads": args.threads, "device": args.device,
            "repeats": args.repeats, "wall_s": time.perf_counter() - start, **_pool_stats(p), **result}


def _run_jobs(part: str, variants: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for variant in variants:
        cmd = [sys.executable, __file__, "--job", f"{part}:{variant}", "--size", args.size,
               "--vocab", str(args.vocab), "--batch", str(args.batch), "--seq", str(args.seq),
               "--pool", str(args.pool), "--repeats", str(args.repeats), "--threads", str(args.threads),
               "--device", args.device, "--work", args.work, "--data", args.data,
               *(["--profile"] if args.profile else [])]
        load = os.getloadavg()[0]
        print(f"{part}: {variant} (load {load:.1f}) ...", file=sys.stderr, flush=True)
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{part} {variant} failed:\n{done.stderr[-4000:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        row["load_before"], row["load_after"] = load, os.getloadavg()[0]
        rows.append(row)
    return rows


def _spread(r: dict[str, Any], key: str, fmt: str = ",.0f") -> str:
    return f"{r[key]:{fmt}} ({r[key + '_min']:{fmt}}-{r[key + '_max']:{fmt}})"


def _settings_line(args: argparse.Namespace, what: str) -> str:
    return (f"{args.size}, vocab {args.vocab}, {what}, {args.device} "
            f"({'fp32' if args.device == 'cpu' else 'bf16 autocast'}), {args.threads} thread(s) each side; "
            f"median (min-max) of {args.repeats} timed epochs over the pool after one warm-up epoch")


def _print_profiles(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        if r.get("profile"):
            print(f"\n### torch.profiler, {r['part']} {r['variant']} (timed epochs, self CPU time)\n")
            print(r["profile"])


def print_sft(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    by = {r["variant"]: r for r in rows}
    trl = [r for r in rows if r["variant"].startswith("trl")]
    ours = rows[0]
    print(f"\n## SFT: ours vs TRL SFTTrainer, {ours['pool_examples']} conversations with "
          f"{ours['pool_targets']:,} loss-bearing tokens per epoch on every side\n\n"
          f"{_settings_line(args, f'batch {args.batch} rows x {args.seq} tokens')}\n")
    print("| variant | steps / epoch | useful tokens/s | useful tokens per CPU-s | useful / input tokens "
          "| peak RSS MB | MFU | vs TRL default (wall, CPU) | vs TRL best (wall, CPU) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    best = {k: max(r[k] for r in trl) for k in ("useful_per_s", "useful_per_cpu_s")}
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (CPU)"
        ratios = [f"{r[k] / base[k]:.2f}x" for base in (by["trl-default"], best)
                  for k in ("useful_per_s", "useful_per_cpu_s")]
        print(f"| {SFT_VARIANTS[r['variant']]} | {r['steps']:.0f} | {_spread(r, 'useful_per_s')} "
              f"| {_spread(r, 'useful_per_cpu_s')} | {r['useful'] / r['inputs']:.2f} "
              f"| {r['peak_rss_mb']:.0f} | {mfu} | {ratios[0]}, {ratios[1]} | {ratios[2]}, {ratios[3]} |")
    print(f"\nload average {rows[0]['load_before']:.1f} at the start, {rows[-1]['load_after']:.1f} "
          "at the end")
    _print_profiles(rows)


def bench_sft(args: argparse.Namespace) -> list[dict[str, Any]]:
    """SFT useful (loss-bearing) tokens/s: ours vs TRL SFTTrainer at its defaults and its packings."""
    _prepare(args, "sft")
    rows = _run_jobs("sft", list(SFT_VARIANTS), args)
    ours = rows[0]
    for r in rows[2:]:  # TRL must have prepared exactly our conversations and loss-bearing tokens
        if (r["pool_sequences"], r["pool_targets"]) != (ours["pool_examples"], ours["pool_targets"]):
            raise RuntimeError(f"{r['variant']} prepared {r['pool_sequences']} sequences with "
                               f"{r['pool_targets']} targets; ours {ours['pool_examples']} with "
                               f"{ours['pool_targets']}")
    print_sft(rows, args)
    return rows


def print_dpo(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    ours, trl = rows
    # A one-epoch run over the pool pays ours' cache pass once.
    steps = trl["steps_per_epoch"]
    for key, cache in (("steps_per_s", "cache_pass_s"), ("steps_per_cpu_s", "cache_pass_cpu_s")):
        ours[key + "_with_cache"] = steps / (steps / ours[key] + ours[cache])
        trl[key + "_with_cache"] = trl[key]
    settings = _settings_line(args, f"batch {args.batch} pairs, rows up to {args.seq} tokens")
    print(f"\n## DPO: ours vs TRL DPOTrainer, {trl['pairs']} HH pairs ({steps} steps) per epoch, the same "
          f"tokens on both sides\n\n{settings}\n")
    print("| variant | steps/s | steps per CPU-s | reference cache pass s (CPU s) | peak RSS MB "
          "| vs TRL (wall, CPU) | vs TRL incl. the cache pass, one epoch (wall, CPU) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        cache = f"{r['cache_pass_s']:.1f} ({r['cache_pass_cpu_s']:.1f})" if "cache_pass_s" in r else "-"
        print(f"| {DPO_VARIANTS[r['variant']]} | {_spread(r, 'steps_per_s', '.3f')} "
              f"| {_spread(r, 'steps_per_cpu_s', '.3f')} | {cache} | {r['peak_rss_mb']:.0f} "
              f"| {r['steps_per_s'] / trl['steps_per_s']:.2f}x, "
              f"{r['steps_per_cpu_s'] / trl['steps_per_cpu_s']:.2f}x "
              f"| {r['steps_per_s_with_cache'] / trl['steps_per_s']:.2f}x, "
              f"{r['steps_per_cpu_s_with_cache'] / trl['steps_per_cpu_s']:.2f}x |")
    print(f"\nload average {ours['load_before']:.1f} at the start, {trl['load_after']:.1f} at the end")
    _print_profiles(rows)


def bench_dpo(args: argparse.Namespace) -> list[dict[str, Any]]:
    """DPO steps/s: ours with cached reference log-probs vs TRL DPOTrainer at its defaults."""
    if args.pool % args.batch:
        raise ValueError(f"--pool {args.pool} must be a multiple of --batch {args.batch} (whole steps per "
                         "epoch)")
    _prepare(args, "dpo")
    rows = _run_jobs("dpo", list(DPO_VARIANTS), args)
    if rows[1]["token_mismatched_pairs"]:
        raise RuntimeError(f"TRL tokenized {rows[1]['token_mismatched_pairs']} pairs differently from our "
                           "shards")
    print_dpo(rows, args)
    return rows


# name -> part; `--part all` runs them in this order.
PARTS: dict[str, Callable[[argparse.Namespace], list[dict[str, Any]]]] = {
    "lora": bench_lora, "sft": bench_sft, "dpo": bench_dpo}


# Per-part defaults of the shared flags (a flag given on the command line applies to every part run).
PART_DEFAULTS: dict[str, dict[str, Any]] = {
    "lora": {"size": "125m", "vocab": 50304, "batch": 2, "seq": 128, "steps": 4},
    "sft": {"size": "10m", "vocab": 8192, "batch": 4, "seq": 256, "pool": 32},
    "dpo": {"size": "10m", "vocab": 8192, "batch": 4, "seq": 256, "pool": 16},
}


def _part_args(args: argparse.Namespace, part: str) -> argparse.Namespace:
    filled = argparse.Namespace(**vars(args))
    for key, value in PART_DEFAULTS[part].items():
        if getattr(filled, key) is None:
            setattr(filled, key, value)
    return filled


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=[*PARTS, "all"], default="all")
    parser.add_argument("--size", default=None, help="named model size (training/model.py); "
                        "lora 125m, else 10m")
    parser.add_argument("--vocab", type=int, default=None, help="lora 50304, else 8192 (a tokenizer "
                        "is trained)")
    parser.add_argument("--batch", type=int, default=None, help="rows (lora, sft) or pairs (dpo) per step")
    parser.add_argument("--seq", type=int, default=None, help="tokens per row")
    parser.add_argument("--steps", type=int, default=None, help="lora: timed steps after one warm-up step")
    parser.add_argument("--pool", type=int, default=None, help="sft: conversations (32), dpo: pairs (16) "
                        "trained each epoch")
    parser.add_argument("--repeats", type=int, default=3, help="sft/dpo: timed epochs after one warm-up "
                        "epoch")
    parser.add_argument("--rank", type=int, default=16, help="LoRA r (alpha = 2r)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, equal on every side")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="sft/dpo")
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"),
                        help="the shared data folder (sft/, preference/, text/)")
    parser.add_argument("--work", default=None, help="sft/dpo: where prepared data and runs go (default: a "
                        "temporary folder, removed at the end)")
    parser.add_argument("--profile", action="store_true", help="sft/dpo: torch.profiler table of each side")
    parser.add_argument("--out", default=None, help="write every row as JSON here")
    parser.add_argument("--worker", choices=LORA_VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)  # "sft:ours" etc.: a child of bench_sft / bench_dpo
    args = parser.parse_args(argv)
    if args.worker:  # a child of bench_lora: one variant, one JSON line
        print(json.dumps(lora_worker(args.worker, _part_args(args, "lora"))))
        return 0
    if args.job:
        print(json.dumps(posttrain_job(args.job, _part_args(args, args.job.split(":")[0]))))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="posttrain-") as tmp:
        args.work = args.work or tmp
        for name in PARTS if args.part == "all" else [args.part]:
            rows += PARTS[name](_part_args(args, name))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
