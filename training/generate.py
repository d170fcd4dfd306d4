"""Sampling with a preallocated KV cache: greedy, temperature and nucleus (top-p), batched.

Prompts of different lengths are left-padded into one batch. Positions are not shifted per sequence:
rotary attention depends only on the distance between query and key, so a sequence that starts at
position p behaves as if it started at 0 (up to float rounding), and padded keys are masked out.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from training.model import Transformer


class KVCache:
    """Per-layer key/value buffers [B, n_kv_heads, max_len, head_dim], filled in place as decoding goes.

    `key_valid` [B, max_len] (bool) marks real tokens when prompts are left-padded; None means all
    positions are real.
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        key_valid: torch.Tensor | None = None,
    ) -> None:
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_len = max_len
        if key_valid is not None and tuple(key_valid.shape) != (batch_size, max_len):
            raise ValueError(f"key_valid must be [{batch_size}, {max_len}], got {tuple(key_valid.shape)}")
        self.key_valid = key_valid

    @classmethod
    def for_model(
        cls,
        model: Transformer,
        batch_size: int,
        max_len: int | None = None,
        dtype: torch.dtype | None = None,
        key_valid: torch.Tensor | None = None,
    ) -> KVCache:
        cfg = model.cfg
        weight = model.embed_tokens.weight
        return cls(
            cfg.n_layers, batch_size, max_len or cfg.max_seq_len, cfg.n_kv_heads, cfg.head_dim,
            dtype=dtype or weight.dtype, device=weight.device, key_valid=key_valid,
        )

    def update(
        self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v [B, kv_heads, T, head_dim] at start_pos; return the keys/values of positions [0, start_pos+T)."""
        end = start_pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, step needs {end}")
        self.k[layer][:, :, start_pos:end] = k
        self.v[layer][:, :, start_pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def select(self, rows: torch.Tensor) -> None:
        """Keep (and reorder or repeat) batch rows in place: `rows` [B'] indexes the current batch.
        Rollouts use it to copy one prefilled prompt to its n samples and to drop finished rows."""
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]
        if self.key_valid is not None:
            self.key_valid = self.key_valid.index_select(0, rows)


def _left_pad(
    prompts: Sequence[Sequence[int]] | torch.Tensor, pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token tensor [B, T] and, when lengths differ, a validity mask [B, T]."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2 or prompts.shape[1] == 0:
            raise ValueError(f"prompt tensor must be [batch, seq>0], got {tuple(prompts.shape)}")
        return prompts.to(device=device, dtype=torch.long), None
    rows = [list(map(int, p)) for p in prompts]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("generate needs at least one prompt and every prompt needs at least one token")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    valid = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        valid[i, width - len(r):] = True
    if bool(valid.all()):
        return ids.to(device), None
    return ids.to(device), valid.to(device)


def sample_next(
    logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Sample one token per row of logits [B, V] with temperature and nucleus (top-p) filtering."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass before it
        # already does (Holtzman et al. 2020); the top token always survives.
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return order.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: Transformer,
    prompt_ids: list[list[int]] | torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    eos_id: int | Sequence[int] | None = None,
    seed: int | None = None,
    pad_id: int = 0,
) -> list[list[int]]:
    """Continue each prompt by up to `max_new_tokens` tokens; returns only the new tokens per prompt,
    cut after the first `eos_id` (included; several ids, as HF's `eos_token_id` list of Llama 3
    instruct models, each stop). `temperature == 0` means greedy.

    Lists of different lengths are left-padded with `pad_id` (masked, so its value does not matter);
    a LongTensor [B, T] is taken as equal-length prompts without padding.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not greedy and temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    greedy = greedy or temperature == 0
    eos_ids = _eos_set(eos_id)
    device = model.embed_tokens.weight.device
    ids, valid = _left_pad(prompt_ids, pad_id, device)
    bsz, prompt_len = ids.shape
    total = prompt_len + max_new_tokens
    if total > model.cfg.max_seq_len:
        raise ValueError(f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"max_seq_len {model.cfg.max_seq_len}")
    if max_new_tokens == 0:
        return [[] for _ in range(bsz)]
    key_valid = None
    if valid is not None:
        key_valid = torch.ones((bsz, total), dtype=torch.bool, device=device)
        key_valid[:, :prompt_len] = valid
    cache = KVCache.for_model(model, bsz, total, key_valid=key_valid)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    was_training = model.training
    model.eval()
    try:
        out = torch.empty((bsz, max_new_tokens), dtype=torch.long, device=device)
        finished = torch.zeros(bsz, dtype=torch.bool, device=device)
        eos_t = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
        logits = model(ids, 0, cache)[:, -1]
        pos = prompt_len
        steps = 0
        for step in range(max_new_tokens):
            if greedy:
                nxt = logits.argmax(dim=-1)
            else:
                nxt = sample_next(logits, temperature, top_p, generator)
            out[:, step] = nxt
            steps = step + 1
            if eos_ids:
                finished |= torch.isin(nxt, eos_t)
                if bool(finished.all()):
                    break
            if step + 1 < max_new_tokens:
                logits = model(nxt[:, None], pos, cache)[:, -1]
                pos += 1
    finally:
        model.train(was_training)

    results: list[list[int]] = []
    for row in out[:, :steps].tolist():
        cut = next((i for i, tok in enumerate(row) if tok in eos_ids), None)
        if cut is not None:
            row = row[: cut + 1]
        results.append(row)
    return results


def _eos_set(eos_id: int | Sequence[int] | None) -> set[int]:
    if eos_id is None:
        return set()
    return {int(eos_id)} if isinstance(eos_id, int) else {int(e) for e in eos_id}


# Common names of the end-of-sequence token: ours, Llama 3, GPT-2/NeoX/OLMo, Llama 2.
_EOS_NAMES = ("<|eos|>", "<|end_of_text|>", "<|endoftext|>", "</s>")


def generate_text(model_path: str, prompt: str, tokenizer_path: str | None = None, max_new_tokens: int = 64,
                  temperature: float = 0.8, top_p: float = 0.95, greedy: bool = False, seed: int = 0) -> str:
    """`refinery generate`: load a checkpoint or a HF Llama dir, continue `prompt`, return the text."""
    import json
    from pathlib import Path

    from tokenizers import Tokenizer

    path = Path(model_path)
    weights = (path / "model.safetensors").exists() or (path / "model.safetensors.index.json").exists()
    if (path / "config.json").is_file() and weights:
        from training.export import import_hf

        model = import_hf(path)
        hf_cfg = json.loads((path / "config.json").read_text())
    else:
        from training.checkpoint import load_transformer, resolve_checkpoint

        model = load_transformer(path)
        hf_cfg = {}
        path = resolve_checkpoint(path)
    # Beside the weights, beside the step dirs, or in a run's own HF export.
    candidates = [tokenizer_path] if tokenizer_path else [
        path / "tokenizer.json", path.parent / "tokenizer.json", path.parent.parent / "hf" / "tokenizer.json"]
    tok_file = next((Path(c) for c in candidates if c and Path(c).is_file()), None)
    if tok_file is None:
        raise FileNotFoundError(f"no tokenizer.json beside {model_path}; pass --tokenizer")
    from training.export import check_tokenizer_fits

    # A tokenizer left beside another model (or passed by mistake) would decode its ids as wrong text.
    check_tokenizer_fits(tok_file, model.cfg.vocab_size)
    tok = Tokenizer.from_file(str(tok_file))
    eos_id = hf_cfg.get("eos_token_id")
    if eos_id is None:
        eos_id = next((i for i in (tok.token_to_id(n) for n in _EOS_NAMES) if i is not None), None)
    model.eval()
    ids = tok.encode(prompt).ids
    out = generate(model, [ids], max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                   greedy=greedy, eos_id=eos_id, seed=seed)[0]
    if out and out[-1] in _eos_set(eos_id):
        out = out[:-1]
    return prompt + tok.decode(out)
