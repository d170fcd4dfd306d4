"""A Llama-style decoder in one file: RMSNorm, rotary embeddings, SwiGLU, grouped-query attention.

Parameter names are Hugging Face Llama's without the `model.` prefix (`embed_tokens.weight`,
`layers.N.self_attn.q_proj.weight`, ..., `norm.weight`, `lm_head.weight`), so `training/export.py`
maps them 1:1, and rotary embeddings use HF's convention (rotate the two *halves* of each head, not
interleaved pairs), so no weight permutation is needed either way. q/k/v and gate/up stay separate
`nn.Linear`s: that keeps the mapping 1:1 and lets LoRA (peft) target `q_proj`, `v_proj`, ... by name.

Named sizes (`ModelConfig.named`), Llama-like shapes; head_dim 64 from 25m up. Parameter counts with
tied embeddings at vocab 32k (1m and 10m at vocab 8k, the tokenizers they are trained with):

    size   dim  layers heads kv  ffn   params          note
    1m      96    4     4    2   256   ~1.2M (8k vocab) tests, mixture proxies
    10m    256   10     8    4   768   ~10M  (8k vocab) CPU pretraining target
    25m    384   10     6    2  1024   ~28M
    60m    512   14     8    4  1408   ~58M
    125m   768   12    12    4  2304   ~121M (50k vocab) GPT-2 small class
    350m  1024   24    16    8  2816   ~334M (50k vocab)
    1b    2048   16    32    8  8192   ~1.03B; Llama-3.2-1B shape (1.24B at its 128k vocab), theta 5e5
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from training.flops import mfu, peak_flops

if TYPE_CHECKING:
    from training.generate import KVCache

__all__ = ["ModelConfig", "Transformer", "Block", "RMSNorm", "peak_flops", "mfu", "rope_inv_freq"]

# dim, n_layers, n_heads, n_kv_heads, ffn_hidden, rope_theta — see the module docstring.
_NAMED_SIZES: dict[str, tuple[int, int, int, int, int, float]] = {
    "1m": (96, 4, 4, 2, 256, 10000.0),
    "10m": (256, 10, 8, 4, 768, 10000.0),
    "25m": (384, 10, 6, 2, 1024, 10000.0),
    "60m": (512, 14, 8, 4, 1408, 10000.0),
    "125m": (768, 12, 12, 4, 2304, 10000.0),
    "350m": (1024, 24, 16, 8, 2816, 10000.0),
    "1b": (2048, 16, 32, 8, 8192, 500000.0),
}

_ROPE_TYPES = {
    "linear": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
}


@dataclass
class ModelConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_hidden: int
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    # None, {"rope_type": "linear", "factor": f} (position interpolation) or Llama-3.1 style
    # {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    #  "original_max_position_embeddings"}: the same dicts HF's config.json uses.
    rope_scaling: dict[str, Any] | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not a multiple of n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.rope_theta <= 0 or self.norm_eps <= 0 or self.init_std <= 0:
            raise ValueError("rope_theta, norm_eps and init_std must be positive")
        if self.rope_scaling is not None:
            scaling = dict(self.rope_scaling)
            rope_type = scaling.pop("rope_type", scaling.pop("type", None))
            if rope_type not in _ROPE_TYPES:
                raise ValueError(
                    f"rope_scaling rope_type must be one of {sorted(_ROPE_TYPES)}, got {rope_type!r}"
                )
            missing = _ROPE_TYPES[rope_type] - set(scaling)
            unknown = set(scaling) - _ROPE_TYPES[rope_type] - {"rope_theta"}
            if missing or unknown:
                raise ValueError(
                    f"rope_scaling {rope_type}: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}"
                )
            # Accepted so that HF's `rope_parameters` dict can be pasted, but it is dropped below: a
            # value that differs from `rope_theta` would be silently ignored.
            if "rope_theta" in scaling and float(scaling["rope_theta"]) != float(self.rope_theta):
                raise ValueError(f"rope_scaling rope_theta {scaling['rope_theta']} differs from rope_theta "
                                 f"{self.rope_theta}; set rope_theta instead")
            self.rope_scaling = {"rope_type": rope_type, **{k: scaling[k] for k in _ROPE_TYPES[rope_type]}}

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def named(cls, size: str, vocab_size: int, **overrides: Any) -> ModelConfig:
        """A named size ("1m", "10m", "25m", "60m", "125m", "350m", "1b"); `overrides` replace fields."""
        key = size.lower()
        if key not in _NAMED_SIZES:
            raise ValueError(f"unknown model size {size!r}; known: {', '.join(_NAMED_SIZES)}")
        dim, n_layers, n_heads, n_kv_heads, ffn_hidden, theta = _NAMED_SIZES[key]
        kwargs: dict[str, Any] = dict(
            vocab_size=vocab_size, dim=dim, n_layers=n_layers, n_heads=n_heads,
            n_kv_heads=n_kv_heads, ffn_hidden=ffn_hidden, rope_theta=theta,
        )
        kwargs.update(overrides)
        return cls.from_dict(kwargs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a dict; an unknown key is an error (a typo must not silently fall back)."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Rotary inverse frequencies [head_dim/2], float32, with optional linear / Llama-3 scaling.

    Written with the same float32 operations as HF's `modeling_rope_utils` so exported models agree
    to rounding. Llama-3 scaling (Meta's Llama 3.1 release): wavelengths shorter than
    original_len/high_freq_factor are kept, longer than original_len/low_freq_factor are divided by
    `factor`, and those in between are interpolated smoothly.
    """
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _rope_tables(cfg: ModelConfig, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_seq_len, head_dim] float32, each frequency repeated for both halves (HF layout)."""
    inv_freq = rope_inv_freq(cfg).to(device)
    positions = torch.arange(cfg.max_seq_len, device=device).float()
    freqs = positions[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, head_dim] by per-position angles; cos/sin are [T, head_dim]."""
    return x * cos + _rotate_half(x) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # HF's arithmetic in one call: a fused kernel where torch has one (CUDA), composite on CPU;
        # inductor fuses it under torch.compile either way.
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        start_pos: int = 0,
        kv_cache: KVCache | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        q = self.q_proj(x).view(bsz, seqlen, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, start_pos, k, v)
        # Training and a fresh prefill are plain causal (the fast kernel); cached decoding brings a mask
        # (or none at all for one new token without padding: it attends to every cached key).
        is_causal = mask is None and kv_cache is None
        if kv_cache is not None and mask is None and seqlen > 1:
            is_causal = start_pos == 0
            if not is_causal:
                raise ValueError("a multi-token step after the prefill needs a mask (use Transformer.forward)")
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=self.n_kv_heads != self.n_heads
        )
        return self.o_proj(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm decoder block; the unit FSDP2 shards and activation checkpointing wraps."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = FeedForward(cfg)
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        start_pos: int = 0,
        kv_cache: KVCache | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, start_pos, kv_cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.tie_weights()
        # Non-persistent: derived from the config, so checkpoints stay loadable after a theta /
        # scaling / length change (context extension builds a new config and loads the old weights).
        cos, sin = _rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the LM head when configured. `to_empty` (meta → device) replaces
        each module's parameters separately and so unties them: call this after it (init_weights does)."""
        if self.cfg.tie_embeddings and self.lm_head.weight is not self.embed_tokens.weight:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Normal(0, init_std) weights, residual output projections scaled by 1/sqrt(2·n_layers)
        (GPT-2 / nanoGPT), norms at 1, rope tables recomputed (valid after `to_empty` from meta)."""
        self.tie_weights()
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.embed_tokens.weight.device).manual_seed(seed)
        std = self.cfg.init_std
        nn.init.normal_(self.embed_tokens.weight, 0.0, std, generator=generator)
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, 0.0, std, generator=generator)
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for block in self.layers:
            for lin in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj,
                        block.mlp.gate_proj, block.mlp.up_proj):
                nn.init.normal_(lin.weight, 0.0, std, generator=generator)
            for lin in (block.self_attn.o_proj, block.mlp.down_proj):
                nn.init.normal_(lin.weight, 0.0, out_std, generator=generator)
            block.input_layernorm.reset_parameters()
            block.post_attention_layernorm.reset_parameters()
        self.norm.reset_parameters()
        self.reset_rope_tables()

    @torch.no_grad()
    def reset_rope_tables(self) -> None:
        """Recompute the rotary cos/sin buffers from the config (after `to_empty` or a dtype cast)."""
        cos, sin = _rope_tables(self.cfg, device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def _cached_mask(self, start_pos: int, seqlen: int, kv_cache: KVCache) -> torch.Tensor | None:
        """Bool mask [B|1, 1, T, S] for a cached step: causal w.r.t. absolute positions, padded keys
        hidden. A padded query still sees itself so that no row is fully masked (which gives NaN)."""
        key_valid = kv_cache.key_valid
        if key_valid is None and (seqlen == 1 or start_pos == 0):
            return None
        end = start_pos + seqlen
        device = self.rope_cos.device
        q_pos = torch.arange(start_pos, end, device=device)[:, None]
        k_pos = torch.arange(end, device=device)[None, :]
        mask = (k_pos <= q_pos)[None, None]
        if key_valid is not None:
            mask = (mask & key_valid[:, None, None, :end]) | (k_pos == q_pos)[None, None]
        return mask

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        start_pos: int = 0,
        kv_cache: KVCache | None = None,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states [B, T, dim]: the input of the LM head or of a scalar head.

        Packed rows (several sequences in one row, training only): ``segment_ids`` [B, T] numbers the
        sequences of each row; a position attends only to earlier positions of its own segment (a
        block-diagonal causal mask), and ``position_ids`` [B, T] restart at 0 in each segment, so every
        sequence is computed exactly as it would be alone. Without them: plain causal attention, the fast
        ``is_causal`` kernel."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        seqlen = input_ids.shape[1]
        if (position_ids is not None or segment_ids is not None) and kv_cache is not None:
            raise ValueError("position_ids / segment_ids are for packed training rows, not cached decoding")
        if position_ids is not None:
            if position_ids.shape != input_ids.shape:
                raise ValueError(f"position_ids {tuple(position_ids.shape)} must match input_ids "
                                 f"{tuple(input_ids.shape)}")
            # [B, 1, T, head_dim]: broadcast over heads in apply_rotary.
            cos, sin = self.rope_cos[position_ids].unsqueeze(1), self.rope_sin[position_ids].unsqueeze(1)
        else:
            end = start_pos + seqlen
            if end > self.cfg.max_seq_len:
                raise ValueError(f"positions up to {end} exceed max_seq_len {self.cfg.max_seq_len}")
            cos, sin = self.rope_cos[start_pos:end], self.rope_sin[start_pos:end]
        if segment_ids is not None:
            causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=input_ids.device).tril()
            mask: torch.Tensor | None = ((segment_ids[:, :, None] == segment_ids[:, None, :]) & causal)[:, None]
        else:
            mask = self._cached_mask(start_pos, seqlen, kv_cache) if kv_cache is not None else None
        x = self.embed_tokens(input_ids)
        for block in self.layers:
            x = block(x, cos, sin, start_pos, kv_cache, mask)
        return self.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        start_pos: int = 0,
        kv_cache: KVCache | None = None,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, vocab] in the compute dtype (callers upcast for the loss).

        ``logits_at`` (bool [B, T]) projects only the selected positions, giving [N, vocab]: a loss that
        counts a few positions (SFT's response tokens) skips the head and its softmax everywhere else,
        the largest matmul of a small model. It is a forward argument, not a separate method, so that
        DDP's and FSDP2's forward hooks still run."""
        h = self.hidden_states(input_ids, start_pos, kv_cache, position_ids, segment_ids)
        return self.lm_head(h if logits_at is None else h[logits_at])

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (a tied head counts once); `exclude_embeddings` drops the input table."""
        total = sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
        if exclude_embeddings:
            total -= self.embed_tokens.weight.numel()
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B / nanoGPT:

            6·N + 12·L·H·Q·T

        N: parameters that do matmuls (all but the embedding lookup, plus the LM head even when tied),
        6 = 2 (multiply-add) × 3 (forward, backward for inputs, backward for weights);
        12·L·H·Q·T: attention scores and weighted values, L layers, H heads, Q head_dim, T sequence
        length, counted without the causal half-saving like PaLM and torchtitan do.
        """
        cfg = self.cfg
        n = self.num_params(exclude_embeddings=True)
        if cfg.tie_embeddings:
            n += cfg.vocab_size * cfg.dim
        return 6.0 * n + 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
