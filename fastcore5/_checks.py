"""Argument checks shared by every op: each failure names the offending argument."""
from __future__ import annotations

import math
import operator
from collections.abc import Iterable
from numbers import Real

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


def check_int(name: str, value, low: int, high: int | None = None) -> int:
    """An int (operator.index: NumPy ints too, never a bool or a float) in [low, high]; TypeError or
    ValueError naming ``name`` and the range otherwise."""
    try:
        number = operator.index(value)
    except TypeError:
        number = None
    if number is None or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if number < low or (high is not None and number > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an int {allowed}, got {number}")
    return number


def check_real(name: str, value, *, positive: bool = False) -> float:
    """A finite real number (Python or NumPy scalar, not a bool), > 0 with ``positive`` else >= 0;
    TypeError or ValueError naming ``name`` and the range otherwise."""
    if not isinstance(value, Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or number < 0 or (positive and number == 0):
        allowed = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be finite and {allowed}, got {value!r}")
    return number
