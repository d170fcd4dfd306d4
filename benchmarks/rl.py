"""RL throughput, side by side: rollout tokens/s against Hugging Face `generate`, sandbox executions/s,
GRPO optimizer steps/s against TRL's `GRPOTrainer`.

Rollouts: one random model of a named size is exported to a Hugging Face directory; our
`LocalRollout` runs on `import_hf` of that directory and `LlamaForCausalLM.generate` on the same
files, on the same ragged batch (left-padded for HF), the same sampling (temperature 1, no top-k,
no top-p) and the same number of new tokens (no stop token, so every row runs to the end). HF
generates `n` samples per prompt with `num_return_sequences` and its per-token log-probs are taken
from `output_logits`, so both sides return tokens and log-probs. Two scenarios: fixed length (no
stop id: every row runs to `--new-tokens`) and variable length (rows end at any of a set of
random ids, mean length `--mean-tokens`, as a real policy's completions end at different lengths;
HF keeps decoding finished rows as padding until the last ends, ours drops them). Tokens/s counts
real tokens only. Sides alternate round by round so load on a shared machine hits both.

Sandbox: trivial programs and, when ../shared/data is there, the HumanEval canonical solutions with
their tests, through `Sandbox.run_many` (one worker per core).

    .venv/bin/python benchmarks/rl.py --out results/rl_cpu.json
    .venv/bin/python benchmarks/rl.py --part rollout --size 1m --new-tokens 64 --rounds 2   # quick
    .venv/bin/python benchmarks/rl.py --part grpo --size 1m --new-tokens 64 --rounds 1      # GRPO vs TRL

GRPO: see `bench_grpo` (same model, tokenizer, prompts, verifier, G, lengths and settings on both sides).

Prints one line per figure and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.export import export_hf, import_hf  # noqa: E402
from training.model import ModelConfig, Transformer  # noqa: E402
from training.rollout import LocalRollout, SamplingParams  # noqa: E402

HUMANEVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "verifiable" / "humaneval" / "HumanEval.jsonl.gz"


def _prompts(args: argparse.Namespace, vocab: int) -> list[list[int]]:
    rng = random.Random(args.seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(args.min_prompt, args.max_prompt))]
            for _ in range(args.prompts)]


def _hf_real_tokens(new: torch.Tensor, stop_ids: list[int]) -> list[int]:
    """Tokens each row really generated: up to and including its first stop id (HF pads after it)."""
    if not stop_ids:
        return [new.shape[1]] * new.shape[0]
    hit = torch.isin(new, torch.tensor(stop_ids))
    first = torch.where(hit.any(1), hit.int().argmax(1) + 1, torch.full((new.shape[0],), new.shape[1]))
    return first.tolist()


def bench_rollout(args: argparse.Namespace, stop_ids: list[int]) -> dict[str, Any]:
    """One scenario: fixed length (no stop ids: every row runs `new_tokens`) or variable length (rows
    end at any of `stop_ids`, as completions of a real policy do)."""
    from transformers import LlamaForCausalLM

    cfg = ModelConfig.named(args.size, vocab_size=args.vocab, max_seq_len=args.max_prompt + args.new_tokens)
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(Transformer(cfg), Path(tmp) / "hf")
        ours = LocalRollout(import_hf(Path(tmp) / "hf").eval(), max_batch=args.prompts * args.n)
        hf = LlamaForCausalLM.from_pretrained(Path(tmp) / "hf", attn_implementation="sdpa").eval()
    prompts = _prompts(args, args.vocab)
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        attn[i, width - len(p):] = 1
    params = SamplingParams(n=args.n, max_new_tokens=args.new_tokens, temperature=1.0, seed=args.seed,
                            stop_token_ids=tuple(stop_ids))

    def run_ours() -> int:
        return sum(len(r.token_ids) for r in ours.generate(prompts, params))

    @torch.no_grad()
    def run_hf() -> int:
        # Per-token log-probs as ours returns them: log softmax of the raw logits at each sampled token.
        out = hf.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                          max_new_tokens=args.new_tokens, num_return_sequences=args.n, pad_token_id=0,
                          eos_token_id=stop_ids or None, output_logits=True, return_dict_in_generate=True)
        new = out.sequences[:, width:]
        logits = torch.stack(out.logits, dim=1).float()
        logps = logits.log_softmax(-1).gather(-1, new[..., None]).squeeze(-1)
        assert logps.shape == new.shape
        return sum(_hf_real_tokens(new, stop_ids))

    times: dict[str, list[float]] = {"ours": [], "hf": []}
    made: dict[str, list[int]] = {"ours": [], "hf": []}
    for _name, fn in (("ours", run_ours), ("hf", run_hf)):  # warm-up
        fn()
    for _ in range(args.rounds):
        for name, fn in (("ours", run_ours), ("hf", run_hf)):
            start = time.perf_counter()
            made[name].append(fn())
            times[name].append(time.perf_counter() - start)
    if not stop_ids and set(made["ours"] + made["hf"]) != {len(prompts) * args.n * args.new_tokens}:
        raise RuntimeError(f"fixed-length runs made {made} tokens, expected {len(prompts) * args.n * args.new_tokens}")
    rate = {k: sum(made[k]) / sum(times[k]) for k in times}
    # Paired per round (the two sides ran back to back), the median ratio resists load swings.
    ratios = [(mo / to) / (mh / th) for mo, to, mh, th in zip(made["ours"], times["ours"], made["hf"], times["hf"],
                                                             strict=True)]
    return {"scenario": "variable length" if stop_ids else "fixed length", "stop_ids": len(stop_ids),
            "size": args.size, "params": Transformer(cfg).num_params(), "prompts": len(prompts), "n": args.n,
            "prompt_tokens": [args.min_prompt, args.max_prompt], "max_new_tokens": args.new_tokens,
            "tokens": made, "seconds": times, "ours_tokens_per_s": rate["ours"], "hf_tokens_per_s": rate["hf"],
            "speedup": statistics.median(ratios), "round_speedups": ratios}


def bench_sandbox(args: argparse.Namespace) -> dict[str, Any]:
    from training.rewards.code import CodeVerifier, read_tasks
    from training.rewards.sandbox import ExecJob, Sandbox

    out: dict[str, Any] = {}
    with Sandbox(workers=args.workers) as sandbox:
        out["isolation"], out["workers"] = sandbox.isolation, sandbox.workers
        jobs = [ExecJob({"main.py": f"print({i} * {i})"}) for i in range(args.programs)]
        sandbox.run_many(jobs[: sandbox.workers])  # warm the page cache
        start = time.perf_counter()
        results = sandbox.run_many(jobs)
        elapsed = time.perf_counter() - start
        if not all(r.ok for r in results):
            raise RuntimeError(f"trivial programs failed: {[r.reason() for r in results if not r.ok][:3]}")
        out["trivial_execs_per_s"] = len(jobs) / elapsed
        if HUMANEVAL.is_file():
            tasks = read_tasks(HUMANEVAL)
            verifier = CodeVerifier(sandbox)
            start = time.perf_counter()
            scores = verifier.score_batch([t.meta["canonical_solution"] for t in tasks], [t.ground_truth for t in tasks])
            elapsed = time.perf_counter() - start
            out["humaneval_execs_per_s"] = len(tasks) / elapsed
            out["humaneval_canonical_passed"] = f"{sum(s.score for s in scores):g}/{len(tasks)}"
    return out


def bench_grpo(args: argparse.Namespace) -> dict[str, Any]:
    """GRPO optimizer steps/s: the `grpo` stage on our engine against TRL's `GRPOTrainer`.

    Same model (one random init of `--size`, exported to HF; TRL trains the export), same tokenizer,
    same prompts (synthetic arithmetic, plain text), same GSM8K verifier as the reward, same group size
    G = `--n`, same completion length (`--new-tokens`; a random model seldom ends early, so both sides
    run about that long), same settings otherwise: temperature 1, token-level loss ("dapo"), no KL
    (beta 0, TRL's default: no reference model), no activation checkpointing (on by default in TRL's
    GRPOConfig; off here as on ours), one optimizer step per generation batch of
    `--grpo-prompts` x G completions in micro-batches of `--grpo-batch`, lr 1e-5, fp32. Steps are timed
    from the end of the first (warm-up) step to the end of the last; sides alternate round by round.
    """
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from curation.tokenizer import train_tokenizer
    from training.config import load_config
    from training.engine import train
    from training.objectives.grpo import GRPOObjective
    from training.rewards.gsm8k import GSM8KVerifier
    from training.rl_synthetic import PLAIN_TEMPLATE, write_task_files

    warm, steps = 1, args.grpo_steps
    prompts_per_step, g, micro = args.grpo_prompts, args.n, args.grpo_batch
    rows = prompts_per_step * g
    if rows % micro:
        raise SystemExit(f"--grpo-prompts x --n = {rows} must be a multiple of --grpo-batch {micro}")
    tmp = Path(tempfile.mkdtemp(prefix="bench_grpo_"))
    paths = write_task_files(tmp / "arith", train=(warm + steps) * prompts_per_step * args.rounds, test=1,
                             max_value=99)
    text = Path(__file__).resolve().parents[2] / "shared" / "data" / "text" / "tinyshakespeare" / "input.txt"
    tok_path = train_tokenizer([text if text.is_file() else paths["pretrain"]], args.vocab, tmp / "tokenizer.json",
                               max_chars=1_000_000)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tok_path), bos_token="<|bos|>", eos_token="<|eos|>",
                                  pad_token="<|pad|>")
    vocab = len(tok)
    cfg = ModelConfig.named(args.size, vocab_size=vocab, max_seq_len=256 + args.new_tokens)
    torch.manual_seed(args.seed)
    model = Transformer(cfg)
    export_hf(model, tmp / "hf", tokenizer_path=tok_path, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
              bos_id=tok.bos_token_id)
    from training.checkpoint import write_model_checkpoint

    write_model_checkpoint(tmp / "init", model.state_dict(), cfg.to_dict())
    verifier = GSM8KVerifier()
    tasks = [json.loads(line) for line in paths["tasks"].read_text().splitlines()]
    truth = {PLAIN_TEMPLATE.format(question=t["question"]): t["answer"].split("####")[-1].strip() for t in tasks}

    def run_ours(round_: int) -> tuple[float, float]:
        times: list[float] = []
        lengths: list[float] = []
        original = GRPOObjective.after_step
        GRPOObjective.after_step = lambda self, step, m: times.append(time.perf_counter())  # type: ignore
        out = tmp / f"ours{round_}"
        try:
            train(load_config(None, [
                "stage=grpo", f"data.mix={paths['tasks']}", "data.seq_len=256", f"train.init_from={tmp / 'init'}",
                f"train.out_dir={out}", f"train.steps={warm + steps}", f"train.batch_size={micro}",
                f"optim.grad_accum={rows // micro}", "optim.lr=1e-5", "optim.warmup=0", "optim.schedule=constant",
                "optim.weight_decay=0.0", "train.progress=false", "train.checkpoint_every=0", "train.export_hf=false",
                "train.precision=fp32", f"train.seed={round_}", "train.log_every=1",
                "grpo.prompt_format=plain", "grpo.plain_template=Question: {prompt}\nAnswer:", "grpo.instruction=",
                f"grpo.tokenizer={tok_path}", f"grpo.prompts_per_rollout={prompts_per_step}",
                f"grpo.samples_per_prompt={g}", f"grpo.max_new_tokens={args.new_tokens}", "grpo.loss_type=token",
                "grpo.beta=0.0", f"grpo.rollout_batch={rows}"], stage="grpo"))
        finally:
            GRPOObjective.after_step = original  # type: ignore[method-assign]
        for line in (out / "metrics.jsonl").read_text().splitlines():
            lengths.append(json.loads(line)["completion_len"])
        return steps / (times[-1] - times[warm - 1]), sum(lengths) / len(lengths)

    def run_trl(round_: int) -> tuple[float, float]:
        from datasets import Dataset

        times: list[float] = []
        lengths: list[float] = []

        class Clock(TrainerCallback):  # type: ignore[misc]
            def on_step_end(self, *a: Any, **k: Any) -> None:
                times.append(time.perf_counter())

        def reward(prompts: list[str], completions: list[str], completion_ids: list[list[int]], **kw: Any
                   ) -> list[float]:
            lengths.extend(len(ids) for ids in completion_ids)
            return [verifier(c, truth[p]).score for p, c in zip(prompts, completions, strict=True)]

        data = Dataset.from_list([{"prompt": p} for p in truth])
        config = GRPOConfig(
            output_dir=str(tmp / f"trl{round_}"), per_device_train_batch_size=micro,
            gradient_accumulation_steps=rows // micro, num_generations=g, max_completion_length=args.new_tokens,
            temperature=1.0, top_p=1.0, top_k=0, beta=0.0, loss_type="dapo", num_iterations=1, learning_rate=1e-5,
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_steps=warm + steps,
            logging_steps=10**6, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
            seed=round_, disable_tqdm=True, dataloader_num_workers=0,
            gradient_checkpointing=False)  # TRL's default recomputes activations; ours does not either
        trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(tmp / "hf"), reward_funcs=reward,
                              args=config, train_dataset=data, processing_class=tok, callbacks=[Clock()])
        trainer.train()
        return steps / (times[-1] - times[warm - 1]), sum(lengths) / max(len(lengths), 1)

    rates: dict[str, list[float]] = {"ours": [], "trl": []}
    lengths: dict[str, list[float]] = {"ours": [], "trl": []}
    for round_ in range(args.rounds):
        for name, fn in (("ours", run_ours), ("trl", run_trl)):
            rate, length = fn(round_)
            rates[name].append(rate)
            lengths[name].append(length)
    best = {k: max(v) for k, v in rates.items()}
    return {"size": args.size, "params": model.num_params(), "vocab": vocab, "prompts_per_step": prompts_per_step,
            "group_size": g, "completions_per_step": rows, "micro_batch": micro, "max_new_tokens": args.new_tokens,
            "timed_steps": steps, "rounds": args.rounds, "steps_per_s": rates, "mean_completion_tokens": lengths,
            "ours_steps_per_s": best["ours"], "trl_steps_per_s": best["trl"], "speedup": best["ours"] / best["trl"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["all", "rollout", "sandbox", "grpo"], default="all")
    parser.add_argument("--size", default="10m", help="ModelConfig.named size")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--n", type=int, default=8, help="samples per prompt (TRL GRPOTrainer's default: 8)")
    parser.add_argument("--min-prompt", type=int, default=32)
    parser.add_argument("--max-prompt", type=int, default=96)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--mean-tokens", type=int, default=32,
                        help="mean completion length of the variable-length scenario (0: skip it)")
    parser.add_argument("--rounds", type=int, default=3, help="timed calls per side")
    parser.add_argument("--programs", type=int, default=64, help="trivial sandbox programs")
    parser.add_argument("--workers", type=int, default=None, help="sandbox workers (default: cores)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--grpo-prompts", type=int, default=4, help="grpo: prompts per optimizer step")
    parser.add_argument("--grpo-batch", type=int, default=8, help="grpo: completions per micro-batch")
    parser.add_argument("--grpo-steps", type=int, default=3, help="grpo: timed optimizer steps (after 1 warm-up)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    report: dict[str, Any] = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                          "torch_threads": torch.get_num_threads(), "torch": torch.__version__}}
    if args.part in ("all", "rollout"):
        # Variable length: under a near-uniform random model each step hits one of k stop ids with
        # probability ~k / vocab, so completion lengths are geometric with mean ~vocab / k, capped
        # at --new-tokens: the long tail of RL completions in miniature.
        report["rollout"] = [bench_rollout(args, [])]
        if args.mean_tokens:
            k = max(1, round(args.vocab / args.mean_tokens))
            stops = sorted(random.Random(args.seed + 1).sample(range(3, args.vocab), k))
            report["rollout"].append(bench_rollout(args, stops))
        for r in report["rollout"]:
            print(f"rollout {r['size']} ({r['params'] / 1e6:.1f}M params), {r['prompts']} prompts x n={r['n']}, "
                  f"<= {r['max_new_tokens']} new tokens, {r['scenario']}: ours {r['ours_tokens_per_s']:,.0f} "
                  f"tok/s, HF generate {r['hf_tokens_per_s']:,.0f} tok/s, {r['speedup']:.2f}x")
    if args.part in ("all", "sandbox"):
        s = report["sandbox"] = bench_sandbox(args)
        line = f"sandbox ({s['isolation']}, {s['workers']} workers): {s['trivial_execs_per_s']:.1f} trivial execs/s"
        if "humaneval_execs_per_s" in s:
            line += (f", HumanEval {s['humaneval_execs_per_s']:.1f} execs/s "
                     f"(canonical passed {s['humaneval_canonical_passed']})")
        print(line)
    if args.part in ("all", "grpo"):
        gr = report["grpo"] = bench_grpo(args)
        print(f"grpo {gr['size']} ({gr['params'] / 1e6:.1f}M params), {gr['prompts_per_step']} prompts x G={gr['group_size']}, "
              f"<= {gr['max_new_tokens']} new tokens, micro-batch {gr['micro_batch']}: ours {gr['ours_steps_per_s']:.3f} "
              f"steps/s, TRL GRPOTrainer {gr['trl_steps_per_s']:.3f} steps/s, {gr['speedup']:.2f}x")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
