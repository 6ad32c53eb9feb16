"""Fused Linear + bias + ReLU: out = relu(x @ W.T + b), and its backward.

x is (M, K), W is (N, K) like nn.Linear.weight, b is (N,) or absent, out is (M, N).
Forward: one tiled GEMM whose epilogue adds the bias and applies ReLU before the only store.
Backward: relu'(pre) = (out > 0), so only ``out`` is needed, never the pre-activation.
  grad_x = g @ W            (one kernel, tiles of grad_x, loop over N)
  grad_W = g.T @ x, grad_b = g.sum(0)   (one kernel, tiles of grad_W, loop over M; the bias
                                         sum rides on the g tiles the column-0 programs load)
with g = where(out > 0, grad_out, 0) formed on the fly from the loaded tiles, so neither the
mask nor g is ever written to memory. All accumulation is fp32 (fp64 for fp64 inputs); there
are no atomics, so the backward is deterministic.
"""
import torch
import triton
import triton.language as tl

from ._common import dot_needs_upcast, dot_precision, finish_output, interpreting, kernel_output_dtype, new_output


def _configs():
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 4})]
    # Hopper (H100/H200): 128x128..128x256 tiles with 3-4 stages fill the 228 KB of shared memory
    # for bf16; the smaller tiles cover skinny shapes and fp32.
    shapes = [
        (128, 256, 64, 3, 8),
        (256, 128, 64, 3, 8),
        (128, 128, 64, 4, 8),
        (128, 128, 32, 4, 4),
        (64, 256, 32, 4, 4),
        (128, 64, 32, 4, 4),
        (64, 128, 32, 4, 4),
        (64, 64, 32, 5, 2),
    ]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_stages=s, num_warps=w)
        for m, n, k, s, w in shapes
    ]


@triton.jit
def _grouped_tile(pid, rows, cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, GROUP: tl.constexpr):
    """Map a flat program id to a (row tile, column tile), GROUP row tiles at a time for L2 reuse."""
    tiles_r = tl.cdiv(rows, BLOCK_R)
    tiles_c = tl.cdiv(cols, BLOCK_C)
    per_group = GROUP * tiles_c
    first_r = (pid // per_group) * GROUP
    group_size = min(tiles_r - first_r, GROUP)
    tile_r = first_r + ((pid % per_group) % group_size)
    tile_c = (pid % per_group) // group_size
    return tile_r, tile_c


@triton.autotune(configs=_configs(), key=["M", "N", "K", "INPUT_PRECISION"])
@triton.jit
def _linear_relu_fwd_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    tile_m, tile_n = _grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = tile_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tile_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Wrap out-of-range rows/columns onto valid ones so the hot loop needs no M/N masks;
    # the store below masks them out.
    rows = offs_m % M
    cols = offs_n % N
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + cols[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        x_tile = tl.load(x_ptrs, mask=offs_k[None, :] < K - k0, other=0.0)
        w_tile = tl.load(w_ptrs, mask=offs_k[:, None] < K - k0, other=0.0)
        if UPCAST:
            x_tile = x_tile.to(tl.float32)
            w_tile = w_tile.to(tl.float32)
        acc = tl.dot(x_tile, w_tile, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols).to(ACC_DTYPE)[None, :]
    acc = tl.maximum(acc, 0.0)
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.autotune(configs=_configs(), key=["M", "N", "K", "INPUT_PRECISION"])
@triton.jit
def _linear_relu_bwd_input_kernel(
    grad_ptr, out_ptr, w_ptr, dx_ptr,
    M, N, K,
    stride_gm, stride_gn, stride_om, stride_on, stride_wn, stride_wk, stride_dm, stride_dk,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """grad_x tile = sum over N of g tile @ W tile. Block names follow the output (M, K):
    BLOCK_M tiles M, BLOCK_N tiles K, BLOCK_K is the reduction over N."""
    pid = tl.program_id(0)
    tile_m, tile_k = _grouped_tile(pid, M, K, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = tile_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tile_k.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_n = tl.arange(0, BLOCK_K)
    rows = offs_m % M
    cols = offs_k % K
    g_ptrs = grad_ptr + rows[:, None] * stride_gm + offs_n[None, :] * stride_gn
    o_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + cols[None, :] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for n0 in range(0, N, BLOCK_K):
        in_range = offs_n < N - n0
        grad = tl.load(g_ptrs, mask=in_range[None, :], other=0.0)
        active = tl.load(o_ptrs, mask=in_range[None, :], other=0.0) > 0
        g_tile = tl.where(active, grad, tl.zeros_like(grad)).to(w_ptr.dtype.element_ty)
        w_tile = tl.load(w_ptrs, mask=in_range[:, None], other=0.0)
        if UPCAST:
            g_tile = g_tile.to(tl.float32)
            w_tile = w_tile.to(tl.float32)
        acc = tl.dot(g_tile, w_tile, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        g_ptrs += BLOCK_K * stride_gn
        o_ptrs += BLOCK_K * stride_on
        w_ptrs += BLOCK_K * stride_wn
    dx_ptrs = dx_ptr + offs_m[:, None] * stride_dm + offs_k[None, :] * stride_dk
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


@triton.autotune(configs=_configs(), key=["M", "N", "K", "INPUT_PRECISION", "HAS_WEIGHT_GRAD"])
@triton.jit
def _linear_relu_bwd_weight_kernel(
    grad_ptr, out_ptr, x_ptr, dw_ptr, db_ptr,
    M, N, K,
    stride_gm, stride_gn, stride_om, stride_on, stride_xm, stride_xk, stride_dn, stride_dk,
    HAS_WEIGHT_GRAD: tl.constexpr, HAS_BIAS_GRAD: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """grad_W tile (rows of N, columns of K) = sum over M of g.T tile @ x tile; the programs of
    the first K tile also write grad_b = sum over M of g. Block names follow the output:
    BLOCK_M tiles N, BLOCK_N tiles K, BLOCK_K is the reduction over M."""
    pid = tl.program_id(0)
    tile_n, tile_k = _grouped_tile(pid, N, K, BLOCK_M, BLOCK_N, GROUP_M)
    offs_n = tile_n.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tile_k.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_K)
    rows = offs_n % N
    cols = offs_k % K
    gt_ptrs = grad_ptr + rows[:, None] * stride_gn + offs_m[None, :] * stride_gm
    ot_ptrs = out_ptr + rows[:, None] * stride_on + offs_m[None, :] * stride_om
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + cols[None, :] * stride_xk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    bias_acc = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)
    for m0 in range(0, M, BLOCK_K):
        in_range = offs_m < M - m0
        grad = tl.load(gt_ptrs, mask=in_range[None, :], other=0.0)
        active = tl.load(ot_ptrs, mask=in_range[None, :], other=0.0) > 0
        gt_tile = tl.where(active, grad, tl.zeros_like(grad))
        if HAS_BIAS_GRAD:
            bias_acc += tl.sum(gt_tile.to(ACC_DTYPE), axis=1)
        if HAS_WEIGHT_GRAD:
            x_tile = tl.load(x_ptrs, mask=in_range[:, None], other=0.0)
            gt_tile = gt_tile.to(x_ptr.dtype.element_ty)
            if UPCAST:
                gt_tile = gt_tile.to(tl.float32)
                x_tile = x_tile.to(tl.float32)
            acc = tl.dot(gt_tile, x_tile, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        gt_ptrs += BLOCK_K * stride_gm
        ot_ptrs += BLOCK_K * stride_om
        x_ptrs += BLOCK_K * stride_xm
    if HAS_WEIGHT_GRAD:
        dw_ptrs = dw_ptr + offs_n[:, None] * stride_dn + offs_k[None, :] * stride_dk
        tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=(offs_n[:, None] < N) & (offs_k[None, :] < K))
    if HAS_BIAS_GRAD:
        if tile_k == 0:
            tl.store(db_ptr + offs_n, bias_acc.to(db_ptr.dtype.element_ty), mask=offs_n < N)


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _in_features(x, weight) -> int:
    """K from whichever of x (M, K) and weight (N, K) was saved; 0 when only grad_b is wanted."""
    if x is not None:
        return x.shape[1]
    return weight.shape[1] if weight is not None else 0


def _grid(rows, cols):
    return lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(cols, meta["BLOCK_N"]),)


def linear_relu_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """relu(x @ weight.T + bias) for 2-D x (M, K) of any strides; returns a new (M, N) tensor."""
    M, K = x.shape
    N = weight.shape[0]
    out = new_output((M, N), kernel_output_dtype(x.dtype), x.device)
    if M == 0 or N == 0:
        return finish_output(out, x.dtype)
    if bias is not None:
        bias = bias.contiguous()  # N elements: cheaper to copy than to stride in the epilogue
    _linear_relu_fwd_kernel[_grid(M, N)](
        x, weight, bias if bias is not None else x, out,
        M, N, K,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, INPUT_PRECISION=dot_precision(x.dtype),
        UPCAST=dot_needs_upcast(x.dtype), ACC_DTYPE=_acc_dtype(x.dtype),
    )
    return finish_output(out, x.dtype)


def linear_relu_backward(
    grad_out: torch.Tensor,
    out: torch.Tensor,
    x: torch.Tensor | None,
    weight: torch.Tensor | None,
    need_input_grad: bool,
    need_weight_grad: bool,
    need_bias_grad: bool,
):
    """(grad_x, grad_W, grad_b) for out = relu(x @ W.T + b); each is None unless asked for.

    x is needed only for grad_W and weight only for grad_x. Shapes: grad_out and out (M, N),
    x (M, K), weight (N, K).
    """
    M, N = out.shape
    K = _in_features(x, weight)
    dtype = out.dtype
    grad_dtype = kernel_output_dtype(dtype)
    precision, upcast, acc_dtype = dot_precision(dtype), dot_needs_upcast(dtype), _acc_dtype(dtype)
    grad_x = grad_w = grad_b = None
    if need_input_grad:
        grad_x = new_output((M, K), grad_dtype, out.device)
        if M and K:
            if N == 0:
                grad_x.zero_()
            else:
                _linear_relu_bwd_input_kernel[_grid(M, K)](
                    grad_out, out, weight, grad_x,
                    M, N, K,
                    grad_out.stride(0), grad_out.stride(1), out.stride(0), out.stride(1),
                    weight.stride(0), weight.stride(1), grad_x.stride(0), grad_x.stride(1),
                    INPUT_PRECISION=precision, UPCAST=upcast, ACC_DTYPE=acc_dtype,
                )
    if need_weight_grad or need_bias_grad:
        grad_w = new_output((N, K), grad_dtype, out.device) if need_weight_grad else None
        grad_b = new_output((N,), grad_dtype, out.device) if need_bias_grad else None
        weight_tiles = need_weight_grad and K > 0
        if M == 0:
            for g in (grad_w, grad_b):
                if g is not None:
                    g.zero_()
        elif N and (weight_tiles or need_bias_grad):
            k_extent = K if weight_tiles else 1  # bias only: one program column, no K tiles
            _linear_relu_bwd_weight_kernel[_grid(N, k_extent)](
                grad_out, out, x if weight_tiles else out,
                grad_w if weight_tiles else out, grad_b if need_bias_grad else out,
                M, N, k_extent,
                grad_out.stride(0), grad_out.stride(1), out.stride(0), out.stride(1),
                x.stride(0) if weight_tiles else 0, x.stride(1) if weight_tiles else 0,
                grad_w.stride(0) if weight_tiles else 0, grad_w.stride(1) if weight_tiles else 0,
                HAS_WEIGHT_GRAD=weight_tiles, HAS_BIAS_GRAD=need_bias_grad,
                INPUT_PRECISION=precision, UPCAST=upcast, ACC_DTYPE=acc_dtype,
            )
    return tuple(None if g is None else finish_output(g, dtype) for g in (grad_x, grad_w, grad_b))
