"""Launching the Hopper (sm_90) Linear + bias + ReLU GEMMs, and the one choice between them and the
portable kernels.

The kernels (TMA descriptors, a persistent grid; the maths and why they differ from the portable
ones) are in kernels/linear_relu_hopper_kernels.py, their descriptors in kernels/tma_descriptors.py.
Here: their configs (Hopper's tile table of kernels/gemm_launch.py, pruned by each kernel's shared
memory), one persistent launcher per (kernel, use), and the launch functions for Linear+ReLU and
the MLP (kernels/mlp.py).
TMA needs 16-byte aligned base pointers and leading strides and a unit inner stride. Which
kernels run is decided in one place, ``takes_tma``, for every launcher of Linear+ReLU and the MLP
and for torch.compile; everything it refuses (another card than sm_90, odd strides, fp32 without
TF32, fp64, small products) stays on the portable kernels.
"""
import torch
import triton

from ._common import cdiv, dot_precision, interpreting, new_output, on_device_of, shared_memory_limit
from ._tuning import launch_kwargs
from .gemm_launch import (
    TMA, PlannedLauncher, configs_for_problem, fitting_tiles, hopper_tiles, positional_launch, shared_bytes,
    tile_config,
)
from .linear_relu_hopper_kernels import _bwd_weight_kernel, _fwd_and_grad_input_kernel
from .tma_descriptors import descriptor


_TILES = hopper_tiles(TMA)  # pruned per kernel and dtype by _shared_bytes
_SMALL_BUFFERS_BYTES = 4096  # mbarriers and the bias sum's tile of ones, rounded up
_INTERPRETER_CONFIG = tile_config(16, 16, 16, 1, 1, group=2)
# Launched untuned: the first of these whose shared memory fits the kernel and dtype (the MLP's
# masked grad-input kernel stages a second output-sized tile, too much for the first in fp32).
# Three stages: with two, the compiled persistent loop kept one operand buffer (no prefetch;
# scripts/compile_check.py, bench/NOTES.md).
_DEFAULT_TILES = [(128, 128, 32, 3, 8), (64, 128, 32, 3, 4)]


def _shared_bytes(tile: tuple, streamed_tiles: int, element_bytes: int, output_tiles: int = 1) -> int:
    """gemm_launch.shared_bytes of a TMA kernel: its output tile (and the MLP's ``below`` tile)
    staged in shared memory, and its barriers."""
    return shared_bytes(tile, streamed_tiles, element_bytes, output_tiles, _SMALL_BUFFERS_BYTES)


def candidates(bucket: tuple, streamed_tiles: int, output_tiles: int = 1) -> list[triton.Config]:
    """The configs worth timing for a bucket: those that fit a Hopper SM's shared memory, pruned by
    gemm_launch.configs_for_problem."""
    if interpreting():
        return [_INTERPRETER_CONFIG]
    fitting = fitting_tiles(_TILES, bucket, streamed_tiles, output_tiles, _SMALL_BUFFERS_BYTES)
    return configs_for_problem(fitting, bucket)


def default_config(bucket: tuple, streamed_tiles: int, output_tiles: int = 1) -> triton.Config:
    if interpreting():
        return _INTERPRETER_CONFIG
    fitting = fitting_tiles(_DEFAULT_TILES, bucket, streamed_tiles, output_tiles, _SMALL_BUFFERS_BYTES)
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
    serves every problem size. ``fixed``: constexprs this launcher always passes (which product of
    a kernel that computes several it launches)."""

    def __init__(self, kernel, title: str, m_axis: int, streamed_tiles: int, flag_names: tuple[str, ...] = (),
                 output_tiles: int = 1, fixed: dict | None = None):
        self.fixed = fixed or {}
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
        constexprs = {**self.constexprs(variant), **self.fixed, "NUM_PROGRAMS": _sm_count(device)}

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
_FORWARD = {"B_TRANSPOSED": True, "MASK_GRAD": False, "MASK_BELOW": False}
_GRAD_INPUT = {"B_TRANSPOSED": False, "HAS_BIAS": False, "RELU": False}
_forward = _PersistentLauncher(
    _fwd_and_grad_input_kernel, "Linear+ReLU forward (TMA)", m_axis=0, streamed_tiles=1,
    flag_names=("HAS_BIAS", "RELU"), fixed=_FORWARD,
)
_backward_input = _PersistentLauncher(
    _fwd_and_grad_input_kernel, "Linear+ReLU grad_x (TMA)", m_axis=0, streamed_tiles=2,
    flag_names=("MASK_GRAD", "MASK_BELOW"), fixed=_GRAD_INPUT,
)
_backward_weight = _PersistentLauncher(
    _bwd_weight_kernel, "Linear+ReLU grad_W/grad_b (TMA)", m_axis=2, streamed_tiles=2,
    flag_names=("HAS_BIAS_GRAD", "BIAS_BY_DOT", "RELU"),
)
_mlp_output_forward = _PersistentLauncher(
    _fwd_and_grad_input_kernel, "MLP output layer forward (TMA)", m_axis=0, streamed_tiles=1,
    flag_names=("HAS_BIAS", "RELU"), fixed=_FORWARD,
)
_mlp_grad_input = _PersistentLauncher(
    _fwd_and_grad_input_kernel, "MLP grad_input (+ mask of the layer below) (TMA)", m_axis=0, streamed_tiles=1,
    flag_names=("MASK_GRAD", "MASK_BELOW"), output_tiles=2, fixed=_GRAD_INPUT,
)
_mlp_grad_weight = _PersistentLauncher(
    _bwd_weight_kernel, "MLP grad_W/grad_b (TMA)", m_axis=2, streamed_tiles=1,
    flag_names=("HAS_BIAS_GRAD", "BIAS_BY_DOT", "RELU"),
)
_LAUNCHERS = (_forward, _backward_input, _backward_weight, _mlp_output_forward, _mlp_grad_input, _mlp_grad_weight)


def tuned_configs() -> list[dict]:
    """As kernels.linear_relu.tuned_configs, for the TMA kernels."""
    return [row for launcher in _LAUNCHERS for row in launcher.report()]


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
        return (descriptor(x, (bm, bk)), None, descriptor(weight, (bn, bk)), bias, None, descriptor(out, (bm, bn)),
                M, N, K)

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
        grad_d = descriptor(grad, (bm, bk))
        dx_d = descriptor(grad_x, (bm, bn))
        return (grad_d, grad_d if out is None else descriptor(out, (bm, bk)), descriptor(weight, (bk, bn)), None,
                dx_d if below is None else descriptor(below, (bm, bn)), dx_d, M, N, K)

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
        grad_d = descriptor(grad, (bk, bm))
        return (grad_d, grad_d if out is None else descriptor(out, (bk, bm)), descriptor(x, (bk, bn)),
                descriptor(grad_w, (bm, bn)), grad_w if grad_b is None else grad_b, M, N, K)

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
