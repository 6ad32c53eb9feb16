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

from ._common import (
    HOPPER_SHARED_MEMORY_BYTES, cdiv, dot_needs_upcast, dot_precision, interpreting, new_output, next_power_of_2,
    rounded_to,
)
from ._tuning import TunedKernel, launch_kwargs
from . import linear_relu_hopper  # the TMA kernels for sm_90+, dispatched to at the top of each launcher


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


@triton.jit
def _round_to_tf32(v):
    """fp32 -> the nearest tf32 value (10 mantissa bits, ties to even), still stored as fp32.

    Tensor cores given fp32 operands with input_precision="tf32" drop the low 13 mantissa bits
    (truncation), which doubles the error cuBLAS gets by rounding first; rounded operands make
    that truncation exact. Inf and NaN pass through unchanged."""
    bits = v.to(tl.uint32, bitcast=True)
    tie_to_even = (bits >> 13) & 1
    rounded = ((bits + 0xFFF + tie_to_even) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return tl.where((bits & 0x7F800000) == 0x7F800000, v, rounded)


@triton.jit
def _dot_operand(tile, UPCAST: tl.constexpr, ROUND_TF32: tl.constexpr):
    """A loaded tile as tl.dot should get it: widened to fp32 under the interpreter's bf16
    problem (UPCAST), rounded to tf32 when TF32 is on (ROUND_TF32); unchanged otherwise."""
    if UPCAST:
        tile = tile.to(tl.float32)
    if ROUND_TF32:
        tile = _round_to_tf32(tile)
    return tile


@triton.jit
def _tile_product(
    a_ptr, b_ptr, rows, cols, R, stride_a_row, stride_a_r, stride_b_r, stride_b_col,
    INPUT_PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """sum over r < R of A[rows, r] * B[r, cols] in ACC_DTYPE, BLOCK_R at a time, A's tiles in B's
    dtype. ``rows`` and ``cols`` must lie in range: callers wrap out-of-range ones onto valid
    ones (offs % extent) so the loop needs only the R mask, and mask them at the store."""
    offs_r = tl.arange(0, BLOCK_R)
    a_ptrs = a_ptr + rows[:, None] * stride_a_row + offs_r[None, :] * stride_a_r
    b_ptrs = b_ptr + offs_r[:, None] * stride_b_r + cols[None, :] * stride_b_col
    acc = tl.zeros((BLOCK_ROWS, BLOCK_COLS), dtype=ACC_DTYPE)
    for r0 in range(0, R, BLOCK_R):
        a_tile = tl.load(a_ptrs, mask=offs_r[None, :] < R - r0, other=0.0).to(b_ptr.dtype.element_ty)
        b_tile = tl.load(b_ptrs, mask=offs_r[:, None] < R - r0, other=0.0)
        a_tile = _dot_operand(a_tile, UPCAST, ROUND_TF32)
        b_tile = _dot_operand(b_tile, UPCAST, ROUND_TF32)
        acc = tl.dot(a_tile, b_tile, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        a_ptrs += BLOCK_R * stride_a_r
        b_ptrs += BLOCK_R * stride_b_r
    return acc


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
    pid = tl.program_id(0)
    tile_m, tile_n = _grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = tile_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tile_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = offs_n % N
    acc = _tile_product(
        x_ptr, w_ptr, offs_m % M, cols, K, stride_xm, stride_xk, stride_wk, stride_wn,
        INPUT_PRECISION, ROUND_TF32, UPCAST, ACC_DTYPE, BLOCK_M, BLOCK_N, BLOCK_K,
    )
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols).to(ACC_DTYPE)[None, :]
    if RELU:
        acc = tl.maximum(acc, 0.0)
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, rounded_to(acc, out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _linear_relu_bwd_input_kernel(
    grad_ptr, out_ptr, w_ptr, dx_ptr,
    M, N, K,
    stride_gm, stride_gn, stride_om, stride_on, stride_wn, stride_wk, stride_dm, stride_dk,
    INPUT_PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
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
        g_tile = _dot_operand(g_tile, UPCAST, ROUND_TF32)
        w_tile = _dot_operand(w_tile, UPCAST, ROUND_TF32)
        acc = tl.dot(g_tile, w_tile, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        g_ptrs += BLOCK_K * stride_gn
        o_ptrs += BLOCK_K * stride_on
        w_ptrs += BLOCK_K * stride_wn
    dx_ptrs = dx_ptr + offs_m[:, None] * stride_dm + offs_k[None, :] * stride_dk
    tl.store(dx_ptrs, rounded_to(acc, dx_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


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
        gt_tile = tl.load(gt_ptrs, mask=in_range[None, :], other=0.0)
        if RELU:
            active = tl.load(ot_ptrs, mask=in_range[None, :], other=0.0) > 0
            gt_tile = tl.where(active, gt_tile, tl.zeros_like(gt_tile))
        if HAS_BIAS_GRAD:
            bias_acc += tl.sum(gt_tile.to(ACC_DTYPE), axis=1)
        if HAS_WEIGHT_GRAD:
            x_tile = tl.load(x_ptrs, mask=in_range[:, None], other=0.0)
            gt_tile = gt_tile.to(x_ptr.dtype.element_ty)
            gt_tile = _dot_operand(gt_tile, UPCAST, ROUND_TF32)
            x_tile = _dot_operand(x_tile, UPCAST, ROUND_TF32)
            acc = tl.dot(gt_tile, x_tile, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        gt_ptrs += BLOCK_K * stride_gm
        ot_ptrs += BLOCK_K * stride_om
        x_ptrs += BLOCK_K * stride_xm
    if HAS_WEIGHT_GRAD:
        dw_ptrs = dw_ptr + offs_n[:, None] * stride_dn + offs_k[None, :] * stride_dk
        tl.store(dw_ptrs, rounded_to(acc, dw_ptr.dtype.element_ty), mask=(offs_n[:, None] < N) & (offs_k[None, :] < K))
    if HAS_BIAS_GRAD:
        if tile_k == 0:
            tl.store(db_ptr + offs_n, rounded_to(bias_acc, db_ptr.dtype.element_ty), mask=offs_n < N)


# Hopper (H100/H200) tiles: 128x128..128x256 with 3-4 stages for 16-bit operands, smaller tiles for
# skinny shapes and fp32. (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps); block names follow each
# kernel's output tile, BLOCK_K is its reduction step.
_HOPPER_TILES = [
    (128, 256, 64, 3, 8),
    (256, 128, 64, 3, 8),
    (128, 128, 64, 4, 8),
    (128, 128, 32, 4, 4),
    (64, 256, 32, 4, 4),
    (128, 64, 32, 4, 4),
    (64, 128, 32, 4, 4),
    (64, 64, 32, 5, 2),
]
_GROUP_M = 8


def _config(m, n, k, stages, warps, group=_GROUP_M) -> triton.Config:
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": group}, num_stages=stages, num_warps=warps)


_INTERPRETER_CONFIG = _config(16, 16, 16, 1, 1, group=4)
_DEFAULT_CONFIG = _config(128, 128, 32, 4, 4)  # fits fp32 and 16-bit; launched untuned under ``wrap``


def _candidates(bucket: tuple) -> list[triton.Config]:
    return [_INTERPRETER_CONFIG] if interpreting() else hopper_candidates(bucket)


def hopper_candidates(bucket: tuple) -> list[triton.Config]:
    """The configs worth timing for a bucket on a GPU: those whose pipelined operand tiles fit a
    Hopper SM's shared memory, without tiles larger than the (power-of-two) problem in any
    dimension unless no smaller tile exists."""
    b = dict(bucket)
    elem = b["bytes"]
    fitting = [t for t in _HOPPER_TILES if t[3] * (t[0] * t[2] + t[2] * t[1]) * elem <= HOPPER_SHARED_MEMORY_BYTES]

    def small_enough(tiles, index, extent):
        limit = max(next_power_of_2(extent), min(t[index] for t in tiles))
        return [t for t in tiles if t[index] <= limit]

    for index, extent in ((0, b["rows"]), (1, b["cols"]), (2, b["reduction"])):
        fitting = small_enough(fitting, index, extent)
    return [_config(*t) for t in fitting]


def _grid(rows, cols, config: triton.Config) -> tuple:
    """One program per (BLOCK_M x BLOCK_N) output tile, in a flat grid (_grouped_tile orders them)."""
    return (cdiv(rows, config.kwargs["BLOCK_M"]) * cdiv(cols, config.kwargs["BLOCK_N"]),)


def _device_name(device: torch.device) -> str | None:
    """Keys tuned configs by card; None off CUDA (interpreter, compile-only runs: nothing saved)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def _stride_class(stride: int) -> int:
    """What Triton's launch specialisation sees of a stride: 1, a multiple of 16 (16), or neither (0)."""
    return 1 if stride == 1 else 16 if stride % 16 == 0 else 0


class _Launcher:
    """Launches one kernel with the config of its shape bucket (kernels/_tuning.py).

    Per call: one dict lookup on the exact (variant, extents, strides), then ``kernel[grid](...)``.
    The first call with a new key works out the constexprs, the bucket, its config (tuned once
    on a GPU) and the grid, and remembers them. ``variant`` is (dtype, dot precision, *flags),
    the flags being the values of the constexprs named in ``flag_names``; ``m_axis`` says which
    extent is the batch dimension M, the one bucketed to a power of two."""

    _MAX_PLANS = 4096

    def __init__(self, kernel, title: str, m_axis: int, flag_names: tuple[str, ...] = ()):
        self.tuned = TunedKernel(kernel, title, _candidates, _INTERPRETER_CONFIG if interpreting() else _DEFAULT_CONFIG)
        self.kernel = kernel
        self.m_axis = m_axis  # 0: rows, 2: reduction
        self.flag_names = flag_names
        self.plans: dict[tuple, tuple] = {}

    def __call__(self, wrap, variant: tuple, extents: tuple, strides: tuple, args: tuple):
        if wrap is not None:
            return self._launch_wrapped(wrap, variant, extents, strides, args)
        plan = self.plans.get((variant, extents, strides))
        if plan is None:
            plan = self._plan(variant, extents, strides, args)
        grid, meta_parameters, options = plan
        # What kernel[grid](...) calls. The constexprs go positionally, after the runtime
        # arguments: a keyword dict of a dozen entries per launch cost ~1 us on the host.
        self.kernel.run(*args, *meta_parameters, grid=grid, warmup=False, **options)

    def bucket(self, variant: tuple, extents: tuple, strides: tuple) -> tuple:
        dtype, precision, *flags = variant
        rows, cols, reduction = (next_power_of_2(e) if axis == self.m_axis else e for axis, e in enumerate(extents))
        return (
            ("dtype", str(dtype).replace("torch.", "")),
            ("precision", precision),
            ("flags", "".join("1" if f else "0" for f in flags)),
            ("rows", rows), ("cols", cols), ("reduction", reduction),
            ("div16", "".join("1" if e % 16 == 0 else "0" for e in extents)),
            ("strides", ",".join(str(_stride_class(s)) for s in strides)),
            ("bytes", _ELEMENT_BYTES[dtype]),
        )

    def constexprs(self, variant: tuple) -> dict:
        dtype, precision, *flags = variant
        return _constexprs(dtype, precision, **dict(zip(self.flag_names, flags)))

    def _plan(self, variant, extents, strides, args) -> tuple:
        rows, cols, _ = extents
        device = args[0].device
        constexprs = self.constexprs(variant)

        def run(config):
            grid = _grid(rows, cols, config)
            return lambda: self.kernel[grid](*args, **constexprs, **launch_kwargs(config))

        bucket, device_name = self.bucket(variant, extents, strides), _device_name(device)
        # Timing synchronises the device, which a CUDA graph capture forbids: a bucket first met
        # while capturing launches its known or default config, and is tuned on a later eager call.
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if capturing:
            config = self.tuned.known(bucket, device_name) or self.tuned.default
        else:
            config = self.tuned.choose(bucket, device_name, run)
        grid = _grid(rows, cols, config)
        named = {**constexprs, **config.kwargs}
        meta_parameters = tuple(named[name] for name in self.kernel.arg_names[len(args):])
        plan = (grid, meta_parameters, {"num_warps": config.num_warps, "num_stages": config.num_stages})
        if not capturing:
            if len(self.plans) >= self._MAX_PLANS:
                self.plans.clear()
            self.plans[(variant, extents, strides)] = plan
        return plan

    def _launch_wrapped(self, wrap, variant, extents, strides, args):
        """Traced launch (torch.compile through torch.library.triton_op): no tuning, no host reads;
        the bucket's config when this process already chose one, else the fixed default. Sizes
        that are symbolic get the default too, so no guard is put on them here."""
        config = None
        if all(type(v) is int for v in (*extents, *strides)):
            config = self.tuned.known(self.bucket(variant, extents, strides), _device_name(args[0].device))
        config = config or self.tuned.default
        rows, cols, _ = extents
        grid = _grid(rows, cols, config)
        wrap(self.kernel)[grid](*args, **self.constexprs(variant), **launch_kwargs(config))

    def report(self) -> list[dict]:
        return self.tuned.report()


_ELEMENT_BYTES = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4, torch.float64: 8}
_forward = _Launcher(_linear_relu_fwd_kernel, "Linear+ReLU forward", m_axis=0, flag_names=("HAS_BIAS", "RELU"))
_backward_input = _Launcher(_linear_relu_bwd_input_kernel, "Linear+ReLU grad_x", m_axis=0)
_backward_weight = _Launcher(
    _linear_relu_bwd_weight_kernel, "Linear+ReLU grad_W/grad_b", m_axis=2,
    flag_names=("HAS_WEIGHT_GRAD", "HAS_BIAS_GRAD", "RELU"),
)


def tuned_configs() -> list[dict]:
    """The config each Linear+ReLU kernel launched with, per shape bucket, in this process: one row
    per (kernel, bucket) with the bucket, BLOCK sizes, warps, stages, and whether the config was
    timed here, read from the disk cache or the only candidate (benchmarks record this)."""
    portable = [row for launcher in (_forward, _backward_input, _backward_weight) for row in launcher.report()]
    return portable + linear_relu_hopper.tuned_configs()  # the TMA kernels' rows: titles end in " (TMA)"


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


# Per dtype: whether dot operands are widened, the accumulator type.
# Fixed for the process, like the choice between interpreter and compiler that @triton.jit made
# when this module was imported; looked up once here instead of on every call.
_DTYPE_FACTS = {
    dtype: (dot_needs_upcast(dtype), _acc_dtype(dtype))
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
}


_CONSTEXPRS: dict[tuple, dict] = {}


def _constexprs(dtype: torch.dtype, precision: str, **flags) -> dict:
    """The constexprs a kernel takes for ``dtype`` at ``precision`` plus ``flags``, built once per
    combination."""
    key = (dtype, precision, *flags.items())
    constexprs = _CONSTEXPRS.get(key)
    if constexprs is None:
        upcast, acc_dtype = _DTYPE_FACTS[dtype]
        constexprs = _CONSTEXPRS[key] = {
            "INPUT_PRECISION": precision, "ROUND_TF32": precision == "tf32", "UPCAST": upcast, "ACC_DTYPE": acc_dtype,
            **flags,
        }
    return constexprs


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


def linear_relu_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, wrap=None) -> torch.Tensor:
    """relu(x @ weight.T + bias) for 2-D x (M, K) of any strides; returns a new (M, N) tensor.

    ``wrap``: None, or a callable applied to the kernel before launching it
    (torch.library.wrap_triton), for tracing with fake tensors: then nothing is tuned."""
    if linear_relu_hopper.forward_eligible(x, weight, bias, wrap):
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
    if linear_relu_hopper.backward_eligible(grad_out, out, x, weight, need_input_grad, need_weight_grad, need_bias_grad, wrap):
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
                strides = (*grad_out.stride(), *out.stride(), *weight.stride(), *grad_x.stride())
                _backward_input(
                    wrap, (dtype, precision), (M, K, N), strides,
                    (grad_out, out, weight, grad_x, M, N, K, *strides),
                )
    if need_weight_grad or need_bias_grad:
        grad_w, grad_b = weight_and_bias_grads(
            _backward_weight, wrap, grad_out, out, x, need_weight_grad, need_bias_grad, True, precision
        )
    return grad_x, grad_w, grad_b
