"""The low-precision contract of the fused SGD step, as a reference and a tolerance.

Contract: for fp16/bf16 tensors the step loads p, grad and buf, computes the whole update in fp32
(unscale, maximize, weight decay, momentum, nesterov, lr), and rounds each value it stores (p,
buf, and the unscaled grad under a GradScaler) once, to nearest even. ``fp32_sgd_step`` computes
exactly that with torch ops, op for op in the kernel's order.

Tolerance: the kernel may contract a multiply and an add into one fused multiply-add (compiled
GPU code does; the CPU interpreter does not), which moves an fp32 result r by at most ~2 fp32 ulps
of the operands (|operands| <= M). Rounding to the storage dtype then lands on the same value or
on its neighbour: at most one ulp of the storage dtype, 2**-(mantissa bits) * |r|, or the fp32
difference itself when r is tiny next to M. A step's difference is carried into the next one, so
after k steps |kernel - reference| <= k * (ulp_rel * |r| + 2**-22 * M).
"""
from __future__ import annotations

import torch

MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}


def fp32_sgd_step(params, grads, buffers, *, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                  maximize=False, decoupled_weight_decay=False, grad_scale=None):
    """In place, like the kernel: fp32 math, one rounding per stored value. ``buffers`` entries
    None mean first step; returns the buffers."""
    f32 = torch.float32
    new_buffers = []
    for p, grad, buf in zip(params, grads, buffers):
        g = grad.to(f32)
        if grad_scale is not None:
            g = g / grad_scale.to(f32)
            grad.copy_(g)
        if maximize:
            g = -g
        w = p.to(f32)
        if weight_decay != 0:
            if decoupled_weight_decay:
                w = w * (1.0 - lr * weight_decay)
            else:
                g = g + weight_decay * w
        if momentum != 0:
            b = g if buf is None else momentum * buf.to(f32) + (1.0 - dampening) * g
            stored = b.to(p.dtype)
            if buf is None:
                buf = stored
            else:
                buf.copy_(stored)
            g = g + momentum * b if nesterov else b
        p.copy_(w - lr * g)
        new_buffers.append(buf)
    return new_buffers


def tolerance(dtype: torch.dtype, steps: int, operand_bound: float, exact: bool) -> dict:
    """assert_close keywords for ``steps`` steps in ``dtype`` (module docstring). ``exact``: the
    kernel rounds exactly like the reference (no fused multiply-add: the CPU interpreter)."""
    if exact:
        return dict(rtol=0.0, atol=0.0)
    return dict(rtol=steps * 2.0 ** -MANTISSA_BITS[dtype], atol=steps * 2.0 ** -22 * operand_bound)
