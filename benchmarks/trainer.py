"""Training-step throughput: our Transformer vs transformers' LlamaForCausalLM, same shapes, same batches.

One step = forward + cross-entropy (float32 logits) + backward + AdamW step, on CPU by default. Both
models start from the same weights (ours exported into HF's layout) and see the same batches; variants
run interleaved, one step each per round, so load on a shared machine hits them alike. Both sides use
SDPA attention, the same dtype, the same AdamW settings and the same thread count; "compiled" wraps
each side in `torch.compile` (HF's forward includes its loss, so our compiled step includes ours).

    .venv/bin/python benchmarks/trainer.py --out results/trainer_cpu.json
    .venv/bin/python benchmarks/trainer.py --compile none --steps 10  # eager only, quicker

Prints a table (median tokens/s per variant, ratio to HF eager) and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.export import export_hf  # noqa: E402
from training.model import ModelConfig, Transformer  # noqa: E402

StepFn = Callable[[torch.Tensor, torch.Tensor], float]


def _train_step(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                opt: torch.optim.Optimizer) -> StepFn:
    """forward + loss + backward + AdamW step, the same for both sides."""

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        loss = loss_fn(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def make_ours(model: Transformer, opt: torch.optim.Optimizer, compiled: bool) -> StepFn:
    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = model(x)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    return _train_step(torch.compile(loss_fn) if compiled else loss_fn, opt)


def make_hf(model: torch.nn.Module, opt: torch.optim.Optimizer, compiled: bool) -> StepFn:
    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # shift_labels=y: HF computes the loss on exactly our (input, next-token) pairs.
        return model(input_ids=x, labels=y, shift_labels=y, use_cache=False).loss

    return _train_step(torch.compile(loss_fn) if compiled else loss_fn, opt)


def build(args: argparse.Namespace, cfg: ModelConfig, tmp: Path) -> dict[str, StepFn]:
    from transformers import LlamaForCausalLM

    torch.manual_seed(args.seed)
    reference = Transformer(cfg)
    export_hf(reference, tmp)
    dtype = getattr(torch, args.dtype)

    def adamw(params: Any) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=args.fused_adamw)

    variants: dict[str, StepFn] = {}
    modes = {"none": [False], "ours": [False, True], "both": [False, True]}[args.compile]
    for compiled in modes:
        ours = Transformer(cfg).to(dtype)
        ours.load_state_dict(reference.state_dict())
        variants["ours" + ("+compile" if compiled else "")] = make_ours(ours, adamw(ours.parameters()), compiled)
        if compiled and args.compile == "ours":
            continue
        hf = LlamaForCausalLM.from_pretrained(tmp, attn_implementation="sdpa", dtype=dtype)
        hf.train()
        with torch.no_grad():  # own memory, like ours (not pages of the loaded file); keeps the tie
            for param in hf.parameters():
                param.data = param.data.clone()
        variants["hf" + ("+compile" if compiled else "")] = make_hf(hf, adamw(hf.parameters()), compiled)
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="10m", help="ModelConfig.named size")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant (compilation)")
    parser.add_argument("--compile", choices=["none", "ours", "both"], default="both")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--fused-adamw", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = ModelConfig.named(args.size, args.vocab, max_seq_len=max(args.seq, 256))
    gen = torch.Generator().manual_seed(args.seed)
    batches = [
        torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen)
        for _ in range(args.warmup + args.steps)
    ]
    tokens = args.batch * args.seq
    with tempfile.TemporaryDirectory() as tmp:
        variants = build(args, cfg, Path(tmp))
        first_losses: dict[str, float] = {}
        times: dict[str, list[float]] = {name: [] for name in variants}
        names = list(variants)
        for i, batch in enumerate(batches):
            x, y = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
            # Rotate who goes first each round: no variant always follows another's cache/allocator state.
            order = names[i % len(names):] + names[: i % len(names)]
            for name in order:
                step = variants[name]
                t0 = time.perf_counter()
                loss = step(x, y)
                dt = time.perf_counter() - t0
                if i == 0:
                    first_losses[name] = loss
                if i >= args.warmup:
                    times[name].append(dt)
            print(f"round {i + 1}/{len(batches)}", file=sys.stderr, flush=True)

    n_params = Transformer(cfg).num_params()
    rows = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        q1, _, q3 = statistics.quantiles(ts, n=4) if len(ts) > 1 else (med, med, med)
        rows[name] = {"median_step_s": med, "q1_step_s": q1, "q3_step_s": q3, "tokens_per_s": tokens / med,
                      "first_loss": first_losses[name], "step_s": ts}
    base = rows["hf"]["tokens_per_s"]
    best_hf = max(v["tokens_per_s"] for k, v in rows.items() if k.startswith("hf"))
    for row in rows.values():
        row["vs_hf_eager"] = row["tokens_per_s"] / base
        row["vs_best_hf"] = row["tokens_per_s"] / best_hf

    print(f"\n{args.size} model: {n_params / 1e6:.2f}M params, batch {args.batch}x{args.seq}, {args.dtype}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'variant':<16}{'step (s)':>10}{'IQR (s)':>16}{'tokens/s':>10}{'vs HF eager':>13}{'vs best HF':>12}"
          f"{'loss@1':>10}")
    for name, row in rows.items():
        iqr = f"{row['q1_step_s']:.2f}-{row['q3_step_s']:.2f}"
        print(f"{name:<16}{row['median_step_s']:>10.3f}{iqr:>16}{row['tokens_per_s']:>10.0f}"
              f"{row['vs_hf_eager']:>12.2f}x{row['vs_best_hf']:>11.2f}x{row['first_loss']:>10.4f}")

    if args.out:
        import transformers

        result = {
            "benchmark": "trainer_step_cpu",
            "config": cfg.to_dict(),
            "params": n_params,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "tokens_per_step": tokens,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "machine": platform.processor() or platform.machine(),
            "results": rows,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
