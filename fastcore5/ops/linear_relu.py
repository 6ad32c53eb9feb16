"""fastcore5.linear_relu — relu(x @ W.T + b), differentiable, from the public call to the kernel.

The path of an eager call, each step once:
  1. ``linear_relu`` checks its arguments (one fast test; the detailed, argument-naming errors
     are built only when it fails) and applies autocast;
  2. ``backends.select`` names the backend (a cached lookup);
  3. one autograd boundary, found in the static table ``KERNELS`` (``eager``): on the triton
     backend ``_LinearReLU`` (an autograd.Function) around the launchers, skipped when no input
     needs a gradient; on the cpu and cuda backends the C++ op ``fastcore5_native::linear_relu``,
     whose autograd kernel (csrc/linear_relu_autograd.cpp) makes the same choice in C++;
  4. the launcher or the device's C++ kernel.
Under torch.compile the same call goes through the ops ``fastcore5::linear_relu`` and
``fastcore5::linear_relu_backward`` instead: triton_ops whose Triton kernels inductor sees on a
GPU, custom ops with fake implementations elsewhere (fastcore5/ops/_library.py). torch.library's
Python dispatch costs about 10 us a call in eager mode, so it is used only there.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor

from .. import _op_shapes as op_shapes
from .. import backends, index_errors, reference
from .._checks import FLOAT_DTYPES, check_same_device, check_same_dtype, check_tensor
from ._once import not_twice_differentiable, once_only
from ..kernels._common import fp32_matmul_allows_tf32
from . import linear_relu_tma
from ._library import fused_op, launch, register_fake

OP = "linear_relu"
_FLOATS = frozenset(FLOAT_DTYPES)
_STRIDED = torch.strided


def _triton_kernels():
    from ..kernels import linear_relu as kernels

    launchers = SimpleNamespace(forward=kernels.linear_relu_forward, backward=kernels.linear_relu_backward)

    def eager(x, weight, bias):
        if torch.is_grad_enabled() and (
            x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
        ):
            return _LinearReLU.apply(x, weight, bias, launchers)
        return launchers.forward(x, weight, bias)

    launchers.eager = eager
    return launchers


def _native_kernels(device_type: str):
    """The C++ ops, which dispatch to their CUDA or CPU kernels by device (the cuda and cpu backends).
    ``eager`` is the op ``linear_relu``, whose autograd is in C++ (csrc/linear_relu_autograd.cpp)."""
    backends.native_extension()
    ops = torch.ops.fastcore5_native
    # The overload's C++ entry point: calling the OpOverload object adds a Python frame per call.
    with_autograd = getattr(ops.linear_relu.default, "_op", ops.linear_relu.default)
    if device_type == "cpu":
        def allow_tf32():  # CPU GEMMs have no TF32: fp32 is IEEE fp32, the flag is ignored
            return False

        def eager(x, weight, bias):
            return with_autograd(x, weight, bias, False)
    else:
        allow_tf32 = fp32_matmul_allows_tf32

        def eager(x, weight, bias):
            return with_autograd(x, weight, bias, fp32_matmul_allows_tf32())

    def forward(x, weight, bias):
        return ops.linear_relu_forward(x, weight, bias, allow_tf32())

    def backward(grad_out, out, x, weight, need_input_grad, need_weight_grad, need_bias_grad):
        return ops.linear_relu_backward(
            grad_out, out, x, weight, need_input_grad, need_weight_grad, need_bias_grad, allow_tf32()
        )

    return SimpleNamespace(forward=forward, backward=backward, eager=eager)


KERNELS = backends.KernelTable(
    triton=_triton_kernels, cuda=lambda: _native_kernels("cuda"), cpu=lambda: _native_kernels("cpu")
)


def _save_for_backward(ctx, x, weight, bias, output) -> None:
    # Only ``out`` stands in for the pre-activation (relu' = out > 0); x is kept only for
    # grad_weight and the weight only for grad_x.
    need_input, need_weight = ctx.needs_input_grad[:2]
    ctx.save_for_backward(x if need_weight else None, weight if need_input else None, output)
    ctx.has_bias = bias is not None


def _input_gradients(ctx, grad_out, backward):
    """(grad_x, grad_weight, grad_bias, None) from ``backward``, a launcher or the backward op,
    given the saved context; None where autograd asked for no gradient."""
    x, weight, out = ctx.saved_tensors
    need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
    need_bias = need_bias and ctx.has_bias
    grad_x, grad_w, grad_b = backward(grad_out, out, x, weight, need_input, need_weight, need_bias)
    return grad_x if need_input else None, grad_w if need_weight else None, grad_b if need_bias else None, None


class _LinearReLU(torch.autograd.Function):
    """The eager autograd boundary around the Triton launchers."""

    @staticmethod
    def forward(ctx, x, weight, bias, kernels):
        out = kernels.forward(x, weight, bias)
        _save_for_backward(ctx, x, weight, bias, out)
        ctx.kernels = kernels
        return out

    @staticmethod
    @not_twice_differentiable("linear_relu")
    def backward(ctx, grad_out):
        return _input_gradients(ctx, grad_out, ctx.kernels.backward)


@fused_op("fastcore5::linear_relu")
def linear_relu_op(x: Tensor, weight: Tensor, bias: Tensor | None, backend: str) -> Tensor:
    """relu(x @ weight.T + bias) for 2-D x; ``backend`` is "triton", "cuda" or "cpu"."""
    if linear_relu_tma.traced_forward_takes_tma(backend, x, weight):  # sm_90 under torch.compile
        return linear_relu_tma.forward_op(x, weight, bias)
    return launch(KERNELS[backend].forward, backend, x, weight, bias)


register_fake(linear_relu_op)(op_shapes.linear_relu_forward)


@fused_op("fastcore5::linear_relu_backward")
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
    needs = (need_input_grad, need_weight_grad, need_bias_grad)
    if linear_relu_tma.traced_backward_takes_tma(backend, grad_out, out, x, weight, *needs):
        return linear_relu_tma.backward_op(grad_out, out, x, weight, *needs)
    grads = launch(
        KERNELS[backend].backward, backend, grad_out, out, x, weight, need_input_grad, need_weight_grad, need_bias_grad
    )
    return tuple(g if g is not None else out.new_empty(0) for g in grads)


register_fake(linear_relu_backward_op)(op_shapes.linear_relu_backward)


def _setup_context(ctx, inputs, output):
    x, weight, bias, backend = inputs
    _save_for_backward(ctx, x, weight, bias, output)
    ctx.backend = backend


def _backward(ctx, grad_out):
    def backward(*args):
        return linear_relu_backward_op(*args, ctx.backend)

    return _input_gradients(ctx, grad_out, backward)


linear_relu_op.register_autograd(_backward, setup_context=_setup_context)


def _checked_and_autocast(x, weight, bias):
    """(x, weight, bias, device type) for arguments the fast check in linear_relu refused, or for
    any call while an autocast is on: checked in detail (each error names the argument), then
    cast to the autocast dtype when autocast is enabled for their device, as nn.Linear's are
    (mixed dtypes are accepted only then)."""
    _check_arguments(x, weight, bias)
    device_type = backends.device_type(x)
    if not torch.is_autocast_enabled(device_type):
        check_same_dtype(x=x, weight=weight, bias=bias)
    else:
        compute_dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(compute_dtype), weight.to(compute_dtype)
        bias = bias.to(compute_dtype) if bias is not None else None
    return x, weight, bias, device_type


def _check_arguments(x, weight, bias) -> None:
    """The detailed argument checks but the dtypes' agreement, each error naming the argument
    (the devices' agreement comes before anything asks about x's device type: autocast knows no
    "meta")."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, ndim=2)
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES, ndim=1)
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dimension (in_features), got a 0-d tensor")
    check_same_device(x=x, weight=weight, bias=bias)
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(
            f"x has {x.shape[-1]} features in its last dimension but weight expects in_features={in_features} "
            f"(x shape {tuple(x.shape)}, weight shape {tuple(weight.shape)})"
        )
    if bias is not None and bias.shape[0] != out_features:
        raise ValueError(f"bias has {bias.shape[0]} elements but weight has out_features={out_features}")


def linear_relu(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """relu(x @ weight.T + bias), fused: the bias and ReLU are applied in the GEMM epilogue.

    Args:
        x: (*, in_features) floating-point input, any leading batch dims, any strides.
        weight: (out_features, in_features), as nn.Linear.weight.
        bias: (out_features,) or None.
    Returns (*, out_features). Under torch.autocast the inputs are cast to the autocast dtype,
    as for nn.Linear. fp32 follows torch's TF32 setting for CUDA matmuls (allow_tf32 /
    fp32_precision). The backward uses only the output (relu' = out > 0), never the
    pre-activation; it is not differentiable again (double backward raises).
    """
    try:
        device = x.device
        dtype = x.dtype
        usable = (
            dtype in _FLOATS
            and x.layout is _STRIDED
            and weight.layout is _STRIDED
            and weight.dtype is dtype
            and weight.dim() == 2
            and x.shape[-1] == weight.shape[1]  # IndexError for a 0-d x
            and weight.device == device
            and (
                bias is None
                or (
                    bias.dtype is dtype and bias.layout is _STRIDED and bias.dim() == 1
                    and bias.shape[0] == weight.shape[0] and bias.device == device
                )
            )
        )
    except (AttributeError, TypeError, IndexError):
        usable = False
    if index_errors.watching:  # raised before anything is said about these arguments
        index_errors.raise_pending()
    if not usable or torch._C._is_any_autocast_enabled():
        x, weight, bias, device = _checked_and_autocast(x, weight, bias)  # device: now its type
        dtype = x.dtype
    compiling = torch.compiler.is_compiling()
    backend = (backends.select if compiling else backends.select_eager)(OP, device, dtype)
    if backend == "torch":
        return once_only(reference.linear_relu(x, weight, bias), OP)
    flat = x.dim() != 2
    x2d = x.reshape(x.shape[:-1].numel(), x.shape[-1]) if flat else x
    if compiling:
        out = linear_relu_op(x2d, weight, bias, backend)
    else:
        out = KERNELS[backend].eager(x2d, weight, bias)
    return out.reshape(*x.shape[:-1], weight.shape[0]) if flat else out
