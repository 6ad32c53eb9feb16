"""The raw C++ ops in torch.ops.fastcore5_native (built from csrc/), one contract at a time.

GPU only (skipped without a CUDA device; scripts/gpu_check.sh builds the extension with
FASTCORE5_BUILD_CUDA=1 and runs them). What is checked here, below the Python op layer:
  * torch.library.opcheck on every op, the autograd ops included;
  * the autograd ops linear_relu and embedding_dot_bias (autograd in C++) against
    fastcore5.reference in float32 and float64, dense, sparse and deterministic;
  * bad EmbeddingDotBias indices: no exception and no device-side assert, NaN outputs for the
    bad samples, no gradient from them, the index_errors record (layout: csrc/fastcore5.h);
  * sgd_step's skip_flag and its CUDA-graph capture; allow_tf32 taken from the argument.
Their argument checks are tested in tests/test_cuda_op_errors.py.
"""
from __future__ import annotations

import pytest
import torch

from fastcore5 import index_errors, reference

from helpers import allow_tf32, cuda_ops, opcheck_embedding_dot_bias_ops

pytestmark = pytest.mark.gpu

# ---------------------------------------------------------------------------------------------
# Linear + ReLU
# ---------------------------------------------------------------------------------------------

def _linear(M, K, N, dtype, bias=True):
    x = torch.randn(M, K, dtype=dtype, device="cuda")
    w = torch.randn(N, K, dtype=dtype, device="cuda") / K**0.5
    b = torch.randn(N, dtype=dtype, device="cuda") if bias else None
    return x, w, b


def test_linear_relu_bias_only_backward():
    """Neither x nor weight given, only the bias gradient asked for (issue 11 item 2)."""
    ops = cuda_ops()
    x, w, b = _linear(37, 29, 23, torch.float32)
    out = ops.linear_relu_forward(x, w, b, False)
    grad_out = torch.randn_like(out)
    grad_x, grad_w, grad_b = ops.linear_relu_backward(grad_out, out, None, None, False, False, True, False)
    assert grad_x.shape == (0,) and grad_w.shape == (0,)
    exact = (grad_out.double() * (out > 0)).sum(0)
    torch.testing.assert_close(grad_b.double(), exact, rtol=1e-5, atol=1e-5)


def test_linear_relu_uses_the_allow_tf32_argument_not_the_global_flag():
    ops = cuda_ops()
    x, w, b = _linear(256, 2048, 256, torch.float32)
    exact = reference.linear_relu(x.double(), w.double(), b.double())
    with allow_tf32(True):
        ieee = ops.linear_relu_forward(x, w, b, False)
    # IEEE fp32 over K = 2048 stays near 1e-6 of the scale; TF32 (10-bit mantissa) is near 1e-3.
    assert (ieee.double() - exact).abs().max().item() <= 1e-4 * exact.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("M, K, N", [(1, 1, 1), (37, 29, 23), (129, 64, 8), (1000, 999, 97)])
def test_linear_relu_autograd_op_matches_reference(dtype, bias, M, K, N):
    ops = cuda_ops()
    x, w, b = _linear(M, K, N, dtype, bias)
    params = [t.requires_grad_() for t in (x, w, b) if t is not None]
    grad_out = torch.randn(M, N, dtype=dtype, device="cuda")
    out = ops.linear_relu(x, w, b, False)
    ours = (out, *torch.autograd.grad(out, params, grad_out))
    exact_params = [t.detach().double().requires_grad_() for t in params]
    exact_out = reference.linear_relu(*exact_params, *([] if bias else [None]))
    exact = (exact_out, *torch.autograd.grad(exact_out, exact_params, grad_out.double()))
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for o, e in zip(ours, exact):
        assert o.dtype == dtype
        torch.testing.assert_close(o.double(), e, **tol)


def test_linear_relu_autograd_op_computes_only_requested_grads():
    ops = cuda_ops()
    x, w, b = _linear(33, 17, 9, torch.float32)
    w.requires_grad_()
    out = ops.linear_relu(x, w, b, False)  # only weight requires grad
    out.backward(torch.randn_like(out))
    assert w.grad is not None and w.grad.shape == w.shape
    assert x.grad is None and b.grad is None
    with torch.inference_mode():
        torch.testing.assert_close(ops.linear_relu(x, w, b, False), out.detach())


def test_linear_relu_opcheck():
    ops = cuda_ops()
    x, w, b = _linear(19, 13, 11, torch.float32)
    torch.library.opcheck(ops.linear_relu_forward.default, (x, w, b, False))
    torch.library.opcheck(ops.linear_relu_forward.default, (x, w, None, True))
    out = ops.linear_relu_forward(x, w, b, False)
    grad_out = torch.randn_like(out)
    torch.library.opcheck(ops.linear_relu_backward.default, (grad_out, out, x, w, True, True, True, False))
    torch.library.opcheck(ops.linear_relu_backward.default, (grad_out, out, None, w, True, False, False, False))
    torch.library.opcheck(ops.linear_relu_backward.default, (grad_out, out, None, None, False, False, True, False))
    args = (x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_(), False)
    torch.library.opcheck(ops.linear_relu.default, args)


# ---------------------------------------------------------------------------------------------
# EmbeddingDotBias
# ---------------------------------------------------------------------------------------------

def _collab(n_users, n_items, D, B, dtype, bias_shape="column"):
    U = (torch.randn(n_users, D, device="cuda") * 0.3).to(dtype)
    V = (torch.randn(n_items, D, device="cuda") * 0.3).to(dtype)
    ub = torch.randn(n_users, 1, device="cuda").to(dtype)
    ib = torch.randn(n_items, 1, device="cuda").to(dtype)
    if bias_shape == "flat":
        ub, ib = ub.reshape(-1), ib.reshape(-1)
    users = torch.randint(0, n_users, (B,), device="cuda")
    items = torch.randint(0, n_items, (B,), device="cuda")
    users[: B // 2] = torch.randint(0, min(3, n_users), (B // 2,), device="cuda")  # heavily repeated rows
    return users, items, [U, V, ub, ib]


def _edb_autograd(ops, users, items, tables, grad_out, y_range, sparse, errors=None):
    params = [t.detach().clone().requires_grad_() for t in tables]
    lo, hi = y_range if y_range is not None else (None, None)
    out = ops.embedding_dot_bias(users, items, *params, lo, hi, sparse, errors)
    grads = torch.autograd.grad(out, params, grad_out)
    return out.detach(), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("y_range", [None, (0.0, 5.5)])
@pytest.mark.parametrize("mode", ["atomic", "deterministic", "sparse"])
@pytest.mark.parametrize("bias_shape", ["column", "flat"])
@pytest.mark.parametrize("D, B", [(64, 4099), (1, 7), (50, 1000)])
def test_embedding_dot_bias_autograd_op_matches_reference(dtype, y_range, mode, bias_shape, D, B):
    ops = cuda_ops()
    users, items, tables = _collab(301, 97, D, B, dtype, bias_shape)
    grad_out = torch.randn(B, dtype=dtype, device="cuda")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(mode == "deterministic")
    try:
        out, grads = _edb_autograd(ops, users, items, tables, grad_out, y_range, sparse=mode == "sparse")
    finally:
        torch.use_deterministic_algorithms(previous)
    exact_params = [t.detach().double().requires_grad_() for t in tables]
    exact_out = reference.embedding_dot_bias(users, items, *exact_params, y_range=y_range)
    exact = torch.autograd.grad(exact_out, exact_params, grad_out.double())
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.double(), exact_out.detach(), **tol)
    for g, e, t in zip(grads, exact, tables):
        assert g.is_sparse == (mode == "sparse") and g.shape == t.shape and g.dtype == dtype
        torch.testing.assert_close(g.to_dense().double(), e, **tol)


def _bad_batch():
    """Tables of 100 users and 80 items; samples 3, 5 and 9 have bad users, 5 and 11 bad items."""
    users, items, tables = _collab(100, 80, 16, 64, torch.float32)
    users[3], users[5], users[9] = 100, -3, 250
    items[5], items[11] = -1, 80
    return users, items, tables


def test_bad_indices_give_nan_outputs_and_the_index_errors_record():
    ops = cuda_ops()
    users, items, tables = _bad_batch()
    errors = torch.zeros(index_errors.SLOTS, dtype=torch.long, device="cuda")
    out = ops.embedding_dot_bias_forward(users, items, *tables, None, None, errors)
    torch.cuda.synchronize()  # a device-side assert or a fault would surface here
    bad = torch.zeros(64, dtype=torch.bool, device="cuda")
    bad[[3, 5, 9, 11]] = True
    assert out[bad].isnan().all()
    good = ~bad
    expected = reference.embedding_dot_bias(users[good], items[good], *tables)
    torch.testing.assert_close(out[good], expected, rtol=1e-5, atol=1e-5)
    # 3 bad users (-3, 100, 250) and 2 bad items (-1, 80).
    assert errors.tolist() == [5, 3, -3, 250, 100, 2, -1, 80, 80]
    ops.embedding_dot_bias_forward(users, items, *tables, None, None, errors)  # counts accumulate
    assert errors.tolist() == [10, 6, -3, 250, 100, 4, -1, 80, 80]
    items[:] = 0
    users[:] = 0
    clean = torch.zeros(index_errors.SLOTS, dtype=torch.long, device="cuda")
    ops.embedding_dot_bias_forward(users, items, *tables, 1.0, 5.0, clean)
    assert clean.tolist() == [0] * index_errors.SLOTS


@pytest.mark.parametrize("mode", ["atomic", "deterministic", "sparse"])
@pytest.mark.parametrize("y_range", [None, (1.0, 5.0)])
def test_bad_samples_contribute_no_gradient(mode, y_range):
    ops = cuda_ops()
    users, items, tables = _bad_batch()
    grad_out = torch.randn(64, device="cuda")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(mode == "deterministic")
    try:
        out, grads = _edb_autograd(ops, users, items, tables, grad_out, y_range, sparse=mode == "sparse")
        torch.cuda.synchronize()
    finally:
        torch.use_deterministic_algorithms(previous)
    good = torch.ones(64, dtype=torch.bool, device="cuda")
    good[[3, 5, 9, 11]] = False
    exact_params = [t.detach().double().requires_grad_() for t in tables]
    exact_out = reference.embedding_dot_bias(users[good], items[good], *exact_params, y_range=y_range)
    exact = torch.autograd.grad(exact_out, exact_params, grad_out[good].double())
    for g, e in zip(grads, exact):
        dense = g.to_dense().double()
        assert not dense.isnan().any()
        torch.testing.assert_close(dense, e, rtol=1e-5, atol=1e-5)
    if mode == "sparse":  # one entry per sample, indices clamped into range, bad values zero
        g_uw = grads[0]
        assert g_uw._indices().shape == (1, 64)
        assert int(g_uw._indices().min()) >= 0 and int(g_uw._indices().max()) < 100
        assert (g_uw._values()[~good] == 0).all()


def test_embedding_dot_bias_opcheck():
    ops = cuda_ops()
    users, items, tables = _collab(40, 30, 8, 50, torch.float32)
    errors = torch.zeros(index_errors.SLOTS, dtype=torch.long, device="cuda")
    opcheck_embedding_dot_bias_ops(ops, users, items, tables, errors)
    params = [t.clone().requires_grad_() for t in tables]
    torch.library.opcheck(ops.embedding_dot_bias.default, (users, items, *params, None, None, False, errors))
    torch.library.opcheck(ops.embedding_dot_bias.default, (users, items, *params, 0.0, 5.0, False, None))


# ---------------------------------------------------------------------------------------------
# SGD
# ---------------------------------------------------------------------------------------------

def _sgd_args(params, grads, buffers, skip_flag=None, found_inf=None, grad_scale=None):
    return (params, grads, buffers, None, 0.05, 0.9, 0.0, 1e-2, False, False, False, False, grad_scale, found_inf,
            skip_flag)


def _sgd_tensors():
    shapes = [(1,), (7,), (4099,), (33, 65), (3, 16384 + 5)]
    params = [torch.randn(s, device="cuda") for s in shapes]
    grads = [torch.randn(s, device="cuda") for s in shapes]
    buffers = [torch.randn(s, device="cuda") for s in shapes]
    return params, grads, buffers


@pytest.mark.parametrize("with_scaler", [False, True])
def test_sgd_step_skip_flag(with_scaler):
    ops = cuda_ops()
    params, grads, buffers = _sgd_tensors()
    scaler = dict(grad_scale=torch.tensor(4.0, device="cuda"), found_inf=torch.zeros(1, device="cuda")) if with_scaler else {}
    before = [t.clone() for t in (*params, *grads, *buffers)]
    skip = torch.zeros(index_errors.SLOTS, dtype=torch.long, device="cuda")
    skip[0] = 2  # what the EmbeddingDotBias forward writes for two bad indices
    ops.sgd_step(*_sgd_args(params, grads, buffers, skip_flag=skip, **scaler))
    for t, b in zip((*params, *grads, *buffers), before):
        assert torch.equal(t, b), "a flagged step must write nothing"
    skip.zero_()
    ops.sgd_step(*_sgd_args(params, grads, buffers, skip_flag=skip, **scaler))
    ref = [[t.clone() for t in before[k * 5:(k + 1) * 5]] for k in range(3)]
    ops.sgd_step(*_sgd_args(*ref, **scaler))
    for t, r in zip((*params, *grads, *buffers), (*ref[0], *ref[1], *ref[2])):
        torch.testing.assert_close(t, r, rtol=0, atol=0)
    assert not torch.equal(params[0], before[0])


def test_sgd_step_opcheck():
    ops = cuda_ops()
    params, grads, buffers = _sgd_tensors()
    skip = torch.zeros(index_errors.SLOTS, dtype=torch.long, device="cuda")
    torch.library.opcheck(ops.sgd_step.default, _sgd_args(params, grads, buffers, skip_flag=skip))
    torch.library.opcheck(ops.sgd_step.default, _sgd_args(params, grads, buffers))


def test_sgd_step_in_a_cuda_graph_replays_like_eager():
    """The metadata staging buffer must outlive the capture: every replay copies from it."""
    ops = cuda_ops()
    params, grads, buffers = _sgd_tensors()
    eager = [[t.clone() for t in group] for group in (params, grads, buffers)]
    skip = torch.zeros(index_errors.SLOTS, dtype=torch.long, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture, as torch.cuda.graph asks
        ops.sgd_step(*_sgd_args(*[[t.clone() for t in group] for group in (params, grads, buffers)], skip_flag=skip))
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.sgd_step(*_sgd_args(params, grads, buffers, skip_flag=skip))
    for _ in range(3):
        torch.randn(1 << 20, device="cuda")  # churn the allocators between replays
        graph.replay()
        ops.sgd_step(*_sgd_args(*eager, skip_flag=skip))
    torch.cuda.synchronize()
    for t, e in zip((*params, *buffers), (*eager[0], *eager[2])):
        torch.testing.assert_close(t, e, rtol=0, atol=0)
    skip[0] = 1
    frozen = [t.clone() for t in params]
    graph.replay()
    for t, f in zip(params, frozen):
        assert torch.equal(t, f), "the captured step must honour skip_flag at replay"


# ---------------------------------------------------------------------------------------------
# torch.compile over the autograd ops (the C++ Autograd kernel traced on fake tensors)
# ---------------------------------------------------------------------------------------------

def _grads_of(fn, inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_() if t.is_floating_point() else t for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, [t for t in leaves if t.requires_grad], grad_out)
    return out.detach(), grads


def test_autograd_ops_under_torch_compile_match_eager():
    ops = cuda_ops()
    x, w, b = _linear(64, 48, 32, torch.float32)

    def linear(x, w, b):
        return ops.linear_relu(x, w, b, False)

    grad_out = torch.randn(64, 32, device="cuda")
    eager = _grads_of(linear, (x, w, b), grad_out)
    compiled = _grads_of(torch.compile(linear, fullgraph=True), (x, w, b), grad_out)
    for e, c in zip((eager[0], *eager[1]), (compiled[0], *compiled[1])):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)

    users, items, tables = _collab(40, 30, 8, 50, torch.float32)

    def edb(U, V, ub, ib):
        return ops.embedding_dot_bias(users, items, U, V, ub, ib, 1.0, 5.0, False, None)

    grad_out = torch.randn(50, device="cuda")
    eager = _grads_of(edb, tables, grad_out)
    compiled = _grads_of(torch.compile(edb, fullgraph=True), tables, grad_out)
    for e, c in zip((eager[0], *eager[1]), (compiled[0], *compiled[1])):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)
