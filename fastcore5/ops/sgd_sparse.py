"""The SGD step of params whose gradient is sparse (``nn.Embedding(sparse=True)``,
``embedding_dot_bias(sparse=True)``): ``SparseGradStep``, with the interface of
``fastcore5.ops.sgd.PreparedStep`` so ``fastcore5.optim.SGD`` plans it like a dense launch."""
from __future__ import annotations

import torch

from .sgd import SGDHyper, on_device, reference_step

__all__ = ["SparseGradStep"]


class SparseGradStep:
    """The params of one (device, dtype) whose ``.grad`` is sparse (``nn.Embedding(sparse=True)``),
    on every backend: torch.optim.SGD's update, which without momentum touches only the rows the
    gradient holds (``p.add_(grad, alpha=-lr)``, the fast path for a big embedding table). With
    momentum the buffer is dense (torch keeps a sparse one that grows by the gradient's entries
    every step; the values are the same). L2 weight decay is refused, as torch refuses it
    (``check_sparse_grad``); decoupled weight decay scales the whole param. Same interface as
    ``PreparedStep``."""

    __slots__ = ()
    backend = "torch"

    def addresses_unchanged(self, params) -> bool:
        return True

    def check_grads(self, params, grads) -> None:
        if not all(g.layout is torch.sparse_coo for g in grads):
            raise TypeError("a sparse gradient was replaced by a dense one: the step is planned again")

    def run(self, params, grads, buffers, hyper: SGDHyper, first_step: bool, grad_scale, found_inf, skip_flag) -> None:
        device = params[0].device
        if grad_scale is not None:
            grads = [g.clone() for g in grads]  # unscaled copies: a sparse .grad is not written back
        reference_step(
            params, grads, buffers, first_step, hyper, on_device(device, grad_scale), on_device(device, found_inf),
            skip_flag,
        )
