"""What the EmbeddingDotBias kernels (embedding_dot_bias.py) and the segment reduction of their
deterministic backward (segment_reduce.py) share: the accumulation dtype and whether the
interpreter runs them."""
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


@triton.jit
def clamped_rows(rows, n_rows):
    """``rows`` clamped into [0, n_rows): an index outside its table (whose accesses are all masked
    off) still forms no address outside the table.

    Clamped, not replaced by row 0 with tl.where(valid, rows, 0): triton 3.6's
    RemoveLayoutConversions pass fails on that select, and on any use of the i1 ``valid`` mask
    in the index arithmetic ("'arith.select' op expected condition type to have the same shape"),
    which broke the forward with int64 indices and the deterministic backward with int32 ones
    (scripts/compile_check.py compiles both under triton 3.6)."""
    return tl.minimum(tl.maximum(rows, 0), n_rows - 1)
