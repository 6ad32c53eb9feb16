"""Snapshots for the reliability tests: a refused call must leave every tensor and every optimizer
state entry bit-identical (values, and which tensors exist), which ``assert_unchanged`` checks."""
from __future__ import annotations

import copy

import torch

CPU_BACKENDS = ("torch", "triton")


def _freeze(value):
    if isinstance(value, torch.Tensor):
        dense = value.detach().to_dense() if value.layout is not torch.strided else value.detach()
        return ("tensor", value.layout, value.dtype, tuple(value.shape), dense.clone())
    if isinstance(value, dict):
        return {k: _freeze(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_freeze(v) for v in value)
    return copy.deepcopy(value)


def snapshot(params, optimizer=None, modules=()):
    """Values of params, their .grad, the optimizer's state and param groups, and module state."""
    shot = {
        "params": [_freeze(p) for p in params],
        "grads": [None if p.grad is None else _freeze(p.grad) for p in params],
        "requires_grad": [p.requires_grad for p in params],
    }
    if optimizer is not None:
        shot["state"] = [_freeze(dict(optimizer.state.get(p, {}))) for p in params]
        shot["groups"] = [
            {k: (_freeze(v) if k != "params" else [id(q) for q in v]) for k, v in g.items()}
            for g in optimizer.param_groups
        ]
    shot["modules"] = [_freeze(m.state_dict()) for m in modules]
    return shot


def _same(a, b) -> bool:
    if isinstance(a, tuple) and a and a[0] == "tensor":
        return (
            isinstance(b, tuple) and b[:4] == a[:4]
            and torch.equal(torch.nan_to_num(a[4], nan=7.0), torch.nan_to_num(b[4], nan=7.0))
            and bool((a[4].isnan() == b[4].isnan()).all())
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, type(a)) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


def assert_unchanged(before, after, what="a refused call"):
    for key in before:
        assert _same(before[key], after[key]), f"{what} changed {key}"
