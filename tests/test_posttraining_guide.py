"""docs/posttraining.md's walkthrough, run line by line as written (only `train.steps` and batch sizes
shortened): a guide whose commands drift from the code fails here."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch

from pipelines.cli import main
from training.config import load_config
from training.engine import train

REPO_ROOT = Path(__file__).resolve().parents[1]
GUIDE = REPO_ROOT / "docs" / "posttraining.md"
SHORT = ["train.steps=4", "optim.warmup=1", "train.batch_size=4", "train.eval_every=2", "train.eval_batches=2",
         "train.checkpoint_every=2", "train.log_every=1", "train.progress=false"]


def guide_commands() -> list[str]:
    text = GUIDE.read_text()
    block = re.search(r"<!-- guide:begin -->\s*```\n(.*?)```\s*<!-- guide:end -->", text, re.S)
    assert block, "the walkthrough block is missing from docs/posttraining.md"
    return [line for line in block.group(1).splitlines() if line.startswith("refinery ")]


def test_the_walkthrough_runs_from_a_pretrained_checkpoint(shared_data: Path, shakespeare_tokens: dict[str, Path],
                                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           one_thread: None) -> None:
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    (runs / "tokens").mkdir(parents=True)
    shutil.copy(shakespeare_tokens["train"] / "tokenizer.json", runs / "tokens" / "tokenizer.json")
    train(load_config(None, ["model.size=1m", f"data.mix={shakespeare_tokens['train']}", "data.seq_len=64",
                             "train.batch_size=8", "train.steps=4", "optim.warmup=1", "train.progress=false",
                             "train.export_hf=false", f"train.out_dir={runs / 'pretrain_tiny'}"]))
    commands = guide_commands()
    assert len(commands) >= 6
    for line in commands:
        args = shlex.split(line.replace("../shared/data", str(shared_data)))[1:]
        args = [str(REPO_ROOT / a) if a.startswith("training/configs/") else a for a in args]
        if args[0] == "train":
            args += SHORT + (["train.eval_batch_size=4"] if args[1] == "dpo" else [])
        assert main(["-q", *args]) == 0, line

    for run in ("sft_tiny", "dpo_tiny", "sft_lora"):
        assert (runs / run / "metrics.jsonl").is_file(), run
    assert (runs / "sft_lora" / "adapter" / "adapter_config.json").is_file()
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(runs / "sft_lora_merged")
    dpo = AutoModelForCausalLM.from_pretrained(runs / "dpo_tiny" / "hf")
    ids = torch.tensor([[0, 4, 20, 30, 6, 5]])
    assert torch.isfinite(merged(ids).logits).all() and torch.isfinite(dpo(ids).logits).all()
