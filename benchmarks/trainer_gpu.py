"""GPU training throughput and MFU of our Transformer at ~125M and ~350M parameters, bf16, compiled.

One step = forward + cross-entropy (float32 logits) + backward + fused AdamW, under bf16 autocast
with float32 master weights (what `refinery train` does on GPU), `torch.compile` on, TF32 allowed.
MFU = tokens/s × flops_per_token(seq) / peak (PaLM appendix B; peak from training/flops.py, H100/H200
dense bf16 = 989 TFLOP/s). Batches are random tokens: throughput does not depend on the data.

    .venv/bin/python benchmarks/trainer_gpu.py --out results/trainer_gpu.json
    .venv/bin/python benchmarks/trainer_gpu.py --sizes 125m --batch 32 --seq 2048

Exits with status 2 and a message on a machine without CUDA (`--allow-cpu` runs the same code on CPU,
for a smoke test of the script with a tiny size).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.flops import mfu, peak_flops  # noqa: E402
from training.model import ModelConfig, Transformer  # noqa: E402

# Micro-batch (sequences of --seq tokens) per size that fits an 80 GB H100 with room to spare.
DEFAULT_BATCH = {"1m": 2, "10m": 8, "25m": 16, "60m": 16, "125m": 16, "350m": 8, "1b": 4}


def bench_size(size: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    cfg = ModelConfig.named(size, args.vocab, max_seq_len=args.seq)
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(cfg)
    batch = args.batch or DEFAULT_BATCH.get(size, 8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    amp_dtype = torch.bfloat16

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=amp_dtype):
            logits = model(x)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    fn = torch.compile(loss_fn) if args.compile else loss_fn
    gen = torch.Generator(device=device).manual_seed(0)
    data = torch.randint(0, cfg.vocab_size, (4, batch, args.seq + 1), device=device, generator=gen)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    times: list[float] = []
    t_compile = time.perf_counter()
    for step in range(args.warmup + args.steps):
        chunk = data[step % data.shape[0]]
        x, y = chunk[:, :-1], chunk[:, 1:]
        sync()
        t0 = time.perf_counter()
        loss = fn(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if step == args.warmup - 1:
            t_compile = time.perf_counter() - t_compile
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    final_loss = loss.item()

    tokens = batch * args.seq
    step_s = statistics.median(times)
    tokens_per_s = tokens / step_s
    fpt = model.flops_per_token(args.seq)
    peak = peak_flops(device) if device.type == "cuda" else None
    result = {
        "size": size,
        "params": model.num_params(),
        "config": cfg.to_dict(),
        "batch": batch,
        "seq": args.seq,
        "tokens_per_step": tokens,
        "median_step_s": step_s,
        "tokens_per_s": tokens_per_s,
        "flops_per_token": fpt,
        "achieved_tflops": tokens_per_s * fpt / 1e12,
        "peak_tflops": peak / 1e12 if peak else None,
        "mfu": mfu(tokens_per_s, fpt, peak),
        "warmup_s": t_compile,
        "final_loss": final_loss,
        "max_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
    }
    return result


def run_size(size: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """One size, then free its compiled graphs and memory before the next."""
    result = bench_size(size, args, device)
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="125m,350m", help="comma-separated ModelConfig.named sizes")
    parser.add_argument("--vocab", type=int, default=50304, help="GPT-2's 50257 padded to a multiple of 64")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=None, help="micro-batch; default per size")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps (compilation, autotuning)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--allow-cpu", action="store_true", help="smoke-test on CPU (no MFU)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1")

    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        device_name = torch.cuda.get_device_name(device)
    elif args.allow_cpu:
        device, device_name = torch.device("cpu"), "cpu"
    else:
        print("benchmarks/trainer_gpu.py needs a CUDA GPU (none visible to torch "
              f"{torch.__version__}); run benchmarks/trainer.py for the CPU benchmark.", file=sys.stderr)
        sys.exit(2)

    results = []
    print(f"device: {device_name}, peak bf16: {peak_flops(device) if device.type == 'cuda' else None}, "
          f"torch {torch.__version__}, compile={args.compile}")
    print(f"{'size':<6}{'params':>10}{'batch':>7}{'seq':>6}{'step (s)':>10}{'tokens/s':>12}{'TFLOP/s':>9}"
          f"{'MFU':>7}{'mem GB':>8}")
    for size in [s.strip() for s in args.sizes.split(",") if s.strip()]:
        r = run_size(size, args, device)
        results.append(r)
        mfu_text = f"{r['mfu'] * 100:.1f}%" if r["mfu"] is not None else "-"
        mem_text = f"{r['max_memory_gb']:.1f}" if r["max_memory_gb"] is not None else "-"
        print(f"{size:<6}{r['params'] / 1e6:>9.1f}M{r['batch']:>7}{r['seq']:>6}{r['median_step_s']:>10.3f}"
              f"{r['tokens_per_s']:>12.0f}{r['achieved_tflops']:>9.1f}{mfu_text:>7}{mem_text:>8}", flush=True)

    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"benchmark": "trainer_step_gpu", "device": device_name, "torch": torch.__version__,
                   "compile": args.compile, "results": results}
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
