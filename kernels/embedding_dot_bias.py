"""Fused EmbeddingDotBias: out[b] = <U[u_b], V[i_b]> + ub[u_b] + ib[i_b] (optionally squashed
into y_range by a sigmoid), and its backward for all four tables.

Shapes: users, items (B,) int32/int64 of any stride; U (n_users, D), V (n_items, D) of any
strides; ub (n_users,) or (n_users, 1), ib likewise (only stride(0) is used). Accumulation is
fp32 for fp32/bf16/fp16 tables and fp64 for fp64 tables; outputs are in the table dtype.

Forward: one kernel. Each program takes BLOCK_B samples, gathers their two rows tile by tile
(BLOCK_D columns at a time) straight into registers, multiplies, reduces, adds the two biases,
applies the sigmoid and writes one value per sample. Nothing of shape (B, D) is ever stored.

Backward: with coef[b] = grad_out[b] * d out[b] / d res[b] (1 without y_range,
(hi - lo) * s * (1 - s) with s = sigmoid(res) otherwise; res is recomputed from the rows the
backward has to read anyway, so the forward saves nothing), the gradients are
    grad_U[r] = sum_{b: u_b = r} coef[b] * V[i_b]      grad_ub[r] = sum_{b: u_b = r} coef[b]
and the same for V and ib with the roles swapped. Three ways to form them; one per-sample
kernel does the work of each sample, its MODE saying what it writes:

* atomic (default, MODE_ATOMIC): one launch; each program scatters coef * partner-row into the
  dense gradients with relaxed atomic adds. Fast, and duplicates only contend on the hot rows, but the
  order of the additions varies from run to run, so the result is nondeterministic in the last
  bits. bf16/fp16 tables accumulate in an fp32 workspace that is rounded once at the end.
* deterministic (used when torch.are_deterministic_algorithms_enabled()): coef is formed first
  (MODE_COEF; without y_range it is grad_out itself), then each table's indices are sorted and
  segment_reduce.py sums every row's samples in an order fixed by B alone: bitwise identical
  across runs, and bf16/fp16 gradients are rounded once, from fp32, without a workspace.
* sparse (MODE_SPARSE): per-sample values coef * partner-row (B, D) and coef (B,), exactly what
  nn.Embedding(sparse=True) puts in its COO gradient; no reduction, so deterministic.

All sample offsets are int64 (tl.program_id(0).to(tl.int64)), so B * D and n * D may exceed 2^31.
"""
import torch

from ._common import cdiv, new_output, next_power_of_2, on_device_of
from ._embedding_common import INTERPRETING, acc_dtype, tl_acc_dtype
from .embedding_dot_bias_kernels import (
    MODE_ATOMIC, MODE_COEF, MODE_SPARSE, _embedding_dot_bias_bwd_per_sample_kernel, _embedding_dot_bias_fwd_kernel,
)
from .segment_reduce import add_segment_sums

# Blocks of the per-sample kernels (the forward and the per-sample backward in every MODE).
# Compiled: a (BLOCK_B, BLOCK_D) row tile of about SAMPLE_TILE_ELEMENTS (D=64: 64 samples of
# 256-byte fp32 rows; with SAMPLE_WARPS=8 each thread holds 16 elements of each table, about 70
# registers for the forward on sm_90); untuned, see bench/NOTES.md. Wider rows loop over their
# columns, narrower ones (D < 16) take at most SAMPLE_MAX_BLOCK_B samples.
SAMPLE_WARPS = 8
SAMPLE_TILE_ELEMENTS = 4096
SAMPLE_MAX_BLOCK_D = 128
SAMPLE_MAX_BLOCK_B = 256
# Interpreter: large blocks, since it pays per program instance, not per element.
INTERPRETER_BLOCK_B = (16, 512)  # the batch rounded up to a power of two, within these bounds
INTERPRETER_MAX_BLOCK_D = 64


def _blocks(B: int, D: int) -> tuple[int, int]:
    """(BLOCK_B, BLOCK_D) of the per-sample kernels (see SAMPLE_TILE_ELEMENTS)."""
    if INTERPRETING:
        smallest, largest = INTERPRETER_BLOCK_B
        return min(largest, max(smallest, next_power_of_2(B))), min(INTERPRETER_MAX_BLOCK_D, next_power_of_2(D))
    block_d = min(SAMPLE_MAX_BLOCK_D, next_power_of_2(D))
    return min(SAMPLE_MAX_BLOCK_B, SAMPLE_TILE_ELEMENTS // block_d), block_d


def _bias_stride(bias: torch.Tensor | None) -> int:
    return bias.stride(0) if bias is not None else 0


def _table_args(u_weight, i_weight, u_bias, i_bias, fallback):
    """Pointers and strides of the four tables; a table that is not needed (None) is replaced by
    ``fallback`` with zero strides and never read."""
    tables = [t if t is not None else fallback for t in (u_weight, i_weight, u_bias, i_bias)]
    strides = (
        u_weight.stride(0) if u_weight is not None else 0, u_weight.stride(1) if u_weight is not None else 0,
        i_weight.stride(0) if i_weight is not None else 0, i_weight.stride(1) if i_weight is not None else 0,
        _bias_stride(u_bias), _bias_stride(i_bias),
    )
    return tables, strides


@on_device_of(lambda args: args[2])
def embedding_dot_bias_forward(
    users: torch.Tensor,
    items: torch.Tensor,
    u_weight: torch.Tensor,
    i_weight: torch.Tensor,
    u_bias: torch.Tensor,
    i_bias: torch.Tensor,
    y_lo: float | None,
    y_hi: float | None,
    index_errors: torch.Tensor | None,
    *,
    wrap=None,
) -> torch.Tensor:
    """out (B,) in the table dtype: <U[users], V[items]> + ub[users] + ib[items], and with
    y_lo/y_hi given, sigmoid(that) * (y_hi - y_lo) + y_lo.

    users, items: (B,) int32 or int64, any stride. A sample with an index outside its table reads
        nothing and scores NaN.
    u_weight (n_users, D), i_weight (n_items, D): one float dtype, any strides.
    u_bias (n_users,) or (n_users, 1), i_bias likewise (stride(0) is the row stride).
    y_lo, y_hi: both None (no y_range) or both floats. Compiled kernels take them as fp32 scalars.
    index_errors: None, or an int64 flag of fastcore5.index_errors.SLOTS elements on the tables'
        device into which the kernel records bad indices (layout in fastcore5/index_errors.py).
    wrap: None, or a function applied to the kernel before launching it (torch.library.wrap_triton).
    """
    B = users.shape[0]
    n_users, D = u_weight.shape
    out = new_output((B,), u_weight)
    if B == 0:
        return out
    block_b, block_d = _blocks(B, D)
    has_y_range = y_lo is not None
    kernel = _embedding_dot_bias_fwd_kernel if wrap is None else wrap(_embedding_dot_bias_fwd_kernel)
    kernel[(cdiv(B, block_b),)](
        users, items, u_weight, i_weight, u_bias, i_bias, out, out if index_errors is None else index_errors,
        B, D, n_users, i_weight.shape[0], float(y_lo) if has_y_range else 0.0, float(y_hi) if has_y_range else 0.0,
        users.stride(0), items.stride(0),
        u_weight.stride(0), u_weight.stride(1), i_weight.stride(0), i_weight.stride(1),
        u_bias.stride(0), i_bias.stride(0),
        HAS_Y_RANGE=has_y_range, RECORD_ERRORS=index_errors is not None,
        ACC_DTYPE=tl_acc_dtype(u_weight.dtype),
        BLOCK_B=block_b, BLOCK_D=block_d, num_warps=SAMPLE_WARPS,
    )
    return out


@on_device_of(lambda args: args[0])
def embedding_dot_bias_backward(
    grad_out: torch.Tensor,
    users: torch.Tensor,
    items: torch.Tensor,
    u_weight: torch.Tensor | None,
    i_weight: torch.Tensor | None,
    u_bias: torch.Tensor | None,
    i_bias: torch.Tensor | None,
    num_users: int,
    num_items: int,
    y_lo: float | None,
    y_hi: float | None,
    need_u_weight: bool,
    need_i_weight: bool,
    need_u_bias: bool,
    need_i_bias: bool,
    deterministic: bool,
    sparse: bool,
    *,
    wrap=None,
):
    """(grad_u_weight, grad_i_weight, grad_u_bias, grad_i_bias); each is None unless asked for.
    A sample with an index outside its table contributes nothing (its sparse values are 0).

    grad_out: (B,) in the table dtype, any stride (an expanded scalar is fine).
    users, items: (B,) int32/int64 as given to the forward.
    Tables: as in the forward, but only those needed may be given (others None):
      grad of u_weight needs i_weight, grad of i_weight needs u_weight, and with y_range
      (y_lo, y_hi floats) all four are needed to recompute the pre-sigmoid score.
    num_users, num_items: rows of the user and item tables.
    Dense (sparse=False): contiguous grad_u_weight (num_users, D), grad_i_weight (num_items, D),
      grad_u_bias (num_users,), grad_i_bias (num_items,), all in grad_out's dtype. With
      deterministic=True the sort + segment reduction (bitwise reproducible), else atomics.
    Sparse (sparse=True): the values of nn.Embedding-style COO gradients, one row per sample:
      (B, D), (B, D), (B,), (B,); the caller pairs them with users/items as indices.
    wrap: None, or a function applied to each kernel before launching it (torch.library.wrap_triton).
    """
    launch = (lambda kernel: kernel) if wrap is None else wrap
    B = users.shape[0]
    dtype, device = grad_out.dtype, grad_out.device
    D = u_weight.shape[1] if u_weight is not None else i_weight.shape[1] if i_weight is not None else 0
    has_y_range = y_lo is not None
    lo, hi = (float(y_lo), float(y_hi)) if has_y_range else (0.0, 0.0)
    accumulate_in = acc_dtype(dtype)
    tables, table_strides = _table_args(u_weight, i_weight, u_bias, i_bias, fallback=grad_out)
    needs = (need_u_weight, need_i_weight, need_u_bias, need_i_bias)

    def per_sample(mode, coef, outputs):
        """Launch the per-sample kernel in ``mode`` writing ``coef`` or the four ``outputs``
        (grad or values of u_weight, i_weight, u_bias, i_bias; None: not wanted)."""
        block_b, block_d = _blocks(B, D)
        need_uw, need_iw, need_ub, need_ib = (out is not None for out in outputs)
        launch(_embedding_dot_bias_bwd_per_sample_kernel)[(cdiv(B, block_b),)](
            grad_out, users, items, *tables, coef, *[out if out is not None else grad_out for out in outputs],
            B, D, num_users, num_items, lo, hi, grad_out.stride(0), users.stride(0), items.stride(0), *table_strides,
            MODE=mode.value, HAS_Y_RANGE=has_y_range,
            NEED_UW=need_uw, NEED_IW=need_iw, NEED_UB=need_ub, NEED_IB=need_ib,
            ACC_DTYPE=tl_acc_dtype(dtype),
            BLOCK_B=block_b, BLOCK_D=block_d, num_warps=SAMPLE_WARPS,
        )

    if sparse:
        shapes = ((B, D), (B, D), (B,), (B,))
        values = [new_output(shape, grad_out) if need else None for shape, need in zip(shapes, needs)]
        if B > 0 and any(needs):
            per_sample(MODE_SPARSE, grad_out, values)
        return tuple(values)

    shapes = ((num_users, D), (num_items, D), (num_users,), (num_items,))
    if deterministic:
        # Every row gets its sum written once (see segment_reduce.py), so no wider workspace.
        grads = [torch.zeros(shape, dtype=dtype, device=device) if need else None for shape, need in zip(shapes, needs)]
        if B == 0 or not any(needs):
            return tuple(grads)
        if has_y_range:
            coef = new_output((B,), grad_out, accumulate_in)
            per_sample(MODE_COEF, coef, (None,) * 4)
        else:
            coef = grad_out.to(accumulate_in).contiguous()
        grad_uw, grad_iw, grad_ub, grad_ib = grads
        if need_u_weight or need_u_bias:
            sorted_users, order = torch.sort(users, stable=True)
            add_segment_sums(
                sorted_users, order, coef, items, i_weight, grad_uw, grad_ub, D, num_users, num_items, wrap=wrap
            )
        if need_i_weight or need_i_bias:
            sorted_items, order = torch.sort(items, stable=True)
            add_segment_sums(
                sorted_items, order, coef, users, u_weight, grad_iw, grad_ib, D, num_items, num_users, wrap=wrap
            )
        return tuple(grads)

    # Atomic path: low-precision tables accumulate in an fp32 workspace, rounded once at the end.
    accumulators = [
        torch.zeros(shape, dtype=accumulate_in, device=device) if need else None for shape, need in zip(shapes, needs)
    ]
    if B > 0 and any(needs):
        per_sample(MODE_ATOMIC, grad_out, accumulators)
    return tuple(a.to(dtype) if a is not None else None for a in accumulators)
