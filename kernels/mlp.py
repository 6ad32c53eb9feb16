"""The launchers of an MLP ``LinearReLU -> ... -> LinearReLU -> Linear``: the kernels are one
Linear+ReLU layer's (kernels/linear_relu.py), run with other flags.

Layer l computes h_l = relu(h_{l-1} @ W_l.T + b_l) (h_{-1} = x); the last layer has no ReLU.
Its backward, from g_l = dLoss/d(pre-activation of layer l):
  grad_W_l = g_l.T @ h_{l-1},   grad_b_l = g_l.sum(0)
  g_{l-1}  = (g_l @ W_l) * (h_{l-1} > 0)        (grad_x = g_0 @ W_0 for the input)
One Linear+ReLU layer on its own gets dLoss/dh_l and must mask it by h_l > 0 in both of its
backward GEMMs, reading grad and out twice (kernels/linear_relu.py). Here the mask of layer l-1
is applied in the epilogue of layer l's grad-input GEMM, on the accumulator, before the only
store: layer l-1's backward then starts from g_{l-1}, already masked, and reads only it.

Kernels:
  ``_linear_relu_bwd_input_kernel``     (kernels/linear_relu.py) with MASK_GRAD=False: g @ W, with
                                        the optional epilogue ``* (below > 0)`` (MASK_BELOW)
  ``_linear_relu_bwd_weight_kernel``    (kernels/linear_relu.py) with RELU=False: g.T @ h and
                                        g.sum(0) from g as given, no mask
  ``_linear_relu_fwd_kernel``           (kernels/linear_relu.py) with RELU=False for the last layer;
                                        the hidden layers use linear_relu_forward as it is.
On an sm_90 GPU each launcher takes the TMA kernels of kernels/linear_relu_hopper.py (the same
products, by their flags) where ``linear_relu_hopper.takes_tma`` says so, as Linear+ReLU's
launchers do: one kernel choice for the layer and the stack.
The bias gradient of every layer is summed by that layer's grad_W kernel, whose first column of
programs streams all M rows of g anyway (as kernels/linear_relu.py does): no atomics, a fixed
order, so the backward is deterministic. Summing it in the grad-input epilogue instead would need
per-tile partial sums (each program sees BLOCK_M rows only), their store and a finishing pass.
"""
from __future__ import annotations

import torch

from . import linear_relu_hopper as tma  # sm_90: the same three products through TMA kernels
from ._common import dot_precision, new_output, on_device_of
from .gemm_launch import GemmLauncher
from .linear_relu import (
    _linear_relu_bwd_input_kernel, _linear_relu_bwd_weight_kernel, _linear_relu_fwd_kernel, _with_a_unit_stride,
    weight_and_bias_grads,
)


# Own launchers (own plan caches and tuning titles) for the kernels shared with
# kernels/linear_relu.py: with these flags they are different compiled kernels.
_output_forward = GemmLauncher(_linear_relu_fwd_kernel, "MLP output layer forward", m_axis=0, flag_names=("HAS_BIAS", "RELU"))
_grad_input = GemmLauncher(
    _linear_relu_bwd_input_kernel, "MLP grad_input (+ mask of the layer below)", m_axis=0,
    flag_names=("MASK_GRAD", "MASK_BELOW"),
)
_grad_weight = GemmLauncher(
    _linear_relu_bwd_weight_kernel, "MLP grad_W/grad_b", m_axis=2, flag_names=("HAS_WEIGHT_GRAD", "HAS_BIAS_GRAD", "RELU")
)


def tuned_configs() -> list[dict]:
    """The config each MLP-only kernel launched with, per shape bucket, in this process (the hidden
    layers' forward is kernels/linear_relu.py's and listed by its tuned_configs)."""
    return [row for launcher in (_output_forward, _grad_input, _grad_weight) for row in launcher.report()]


@on_device_of(lambda args: args[0])
def linear_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias (no ReLU) for 2-D x (M, K); returns a new (M, N) tensor."""
    x, weight = _with_a_unit_stride(x), _with_a_unit_stride(weight)
    if tma.forward_eligible(x, weight):
        return tma.linear_forward(x, weight, bias)
    M, K = x.shape
    N = weight.shape[0]
    dtype = x.dtype
    out = new_output((M, N), x)
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.copy_(bias.expand(M, N)) if bias is not None else out.zero_()
    has_bias = bias is not None
    if has_bias:
        bias = bias.contiguous()
    precision = dot_precision(dtype)
    strides = (*x.stride(), *weight.stride(), N, 1)
    _output_forward(
        None, (dtype, precision, has_bias, False), (M, N, K), strides,
        (x, weight, bias if has_bias else x, out, M, N, K, *strides),
    )
    return out


@on_device_of(lambda args: args[0])
def grad_input(grad: torch.Tensor, weight: torch.Tensor, below: torch.Tensor | None) -> torch.Tensor:
    """grad @ weight, times (below > 0) when ``below`` (the output of the ReLU layer underneath,
    (M, K)) is given. Shapes: grad (M, N), weight (N, K)."""
    grad, weight, below = _with_a_unit_stride(grad), _with_a_unit_stride(weight), _with_a_unit_stride(below)
    if tma.grad_input_eligible(grad, weight, below):
        return tma.grad_input(grad, weight, below)
    M, N = grad.shape
    K = weight.shape[1]
    dtype = weight.dtype
    out = new_output((M, K), weight)
    if M and K:
        if N == 0:
            out.zero_()
        else:
            precision = dot_precision(dtype)
            mask = below is not None
            below_strides = below.stride() if mask else (0, 0)
            strides = (*grad.stride(), 0, 0, *weight.stride(), *below_strides, *out.stride())
            _grad_input(
                None, (dtype, precision, False, mask), (M, K, N), strides,
                (grad, grad, weight, below if mask else grad, out, M, N, K, *strides),
            )
    return out


@on_device_of(lambda args: args[0])
def grad_weight(
    grad: torch.Tensor, inp: torch.Tensor | None, need_weight_grad: bool, need_bias_grad: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(grad.T @ inp, grad.sum(0)), each None unless asked for, from grad (M, N) taken as it is
    (already masked, or the gradient of a layer without ReLU) and the layer's input inp (M, K),
    which is needed only for the weight gradient."""
    grad, inp = _with_a_unit_stride(grad), _with_a_unit_stride(inp)
    if need_weight_grad and tma.grad_weight_eligible(grad, inp):  # grad_b alone: no grad_W tiles to ride on
        return tma.grad_weight(grad, inp, need_bias_grad)
    return weight_and_bias_grads(
        _grad_weight, None, grad, grad, inp, need_weight_grad, need_bias_grad, False, dot_precision(grad.dtype)
    )
