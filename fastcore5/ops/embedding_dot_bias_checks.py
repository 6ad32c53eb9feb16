"""What a valid fastcore5.embedding_dot_bias call is: the checks of its arguments, each failure
naming the argument. The op's fast path tests the common case inline and calls
``raise_bad_arguments`` only when that test fails; nn.EmbeddingDotBias checks its y_range here too."""
from __future__ import annotations

import math
from numbers import Real

import torch
from torch import Tensor

from .._checks import FLOAT_DTYPES, INDEX_DTYPES, check_same_device, check_same_dtype, check_tensor

VALIDATE_MODES = ("device", "sync", "off")


def check_index_range(users: Tensor, items: Tensor, num_users: int, num_items: int) -> None:
    """IndexError naming ``users`` or ``items`` if any index is negative or past its table.

    One aminmax per tensor and a single transfer of the four bounds: on a GPU this synchronises
    the host with the device once.
    """
    if users.numel() == 0:
        return
    bounds = torch.stack([b.to(torch.int64) for b in (*torch.aminmax(users), *torch.aminmax(items))]).tolist()
    _raise_for_bounds(bounds, num_users, num_items)


def raise_recorded_index_error(record: Tensor, num_users: int, num_items: int) -> None:
    """check_index_range's IndexError from a kernel's index-error record (a CPU tensor laid out as
    fastcore5/index_errors.py says) instead of a min/max over the indices; nothing if it is clean."""
    values = record.numpy()
    if values[0] == 0:
        return
    _raise_for_bounds(values[[2, 3, 6, 7]].tolist(), num_users, num_items)


def _raise_for_bounds(bounds, num_users: int, num_items: int) -> None:
    """IndexError for the first of (users min, users max, items min, items max) outside its table."""
    for name, (low, high), rows, table in (
        ("users", bounds[:2], num_users, "u_weight"),
        ("items", bounds[2:], num_items, "i_weight"),
    ):
        if low < 0:
            raise IndexError(f"{name} contains the negative index {low}; indices must lie in [0, {rows})")
        if high >= rows:
            raise IndexError(f"{name} contains the index {high}, out of range for {table} with {rows} rows")


_FLOAT32_MAX = torch.finfo(torch.float32).max
_FLOAT16_MAX = torch.finfo(torch.float16).max


def check_y_range(y_range, dtype: torch.dtype | None = None) -> tuple[float | None, float | None]:
    """(low, high) as floats, or (None, None) for no y_range; ValueError or TypeError naming
    y_range unless it is a pair of real numbers with low < high whose bounds and width
    ``high - low`` are finite in float32 (the kernels' scalar type; in float16 for float16 tables),
    so that ``sigmoid(res) * (high - low) + low`` never turns a finite score into inf. The one
    check of both the op (on every call: a tuple of two floats costs two type tests and a few
    comparisons) and nn.EmbeddingDotBias (at construction)."""
    if y_range is None:
        return None, None
    limit = _FLOAT16_MAX if dtype is torch.float16 else _FLOAT32_MAX
    if type(y_range) is tuple and len(y_range) == 2 and type(y_range[0]) is float and type(y_range[1]) is float:
        if -limit <= y_range[0] < y_range[1] <= limit and y_range[1] - y_range[0] <= limit:
            return y_range
    try:
        low, high = y_range
    except (TypeError, ValueError):
        raise ValueError(f"y_range must be a pair of numbers (low, high) or None, got {y_range!r}") from None
    for bound in (low, high):
        if not isinstance(bound, Real) or isinstance(bound, bool):
            raise TypeError(f"y_range must hold two real numbers (Python or NumPy scalars), got {y_range!r}")
    low, high = float(low), float(high)
    if not -math.inf < low < high < math.inf:
        raise ValueError(f"y_range must be finite with low < high, got {y_range!r}")
    if not (-limit <= low and high <= limit and high - low <= limit):
        where = "float16" if limit == _FLOAT16_MAX else "float32"
        raise ValueError(
            f"y_range must have bounds and width (high - low) within the {where} range (+-{limit:.4g}), got "
            f"{y_range!r}: sigmoid(res) * (high - low) + low would overflow"
        )
    return low, high


def _check_bias(name: str, bias: Tensor, weight_name: str, rows: int) -> None:
    check_tensor(name, bias, dtypes=FLOAT_DTYPES, ndim=(1, 2))
    if bias.dim() == 2 and bias.shape[1] != 1:
        raise ValueError(f"{name} must have shape ({rows}, 1) or ({rows},) like nn.Embedding({rows}, 1), got {tuple(bias.shape)}")
    if bias.shape[0] != rows:
        raise ValueError(f"{name} has {bias.shape[0]} rows but {weight_name} has {rows}")


def check_modes(sparse, validate) -> None:
    """The op's ``sparse`` and ``validate``; nn.EmbeddingDotBias checks them at construction too."""
    if not isinstance(sparse, bool):
        raise TypeError(f"sparse must be a bool, got {type(sparse).__name__}")
    if validate is not None and validate not in VALIDATE_MODES:
        raise ValueError(f"validate must be None or one of {', '.join(map(repr, VALIDATE_MODES))}, got {validate!r}")


def raise_bad_arguments(users, items, u_weight, i_weight, u_bias, i_bias, sparse, validate) -> None:
    """The argument-naming error for whatever the fast check in embedding_dot_bias refused."""
    check_tensor("users", users, dtypes=INDEX_DTYPES, ndim=1)
    check_tensor("items", items, dtypes=INDEX_DTYPES, ndim=1)
    if users.shape[0] != items.shape[0]:
        raise ValueError(f"users and items must have the same length, got {users.shape[0]} and {items.shape[0]}")
    check_tensor("u_weight", u_weight, dtypes=FLOAT_DTYPES, ndim=2)
    check_tensor("i_weight", i_weight, dtypes=FLOAT_DTYPES, ndim=2)
    if u_weight.shape[1] != i_weight.shape[1]:
        raise ValueError(
            f"u_weight and i_weight must have the same number of factors, got {u_weight.shape[1]} "
            f"(u_weight {tuple(u_weight.shape)}) and {i_weight.shape[1]} (i_weight {tuple(i_weight.shape)})"
        )
    _check_bias("u_bias", u_bias, "u_weight", u_weight.shape[0])
    _check_bias("i_bias", i_bias, "i_weight", i_weight.shape[0])
    check_modes(sparse, validate)
    check_same_device(users=users, items=items, u_weight=u_weight, i_weight=i_weight, u_bias=u_bias, i_bias=i_bias)
    check_same_dtype(u_weight=u_weight, i_weight=i_weight, u_bias=u_bias, i_bias=i_bias)
    raise AssertionError("embedding_dot_bias refused arguments that pass every detailed check")  # pragma: no cover


def bias_fits(bias, rows: int, dtype, device) -> bool:
    shape = bias.shape
    return (
        bias.dtype is dtype
        and bias.layout is torch.strided
        and shape[0] == rows
        and (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1))
        and bias.device == device
    )
