"""The Triton kernels of EmbeddingDotBias: the forward and the per-sample backward, with the
helpers they inline. What they compute, and how the launchers in embedding_dot_bias.py use them
(blocks, modes, the deterministic path), is described there.
"""
import triton
import triton.language as tl

from ._common import rounded_to
from ._embedding_common import clamped_rows

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
