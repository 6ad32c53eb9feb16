"""The optimizer's own argument checks (the step's tensor checks are in ``fastcore5.ops.sgd_checks``):
param groups, what contiguous mode cannot hold, loaded state dicts and capturable steps. Each
raises before anything is written and names the param as the user listed it.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..ops.sgd import SGDHyper
from .distributed import is_dtensor

__all__ = [
    "param_name", "first_shared_memory", "check_group", "check_contiguous_groups", "check_loaded_buffers",
    "check_capturable",
]


def param_name(index: int, group_index: int) -> str:
    """How errors name a param: by its place in its group, as the user listed it."""
    return f"param {index} of param group {group_index}"


def first_shared_memory(named: list) -> tuple[str, str] | None:
    """The names, in listing order, of two of the (tensor, name) pairs whose memory overlaps, or None."""
    spans = []
    for order, (p, name) in enumerate(named):
        if p.numel() == 0 or p.device.type == "meta":
            continue
        start = p.storage_offset() * p.element_size()
        last = sum((size - 1) * stride for size, stride in zip(p.shape, p.stride())) * p.element_size()
        spans.append((p.untyped_storage().data_ptr(), start, start + last + p.element_size(), order))
    spans.sort()
    for (storage, _, end, order), (next_storage, next_start, _, next_order) in zip(spans, spans[1:]):
        if storage == next_storage and next_start < end:
            first, second = sorted((order, next_order))
            return named[first][1], named[second][1]
    return None


def check_group(index: int, group: dict) -> None:
    SGDHyper.from_group(group).check()
    if group.get("differentiable"):
        raise ValueError("differentiable=True is not supported by fastcore5.optim.SGD; use torch.optim.SGD")
    for i, p in enumerate(group["params"]):
        if p.is_sparse or p.is_complex() or not p.dtype.is_floating_point:
            raise TypeError(
                f"{param_name(i, index)} is {p.dtype}"
                f"{' sparse' if p.is_sparse else ''}; fastcore5.optim.SGD supports dense real floating params"
            )


def check_contiguous_groups(param_groups: list, indices) -> None:
    """What contiguous mode cannot hold, for the groups ``indices``: DTensors, a param listed
    twice, and params sharing memory (tied weights that are distinct tensors, views of one
    tensor), which separate flat slots would silently untie."""
    for index in indices:
        params = param_groups[index]["params"]
        if any(map(is_dtensor, params)):
            raise ValueError(
                "contiguous=True cannot hold DTensor params (FSDP2's fully_shard owns their storage); "
                "use the default contiguous=False, which steps the local shards in one launch"
            )
        if len(set(map(id, params))) != len(params):
            raise ValueError(
                f"param group {index} holds a param twice; contiguous=True keeps one flat slot per param, "
                "so list each param once"
            )
    named = [(p, param_name(i, g)) for g, group in enumerate(param_groups) for i, p in enumerate(group["params"])]
    shared = first_shared_memory(named)
    if shared is not None:
        raise ValueError(
            f"{shared[0]} and {shared[1]} share memory (tied weights or views of one tensor); contiguous=True "
            "gives each param its own slot in a flat buffer, which would untie them: pass the shared "
            "tensor once, or use contiguous=False (which keeps the sharing, as torch.optim.SGD does)"
        )


def check_loaded_buffers(param_groups: list, state) -> None:
    """A loaded momentum buffer that does not fit its param (shape, or not a tensor) raises naming
    the param; a sparse one (torch's SGD keeps it after sparse gradients) is made dense."""
    for g, group in enumerate(param_groups):
        for i, p in enumerate(group["params"]):
            entry = state.get(p)
            buf = entry.get("momentum_buffer") if entry else None
            if buf is None:
                continue
            if not isinstance(buf, Tensor):
                raise TypeError(f"the momentum_buffer of {param_name(i, g)} must be a tensor, got {type(buf).__name__}")
            if buf.shape != p.shape:
                raise ValueError(
                    f"the momentum_buffer of {param_name(i, g)} must match it in shape: got "
                    f"{tuple(buf.shape)} for {tuple(p.shape)}"
                )
            if buf.layout is not torch.strided:  # torch's SGD keeps a sparse one after sparse gradients
                entry["momentum_buffer"] = buf.to_dense()


def check_capturable(hyper: SGDHyper, device: torch.device, new_buffers: bool, capturing: bool) -> None:
    lr = hyper.lr
    if not isinstance(lr, Tensor) or lr.device != device:
        where = f"a tensor on {lr.device}" if isinstance(lr, Tensor) else f"the float {lr!r}"
        raise ValueError(
            f"capturable=True needs each param group's lr as a tensor on its params' device ({device}); got {where}"
        )
    if new_buffers and capturing:
        raise RuntimeError(
            "fastcore5.optim.SGD: a momentum buffer would be created inside a CUDA graph capture; run at least "
            "one step eagerly (a warm-up step, as torch.cuda.graph requires anyway) before capturing"
        )
