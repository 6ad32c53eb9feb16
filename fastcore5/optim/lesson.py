"""The lesson's discriminative learning rates over layer groups, by fastai's rules."""
from __future__ import annotations

from collections.abc import Iterable
from numbers import Real

from torch import nn

from .._checks import check_int, check_real

__all__ = ["even_mults", "lr_range", "discriminative_param_groups"]


def even_mults(start: float, stop: float, n: int) -> list[float]:
    """n values from start to stop, evenly spaced on a log scale (fastai's even_mults). start and
    stop must be finite and > 0 (start is not read when n == 1), n an int >= 1."""
    n = check_int("n", n, 1)
    stop = check_real("stop", stop, positive=True)
    if n == 1:
        return [stop]
    start = check_real("start", start, positive=True)
    ratio = (stop / start) ** (1 / (n - 1))
    return [start * ratio**i for i in range(n - 1)] + [stop]


def lr_range(lr: float | slice, n: int) -> list[float]:
    """One learning rate per layer group, by fastai 2's rule: ``slice(lo, hi)`` spreads lo..hi
    geometrically over the n groups; ``slice(hi)`` gives hi/10 to every group but the last, which
    gets hi; a float gives every group the same rate. Rates must be finite: a float lr >= 0, the
    bounds of a slice > 0 (a geometric spread needs them); n an int >= 1."""
    n = check_int("n", n, 1)
    if isinstance(lr, slice):
        if lr.step is not None:
            raise ValueError("an lr slice takes no step: use slice(lo, hi) or slice(hi)")
        if lr.stop is None:
            raise ValueError("an lr slice needs a stop: slice(lo, hi) or slice(hi)")
        if lr.start is not None and not (isinstance(lr.start, (int, float)) and lr.start == 0):  # fastai: 0 is no start
            return even_mults(check_real("lr.start", lr.start, positive=True), check_real("lr.stop", lr.stop, positive=True), n)
        stop = check_real("lr.stop", lr.stop, positive=True)
        return [stop / 10] * (n - 1) + [stop]
    if isinstance(lr, bool) or not isinstance(lr, Real):
        raise TypeError(f"lr must be a float or a slice, got {lr!r}")
    return [check_real("lr", lr)] * n


def discriminative_param_groups(layer_groups: Iterable, lr: float | slice, **hyper) -> list[dict]:
    """Param groups for an optimizer, one per layer group (an nn.Module or an iterable of params),
    with learning rates from ``lr_range(lr, len(layer_groups))`` and any other hyperparameters
    (momentum=..., weight_decay=...) copied into every group.

    Example (lesson 5): ``SGD(discriminative_param_groups([body, head], slice(1e-5, 1e-3)),
    momentum=0.9)``, then ``opt.freeze()`` / ``opt.unfreeze()`` over those groups."""
    try:
        groups = [list(g.parameters()) if isinstance(g, nn.Module) else list(g) for g in layer_groups]
    except TypeError:
        raise TypeError(
            f"layer_groups must be an iterable of nn.Module or of iterables of params, got {layer_groups!r}"
        ) from None
    if not groups:
        raise ValueError("layer_groups is empty")
    return [dict(params=params, lr=rate, **hyper) for params, rate in zip(groups, lr_range(lr, len(groups)))]
