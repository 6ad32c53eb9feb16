"""What every launcher shares: output allocation and interpreter facts."""
import os

import torch


def interpreting() -> bool:
    """Triton's CPU interpreter is on (it must be switched on before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Read once: the test suite sets it before anything imports the launchers, and an environment
# read on every allocation costs more (1-2 us) than the allocation's own host work.
POISON = os.environ.get("FASTCORE5_POISON", "0") == "1"


# Plain integer arithmetic for the launchers: triton.cdiv and triton.next_power_of_2 are
# constexpr functions whose calls from Python cost microseconds each.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= max(n, 1)."""
    return 1 << max(n - 1, 0).bit_length()


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised output; filled with NaN (or -1 for integers) when FASTCORE5_POISON=1.

    The test suite turns poisoning on, so an element a kernel forgets to write shows up as
    NaN in the comparison instead of silently passing on whatever memory held.
    """
    out = torch.empty(shape, dtype=dtype, device=device)
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


def kernel_output_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel should write a ``dtype`` result in.

    The interpreter converts fp32 to bf16 by truncation, not round-to-nearest-even as compiled
    kernels do (up to 1 ulp off with triton 3.9 on CPU), so under it bf16 results are written in
    fp32 and rounded by torch in the launcher (``finish_output``). Compiled kernels write bf16.
    """
    return torch.float32 if interpreting() and dtype == torch.bfloat16 else dtype


def finish_output(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``out`` as ``dtype``: a no-op unless kernel_output_dtype widened it."""
    return out if out.dtype == dtype else out.to(dtype)
