"""The training loop on real text: learning, metrics, export, weight-decay groups, mid-training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from training.checkpoint import load_model_file, resolve_checkpoint, write_model_checkpoint
from training.config import ConfigError, load_config
from training.data import eval_batches
from training.loop import evaluate, param_groups, train
from training.metrics import read_metrics
from training.model import ModelConfig, Transformer

pytestmark = pytest.mark.usefixtures("one_thread")


def _overrides(shakespeare_tokens: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["model.size=1m", f"data.mix={shakespeare_tokens['train']}", f"data.eval={shakespeare_tokens['heldout']}",
            "data.seq_len=64", "train.batch_size=16", "optim.lr=1e-2", "optim.warmup=5",
            "train.eval_batches=4", "train.log_every=1", "train.progress=false", f"train.out_dir={out}",
            *extra]


def _unigram_cross_entropy(train_dir: Path, eval_dir: Path) -> float:
    """Loss (nats/token) of the best context-free model: eval tokens under train token frequencies."""
    train_tokens = np.concatenate([np.load(p) for p in sorted(train_dir.glob("*.npy")) if ".idx" not in p.name])
    eval_tokens = np.concatenate([np.load(p) for p in sorted(eval_dir.glob("*.npy")) if ".idx" not in p.name])
    counts = np.bincount(train_tokens, minlength=512).astype(np.float64) + 1.0  # add-one: no log(0)
    p = counts / counts.sum()
    return float(-np.log(p[eval_tokens]).mean())


def test_pretraining_on_real_text_falls_below_the_unigram_baseline(shakespeare_tokens: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    summary = train(load_config(None, _overrides(shakespeare_tokens, out, "train.steps=40", "train.eval_every=20")))
    records = read_metrics(out / "metrics.jsonl")
    evals = [r for r in records if "eval_loss" in r]
    unigram = _unigram_cross_entropy(shakespeare_tokens["train"], shakespeare_tokens["heldout"])
    assert [r["step"] for r in evals] == [20, 40]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] < math.log(512)
    assert summary["eval_loss"] == evals[-1]["eval_loss"] < unigram - 0.1
    # Bits per byte follow from the manifest's bytes per token.
    manifest = json.loads((shakespeare_tokens["heldout"] / "manifest.json").read_text())
    bytes_per_token = manifest["total_text_bytes"] / manifest["total_tokens"]
    assert evals[-1]["eval_bpb"] == pytest.approx(evals[-1]["eval_loss"] / math.log(2) / bytes_per_token)
    # One line per step with the logged fields; MFU is unknown on CPU.
    assert [r["step"] for r in records] == list(range(1, 41))
    for key in ("loss", "lr", "tokens_per_s", "grad_norm", "tokens", "mfu"):
        assert key in records[0]
    assert records[0]["mfu"] is None and records[-1]["tokens"] == 40 * 16 * 64
    assert records[0]["lr"] == pytest.approx(1e-2 / 5)
    # The final export is a Hugging Face Llama folder with the data's tokenizer.
    hf = json.loads((out / "hf" / "config.json").read_text())
    assert hf["architectures"] == ["LlamaForCausalLM"] and hf["vocab_size"] == 512
    train_manifest = json.loads((shakespeare_tokens["train"] / "manifest.json").read_text())
    assert hf["eos_token_id"] == train_manifest["eos_id"] is not None  # HF generate stops at EOS
    assert (out / "hf" / "tokenizer.json").is_file()


def test_weight_decay_applies_to_linear_matrices_only() -> None:
    model = Transformer(ModelConfig.named("1m", 512))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "embed_tokens.weight" in skipped  # also the tied head
    assert all("layernorm" in n or n == "norm.weight" or n == "embed_tokens.weight" for n in skipped)
    assert "layers.0.self_attn.q_proj.weight" in decayed and "layers.3.mlp.down_proj.weight" in decayed
    assert len(decayed) + len(skipped) == len(list(model.parameters()))


def test_activation_checkpointing_leaves_the_losses_unchanged(shakespeare_tokens: dict[str, Path], tmp_path: Path) -> None:
    plain = train(load_config(None, _overrides(shakespeare_tokens, tmp_path / "a", "train.steps=3", "optim.warmup=1", "data.eval=none",
                                               "train.export_hf=false")))
    ckpt = train(load_config(None, _overrides(shakespeare_tokens, tmp_path / "b", "train.steps=3", "optim.warmup=1", "data.eval=none",
                                              "train.export_hf=false", "train.activation_checkpointing=true")))
    assert ckpt["losses"] == pytest.approx(plain["losses"], abs=1e-6)
    # Checkpoints hold clean parameter names whatever wrappers were applied.
    names = set(load_model_file(tmp_path / "b")["model"])
    assert "layers.0.self_attn.q_proj.weight" in names and not any("_checkpoint" in n for n in names)


def test_midtrain_extends_the_context_from_a_pretrained_checkpoint(shakespeare_tokens: dict[str, Path], tmp_path: Path) -> None:
    pre = tmp_path / "pre"
    train(load_config(None, _overrides(shakespeare_tokens, pre, "train.steps=20", "model.max_seq_len=64", "data.eval=none",
                                       "train.export_hf=false")))
    mid = tmp_path / "mid"
    summary = train(load_config(None, [
        f"data.mix={shakespeare_tokens['train']}", f"data.eval={shakespeare_tokens['long']}", "data.seq_len=128",
        "model.max_seq_len=128", "model.rope_theta=40000", f"train.init_from={pre}", f"train.out_dir={mid}",
        "train.steps=10", "train.batch_size=8", "optim.lr=3e-3", "optim.warmup=0", "optim.schedule=linear",
        "optim.min_lr_ratio=0", "train.eval_at_start=true", "train.eval_batches=4", "train.log_every=1",
        "train.progress=false", "train.export_hf=false",
    ], stage="midtrain"))
    records = read_metrics(mid / "metrics.jsonl")
    # Fresh schedule: the anneal runs from the new peak to exactly 0 over the mid-training steps.
    assert records[0] == {"step": 0, "eval_loss": summary["initial_eval_loss"],
                          "eval_bpb": summary["initial_eval_bpb"]}
    assert records[1]["lr"] == pytest.approx(3e-3 * 0.9) and records[-1]["lr"] == 0.0
    # The pretrained weights were loaded: the first loss is far below a fresh model's ln(512).
    assert records[1]["loss"] < math.log(512) - 0.5
    # Held-out loss on long documents at the new length improves over the loaded weights.
    assert summary["eval_loss"] < summary["initial_eval_loss"]
    saved = load_model_file(mid)["model_config"]
    assert saved["max_seq_len"] == 128 and saved["rope_theta"] == 40000.0 and saved["dim"] == 96
    state = torch.load(resolve_checkpoint(mid) / "train_state.pt", weights_only=False)
    assert state["step"] == 10


def test_midtrain_rejects_a_change_of_architecture(shakespeare_tokens: dict[str, Path], tmp_path: Path) -> None:
    pre = tmp_path / "pre"
    train(load_config(None, _overrides(shakespeare_tokens, pre, "train.steps=1", "optim.warmup=0", "data.eval=none", "train.export_hf=false")))
    cfg = load_config(None, [f"data.mix={shakespeare_tokens['train']}", f"train.init_from={pre}", "model.n_layers=8",
                             f"train.out_dir={tmp_path / 'mid'}", "train.progress=false"], stage="midtrain")
    with pytest.raises(ConfigError, match="model.n_layers=8 differs from the checkpoint's 4"):
        train(cfg)


def test_sequences_longer_than_the_model_context_are_an_error(shakespeare_tokens: dict[str, Path], tmp_path: Path) -> None:
    cfg = load_config(None, _overrides(shakespeare_tokens, tmp_path, "model.max_seq_len=32", "train.steps=1", "optim.warmup=0"))
    with pytest.raises(ConfigError, match="data.seq_len=64 exceeds model.max_seq_len=32"):
        train(cfg)


def test_bf16_on_cpu_is_an_error(shakespeare_tokens: dict[str, Path], tmp_path: Path) -> None:
    cfg = load_config(None, _overrides(shakespeare_tokens, tmp_path, "train.precision=bf16", "train.steps=1", "optim.warmup=0",
                                       "train.device=cpu"))
    with pytest.raises(ConfigError, match="bf16 needs a CUDA device"):
        train(cfg)


def test_a_diverging_loss_stops_the_run_with_a_clear_error(shakespeare_tokens: dict[str, Path], tmp_path: Path) -> None:
    cfg = load_config(None, _overrides(shakespeare_tokens, tmp_path, "optim.lr=1e30", "optim.warmup=0", "train.steps=6",
                                       "data.eval=none", "train.checkpoint_every=1"))
    with pytest.raises(FloatingPointError, match=r"(training loss is nan|the gradient norm is (nan|inf)).* at step \d+; lower optim.lr"):
        train(cfg)


def test_continued_pretraining_starts_from_a_weights_only_checkpoint(shakespeare_tokens: dict[str, Path], tmp_path: Path) -> None:
    # What `refinery import` of a Hugging Face model leaves: model.pt only, architecture included.
    torch.manual_seed(123)
    model = Transformer(ModelConfig.named("1m", 512, max_seq_len=64))
    write_model_checkpoint(tmp_path / "imported", model.state_dict(), model.cfg.to_dict())
    summary = train(load_config(None, [
        f"data.mix={shakespeare_tokens['train']}", f"data.eval={shakespeare_tokens['heldout']}", "data.seq_len=64",
        "train.batch_size=16", "train.steps=2", "optim.warmup=0", "train.eval_at_start=true",
        "train.eval_batches=2", f"train.init_from={tmp_path / 'imported'}", f"train.out_dir={tmp_path / 'run'}",
        "train.progress=false", "train.export_hf=false"]))
    expected = evaluate(model, list(eval_batches(shakespeare_tokens["heldout"], 64, 16, 2)), torch.device("cpu"), "fp32")
    assert summary["initial_eval_loss"] == pytest.approx(expected, abs=1e-6)
    assert summary["model_config"]["max_seq_len"] == 64  # the checkpoint's architecture, not a default
