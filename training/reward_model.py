"""The reward model: our Transformer with a scalar head, exported as HF `LlamaForSequenceClassification`.

A subclass, not a wrapper, so that everything that walks a Transformer (FSDP2 and activation
checkpointing find `.layers`, checkpoints, `init_from` weights) works unchanged; the only new
parameter is `score` [1, dim], named as in HF so the export is a rename. `forward` returns one value
per position, [B, T]: the reward of a sequence is the value at its last real token (what HF's
sequence classifier reads, given `pad_token_id`), and PPO's value head will want all positions.

The LM head is not used. When it is tied it is the embedding table (trained as the input side);
when untied it is frozen, so DDP does not wait for a gradient that never comes and the optimizer
skips it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from training.export import HF_PREFIX, check_tokenizer_fits, hf_config
from training.model import ModelConfig, Transformer

SCORE_KEY = "score.weight"
_EXPORT_FILES = ("model.safetensors", "config.json", "tokenizer.json")


class RewardModel(Transformer):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.score = nn.Linear(cfg.dim, 1, bias=False)
        self.reset_score()
        if not cfg.tie_embeddings:
            self.lm_head.weight.requires_grad_(False)

    def init_weights(self, seed: int | None = None) -> None:
        super().init_weights(seed)
        if hasattr(self, "score"):  # Transformer.__init__ calls this before the head exists
            self.reset_score(None if seed is None else seed + 1)

    @torch.no_grad()
    def reset_score(self, seed: int | None = None) -> None:
        self.score.weight.copy_(score_init(self.cfg.dim, seed))

    def forward(self, input_ids: torch.Tensor, start_pos: int = 0, kv_cache: Any = None,
                position_ids: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Scalar values [B, T] (float32), one per position; the arguments are Transformer.forward's."""
        hidden = self.hidden_states(input_ids, start_pos, kv_cache, position_ids, segment_ids)
        return self.score(hidden).squeeze(-1).float()


def score_init(dim: int, seed: int | None = None) -> torch.Tensor:
    """A head [1, dim] from Normal(0, 1/sqrt(dim + 1)), the reward head initialization of Ziegler et al.
    2019 (lm-human-preferences): rewards start at unit scale whatever the width. CPU draw, so a seed
    gives the same head on every device."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.randn(1, dim, generator=generator) / math.sqrt(dim + 1)


def last_token_values(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """values [B, T] at each row's last real token (index length-1) → [B]; lengths in [1, T]."""
    return values.gather(1, (lengths - 1).long().unsqueeze(1)).squeeze(1)


def export_reward_model(
    model: RewardModel | tuple[Mapping[str, Any], ModelConfig],
    out_dir: str | os.PathLike[str],
    *,
    pad_id: int,
    tokenizer_path: str | os.PathLike[str] | None = None,
    dtype: torch.dtype | None = None,
    bos_id: int | None = None,
    eos_id: int | None = None,
) -> Path:
    """Write a directory that `transformers` loads as `LlamaForSequenceClassification` (num_labels=1).

    `pad_id` becomes `pad_token_id`: HF scores the rightmost token that is not `pad_id`, so it must be
    the id the batches are padded with and must never be a sequence's last real token (a pad id equal
    to EOS would make HF score the token before the EOS). The LM head is left out: HF's classifier
    has none.
    """
    if pad_id is None or pad_id < 0:
        raise ValueError("export_reward_model needs the tokenizer's pad_id: HF's sequence classifier "
                         "finds each sequence's last token by it")
    if isinstance(model, nn.Module):
        inner: Any = model
        while not isinstance(inner, RewardModel):  # DDP wrapper
            inner = getattr(inner, "module", None)
            if inner is None:
                raise TypeError(f"cannot export a {type(model).__name__} as a reward model")
        cfg, raw = inner.cfg, inner.state_dict()
    else:
        raw, cfg = model
    state: dict[str, torch.Tensor] = {}
    for name, tensor in raw.items():
        if hasattr(tensor, "full_tensor"):  # FSDP2 DTensor → the whole parameter
            tensor = tensor.full_tensor()
        state[name] = tensor
    if SCORE_KEY not in state:
        raise ValueError(f"no {SCORE_KEY} in the state dict: not a reward model")
    store_dtype = dtype or state[SCORE_KEY].dtype
    tensors = {
        (name if name == SCORE_KEY else HF_PREFIX + name):
            t.detach().to("cpu", store_dtype if t.is_floating_point() else t.dtype).contiguous()
        for name, t in state.items() if not name.startswith("lm_head.")
    }
    config = hf_config(cfg, store_dtype, bos_id, eos_id, pad_id)
    config.update({"architectures": ["LlamaForSequenceClassification"], "num_labels": 1,
                   "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0},
                   "tie_word_embeddings": False})  # no output embedding to tie
    if tokenizer_path is not None:
        if not Path(tokenizer_path).is_file():
            raise FileNotFoundError(f"tokenizer file not found: {tokenizer_path}")
        check_tokenizer_fits(tokenizer_path, cfg.vocab_size)

    # Built whole in a sibling directory, then swapped in: never a mix of two exports' files.
    out = Path(os.path.abspath(out_dir))
    if out.exists() and not (out.is_dir() and all(p.name in _EXPORT_FILES for p in out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an earlier export; export into a new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
        tmp.chmod(0o755)
        if out.is_dir():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
