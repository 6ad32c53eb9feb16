"""Fused multi-tensor SGD step (momentum, dampening, L2 or decoupled weight decay, Nesterov,
maximize, GradScaler unscaling and inf skipping): one launch updates every tensor of a list.

How the kernel sees many tensors
--------------------------------
All tensors of one launch share a device and a dtype. Every address is written as a signed
element offset from one *base* tensor (the first parameter), so the kernel reaches any of them as
``base_ptr + offset``: ordinary pointer arithmetic on a real kernel argument. The same code
therefore runs compiled and under TRITON_INTERPRET=1 (where CPU tensors are addressed by their
host addresses), needs no int-to-pointer casts, and keeps the base pointer's 16-byte alignment,
which together with ``tl.multiple_of`` on the offsets lets the compiler emit 16-byte vector
loads and stores.

Each tensor is cut into chunks of CHUNK elements; the *chunk table* (int64, one row per chunk,
on the device) holds, per chunk, the element offsets of its first element in the param, the
grad and the momentum buffer, and its length (<= CHUNK). One program handles one chunk: it loops
over it in BLOCK-sized pieces, unmasked, and finishes with at most one masked piece. So a launch
over 1 tensor of 64M elements and one over 2000 tensors of 4096 cost the same host work: one
table (cached, see ``_chunk_table``) and one launch.

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
(read on the device) turns every program's chunk length to 0, so nothing at all is written:
params, buffers and grads keep their values. No atomics: chunks never overlap.
"""
from __future__ import annotations

import collections
import math

import numpy as np
import torch
import triton
import triton.language as tl

from ._common import interpreting

TABLE_COLUMNS = 4  # param offset, grad offset, buffer offset, length
_TABLE_CACHE_SIZE = 32


def _block_sizes() -> tuple[int, int, int]:
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
def _store_cast(x, like, BF16: tl.constexpr):
    """x (fp32/fp64) as ``like``'s dtype, rounded to nearest even. bf16 is rounded by hand: the
    interpreter truncates a plain fp32 -> bf16 cast (compiled Triton rounds), and spelling the
    rounding out keeps one code path, tested in CI, for both; a few integer operations per element
    cost nothing in a memory-bound kernel."""
    if BF16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        quiet_nan = (bits >> 16) | 0x40
        return tl.where(x != x, quiet_nan, rounded).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(like.dtype)


@triton.jit
def _sgd_piece(
    p_ptrs, g_ptrs, b_ptrs, idx, n,
    lr, momentum, keep, weight_decay, scale,
    MASKED: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_MOMENTUM: tl.constexpr, FIRST_STEP: tl.constexpr,
    NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_WD: tl.constexpr, DECOUPLED: tl.constexpr,
    COMPUTE: tl.constexpr, BF16: tl.constexpr,
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
            tl.store(g_ptrs, _store_cast(g, grad, BF16), mask=mask)
        else:
            tl.store(g_ptrs, _store_cast(g, grad, BF16))
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
            tl.store(b_ptrs, _store_cast(buf, grad, BF16), mask=mask)
        else:
            tl.store(b_ptrs, _store_cast(buf, grad, BF16))
        if NESTEROV:
            g = g + momentum * buf
        else:
            g = buf
    p = p - lr * g
    if MASKED:
        tl.store(p_ptrs, _store_cast(p, grad, BF16), mask=mask)
    else:
        tl.store(p_ptrs, _store_cast(p, grad, BF16))


@triton.jit
def _sgd_kernel(
    base_ptr, table_ptr, lr_ptr, scale_ptr, found_inf_ptr,
    lr_hi, lr_lo, momentum_hi, momentum_lo, keep_hi, keep_lo, wd_hi, wd_lo,
    LR_ON_DEVICE: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr, FIRST_STEP: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
    HAS_WD: tl.constexpr, DECOUPLED: tl.constexpr, ALIGN: tl.constexpr, COMPUTE: tl.constexpr,
    BF16: tl.constexpr, BLOCK: tl.constexpr,
):
    row = table_ptr + tl.program_id(0).to(tl.int64) * 4  # TABLE_COLUMNS int64 per chunk
    # ALIGN (elements) is a promise the launcher checked: every offset keeps 16-byte alignment.
    p_off = tl.multiple_of(tl.load(row), ALIGN)
    g_off = tl.multiple_of(tl.load(row + 1), ALIGN)
    b_off = tl.multiple_of(tl.load(row + 2), ALIGN)
    count = tl.load(row + 3)
    if HAS_FOUND_INF:
        # An overflowed GradScaler step: no program touches anything.
        count = tl.where(tl.load(found_inf_ptr) != 0, 0, count)
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
            False, HAS_SCALE, HAS_MOMENTUM, FIRST_STEP, NESTEROV, MAXIMIZE, HAS_WD, DECOUPLED, COMPUTE, BF16,
        )
    start = n_full * BLOCK
    if start < count:
        _sgd_piece(
            base_ptr + p_off + start + idx, base_ptr + g_off + start + idx, base_ptr + b_off + start + idx,
            idx, count - start, lr, momentum, keep, weight_decay, scale,
            True, HAS_SCALE, HAS_MOMENTUM, FIRST_STEP, NESTEROV, MAXIMIZE, HAS_WD, DECOUPLED, COMPUTE, BF16,
        )


# (device, dtype, CHUNK, base address, addresses, lengths) -> (device chunk table, ALIGN)
_tables: collections.OrderedDict = collections.OrderedDict()


def _dense_layout(name: str, i: int, t: torch.Tensor, like: torch.Tensor) -> None:
    # The kernel walks numel() consecutive elements from data_ptr(); that is the tensor exactly when
    # it is contiguous (or channels-last) and the param, grad and buffer share their strides.
    dense = t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)) or (
        t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d)
    )
    if not dense or t.stride() != like.stride():
        raise ValueError(
            f"{name}[{i}] must be a dense tensor (contiguous or channels-last) with the same strides as params[{i}]; "
            f"got strides {t.stride()} for params[{i}] strides {like.stride()}"
        )


def _chunk_table(params, grads, buffers, chunk: int) -> tuple[torch.Tensor | None, int]:
    """The device chunk table for these tensors and the alignment (in elements) all offsets keep.

    Cached by the tensors' addresses and lengths (least recently used, 32 entries): autograd's
    caching allocator usually hands every step's gradients the same addresses, so after the first
    steps a launch only builds this key. A hit is always right, because the table is a pure
    function of the key. Returns (None, 1) when there is nothing to update.
    """
    device, dtype = params[0].device, params[0].dtype
    p_addr = tuple(map(torch.Tensor.data_ptr, params))
    g_addr = tuple(map(torch.Tensor.data_ptr, grads))
    b_addr = tuple(map(torch.Tensor.data_ptr, buffers)) if buffers else ()
    numels = tuple(map(torch.Tensor.numel, params))
    key = (device, dtype, chunk, p_addr, g_addr, b_addr, numels)
    hit = _tables.get(key)
    if hit is not None:
        _tables.move_to_end(key)
        return hit
    for i, p in enumerate(params):
        _dense_layout("params", i, p, p)
        _dense_layout("grads", i, grads[i], p)
        if buffers:
            _dense_layout("momentum_buffers", i, buffers[i], p)
    size = dtype.itemsize
    base = p_addr[0]
    columns = [p_addr, g_addr, b_addr if buffers else (base,) * len(params)]
    deltas = [a - base for column in columns for a in column]
    if any(d % size for d in deltas):
        raise ValueError(f"tensor addresses are not multiples of the {dtype} element size apart")
    per_vector = 16 // size if size <= 16 else 1
    align = per_vector if all((a % 16) == 0 for column in columns for a in column) else 1
    lengths = torch.tensor(numels, dtype=torch.int64)
    chunks = (lengths + chunk - 1) // chunk
    total = int(chunks.sum())
    if total == 0:
        result = (None, align)
    else:
        owner = torch.repeat_interleave(torch.arange(len(params)), chunks)
        first_chunk = torch.cumsum(chunks, 0) - chunks
        start = (torch.arange(total) - first_chunk[owner]) * chunk
        offsets = torch.tensor(deltas, dtype=torch.int64).view(3, len(params)) // size
        table = torch.empty(total, TABLE_COLUMNS, dtype=torch.int64)
        table[:, :3] = offsets[:, owner].T + start[:, None]
        table[:, 3] = torch.clamp(lengths[owner] - start, max=chunk)
        if device.type == "cuda":
            # Pinned so the copy is asynchronous; torch's host allocator keeps the pinned block
            # alive until the copy has run.
            table = table.pin_memory().to(device, non_blocking=True)
        result = (table, align)
    _tables[key] = result
    if len(_tables) > _TABLE_CACHE_SIZE:
        _tables.popitem(last=False)
    return result


def _split(x: float) -> tuple[float, float]:
    """x as an fp32 pair hi + lo (hi = x rounded to fp32), so fp64 kernels see ~48 bits of x."""
    hi = float(np.float32(x))
    return (hi, x - hi) if math.isfinite(hi) else (x, 0.0)


def sgd_forward(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor],
    lr_tensor: torch.Tensor | None,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
    first_step: bool,
    grad_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None,
) -> None:
    """One SGD step, in place, over tensors that share one device and one floating dtype.

    params, grads: same shapes and strides, pairwise; dense (contiguous or channels-last).
    momentum_buffers: [] when momentum == 0, else one per param (same shape/strides). With
        first_step=True their contents are ignored and they receive the gradient (torch's
        "buf = grad" first step); otherwise they hold the running buffers.
    lr_tensor: a one-element tensor on the params' device that holds lr (read on the device;
        ``lr`` is then ignored), or None to use the float ``lr``.
    grad_scale: None or a one-element float tensor on the device; grads are divided by it and the
        unscaled grads written back (as torch's fused SGD does with a GradScaler).
    found_inf: None or a one-element float tensor on the device; when nonzero nothing is written.
    momentum == 0 means no buffers; nesterov is then ignored.
    Empty tensors are allowed. Returns None: everything happens in place.
    """
    if not params:
        return
    if interpreting() and params[0].device.type != "cpu":
        raise RuntimeError(
            "under TRITON_INTERPRET=1 the SGD kernel addresses tensors by host address and needs CPU tensors; "
            f"got {params[0].device.type} tensors"
        )
    block, chunk, num_warps = _block_sizes()
    has_momentum = momentum != 0
    table, align = _chunk_table(params, grads, momentum_buffers if has_momentum else [], chunk)
    if table is None:
        return
    dtype = params[0].dtype
    compute = tl.float64 if dtype == torch.float64 else tl.float32
    dummy = table  # stands in for absent pointer arguments; never read
    lr_hi, lr_lo = _split(float(lr))
    momentum_hi, momentum_lo = _split(float(momentum))
    keep_hi, keep_lo = _split(1.0 - float(dampening))
    wd_hi, wd_lo = _split(float(weight_decay))
    _sgd_kernel[(table.shape[0],)](
        params[0], table,
        lr_tensor if lr_tensor is not None else dummy,
        grad_scale if grad_scale is not None else dummy,
        found_inf if found_inf is not None else dummy,
        lr_hi, lr_lo, momentum_hi, momentum_lo, keep_hi, keep_lo, wd_hi, wd_lo,
        LR_ON_DEVICE=lr_tensor is not None, HAS_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None,
        HAS_MOMENTUM=has_momentum, FIRST_STEP=bool(first_step), NESTEROV=bool(nesterov) and has_momentum,
        MAXIMIZE=bool(maximize), HAS_WD=weight_decay != 0, DECOUPLED=bool(decoupled_weight_decay),
        ALIGN=align, COMPUTE=compute, BF16=dtype == torch.bfloat16, BLOCK=block, num_warps=num_warps,
    )
