"""Learning-rate schedules stepped once per optimizer step.

Each factory takes the optimizer and the run's total number of optimizer steps (known
only once the data and trainer settings are resolved, so the configs give them as
``_partial_`` targets) and returns a :class:`torch.optim.lr_scheduler.LambdaLR`, whose
``state_dict`` is plain data and round-trips through a checkpoint.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["warmup_cosine", "poly", "warmup_constant"]


def _check(total_steps: int, warmup: float) -> int:
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, but got total_steps={total_steps}")
    if not 0.0 <= warmup < 1.0:
        raise ValueError(f"warmup is a share of the steps in [0, 1), but got warmup={warmup}")
    return int(round(warmup * total_steps))


def warmup_cosine(optimizer: Optimizer, total_steps: int, warmup: float = 0.05, min_lr_ratio: float = 0.0) -> LambdaLR:
    """Linear warm-up, then cosine decay.

    The factor applied to each group's base lr at step ``t`` (0-based, ``W`` warm-up steps,
    ``T`` total) is ``(t + 1) / W`` for ``t < W``, then
    ``m + (1 - m) * (1 + cos(pi * (t - W) / (T - W))) / 2`` with ``m = min_lr_ratio``.

    Args:
        optimizer: the optimizer whose groups' lr are scheduled.
        total_steps: number of optimizer steps of the whole run, ``T >= 1``.
        warmup: share of ``T`` spent warming up, in ``[0, 1)``. Default 0.05.
        min_lr_ratio: final lr as a fraction of the base lr. Default 0.
    """
    warm = _check(total_steps, warmup)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def poly(optimizer: Optimizer, total_steps: int, exponent: float = 0.9) -> LambdaLR:
    """nnU-Net's polynomial decay: factor ``(1 - t / T) ** exponent`` at step ``t``.

    Args:
        optimizer: the optimizer whose groups' lr are scheduled.
        total_steps: number of optimizer steps of the whole run, ``T >= 1``.
        exponent: decay exponent. Default 0.9.
    """
    _check(total_steps, 0.0)
    return LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / total_steps) ** exponent)


def warmup_constant(optimizer: Optimizer, total_steps: int, warmup: float = 0.0) -> LambdaLR:
    """Constant lr after an optional linear warm-up over the first ``warmup * T`` steps.

    Args:
        optimizer: the optimizer whose groups' lr are scheduled.
        total_steps: number of optimizer steps of the whole run, ``T >= 1``.
        warmup: share of ``T`` spent warming up, in ``[0, 1)``. Default 0.
    """
    warm = _check(total_steps, warmup)
    return LambdaLR(optimizer, lambda step: (step + 1) / warm if step < warm else 1.0)
