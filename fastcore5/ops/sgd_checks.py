"""What valid arguments of the fused SGD step are: the checks of params, gradients and the
skip-protocol tensors, each failure naming the argument (fastcore5.ops.sgd's functional form and
fastcore5.optim.SGD call them; the hyper-parameters' checks are SGDHyper.check)."""
from __future__ import annotations

import torch
from torch import Tensor

from .._checks import FLOAT_DTYPES, check_tensor


def check_param_and_grad(p, g, p_name: str, g_name: str) -> None:
    """A param and its gradient as the kernels need them; errors name the argument."""
    check_tensor(p_name, p)
    check_tensor(g_name, g)
    if p.is_complex():
        raise TypeError(f"{p_name} is complex ({p.dtype}); fastcore5 SGD supports real floating dtypes only")
    if p.dtype not in FLOAT_DTYPES:
        allowed = ", ".join(str(d).replace("torch.", "") for d in FLOAT_DTYPES)
        raise TypeError(f"{p_name} has dtype {p.dtype}; expected one of: {allowed}")
    _check_matches(p, g, p_name, g_name)


def check_sparse_grad(p, g, p_name: str, g_name: str, hyper) -> None:
    """A sparse gradient that ``SparseGradStep`` can apply under ``hyper`` (an SGDHyper); errors name
    it (and weight_decay)."""
    if g.layout is not torch.sparse_coo:
        raise TypeError(f"{g_name} must be a dense (strided) or sparse COO tensor, got layout {g.layout}")
    _check_matches(p, g, p_name, g_name)
    if hyper.weight_decay != 0 and not hyper.decoupled_weight_decay:
        raise ValueError(
            f"{g_name} is sparse, and weight_decay={hyper.weight_decay} (L2, added to the gradient) needs the "
            "dense param in it; torch.optim.SGD refuses this too. Use weight_decay=0 or decoupled_weight_decay=True "
            "for this param group"
        )


def _check_matches(p, g, p_name: str, g_name: str) -> None:
    if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
        raise ValueError(
            f"{g_name} must match {p_name} in shape, dtype and device: got {tuple(g.shape)} {g.dtype} {g.device} "
            f"for {tuple(p.shape)} {p.dtype} {p.device}"
        )


def check_same_strides(p, t, p_name: str, t_name: str) -> None:
    """The C++ kernels walk a param, its gradient and its momentum buffer element by element in
    memory: each needs the param's strides (torch ties only shape, dtype and device to it)."""
    if t.stride() != p.stride():
        raise ValueError(
            f"{t_name} has strides {t.stride()} but {p_name} has strides {p.stride()}: the C++ kernels need the "
            "gradient and the momentum buffer laid out like their param (make them all contiguous)"
        )


def check_flag(name: str, t: Tensor | None, dtypes, one_element: bool) -> None:
    """A skip-protocol tensor (grad_scale, found_inf, skip_flag): None, or a dense tensor of
    ``dtypes`` with one element (``one_element``) or at least one."""
    if t is not None:
        check_tensor(name, t, dtypes=dtypes)
        if one_element and t.numel() != 1:
            raise ValueError(f"{name} must have exactly one element, got shape {tuple(t.shape)}")
        if t.numel() < 1:
            raise ValueError(f"{name} must have at least one element, got shape {tuple(t.shape)}")
