"""The SGD step of params whose gradient is sparse (``nn.Embedding(sparse=True)``,
``embedding_dot_bias(sparse=True)``): ``SparseGradStep``, with the interface of
``fastcore5.ops.sgd.PreparedStep`` so ``fastcore5.optim.SGD`` plans it like a dense launch.

On the cpu backend the step is one C++ op over the launch's params,
``torch.ops.fastcore5_native.sgd_sparse_step`` (csrc/cpu/sgd_sparse.cpp): the COO gradient's
indices and values are applied row by row, never formed into a dense gradient. Every other
backend (and a gradient or layout the op does not take) runs the reference update."""
from __future__ import annotations

import re

import torch

from .. import backends
from .sgd import SGDHyper, on_device, reference_step

__all__ = ["SparseGradStep"]


def _native_sparse_step():
    """The C++ op, or None when the extension was built before it existed."""
    backends.native_extension()
    return getattr(torch.ops.fastcore5_native, "sgd_sparse_step", None)


def _takes(params, grads, buffers) -> bool:
    """Whether the C++ op takes these tensors: one sparse dimension (the rows), contiguous params and
    buffers. Anything else (a sparse gradient over several dimensions) takes the reference."""
    return (
        all(g.sparse_dim() == 1 for g in grads)
        and all(p.is_contiguous() for p in params)
        and all(b.is_contiguous() for b in buffers)
    )


class SparseGradStep:
    """The params of one (device, dtype) whose ``.grad`` is sparse (``nn.Embedding(sparse=True)``):
    torch.optim.SGD's update. Without momentum (and without decoupled weight decay) it touches only
    the rows the gradient holds (``p.add_(grad, alpha=-lr)``, the fast path for a big embedding
    table). With momentum the buffer is dense (torch keeps a sparse one that grows by the
    gradient's entries every step; the values are the same, every row moves by its buffer). L2
    weight decay is refused, as torch refuses it (``check_sparse_grad``); decoupled weight decay
    scales the whole param. A grad_scale unscales the values in the step, without writing them
    back. ``backend``: the backend ``backends.select`` chose for the params; "cpu" runs the C++
    op, the others the reference. ``param_names`` name the params in errors (default:
    ``params[i]``). Same interface as ``PreparedStep``."""

    __slots__ = ("backend", "native", "param_names")

    def __init__(self, backend: str = "torch", param_names: list[str] | None = None):
        self.backend = backend
        self.native = _native_sparse_step() if backend == "cpu" else None
        self.param_names = param_names

    def addresses_unchanged(self, params) -> bool:
        return True

    def check_grads(self, params, grads) -> None:
        if not all(g.layout is torch.sparse_coo for g in grads):
            raise TypeError("a sparse gradient was replaced by a dense one: the step is planned again")

    def run(self, params, grads, buffers, hyper: SGDHyper, first_step: bool, grad_scale, found_inf, skip_flag) -> None:
        device = params[0].device
        grad_scale, found_inf = on_device(device, grad_scale), on_device(device, found_inf)
        if self.native is not None and _takes(params, grads, buffers):
            # _indices/_values: the uncoalesced entries as they are (indices() would demand a coalesce).
            try:
                self.native(
                    params, [g._indices()[0] for g in grads], [g._values() for g in grads], buffers,
                    *hyper.launcher_args(device), first_step, grad_scale, found_inf, skip_flag,
                )
            except IndexError as error:  # the op names its list position: name the param
                position = re.search(r"indices\[(\d+)\]", str(error))
                if self.param_names is None or position is None:
                    raise
                name = self.param_names[int(position.group(1))]
                raise IndexError(f"the sparse .grad of {name} holds an index outside its rows: {error}") from None
            torch.autograd.graph.increment_version(params)
            return
        if grad_scale is not None:
            grads = [g.clone() for g in grads]  # unscaled copies: a sparse .grad is not written back
        reference_step(params, grads, buffers, first_step, hyper, grad_scale, found_inf, skip_flag)
