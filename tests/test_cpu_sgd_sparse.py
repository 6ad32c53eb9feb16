"""The C++ CPU step of sparse gradients (csrc/cpu/sgd_sparse.cpp, op sgd_sparse_step, reached by
fastcore5.optim.SGD through fastcore5.ops.sgd_sparse.SparseGradStep on the cpu backend):
trajectories against torch.optim.SGD (repeated indices, rows absent for several steps, the first
step, every option torch allows for sparse gradients), float64 and the low-precision parity rule,
bitwise equality for 1 and 2 threads, the skip protocol, opcheck and the named errors."""
from __future__ import annotations

import pytest
import torch

import fastcore5
from fastcore5.ops import sgd_sparse
from fastcore5.optim import SGD

from native_cpu import require_cpu_kernel, threads

F64 = torch.float64

CONFIGS = {
    "plain": dict(lr=0.1),
    "maximize": dict(lr=0.1, maximize=True),
    "momentum": dict(lr=0.1, momentum=0.9),
    "dampening": dict(lr=0.1, momentum=0.9, dampening=0.3),
    "nesterov": dict(lr=0.1, momentum=0.9, nesterov=True),
    "maximize_momentum": dict(lr=0.1, momentum=0.5, maximize=True),
    "tensor_lr": dict(lr=torch.tensor(0.05, dtype=F64), momentum=0.9),
}


@pytest.fixture(autouse=True)
def cpu_kernel():
    return require_cpu_kernel("sgd")


@pytest.fixture
def native_calls(monkeypatch):
    """How many times the C++ op ran (a list holding the count), for tests that must reach it."""
    calls = [0]
    native = sgd_sparse._native_sparse_step()

    def counted(*args):
        calls[0] += 1
        return native(*args)

    monkeypatch.setattr(sgd_sparse, "_native_sparse_step", lambda: counted)
    return calls


def sparse_grad(rows, values, shape):
    """An uncoalesced COO gradient, one entry per lookup (as nn.Embedding(sparse=True) gives)."""
    return torch.sparse_coo_tensor(rows[None], values, shape, check_invariants=True)


def lookups(step: int, n_rows: int, nnz: int):
    """The rows a step's gradient holds: the first three steps only rows 0-2, heavily repeated
    (every other row is absent for three steps, its buffer decaying), then any row."""
    return torch.randint(0, 3 if step < 3 else n_rows, (nnz,))


def run_pair(shapes, config, dtype, steps=6, nnz=40, ours_backend="cpu", theirs=None):
    """``steps`` steps of fastcore5.optim.SGD on ``ours_backend`` and of ``theirs`` (default
    torch.optim.SGD) on twin params fed the same sparse gradients; the two sets of params and
    their optimizers."""
    ours = [torch.randn(s, dtype=dtype) for s in shapes]
    twins = [p.clone() for p in ours]
    ours = [p.requires_grad_() for p in ours]
    twins = [p.requires_grad_() for p in twins]
    our_opt = SGD(ours, **config)
    their_opt = (theirs or torch.optim.SGD)(twins, **config)
    for step in range(steps):
        for p, q in zip(ours, twins):
            rows = lookups(step, p.shape[0], nnz)
            values = torch.randn(nnz, *p.shape[1:], dtype=dtype)
            p.grad, q.grad = sparse_grad(rows, values, p.shape), sparse_grad(rows, values.clone(), p.shape)
        with fastcore5.use_backend(ours_backend):
            our_opt.step()
        their_opt.step()
    return ours, twins, our_opt, their_opt


# Rows of 1 (a bias), 5, 17 (not a multiple of a vector) and 40 elements; a 3-D table.
SHAPES = [(11, 1), (13, 5), (9, 17), (7, 40), (6, 2, 3)]


@pytest.mark.parametrize("config", list(CONFIGS))
def test_float64_trajectory_matches_torch_sgd(config, native_calls):
    ours, theirs, our_opt, their_opt = run_pair(SHAPES, CONFIGS[config], F64)
    assert native_calls[0] == 6
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-12)
        if "momentum" in CONFIGS[config]:
            torch.testing.assert_close(
                our_opt.state[p]["momentum_buffer"], their_opt.state[q]["momentum_buffer"].to_dense(), rtol=0, atol=1e-12,
            )


def test_without_momentum_rows_never_looked_up_stay_bitwise_unchanged(native_calls):
    p = torch.randn(50, 8, requires_grad=True)
    before = p.detach().clone()
    opt = SGD([p], lr=0.1)
    for _ in range(3):
        p.grad = sparse_grad(torch.randint(0, 10, (30,)), torch.randn(30, 8), p.shape)
        opt.step()
    assert native_calls[0] == 3
    assert torch.equal(p.detach()[10:], before[10:])
    assert not torch.equal(p.detach()[:10], before[:10])


LOW_PRECISION = [(dtype, config) for dtype in (torch.float32, torch.bfloat16) for config in ("plain", "momentum", "nesterov")]


@pytest.mark.parametrize("dtype, config", LOW_PRECISION + [(torch.float16, "plain")])
def test_low_precision_error_is_within_twice_torchs(dtype, config, native_calls):
    """The parity rule: against torch.optim.SGD in float64 on the same gradients, our error is at
    most 2x torch's own in ``dtype`` (plus a small atol). (torch cannot add fp16 sparse tensors,
    so it has no fp16 momentum step to compare with.)"""
    torch.manual_seed(7)
    ours, theirs, _, _ = run_pair(SHAPES, CONFIGS[config], dtype)
    torch.manual_seed(7)
    exact, _, _, _ = run_pair(SHAPES, CONFIGS[config], F64, ours_backend="torch")
    torch.manual_seed(7)
    _, torch_low, _, _ = run_pair(SHAPES, CONFIGS[config], dtype, ours_backend="torch")
    atol = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    for p, q, e in zip(ours, torch_low, exact):
        our_error = (p.detach().double() - e.detach()).abs().max().item()
        torch_error = (q.detach().double() - e.detach()).abs().max().item()
        assert our_error <= 2 * torch_error + atol, (our_error, torch_error)


@pytest.mark.parametrize("config", ["plain", "momentum"])
def test_decoupled_weight_decay_matches_the_reference_backend(config, native_calls):
    """Decoupled decay (fastcore5's extra; torch has none) scales every row: the cpu op against the
    reference path of the same optimizer."""
    decayed = dict(CONFIGS[config], weight_decay=0.05, decoupled_weight_decay=True)
    torch.manual_seed(3)
    ours, _, _, _ = run_pair(SHAPES, decayed, F64, theirs=SGD)
    torch.manual_seed(3)
    reference, _, _, _ = run_pair(SHAPES, decayed, F64, ours_backend="torch", theirs=SGD)
    for p, q in zip(ours, reference):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_identical_for_one_and_two_threads(dtype, momentum, cpu_kernel):
    """Large enough to split across threads: 5000 rows of 50 make five blocks of 1024 rows (fp32
    sums), looked up 40000 times, so every row holds several duplicates."""
    table = torch.randn(5000, 50).to(dtype)
    rows = torch.randint(0, 5000, (40000,))
    values = torch.randn(40000, 50).to(dtype)
    buffer = torch.randn(5000, 50).to(dtype)
    results = []
    for n in (1, 2, 1):
        p, buf = table.clone(), buffer.clone()
        with threads(n):
            for first in (True, False):
                cpu_kernel.sgd_sparse_step([p], [rows], [values], [buf] if momentum else [], None, 0.1, momentum, 0.0,
                                           0.0, False, False, False, first, None, None, None)
        results.append((p, buf))
    for p, buf in results[1:]:
        assert torch.equal(p, results[0][0]) and torch.equal(buf, results[0][1])


def test_a_table_much_larger_than_the_batch(native_calls):
    """Most blocks of rows hold no entry; with momentum they still move by their buffers."""
    ours, theirs, _, _ = run_pair([(5000, 3), (70000, 1)], CONFIGS["momentum"], F64, nnz=20)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("config", ["plain", "momentum", "nesterov"])
def test_an_empty_gradient_after_a_full_one(config, native_calls):
    p = torch.randn(9, 4, dtype=F64, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    ours, theirs = SGD([p], **CONFIGS[config]), torch.optim.SGD([q], **CONFIGS[config])
    for rows in (torch.tensor([1, 1, 4]), torch.tensor([], dtype=torch.int64)):
        values = torch.randn(len(rows), 4, dtype=F64)
        p.grad, q.grad = sparse_grad(rows, values, (9, 4)), sparse_grad(rows, values.clone(), (9, 4))
        ours.step()
        theirs.step()
    assert native_calls[0] == 2
    torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-14)


def test_a_sparse_gradient_over_two_dimensions_takes_the_reference(native_calls):
    ours, theirs, _, _ = run_pair([(6, 4)], CONFIGS["momentum"], F64, steps=1)
    p = torch.randn(6, 4, dtype=F64, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    grad = torch.randn(6, 4, dtype=F64).to_sparse()  # sparse_dim 2
    p.grad, q.grad = grad, grad.clone()
    SGD([p], lr=0.1, momentum=0.9).step()
    torch.optim.SGD([q], lr=0.1, momentum=0.9).step()
    torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-14)
    assert native_calls[0] == 1  # run_pair's one step; the two-dimensional gradient did not reach the op


def _op_args(momentum=0.9, first_step=False, **changes):
    params = [torch.randn(7, 3), torch.randn(4)]
    args = dict(
        params=params, indices=[torch.tensor([0, 6, 6, 2]), torch.tensor([3, 3])],
        values=[torch.randn(4, 3), torch.randn(2)], momentum_buffers=[torch.randn_like(p) for p in params],
        lr_tensor=None, lr=0.1, momentum=momentum, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
        decoupled_weight_decay=False, first_step=first_step, grad_scale=None, found_inf=None, skip_flag=None,
    )
    args.update(changes)
    return args


@pytest.mark.parametrize("first_step", [True, False], ids=["first_step", "running"])
def test_opcheck(first_step, cpu_kernel):
    args = _op_args(first_step=first_step, lr_tensor=None if first_step else torch.tensor(0.2),
                    grad_scale=torch.tensor(4.0), found_inf=torch.tensor(0.0), skip_flag=torch.zeros(9, dtype=torch.int64),
                    weight_decay=0.01, decoupled_weight_decay=True)
    torch.library.opcheck(cpu_kernel.sgd_sparse_step.default, tuple(args.values()))


def test_grad_scale_divides_the_row_sums_and_leaves_the_values(cpu_kernel):
    scaled = _op_args(grad_scale=torch.tensor(8.0))
    plain = _op_args()
    for key in ("params", "values", "momentum_buffers"):
        plain[key] = [t.clone() for t in scaled[key]]
    plain["values"] = [v / 8 for v in scaled["values"]]
    values_before = [v.clone() for v in scaled["values"]]
    cpu_kernel.sgd_sparse_step(**scaled)
    cpu_kernel.sgd_sparse_step(**plain)
    for key in ("params", "momentum_buffers"):
        assert all(torch.equal(a, b) for a, b in zip(scaled[key], plain[key]))
    assert all(torch.equal(a, b) for a, b in zip(scaled["values"], values_before))


@pytest.mark.parametrize("flag", ["found_inf", "skip_flag"])
def test_a_raised_flag_writes_nothing_even_with_a_bad_index(flag, cpu_kernel):
    value = torch.tensor(1.0) if flag == "found_inf" else torch.tensor([1, 0], dtype=torch.int64)
    args = _op_args(**{flag: value}, indices=[torch.tensor([0, 60, 6, 2]), torch.tensor([3, 3])])
    before = [t.clone() for t in args["params"] + args["momentum_buffers"]]
    cpu_kernel.sgd_sparse_step(**args)
    assert all(torch.equal(a, b) for a, b in zip(args["params"] + args["momentum_buffers"], before))


@pytest.mark.parametrize("bad", [7, -1])
def test_an_out_of_range_index_is_an_index_error_before_any_write(bad, cpu_kernel):
    """The bad index is in the second param: the first is not written either."""
    args = _op_args(indices=[torch.tensor([0, 6, 6, 2]), torch.tensor([3, bad])])
    args["params"][1] = torch.randn(7)  # 7 rows: index 7 is one past the end
    args["momentum_buffers"][1] = torch.randn(7)
    before = [t.clone() for t in args["params"] + args["momentum_buffers"]]
    with pytest.raises(IndexError, match=rf"indices\[1\] holds {bad} at position 1, outside the 7 rows of params\[1\]"):
        cpu_kernel.sgd_sparse_step(**args)
    assert all(torch.equal(a, b) for a, b in zip(args["params"] + args["momentum_buffers"], before))


def test_the_optimizer_refuses_a_bad_index_naming_it_and_changes_nothing(native_calls):
    good = torch.randn(5, 2, requires_grad=True)
    bad = torch.randn(5, 2, requires_grad=True)
    before = [good.detach().clone(), bad.detach().clone()]
    opt = SGD([good, bad], lr=0.1, momentum=0.9)
    good.grad = sparse_grad(torch.tensor([1, 1]), torch.randn(2, 2), (5, 2))
    bad.grad = torch.sparse_coo_tensor(torch.tensor([[0, 5]]), torch.randn(2, 2), (5, 2), check_invariants=False)
    with pytest.raises(IndexError, match=r"the sparse \.grad of param 1 of param group 0 holds an index outside its rows: "
                                          r".*indices\[1\] holds 5"):
        opt.step()
    assert torch.equal(good.detach(), before[0]) and torch.equal(bad.detach(), before[1])


BAD_ARGUMENTS = {
    "L2 weight decay": (dict(weight_decay=0.1), ValueError, r"weight_decay=0\.1.*torch\.optim\.SGD refuses this too"),
    "int32 indices": (dict(indices=[torch.tensor([0, 6, 6, 2], dtype=torch.int32), torch.tensor([3, 3])]), TypeError,
                      r"indices\[0\] has dtype Int; expected int64"),
    "2-D indices": (dict(indices=[torch.tensor([[0, 6, 6, 2]]), torch.tensor([3, 3])]), ValueError,
                    r"indices\[0\] must have 1 dimensions"),
    "values of another width": (dict(values=[torch.randn(4, 2), torch.randn(2)]), ValueError,
                                r"values\[0\] must have shape \[4, 3\]"),
    "values of another dtype": (dict(values=[torch.randn(4, 3, dtype=F64), torch.randn(2)]), TypeError,
                                r"values\[0\] has dtype Double but params\[0\] has dtype Float"),
    "no momentum buffers": (dict(momentum_buffers=[]), ValueError, r"got 2 params but 0 momentum_buffers"),
    "a buffer of another shape": (dict(momentum_buffers=[torch.randn(7, 3), torch.randn(5)]), ValueError,
                                  r"momentum_buffers\[1\] must be contiguous with the shape of params\[1\]"),
    "a transposed param": (dict(params=[torch.randn(3, 7).t(), torch.randn(4)]), ValueError,
                           r"params\[0\] must be contiguous"),
    "an integer param": (dict(params=[torch.zeros(7, 3, dtype=torch.int64), torch.randn(4)]), TypeError,
                         r"params\[0\] has dtype Long"),
    "a zero-dimensional param": (dict(params=[torch.tensor(1.0), torch.randn(4)]), ValueError,
                                 r"params\[0\] must be contiguous with at least one dimension"),
    "fewer values than params": (dict(values=[torch.randn(4, 3)]), ValueError, r"got 2 params but 2 indices and 1 values"),
    "a two-element lr_tensor": (dict(lr_tensor=torch.ones(2)), ValueError, r"lr_tensor must have exactly one element"),
    "a float skip_flag": (dict(skip_flag=torch.zeros(1)), TypeError, r"skip_flag has dtype Float; expected int64"),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_arguments_raise_named_errors_and_write_nothing(case, cpu_kernel):
    changes, error, message = BAD_ARGUMENTS[case]
    args = _op_args(**changes)
    before = [t.clone() for t in args["params"] + args["momentum_buffers"]]
    with pytest.raises(error, match=message):
        cpu_kernel.sgd_sparse_step(**args)
    assert all(torch.equal(a, b) for a, b in zip(args["params"] + args["momentum_buffers"], before))


def test_embedding_dot_bias_sparse_training_matches_torch_sgd(native_calls):
    """The job it is for: EmbeddingDotBias with sparse gradients, momentum, three steps."""
    counts = (40, 30)
    ours = fastcore5.nn.EmbeddingDotBias(10, *counts, sparse=True).double()
    theirs = fastcore5.nn.EmbeddingDotBias(10, *counts, sparse=True).double()
    theirs.load_state_dict(ours.state_dict())
    our_opt, their_opt = SGD(ours.parameters(), lr=0.1, momentum=0.9), torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        batch = torch.stack([torch.randint(0, counts[0], (64,)), torch.randint(0, counts[1], (64,))], 1)
        target = torch.randn(64, dtype=F64)
        for model, opt in ((ours, our_opt), (theirs, their_opt)):
            opt.zero_grad()
            ((model(batch) - target) ** 2).mean().backward()
            opt.step()
    assert native_calls[0] == 3
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-12, msg=name)


def _asan_good_call(rows, D, nnz, dtype, momentum, decoupled=False):
    """A valid call on awkward sizes, for tests/test_cpu_asan.py."""
    def call(ops):
        p = torch.randn(rows, D).to(dtype)
        index = torch.randint(0, rows, (nnz,)) if rows else torch.empty(0, dtype=torch.int64)
        buffers = [torch.randn(rows, D).to(dtype)] if momentum else []
        ops.sgd_sparse_step([p], [index], [torch.randn(nnz, D).to(dtype)], buffers, None, 0.1, momentum, 0.0,
                            0.01 if decoupled else 0.0, False, False, decoupled, False, None, None, None)
    return call


# Run under AddressSanitizer by tests/test_cpu_asan.py: every refused call, and valid ones whose
# last block of rows, last vector of a row or bucket are partial.
ASAN_CALLS = [
    (f"sgd_sparse_step: {case}", error, lambda ops, changes=changes: ops.sgd_sparse_step(**_op_args(**changes)))
    for case, (changes, error, _) in BAD_ARGUMENTS.items()
] + [
    ("sgd_sparse_step: index past the end", IndexError,
     lambda ops: ops.sgd_sparse_step(**_op_args(indices=[torch.tensor([0, 7, 6, 2]), torch.tensor([3, 3])]))),
    ("sgd_sparse_step: negative index", IndexError,
     lambda ops: ops.sgd_sparse_step(**_op_args(indices=[torch.tensor([0, 6, 6, -1]), torch.tensor([3, 3])]))),
] + [
    (f"sgd_sparse_step: {rows}x{D}, {nnz} entries, {dtype}, momentum {momentum}, decoupled {decoupled}", None,
     _asan_good_call(rows, D, nnz, dtype, momentum, decoupled))
    for rows, D, nnz, dtype, momentum, decoupled in [
        (3001, 50, 5000, torch.float32, 0.0, False), (3001, 50, 5000, torch.float32, 0.9, False),
        (13, 17, 40, torch.bfloat16, 0.9, False), (13, 17, 40, torch.float16, 0.0, True),
        (40000, 1, 700, torch.float64, 0.9, False), (7, 5, 0, torch.float32, 0.9, False),
        (0, 3, 0, torch.float32, 0.9, False),
    ]
]
