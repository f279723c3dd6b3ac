"""Learning-rate schedule: linear warmup, then cosine decay to a floor; and a linear weight-decay ramp.

The schedule is a closed-form function of the optimizer step, wrapped in ``LambdaLR``. The closed
form (rather than chaining ``LinearLR`` + ``CosineAnnealingLR`` in ``SequentialLR``) makes the value
at step ``s`` independent of how the run got there, so a resumed run gets bit-identical rates.
"""
from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine_lr(step: int, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int,
                     start_ratio: float | None = None) -> float:
    """Learning rate for the update that follows ``step`` completed optimizer steps.

    Warmup ramps linearly from ``base_lr / warmup_steps`` (not 0, so the first update moves the
    weights), or from ``start_ratio * base_lr`` when given (CooPre: 2e-4 -> 2e-3), to ``base_lr``;
    the cosine part then falls from ``base_lr`` to ``min_lr`` at ``total_steps``.
    """
    if step < warmup_steps:
        if start_ratio is not None:
            return base_lr * (start_ratio + (1.0 - start_ratio) * step / warmup_steps)
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max((step - warmup_steps) / decay_steps, 0.0), 1.0)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


class WarmupCosineFactor:
    """Picklable multiplier ``lr(step) / base_lr`` for ``LambdaLR`` (its state is saved by value)."""

    def __init__(self, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int,
                 start_ratio: float | None = None):
        self.base_lr = base_lr
        self.min_lr = min_lr
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.start_ratio = start_ratio

    def __call__(self, step: int) -> float:
        lr = warmup_cosine_lr(step, self.base_lr, self.min_lr, self.warmup_steps, self.total_steps,
                              getattr(self, "start_ratio", None))  # factors pickled before the option
        return lr / self.base_lr


def build_warmup_cosine(
    optimizer: Optimizer, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int,
    start_ratio: float | None = None,
) -> LambdaLR:
    """``LambdaLR`` that sets every parameter group to :func:`warmup_cosine_lr` of the step count.

    Every group's initial lr must equal ``base_lr``; the factor is relative to it.
    """
    if base_lr <= 0:
        raise ValueError(f"base_lr must be > 0, got {base_lr}")
    return LambdaLR(optimizer, WarmupCosineFactor(base_lr, min_lr, warmup_steps, total_steps, start_ratio))


def linear_weight_decay(step: int, total_steps: int, start: float, end: float) -> float:
    """Weight decay for the update that follows ``step`` completed steps: ``start`` at step 0 rising
    linearly to ``end`` at ``total_steps`` (SmartPretrain's ``adjust_learning_rate_decay``: 0.01 -> 0.1,
    there per epoch)."""
    return start + (end - start) * min(max(step / max(total_steps, 1), 0.0), 1.0)
