"""Linear+ReLU under torch.compile on an sm_90 GPU: the TMA kernels behind an opaque op.

Under torch.compile on a CUDA machine the ops ``fastcore5::linear_relu`` and
``fastcore5::linear_relu_backward`` are triton_ops (fastcore5/ops/_library.py): their bodies are
traced with fake tensors and every kernel they launch goes through ``torch.library.wrap_triton``.
The Hopper TMA kernels (kernels/linear_relu_hopper.py) cannot go that way: their arguments are
host-built TMA descriptors, which torch's tracing of a triton_op body does not carry, and a fake
tensor has no address to build one from. So at trace time the bodies ask the one kernel choice,
``linear_relu_hopper.takes_tma``, what an sm_90 would launch for these shapes, strides and dtype;
where it says TMA, they call the opaque custom ops below, whose implementation is the eager
launcher: at run time it asks the choice again, with the addresses (alignment), and launches the
TMA kernels or, for a misaligned tensor, the portable ones. Everywhere else (another card, the
CPU, ops that are plain custom ops) nothing is diverted: the eager launcher runs as it is.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _op_shapes as op_shapes
from ._library import SEES_TRITON_KERNELS


def _kernels():
    from ..kernels import linear_relu as kernels

    return kernels


def _choice():
    from ..kernels import linear_relu_hopper

    return linear_relu_hopper


@torch.library.custom_op("fastcore5::linear_relu_tma", mutates_args=())
def forward_op(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """relu(x @ weight.T + bias) by the eager Triton launcher (TMA kernels where they apply)."""
    return _kernels().linear_relu_forward(x, weight, bias)


forward_op.register_fake(op_shapes.linear_relu_forward)


@torch.library.custom_op("fastcore5::linear_relu_tma_backward", mutates_args=())
def backward_op(
    grad_out: Tensor, out: Tensor, x: Tensor | None, weight: Tensor | None,
    need_input_grad: bool, need_weight_grad: bool, need_bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_weight, grad_bias) by the eager Triton launcher; one not asked for is empty."""
    grads = _kernels().linear_relu_backward(grad_out, out, x, weight, need_input_grad, need_weight_grad, need_bias_grad)
    return tuple(g if g is not None else out.new_empty(0) for g in grads)


backward_op.register_fake(op_shapes.linear_relu_backward)


def traced_forward_takes_tma(backend: str, x: Tensor, weight: Tensor) -> bool:
    """Whether the body of the triton_op ``fastcore5::linear_relu`` should call forward_op."""
    return SEES_TRITON_KERNELS and backend == "triton" and _choice().forward_eligible(x, weight, traced=True)


def traced_backward_takes_tma(backend: str, grad_out, out, x, weight, need_input, need_weight, need_bias) -> bool:
    """Whether the body of the triton_op ``fastcore5::linear_relu_backward`` should call backward_op."""
    return SEES_TRITON_KERNELS and backend == "triton" and _choice().backward_eligible(
        grad_out, out, x, weight, need_input, need_weight, need_bias, traced=True
    )
