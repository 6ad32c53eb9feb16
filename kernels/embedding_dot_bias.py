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
  (MODE_COEF; without y_range it is grad_out itself, 0 for a sample with a bad index), then each table's indices are sorted and
  segment_reduce.py sums every row's samples in an order fixed by B alone: bitwise identical
  across runs, and bf16/fp16 gradients are rounded once, from fp32, without a workspace.
* sparse (MODE_SPARSE): per-sample values coef * partner-row (B, D) and coef (B,), exactly what
  nn.Embedding(sparse=True) puts in its COO gradient; no reduction, so deterministic.

All sample offsets are int64 (tl.program_id(0).to(tl.int64)), so B * D and n * D may exceed 2^31.
"""
import torch
import triton
import triton.language as tl

from ._common import cdiv, launch, new_output, next_power_of_2, on_device_of, rounded_to
from ._embedding_common import INTERPRETING, acc_dtype, clamped_rows, tl_acc_dtype
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
# What the per-sample backward kernel writes (its MODE); the values are csrc/embedding_dot_bias.cu's Mode.
MODE_COEF = tl.constexpr(0)  # coef alone: the deterministic path's input with y_range
MODE_ATOMIC = tl.constexpr(1)  # coef-weighted partner rows atomically added into dense gradients
MODE_SPARSE = tl.constexpr(2)  # the same values stored per sample: nn.Embedding(sparse=True)'s COO values


@triton.jit
def _load_indices(users_ptr, items_ptr, samples, in_batch, stride_users, stride_items):
    users = tl.load(users_ptr + samples * stride_users, mask=in_batch, other=0).to(tl.int64)
    items = tl.load(items_ptr + samples * stride_items, mask=in_batch, other=0).to(tl.int64)
    return users, items


@triton.jit
def _inside_tables(users, items, in_batch, n_users, n_items):
    """(users, items, valid): valid = in the batch with both indices inside their tables. Every
    kernel checks, whatever the validation mode, and masks every table access with ``valid``;
    bad indices are also clamped into their tables, so no address formed from them leaves a table."""
    valid = in_batch & (users >= 0) & (users < n_users) & (items >= 0) & (items < n_items)
    return clamped_rows(users, n_users), clamped_rows(items, n_items), valid


@triton.jit
def _record_bad_indices(indices, bad, rows, counts_ptr):
    """Add this program's bad ``indices`` to an index-error flag section (count, most negative,
    largest, rows: see fastcore5/index_errors.py); one branch, taken only when there are any."""
    count = tl.sum(bad.to(tl.int64), axis=0)
    if count > 0:
        tl.atomic_add(counts_ptr, count, sem="relaxed")
        tl.atomic_min(counts_ptr + 1, tl.min(tl.where(bad & (indices < 0), indices, 0), axis=0), sem="relaxed")
        tl.atomic_max(counts_ptr + 2, tl.max(tl.where(bad & (indices >= rows), indices, 0), axis=0), sem="relaxed")
        tl.atomic_max(counts_ptr + 3, rows.to(tl.int64), sem="relaxed")
    return count


@triton.jit
def _scores(
    users, items, in_batch,
    u_weight_ptr, i_weight_ptr, u_bias_ptr, i_bias_ptr,
    D, stride_uw_n, stride_uw_d, stride_iw_n, stride_iw_d, stride_ub, stride_ib,
    ACC_DTYPE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """res[b] = <U[users[b]], V[items[b]]> + ub[users[b]] + ib[items[b]], in ACC_DTYPE (BLOCK_B,)."""
    acc = tl.zeros((BLOCK_B, BLOCK_D), dtype=ACC_DTYPE)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        tile_mask = in_batch[:, None] & (cols[None, :] < D)
        u_rows = tl.load(
            u_weight_ptr + users[:, None] * stride_uw_n + cols[None, :] * stride_uw_d, mask=tile_mask, other=0.0
        )
        i_rows = tl.load(
            i_weight_ptr + items[:, None] * stride_iw_n + cols[None, :] * stride_iw_d, mask=tile_mask, other=0.0
        )
        acc += u_rows.to(ACC_DTYPE) * i_rows.to(ACC_DTYPE)
    u_bias = tl.load(u_bias_ptr + users * stride_ub, mask=in_batch, other=0.0).to(ACC_DTYPE)
    i_bias = tl.load(i_bias_ptr + items * stride_ib, mask=in_batch, other=0.0).to(ACC_DTYPE)
    return tl.sum(acc, axis=1) + u_bias + i_bias


@triton.jit
def _coefficients(
    grad_out_ptr, stride_grad_out, samples, users, items, in_batch,
    u_weight_ptr, i_weight_ptr, u_bias_ptr, i_bias_ptr,
    D, y_lo, y_hi, stride_uw_n, stride_uw_d, stride_iw_n, stride_iw_d, stride_ub, stride_ib,
    HAS_Y_RANGE: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """coef[b] = grad_out[b] * d out[b] / d res[b]; with y_range res is recomputed from the tables."""
    coef = tl.load(grad_out_ptr + samples * stride_grad_out, mask=in_batch, other=0.0).to(ACC_DTYPE)
    if HAS_Y_RANGE:
        res = _scores(
            users, items, in_batch, u_weight_ptr, i_weight_ptr, u_bias_ptr, i_bias_ptr,
            D, stride_uw_n, stride_uw_d, stride_iw_n, stride_iw_d, stride_ub, stride_ib,
            ACC_DTYPE, BLOCK_B, BLOCK_D,
        )
        squashed = 1.0 / (1.0 + tl.exp(-res))
        coef = coef * (y_hi - y_lo) * (squashed * (1.0 - squashed))
    return coef


@triton.jit
def _embedding_dot_bias_fwd_kernel(
    users_ptr, items_ptr, u_weight_ptr, i_weight_ptr, u_bias_ptr, i_bias_ptr, out_ptr, errors_ptr,
    B, D, n_users, n_items, y_lo, y_hi,
    stride_users, stride_items, stride_uw_n, stride_uw_d, stride_iw_n, stride_iw_d, stride_ub, stride_ib,
    HAS_Y_RANGE: tl.constexpr, RECORD_ERRORS: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[b] for a block of samples; a sample with a bad index scores NaN and, with
    RECORD_ERRORS, is recorded in the index-error flag at errors_ptr."""
    samples = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    in_batch = samples < B
    users, items = _load_indices(users_ptr, items_ptr, samples, in_batch, stride_users, stride_items)
    if RECORD_ERRORS:
        bad_users = in_batch & ((users < 0) | (users >= n_users))
        bad_items = in_batch & ((items < 0) | (items >= n_items))
        bad = _record_bad_indices(users, bad_users, n_users, errors_ptr + 1)
        bad += _record_bad_indices(items, bad_items, n_items, errors_ptr + 5)
        if bad > 0:
            tl.atomic_add(errors_ptr, bad, sem="relaxed")
    users, items, valid = _inside_tables(users, items, in_batch, n_users, n_items)
    res = _scores(
        users, items, valid, u_weight_ptr, i_weight_ptr, u_bias_ptr, i_bias_ptr,
        D, stride_uw_n, stride_uw_d, stride_iw_n, stride_iw_d, stride_ub, stride_ib,
        ACC_DTYPE, BLOCK_B, BLOCK_D,
    )
    if HAS_Y_RANGE:
        res = 1.0 / (1.0 + tl.exp(-res)) * (y_hi - y_lo) + y_lo
    res = tl.where(valid, res, float("nan"))
    tl.store(out_ptr + samples, rounded_to(res, out_ptr.dtype.element_ty), mask=in_batch)


@triton.jit
def _scatter_or_store(
    out_ptr, row_offsets, sample_offsets, values, valid, in_batch, MODE: tl.constexpr
):
    """MODE_ATOMIC: add ``values`` into the ACC_DTYPE accumulator at out[row_offsets] where
    ``valid``. MODE_SPARSE: store them, rounded to out's dtype, at out[sample_offsets] for every
    sample in the batch (a sample with a bad index stores its zeros)."""
    if MODE == MODE_ATOMIC:
        tl.atomic_add(out_ptr + row_offsets, values, mask=valid, sem="relaxed")
    else:
        tl.store(out_ptr + sample_offsets, rounded_to(values, out_ptr.dtype.element_ty), mask=in_batch)


@triton.jit
def _partner_rows_out(
    out_ptr, rows, partner_table_ptr, partners, stride_pt_n, stride_pt_d, coef, samples, cols, D,
    read_mask, batch_mask, MODE: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """One column tile of a table's gradient: coef * the partner row (for grad_U, V[i_b]), added
    into the gradient at the sample's own row ``rows`` or stored per sample (see _scatter_or_store)."""
    partner_rows = tl.load(
        partner_table_ptr + partners[:, None] * stride_pt_n + cols[None, :] * stride_pt_d, mask=read_mask, other=0.0
    )
    _scatter_or_store(
        out_ptr, rows[:, None] * D + cols[None, :], samples[:, None] * D + cols[None, :],
        coef[:, None] * partner_rows.to(ACC_DTYPE), read_mask, batch_mask, MODE,
    )


@triton.jit
def _embedding_dot_bias_bwd_per_sample_kernel(
    grad_out_ptr, users_ptr, items_ptr, u_weight_ptr, i_weight_ptr, u_bias_ptr, i_bias_ptr,
    coef_ptr, out_uw_ptr, out_iw_ptr, out_ub_ptr, out_ib_ptr,
    B, D, n_users, n_items, y_lo, y_hi,
    stride_grad_out, stride_users, stride_items,
    stride_uw_n, stride_uw_d, stride_iw_n, stride_iw_d, stride_ub, stride_ib,
    MODE: tl.constexpr, HAS_Y_RANGE: tl.constexpr, NEED_UW: tl.constexpr, NEED_IW: tl.constexpr,
    NEED_UB: tl.constexpr, NEED_IB: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The backward's per-sample work for a block of samples; MODE picks what is written:

    MODE_COEF: coef (B,) in ACC_DTYPE, the deterministic path's input (the NEED_* flags are unused).
    MODE_ATOMIC: coef * V[i_b] and coef scattered into contiguous ACC_DTYPE gradients that start
        at zero: out_uw (n_users, D), out_ub (n_users,), and the item ones.
    MODE_SPARSE: nn.Embedding(sparse=True)'s per-sample COO values in the table dtype:
        out_uw[b] = coef[b] * V[i_b] (contiguous (B, D)), out_iw[b] = coef[b] * U[u_b],
        out_ub[b] = out_ib[b] = coef[b].
    """
    samples = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    in_batch = samples < B
    users, items = _load_indices(users_ptr, items_ptr, samples, in_batch, stride_users, stride_items)
    users, items, valid = _inside_tables(users, items, in_batch, n_users, n_items)
    coef = _coefficients(
        grad_out_ptr, stride_grad_out, samples, users, items, valid,
        u_weight_ptr, i_weight_ptr, u_bias_ptr, i_bias_ptr,
        D, y_lo, y_hi, stride_uw_n, stride_uw_d, stride_iw_n, stride_iw_d, stride_ub, stride_ib,
        HAS_Y_RANGE, ACC_DTYPE, BLOCK_B, BLOCK_D,
    )
    if MODE == MODE_COEF:
        tl.store(coef_ptr + samples, coef, mask=in_batch)
    else:
        if NEED_UB:
            _scatter_or_store(out_ub_ptr, users, samples, coef, valid, in_batch, MODE)
        if NEED_IB:
            _scatter_or_store(out_ib_ptr, items, samples, coef, valid, in_batch, MODE)
        if NEED_UW or NEED_IW:
            for d0 in range(0, D, BLOCK_D):
                cols = d0 + tl.arange(0, BLOCK_D)
                in_cols = cols[None, :] < D
                read_mask = valid[:, None] & in_cols
                batch_mask = in_batch[:, None] & in_cols
                if NEED_UW:
                    _partner_rows_out(
                        out_uw_ptr, users, i_weight_ptr, items, stride_iw_n, stride_iw_d, coef, samples, cols, D,
                        read_mask, batch_mask, MODE, ACC_DTYPE,
                    )
                if NEED_IW:
                    _partner_rows_out(
                        out_iw_ptr, items, u_weight_ptr, users, stride_uw_n, stride_uw_d, coef, samples, cols, D,
                        read_mask, batch_mask, MODE, ACC_DTYPE,
                    )


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
    launch(
        _embedding_dot_bias_fwd_kernel, wrap, (cdiv(B, block_b),),
        (users, items, u_weight, i_weight, u_bias, i_bias, out, out if index_errors is None else index_errors,
         B, D, n_users, i_weight.shape[0], float(y_lo) if has_y_range else 0.0, float(y_hi) if has_y_range else 0.0,
         users.stride(0), items.stride(0),
         u_weight.stride(0), u_weight.stride(1), i_weight.stride(0), i_weight.stride(1),
         u_bias.stride(0), i_bias.stride(0)),
        # HAS_Y_RANGE, RECORD_ERRORS, ACC_DTYPE, BLOCK_B, BLOCK_D
        (has_y_range, index_errors is not None, tl_acc_dtype(u_weight.dtype), block_b, block_d),
        SAMPLE_WARPS,
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
        launch(
            _embedding_dot_bias_bwd_per_sample_kernel, wrap, (cdiv(B, block_b),),
            (grad_out, users, items, *tables, coef, *[out if out is not None else grad_out for out in outputs],
             B, D, num_users, num_items, lo, hi, grad_out.stride(0), users.stride(0), items.stride(0), *table_strides),
            # MODE, HAS_Y_RANGE, NEED_UW, NEED_IW, NEED_UB, NEED_IB, ACC_DTYPE, BLOCK_B, BLOCK_D
            (mode.value, has_y_range, need_uw, need_iw, need_ub, need_ib, tl_acc_dtype(dtype), block_b, block_d),
            SAMPLE_WARPS,
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
        # coef by the kernel even without y_range (where it is grad_out itself): it writes 0 for a
        # sample with an index outside its table, which the segment reduction relies on.
        coef = new_output((B,), grad_out, accumulate_in)
        per_sample(MODE_COEF, coef, (None,) * 4)
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
