"""Momentum (EMA) encoder updates, MoCo style, with an optional cosine schedule of the coefficient."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def make_momentum_copy(model: nn.Module) -> nn.Module:
    """A frozen deep copy of ``model`` to be updated only by :func:`update_momentum`."""
    ema = copy.deepcopy(model)
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema


@torch.no_grad()
def update_momentum(model: nn.Module, ema: nn.Module, m: float) -> None:
    """``ema = m * ema + (1 - m) * model`` for parameters; buffers (norm statistics) are copied.

    Copying buffers rather than averaging them is deliberate: running statistics are estimates
    of the current data, not weights, and an EMA of them lags behind the parameters they
    normalise for (the default encoder uses instance norm and has none).
    """
    for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
        p_ema.mul_(m).add_(p.detach(), alpha=1.0 - m)
    for b_ema, b in zip(ema.buffers(), model.buffers(), strict=True):
        b_ema.copy_(b)


def cosine_schedule(step: int, max_steps: int, start: float, end: float) -> float:
    """Cosine ramp from ``start`` (step 0) to ``end`` (step ``max_steps``), as in BYOL / solo-learn."""
    if max_steps <= 0:
        return end
    t = min(max(step, 0), max_steps) / max_steps
    return end - (end - start) * (math.cos(math.pi * t) + 1) / 2
