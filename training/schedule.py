"""Learning-rate schedules as pure functions of the optimizer step.

Conventions shared by every schedule (``step`` is the 0-based index of the optimizer step about to
be taken, ``total`` the number of optimizer steps in the run):
- warmup: ``lr = peak * (step + 1) / warmup`` for ``step < warmup``, so the first step already moves
  and step ``warmup - 1`` is at the peak;
- decay progress ``p = (step + 1 - start) / (total - start)`` so the last step (``total - 1``) lands
  exactly on ``min_lr`` and no step is wasted at the starting value.

Being pure functions of the step, a resumed run needs only the step to continue the schedule.
"""

from __future__ import annotations

import math


def _warmup(step: int, warmup: int, peak: float) -> float | None:
    if step < warmup:
        return peak * (step + 1) / warmup
    return None


def _progress(step: int, start: int, total: int) -> float:
    span = total - start
    if span <= 0:
        return 1.0
    return min(1.0, max(0.0, (step + 1 - start) / span))


def constant_lr(step: int, *, peak: float, warmup: int, total: int) -> float:
    w = _warmup(step, warmup, peak)
    return peak if w is None else w


def cosine_lr(step: int, *, peak: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Warmup, then half a cosine from ``peak`` to ``peak * min_ratio`` at the last step."""
    w = _warmup(step, warmup, peak)
    if w is not None:
        return w
    p = _progress(step, warmup, total)
    lo = peak * min_ratio
    return lo + (peak - lo) * 0.5 * (1.0 + math.cos(math.pi * p))


def linear_lr(step: int, *, peak: float, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """Warmup, then a straight line from ``peak`` to ``peak * min_ratio``: the mid-training anneal
    (OLMo 2 anneals linearly to 0 over its mid-training mix, arXiv:2501.00656 section 4)."""
    w = _warmup(step, warmup, peak)
    if w is not None:
        return w
    p = _progress(step, warmup, total)
    lo = peak * min_ratio
    return peak + (lo - peak) * p


def wsd_lr(step: int, *, peak: float, warmup: int, total: int, min_ratio: float = 0.0,
           decay_fraction: float = 0.2, decay_shape: str = "linear") -> float:
    """Warmup-stable-decay: warmup, hold ``peak``, then decay over the last ``decay_fraction`` of the
    steps. Hu et al. 2024 (MiniCPM, arXiv:2404.06395) introduced it; Hägele et al. 2024
    (arXiv:2405.18392) found a ~20% cooldown with the ``1-sqrt`` shape matches cosine."""
    w = _warmup(step, warmup, peak)
    if w is not None:
        return w
    decay_steps = round(decay_fraction * total)
    start = max(warmup, total - decay_steps)
    if step < start:
        return peak
    p = _progress(step, start, total)
    lo = peak * min_ratio
    if decay_shape == "linear":
        frac = 1.0 - p
    elif decay_shape == "1-sqrt":
        frac = 1.0 - math.sqrt(p)
    else:
        raise ValueError(f"unknown wsd decay_shape {decay_shape!r}; expected 'linear' or '1-sqrt'")
    return lo + (peak - lo) * frac


def lr_at(step: int, *, schedule: str, peak: float, warmup: int, total: int, min_ratio: float,
          decay_fraction: float = 0.2, decay_shape: str = "linear") -> float:
    """Dispatch on the schedule name used in the config (``optim.schedule``)."""
    if schedule == "cosine":
        return cosine_lr(step, peak=peak, warmup=warmup, total=total, min_ratio=min_ratio)
    if schedule == "wsd":
        return wsd_lr(step, peak=peak, warmup=warmup, total=total, min_ratio=min_ratio,
                      decay_fraction=decay_fraction, decay_shape=decay_shape)
    if schedule == "linear":
        return linear_lr(step, peak=peak, warmup=warmup, total=total, min_ratio=min_ratio)
    if schedule == "constant":
        return constant_lr(step, peak=peak, warmup=warmup, total=total)
    raise ValueError(f"unknown schedule {schedule!r}; expected cosine, wsd, linear or constant")
