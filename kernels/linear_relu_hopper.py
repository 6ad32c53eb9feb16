"""Linear + bias + ReLU GEMMs written for Hopper (sm_90): TMA tensor descriptors, a persistent grid.

Same three products as kernels/linear_relu.py (read its docstring for the maths):
  forward  out    = relu(x @ W.T + b)             output tiles of (M, N), reduction over K
  grad_x   dx     = g @ W                         output tiles of (M, K), reduction over N
  grad_W   dW, db = g.T @ x, g.sum(0)             output tiles of (N, K), reduction over M
with g = where(out > 0, grad_out, 0) formed from the grad_out and out tiles as they arrive in
the K loop, never written to memory. The same kernels serve the MLP (kernels/mlp.py) through
their flags: the output layer's forward without ReLU, the grad-input GEMM with g as given and its
result masked by the layer below's output in the epilogue, grad_W with g as given.

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
TMA needs 16-byte aligned base pointers and leading strides and a unit inner stride. Which
kernels run is decided in one place, ``takes_tma``, for every launcher of Linear+ReLU and the MLP
and for torch.compile; everything it refuses (another card than sm_90, odd strides, fp32 without
TF32, fp64, small products) stays on the portable kernels. Descriptors are cached per address,
shape, strides, block shape, dtype and device (``cached_descriptor``).
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
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr, INPUT_PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr, UPCAST: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
):
    """RELU=False makes it a plain Linear (the output layer of an MLP, kernels/mlp.py)."""
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
        if RELU:
            acc = relu(acc)
        out_desc.store([row, col], rounded_to(acc, out_desc.dtype))


@triton.jit
def _bwd_input_kernel(
    grad_desc, out_desc, w_desc, below_desc, dx_desc, M, N, K,
    MASK_GRAD: tl.constexpr, MASK_BELOW: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
):
    """grad_x tiles: BLOCK_M over M, BLOCK_N over K (the output's columns), BLOCK_K steps over N.
    MASK_GRAD: grad is masked by this layer's output ``out`` as it arrives (Linear+ReLU);
    MASK_BELOW: the result is masked by ``below > 0``, the output of the ReLU layer underneath,
    before its only store (the MLP's grad-input GEMM, kernels/mlp.py, whose grad is already
    masked). A descriptor a flag leaves unread is any descriptor of the right block shape."""
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(K, BLOCK_N)
    n_steps = tl.cdiv(N, BLOCK_K)
    for tile in tl.range(tl.program_id(0), tiles, NUM_PROGRAMS, flatten=True):
        tile_m, tile_k = grouped_tile(tile, M, K, BLOCK_M, BLOCK_N, GROUP_M)
        row, col = tile_m * BLOCK_M, tile_k * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
        for step in range(n_steps):
            g_tile = grad_desc.load([row, step * BLOCK_K])
            if MASK_GRAD:
                g_tile = relu_masked(g_tile, out_desc.load([row, step * BLOCK_K]))
            w_tile = w_desc.load([step * BLOCK_K, col])
            g_tile = dot_operand(g_tile, UPCAST, ROUND_TF32)
            w_tile = dot_operand(w_tile, UPCAST, ROUND_TF32)
            acc = tl.dot(g_tile, w_tile, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        if MASK_BELOW:
            acc = relu_masked(acc, below_desc.load([row, col]))
        dx_desc.store([row, col], rounded_to(acc, dx_desc.dtype))


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
# Launched untuned: the first of these whose shared memory fits the kernel and dtype (the MLP's
# masked grad-input kernel stages a second output-sized tile, too much for the first in fp32).
# Three stages: with two, the compiled persistent loop kept one operand buffer (no prefetch;
# scripts/compile_check.py, bench/NOTES.md).
_DEFAULT_TILES = [(128, 128, 32, 3, 8), (64, 128, 32, 3, 4)]


def _shared_bytes(tile: tuple, streamed_tiles: int, element_bytes: int, output_tiles: int = 1) -> int:
    """Shared memory a config needs, at most: ``stages`` buffers of the streamed operand tiles
    (``streamed_tiles`` of BLOCK_M x BLOCK_K: x; or grad_out and out) and of the BLOCK_K x
    BLOCK_N operand, plus ``output_tiles`` BLOCK_M x BLOCK_N tiles: the output staged for the TMA
    store, and the MLP's ``below`` tile read in the epilogue (operands and output share one dtype)."""
    m, n, k, stages, _ = tile
    return (stages * (streamed_tiles * m * k + k * n) + output_tiles * m * n) * element_bytes + _SMALL_BUFFERS_BYTES


def candidates(bucket: tuple, streamed_tiles: int, output_tiles: int = 1) -> list[triton.Config]:
    """The configs worth timing for a bucket: those that fit a Hopper SM's shared memory, pruned by
    gemm_launch.configs_for_problem."""
    if interpreting():
        return [_INTERPRETER_CONFIG]
    elem = dict(bucket)["bytes"]
    limit = dict(bucket).get("smem", HOPPER_SHARED_MEMORY_BYTES)
    fitting = [t for t in _TILES if _shared_bytes(t, streamed_tiles, elem, output_tiles) <= limit]
    return configs_for_problem(fitting, bucket)


def default_config(bucket: tuple, streamed_tiles: int, output_tiles: int = 1) -> triton.Config:
    if interpreting():
        return _INTERPRETER_CONFIG
    elem = dict(bucket)["bytes"]
    limit = dict(bucket).get("smem", HOPPER_SHARED_MEMORY_BYTES)
    fitting = [t for t in _DEFAULT_TILES if _shared_bytes(t, streamed_tiles, elem, output_tiles) <= limit]
    return tile_config(*(fitting or _DEFAULT_TILES[-1:])[0])


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

    def __init__(self, kernel, title: str, m_axis: int, streamed_tiles: int, flag_names: tuple[str, ...] = (),
                 output_tiles: int = 1):
        super().__init__(
            kernel, title, m_axis, flag_names,
            lambda bucket: candidates(bucket, streamed_tiles, output_tiles),
            lambda bucket: default_config(bucket, streamed_tiles, output_tiles),
        )

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


# Linear+ReLU's kernels, and the MLP's (kernels/mlp.py) with their own launchers (own plan caches,
# tuning titles and shared-memory estimates): the MLP's grad-input GEMM streams grad alone
# (already masked) and reads a ``below`` tile in its epilogue; its grad_W streams grad alone.
_forward = _PersistentLauncher(
    _fwd_kernel, "Linear+ReLU forward (TMA)", m_axis=0, streamed_tiles=1, flag_names=("HAS_BIAS", "RELU")
)
_backward_input = _PersistentLauncher(
    _bwd_input_kernel, "Linear+ReLU grad_x (TMA)", m_axis=0, streamed_tiles=2, flag_names=("MASK_GRAD", "MASK_BELOW")
)
_backward_weight = _PersistentLauncher(
    _bwd_weight_kernel, "Linear+ReLU grad_W/grad_b (TMA)", m_axis=2, streamed_tiles=2,
    flag_names=("HAS_BIAS_GRAD", "BIAS_BY_DOT", "RELU"),
)
_mlp_output_forward = _PersistentLauncher(
    _fwd_kernel, "MLP output layer forward (TMA)", m_axis=0, streamed_tiles=1, flag_names=("HAS_BIAS", "RELU")
)
_mlp_grad_input = _PersistentLauncher(
    _bwd_input_kernel, "MLP grad_input (+ mask of the layer below) (TMA)", m_axis=0, streamed_tiles=1,
    flag_names=("MASK_GRAD", "MASK_BELOW"), output_tiles=2,
)
_mlp_grad_weight = _PersistentLauncher(
    _bwd_weight_kernel, "MLP grad_W/grad_b (TMA)", m_axis=2, streamed_tiles=1,
    flag_names=("HAS_BIAS_GRAD", "BIAS_BY_DOT", "RELU"),
)
_LAUNCHERS = (_forward, _backward_input, _backward_weight, _mlp_output_forward, _mlp_grad_input, _mlp_grad_weight)


def tuned_configs() -> list[dict]:
    """As kernels.linear_relu.tuned_configs, for the TMA kernels."""
    return [row for launcher in _LAUNCHERS for row in launcher.report()]


# ---- descriptors ----------------------------------------------------------------------------

class _DescriptorBase:
    """What a launch reads of a descriptor's tensor: its address and dtype (Triton's launcher
    calls ``base.data_ptr()``, its specialisation reads ``base.dtype``). A cached descriptor holds
    this instead of the tensor, so the cache keeps no tensor's memory alive."""

    __slots__ = ("dtype", "_address")

    def __init__(self, dtype: torch.dtype, address: int):
        self.dtype = dtype
        self._address = address

    def data_ptr(self) -> int:
        return self._address


_DESCRIPTORS: dict = {}
_MAX_DESCRIPTORS = 1024


def descriptor_key(t: torch.Tensor, block_shape: tuple) -> tuple:
    """Everything a TMA descriptor encodes: address, shape, strides, block shape, dtype, and the
    device the address belongs to. Two tensors with the same key get bitwise the same descriptor,
    so a descriptor found under a tensor's key is that tensor's, even if the memory it was built
    for has been freed and reused since."""
    return (t.data_ptr(), tuple(t.shape), t.stride(), block_shape, t.dtype, t.get_device())


def cached_descriptor(t: torch.Tensor, block_shape: tuple) -> TensorDescriptor:
    """The TMA descriptor of ``t`` tiled by ``block_shape``, built once per descriptor_key.
    Building one (TensorDescriptor's checks of alignment, strides and block shape) cost 2-5 us of
    host time per operand per launch; a lookup costs the key's ~1 us."""
    key = descriptor_key(t, block_shape)
    descriptor = _DESCRIPTORS.get(key)
    if descriptor is None:
        if len(_DESCRIPTORS) >= _MAX_DESCRIPTORS:
            _DESCRIPTORS.clear()
        descriptor = _DESCRIPTORS[key] = TensorDescriptor(
            _DescriptorBase(t.dtype, key[0]), list(key[1]), list(key[2]), list(block_shape)
        )
    return descriptor


def _fresh_descriptor(t: torch.Tensor, block_shape: tuple) -> TensorDescriptor:
    return TensorDescriptor(t, list(t.shape), list(t.stride()), list(block_shape))


# The interpreter copies each descriptor's tensor to the host and back: it needs the tensor itself.
_descriptor = _fresh_descriptor if interpreting() else cached_descriptor


# ---- the kernel choice ------------------------------------------------------------------------

_TMA_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# The TMA path hands Triton three to five descriptors per launch, which its launcher encodes into
# CUtensorMaps on every launch (host time no cache of ours removes), where the portable kernels
# pass plain pointers. Below about 2**31 multiply-adds a kernel runs for less than a call's host
# time on an H100/H200, so the call is host-bound and the portable path is the faster one; above
# it the device time decides. A prediction from the H200 run's host and kernel times, to be
# re-measured on a GPU.
MIN_MACS = 1 << 31
_CAPABILITIES: dict = {}


def device_capability(t: torch.Tensor) -> tuple[int, int] | None:
    """The compute capability of ``t``'s CUDA device, None off CUDA (the interpreter's CPU tensors
    included); asked once per device. Tests replace it to see the choice an sm_90 would make."""
    if not t.is_cuda:
        return None
    index = t.get_device()
    capability = _CAPABILITIES.get(index)
    if capability is None:
        capability = _CAPABILITIES[index] = torch.cuda.get_device_capability(index)
    return capability


def _is_int(value) -> bool:
    return type(value) is int


def tma_compatible(t: torch.Tensor, traced: bool = False) -> bool:
    """What a TMA descriptor needs of a 2-D operand: a unit inner stride, a leading stride of a
    multiple of 16 bytes and a 16-byte aligned base pointer. ``traced`` (torch.compile's fake
    tensors): the address is not known yet, so only the strides are judged, and a symbolic stride
    (which a comparison would put a guard on) counts as incompatible."""
    leading, inner = t.stride()
    if traced and not (_is_int(inner) and _is_int(leading)):
        return False
    return inner == 1 and (leading * t.element_size()) % 16 == 0 and (traced or t.data_ptr() % 16 == 0)


def dtype_eligible(dtype: torch.dtype) -> bool:
    """16-bit operands, or fp32 with TF32 allowed (fp32 IEEE dots do not use tensor cores)."""
    return dtype in _TMA_DTYPES and (dtype != torch.float32 or dot_precision(dtype) == "tf32")


def takes_tma(operands: tuple, macs, output_columns, traced: bool = False) -> bool:
    """The kernel choice of every GEMM of Linear+ReLU and of the MLP, in eager mode and under
    torch.compile: True for the TMA kernels here, False for the portable ones (kernels/linear_relu.py,
    kernels/mlp.py). TMA when the operands (each read through a descriptor; the first one's device
    and dtype count) sit on an sm_90 GPU, the dtype is eligible, the product has at least MIN_MACS
    multiply-adds, the fresh output's rows of ``output_columns`` elements are whole 16-byte
    multiples, and every operand is tma_compatible. The eager launchers ask with real tensors; the
    torch.compile path asks at trace time with ``traced`` (fastcore5/ops/linear_relu_tma.py) and,
    on True, calls an opaque op that runs the eager launcher, which asks again with the addresses.
    Symbolic sizes (dynamic shapes) give False: no guard is put on them here."""
    lead = operands[0]
    capability = device_capability(lead)
    if capability is None or capability[0] != 9:  # compiled and checked for sm_90 only
        return False
    dtype = lead.dtype
    if not (dtype_eligible(dtype) and _is_int(macs) and _is_int(output_columns)):
        return False
    return (
        macs >= max(MIN_MACS, 1) and (output_columns * dtype.itemsize) % 16 == 0
        and all(tma_compatible(t, traced) for t in operands)
    )


def forward_eligible(x: torch.Tensor, weight: torch.Tensor, traced: bool = False) -> bool:
    """takes_tma for relu(x @ weight.T + b) (or its plain Linear): operands x and weight, output (M, N)."""
    (M, K), N = x.shape, weight.shape[0]
    return takes_tma((x, weight), M * N * K, N, traced)


def backward_eligible(grad_out, out, x, weight, need_input_grad, need_weight_grad, need_bias_grad, traced=False) -> bool:
    """takes_tma for Linear+ReLU's backward, both products together (grad_out and out, plus x for
    grad_W and weight for grad_x); the bias gradient alone (no grad_W tiles to ride on) stays on
    the portable kernel."""
    if not (need_input_grad or need_weight_grad) or (need_bias_grad and not need_weight_grad):
        return False
    M, N = out.shape
    operand = x if need_weight_grad else weight
    K = operand.shape[1]
    operands = (grad_out, out, *((x,) if need_weight_grad else ()), *((weight,) if need_input_grad else ()))
    return takes_tma(operands, M * N * K, K, traced)


# ---- launchers ------------------------------------------------------------------------------

def _blocks(config) -> tuple[int, int, int]:
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"]


def _launch_forward(launcher, x, weight, bias, relu: bool) -> torch.Tensor:
    M, K = x.shape
    N = weight.shape[0]
    dtype = x.dtype
    out = new_output((M, N), x)
    has_bias = bias is not None
    bias = bias.contiguous() if has_bias else out

    def make_args(config):
        bm, bn, bk = _blocks(config)
        return (_descriptor(x, (bm, bk)), _descriptor(weight, (bn, bk)), bias, _descriptor(out, (bm, bn)), M, N, K)

    launcher(x.device, (dtype, dot_precision(dtype), has_bias, relu), (M, N, K), make_args)
    return out


@on_device_of(lambda args: args[0])
def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """relu(x @ weight.T + bias) through the TMA kernel; the caller checked forward_eligible
    (tests call it directly under the interpreter)."""
    return _launch_forward(_forward, x, weight, bias, True)


@on_device_of(lambda args: args[0])
def linear_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias, no ReLU (an MLP's output layer); the caller checked forward_eligible."""
    return _launch_forward(_mlp_output_forward, x, weight, bias, False)


def _launch_grad_input(launcher, grad, out, weight, below) -> torch.Tensor:
    """grad @ weight with grad masked by ``out`` (None: grad as given) and the result masked by
    ``below`` (None: not masked). grad (M, N), weight (N, K), out (M, N), below (M, K)."""
    M, N = grad.shape
    K = weight.shape[1]
    grad_x = new_output((M, K), grad)

    def make_args(config):
        bm, bn, bk = _blocks(config)
        grad_d = _descriptor(grad, (bm, bk))
        dx_d = _descriptor(grad_x, (bm, bn))
        return (grad_d, grad_d if out is None else _descriptor(out, (bm, bk)), _descriptor(weight, (bk, bn)),
                dx_d if below is None else _descriptor(below, (bm, bn)), dx_d, M, N, K)

    dtype = grad.dtype
    launcher(grad.device, (dtype, dot_precision(dtype), out is not None, below is not None), (M, K, N), make_args)
    return grad_x


def _launch_grad_weight(launcher, grad, out, x, need_bias_grad: bool):
    """(grad.T @ x, grad.sum(0) or None) with grad masked by ``out`` (None: grad as given)."""
    M, N = grad.shape
    K = x.shape[1]
    dtype = grad.dtype
    grad_w = new_output((N, K), grad)
    grad_b = new_output((N,), grad) if need_bias_grad else None

    def make_args(config):
        bm, bn, bk = _blocks(config)
        grad_d = _descriptor(grad, (bk, bm))
        return (grad_d, grad_d if out is None else _descriptor(out, (bk, bm)), _descriptor(x, (bk, bn)),
                _descriptor(grad_w, (bm, bn)), grad_w if grad_b is None else grad_b, M, N, K)

    # 16-bit bias sums as a dot with a tile of ones, fp32 by tl.sum (the kernel says why)
    variant = (dtype, dot_precision(dtype), need_bias_grad, dtype != torch.float32, out is not None)
    launcher(grad.device, variant, (N, K, M), make_args)
    return grad_w, grad_b


@on_device_of(lambda args: args[1])
def backward(grad_out, out, x, weight, need_input_grad: bool, need_weight_grad: bool, need_bias_grad: bool):
    """(grad_x, grad_W, grad_b) through the TMA kernels, None where not asked for; the caller
    checked backward_eligible."""
    grad_x = grad_w = grad_b = None
    if need_input_grad:
        grad_x = _launch_grad_input(_backward_input, grad_out, out, weight, None)
    if need_weight_grad:
        grad_w, grad_b = _launch_grad_weight(_backward_weight, grad_out, out, x, need_bias_grad)
    return grad_x, grad_w, grad_b


def grad_input_eligible(grad: torch.Tensor, weight: torch.Tensor, below: torch.Tensor | None) -> bool:
    """takes_tma for the MLP's grad @ weight (* (below > 0)): grad (M, N), weight (N, K), below (M, K)."""
    (M, N), K = grad.shape, weight.shape[1]
    return takes_tma((grad, weight) if below is None else (grad, weight, below), M * N * K, K)


@on_device_of(lambda args: args[0])
def grad_input(grad: torch.Tensor, weight: torch.Tensor, below: torch.Tensor | None) -> torch.Tensor:
    """kernels/mlp.py's grad_input through the TMA kernel; the caller checked grad_input_eligible."""
    return _launch_grad_input(_mlp_grad_input, grad, None, weight, below)


def grad_weight_eligible(grad: torch.Tensor, inp: torch.Tensor) -> bool:
    """takes_tma for the MLP's grad.T @ inp: grad (M, N), inp (M, K), output (N, K)."""
    (M, N), K = grad.shape, inp.shape[1]
    return takes_tma((grad, inp), M * N * K, K)


@on_device_of(lambda args: args[0])
def grad_weight(grad: torch.Tensor, inp: torch.Tensor, need_bias_grad: bool):
    """kernels/mlp.py's (grad.T @ inp, grad.sum(0) or None) through the TMA kernel; the caller
    checked grad_weight_eligible."""
    return _launch_grad_weight(_mlp_grad_weight, grad, None, inp, need_bias_grad)
