"""The RL tests' starting models, built the way docs/rl.md builds them (through the CLI's entry point).

Synthetic arithmetic in GSM8K's format (training/rl_synthetic.py): 80 training problems of two
numbers up to 9, demonstrations repeated 10 times, half of them "sloppy" (the final line repeats the
first number instead of the result). A tiny model pretrained on the plain-text demonstrations is the
-Zero base; a short SFT of it on the chat demonstrations is the SFT model. Both make the slip about as
often as the data did, so RL with the verifier has something to unlearn.
"""

from __future__ import annotations

from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"
MODEL = ["model.size=null", "model.dim=128", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
         "model.ffn_hidden=256", "model.max_seq_len=128"]
QUIET = ["train.progress=false", "train.checkpoint_every=0", "train.eval_every=0", "train.eval_at_start=false"]


def build_arith_models(root: Path, pretrain_steps: int = 250, sft_steps: int = 40) -> dict[str, Path]:
    """Task files, tokenizer, base run and SFT run under `root`; returns their paths."""
    from curation.tokenize import tokenize_corpus
    from curation.tokenizer import train_tokenizer
    from training.chat import tokenize_chat
    from training.engine import train_from_cli
    from training.rl_synthetic import write_task_files

    paths = write_task_files(root / "arith", train=80, test=20, max_value=9, noise=0.5, repeats=10)
    tokenizer = train_tokenizer([paths["pretrain"]], 300, root / "arith" / "tokenizer.json")
    tokenize_corpus(paths["pretrain"].parent, tokenizer, root / "arith" / "tokens")
    train_from_cli("pretrain", str(CONFIGS / "pretrain_tiny.yaml"), [
        *MODEL, *QUIET, f"data.mix={root / 'arith' / 'tokens'}", "data.eval=null", "data.seq_len=64",
        f"train.steps={pretrain_steps}", "train.batch_size=16", "optim.warmup=10", "optim.schedule=cosine",
        "optim.weight_decay=0.0", f"train.out_dir={root / 'base'}"])
    tokenize_chat([paths["sft"]], tokenizer, root / "arith" / "chat", max_len=64, progress=False)
    train_from_cli("sft", str(CONFIGS / "sft_tiny.yaml"), [
        *QUIET, f"data.mix={root / 'arith' / 'chat'}", "data.eval=null", "data.seq_len=64",
        f"train.steps={sft_steps}", "train.batch_size=16", "optim.lr=1e-3", "optim.warmup=5",
        f"train.init_from={root / 'base'}", f"train.out_dir={root / 'sft'}"])
    return {**paths, "tokenizer": tokenizer, "base": root / "base", "sft": root / "sft", "root": root}


def arith_overrides(models: dict[str, Path], out: Path, steps: int, init: str = "sft") -> list[str]:
    """Overrides that point grpo_tiny.yaml / grpo_zero_tiny.yaml / ppo_tiny.yaml at the built models."""
    return [f"data.mix={models['tasks']}", f"data.eval={models['tasks']}", f"train.init_from={models[init]}",
            f"train.out_dir={out}", f"train.steps={steps}", "train.progress=false"]
