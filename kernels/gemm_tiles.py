"""The @triton.jit pieces every GEMM kernel here shares: the grouped tile order, the dot operands'
preparation (interpreter upcast, TF32 rounding), torch.relu's NaN-keeping ReLU and its mask, and
the one K loop of the portable kernels (``tile_product``), and their output tile's offsets and store
(``tile_offsets``, ``store_tile``). The portable kernels
(kernels/linear_relu.py, kernels/mlp.py) and the TMA kernels (kernels/linear_relu_hopper.py) import
them from here, so neither kernel module imports the other's kernels.

Addresses: every product of an index and a stride is formed in int64 (offsets of rows and
columns, and of the reduction index, are int64, and so are the pointer steps of the K loop), so
a column-major operand whose leading stride times BLOCK passes 2**31 addresses correctly.
"""
import triton
import triton.language as tl

from ._common import rounded_to


@triton.jit
def grouped_tile(pid, rows, cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, GROUP: tl.constexpr):
    """Map a flat program id to a (row tile, column tile), GROUP row tiles at a time for L2 reuse."""
    tiles_r = tl.cdiv(rows, BLOCK_R)
    tiles_c = tl.cdiv(cols, BLOCK_C)
    per_group = GROUP * tiles_c
    first_r = (pid // per_group) * GROUP
    group_size = min(tiles_r - first_r, GROUP)
    tile_r = first_r + ((pid % per_group) % group_size)
    tile_c = (pid % per_group) // group_size
    return tile_r, tile_c


@triton.jit
def round_to_tf32(v):
    """fp32 -> the nearest tf32 value (10 mantissa bits, ties to even), still stored as fp32.

    Tensor cores given fp32 operands with input_precision="tf32" drop the low 13 mantissa bits
    (truncation), which doubles the error cuBLAS gets by rounding first; rounded operands make
    that truncation exact. Inf and NaN pass through unchanged."""
    bits = v.to(tl.uint32, bitcast=True)
    tie_to_even = (bits >> 13) & 1
    rounded = ((bits + 0xFFF + tie_to_even) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return tl.where((bits & 0x7F800000) == 0x7F800000, v, rounded)


@triton.jit
def relu(v):
    """torch.relu's values: a NaN stays NaN (tl.maximum would turn it into 0 on a GPU)."""
    return tl.where(v < 0, tl.zeros_like(v), v)


@triton.jit
def relu_masked(grad, out):
    """grad where relu's output ``out`` is not <= 0, else 0: torch's threshold_backward, which
    passes the gradient of a NaN output on."""
    return tl.where(out <= 0, tl.zeros_like(grad), grad)


@triton.jit
def dot_operand(tile, UPCAST: tl.constexpr, ROUND_TF32: tl.constexpr):
    """A loaded tile as tl.dot should get it: widened to fp32 under the interpreter's bf16
    problem (UPCAST), rounded to tf32 when TF32 is on (ROUND_TF32); unchanged otherwise."""
    if UPCAST:
        tile = tile.to(tl.float32)
    if ROUND_TF32:
        tile = round_to_tf32(tile)
    return tile


@triton.jit
def tile_product(
    a_ptr, relu_out_ptr, b_ptr, rows, cols, R,
    stride_a_row, stride_a_r, stride_o_row, stride_o_r, stride_b_r, stride_b_col,
    MASK_BY_RELU: tl.constexpr, SUM_ROWS: tl.constexpr, DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """The K loop of every portable GEMM kernel: over r < R, BLOCK_R at a time, with
    A[rows, r] = a (masked by relu's output, relu_masked(a, relu_out), when MASK_BY_RELU):
      acc      = sum_r A[rows, r] * B[r, cols] in ACC_DTYPE, A's tiles in B's dtype (when DOT)
      row_sums = sum_r A[rows, r] in ACC_DTYPE                                    (when SUM_ROWS)
    Returns (acc, row_sums); the one not asked for stays 0 and is never stored. ``rows`` and
    ``cols`` (int64) must lie in range: callers wrap out-of-range ones onto valid ones
    (offs % extent) so the loop needs only the R mask, and mask them at the store. Pointers not
    read (relu_out without MASK_BY_RELU, b without DOT) may be any tensor."""
    offs_r = tl.arange(0, BLOCK_R).to(tl.int64)
    a_ptrs = a_ptr + rows[:, None] * stride_a_row + offs_r[None, :] * stride_a_r
    o_ptrs = relu_out_ptr + rows[:, None] * stride_o_row + offs_r[None, :] * stride_o_r
    b_ptrs = b_ptr + offs_r[:, None] * stride_b_r + cols[None, :] * stride_b_col
    a_step = tl.cast(stride_a_r, tl.int64) * BLOCK_R  # tl.cast: a stride equal to 1 arrives as a constexpr
    o_step = tl.cast(stride_o_r, tl.int64) * BLOCK_R
    b_step = tl.cast(stride_b_r, tl.int64) * BLOCK_R
    acc = tl.zeros((BLOCK_ROWS, BLOCK_COLS), dtype=ACC_DTYPE)
    row_sums = tl.zeros((BLOCK_ROWS,), dtype=ACC_DTYPE)
    for r0 in range(0, R, BLOCK_R):
        in_range = offs_r < R - r0
        a_tile = tl.load(a_ptrs, mask=in_range[None, :], other=0.0)
        if MASK_BY_RELU:
            a_tile = relu_masked(a_tile, tl.load(o_ptrs, mask=in_range[None, :], other=0.0))
        if SUM_ROWS:
            row_sums += tl.sum(a_tile.to(ACC_DTYPE), axis=1)
        if DOT:
            b_tile = tl.load(b_ptrs, mask=in_range[:, None], other=0.0)
            a_tile = dot_operand(a_tile.to(b_ptr.dtype.element_ty), UPCAST, ROUND_TF32)
            b_tile = dot_operand(b_tile, UPCAST, ROUND_TF32)
            acc = tl.dot(a_tile, b_tile, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        a_ptrs += a_step
        o_ptrs += o_step
        b_ptrs += b_step
    return acc, row_sums


@triton.jit
def tile_offsets(rows, cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, GROUP: tl.constexpr):
    """This program's output tile in the grouped order: its int64 row offsets, its int64 column
    offsets and its column tile's index."""
    tile_r, tile_c = grouped_tile(tl.program_id(0), rows, cols, BLOCK_R, BLOCK_C, GROUP)
    offs_r = tile_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tile_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    return offs_r, offs_c, tile_c


@triton.jit
def store_tile(ptr, acc, offs_r, offs_c, stride_r, stride_c, rows, cols):
    """``acc`` rounded to ``ptr``'s dtype, stored at (offs_r, offs_c) inside the (rows, cols) output."""
    in_tile = (offs_r[:, None] < rows) & (offs_c[None, :] < cols)
    tl.store(ptr + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c, rounded_to(acc, ptr.dtype.element_ty), mask=in_tile)
