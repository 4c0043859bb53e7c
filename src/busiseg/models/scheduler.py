"""Learning-rate schedules (config group ``scheduler``), stepped every optimizer step."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, OneCycleLR


def warmup_cosine(optimizer: Optimizer, total_steps: int, warmup_fraction: float = 0.05,
                  min_lr_ratio: float = 0.01) -> LambdaLR:
    """Linear warm-up over ``warmup_fraction`` of the steps, then cosine decay to
    ``min_lr_ratio`` x the base learning rate at ``total_steps``."""
    if not 0.0 <= warmup_fraction < 1.0:
        raise ValueError(f"scheduler.warmup_fraction must be in [0, 1), got {warmup_fraction}")
    total_steps = max(1, int(total_steps))
    warmup = int(round(warmup_fraction * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def one_cycle(optimizer: Optimizer, total_steps: int, pct_start: float = 0.3, div_factor: float = 25.0,
              final_div_factor: float = 1.0e4, cycle_momentum: bool = True) -> OneCycleLR:
    """Smith's one-cycle policy (``torch.optim.lr_scheduler.OneCycleLR``, cosine annealing): the
    learning rate rises from ``lr / div_factor`` to the optimizer's ``lr`` over ``pct_start`` of the
    steps, then falls to ``lr / (div_factor * final_div_factor)``; with ``cycle_momentum`` the momentum
    (Adam's beta1) moves the other way, 0.95 -> 0.85 -> 0.95. The peak is each parameter group's ``lr``."""
    if not 0.0 < pct_start < 1.0:
        raise ValueError(f"scheduler.pct_start must be in (0, 1), got {pct_start}")
    if div_factor <= 0 or final_div_factor <= 0:
        raise ValueError(f"scheduler.div_factor and scheduler.final_div_factor must be > 0, "
                         f"got {div_factor} and {final_div_factor}")
    peaks = [group["lr"] for group in optimizer.param_groups]
    total_steps = max(2, int(total_steps))
    if abs(pct_start * total_steps - 1.0) < 1e-9:
        # a warm-up of exactly one step makes torch divide by zero (e.g. 5 steps at 0.2): a hair longer instead
        pct_start *= 1.001
    return OneCycleLR(optimizer, max_lr=peaks, total_steps=total_steps, pct_start=pct_start,
                      div_factor=div_factor, final_div_factor=final_div_factor, anneal_strategy="cos",
                      cycle_momentum=cycle_momentum)
