"""Fake (meta) implementations of the C++ ops in torch.ops.fastcore5_native.

The ops themselves are defined in C++ (schemas in csrc/registration.cpp, implementations in
csrc/*_op.cpp, csrc/cpu/*.cpp) and exist only once the optional
extension fastcore5._C is loaded. ``register()`` registers the fakes; it runs when this module is
imported with the ops present, which ``fastcore5.backends.native_extension()`` does right after it
loads the extension. The C++ library names this module (``m.set_python_module``): torch requires
that for a C++ op with a Python fake, and its error for a fake tensor reaching an op without one
tells the user to import this module. Without the extension, importing it does nothing. With
the fakes, torch.compile can trace the ops and torch.library.opcheck can test them.

Each fake mirrors the shapes of the real op: a gradient that was not asked for is an empty
(0,)-shaped tensor, as the C++ op returns it.
"""
from __future__ import annotations

import torch

from . import _op_shapes as op_shapes


# Each fake takes its schema's arguments by name (tests/test_cuda_compile.py checks that) and
# gets its shapes from fastcore5/_op_shapes.py, as the Python custom ops do, so each op's shape
# contract is written once. This module imports nothing else of fastcore5: fastcore5.backends
# imports it, below the ops.


def _linear_relu_forward(x, weight, bias, allow_tf32):
    return op_shapes.linear_relu_forward(x, weight, bias)


def _linear_relu_backward(grad_out, out, x, weight, need_input_grad, need_weight_grad, need_bias_grad, allow_tf32):
    return op_shapes.linear_relu_backward(grad_out, out, x, weight, need_input_grad, need_weight_grad, need_bias_grad)


def _embedding_dot_bias_forward(users, items, u_weight, i_weight, u_bias, i_bias, y_lo, y_hi, index_errors):
    return op_shapes.embedding_dot_bias_forward(users, items, u_weight)


def _embedding_dot_bias_backward(
    grad_out, users, items, u_weight, i_weight, u_bias, i_bias, num_users, num_items, y_lo, y_hi,
    need_u_weight, need_i_weight, need_u_bias, need_i_bias, deterministic, sparse,
):
    return op_shapes.embedding_dot_bias_backward(
        grad_out, users, items, u_weight, i_weight, u_bias, i_bias, num_users, num_items, y_lo, y_hi,
        need_u_weight, need_i_weight, need_u_bias, need_i_bias, deterministic, sparse,
    )


def _embedding_dot_bias(users, items, u_weight, i_weight, u_bias, i_bias, y_lo, y_hi, sparse, index_errors):
    return op_shapes.embedding_dot_bias_forward(users, items, u_weight)


def _sgd_step(params, grads, momentum_buffers, lr_tensor, lr, momentum, dampening, weight_decay, nesterov,
              maximize, decoupled_weight_decay, first_step, grad_scale, found_inf, skip_flag):
    return None


def _sgd_sparse_step(params, indices, values, momentum_buffers, lr_tensor, lr, momentum, dampening, weight_decay,
                     nesterov, maximize, decoupled_weight_decay, first_step, grad_scale, found_inf, skip_flag):
    return None


# linear_relu and embedding_dot_bias are the autograd ops (autograd in C++); their fakes are what
# torch.compile sees below autograd.
FAKES = {
    "linear_relu_forward": _linear_relu_forward,
    "linear_relu_backward": _linear_relu_backward,
    "linear_relu": _linear_relu_forward,
    "embedding_dot_bias_forward": _embedding_dot_bias_forward,
    "embedding_dot_bias_backward": _embedding_dot_bias_backward,
    "embedding_dot_bias": _embedding_dot_bias,
    "sgd_step": _sgd_step,
    "sgd_sparse_step": _sgd_sparse_step,
}

_registered = False


def _ops_loaded() -> bool:
    return hasattr(torch.ops.fastcore5_native, "linear_relu_forward")


def register() -> None:
    """Register every fake once; needs the extension loaded (the ops must exist).

    Called from this module so that torch's check that a C++ op's fake comes from the module
    named by its ``set_python_module`` (this one) passes."""
    global _registered
    if _registered:
        return
    for name, fake in FAKES.items():
        torch.library.register_fake(f"fastcore5_native::{name}", fake)
    _registered = True


if _ops_loaded():
    register()
