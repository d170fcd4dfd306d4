"""Language modelling: pretraining and mid-training (stages ``pretrain`` and ``midtrain``).

Next-token cross-entropy over every position of packed token windows (training/data.py's
``MixtureLoader``), summed over the micro-batch's B·T targets; the engine divides by the step's total:

    L(θ) = -1/N Σ_{b,t} log p_θ(x_{b,t+1} | x_{b,≤t}),   N = all target tokens of the optimizer step.

Evaluation: the same loss on fixed held-out windows (``eval_loss``, nats/token) and bits per byte
(``eval_bpb`` = eval_loss / ln 2 / bytes per token, tokenizer-independent).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training import data as data_mod
from training.metrics import bits_per_byte
from training.objectives.base import Batch, DataInfo, LossOutput, Objective


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


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
             precision: str) -> float:
    """Mean next-token loss (nats) over all target tokens of ``batches``. Every rank evaluates every
    batch: FSDP needs all ranks in each forward, and the result is then the same everywhere."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if precision == "bf16" else None
    for inputs, targets in batches:
        inputs, targets = inputs.to(device), targets.to(device)
        if autocast is not None:
            with autocast:
                logits = model(inputs)
        else:
            logits = model(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")
        total += float(loss)
        count += targets.numel()
    model.train(was_training)
    return total / max(count, 1)


class LMObjective(Objective):
    def data_info(self) -> DataInfo:
        vocab, tokenizer = data_vocab(self.cfg.data.mix)
        pools, _ = data_mod.load_mix(self.cfg.data.mix)
        manifest = json.loads(pools[0].manifest.read_text())
        return DataInfo(vocab, tokenizer, {k: manifest.get(k) for k in ("bos_id", "eos_id", "pad_id")})

    def setup(self, model: nn.Module) -> None:
        d, t, info = self.cfg.data, self.cfg.train, self.run.info
        vocab = self.run.model_config.vocab_size if self.run.model_config else None
        self.loader = data_mod.MixtureLoader(d.mix, seq_len=d.seq_len, global_batch_size=t.batch_size,
                                             rank=info.rank, world_size=info.world_size, seed=t.seed,
                                             vocab_size=vocab)
        self.eval_batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.eval_bytes_per_token: float | None = None
        if d.eval:
            self.eval_batches = list(data_mod.eval_batches(
                d.eval, seq_len=d.eval_seq_len or d.seq_len, batch_size=t.eval_batch_size or t.batch_size,
                max_batches=t.eval_batches, vocab_size=vocab))
            self.eval_bytes_per_token = data_mod.bytes_per_token(d.eval)

    def next_batch(self) -> Batch:
        inputs, targets = next(self.loader)
        return Batch({"inputs": inputs, "targets": targets}, weight=targets.numel(), tokens=inputs.numel())

    def loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        logits = model(batch.tensors["inputs"])
        targets = batch.tensors["targets"]
        return LossOutput(F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum"))

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if not self.eval_batches:
            return {}
        loss = evaluate(model, self.eval_batches, self.run.device, self.run.precision)
        return {"eval_loss": loss, "eval_bpb": bits_per_byte(loss, self.eval_bytes_per_token)}

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)
