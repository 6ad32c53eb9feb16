"""The "torch" backend of EmbeddingDotBias: the reference (``fastcore5.reference``) run eagerly
with the kernels' promises for bad indices, and wrapped as forward/backward launchers for the
custom-op path under torch.compile. Called from ``fastcore5.ops.embedding_dot_bias``.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference
from .embedding_dot_bias_checks import check_index_range

__all__ = ["torch_backend", "torch_kernels"]


def _valid_rows(users, items, num_users, num_items):
    """(valid, users, items): which samples have both indices in range, and the indices with the
    bad ones replaced by row 0 (read, then masked out)."""
    valid = (users >= 0) & (users < num_users) & (items >= 0) & (items < num_items)
    return valid, torch.where(valid, users, 0).long(), torch.where(valid, items, 0).long()


def _torch_forward(users, items, u_weight, i_weight, u_bias, i_bias, y_lo, y_hi, index_error_flag):
    """The reference as a forward launcher (the kernels' contract: a bad sample scores NaN)."""
    if u_weight.shape[0] == 0 or i_weight.shape[0] == 0:
        return u_weight.new_full(users.shape, float("nan"))
    valid, users, items = _valid_rows(users, items, u_weight.shape[0], i_weight.shape[0])
    bounds = None if y_lo is None else (y_lo, y_hi)
    out = reference.embedding_dot_bias(users, items, u_weight, i_weight, u_bias, i_bias, bounds)
    return torch.where(valid, out, float("nan"))


def _torch_backward(grad_out, users, items, u_weight, i_weight, u_bias, i_bias, num_users, num_items, y_lo, y_hi,
                    need_u_weight, need_i_weight, need_u_bias, need_i_bias, deterministic, sparse):
    """The reference's gradients as a backward launcher (contract: ``embedding_dot_bias_backward_op``)."""
    valid, users, items = _valid_rows(users, items, num_users, num_items)
    grad = torch.where(valid, grad_out, 0)
    if y_lo is not None:
        res = (u_weight[users] * i_weight[items]).sum(-1) + u_bias.reshape(-1)[users] + i_bias.reshape(-1)[items]
        squashed = torch.sigmoid(res)
        grad = grad * squashed * (1 - squashed) * (y_hi - y_lo)
    per_sample = (
        grad[:, None] * i_weight[items] if need_u_weight else None,
        grad[:, None] * u_weight[users] if need_i_weight else None,
        grad if need_u_bias else None,
        grad.clone() if need_i_bias else None,  # outputs of a custom op may not alias each other
    )
    if sparse:
        return tuple(g if g is not None else grad_out.new_empty(0) for g in per_sample)
    factors = (u_weight if u_weight is not None else i_weight).shape[1]
    shapes = ((num_users, factors), (num_items, factors), (num_users,), (num_items,))
    rows = (users, items, users, items)
    return tuple(
        grad_out.new_empty(0) if g is None else grad_out.new_zeros(shape).index_add_(0, index, g)
        for g, shape, index in zip(per_sample, shapes, rows)
    )


def torch_kernels():
    return SimpleNamespace(
        forward=_torch_forward, backward=_torch_backward, with_autograd=None, checks_sync_in_pass=False
    )


def _sparse_lookup(indices: Tensor, bias: Tensor) -> Tensor:
    """bias[indices] as (B,), with a sparse gradient shaped like ``bias``: (n, 1) or (n,)."""
    if bias.dim() == 2:
        return F.embedding(indices, bias, sparse=True)[:, 0]
    return torch.gather(bias, 0, indices.to(torch.int64), sparse_grad=True)


def _torch_sparse(users, items, u_weight, i_weight, u_bias, i_bias, y_range):
    """The reference computed with nn.Embedding-style sparse gradients (F.embedding(sparse=True))."""
    dot = (F.embedding(users, u_weight, sparse=True) * F.embedding(items, i_weight, sparse=True)).sum(-1)
    # No reshape of a table on the way in: view backwards reject sparse gradients.
    u_b = _sparse_lookup(users, u_bias)
    i_b = _sparse_lookup(items, i_bias)
    res = dot + u_b + i_b
    if y_range is None:
        return res
    lo, hi = y_range
    return torch.sigmoid(res) * (hi - lo) + lo


def torch_backend(users, items, u_weight, i_weight, u_bias, i_bias, y_lo, y_hi, sparse, validate):
    """The "torch" backend, keeping the kernels' promise for bad indices: "sync" (and "device",
    which it cannot do inside a kernel) raises IndexError before computing; "off", and every mode
    under torch.compile (which cannot read indices on the host), scores a bad sample NaN and gives
    it no gradient, as the kernels do."""
    bounds = None if y_lo is None else (y_lo, y_hi)
    compute = _torch_sparse if sparse else reference.embedding_dot_bias
    num_users, num_items = u_weight.shape[0], i_weight.shape[0]
    if validate != "off" and not torch.compiler.is_compiling():
        check_index_range(users, items, num_users, num_items)
        return compute(users, items, u_weight, i_weight, u_bias, i_bias, bounds)
    if num_users == 0 or num_items == 0:  # every sample is bad; there is no row to read
        return u_weight.new_full(users.shape, float("nan"))
    valid, safe_users, safe_items = _valid_rows(users, items, num_users, num_items)
    out = compute(safe_users, safe_items, u_weight, i_weight, u_bias, i_bias, bounds)
    return torch.where(valid, out, float("nan"))
