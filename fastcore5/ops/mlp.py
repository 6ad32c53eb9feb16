"""fastcore5.mlp — a stack LinearReLU -> ... -> LinearReLU -> Linear as one differentiable op.

    h_0 = relu(x @ W_0.T + b_0), ..., h_{n-2} = relu(h_{n-3} @ W_{n-2}.T + b_{n-2}),
    out = h_{n-2} @ W_{n-1}.T + b_{n-1}

On the Triton backend the whole stack is one autograd boundary (``_MLP``) whose backward hands
each layer an already-masked gradient: the ReLU mask of layer l is applied in the epilogue of
layer l+1's grad-input GEMM (kernels/mlp.py), so no layer reads its gradient and its output
twice to rebuild the mask, and no mask pass runs. On the cpu backend the stack is the same one
boundary, its hidden layers the C++ Linear+ReLU ops: the BLAS cannot take an epilogue, so each
hidden layer masks the gradient coming out of the grad-input GEMM above it in one pass that also
sums its bias gradient (csrc/cpu/linear_relu.cpp). Elsewhere — the CUDA and torch backends, and
under torch.compile, where the per-layer custom ops trace and a Function around raw launchers
would not — the same stack is composed of ``fastcore5.linear_relu`` and ``F.linear``.

The backend is chosen as for Linear+ReLU (``backends.select("linear_relu", ...)``): the stack
runs the op of that family, and what is available for one layer is available for all.
"""
from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backends, index_errors
from .._checks import FLOAT_DTYPES, check_same_device, check_same_dtype, check_tensor
from ._once import not_twice_differentiable, once_only
from .linear_relu import OP, linear_relu

_FLOATS = frozenset(FLOAT_DTYPES)
_STRIDED = torch.strided


def _triton_kernels():
    from ..kernels import linear_relu as layer_kernels
    from ..kernels import mlp as stack_kernels

    return SimpleNamespace(
        hidden_forward=layer_kernels.linear_relu_forward,
        output_forward=stack_kernels.linear_forward,
        grad_input=stack_kernels.grad_input,
        grad_weight=stack_kernels.grad_weight,
    )


def _native_kernels():
    """The cpu backend's layers: the hidden layers' forward and backward are the C++ Linear+ReLU
    ops (csrc/cpu/linear_relu.cpp), whose backward masks the gradient of a layer's output and
    sums its bias gradient in one pass before its two GEMMs; the output layer is plain torch."""
    from .linear_relu import KERNELS as LAYER_KERNELS

    layer = LAYER_KERNELS["cpu"]
    return SimpleNamespace(hidden_forward=layer.forward, output_forward=F.linear, hidden_backward=layer.backward)


KERNELS = backends.KernelTable(triton=_triton_kernels, cpu=_native_kernels)


def _forward(kernels, x, weights, biases) -> tuple[Tensor, list[Tensor]]:
    """(output, the hidden layers' outputs h_0 .. h_{n-2})."""
    hidden = []
    h = x
    for weight, bias in zip(weights[:-1], biases[:-1]):
        h = kernels.hidden_forward(h, weight, bias)
        hidden.append(h)
    return kernels.output_forward(h, weights[-1], biases[-1]), hidden


class _MLP(torch.autograd.Function):
    """The whole stack's autograd boundary. Arguments: x (2-D), the kernels, then the n weights
    and the n biases (None where a layer has none)."""

    @staticmethod
    def forward(ctx, x, kernels, *params):
        n = len(params) // 2
        weights, biases = params[:n], params[n:]
        out, hidden = _forward(kernels, x, weights, biases)
        needs = ctx.needs_input_grad
        need_x, need_w, need_b = needs[0], needs[2:2 + n], needs[2 + n:]
        # The backward runs from the top layer down to the lowest layer that wants a gradient
        # (-1: x itself). It needs W_l to pass the gradient below layer l, h_l to mask the
        # gradient of layer l (l at or above the lowest), and each layer's input for its grad_W.
        lowest = -1 if need_x else min((l for l in range(n) if need_w[l] or need_b[l]), default=n)
        keep_hidden = [h if (l >= lowest or need_w[l + 1]) else None for l, h in enumerate(hidden)]
        keep_weights = [w if l > lowest else None for l, w in enumerate(weights)]
        ctx.save_for_backward(x if need_w[0] else None, *keep_weights, *keep_hidden)
        ctx.lowest = lowest
        ctx.layers = n
        ctx.kernels = kernels
        return out

    @staticmethod
    @not_twice_differentiable("mlp")
    def backward(ctx, grad_out):
        n, lowest, kernels = ctx.layers, ctx.lowest, ctx.kernels
        saved = ctx.saved_tensors
        x, weights, hidden = saved[0], saved[1:1 + n], saved[1 + n:]
        need_w, need_b = ctx.needs_input_grad[2:2 + n], ctx.needs_input_grad[2 + n:]
        grad_weights, grad_biases = [None] * n, [None] * n
        if hasattr(kernels, "hidden_backward"):
            grad_x = _layer_by_layer_backward(kernels, grad_out, x, weights, hidden, lowest, need_w, need_b,
                                              grad_weights, grad_biases)
            return grad_x, None, *grad_weights, *grad_biases
        grad_x = None
        g = grad_out  # the gradient of layer l's pre-activation; the top layer has no ReLU
        for l in range(n - 1, max(lowest, 0) - 1, -1):
            if need_w[l] or need_b[l]:
                layer_input = x if l == 0 else hidden[l - 1]
                grad_weights[l], grad_biases[l] = kernels.grad_weight(g, layer_input, need_w[l], need_b[l])
            if l > lowest:
                g = kernels.grad_input(g, weights[l], hidden[l - 1] if l > 0 else None)
        if lowest == -1:
            grad_x = g
        return grad_x, None, *grad_weights, *grad_biases


def _layer_by_layer_backward(kernels, grad_out, x, weights, hidden, lowest, need_w, need_b, grad_weights, grad_biases):
    """The backward where the hidden layers' backward is a whole Linear+ReLU backward op (cpu
    backend): each hidden layer l receives the gradient of its output h_l straight from the
    grad-input GEMM of layer l+1 and masks it (h_l > 0) in the pass that also sums its bias
    gradient. Fills grad_weights/grad_biases; returns grad_x (None unless lowest == -1)."""
    n = len(weights)
    top_input = x if n == 1 else hidden[n - 2]
    if need_w[n - 1]:
        grad_weights[n - 1] = grad_out.t().mm(top_input)
    if need_b[n - 1]:
        grad_biases[n - 1] = grad_out.sum(0)
    if n - 1 <= lowest:
        return None
    g = grad_out.mm(weights[n - 1])  # the gradient of h_{n-2}, not yet masked
    for l in range(n - 2, max(lowest, 0) - 1, -1):
        layer_input = x if l == 0 else hidden[l - 1]
        g, grad_w, grad_b = kernels.hidden_backward(
            g, hidden[l], layer_input if need_w[l] else None, weights[l] if l > lowest else None,
            l > lowest, need_w[l], need_b[l],
        )
        grad_weights[l] = grad_w if need_w[l] else None
        grad_biases[l] = grad_b if need_b[l] else None
    return g if lowest == -1 else None


def _compose(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor | None]) -> Tensor:
    """The same stack, one layer at a time (each hidden layer still a fused Linear+ReLU)."""
    for weight, bias in zip(weights[:-1], biases[:-1]):
        x = linear_relu(x, weight, bias)
    return F.linear(x, weights[-1], biases[-1])


def _shape_check(x, weights, biases) -> tuple[bool, bool]:
    """(usable, one dtype): the fast test of every argument but the dtypes' agreement, which
    autocast may still establish; the detailed, argument-naming errors are built only on failure."""
    try:
        if x.dtype not in _FLOATS or x.layout is not _STRIDED or x.dim() == 0:
            return False, False
        if not isinstance(weights, (list, tuple)) or not weights:
            return False, False
        if biases is not None and (not isinstance(biases, (list, tuple)) or len(biases) != len(weights)):
            return False, False
        features, device, dtype = x.shape[-1], x.device, x.dtype
        same_dtype = True
        for l, weight in enumerate(weights):
            if weight.dtype not in _FLOATS or weight.layout is not _STRIDED or weight.dim() != 2:
                return False, False
            if weight.shape[1] != features or weight.device != device:
                return False, False
            same_dtype = same_dtype and weight.dtype is dtype
            bias = None if biases is None else biases[l]
            if bias is not None:
                if bias.dtype not in _FLOATS or bias.layout is not _STRIDED:
                    return False, False
                if bias.shape != weight.shape[:1] or bias.device != device:
                    return False, False
                same_dtype = same_dtype and bias.dtype is dtype
            features = weight.shape[0]
        return True, same_dtype
    except (AttributeError, TypeError):
        return False, False


def _named(x, weights, biases) -> dict:
    named = {"x": x, **{f"weights[{l}]": w for l, w in enumerate(weights)}}
    named.update((f"biases[{l}]", b) for l, b in enumerate(biases or ()) if b is not None)
    return named


def _raise_bad_arguments(x, weights, biases) -> None:
    """The argument-naming error for whatever _shape_check refused."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dimension (in_features), got a 0-d tensor")
    if isinstance(weights, Tensor) or not isinstance(weights, (list, tuple)) or len(weights) == 0:
        raise TypeError("weights must be a non-empty list or tuple of (out_features, in_features) tensors")
    if biases is None:
        biases = [None] * len(weights)
    elif not isinstance(biases, (list, tuple)):
        raise TypeError("biases must be None or a list or tuple with one tensor (or None) per weight")
    elif len(biases) != len(weights):
        raise ValueError(f"biases has {len(biases)} entries but weights has {len(weights)}; give one per layer (None for no bias)")
    features, source = x.shape[-1], "x's last dimension"
    for l, (weight, bias) in enumerate(zip(weights, biases)):
        check_tensor(f"weights[{l}]", weight, dtypes=FLOAT_DTYPES, ndim=2)
        if weight.shape[1] != features:
            raise ValueError(
                f"weights[{l}] has in_features={weight.shape[1]} but {source} gives {features} features "
                f"(weights[{l}] shape {tuple(weight.shape)})"
            )
        if bias is not None:
            check_tensor(f"biases[{l}]", bias, dtypes=FLOAT_DTYPES, ndim=1)
            if bias.shape[0] != weight.shape[0]:
                raise ValueError(f"biases[{l}] has {bias.shape[0]} elements but weights[{l}] has out_features={weight.shape[0]}")
        features, source = weight.shape[0], f"weights[{l}] (out_features)"
    check_same_device(**_named(x, weights, biases))
    raise AssertionError("mlp refused arguments that pass every detailed check")  # pragma: no cover


def mlp(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor | None] | None = None) -> Tensor:
    """The stack LinearReLU -> ... -> LinearReLU -> Linear: ReLU after every layer but the last.

    Args:
        x: (*, in_features) floating-point input, any leading batch dims, any strides.
        weights: n >= 1 matrices (out_features, in_features) as nn.Linear.weight, each layer's
            in_features the previous one's out_features.
        biases: None (no biases), or n entries, each (out_features,) or None.
    Returns (*, out_features of the last layer). Fused on the Triton backend (CUDA tensors, and
    CPU tensors under TRITON_INTERPRET=1): one autograd boundary for the whole stack, the ReLU
    mask of each hidden layer applied in the epilogue of the grad-input GEMM above it; on the
    cpu backend one boundary too, each mask applied in one pass with the layer's bias gradient
    right after that GEMM. On the CUDA and torch backends and under torch.compile the layers are composed one by one
    (fastcore5.linear_relu, then F.linear). Under torch.autocast the inputs are cast to the
    autocast dtype, as for nn.Linear. Not differentiable twice on the fused path.
    """
    if index_errors.watching:
        index_errors.raise_pending()
    usable, same_dtype = _shape_check(x, weights, biases)
    if not usable:
        _raise_bad_arguments(x, weights, biases)
    if biases is None:
        biases = (None,) * len(weights)
    device_type = backends.device_type(x)
    if torch._C._is_any_autocast_enabled() and torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
        x = x.to(compute_dtype)
        weights = [w.to(compute_dtype) for w in weights]
        biases = [None if b is None else b.to(compute_dtype) for b in biases]
    elif not same_dtype:
        check_same_dtype(**_named(x, weights, biases))
    backend = backends.select(OP, device_type, x.dtype)
    if backend not in ("triton", "cpu") or torch.compiler.is_compiling():
        out = _compose(x, weights, biases)
        return once_only(out, "mlp") if backend == "torch" else out
    kernels = KERNELS[backend]
    batch_shape = x.shape[:-1]
    x2d = x if x.dim() == 2 else x.reshape(batch_shape.numel(), x.shape[-1])
    params = (*weights, *biases)
    if torch.is_grad_enabled() and (x.requires_grad or any(p is not None and p.requires_grad for p in params)):
        out = _MLP.apply(x2d, kernels, *params)
    else:
        out, _ = _forward(kernels, x2d, weights, biases)
    return out if x.dim() == 2 else out.reshape(*batch_shape, out.shape[-1])
