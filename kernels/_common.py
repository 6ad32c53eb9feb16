"""What every launcher and kernel shares: output allocation, interpreter facts, the device guard
and the rounding of stored results."""
import functools
import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """Triton's CPU interpreter is on (it must be switched on before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Read once: the test suite sets it before anything imports the launchers, and an environment
# read on every allocation costs more (1-2 us) than the allocation's own host work.
POISON = os.environ.get("FASTCORE5_POISON", "0") == "1"
HOPPER_SHARED_MEMORY_BYTES = 232448  # what one block may opt into on an H100/H200 SM (227 KB)
# Shared memory one block may opt into, per compute capability (CUDA programming guide's table of
# technical specifications): A100 163 KB, RTX 30xx/A10 99 KB, Orin 163 KB, RTX 40xx/L4/L40 99 KB,
# H100/H200 227 KB. Launchers prune their configs by the launch device's figure.
SHARED_MEMORY_PER_BLOCK = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: HOPPER_SHARED_MEMORY_BYTES}
_compile_target_arch = 90  # what CPU-tensor launches plan for: scripts/compile_check.py sets it
_shared_memory_by_device: dict = {}


def set_compile_target(arch: int) -> None:
    """The compute capability (80, 86, 89, 90) that launches with CPU tensors plan their configs
    for; only scripts/compile_check.py's compile-only runs launch compiled kernels on CPU tensors."""
    global _compile_target_arch
    if arch not in SHARED_MEMORY_PER_BLOCK:
        raise ValueError(f"arch {arch} is not one of {sorted(SHARED_MEMORY_PER_BLOCK)}")
    _compile_target_arch = arch


def compile_target_arch() -> int:
    return _compile_target_arch


def shared_memory_limit(device: torch.device) -> int:
    """Bytes of shared memory one block may use on ``device`` (the compile target for CPU tensors)."""
    if device.type != "cuda":
        return SHARED_MEMORY_PER_BLOCK[_compile_target_arch]
    limit = _shared_memory_by_device.get(device.index)
    if limit is None:
        properties = torch.cuda.get_device_properties(device)
        limit = _shared_memory_by_device[device.index] = properties.shared_memory_per_block_optin
    return limit


# Plain integer arithmetic for the launchers: triton.cdiv and triton.next_power_of_2 are
# constexpr functions whose calls from Python cost microseconds each.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= max(n, 1)."""
    return 1 << max(n - 1, 0).bit_length()


_current_device = torch.cuda.current_device


def on_device_of(tensor_of):
    """Decorate a launcher so its kernels launch on the device of ``tensor_of(args)`` (a tensor, or
    None for a call that launches nothing).

    Triton launches on the *current* CUDA device: without this, tensors on cuda:1 while cuda:0 is
    current would be handed to kernels running on cuda:0. The guard costs one device query per
    call when the tensor is on the current device, and switches devices only when it is not."""
    def decorate(launcher):
        @functools.wraps(launcher)
        def guarded(*args, **kwargs):
            tensor = tensor_of(args)
            # is_cuda and get_device() (the index of a CUDA tensor's device) cost 0.05 us each on
            # the CPU machine, building tensor.device and reading its .type about 0.3: this runs on
            # every launch (bench/NOTES.md, issue 22).
            if tensor is not None and tensor.is_cuda and tensor.get_device() != _current_device():
                with torch.cuda.device(tensor.device):
                    return launcher(*args, **kwargs)
            return launcher(*args, **kwargs)

        guarded.device_guard = True
        return guarded

    return decorate


def in_signature_order(kernel, runtime_count: int, constexprs: dict) -> tuple:
    """``kernel``'s constexprs after its ``runtime_count`` runtime arguments, in signature order,
    for ``kernel.run(*runtime_args, *this, grid=..., warmup=False, num_warps=...)``: passed
    positionally, because a launch with a dozen keyword arguments spends ~1 us on the host
    binding them. Launchers cache the tuple per combination of flags."""
    return tuple(constexprs[name] for name in kernel.arg_names[runtime_count:])


def launch(kernel, wrap, grid: tuple, runtime_args: tuple, constexprs: tuple, num_warps: int) -> None:
    """``kernel[grid](*runtime_args, *constexprs)`` without Triton's keyword binding: constexprs
    in signature order, through ``kernel.run``. ``wrap`` (torch.library.wrap_triton, when traced)
    gets them by name, as traced launches expect."""
    if wrap is None:
        kernel.run(*runtime_args, *constexprs, grid=grid, warmup=False, num_warps=num_warps)
    else:
        names = kernel.arg_names[len(runtime_args):]
        wrap(kernel)[grid](*runtime_args, **dict(zip(names, constexprs)), num_warps=num_warps)


def new_output(shape, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised output on ``like``'s device, of ``dtype`` (default: ``like``'s); filled
    with NaN (or -1 for integers) when FASTCORE5_POISON=1.

    The test suite turns poisoning on, so an element a kernel forgets to write shows up as
    NaN in the comparison instead of silently passing on whatever memory held. Allocated with
    ``like.new_empty``: 0.4 us of the 2.3 us that ``torch.empty(shape, dtype=, device=)`` costs a
    launch is its keyword parsing.
    """
    out = like.new_empty(shape) if dtype is None else like.new_empty(shape, dtype=dtype)
    if POISON:
        out.fill_(float("nan") if out.dtype.is_floating_point else -1)
    return out


_precision_getter = getattr(torch._C, "_get_fp32_precision_getter", None)


def fp32_matmul_allows_tf32() -> bool:
    """Whether torch lets fp32 CUDA matmuls use TF32, however the user said so.

    torch 2.9+ reports every way of setting it (``torch.backends.cuda.matmul.allow_tf32``,
    ``torch.set_float32_matmul_precision`` and the newer ``fp32_precision`` attributes) through
    ``torch.backends.cuda.matmul.fp32_precision`` ("none" inherits ``torch.backends.fp32_precision``),
    while reading ``allow_tf32`` after the newer API was used raises. Older torch has only allow_tf32.
    Read through the C getter behind those attributes: 0.2 us a call where the attribute chain
    costs 2 us, and every fp32 launch asks.
    """
    if _precision_getter is None:
        return bool(torch.backends.cuda.matmul.allow_tf32)
    precision = _precision_getter("cuda", "matmul")
    if precision == "none":
        precision = _precision_getter("generic", "all")
    return precision == "tf32"


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input_precision for operands of ``dtype``: fp32 follows torch's TF32 setting."""
    if dtype == torch.float32 and fp32_matmul_allows_tf32():
        return "tf32"
    return "ieee"


def dot_needs_upcast(dtype: torch.dtype) -> bool:
    """The interpreter computes tl.dot on bfloat16 operands wrongly (garbage of order 1e9 with
    triton 3.9 on CPU), so under it bf16 tiles are widened to fp32 before the dot. Compiled
    kernels keep bf16 tensor-core dots."""
    return interpreting() and dtype == torch.bfloat16


# What torch writes for every NaN converted to bf16 (a quiet NaN, sign cleared), so that stored
# bits match torch's bit for bit.
BF16_NAN_BITS: tl.constexpr = tl.constexpr(0x7FC0)


@triton.jit
def rounded_to(values, DTYPE: tl.constexpr):
    """``values`` (fp32 or narrower) converted to DTYPE for a store: rounded to nearest even,
    +-inf kept, overflow to inf, the same bits as torch's ``.to(dtype)``, and a NaN for a NaN.

    bf16 is rounded from the bits, compiled and interpreted alike: the interpreter truncates a
    plain fp32 -> bf16 cast (triton 3.9) where compiled Triton rounds, so one spelled-out path is
    the one CI tests; a few integer operations per element cost nothing next to the store. The
    interpreter's other casts are numpy's, which round to nearest even like compiled code, so
    other dtypes convert natively. fp64 ``values`` would be rounded twice on the way to bf16.
    """
    if DTYPE == tl.bfloat16:
        tl.static_assert(values.dtype != tl.float64, "rounded_to: round fp64 to fp32 first")
        bits = values.to(tl.float32).to(tl.uint32, bitcast=True)
        nearest_even = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        bf16_bits = tl.where(values != values, BF16_NAN_BITS, nearest_even)
        return bf16_bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return values.to(DTYPE)
