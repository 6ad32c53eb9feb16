"""The @triton.jit code of the Hopper (sm_90) Linear + bias + ReLU GEMMs: TMA tensor descriptors,
a persistent grid. Their launchers, configs and kernel choice are in kernels/linear_relu_hopper.py.

Same three products as kernels/linear_relu.py (read its docstring for the maths):
  forward  out    = relu(x @ W.T + b)             output tiles of (M, N), reduction over K
  grad_x   dx     = g @ W                         output tiles of (M, K), reduction over N
  grad_W   dW, db = g.T @ x, g.sum(0)             output tiles of (N, K), reduction over M
with g = where(out > 0, grad_out, 0) formed from the grad_out and out tiles as they arrive in
the K loop, never written to memory. The same kernels serve the MLP (kernels/mlp.py) through
their flags: the output layer's forward without ReLU, the grad-input GEMM with g as given and its
result masked by the layer below's output in the epilogue, grad_W with g as given. The forward and
grad_x are one kernel (``_fwd_and_grad_input_kernel``), specialised by constexpr flags.

What differs from the portable kernels, and why:
- Operand tiles arrive through host-built TMA descriptors (triton.tools.tensor_descriptor,
  present in triton 3.6 and 3.9): one bulk copy per tile instead of per-thread address
  arithmetic, zero-filled past the edges (so no masks in the loop), pipelined by Triton over
  ``num_stages`` shared-memory buffers. Output tiles leave through a descriptor store too,
  clipped at the edges. Host descriptors need no device allocator (in-kernel
  ``tl.make_tensor_descriptor`` would need ``triton.set_allocator``, a per-thread context
  variable that autograd's backward thread does not inherit).
- A persistent grid: min(#SMs, #tiles) programs walk the output tiles in grouped order
  (GROUP_M row tiles at a time, for L2 reuse of the shared operand); the tile loop is
  flattened with the K loop so the next tile's first loads overlap this tile's epilogue.
- grad_b is summed, in a fixed order, by the one program that owns each (N tile, K tile 0) of
  grad_W: deterministic, no atomics, no partial buffers.
TMA coordinates are 32-bit by hardware (the descriptors carry 64-bit strides, so there is no
element offset to overflow); the one pointer computed by hand, the bias, is offset in int64.
"""
import triton
import triton.language as tl

from ._common import rounded_to
from .gemm_tiles import dot_operand, grouped_tile, relu, relu_masked, round_to_tf32


_BIAS_DOT_COLUMNS = tl.constexpr(16)  # the narrowest wgmma N for 16-bit operands


@triton.jit
def _fwd_and_grad_input_kernel(
    a_desc, a_mask_desc, b_desc, bias_ptr, below_desc, c_desc, M, N, K,
    MASK_GRAD: tl.constexpr, B_TRANSPOSED: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
    MASK_BELOW: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
):
    """c = a @ W.T (B_TRANSPOSED: the forward, a = x) or a @ W (the grad-input product, a = g), W
    = ``b_desc`` of shape (N, K), a of M rows; c's tiles are BLOCK_M x BLOCK_N, the reduction
    steps BLOCK_K. MASK_GRAD: each a tile is masked by relu's output (``a_mask_desc``) as it
    arrives (Linear+ReLU's grad_x). Epilogue, in order: HAS_BIAS adds ``bias_ptr``'s values of
    c's columns, RELU (RELU=False: a plain Linear, the output layer of kernels/mlp.py's stack),
    MASK_BELOW masks by ``below > 0``, the output of the ReLU layer underneath (the MLP's
    grad-input product, whose g arrives masked). A descriptor or pointer a flag leaves unread is
    None or any descriptor of the right block shape."""
    if B_TRANSPOSED:
        cols, reduction = N, K
    else:
        cols, reduction = K, N
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(cols, BLOCK_N)
    steps = tl.cdiv(reduction, BLOCK_K)
    for tile in tl.range(tl.program_id(0), tiles, NUM_PROGRAMS, flatten=True):
        tile_m, tile_c = grouped_tile(tile, M, cols, BLOCK_M, BLOCK_N, GROUP_M)
        row, col = tile_m * BLOCK_M, tile_c * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
        for step in range(steps):
            a_tile = a_desc.load([row, step * BLOCK_K])
            if MASK_GRAD:
                a_tile = relu_masked(a_tile, a_mask_desc.load([row, step * BLOCK_K]))
            if B_TRANSPOSED:
                b_tile = b_desc.load([col, step * BLOCK_K])
            else:
                b_tile = b_desc.load([step * BLOCK_K, col])
            a_tile = dot_operand(a_tile, UPCAST, ROUND_TF32)
            b_tile = dot_operand(b_tile, UPCAST, ROUND_TF32)
            if B_TRANSPOSED:
                b_tile = b_tile.T
            acc = tl.dot(a_tile, b_tile, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        if HAS_BIAS:
            offsets = col.to(tl.int64) + tl.arange(0, BLOCK_N)
            acc += tl.load(bias_ptr + offsets, mask=offsets < cols, other=0.0).to(ACC_DTYPE)[None, :]
        if RELU:
            acc = relu(acc)
        if MASK_BELOW:
            acc = relu_masked(acc, below_desc.load([row, col]))
        c_desc.store([row, col], rounded_to(acc, c_desc.dtype))


@triton.jit
def _bwd_weight_kernel(
    grad_desc, out_desc, x_desc, dw_desc, db_ptr, M, N, K,
    HAS_BIAS_GRAD: tl.constexpr, BIAS_BY_DOT: tl.constexpr, RELU: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
):
    """grad_W tiles: BLOCK_M over N, BLOCK_N over K, BLOCK_K steps over M. grad_b of an N tile
    is summed by the program holding that N tile's first K tile, in step order. RELU=False takes
    grad as g unmasked (``out_desc`` is then not read): the MLP's gradients arrive masked."""
    tiles = tl.cdiv(N, BLOCK_M) * tl.cdiv(K, BLOCK_N)
    m_steps = tl.cdiv(M, BLOCK_K)
    for tile in tl.range(tl.program_id(0), tiles, NUM_PROGRAMS, flatten=True):
        tile_n, tile_k = grouped_tile(tile, N, K, BLOCK_M, BLOCK_N, GROUP_M)
        row, col = tile_n * BLOCK_M, tile_k * BLOCK_N
        sums_bias = HAS_BIAS_GRAD and tile_k == 0
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
        bias_acc = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)
        bias_cols = tl.zeros((BLOCK_M, _BIAS_DOT_COLUMNS), dtype=ACC_DTYPE)
        for step in range(m_steps):
            g_tile = grad_desc.load([step * BLOCK_K, row])
            if RELU:
                g_tile = relu_masked(g_tile, out_desc.load([step * BLOCK_K, row]))
            gt_tile = g_tile.T
            x_tile = x_desc.load([step * BLOCK_K, col])
            if UPCAST:
                gt_tile = gt_tile.to(tl.float32)
                x_tile = x_tile.to(tl.float32)
            if sums_bias:
                if BIAS_BY_DOT:
                    # Row sums as a narrow product with ones: the tensor cores read the operand
                    # registers the main dot reads, where tl.sum made the compiler load each
                    # tile from shared memory a second time, in every program, in another layout.
                    ones = tl.full((BLOCK_K, _BIAS_DOT_COLUMNS), 1.0, gt_tile.dtype)
                    bias_cols = tl.dot(gt_tile, ones, bias_cols, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
                else:
                    bias_acc += tl.sum(gt_tile.to(ACC_DTYPE), axis=1)
            if ROUND_TF32:
                gt_tile = round_to_tf32(gt_tile)
                x_tile = round_to_tf32(x_tile)
            acc = tl.dot(gt_tile, x_tile, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        dw_desc.store([row, col], rounded_to(acc, dw_desc.dtype))
        if sums_bias:
            if BIAS_BY_DOT:
                # every column holds the same sums; dividing by a power of two is exact, and NaN stays
                bias_acc = tl.sum(bias_cols, axis=1) / _BIAS_DOT_COLUMNS
            rows = row.to(tl.int64) + tl.arange(0, BLOCK_M)
            tl.store(db_ptr + rows, rounded_to(bias_acc, db_ptr.dtype.element_ty), mask=rows < N)
