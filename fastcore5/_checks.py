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
    return _shared("device", tensors, ValueError, "all tensors on one device", "on")


def check_same_dtype(**tensors: Tensor | None) -> torch.dtype:
    """All given tensors have one dtype; the error names each argument's dtype."""
    return _shared("dtype", tensors, TypeError, "one dtype for all tensors", "is")


def _shared(attribute: str, tensors: dict, error: type[Exception], expected: str, verb: str):
    """The one value of ``attribute`` among the tensors that are not None, else ``error`` saying
    ``expected`` and listing each argument as "name <verb> value"."""
    present = {name: t for name, t in tensors.items() if t is not None}
    values = {getattr(t, attribute) for t in present.values()}
    if len(values) > 1:
        listed = ", ".join(f"{name} {verb} {getattr(t, attribute)}" for name, t in present.items())
        raise error(f"expected {expected}, got {listed}")
    return next(iter(values))
