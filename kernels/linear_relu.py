"""Fused Linear + bias + ReLU: out = relu(x @ W.T + b), and its backward.

x is (M, K), W is (N, K) like nn.Linear.weight, b is (N,) or absent, out is (M, N).
Forward: one tiled GEMM whose epilogue adds the bias and applies ReLU before the only store.
Backward: relu'(pre) = (out > 0; NaN passes, as in torch), so only ``out`` is needed, never the pre-activation.
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

from . import linear_relu_hopper  # the TMA kernels for sm_90+, dispatched to at the top of each launcher
from ._common import dot_precision, new_output, on_device_of, rounded_to
from .gemm_launch import GemmLauncher
from .gemm_tiles import relu, relu_masked, store_tile, tile_offsets, tile_product


@triton.jit
def _linear_relu_fwd_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """RELU=False makes it a plain Linear (the output layer of kernels/mlp.py's stack)."""
    offs_m, offs_n, _ = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    cols = offs_n % N
    acc, _ = tile_product(
        x_ptr, x_ptr, w_ptr, offs_m % M, cols, K, stride_xm, stride_xk, 0, 0, stride_wk, stride_wn,
        False, False, True, INPUT_PRECISION, ROUND_TF32, UPCAST, ACC_DTYPE, BLOCK_M, BLOCK_N, BLOCK_K,
    )
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols).to(ACC_DTYPE)[None, :]
    if RELU:
        acc = relu(acc)
    store_tile(out_ptr, acc, offs_m, offs_n, stride_om, stride_on, M, N)


@triton.jit
def _linear_relu_bwd_input_kernel(
    grad_ptr, out_ptr, w_ptr, below_ptr, dx_ptr,
    M, N, K,
    stride_gm, stride_gn, stride_om, stride_on, stride_wn, stride_wk, stride_bm, stride_bk, stride_dm, stride_dk,
    MASK_GRAD: tl.constexpr, MASK_BELOW: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """grad_x tile = sum over N of g tile @ W tile, g = grad_out masked by out (MASK_GRAD: this
    layer's ReLU) or as given, the result masked by below > 0 (MASK_BELOW: kernels/mlp.py
    applies the ReLU of the layer underneath in this epilogue). A pointer whose mask is off is
    not read. Block names follow the output (M, K): BLOCK_M tiles M, BLOCK_N tiles K, BLOCK_K is
    the reduction over N."""
    offs_m, offs_k, _ = tile_offsets(M, K, BLOCK_M, BLOCK_N, GROUP_M)
    acc, _ = tile_product(
        grad_ptr, out_ptr, w_ptr, offs_m % M, offs_k % K, N,
        stride_gm, stride_gn, stride_om, stride_on, stride_wn, stride_wk,
        MASK_GRAD, False, True, INPUT_PRECISION, ROUND_TF32, UPCAST, ACC_DTYPE, BLOCK_M, BLOCK_N, BLOCK_K,
    )
    if MASK_BELOW:
        in_tile = (offs_m[:, None] < M) & (offs_k[None, :] < K)
        below = tl.load(below_ptr + offs_m[:, None] * stride_bm + offs_k[None, :] * stride_bk, mask=in_tile, other=0.0)
        acc = relu_masked(acc, below)
    store_tile(dx_ptr, acc, offs_m, offs_k, stride_dm, stride_dk, M, K)


@triton.jit
def _linear_relu_bwd_weight_kernel(
    grad_ptr, out_ptr, x_ptr, dw_ptr, db_ptr,
    M, N, K,
    stride_gm, stride_gn, stride_om, stride_on, stride_xm, stride_xk, stride_dn, stride_dk,
    HAS_WEIGHT_GRAD: tl.constexpr, HAS_BIAS_GRAD: tl.constexpr, RELU: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """grad_W tile (rows of N, columns of K) = sum over M of g.T tile @ x tile; the programs of
    the first K tile also write grad_b = sum over M of g. Block names follow the output:
    BLOCK_M tiles N, BLOCK_N tiles K, BLOCK_K is the reduction over M. RELU=False takes
    grad_out as g unmasked (``out`` is then not read): kernels/mlp.py passes gradients that
    are already masked, or belong to a layer without ReLU."""
    offs_n, offs_k, tile_k = tile_offsets(N, K, BLOCK_M, BLOCK_N, GROUP_M)
    acc, bias_acc = tile_product(
        grad_ptr, out_ptr, x_ptr, offs_n % N, offs_k % K, M, stride_gn, stride_gm, stride_on, stride_om,
        stride_xm, stride_xk, RELU, HAS_BIAS_GRAD, HAS_WEIGHT_GRAD, INPUT_PRECISION, ROUND_TF32, UPCAST, ACC_DTYPE,
        BLOCK_M, BLOCK_N, BLOCK_K,
    )
    if HAS_WEIGHT_GRAD:
        store_tile(dw_ptr, acc, offs_n, offs_k, stride_dn, stride_dk, N, K)
    if HAS_BIAS_GRAD:
        if tile_k == 0:
            tl.store(db_ptr + offs_n, rounded_to(bias_acc, db_ptr.dtype.element_ty), mask=offs_n < N)


_forward = GemmLauncher(_linear_relu_fwd_kernel, "Linear+ReLU forward", m_axis=0, flag_names=("HAS_BIAS", "RELU"))
_backward_input = GemmLauncher(
    _linear_relu_bwd_input_kernel, "Linear+ReLU grad_x", m_axis=0, flag_names=("MASK_GRAD", "MASK_BELOW"),
    streamed_tiles=2,
)
_backward_weight = GemmLauncher(
    _linear_relu_bwd_weight_kernel, "Linear+ReLU grad_W/grad_b", m_axis=2,
    flag_names=("HAS_WEIGHT_GRAD", "HAS_BIAS_GRAD", "RELU"), streamed_tiles=2,
)


def tuned_configs() -> list[dict]:
    """The config each Linear+ReLU kernel launched with, per shape bucket, in this process: one row
    per (kernel, bucket) with the bucket, BLOCK sizes, warps, stages, and whether the config was
    timed here, read from the disk cache or the only candidate (benchmarks record this)."""
    portable = [row for launcher in (_forward, _backward_input, _backward_weight) for row in launcher.report()]
    return portable + linear_relu_hopper.tuned_configs()  # the TMA kernels' rows: titles end in " (TMA)"


def _with_a_unit_stride(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` if one of its two strides is 1 (row- or column-major, any leading stride), else a
    contiguous copy, as cuBLAS-backed torch.matmul does. Operands strided in both dimensions
    (x = wide[..., ::2]) were where the H200 run saw 16-bit grad_x 2-3 % off (issue 11); they
    also compile without vector loads or async copies, so the copy costs less than it saves."""
    if t is None or t.stride(1) == 1 or t.stride(0) == 1:
        return t
    return t.contiguous()


def _in_features(x, weight) -> int:
    """K from whichever of x (M, K) and weight (N, K) was saved; 0 when only grad_b is wanted."""
    if x is not None:
        return x.shape[1]
    return weight.shape[1] if weight is not None else 0


@on_device_of(lambda args: args[0])
def linear_relu_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, wrap=None) -> torch.Tensor:
    """relu(x @ weight.T + bias) for 2-D x (M, K) of any strides; returns a new (M, N) tensor.

    ``wrap``: None, or a callable applied to the kernel before launching it
    (torch.library.wrap_triton), for tracing with fake tensors: then nothing is tuned."""
    # The one kernel choice (linear_relu_hopper.takes_tma); a traced launch cannot pass TMA
    # descriptors through wrap, and fastcore5/ops/linear_relu_tma.py diverts those it would take.
    if wrap is None and linear_relu_hopper.forward_eligible(x, weight):
        return linear_relu_hopper.forward(x, weight, bias)
    M, K = x.shape
    N = weight.shape[0]
    dtype = x.dtype
    x_strides, w_strides = x.stride(), weight.stride()
    if 1 not in x_strides:
        x = _with_a_unit_stride(x)
        x_strides = x.stride()
    if 1 not in w_strides:
        weight = _with_a_unit_stride(weight)
        w_strides = weight.stride()
    out = new_output((M, N), x)
    if M == 0 or N == 0:
        return out
    has_bias = bias is not None
    if has_bias:
        bias = bias.contiguous()  # N elements: cheaper to copy than to stride in the epilogue
    precision = dot_precision(dtype)
    strides = (*x_strides, *w_strides, N, 1)  # out is a fresh contiguous (M, N), N > 0
    _forward(
        wrap, (dtype, precision, has_bias, True), (M, N, K), strides,
        (x, weight, bias if has_bias else x, out, M, N, K, *strides),
    )
    return out


def weight_and_bias_grads(launcher, wrap, grad_out, out, x, need_weight_grad, need_bias_grad, relu: bool, precision):
    """(grad_W, grad_b), each None unless asked for, from the grad_W kernel through ``launcher``:
    grad_W = g.T @ x and grad_b = g.sum(0) for g = grad_out * (out > 0) when ``relu``, else
    g = grad_out (``out`` is then not read: pass grad_out). x (M, K) is needed only for grad_W;
    grad_out and out are (M, N) with a unit stride each."""
    M, N = grad_out.shape
    K = x.shape[1] if need_weight_grad else 0
    grad_w = new_output((N, K), grad_out) if need_weight_grad else None
    grad_b = new_output((N,), grad_out) if need_bias_grad else None
    weight_tiles = need_weight_grad and K > 0
    if M == 0:
        for g in (grad_w, grad_b):
            if g is not None:
                g.zero_()
    elif N and (weight_tiles or need_bias_grad):
        k_extent = K if weight_tiles else 1  # bias only: one program column, no K tiles
        operand_strides = (*x.stride(), *grad_w.stride()) if weight_tiles else (0, 0, 0, 0)
        strides = (*grad_out.stride(), *out.stride(), *operand_strides)
        launcher(
            wrap, (grad_out.dtype, precision, weight_tiles, need_bias_grad, relu), (N, k_extent, M), strides,
            (grad_out, out, x if weight_tiles else out, grad_w if weight_tiles else out,
             grad_b if need_bias_grad else out, M, N, k_extent, *strides),
        )
    return grad_w, grad_b


@on_device_of(lambda args: args[1])
def linear_relu_backward(
    grad_out: torch.Tensor,
    out: torch.Tensor,
    x: torch.Tensor | None,
    weight: torch.Tensor | None,
    need_input_grad: bool,
    need_weight_grad: bool,
    need_bias_grad: bool,
    *,
    wrap=None,
):
    """(grad_x, grad_W, grad_b) for out = relu(x @ W.T + b); each is None unless asked for.

    x is needed only for grad_W and weight only for grad_x. Shapes: grad_out and out (M, N),
    x (M, K), weight (N, K). ``wrap`` as for linear_relu_forward.
    """
    if wrap is None and linear_relu_hopper.backward_eligible(
        grad_out, out, x, weight, need_input_grad, need_weight_grad, need_bias_grad
    ):
        return linear_relu_hopper.backward(grad_out, out, x, weight, need_input_grad, need_weight_grad, need_bias_grad)
    M, N = out.shape
    K = _in_features(x, weight)
    dtype = out.dtype
    grad_out, out = _with_a_unit_stride(grad_out), _with_a_unit_stride(out)
    x, weight = _with_a_unit_stride(x), _with_a_unit_stride(weight)
    precision = dot_precision(dtype)
    grad_x = grad_w = grad_b = None
    if need_input_grad:
        grad_x = new_output((M, K), out)
        if M and K:
            if N == 0:
                grad_x.zero_()
            else:
                strides = (*grad_out.stride(), *out.stride(), *weight.stride(), 0, 0, *grad_x.stride())
                _backward_input(
                    wrap, (dtype, precision, True, False), (M, K, N), strides,
                    (grad_out, out, weight, grad_out, grad_x, M, N, K, *strides),
                )
    if need_weight_grad or need_bias_grad:
        grad_w, grad_b = weight_and_bias_grads(
            _backward_weight, wrap, grad_out, out, x, need_weight_grad, need_bias_grad, True, precision
        )
    return grad_x, grad_w, grad_b
