"""Argument checks shared by every op: each failure names the offending argument."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(
    name: str,
    value,
    *,
    dtypes: Iterable[torch.dtype] | None = None,
    ndim: int | tuple[int, ...] | None = None,
) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.layout is not torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {value.layout}")
    if dtypes is not None and value.dtype not in tuple(dtypes):
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {value.dtype}; expected one of: {allowed}")
    if ndim is not None:
        allowed_ndim = (ndim,) if isinstance(ndim, int) else ndim
        if value.dim() not in allowed_ndim:
            noun = "dimension" if allowed_ndim == (1,) else "dimensions"
            raise ValueError(f"{name} must have {' or '.join(map(str, allowed_ndim))} {noun}, got shape {tuple(value.shape)}")
    return value


def check_same_device(**tensors: Tensor | None) -> torch.device:
    """All given tensors live on one device; the error names each argument's device."""
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"expected all tensors on one device, got {where}")
    return next(iter(devices))


def check_same_dtype(**tensors: Tensor | None) -> torch.dtype:
    present = {name: t for name, t in tensors.items() if t is not None}
    dtypes = {t.dtype for t in present.values()}
    if len(dtypes) > 1:
        what = ", ".join(f"{name} is {t.dtype}" for name, t in present.items())
        raise TypeError(f"expected one dtype for all tensors, got {what}")
    return next(iter(dtypes))
