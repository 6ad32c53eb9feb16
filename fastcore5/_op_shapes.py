"""What each fused op returns, by shape and dtype alone: the fake implementations that
torch.compile and torch.library.opcheck run in place of a kernel.

Written once, here, below both users: the Python custom ops (fastcore5/ops/*.py) and the C++ ops
of the optional extension (fastcore5/_native_ops.py, loaded by fastcore5/backends.py) register
these same functions, so each op's shape contract has one definition.
"""
from __future__ import annotations


def linear_relu_forward(x, weight, bias, *_):
    """The output of relu(x @ weight.T + bias) for 2-D x. Extra trailing arguments (the C++ op's
    allow_tf32, the custom op's backend) land in ``_``."""
    return x.new_empty((x.shape[0], weight.shape[0]))


def linear_relu_backward(grad_out, out, x, weight, need_input_grad, need_weight_grad, need_bias_grad, *_):
    """(grad_x, grad_weight, grad_bias); a gradient not asked for is (0,)."""
    M, N = out.shape
    K = x.shape[1] if x is not None else weight.shape[1] if weight is not None else 0
    return (
        out.new_empty((M, K) if need_input_grad else 0),
        out.new_empty((N, K) if need_weight_grad else 0),
        out.new_empty(N if need_bias_grad else 0),
    )


def embedding_dot_bias_forward(users, items, u_weight, *_):
    """The (B,) scores in the table dtype (the other arguments land in ``_``)."""
    return u_weight.new_empty((users.shape[0],))


def embedding_dot_bias_backward(grad_out, users, items, u_weight, i_weight, u_bias, i_bias, num_users, num_items,
                                y_lo, y_hi, need_u_weight, need_i_weight, need_u_bias, need_i_bias, deterministic,
                                sparse, *_):
    """The four gradients' shapes (dense, or per-sample sparse values); one not asked for is (0,)."""
    B = users.shape[0]
    D = u_weight.shape[1] if u_weight is not None else i_weight.shape[1] if i_weight is not None else 0
    rows = (B, B, B, B) if sparse else (num_users, num_items, num_users, num_items)
    shapes = ((rows[0], D), (rows[1], D), (rows[2],), (rows[3],))
    needs = (need_u_weight, need_i_weight, need_u_bias, need_i_bias)
    return tuple(grad_out.new_empty(shape if need else 0) for shape, need in zip(shapes, needs))
