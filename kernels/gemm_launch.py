"""Launching a tiled Triton GEMM kernel with the config of its shape bucket.

The Linear+ReLU kernels (kernels/linear_relu.py) and the MLP's (kernels/mlp.py) share one
signature convention: runtime arguments, then the dtype's constexprs (INPUT_PRECISION,
ROUND_TF32, UPCAST, ACC_DTYPE) and the kernel's flags, then BLOCK_M/BLOCK_N/BLOCK_K/GROUP_M,
on a flat grid of output tiles. ``GemmLauncher`` launches such a kernel: a dict lookup per call
once a (variant, extents, strides) was seen, the bucket's config from kernels/_tuning.py the
first time. The candidate tiles are Hopper's (H100/H200), pruned per bucket: ``HOPPER_TILES``, the
table both GEMM families draw their candidates from, with the shared-memory estimate both prune by.
``PlannedLauncher``, its base, is what it shares with the TMA kernels' launcher
(kernels/linear_relu_hopper.py).
"""
import torch
import triton
import triton.language as tl

from ._common import (
    HOPPER_SHARED_MEMORY_BYTES, cdiv, dot_needs_upcast, in_signature_order, interpreting, next_power_of_2,
    shared_memory_limit,
)
from ._tuning import TunedKernel, launch_kwargs


# Hopper (H100/H200) tiles worth timing, (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps), and the GEMM
# kernel families that time each: PORTABLE (kernels/linear_relu.py, kernels/mlp.py; on every card,
# pruned by its shared memory) and TMA (kernels/linear_relu_hopper_kernels.py, sm_90 only). Block
# names follow each kernel's output tile, BLOCK_K is its reduction step. 128x128..128x256 with 3-4
# stages for 16-bit operands, smaller tiles for skinny shapes and fp32. A TMA tile has 4 or 8 warps
# (wgmma needs a whole warpgroup; 8 are two splitting BLOCK_M); its BLOCK_K = 64 is one 128-byte
# swizzle row of 16-bit operands. Each family keeps the set it tuned over when it had a list of its
# own: their union would add up to 6 compiles to a bucket's first tuning (the digits demo's
# buckets: 2 -> 4), unmeasured on a GPU (bench/NOTES.md, 2026-12-04).
PORTABLE, TMA = "portable", "tma"
HOPPER_TILES = {
    (128, 256, 64, 3, 8): (PORTABLE, TMA),
    (256, 128, 64, 3, 8): (PORTABLE, TMA),
    (128, 256, 32, 4, 8): (TMA,),
    (128, 128, 64, 4, 8): (PORTABLE, TMA),
    (128, 128, 64, 3, 8): (TMA,),
    (128, 128, 32, 3, 8): (TMA,),
    (128, 128, 32, 4, 4): (PORTABLE,),
    (128, 128, 64, 3, 4): (TMA,),
    (64, 256, 32, 4, 4): (PORTABLE,),
    (128, 64, 32, 4, 4): (PORTABLE,),
    (64, 128, 64, 4, 4): (TMA,),
    (64, 128, 32, 4, 4): (PORTABLE,),
    (64, 64, 64, 4, 4): (TMA,),
    (64, 64, 32, 5, 2): (PORTABLE,),
}


def hopper_tiles(family: str) -> list[tuple]:
    """The tiles ``family`` times, in HOPPER_TILES' order."""
    return [tile for tile, families in HOPPER_TILES.items() if family in families]


def shared_bytes(
    tile: tuple, streamed_tiles: int, element_bytes: int, output_tiles: int = 0, fixed_bytes: int = 0,
) -> int:
    """Shared memory a config needs, at most: ``stages`` buffers of the streamed operand tiles
    (``streamed_tiles`` of BLOCK_M x BLOCK_K per step: x; or grad_out and out) and of the BLOCK_K x
    BLOCK_N operand, plus ``output_tiles`` BLOCK_M x BLOCK_N tiles held in shared memory (the TMA
    kernels stage their output for the TMA store, and the MLP's grad-input reads a ``below`` tile;
    the portable kernels store from registers) and ``fixed_bytes`` (the TMA kernels' barriers).
    Operands and outputs share one dtype."""
    m, n, k, stages, _ = tile
    return (stages * (streamed_tiles * m * k + k * n) + output_tiles * m * n) * element_bytes + fixed_bytes


def fitting_tiles(
    tiles: list[tuple], bucket: tuple, streamed_tiles: int, output_tiles: int = 0, fixed_bytes: int = 0,
) -> list[tuple]:
    """``tiles`` whose shared_bytes fit the bucket's shared memory (``smem``: the device's, Hopper's
    when absent), for its element size (``bytes``)."""
    facts = dict(bucket)
    limit = facts.get("smem", HOPPER_SHARED_MEMORY_BYTES)
    return [t for t in tiles if shared_bytes(t, streamed_tiles, facts["bytes"], output_tiles, fixed_bytes) <= limit]


_PORTABLE_TILES = hopper_tiles(PORTABLE)
GROUP_M = 8  # tiles per group in the grouped (L2-friendly) tile order


def tile_config(m, n, k, stages, warps, group=GROUP_M) -> triton.Config:
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": group}, num_stages=stages, num_warps=warps)


_INTERPRETER_CONFIG = tile_config(16, 16, 16, 1, 1, group=4)
# What a launch runs untuned (FASTCORE5_TUNING=off, CUDA-graph capture, torch.compile), by element
# size and dot precision: configs that spill no register and fit 99 KB of shared memory (sm_86/89,
# the smallest of the cards shipped to) in every kernel on sm_80/86/89/90, as measured by
# scripts/compile_check.py (bench/NOTES.md). The former single default, 128 x 128 x 32 over 4 warps
# and 4 stages, held 128 fp32 accumulators per thread and spilled (fp32 without TF32: 255 registers
# and up to 1.9 KB of spill per thread; fp64: 22 KB, and 197-297 KB of shared memory, more than
# any card has). Without TF32 the fp32 dot runs on FMA units, register-hungry: a narrower K step.
_DEFAULT_TILES = {
    (2, "ieee"): (128, 128, 32, 3, 8),
    (4, "tf32"): (128, 128, 32, 2, 8),
    (4, "ieee"): (64, 128, 16, 3, 8),
    (8, "ieee"): (64, 64, 16, 3, 8),
}


def _default_tile(bucket: tuple) -> tuple:
    facts = dict(bucket)
    return _DEFAULT_TILES[facts["bytes"], facts["precision"]]


def default_config(bucket: tuple) -> triton.Config:
    return _INTERPRETER_CONFIG if interpreting() else tile_config(*_default_tile(bucket))


def hopper_candidates(bucket: tuple, streamed_tiles: int = 1) -> list[triton.Config]:
    """The configs worth timing for a bucket on a GPU: those whose pipelined operand tiles fit the
    bucket's shared memory (``smem``: the device's, Hopper's when absent), pruned by
    ``configs_for_problem``. ``streamed_tiles``: BLOCK_M x BLOCK_K tiles loaded per K step (2 for
    the backward kernels that read grad_out and out; the compile matrix found their 1-tile
    estimate admitting configs of 107-141 KB on 99 KB cards)."""
    fitting = fitting_tiles(_PORTABLE_TILES, bucket, streamed_tiles)
    # the default fits every card: where no Hopper tile does (fp64 on sm_86/89), it is the candidate
    return configs_for_problem(fitting or [_default_tile(bucket)], bucket)


def configs_for_problem(tiles: list[tuple], bucket: tuple) -> list[triton.Config]:
    """``tiles`` (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps) as configs, without tiles larger than
    the bucket's (power-of-two) problem in any dimension unless no smaller tile exists."""
    b = dict(bucket)
    for index, extent in ((0, b["rows"]), (1, b["cols"]), (2, b["reduction"])):
        limit = max(next_power_of_2(extent), min(t[index] for t in tiles))
        tiles = [t for t in tiles if t[index] <= limit]
    return [tile_config(*t) for t in tiles]


def _grid(rows, cols, config: triton.Config) -> tuple:
    """One program per (BLOCK_M x BLOCK_N) output tile, in a flat grid (_grouped_tile orders them)."""
    return (cdiv(rows, config.kwargs["BLOCK_M"]) * cdiv(cols, config.kwargs["BLOCK_N"]),)


def _device_name(device: torch.device) -> str | None:
    """Keys tuned configs by card; None off CUDA (interpreter, compile-only runs: nothing saved)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def _stride_class(stride: int) -> int:
    """What Triton's launch specialisation sees of a stride: 1, a multiple of 16 (16), or neither (0)."""
    return 1 if stride == 1 else 16 if stride % 16 == 0 else 0


class PlannedLauncher:
    """What every GEMM launcher here shares: a kernel, its configs tuned per shape bucket
    (kernels/_tuning.py), and a plan per exact call key, worked out on the first call with that
    key and then found by one dict lookup. ``variant`` is (dtype, dot precision, *flags), the
    flags being the values of the constexprs named in ``flag_names``; ``m_axis`` says which
    extent is the batch dimension M, the one bucketed to a power of two."""

    _MAX_PLANS = 4096

    def __init__(self, kernel, title: str, m_axis: int, flag_names: tuple[str, ...], candidates, default: triton.Config):
        self.tuned = TunedKernel(kernel, title, candidates, default)
        self.kernel = kernel
        self.m_axis = m_axis  # 0: rows, 2: reduction
        self.flag_names = flag_names
        self.plans: dict[tuple, tuple] = {}

    def _bucket(self, variant: tuple, extents: tuple, layout: tuple = (), shared_limit: int | None = None) -> tuple:
        """The tuning key: dtype, precision, flags, extents (M to a power of two), ``layout``
        (what of the strides a launcher's kernel specialises on), the element size and the
        device's shared memory per block (which configs fit)."""
        dtype, precision, *flags = variant
        rows, cols, reduction = (next_power_of_2(e) if axis == self.m_axis else e for axis, e in enumerate(extents))
        return (
            ("dtype", str(dtype).replace("torch.", "")),
            ("precision", precision),
            ("flags", "".join("1" if f else "0" for f in flags)),
            ("rows", rows), ("cols", cols), ("reduction", reduction),
            *layout,
            ("bytes", dtype.itemsize),
            ("smem", HOPPER_SHARED_MEMORY_BYTES if shared_limit is None else shared_limit),
        )

    def constexprs(self, variant: tuple) -> dict:
        dtype, precision, *flags = variant
        return constexprs_for(dtype, precision, **dict(zip(self.flag_names, flags)))

    def _planned(self, key: tuple, device: torch.device, bucket: tuple, run, plan_with) -> tuple:
        """``plan_with(config)`` for the bucket's config, remembered under ``key``. ``run(config)``
        gives a launch for timing candidates."""
        # Timing synchronises the device, which a CUDA graph capture forbids: a bucket first met
        # while capturing launches its known or default config, and is tuned on a later eager call.
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if capturing:
            config = self.tuned.known(bucket, _device_name(device)) or self.tuned.default_for(bucket)
        else:
            config = self.tuned.choose(bucket, _device_name(device), run)
        plan = plan_with(config)
        if not capturing:
            if len(self.plans) >= self._MAX_PLANS:
                self.plans.clear()
            self.plans[key] = plan
        return plan

    def report(self) -> list[dict]:
        return self.tuned.report()


class GemmLauncher(PlannedLauncher):
    """Launches one kernel of the shared signature on a flat grid of output tiles.

    Per call: one dict lookup on the exact (variant, extents, strides), then ``kernel.run``.
    ``args`` are the kernel's runtime arguments, the first a tensor on the launch device. A plan
    does not depend on the tensors' addresses, only on the key, so one plan serves every call
    with that key."""

    def __init__(self, kernel, title: str, m_axis: int, flag_names: tuple[str, ...] = (), streamed_tiles: int = 1):
        def candidates(bucket):
            return [_INTERPRETER_CONFIG] if interpreting() else hopper_candidates(bucket, streamed_tiles)

        super().__init__(kernel, title, m_axis, flag_names, candidates, default_config)

    def __call__(self, wrap, variant: tuple, extents: tuple, strides: tuple, args: tuple):
        if wrap is not None:
            return self._launch_wrapped(wrap, variant, extents, strides, args)
        key = (variant, extents, strides)
        plan = self.plans.get(key)
        if plan is None:
            plan = self._plan(key, args)
        grid, meta_parameters, options = plan
        # What kernel[grid](...) calls. The constexprs go positionally, after the runtime
        # arguments: a keyword dict of a dozen entries per launch cost ~1 us on the host.
        self.kernel.run(*args, *meta_parameters, grid=grid, warmup=False, **options)

    def bucket(self, variant: tuple, extents: tuple, strides: tuple, shared_limit: int | None = None) -> tuple:
        return self._bucket(variant, extents, (
            ("div16", "".join("1" if e % 16 == 0 else "0" for e in extents)),
            ("strides", ",".join(str(_stride_class(s)) for s in strides)),
        ), shared_limit)

    def _plan(self, key: tuple, args: tuple) -> tuple:
        variant, extents, strides = key
        rows, cols, _ = extents
        constexprs = self.constexprs(variant)

        def run(config):
            grid = _grid(rows, cols, config)
            return lambda: self.kernel[grid](*args, **constexprs, **launch_kwargs(config))

        def plan_with(config):
            return (_grid(rows, cols, config), *positional_launch(self.kernel, len(args), constexprs, config))

        device = args[0].device
        bucket = self.bucket(variant, extents, strides, shared_memory_limit(device))
        return self._planned(key, device, bucket, run, plan_with)

    def _launch_wrapped(self, wrap, variant, extents, strides, args):
        """Traced launch (torch.compile through torch.library.triton_op): no tuning, no host reads;
        the bucket's config when this process already chose one, else the fixed default. Sizes
        that are symbolic get the default too, so no guard is put on them here."""
        config = None
        if all(type(v) is int for v in (*extents, *strides)):
            config = self.tuned.known(self.bucket(variant, extents, strides), _device_name(args[0].device))
        config = config or self.tuned.default_for((("bytes", variant[0].itemsize), ("precision", variant[1])))
        rows, cols, _ = extents
        grid = _grid(rows, cols, config)
        wrap(self.kernel)[grid](*args, **self.constexprs(variant), **launch_kwargs(config))


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


def constexprs_for(dtype: torch.dtype, precision: str, **flags) -> dict:
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


def positional_launch(kernel, runtime_count: int, constexprs: dict, config: triton.Config) -> tuple[tuple, dict]:
    """(meta-parameters, options) for ``kernel.run(*runtime_args, *meta_parameters, ...,
    **options)``: every constexpr of the kernel after its ``runtime_count`` runtime arguments, in
    signature order, from ``constexprs`` and the config's block sizes, and the config's warps and
    stages. Passed positionally because a keyword dict of a dozen entries per launch cost ~1 us."""
    meta_parameters = in_signature_order(kernel, runtime_count, {**constexprs, **config.kwargs})
    return meta_parameters, {"num_warps": config.num_warps, "num_stages": config.num_stages}
