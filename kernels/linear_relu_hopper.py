"""Linear + bias + ReLU GEMMs written for Hopper (sm_90): TMA tensor descriptors, a persistent grid.

Same three products as kernels/linear_relu.py (read its docstring for the maths):
  forward  out    = relu(x @ W.T + b)             output tiles of (M, N), reduction over K
  grad_x   dx     = g @ W                         output tiles of (M, K), reduction over N
  grad_W   dW, db = g.T @ x, g.sum(0)             output tiles of (N, K), reduction over M
with g = where(out > 0, grad_out, 0) formed from the grad_out and out tiles as they arrive in
the K loop, never written to memory.

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
TMA needs 16-byte aligned base pointers and leading strides and a unit inner stride; ``eligible``
checks that, and everything else (odd strides, fp32 without TF32, fp64, the interpreter inside
the package's launchers, traced launches) stays on the portable kernels.
TMA coordinates are 32-bit by hardware (the descriptors carry 64-bit strides, so there is no
element offset to overflow); the one pointer computed by hand, the bias, is offset in int64.
"""
import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ._common import (
    HOPPER_SHARED_MEMORY_BYTES, cdiv, dot_precision, interpreting, new_output,
    on_device_of, rounded_to, shared_memory_limit,
)
from ._tuning import launch_kwargs
from .gemm_launch import PlannedLauncher, configs_for_problem, positional_launch, tile_config
from .gemm_tiles import dot_operand, grouped_tile, relu, relu_masked, round_to_tf32


_BIAS_DOT_COLUMNS = tl.constexpr(16)  # the narrowest wgmma N for 16-bit operands


@triton.jit
def _fwd_kernel(
    x_desc, w_desc, b_ptr, out_desc, M, N, K,
    HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr, UPCAST: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
):
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_steps = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), tiles, NUM_PROGRAMS, flatten=True):
        tile_m, tile_n = grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        row, col = tile_m * BLOCK_M, tile_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
        for step in range(k_steps):
            x_tile = x_desc.load([row, step * BLOCK_K])
            w_tile = w_desc.load([col, step * BLOCK_K])
            x_tile = dot_operand(x_tile, UPCAST, ROUND_TF32)
            w_tile = dot_operand(w_tile, UPCAST, ROUND_TF32)
            acc = tl.dot(x_tile, w_tile.T, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        if HAS_BIAS:
            cols = col.to(tl.int64) + tl.arange(0, BLOCK_N)
            acc += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(ACC_DTYPE)[None, :]
        acc = relu(acc)
        out_desc.store([row, col], rounded_to(acc, out_desc.dtype))


@triton.jit
def _bwd_input_kernel(
    grad_desc, out_desc, w_desc, dx_desc, M, N, K,
    INPUT_PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
):
    """grad_x tiles: BLOCK_M over M, BLOCK_N over K (the output's columns), BLOCK_K steps over N."""
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(K, BLOCK_N)
    n_steps = tl.cdiv(N, BLOCK_K)
    for tile in tl.range(tl.program_id(0), tiles, NUM_PROGRAMS, flatten=True):
        tile_m, tile_k = grouped_tile(tile, M, K, BLOCK_M, BLOCK_N, GROUP_M)
        row, col = tile_m * BLOCK_M, tile_k * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
        for step in range(n_steps):
            grad = grad_desc.load([row, step * BLOCK_K])
            g_tile = relu_masked(grad, out_desc.load([row, step * BLOCK_K]))
            w_tile = w_desc.load([step * BLOCK_K, col])
            g_tile = dot_operand(g_tile, UPCAST, ROUND_TF32)
            w_tile = dot_operand(w_tile, UPCAST, ROUND_TF32)
            acc = tl.dot(g_tile, w_tile, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        dx_desc.store([row, col], rounded_to(acc, dx_desc.dtype))


@triton.jit
def _bwd_weight_kernel(
    grad_desc, out_desc, x_desc, dw_desc, db_ptr, M, N, K,
    HAS_BIAS_GRAD: tl.constexpr, BIAS_BY_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
):
    """grad_W tiles: BLOCK_M over N, BLOCK_N over K, BLOCK_K steps over M. grad_b of an N tile
    is summed by the program holding that N tile's first K tile, in step order."""
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
            grad = grad_desc.load([step * BLOCK_K, row])
            gt_tile = relu_masked(grad, out_desc.load([step * BLOCK_K, row])).T
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


# (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps), block names following each kernel's output tile.
# 8 warps are two warpgroups splitting BLOCK_M; BLOCK_K = 64 is one 128-byte swizzle row of
# 16-bit operands. Pruned per kernel and dtype by _shared_bytes.
_TILES = [
    (128, 256, 64, 3, 8),
    (256, 128, 64, 3, 8),
    (128, 256, 32, 4, 8),
    (128, 128, 64, 4, 8),
    (128, 128, 64, 3, 8),
    (128, 128, 32, 3, 8),
    (128, 128, 64, 3, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
]
_SMALL_BUFFERS_BYTES = 4096  # mbarriers and the bias sum's tile of ones, rounded up
_INTERPRETER_CONFIG = tile_config(16, 16, 16, 1, 1, group=2)
_DEFAULT_CONFIG = tile_config(128, 128, 32, 3, 8)  # fits every kernel in every eligible dtype; launched untuned


def _shared_bytes(tile: tuple, streamed_tiles: int, element_bytes: int) -> int:
    """Shared memory a config needs, at most: ``stages`` buffers of the streamed operand tiles
    (``streamed_tiles`` of BLOCK_M x BLOCK_K: x; or grad_out and out) and of the BLOCK_K x
    BLOCK_N operand, plus the output tile (operands and output share one dtype) staged for the
    TMA store."""
    m, n, k, stages, _ = tile
    return (stages * (streamed_tiles * m * k + k * n) + m * n) * element_bytes + _SMALL_BUFFERS_BYTES


def candidates(bucket: tuple, streamed_tiles: int) -> list[triton.Config]:
    """The configs worth timing for a bucket: those that fit a Hopper SM's shared memory, pruned by
    gemm_launch.configs_for_problem."""
    if interpreting():
        return [_INTERPRETER_CONFIG]
    elem = dict(bucket)["bytes"]
    limit = dict(bucket).get("smem", HOPPER_SHARED_MEMORY_BYTES)
    fitting = [t for t in _TILES if _shared_bytes(t, streamed_tiles, elem) <= limit]
    return configs_for_problem(fitting, bucket)


_SM_COUNTS: dict = {}
_CPU_SM_COUNT = 132  # compile-only runs on CPU tensors (scripts/compile_check.py): an H100/H200's SMs
_INTERPRETER_SM_COUNT = 3  # small, so that the interpreter runs several tiles per program


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return _INTERPRETER_SM_COUNT if interpreting() else _CPU_SM_COUNT
    count = _SM_COUNTS.get(device.index)
    if count is None:
        count = _SM_COUNTS[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return count


class _PersistentLauncher(PlannedLauncher):
    """Launches one persistent TMA kernel with its shape bucket's config.

    Unlike the portable launchers the arguments depend on the config (each descriptor carries
    its block shape), so a launch passes ``make_args(config)``. The grid is min(#SMs, #tiles);
    NUM_PROGRAMS, the tile loop's stride, is the SM count itself, so that one compiled kernel
    serves every problem size."""

    def __init__(self, kernel, title: str, m_axis: int, streamed_tiles: int, flag_names: tuple[str, ...] = ()):
        default = _INTERPRETER_CONFIG if interpreting() else _DEFAULT_CONFIG
        super().__init__(kernel, title, m_axis, flag_names, lambda bucket: candidates(bucket, streamed_tiles), default)

    def __call__(self, device, variant: tuple, extents: tuple, make_args):
        key = (device, variant, extents)
        plan = self.plans.get(key)
        if plan is None:
            plan = self._plan(key, make_args)
        config, grid, meta_parameters, options = plan
        self.kernel.run(*make_args(config), *meta_parameters, grid=grid, warmup=False, **options)

    def bucket(self, variant: tuple, extents: tuple, shared_limit: int | None = None) -> tuple:
        return self._bucket(variant, extents, shared_limit=shared_limit)

    def _grid(self, device, extents, config) -> tuple:
        rows, cols, _ = extents
        tiles = cdiv(rows, config.kwargs["BLOCK_M"]) * cdiv(cols, config.kwargs["BLOCK_N"])
        return (min(tiles, _sm_count(device)),)

    def _plan(self, key: tuple, make_args) -> tuple:
        device, variant, extents = key
        constexprs = {**self.constexprs(variant), "NUM_PROGRAMS": _sm_count(device)}

        def run(config):
            grid = self._grid(device, extents, config)
            return lambda: self.kernel[grid](*make_args(config), **constexprs, **launch_kwargs(config))

        def plan_with(config):
            meta_parameters, options = positional_launch(self.kernel, len(make_args(config)), constexprs, config)
            return (config, self._grid(device, extents, config), meta_parameters, options)

        return self._planned(key, device, self.bucket(variant, extents, shared_memory_limit(device)), run, plan_with)


_forward = _PersistentLauncher(
    _fwd_kernel, "Linear+ReLU forward (TMA)", m_axis=0, streamed_tiles=1, flag_names=("HAS_BIAS",)
)
_backward_input = _PersistentLauncher(_bwd_input_kernel, "Linear+ReLU grad_x (TMA)", m_axis=0, streamed_tiles=2)
_backward_weight = _PersistentLauncher(
    _bwd_weight_kernel, "Linear+ReLU grad_W/grad_b (TMA)", m_axis=2, streamed_tiles=2,
    flag_names=("HAS_BIAS_GRAD", "BIAS_BY_DOT"),
)


def tuned_configs() -> list[dict]:
    """As kernels.linear_relu.tuned_configs, for the TMA kernels."""
    return [row for launcher in (_forward, _backward_input, _backward_weight) for row in launcher.report()]


def _descriptor(t: torch.Tensor, block_shape: list) -> TensorDescriptor:
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block_shape)


# ---- eligibility ----------------------------------------------------------------------------

_TMA_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_INTERPRETING = interpreting()  # fixed at import, like @triton.jit's own choice; read on every call
# The TMA path builds three to five TensorDescriptor objects per launch (about 2-5 us of host time
# each, measured on the CPU machine), where the portable kernels build none. Below about 2**31
# multiply-adds a kernel runs for less than a call's host time on an H100/H200, so the call is
# host-bound and the portable path is the faster one; above it the device time decides. A
# prediction from the H200 run's host and kernel times, to be re-measured on a GPU.
MIN_MACS = 1 << 31
_HOPPER_DEVICES: dict = {}


def _is_hopper_or_newer(device: torch.device) -> bool:
    supported = _HOPPER_DEVICES.get(device.index)
    if supported is None:
        supported = _HOPPER_DEVICES[device.index] = torch.cuda.get_device_capability(device)[0] >= 9
    return supported


def tma_compatible(t: torch.Tensor) -> bool:
    """What a TMA descriptor needs of a 2-D operand: a unit inner stride, a leading stride of a
    multiple of 16 bytes and a 16-byte aligned base pointer."""
    return t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0


def dtype_eligible(dtype: torch.dtype) -> bool:
    """16-bit operands, or fp32 with TF32 allowed (fp32 IEEE dots do not use tensor cores)."""
    return dtype in _TMA_DTYPES and (dtype != torch.float32 or dot_precision(dtype) == "tf32")


def _rows_fit_tma(extent: int, dtype: torch.dtype) -> bool:
    """A fresh contiguous output with rows of ``extent`` elements can be a TMA store target."""
    return (extent * dtype.itemsize) % 16 == 0


def forward_eligible(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, wrap=None) -> bool:
    """Whether linear_relu_forward should run the TMA kernel: an sm_90+ GPU (not the interpreter,
    not a traced launch), an eligible dtype, at least MIN_MACS multiply-adds (none of the extents
    empty), TMA-compatible x and weight, and an output whose rows are whole 16-byte multiples."""
    if wrap is not None or not x.is_cuda or _INTERPRETING or not _is_hopper_or_newer(x.device):
        return False
    (M, K), N = x.shape, weight.shape[0]
    return (
        M * N * K >= max(MIN_MACS, 1) and dtype_eligible(x.dtype) and _rows_fit_tma(N, x.dtype)
        and tma_compatible(x) and tma_compatible(weight)
    )


def backward_eligible(grad_out, out, x, weight, need_input_grad, need_weight_grad, need_bias_grad, wrap=None) -> bool:
    """As forward_eligible, for the gradients asked for; the bias gradient alone (no grad_W tiles
    to ride on) stays on the portable kernel."""
    if wrap is not None or not out.is_cuda or _INTERPRETING or not _is_hopper_or_newer(out.device):
        return False
    if not (need_input_grad or need_weight_grad) or (need_bias_grad and not need_weight_grad):
        return False
    M, N = out.shape
    operand = x if need_weight_grad else weight
    K = operand.shape[1]
    return (
        M * N * K >= max(MIN_MACS, 1) and dtype_eligible(out.dtype) and _rows_fit_tma(K, out.dtype)
        and tma_compatible(grad_out) and tma_compatible(out)
        and (not need_weight_grad or tma_compatible(x)) and (not need_input_grad or tma_compatible(weight))
    )


# ---- launchers ------------------------------------------------------------------------------

@on_device_of(lambda args: args[0])
def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """relu(x @ weight.T + bias) through the TMA kernel; the caller checked forward_eligible
    (tests call it directly under the interpreter)."""
    M, K = x.shape
    N = weight.shape[0]
    dtype = x.dtype
    out = new_output((M, N), x)
    has_bias = bias is not None
    bias = bias.contiguous() if has_bias else out
    precision = dot_precision(dtype)

    def make_args(config):
        bm, bn, bk = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"]
        return (_descriptor(x, [bm, bk]), _descriptor(weight, [bn, bk]), bias, _descriptor(out, [bm, bn]), M, N, K)

    _forward(x.device, (dtype, precision, has_bias), (M, N, K), make_args)
    return out


@on_device_of(lambda args: args[1])
def backward(grad_out, out, x, weight, need_input_grad: bool, need_weight_grad: bool, need_bias_grad: bool):
    """(grad_x, grad_W, grad_b) through the TMA kernels, None where not asked for; the caller
    checked backward_eligible."""
    M, N = out.shape
    K = (x if need_weight_grad else weight).shape[1]
    dtype = out.dtype
    device = out.device
    precision = dot_precision(dtype)
    grad_x = grad_w = grad_b = None
    if need_input_grad:
        grad_x = new_output((M, K), out)

        def input_args(config):
            bm, bn, bk = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"]
            return (_descriptor(grad_out, [bm, bk]), _descriptor(out, [bm, bk]), _descriptor(weight, [bk, bn]),
                    _descriptor(grad_x, [bm, bn]), M, N, K)

        _backward_input(device, (dtype, precision), (M, K, N), input_args)
    if need_weight_grad:
        grad_w = new_output((N, K), out)
        grad_b = new_output((N,), out) if need_bias_grad else None

        def weight_args(config):
            bm, bn, bk = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"]
            return (_descriptor(grad_out, [bk, bm]), _descriptor(out, [bk, bm]), _descriptor(x, [bk, bn]),
                    _descriptor(grad_w, [bm, bn]), grad_w if grad_b is None else grad_b, M, N, K)

        # 16-bit bias sums as a dot with a tile of ones, fp32 by tl.sum (the kernel says why)
        _backward_weight(device, (dtype, precision, need_bias_grad, dtype != torch.float32), (N, K, M), weight_args)
    return grad_x, grad_w, grad_b
