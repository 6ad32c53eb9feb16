"""What the EmbeddingDotBias kernels (embedding_dot_bias.py) and the segment reduction of their
deterministic backward (segment_reduce.py) share: the accumulation dtype and the interpreter's
bf16 rounding."""
import torch
import triton
import triton.language as tl

from ._common import interpreting

# Fixed for the process: the interpreter must be switched on before triton is imported.
INTERPRETING = interpreting()


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype for ``dtype`` tables: fp64 for fp64, fp32 for fp32/bf16/fp16."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc_dtype(dtype: torch.dtype):
    """acc_dtype(dtype) as a Triton dtype (the kernels' ACC_DTYPE)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def soft_bf16(dtype: torch.dtype) -> bool:
    """Whether a kernel writing ``dtype`` must round by hand (``rounded``'s SOFT_BF16)."""
    return INTERPRETING and dtype == torch.bfloat16


@triton.jit
def rounded(values, DTYPE: tl.constexpr, SOFT_BF16: tl.constexpr):
    """``values`` rounded to DTYPE, to nearest even. Compiled kernels convert natively; the
    interpreter truncates fp32 -> bf16 (triton 3.9), so there SOFT_BF16 rounds from the bits."""
    if SOFT_BF16:
        bits = values.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return values.to(DTYPE)
