"""What the EmbeddingDotBias kernels (embedding_dot_bias.py) and the segment reduction of their
deterministic backward (segment_reduce.py) share: the accumulation dtype and whether the
interpreter runs them."""
import torch
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
