"""Rollouts for RL: batched sampling on the KV cache with per-token log-probs, in-process or on Ray.

One interface, `RolloutBackend.generate(prompts, params) -> list[Rollout]`, three places to run it:
`LocalRollout` (a policy in this process), `RayRollout` (actors that each hold a copy of the policy;
`load_weights` pushes new weights after an update) and, later, a vLLM engine on GPU behind the same
base class (it has to honour the same `SamplingParams`, return the same `Rollout`s, and report
log-probs the way documented below).

What a call does (`LocalRollout`):
- each prompt is sampled `n` times; rows are ordered by prompt length and cut into work lists
  (`plan_work`, a pure function of the prompts, so every backend runs the same lists);
- a work list is decoded `max_batch` rows at a time: each distinct prompt is prefilled once
  (left-padded, padded keys masked) and its KV cache copied to its samples; a row that ends frees
  its slot for the next waiting row, whose prompt is prefilled into the running cache (continuous
  batching, as vLLM's); when no row waits, ended rows are dropped from the cache;
- sampling: temperature (0 = greedy), top-k, top-p (nucleus, as `training.generate.sample_next`);
  a row ends at a stop token id (kept, as HF's `eos_token_id`), a stop string (kept in the text,
  matched on the decoded tail) or `max_new_tokens`;
- randomness is counter-based: the uniform number that picks row (i, j)'s t-th token is a hash of
  (seed, prompt index i, sample index j, t), and the token is the inverse CDF of the filtered
  distribution at it. A rerun with the same seed gives the same rollouts, and so does any other split
  of the rows over processes, up to float rounding of the logits themselves;
- `logprobs[t]` is log softmax(logits / T)[token] (T = the temperature, 1 when greedy), before
  top-k / top-p truncation, as TRL's GRPOTrainer and vLLM's default report it: exactly what a
  teacher-forced forward at the same temperature gives (tested to 1e-5 in fp32), i.e. the "old"
  log-probs of the PPO/GRPO ratio.

`collate_rollouts` turns rollouts into the padded tensors a policy-gradient objective trains on.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from training.generate import KVCache
from training.model import ModelConfig, Transformer
from training.sampling import SamplingParams

if TYPE_CHECKING:
    from tokenizers import Tokenizer

FINISH_STOP, FINISH_LENGTH = "stop", "length"


@dataclass
class Rollout:
    """One sampled completion of prompt `prompt_index` (its `sample_index`-th of n)."""

    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    text: str | None = None

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(f"{len(self.token_ids)} tokens but {len(self.logprobs)} log-probs")


@dataclass(frozen=True)
class WorkList:
    """Rows (prompt index, sample index) one engine generates in one go, `max_batch` at a time."""

    rows: tuple[tuple[int, int], ...]


def plan_work(prompts: Sequence[Sequence[int]], n: int, max_rows: int | None = None) -> list[WorkList]:
    """Rows sorted by prompt length (longest first, ties by index; a prompt's samples stay together),
    cut into work lists of at most `max_rows` rows (None: one list). Similar lengths pad little, and
    rows that join a running batch always fit before the current position."""
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    rows = [(i, j) for i in order for j in range(n)]
    size = max_rows or max(1, len(rows))
    return [WorkList(tuple(rows[k: k + size])) for k in range(0, len(rows), size)]


def _check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> list[list[int]]:
    out = [list(map(int, p)) for p in prompts]
    for i, p in enumerate(out):
        if not p:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        if min(p) < 0 or max(p) >= vocab_size:
            raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {vocab_size})")
    return out


# ----------------------------------------------------------------------------- counter-based RNG
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer (Steele et al. 2014): a bijection of uint64 with good avalanche."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def row_uniforms(seed: int, prompt_idx: np.ndarray, sample_idx: np.ndarray, step: int) -> np.ndarray:
    """Uniform [0, 1) numbers, one per row, determined by (seed, prompt, sample, step) alone."""
    with np.errstate(over="ignore"):
        h = _mix(np.full(prompt_idx.shape, np.uint64(seed & (2**64 - 1))) + _GOLDEN)
        for part in (prompt_idx.astype(np.uint64), sample_idx.astype(np.uint64),
                     np.full(prompt_idx.shape, np.uint64(step))):
            h = _mix(h ^ (part + _GOLDEN))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def sample_tokens(logps: torch.Tensor, params: SamplingParams, uniforms: torch.Tensor) -> torch.Tensor:
    """Next token per row from `logps` [B, V] = log softmax(logits / T) (fp32): greedy, or the
    inverse CDF at `uniforms` [B] of that distribution after top-k and top-p filtering."""
    if params.greedy:
        return logps.argmax(dim=-1)
    if 0 < params.top_k < logps.shape[-1]:
        kth = torch.topk(logps, params.top_k, dim=-1).values[:, -1:]
        logps = logps.masked_fill(logps < kth, float("-inf"))  # ties at the k-th value stay
    probs = logps.exp()
    order = None
    if params.top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)
        # Renormalized after top-k, as sample_next would see it; then keep the smallest prefix whose
        # mass reaches top_p (training.generate.sample_next, Holtzman et al. 2020).
        cum = probs.cumsum(-1)
        drop = cum - probs >= params.top_p * cum[:, -1:]
        probs = probs.masked_fill(drop, 0.0)
    cdf = probs.cumsum(-1)
    target = uniforms.to(cdf.dtype).unsqueeze(-1) * cdf[:, -1:]
    # First index whose cdf exceeds the target: never a zero-probability token.
    choice = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[-1] - 1)
    return (order.gather(-1, choice) if order is not None else choice).squeeze(-1)


# ----------------------------------------------------------------------------- backends
class RolloutBackend(ABC):
    """Where rollouts are computed. Results come back prompt-major: prompt i's sample j at i * n + j."""

    @abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Rollout]:
        """Sample `params.n` completions of each prompt (token id lists)."""

    @abstractmethod
    def load_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Replace the policy's weights (after an optimizer step); names as `Transformer.state_dict()`."""

    def close(self) -> None:  # noqa: B027 - optional hook: only remote backends hold workers
        """Release workers; a no-op in-process."""

    def __enter__(self) -> RolloutBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class _Row:
    prompt_index: int
    sample_index: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: str | None = None


class LocalRollout(RolloutBackend):
    """Rollouts from a `Transformer` in this process (on its device, in its dtype).

    `tokenizer` (a `tokenizers.Tokenizer`) is needed for stop strings and fills `Rollout.text`.
    `max_batch`: rows decoded together (memory: max_batch x (prompt + 2 x max_new_tokens) of KV
    cache). `max_rows`: rows per work list (None: all rows of a call in one list; `RayRollout`
    splits by it). Within a work list, rows that end free their slot for the next waiting row
    (continuous batching), so a long completion does not leave the batch half empty.
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer | None = None, max_batch: int = 64,
                 max_rows: int | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_rows = max_rows
        # Of the last call: waves (fresh caches), rows that joined a running batch, decoding steps,
        # and slot-steps (decoding work: rows in the batch summed over steps, ended ones included).
        self.last_stats: dict[str, int] = {}

    def load_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        self.model.load_state_dict(dict(state_dict), strict=True)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Rollout]:
        return self.generate_work(prompts, params, plan_work(prompts, params.n, self.max_rows))

    def generate_work(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                      work: Sequence[WorkList]) -> list[Rollout]:
        """Rollouts of the given work lists only, prompt-major (Ray actors run their share)."""
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer: LocalRollout(model, tokenizer=...)")
        checked = _check_prompts(prompts, self.model.cfg.vocab_size)
        self.last_stats = {"waves": 0, "joined": 0, "steps": 0, "slot_steps": 0}
        out: list[Rollout] = []
        was_training = self.model.training
        self.model.eval()
        try:
            for item in work:
                rows = [_Row(i, j) for i, j in item.rows]
                waiting = deque(range(len(rows)))
                while waiting:
                    self._wave(checked, params, rows, waiting)
                out.extend(self._finish(checked, params, r) for r in rows)
        finally:
            self.model.train(was_training)
        out.sort(key=lambda r: (r.prompt_index, r.sample_index))
        return out

    def _prefill(self, prompts: list[list[int]], rows: list[_Row], take: list[int], end: int, cache_len: int,
                 masked: bool) -> tuple[torch.Tensor, KVCache, list[int]]:
        """Prefill the prompts of rows `take`, right-aligned to end at position `end`, each distinct
        prompt once. Returns the last-position logits [len(take), V] (fp32), their KV cache (length
        `cache_len`, rows in `take` order, keys left of each prompt masked) and the prompt lengths."""
        model = self.model
        device = model.embed_tokens.weight.device
        distinct = list(dict.fromkeys(rows[k].prompt_index for k in take))
        longest = max(len(prompts[i]) for i in distinct)
        ids = torch.zeros((len(distinct), longest), dtype=torch.long)
        valid = torch.zeros((len(distinct), cache_len), dtype=torch.bool)
        for u, i in enumerate(distinct):
            p = prompts[i]
            ids[u, longest - len(p):] = torch.tensor(p)
            valid[u, end - len(p):] = True
        # No mask at all when nothing is padded and no row will join: the unmasked attention kernel.
        unmasked = not masked and bool(valid[:, :end].all())
        cache = KVCache.for_model(model, len(distinct), cache_len, key_valid=None if unmasked else valid.to(device))
        # The LM head on the last position only: the prefill's other logits would cost as much as
        # dozens of decoding steps.
        logits = model.lm_head(model.hidden_states(ids.to(device), end - longest, cache)[:, -1]).float()
        slot = {i: u for u, i in enumerate(distinct)}
        expand = torch.tensor([slot[rows[k].prompt_index] for k in take], device=device)
        cache.select(expand)  # each distinct prompt's cache copied to its samples
        return logits.index_select(0, expand), cache, [len(prompts[rows[k].prompt_index]) for k in take]

    @torch.no_grad()
    def _wave(self, prompts: list[list[int]], params: SamplingParams, rows: list[_Row], waiting: deque[int]) -> None:
        """Decode waiting rows with `max_batch` slots until the wave's cache is used up or no row is
        left. Every row sits at the same cache position (the model decodes one position per step):
        a joining row's prompt is prefilled to end at the current position, keys left of it masked.
        Rotary attention depends on distances only, so where a row sits changes float rounding only."""
        model = self.model
        device = model.embed_tokens.weight.device
        max_len = model.cfg.max_seq_len
        take = [waiting.popleft() for _ in range(min(self.max_batch, len(waiting)))]
        width = max(len(prompts[rows[k].prompt_index]) for k in take)  # work lists run longest first
        if width + params.max_new_tokens > max_len:
            raise ValueError(f"prompt ({width} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
                             f"model's max_seq_len {max_len}; shorten prompts or max_new_tokens")
        # Room for rows to join until `join_limit`, each still able to make max_new_tokens tokens.
        cache_len = min(max_len, width + 2 * params.max_new_tokens) if waiting else width + params.max_new_tokens
        join_limit = cache_len - params.max_new_tokens
        logits, cache, _ = self._prefill(prompts, rows, take, width, cache_len, masked=bool(waiting))
        self.last_stats["waves"] += 1
        slot_row: list[int | None] = list(take)  # the row each cache slot decodes; None: free
        stop_ids = torch.tensor(sorted(set(params.stop_token_ids)), dtype=torch.long, device=device)
        temperature = params.temperature if not params.greedy else 1.0
        pos = width
        while True:
            live = [b for b, k in enumerate(slot_row) if k is not None]
            if not live:
                return
            pidx = np.array([rows[k].prompt_index if k is not None else 0 for k in slot_row], dtype=np.int64)
            sidx = np.array([rows[k].sample_index if k is not None else 0 for k in slot_row], dtype=np.int64)
            step = np.array([len(rows[k].tokens) if k is not None else 0 for k in slot_row], dtype=np.int64)
            uniforms = torch.from_numpy(row_uniforms(params.seed, pidx, sidx, step)).to(device)
            all_logps = (logits / temperature).log_softmax(-1)
            tokens = sample_tokens(all_logps, params, uniforms)
            logps = all_logps.gather(-1, tokens[:, None]).squeeze(-1).tolist()
            hits = torch.isin(tokens, stop_ids).tolist() if len(stop_ids) else None
            token_list = tokens.tolist()
            for b in live:
                row = rows[slot_row[b]]  # type: ignore[index]
                row.tokens.append(token_list[b])
                row.logprobs.append(logps[b])
                if (hits and hits[b]) or (params.stop and self._hit_stop_string(row.tokens, params.stop)):
                    row.finish = FINISH_STOP
                elif len(row.tokens) == params.max_new_tokens:
                    row.finish = FINISH_LENGTH
                if row.finish:
                    slot_row[b] = None
            free = [b for b, k in enumerate(slot_row) if k is None]
            live = [b for b, k in enumerate(slot_row) if k is not None]
            worth = len(free) >= max(1, len(slot_row) // 4)  # a join or a compaction pays for its copy
            can_join = bool(waiting) and pos + 1 <= join_limit
            if not live and not can_join:
                return
            if free and worth and not can_join:
                # Drop ended rows from the cache: every later step gets cheaper.
                index = torch.tensor(live, device=device)
                cache.select(index)
                tokens = tokens.index_select(0, index)
                slot_row = [slot_row[b] for b in live]
            logits = model(tokens[:, None], pos, cache)[:, -1].float()
            pos += 1
            self.last_stats["steps"] += 1
            self.last_stats["slot_steps"] += len(slot_row)
            if can_join and free and worth:
                joiners = [waiting.popleft() for _ in range(min(len(free), len(waiting)))]
                slots = free[: len(joiners)]
                new_logits, new_cache, lengths = self._prefill(prompts, rows, joiners, pos, pos, masked=True)
                index = torch.tensor(slots, device=device)
                first = pos - max(lengths)
                for layer in range(len(cache.k)):
                    cache.k[layer][index, :, first:pos] = new_cache.k[layer][:, :, first:pos]
                    cache.v[layer][index, :, first:pos] = new_cache.v[layer][:, :, first:pos]
                positions = torch.arange(cache_len, device=device)
                assert cache.key_valid is not None
                cache.key_valid[index] = positions[None, :] >= (pos - torch.tensor(lengths, device=device))[:, None]
                logits[index] = new_logits
                for b, k in zip(slots, joiners, strict=True):
                    slot_row[b] = k
                self.last_stats["joined"] += len(joiners)

    def _hit_stop_string(self, tokens: list[int], stops: tuple[str, ...]) -> bool:
        # The stop string must end in the newest token: decode a tail long enough to hold the
        # longest stop string (a token is at least one byte; +4 for a split UTF-8 character).
        assert self.tokenizer is not None
        window = max(len(s.encode()) for s in stops) + 4
        tail = self.tokenizer.decode(tokens[-window:], skip_special_tokens=False)
        head = self.tokenizer.decode(tokens[-window:-1], skip_special_tokens=False) if len(tokens) > 1 else ""
        return any(s in tail and s not in head for s in stops)

    def _finish(self, prompts: list[list[int]], params: SamplingParams, row: _Row) -> Rollout:
        text = None
        if self.tokenizer is not None:
            body = row.tokens[:-1] if row.tokens and row.tokens[-1] in params.stop_token_ids else row.tokens
            text = self.tokenizer.decode(body, skip_special_tokens=False)
            if row.finish == FINISH_STOP and params.stop:
                cuts = [text.find(s) + len(s) for s in params.stop if s in text]
                if cuts:
                    text = text[: min(cuts)]
        return Rollout(row.prompt_index, row.sample_index, prompts[row.prompt_index], row.tokens, row.logprobs,
                       row.finish or FINISH_LENGTH, text)


# ----------------------------------------------------------------------------- Ray
class _RolloutActor:
    """Holds one copy of the policy; created by RayRollout with `ray.remote`."""

    def __init__(self, model_config: dict[str, Any], state_dict: Mapping[str, torch.Tensor],
                 tokenizer_json: str | None, max_batch: int, threads: int) -> None:
        torch.set_num_threads(threads)
        model = Transformer(ModelConfig.from_dict(model_config))
        model.load_state_dict(dict(state_dict), strict=True)
        tokenizer = None
        if tokenizer_json is not None:
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_str(tokenizer_json)
        self.engine = LocalRollout(model.eval(), tokenizer, max_batch)

    def load_weights(self, state_dict: Mapping[str, torch.Tensor]) -> bool:
        self.engine.load_weights(state_dict)
        return True

    def generate_work(self, prompts: list[list[int]], params: SamplingParams, work: list[WorkList]) -> list[Rollout]:
        return self.engine.generate_work(prompts, params, work)


class RayRollout(RolloutBackend):
    """The same rollouts from `num_actors` Ray actors, each holding the policy.

    Rows are planned here into work lists of `max_rows` rows, as `LocalRollout` plans them, and
    whole lists go to actors (balanced by rows x length): each actor runs exactly the computation
    the in-process engine with the same `max_batch` and `max_rows` runs, so for the same seed the
    rollouts are the same (tested with 2 local actors). Smaller `max_rows` spreads a call over more
    actors; larger keeps each actor's batch full. `load_weights` puts the state dict in the object
    store once and every actor loads it. Uses the running Ray instance, or starts a local one.
    """

    def __init__(self, model: Transformer, num_actors: int = 2, tokenizer: Tokenizer | None = None,
                 max_batch: int = 64, max_rows: int = 256, threads_per_actor: int = 1,
                 num_gpus_per_actor: float = 0.0) -> None:
        import ray

        if num_actors < 1:
            raise ValueError(f"num_actors must be >= 1, got {num_actors}")
        if not ray.is_initialized():
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # else newer Ray writes ~/.ray/auth_token
            ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
        self.max_batch, self.max_rows = max_batch, max_rows
        state = ray.put({k: v.detach().cpu() for k, v in model.state_dict().items()})
        actor_cls = ray.remote(num_cpus=threads_per_actor, num_gpus=num_gpus_per_actor)(_RolloutActor)
        tok_json = tokenizer.to_str() if tokenizer is not None else None
        self.actors = [actor_cls.remote(model.cfg.to_dict(), state, tok_json, max_batch, threads_per_actor)
                       for _ in range(num_actors)]

    def load_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        import ray

        ref = ray.put({k: v.detach().cpu() for k, v in state_dict.items()})
        ray.get([a.load_weights.remote(ref) for a in self.actors])

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Rollout]:
        import ray

        checked = [list(map(int, p)) for p in prompts]
        shares: list[list[WorkList]] = [[] for _ in self.actors]
        load = [0] * len(self.actors)
        for item in plan_work(checked, params.n, self.max_rows):  # longest first: greedy balancing
            k = load.index(min(load))
            shares[k].append(item)
            load[k] += len(item.rows) * (len(checked[item.rows[0][0]]) + params.max_new_tokens)
        prompts_ref = ray.put(checked)
        futures = [a.generate_work.remote(prompts_ref, params, share)
                   for a, share in zip(self.actors, shares, strict=True) if share]
        out = [r for part in ray.get(futures) for r in part]
        out.sort(key=lambda r: (r.prompt_index, r.sample_index))
        return out

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []


# ----------------------------------------------------------------------------- for objectives
def collate_rollouts(rollouts: Sequence[Rollout], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Padded tensors of prompt + completion, right-padded (causal attention never sees the padding):

    input_ids [N, T]; completion_mask [N, T] (1 on completion tokens, the label convention of
    `training.logprobs`: the prediction at t counts iff mask[t + 1]); old_logps [N, T-1] aligned with
    `training.logprobs.token_logps` (entry t is the log-prob of input_ids[t + 1], 0 off the
    completion); prompt_index and sample_index [N] (GRPO groups by prompt_index).
    """
    if not rollouts:
        raise ValueError("collate_rollouts needs at least one rollout")
    width = max(len(r.prompt_ids) + len(r.token_ids) for r in rollouts)
    n = len(rollouts)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.bool)
    old = torch.zeros((n, width - 1), dtype=torch.float32)
    for k, r in enumerate(rollouts):
        p, c = len(r.prompt_ids), len(r.token_ids)
        input_ids[k, :p] = torch.tensor(r.prompt_ids)
        if c:
            input_ids[k, p: p + c] = torch.tensor(r.token_ids)
            mask[k, p: p + c] = True
            old[k, p - 1: p - 1 + c] = torch.tensor(r.logprobs)
    return {"input_ids": input_ids, "completion_mask": mask, "old_logps": old,
            "prompt_index": torch.tensor([r.prompt_index for r in rollouts]),
            "sample_index": torch.tensor([r.sample_index for r in rollouts])}
