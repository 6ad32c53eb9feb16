"""The deterministic backward's segment reduction: for every table row r, the sum of its samples'
contributions, added into the row's gradient in an order fixed by the input's length alone.

Input: the row ids of the samples sorted ascending (a stable sort, so every row's samples are
contiguous), the order that sorts them, the per-sample coefficients and the partner rows (for
grad_U[r], the item rows V[i_b] of r's samples). The reduction runs in levels. A level cuts its
sorted sequence into tiles of SEGMENT_TILE entries; inside a tile each run of equal rows (a
"piece") is summed with a fixed reduction tree. A piece that is the whole segment of its row is
added to the gradient row; a piece that crosses a tile boundary is written to one of the tile's
two carry slots, and the carries (again sorted by row) are the next level's input. Each level
shrinks the sequence by SEGMENT_TILE / 2, so a row hit by all B samples costs log(B) levels of
parallel work, not a B-long serial loop. Every addition happens in an order fixed by B and
SEGMENT_TILE alone: bitwise identical across runs. Each gradient row receives its full sum once
(other writes to it add an exact 0), so bf16/fp16 gradients are rounded once, from fp32, without
a workspace.
"""
import torch
import triton
import triton.language as tl

from ._common import cdiv, new_output, next_power_of_2, rounded_to
from ._embedding_common import INTERPRETING, clamped_rows, tl_acc_dtype

# Entries per tile; each level shrinks its input by SEGMENT_TILE / 2. Tests lower it to force
# many levels on small batches.
SEGMENT_TILE = 64 if INTERPRETING else 32
# Columns per step of the kernel's loop over D. Compiled, the kernel holds a (SEGMENT_TILE,
# SEGMENT_TILE, BLOCK_D) tensor: 32 * 32 * 16 = 16K fp32, 64 registers a thread over
# SEGMENT_WARPS warps. The interpreter pays per step, not per element, so its steps are wide.
SEGMENT_BLOCK_D = 64 if INTERPRETING else 16
SEGMENT_WARPS = 8


@triton.jit
def _embedding_dot_bias_bwd_segment_kernel(
    keys_ptr, N,
    order_ptr, coef_ptr, partners_ptr, stride_partners, partner_table_ptr, stride_pt_n, stride_pt_d,
    carry_in_w_ptr, carry_in_b_ptr,
    grad_w_ptr, grad_b_ptr,
    carry_out_keys_ptr, carry_out_w_ptr, carry_out_b_ptr,
    D, n_rows, n_partner_rows,
    FIRST_LEVEL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, EMIT_CARRY: tl.constexpr,
    ACC_DTYPE: tl.constexpr, TILE: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One level of the deterministic segment reduction for one table (see the module docstring).

    keys (N,) are row ids sorted ascending. The value of entry p is, on the first level,
    coef[order[p]] * partner_table[partners[order[p]]] (and coef[order[p]] for the bias); on
    later levels, carry_in_w[p] (contiguous (N, D)) and carry_in_b[p]. Complete segments are
    added into the contiguous gradients grad_w (n, D) and grad_b (n,). With EMIT_CARRY, tile t
    writes slots 2t and 2t+1 of the carry outputs: (its first row, the sum of its first piece when
    that piece continues into a neighbouring tile, else 0) and (its last row, the sum of its last
    piece when that piece is a different one that continues into the next tile, else 0).
    Entries whose row (of n_rows) or partner row (of n_partner_rows) is out of range add nothing
    and write nothing.
    """
    tile = tl.program_id(0).to(tl.int64)
    start = tile * TILE
    stop = tl.minimum(start + TILE, N)
    positions = start + tl.arange(0, TILE)
    valid = positions < N
    keys = tl.load(keys_ptr + positions, mask=valid, other=-1).to(tl.int64)
    previous_keys = tl.load(keys_ptr + positions - 1, mask=valid & (positions > start), other=-1).to(tl.int64)
    piece_starts = valid & ((positions == start) | (keys != previous_keys))

    first_key = tl.load(keys_ptr + start).to(tl.int64)
    last_key = tl.load(keys_ptr + stop - 1).to(tl.int64)
    before_key = tl.load(keys_ptr + start - 1, mask=start > 0, other=-1).to(tl.int64)
    after_key = tl.load(keys_ptr + stop, mask=stop < N, other=-1).to(tl.int64)
    continues_left = before_key == first_key
    continues_right = after_key == last_key
    first_is_carried = continues_left | (continues_right & (first_key == last_key))
    last_is_carried = continues_right & (first_key != last_key)
    carried = ((keys == first_key) & first_is_carried) | ((keys == last_key) & last_is_carried)
    # Each complete piece is added once, from the entry where it starts.
    adds_to_grad = piece_starts & (carried == 0) & (keys >= 0) & (keys < n_rows)
    same_piece = (keys[:, None] == keys[None, :]) & valid[None, :]
    at_first = positions == start
    at_last = positions == stop - 1

    if FIRST_LEVEL:
        samples = tl.load(order_ptr + positions, mask=valid, other=0).to(tl.int64)
        partners = tl.load(partners_ptr + samples * stride_partners, mask=valid, other=0).to(tl.int64)
        entry_ok = valid & (keys >= 0) & (keys < n_rows) & (partners >= 0) & (partners < n_partner_rows)
        partners = clamped_rows(partners, n_partner_rows)
        coef = tl.load(coef_ptr + samples, mask=entry_ok, other=0.0).to(ACC_DTYPE)
    if EMIT_CARRY:
        tl.store(carry_out_keys_ptr + 2 * tile, first_key)
        tl.store(carry_out_keys_ptr + 2 * tile + 1, last_key)

    if HAS_BIAS:
        if FIRST_LEVEL:
            bias_values = coef
        else:
            bias_values = tl.load(carry_in_b_ptr + positions, mask=valid, other=0.0).to(ACC_DTYPE)
        bias_pieces = tl.sum(tl.where(same_piece, bias_values[None, :], 0.0), axis=1)
        grad_b_ptrs = grad_b_ptr + keys
        previous_biases = tl.load(grad_b_ptrs, mask=adds_to_grad, other=0.0).to(ACC_DTYPE)
        bias_sums = rounded_to(previous_biases + bias_pieces, grad_b_ptr.dtype.element_ty)
        tl.store(grad_b_ptrs, bias_sums, mask=adds_to_grad)
        if EMIT_CARRY:
            first_bias_piece = tl.sum(tl.where(at_first, bias_pieces, 0.0), axis=0)
            last_bias_piece = tl.sum(tl.where(at_last, bias_pieces, 0.0), axis=0)
            tl.store(carry_out_b_ptr + 2 * tile, tl.where(first_is_carried, first_bias_piece, 0.0))
            tl.store(carry_out_b_ptr + 2 * tile + 1, tl.where(last_is_carried, last_bias_piece, 0.0))

    if HAS_WEIGHT:
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            in_cols = cols < D
            tile_mask = valid[:, None] & in_cols[None, :]
            if FIRST_LEVEL:
                rows = tl.load(
                    partner_table_ptr + partners[:, None] * stride_pt_n + cols[None, :] * stride_pt_d,
                    mask=entry_ok[:, None] & in_cols[None, :], other=0.0,
                )
                values = coef[:, None] * rows.to(ACC_DTYPE)
            else:
                values = tl.load(
                    carry_in_w_ptr + positions[:, None] * D + cols[None, :], mask=tile_mask, other=0.0
                ).to(ACC_DTYPE)
            # pieces[p] = sum of the entries in p's piece: a fixed reduction tree over the tile.
            pieces = tl.sum(tl.where(same_piece[:, :, None], values[None, :, :], 0.0), axis=1)
            grad_mask = adds_to_grad[:, None] & in_cols[None, :]
            grad_ptrs = grad_w_ptr + keys[:, None] * D + cols[None, :]
            previous_rows = tl.load(grad_ptrs, mask=grad_mask, other=0.0).to(ACC_DTYPE)
            row_sums = rounded_to(previous_rows + pieces, grad_w_ptr.dtype.element_ty)
            tl.store(grad_ptrs, row_sums, mask=grad_mask)
            if EMIT_CARRY:
                first_piece = tl.sum(tl.where(at_first[:, None], pieces, 0.0), axis=0)
                last_piece = tl.sum(tl.where(at_last[:, None], pieces, 0.0), axis=0)
                tl.store(
                    carry_out_w_ptr + (2 * tile) * D + cols,
                    tl.where(first_is_carried, first_piece, 0.0), mask=in_cols,
                )
                tl.store(
                    carry_out_w_ptr + (2 * tile + 1) * D + cols,
                    tl.where(last_is_carried, last_piece, 0.0), mask=in_cols,
                )


def add_segment_sums(
    keys, order, coef, partners, partner_table, grad_w, grad_b, D, n_rows, n_partner_rows, *, wrap=None
):
    """Deterministically add, for every row r of the sorted ``keys``, the sum over its samples b
    of coef[b] * partner_table[partners[b]] into grad_w[r] and of coef[b] into grad_b[r]
    (either may be None). ``order`` maps sorted positions to samples; samples whose row (of
    n_rows) or partner row (of n_partner_rows) is out of range are left out. ``wrap``: None, or
    a function applied to the kernel before launching it (torch.library.wrap_triton)."""
    kernel = _embedding_dot_bias_bwd_segment_kernel
    launch = kernel if wrap is None else wrap(kernel)
    tile = SEGMENT_TILE
    acc_dtype = coef.dtype
    has_weight, has_bias = grad_w is not None, grad_b is not None
    block_d = min(SEGMENT_BLOCK_D, next_power_of_2(D))
    first_level = True
    carry_w = carry_b = coef  # placeholders on the first level, never read there
    N = keys.shape[0]
    dummy = coef
    while N > 0:
        tiles = cdiv(N, tile)
        emit_carry = tiles > 1
        if emit_carry:
            next_keys = new_output((2 * tiles,), keys, torch.int64)
            next_w = new_output((2 * tiles, D), keys, acc_dtype) if has_weight else dummy
            next_b = new_output((2 * tiles,), keys, acc_dtype) if has_bias else dummy
        else:
            next_keys = next_w = next_b = dummy
        launch[(tiles,)](
            keys, N,
            order if first_level else dummy, coef,
            partners if first_level else dummy,
            partners.stride(0) if first_level else 0,
            partner_table if first_level and has_weight else dummy,
            partner_table.stride(0) if first_level and has_weight else 0,
            partner_table.stride(1) if first_level and has_weight else 0,
            carry_w, carry_b,
            grad_w if has_weight else dummy, grad_b if has_bias else dummy,
            next_keys, next_w, next_b,
            D, n_rows, n_partner_rows,
            FIRST_LEVEL=first_level, HAS_WEIGHT=has_weight, HAS_BIAS=has_bias, EMIT_CARRY=emit_carry,
            ACC_DTYPE=tl_acc_dtype(acc_dtype), TILE=tile, BLOCK_D=block_d,
            num_warps=SEGMENT_WARPS,
        )
        if not emit_carry:
            return
        keys, carry_w, carry_b, N = next_keys, next_w, next_b, 2 * tiles
        first_level = False
