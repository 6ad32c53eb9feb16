"""The fused multi-tensor SGD kernel: one program per chunk of the chunk table that sgd.py builds
(its columns: TABLE_COLUMNS below).

Per element (math in fp32 registers, fp64 for fp64 tensors), p, grad and buf are each read once
and p and buf written once (20 bytes per fp32 parameter with momentum; 28 with a GradScaler,
whose unscaled gradient is written back like torch's fused SGD does):
    g = grad / grad_scale                    (with a GradScaler; written back to grad)
    g = -g                                   (maximize)
    p = p * (1 - lr*wd)  or  g = g + wd*p    (decoupled or L2 weight decay)
    buf = g (first step)  or  buf = momentum*buf + (1 - dampening)*g
    g = g + momentum*buf (nesterov)  or  g = buf
    p = p - lr*g
lr may live in a device tensor (read by every program, no host sync). A nonzero ``found_inf``
(GradScaler's overflow flag) or a nonzero element 0 of ``skip_flag`` (an int64 tensor: a bad
EmbeddingDotBias index was seen, see fastcore5.index_errors), both read on the device, turns
every program's chunk length to 0, so nothing at all is written: params, buffers and grads keep
their values. No atomics: chunks never overlap.
"""
import math

import numpy as np
import triton
import triton.language as tl

from ._common import interpreting, rounded_to

# The chunk table's int64 columns: param offset, grad offset, buffer offset, length. A constexpr
# because the kernel strides the table by it.
TABLE_COLUMNS: tl.constexpr = tl.constexpr(4)


def block_sizes() -> tuple[int, int, int]:
    """(BLOCK, CHUNK, num_warps). Compiled: 2048-element pieces (16 KB of fp32 loads per piece
    and program: p, grad, buf) in 32768-element chunks, so one 64M tensor makes 2048 programs,
    enough to cover 132 SMs many times over; not yet tuned on a GPU (bench/NOTES.md). The
    interpreter runs one program at a time in Python, so there small chunks keep the tests'
    multi-chunk and masked-tail paths reachable with small tensors."""
    if interpreting():
        return 256, 1024, 4
    return 2048, 32768, 8


@triton.jit
def _split_scalar(hi, lo, COMPUTE: tl.constexpr):
    # Triton passes Python floats as fp32; fp64 tensors get hi + lo (about 48 bits) instead.
    return tl.cast(hi, COMPUTE) + tl.cast(lo, COMPUTE)


@triton.jit
def _sgd_piece(
    p_ptrs, g_ptrs, b_ptrs, idx, n,
    lr, momentum, keep, weight_decay, scale,
    MASKED: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_MOMENTUM: tl.constexpr, FIRST_STEP: tl.constexpr,
    NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_WD: tl.constexpr, DECOUPLED: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    if MASKED:
        mask = idx < n
        p = tl.load(p_ptrs, mask=mask, other=0.0).to(COMPUTE)
        grad = tl.load(g_ptrs, mask=mask, other=0.0)
    else:
        p = tl.load(p_ptrs).to(COMPUTE)
        grad = tl.load(g_ptrs)
    g = grad.to(COMPUTE)
    if HAS_SCALE:
        g = g / scale
        if MASKED:
            tl.store(g_ptrs, rounded_to(g, g_ptrs.dtype.element_ty), mask=mask)
        else:
            tl.store(g_ptrs, rounded_to(g, g_ptrs.dtype.element_ty))
    if MAXIMIZE:
        g = -g
    if HAS_WD:
        if DECOUPLED:
            p = p * (1.0 - lr * weight_decay)
        else:
            g = g + weight_decay * p
    if HAS_MOMENTUM:
        if FIRST_STEP:
            buf = g
        else:
            if MASKED:
                buf = tl.load(b_ptrs, mask=mask, other=0.0).to(COMPUTE)
            else:
                buf = tl.load(b_ptrs).to(COMPUTE)
            buf = momentum * buf + keep * g
        if MASKED:
            tl.store(b_ptrs, rounded_to(buf, b_ptrs.dtype.element_ty), mask=mask)
        else:
            tl.store(b_ptrs, rounded_to(buf, b_ptrs.dtype.element_ty))
        if NESTEROV:
            g = g + momentum * buf
        else:
            g = buf
    p = p - lr * g
    if MASKED:
        tl.store(p_ptrs, rounded_to(p, p_ptrs.dtype.element_ty), mask=mask)
    else:
        tl.store(p_ptrs, rounded_to(p, p_ptrs.dtype.element_ty))


@triton.jit
def sgd_kernel(
    base_ptr, table_ptr, lr_ptr, scale_ptr, found_inf_ptr, skip_ptr,
    lr_hi, lr_lo, momentum_hi, momentum_lo, keep_hi, keep_lo, wd_hi, wd_lo,
    LR_ON_DEVICE: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, HAS_SKIP: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr, FIRST_STEP: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
    HAS_WD: tl.constexpr, DECOUPLED: tl.constexpr, ALIGN: tl.constexpr, COMPUTE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = table_ptr + tl.program_id(0).to(tl.int64) * TABLE_COLUMNS
    # ALIGN (elements) is a promise the launcher checked: every offset keeps 16-byte alignment.
    p_off = tl.multiple_of(tl.load(row), ALIGN)
    g_off = tl.multiple_of(tl.load(row + 1), ALIGN)
    b_off = tl.multiple_of(tl.load(row + 2), ALIGN)
    count = tl.load(row + 3)
    if HAS_FOUND_INF:
        # An overflowed GradScaler step: no program touches anything.
        count = tl.where(tl.load(found_inf_ptr) != 0, 0, count)
    if HAS_SKIP:
        # A bad index reached this step's gradients: the update is skipped the same way.
        count = tl.where(tl.load(skip_ptr) != 0, 0, count)
    if LR_ON_DEVICE:
        lr = tl.load(lr_ptr).to(COMPUTE)
    else:
        lr = _split_scalar(lr_hi, lr_lo, COMPUTE)
    momentum = _split_scalar(momentum_hi, momentum_lo, COMPUTE)
    keep = _split_scalar(keep_hi, keep_lo, COMPUTE)
    weight_decay = _split_scalar(wd_hi, wd_lo, COMPUTE)
    scale = 1.0
    if HAS_SCALE:
        scale = tl.load(scale_ptr).to(COMPUTE)
    idx = tl.arange(0, BLOCK)
    n_full = count // BLOCK
    for i in range(n_full):
        start = i * BLOCK
        _sgd_piece(
            base_ptr + p_off + start + idx, base_ptr + g_off + start + idx, base_ptr + b_off + start + idx,
            idx, BLOCK, lr, momentum, keep, weight_decay, scale,
            False, HAS_SCALE, HAS_MOMENTUM, FIRST_STEP, NESTEROV, MAXIMIZE, HAS_WD, DECOUPLED, COMPUTE,
        )
    start = n_full * BLOCK
    if start < count:
        _sgd_piece(
            base_ptr + p_off + start + idx, base_ptr + g_off + start + idx, base_ptr + b_off + start + idx,
            idx, count - start, lr, momentum, keep, weight_decay, scale,
            True, HAS_SCALE, HAS_MOMENTUM, FIRST_STEP, NESTEROV, MAXIMIZE, HAS_WD, DECOUPLED, COMPUTE,
        )


def split_fp32(x: float) -> tuple[float, float]:
    """x as an fp32 pair hi + lo (hi = x rounded to fp32), so fp64 kernels see ~48 bits of x."""
    x = float(x)
    hi = float(np.float32(x))
    return (hi, x - hi) if math.isfinite(hi) else (x, 0.0)
