"""The lesson's discriminative learning rates over layer groups, by fastai's rules."""
from __future__ import annotations

import math
from collections.abc import Iterable

from torch import nn

__all__ = ["even_mults", "lr_range", "discriminative_param_groups"]


def even_mults(start: float, stop: float, n: int) -> list[float]:
    """n values from start to stop, evenly spaced on a log scale (fastai's even_mults)."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if n == 1:
        return [float(stop)]
    if start <= 0 or stop <= 0:
        raise ValueError(f"start and stop must be positive for a geometric spread, got {start} and {stop}")
    ratio = (stop / start) ** (1 / (n - 1))
    return [start * ratio**i for i in range(n - 1)] + [float(stop)]


def lr_range(lr: float | slice, n: int) -> list[float]:
    """One learning rate per layer group, by fastai 2's rule: ``slice(lo, hi)`` spreads lo..hi
    geometrically over the n groups; ``slice(hi)`` gives hi/10 to every group but the last, which
    gets hi; a float gives every group the same rate."""
    if isinstance(lr, slice):
        if lr.step is not None:
            raise ValueError("an lr slice takes no step: use slice(lo, hi) or slice(hi)")
        if lr.stop is None:
            raise ValueError("an lr slice needs a stop: slice(lo, hi) or slice(hi)")
        if lr.start:
            return even_mults(lr.start, lr.stop, n)
        return [lr.stop / 10] * (n - 1) + [float(lr.stop)]
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr):
        raise TypeError(f"lr must be a float or a slice, got {lr!r}")
    return [float(lr)] * n


def discriminative_param_groups(layer_groups: Iterable, lr: float | slice, **hyper) -> list[dict]:
    """Param groups for an optimizer, one per layer group (an nn.Module or an iterable of params),
    with learning rates from ``lr_range(lr, len(layer_groups))`` and any other hyperparameters
    (momentum=..., weight_decay=...) copied into every group.

    Example (lesson 5): ``SGD(discriminative_param_groups([body, head], slice(1e-5, 1e-3)),
    momentum=0.9)``, then ``opt.freeze()`` / ``opt.unfreeze()`` over those groups."""
    groups = [list(g.parameters()) if isinstance(g, nn.Module) else list(g) for g in layer_groups]
    if not groups:
        raise ValueError("layer_groups is empty")
    return [dict(params=params, lr=rate, **hyper) for params, rate in zip(groups, lr_range(lr, len(groups)))]
