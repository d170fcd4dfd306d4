"""Per-token and per-sequence log-probabilities of given tokens under a causal LM, with loss masks.

The label convention of every post-training stage (docs/posttraining.md): the model predicts token
t+1 from position t, and the prediction at t counts iff ``mask[t+1]`` is set. DPO needs the summed
log-probability of the response, log π(y|x) = Σ_t log π(y_t | x, y_<t), and its token count (the
length-normalized variants divide by it); GRPO/PPO will need the per-token values.
"""

from __future__ import annotations

import torch


def token_logps(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[:, t+1] | ids[:, :t+1]) for t < T-1: [B, T-1] float32 from logits [B, T, V].

    Gathers the target logit and subtracts the log-partition instead of materializing a second
    [B, T, V] tensor with `log_softmax`; upcast to float32 first so bf16 logits lose nothing.
    """
    if logits.shape[:2] != ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match ids {tuple(ids.shape)}")
    logits = logits[:, :-1].float()
    targets = ids[:, 1:].unsqueeze(-1)
    return logits.gather(-1, targets).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def sequence_logps(
    logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the masked targets' log-probs [B], number of masked targets [B]).

    ``mask`` [B, T] marks target tokens; padding must be 0 in it. Positions are zeroed with
    ``where`` rather than multiplied, so a -inf log-prob of a padding token cannot turn into NaN.
    """
    per_token = token_logps(logits, ids)
    target = mask[:, 1:].bool()
    summed = torch.where(target, per_token, torch.zeros_like(per_token)).sum(-1)
    return summed, target.sum(-1)
