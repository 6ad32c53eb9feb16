"""fastcore5::linear_relu — relu(x @ W.T + b) as a differentiable custom op.

Pattern every op in fastcore5.ops follows:
  * ``backends.launcher(backend, OP, name)`` finds the Triton or CUDA kernel launcher;
  * a ``custom_op`` for the forward and one for the backward, each with ``register_fake``;
  * ``register_autograd`` on the forward, whose ``setup_context`` saves only what the
    requested gradients need (ctx.needs_input_grad);
  * a public function that checks arguments (errors name the argument), applies autocast,
    asks ``backends.select`` for the backend and runs the reference for "torch".
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import backends, reference
from .._checks import FLOAT_DTYPES, check_same_device, check_same_dtype, check_tensor

OP = "linear_relu"


@torch.library.custom_op("fastcore5::linear_relu", mutates_args=())
def linear_relu_op(x: Tensor, weight: Tensor, bias: Tensor | None, backend: str) -> Tensor:
    """relu(x @ weight.T + bias) for 2-D x; ``backend`` is "triton" or "cuda"."""
    return backends.launcher(backend, OP, "linear_relu_forward")(x, weight, bias)


@linear_relu_op.register_fake
def _(x, weight, bias, backend):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("fastcore5::linear_relu_backward", mutates_args=())
def linear_relu_backward_op(
    grad_out: Tensor,
    out: Tensor,
    x: Tensor | None,
    weight: Tensor | None,
    need_input_grad: bool,
    need_weight_grad: bool,
    need_bias_grad: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_weight, grad_bias); a gradient not asked for comes back as an empty tensor
    (custom ops cannot return None)."""
    backward = backends.launcher(backend, OP, "linear_relu_backward")
    grads = backward(grad_out, out, x, weight, need_input_grad, need_weight_grad, need_bias_grad)
    return tuple(g if g is not None else out.new_empty(0) for g in grads)


@linear_relu_backward_op.register_fake
def _(grad_out, out, x, weight, need_input_grad, need_weight_grad, need_bias_grad, backend):
    M, N = out.shape
    K = x.shape[1] if x is not None else weight.shape[1] if weight is not None else 0
    return (
        out.new_empty((M, K) if need_input_grad else 0),
        out.new_empty((N, K) if need_weight_grad else 0),
        out.new_empty(N if need_bias_grad else 0),
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, backend = inputs
    need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
    # Only ``out`` stands in for the pre-activation (relu' = out > 0); x is kept only for
    # grad_weight and the weight only for grad_x.
    ctx.save_for_backward(x if need_weight else None, weight if need_input else None, output)
    ctx.backend = backend
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out):
    x, weight, out = ctx.saved_tensors
    need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
    grad_x, grad_w, grad_b = linear_relu_backward_op(
        grad_out, out, x, weight, need_input, need_weight, need_bias and ctx.has_bias, ctx.backend
    )
    return (
        grad_x if need_input else None,
        grad_w if need_weight else None,
        grad_b if need_bias and ctx.has_bias else None,
        None,
    )


linear_relu_op.register_autograd(_backward, setup_context=_setup_context)


def linear_relu(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """relu(x @ weight.T + bias), fused: the bias and ReLU are applied in the GEMM epilogue.

    Args:
        x: (*, in_features) floating-point input, any leading batch dims, any strides.
        weight: (out_features, in_features), as nn.Linear.weight.
        bias: (out_features,) or None.
    Returns (*, out_features). Under torch.autocast the inputs are cast to the autocast dtype,
    as for nn.Linear. fp32 follows torch's TF32 setting for CUDA matmuls (allow_tf32 / fp32_precision). The backward uses
    only the output (relu' = out > 0), never the pre-activation.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, ndim=2)
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES, ndim=1)
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dimension (in_features), got a 0-d tensor")
    device = check_same_device(x=x, weight=weight, bias=bias)
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(
            f"x has {x.shape[-1]} features in its last dimension but weight expects in_features={in_features} "
            f"(x shape {tuple(x.shape)}, weight shape {tuple(weight.shape)})"
        )
    if bias is not None and bias.shape[0] != out_features:
        raise ValueError(f"bias has {bias.shape[0]} elements but weight has out_features={out_features}")
    if torch.is_autocast_enabled(device.type):
        compute_dtype = torch.get_autocast_dtype(device.type)
        x, weight = x.to(compute_dtype), weight.to(compute_dtype)
        bias = bias.to(compute_dtype) if bias is not None else None
    dtype = check_same_dtype(x=x, weight=weight, bias=bias)

    backend = backends.select(OP, device, dtype)
    if backend == "torch":
        return reference.linear_relu(x, weight, bias)
    batch_shape = x.shape[:-1]
    out = linear_relu_op(x.reshape(batch_shape.numel(), in_features), weight, bias, backend)
    return out.reshape(*batch_shape, out_features)
