"""The C++ CPU kernels of EmbeddingDotBias (csrc/cpu/embedding_dot_bias.cpp, backend "cpu").

Every backend-independent test of tests/test_embedding_dot_bias.py runs here again on the cpu
backend (imported below: parity with the float64 reference for every dtype, strided tables and
indices, tiny batches, int32/int64, heavy duplicates, gradcheck, torch.compile, sparse gradients,
bad input). Added here: what only these kernels promise (bitwise identical results for 1 and 2
threads and from run to run, the index-error record filled in the forward's own pass, "sync"
validation without a min/max), opcheck of the raw ops on CPU tensors, prime and awkward sizes,
inductor, and the raw ops' argument errors.
"""
import pytest
import torch

import fastcore5
from fastcore5 import index_errors, reference

from helpers import (
    FASTAI_KEYS, deterministic_algorithms, fused_fwd_bwd, opcheck_embedding_dot_bias_ops, random_indices, random_tables,
    reference_fwd_bwd,
)
from native_cpu import require_cpu_kernel, threads
from test_embedding_dot_bias import (  # noqa: F401 (pytest collects the imported tests and fixture here)
    backward_path, check_compiles_fullgraph, test_bad_index_on_torch_backend_and_module,
    test_bad_input_names_the_argument, test_compiles_fullgraph, test_gradcheck, test_heavy_duplicates,
    test_int32_and_int64_indices_agree, test_matches_reference, test_sparse_gradients_match_nn_embedding,
    test_sparse_torch_backend_and_sparse_adam, test_strided_tables_indices_and_grad_out, test_tiny_batches,
    zipf_indices,
)

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU kernels' tests make CPU tensors only")


@pytest.fixture(autouse=True)
def cpu_backend():
    """Every test here runs the C++ CPU kernels (skipped while the source does not exist, failed
    when it exists but is not built)."""
    require_cpu_kernel("embedding_dot_bias")
    with fastcore5.use_backend("cpu"):
        yield


@pytest.fixture
def ops():
    return torch.ops.fastcore5_native


def with_threads(count, run):
    with threads(count):
        return run()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_bitwise_identical_for_any_thread_count_and_run(dtype, sparse):
    """The backward groups samples by row and adds them in batch order, whatever thread owns the
    row: 1 and 2 threads (and two runs) give the same bits. Sizes make every thread's range hold
    many rows and some rows hold hundreds of samples."""
    users, items = zipf_indices(3001, 20011), random_indices(2003, 20011, torch.int32)
    tables = random_tables(3001, 2003, 50, dtype)
    grad_out = torch.randn(20011, dtype=dtype)

    def run():
        out, grads = fused_fwd_bwd(users, items, tables, (0.0, 5.5), grad_out, sparse=sparse)
        return [out] + [g.coalesce().to_dense() if sparse else g for g in grads]

    one, two, two_again = with_threads(1, run), with_threads(2, run), with_threads(2, run)
    for name, a, b, c in zip(("output",) + FASTAI_KEYS, one, two, two_again):
        assert torch.equal(a, b) and torch.equal(b, c), name
    if sparse:  # coalescing a bf16 COO sums in bf16: its parity is tested on small batches
        return
    _, exact = reference_fwd_bwd(users, items, tables, (0.0, 5.5), grad_out)
    for grad, expected in zip(one[1:], exact):
        assert torch.isfinite(grad).all()
        torch.testing.assert_close(grad.double(), expected.reshape(grad.shape), atol=0.5 if dtype == torch.bfloat16 else 1e-3, rtol=0.02)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("D", [16, 50, 67])
def test_two_pass_forward_gives_the_one_pass_bits_for_any_thread_count(dtype, D):
    """fp32/fp64 rows and indices of one type take the two-pass forward (dots, then biases and
    y_range); mixed index types take the one-pass loop. Both give the same bits, with bad samples
    (NaN) among them, and the same bits for 1 and 2 threads."""
    users, items = random_indices(3001, 20011), random_indices(2003, 20011)
    users[[5, 7000]], items[[19000]] = torch.tensor([3001, -2]), 2003
    tables = random_tables(3001, 2003, D, dtype)
    ops = torch.ops.fastcore5_native

    def forward(users, items):
        return ops.embedding_dot_bias_forward(users, items, *tables, 0.0, 5.5, None)

    one, two = with_threads(1, lambda: forward(users, items)), with_threads(2, lambda: forward(users, items))
    one_pass = with_threads(2, lambda: forward(users, items.int()))
    assert torch.equal(one.isnan(), two.isnan()) and torch.equal(one.nan_to_num(), two.nan_to_num())
    assert torch.equal(one.nan_to_num(), one_pass.nan_to_num()) and one.isnan().sum() == 3
    assert torch.equal(with_threads(2, lambda: forward(users.int(), items.int())).nan_to_num(), one.nan_to_num())
    good = ~one.isnan()
    expected = reference.embedding_dot_bias(users[good], items[good], *[t.double() for t in tables], y_range=(0.0, 5.5))
    torch.testing.assert_close(one[good].double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("D", [1, 15, 16, 17, 50, 67])
@pytest.mark.parametrize("batch", [1, 2, 4099])
def test_prime_and_vector_edge_sizes_match_the_reference(D, batch):
    """Factor counts below, at and past one vector of lanes (16 fp32 on AVX-512, 8 on AVX2) and
    prime batches, over tables of prime row counts; both deterministic settings give the same."""
    users, items = random_indices(101, batch), random_indices(97, batch)
    users[: batch // 2] = 7  # a heavily repeated row
    tables = random_tables(101, 97, D, torch.float64)
    grad_out = torch.randn(batch, dtype=torch.float64)
    exact_out, exact = reference_fwd_bwd(users, items, tables, (1.0, 4.0), grad_out)
    for deterministic in (False, True):
        with deterministic_algorithms(deterministic):
            out, grads = fused_fwd_bwd(users, items, tables, (1.0, 4.0), grad_out)
        torch.testing.assert_close(out, exact_out, atol=1e-12, rtol=1e-12)
        for grad, expected in zip(grads, exact):
            torch.testing.assert_close(grad, expected, atol=1e-11, rtol=1e-11)


def test_untouched_rows_get_zero_gradients_and_large_tables_stay_dense():
    """Dense gradients keep PyTorch's semantics: every row present, zeros where no sample was."""
    users, items = torch.tensor([5, 5, 900]), torch.tensor([2, 1, 2])
    tables = random_tables(1000, 3, 8)
    _, grads = fused_fwd_bwd(users, items, tables, None, torch.ones(3))
    touched = torch.zeros(1000, dtype=torch.bool)
    touched[[5, 900]] = True
    assert (grads[0][~touched] == 0).all() and (grads[2][~touched] == 0).all()
    assert (grads[0][touched] != 0).any(dim=1).all()


def test_index_error_record_is_filled_by_the_forward_pass(ops):
    """Bad users -3, 100 and 250 and bad items -1 and 80 over tables of 100 and 80 rows: NaN for
    those samples, the record laid out as fastcore5/index_errors.py says, counts accumulating."""
    users, items = random_indices(100, 64), random_indices(80, 64)
    users[3], users[5], users[9] = 100, -3, 250
    items[5], items[11] = -1, 80
    tables = random_tables(100, 80, 16)
    errors = torch.zeros(index_errors.SLOTS, dtype=torch.long)
    out = ops.embedding_dot_bias_forward(users, items, *tables, None, None, errors)
    bad = torch.zeros(64, dtype=torch.bool)
    bad[[3, 5, 9, 11]] = True
    assert out[bad].isnan().all()
    expected = reference.embedding_dot_bias(users[~bad], items[~bad], *tables)
    torch.testing.assert_close(out[~bad], expected, rtol=1e-5, atol=1e-5)
    assert errors.tolist() == [5, 3, -3, 250, 100, 2, -1, 80, 80]
    ops.embedding_dot_bias_forward(users, items, *tables, None, None, errors)
    assert errors.tolist() == [10, 6, -3, 250, 100, 4, -1, 80, 80]


def test_sync_validation_reads_the_kernels_record_not_a_min_max(monkeypatch):
    """The default validation on CPU raises at once, with check_index_range's message, without the
    torch.aminmax pass over the indices that the other backends run first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the cpu backend must not run a separate min/max over the indices")

    monkeypatch.setattr(torch, "aminmax", refuse)
    tables = random_tables(5, 6, 3)
    users, items = random_indices(5, 8), random_indices(6, 8)
    fastcore5.embedding_dot_bias(users, items, *tables)
    users[4] = 5
    with pytest.raises(IndexError, match=r"users contains the index 5, out of range for u_weight with 5 rows"):
        fastcore5.embedding_dot_bias(users, items, *tables)
    items[2] = -4
    with pytest.raises(IndexError, match=r"users contains the index 5"):
        fastcore5.embedding_dot_bias(users, items, *tables)
    users[4] = 0
    with pytest.raises(IndexError, match=r"items contains the negative index -4; indices must lie in \[0, 6\)"):
        fastcore5.embedding_dot_bias(users, items, *tables)
    index_errors.raise_pending()  # "sync" leaves nothing for a later call


def test_empty_tables_and_batches(ops):
    u_weight, i_weight = torch.randn(0, 4), torch.randn(3, 4)
    u_bias, i_bias = torch.randn(0, 1), torch.randn(3, 1)
    empty = torch.zeros(0, dtype=torch.long)
    assert ops.embedding_dot_bias_forward(empty, empty, u_weight, i_weight, u_bias, i_bias, None, None, None).shape == (0,)
    grads = ops.embedding_dot_bias_backward(
        torch.randn(2), torch.tensor([0, 1]), torch.tensor([0, 1]), u_weight, i_weight, u_bias, i_bias, 0, 3,
        0.0, 1.0, True, True, True, True, False, False,
    )
    assert [tuple(g.shape) for g in grads] == [(0, 4), (3, 4), (0,), (3,)]
    assert all((g == 0).all() for g in grads)  # every sample has a bad user: no gradient anywhere


def test_opcheck(ops):
    users, items = random_indices(40, 50), random_indices(30, 50)
    opcheck_embedding_dot_bias_ops(ops, users, items, random_tables(40, 30, 8), torch.zeros(index_errors.SLOTS, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_y_range_gradient_from_the_output_near_lo_and_hi(dtype):
    """fp32/fp64 with a y_range: the backward forms d out / d score from the saved output,
    (out - lo)(hi - out) / (hi - lo). Scores spread over +-12 put outputs within a few ulps of lo
    and hi; the gradients' error against float64 stays within 2x (plus a small atol) of eager
    PyTorch's own error in the same dtype (eager's sigmoid backward also reads its output)."""
    users, items = random_indices(61, 3000), random_indices(47, 3000)
    tables = [t * 2.5 for t in random_tables(61, 47, 6, dtype)]
    grad_out = torch.randn(3000, dtype=dtype)
    y_range = (-1.0, 4.5)
    out, grads = fused_fwd_bwd(users, items, tables, y_range, grad_out)
    exact_out, exact = reference_fwd_bwd(users, items, tables, y_range, grad_out)
    assert ((exact_out - y_range[0]).abs() < 1e-4).any() and ((y_range[1] - exact_out).abs() < 1e-4).any()
    eager_tables = [t.detach().clone().requires_grad_() for t in tables]
    reference.embedding_dot_bias(users, items, *eager_tables, y_range=y_range).backward(grad_out)
    atol = 1e-5 if dtype == torch.float32 else 1e-12
    for name, grad, eager, expected in zip(FASTAI_KEYS, grads, [t.grad for t in eager_tables], exact):
        expected = expected.reshape(grad.shape)
        eager_error = (eager.double() - expected).abs().max().item()
        assert (grad.double() - expected).abs().max().item() <= 2 * eager_error + atol, name


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_bad_samples_score_nan_and_give_no_gradient_with_a_y_range(dtype, sparse):
    """A bad sample's output is NaN, and the coefficient formed from it is NaN too: the backward
    kernel must still leave that sample out of every gradient."""
    users, items = random_indices(9, 40), random_indices(11, 40)
    users[[3, 17]] = torch.tensor([9, -1])
    items[25] = 11
    good = torch.ones(40, dtype=torch.bool)
    good[[3, 17, 25]] = False
    tables = random_tables(9, 11, 5, dtype)
    grad_out = torch.randn(40, dtype=dtype)
    out, grads = fused_fwd_bwd(users, items, tables, (0.0, 5.5), grad_out, sparse=sparse, validate="off")
    assert out[~good].isnan().all() and not out[good].isnan().any()
    _, exact = reference_fwd_bwd(users[good], items[good], tables, (0.0, 5.5), grad_out[good])
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
    for grad, expected in zip(grads, exact):
        grad = grad.to_dense() if sparse else grad
        torch.testing.assert_close(grad.double(), expected.reshape(grad.shape), **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_modifying_the_output_in_place_before_backward_raises(dtype):
    """With a y_range the backward reads the saved output (as torch.sigmoid's does), so changing
    it in place raises autograd's version-counter error instead of giving wrong gradients."""
    users, items = random_indices(5, 12), random_indices(6, 12)
    tables = random_tables(5, 6, 4, dtype, requires_grad=True)
    out = fastcore5.embedding_dot_bias(users, items, *tables, y_range=(0.0, 5.5))
    out.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
    out = fastcore5.embedding_dot_bias(users, items, *tables)  # no y_range: the output is not saved
    out.mul_(2.0)
    out.sum().backward()


def test_opcheck_of_the_autograd_op():
    """opcheck of fastcore5_native::embedding_dot_bias itself (its autograd kernel in C++, the
    y_range derivative from the saved output for fp32/fp64, from the score for bf16)."""
    users, items = random_indices(40, 50), random_indices(30, 50, torch.int32)
    op = torch.ops.fastcore5_native.embedding_dot_bias.default
    for dtype, y_range in ((torch.float64, (0.5, 4.5)), (torch.float32, (0.0, 5.5)), (torch.float32, (None, None)),
                           (torch.bfloat16, (0.0, 5.5))):
        for sparse in (False, True):
            tables = random_tables(40, 30, 8, dtype, requires_grad=True)
            torch.library.opcheck(op, (users, items, *tables, *y_range, sparse, None))


def test_compiles_fullgraph_with_inductor():
    """Inductor on CPU around the C++ ops: the compiled step gives the eager step's bits."""
    check_compiles_fullgraph("inductor", exact=True)


# (expected exception, message, call) on the raw ops with CPU tensors: U/V tables of 10 and 8 rows,
# D = 4, and 6 samples; each names the argument, none crashes.
RAW_BAD_CALLS = {
    "users float": (TypeError, "users has dtype", lambda o, a: o.embedding_dot_bias_forward(a["users"].float(), *a["rest"])),
    "users 2-D": (ValueError, "users must have 1 dimensions", lambda o, a: o.embedding_dot_bias_forward(a["users"][None], *a["rest"])),
    "users int16": (TypeError, "users has dtype Short; expected int32 or int64", lambda o, a: o.embedding_dot_bias_forward(a["users"].short(), *a["rest"])),
    "table dtype": (TypeError, "i_weight has dtype", lambda o, a: o.embedding_dot_bias_forward(a["users"], a["items"], a["U"], a["V"].double(), a["ub"], a["ib"], None, None, None)),
    "bias rows": (ValueError, "u_bias has 9 rows", lambda o, a: o.embedding_dot_bias_forward(a["users"], a["items"], a["U"], a["V"], a["ub"][:9], a["ib"], None, None, None)),
    "half range": (ValueError, "y_lo and y_hi", lambda o, a: o.embedding_dot_bias_forward(a["users"], a["items"], a["U"], a["V"], a["ub"], a["ib"], 0.0, None, None)),
    "errors shape": (ValueError, "index_errors must be a contiguous", lambda o, a: o.embedding_dot_bias_forward(*a["all"], None, None, torch.zeros(4, dtype=torch.long))),
    "bwd lengths": (ValueError, "one entry per sample", lambda o, a: o.embedding_dot_bias_backward(torch.randn(5), a["users"], a["items"], a["U"], a["V"], a["ub"], a["ib"], 10, 8, None, None, True, True, True, True, False, False)),
    "bwd partner missing": (ValueError, "i_weight is needed", lambda o, a: o.embedding_dot_bias_backward(torch.randn(6), a["users"], a["items"], a["U"], None, a["ub"], a["ib"], 10, 8, None, None, True, False, False, False, False, False)),
    "bwd num_users": (ValueError, "u_weight has 10 rows but num_users is 11", lambda o, a: o.embedding_dot_bias_backward(torch.randn(6), a["users"], a["items"], a["U"], a["V"], a["ub"], a["ib"], 11, 8, None, None, True, True, True, True, False, False)),
    "bwd range tables": (ValueError, "all four tables", lambda o, a: o.embedding_dot_bias_backward(torch.randn(6), a["users"], a["items"], a["U"], a["V"], None, a["ib"], 10, 8, 0.0, 5.0, True, True, False, True, False, False)),
}


def raw_bad_call_arguments():
    """The tables and indices RAW_BAD_CALLS take: 10 users, 8 items, D = 4, 6 samples."""
    U, V, ub, ib = random_tables(10, 8, 4)
    users, items = random_indices(10, 6), random_indices(8, 6)
    return {"users": users, "items": items, "U": U, "V": V, "ub": ub, "ib": ib,
            "rest": (items, U, V, ub, ib, None, None, None), "all": (users, items, U, V, ub, ib)}


@pytest.mark.parametrize("case", RAW_BAD_CALLS.values(), ids=RAW_BAD_CALLS.keys())
def test_raw_op_errors_name_the_argument(ops, case):
    error, message, call = case
    with pytest.raises(error, match=message):
        call(ops, raw_bad_call_arguments())


def _good_raw_calls(ops, n_users, n_items, D, batch, index_dtype, y_range, sparse, bad_indices):
    """Forward, then backward with every gradient, on the raw ops; ``bad_indices`` puts indices
    below 0 and past the tables into the batch (their samples score NaN, no row is read)."""
    U, V, ub, ib = random_tables(n_users, n_items, D)
    # An empty table makes every index out of range: index 0 is drawn then.
    users, items = random_indices(max(n_users, 1), batch, index_dtype), random_indices(max(n_items, 1), batch, index_dtype)
    if bad_indices and batch:
        users[0], items[-1] = n_users, -1
    y_lo, y_hi = y_range if y_range else (None, None)
    errors = torch.zeros(index_errors.SLOTS, dtype=torch.long)
    ops.embedding_dot_bias_forward(users, items, U, V, ub, ib, y_lo, y_hi, errors)
    ops.embedding_dot_bias_backward(
        torch.randn(batch), users, items, U, V, ub, ib, n_users, n_items, y_lo, y_hi, True, True, True, True, False, sparse
    )
    # The autograd op, whose backward forms the y_range coefficient from the output (NaN for the
    # bad samples) and passes it to the backward kernel.
    tables = [t.requires_grad_() for t in (U, V, ub, ib)]
    ops.embedding_dot_bias(users, items, *tables, y_lo, y_hi, sparse, None).backward(torch.randn(batch))


# What tests/test_cpu_asan.py runs against the AddressSanitizer build: every raw bad call, and good
# calls whose vector tails, empty tables, one-sample batches and out-of-range indices reach every
# load and store of the forward and of both backward layouts; the 5000-row table's gradient
# (1.2 MiB) comes from the output cache (csrc/output_buffers.cpp), a freed one again on reuse.
ASAN_CALLS = [
    (f"bad: {name}", error, lambda ops, call=call: call(ops, raw_bad_call_arguments()))
    for name, (error, _, call) in RAW_BAD_CALLS.items()
] + [
    (f"good: {sizes} {index_dtype} y_range={y_range} sparse={sparse} bad_indices={bad}", None,
     lambda ops, a=(*sizes, index_dtype, y_range, sparse, bad): _good_raw_calls(ops, *a))
    for sizes in [(1, 1, 1, 1), (3, 4, 2, 0), (0, 3, 4, 2), (13, 7, 17, 4099), (5, 11, 67, 33), (5000, 7, 64, 257)]
    for index_dtype in (torch.int32, torch.int64)
    for y_range in (None, (0.0, 5.5))
    for sparse in (False, True)
    for bad in (False, True)
]
