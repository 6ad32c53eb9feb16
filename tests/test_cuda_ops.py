"""The raw C++ ops in torch.ops.fastcore5_cuda (built from csrc/), one contract at a time.

GPU only (skipped without a CUDA device; scripts/gpu_check.sh builds the extension with
FASTCORE5_BUILD_CUDA=1 and runs them). What is checked here, below the Python op layer:
  * every argument check raises its named Python exception (TypeError, ValueError, RuntimeError)
    and leaves the process and the CUDA context usable: the H200 run of commit f02c316 crashed
    the process instead (issue 11). The bad calls run in a child process, so a crash fails one
    test, names the case it died in, and cannot take the test worker down with it;
  * torch.library.opcheck on every op, the autograd ops included;
  * the autograd ops linear_relu and embedding_dot_bias (autograd in C++) against
    fastcore5.reference in float32 and float64, dense, sparse and deterministic;
  * bad EmbeddingDotBias indices: no exception and no device-side assert, NaN outputs for the
    bad samples, no gradient from them, the index_errors record (layout: csrc/fastcore5.h);
  * sgd_step's skip_flag and its CUDA-graph capture; allow_tf32 taken from the argument.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fastcore5 import backends, reference

from helpers import allow_tf32

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parent.parent
INDEX_ERROR_SLOTS = 9


def cuda_ops():
    assert backends.cuda_extension() is not None, (
        "fastcore5._C is not built: FASTCORE5_BUILD_CUDA=1 pip install --no-deps --no-build-isolation -e ."
    )
    return torch.ops.fastcore5_cuda


# ---------------------------------------------------------------------------------------------
# Bad input: the named exception, and the process goes on
# ---------------------------------------------------------------------------------------------

# (case, expected exception, message pattern, Python expression of the call). The expressions run
# in the child with: ops, torch, x/w/b (4x3 -> 2 Linear, float32), out/g (its output and a
# gradient), U/V/ub/ib (tables of 10 and 8 rows, D = 4), users/items (6 samples), p (10 floats).
BAD_CALLS = [
    ("lr_fwd x on cpu", "RuntimeError", "x must be a CUDA tensor", "ops.linear_relu_forward(x.cpu(), w, b, False)"),
    ("lr_fwd x int", "TypeError", "x has dtype", "ops.linear_relu_forward(x.int(), w, b, False)"),
    ("lr_fwd weight dtype", "TypeError", "weight has dtype", "ops.linear_relu_forward(x, w.double(), b, False)"),
    ("lr_fwd x 3-D", "ValueError", "x must have 2 dimensions", "ops.linear_relu_forward(x[None], w, b, False)"),
    ("lr_fwd in_features", "ValueError", "x has 3 features", "ops.linear_relu_forward(x, torch.randn(2, 5, device='cuda'), None, False)"),
    ("lr_fwd bias size", "ValueError", "bias has 3 elements", "ops.linear_relu_forward(x, w, torch.randn(3, device='cuda'), False)"),
    ("lr_fwd bias 2-D", "ValueError", "bias must have 1 dimensions", "ops.linear_relu_forward(x, w, b[None], False)"),
    ("lr_fwd bias dtype", "TypeError", "bias has dtype", "ops.linear_relu_forward(x, w, b.half(), False)"),
    ("lr_bwd out on cpu", "RuntimeError", "out must be a CUDA tensor", "ops.linear_relu_backward(g, out.cpu(), x, w, True, True, True, False)"),
    ("lr_bwd grad_out dtype", "TypeError", "grad_out has dtype", "ops.linear_relu_backward(g.double(), out, x, w, True, True, True, False)"),
    ("lr_bwd grad_out shape", "ValueError", "grad_out has shape", "ops.linear_relu_backward(g[:3], out, x, w, True, True, True, False)"),
    ("lr_bwd no weight", "ValueError", "weight is needed", "ops.linear_relu_backward(g, out, x, None, True, False, False, False)"),
    ("lr_bwd no x", "ValueError", "x is needed", "ops.linear_relu_backward(g, out, None, w, False, True, False, False)"),
    ("lr_bwd x rows", "ValueError", "x has 5 rows", "ops.linear_relu_backward(g, out, torch.randn(5, 3, device='cuda'), w, True, True, True, False)"),
    ("lr_bwd weight rows", "ValueError", "weight has 7 rows", "ops.linear_relu_backward(g, out, x, torch.randn(7, 3, device='cuda'), True, True, True, False)"),
    ("lr_bwd K mismatch", "ValueError", "x has 3 features but weight has 5", "ops.linear_relu_backward(g, out, x, torch.randn(2, 5, device='cuda'), True, True, True, False)"),
    ("lr autograd weight dtype", "TypeError", "weight has dtype", "ops.linear_relu(x, w.double(), b, False)"),
    ("lr autograd bias size", "ValueError", "bias has 3 elements", "ops.linear_relu(x.requires_grad_(), w, torch.randn(3, device='cuda'), False)"),
    ("edb_fwd users float", "TypeError", "users has dtype", "ops.embedding_dot_bias_forward(users.float(), items, U, V, ub, ib, None, None, None)"),
    ("edb_fwd users 2-D", "ValueError", "users must have 1 dimensions", "ops.embedding_dot_bias_forward(users[None], items, U, V, ub, ib, None, None, None)"),
    ("edb_fwd users on cpu", "RuntimeError", "users must be a CUDA tensor", "ops.embedding_dot_bias_forward(users.cpu(), items, U, V, ub, ib, None, None, None)"),
    ("edb_fwd lengths", "ValueError", "users has 6 entries but items has 5", "ops.embedding_dot_bias_forward(users, items[:5], U, V, ub, ib, None, None, None)"),
    ("edb_fwd table dtype", "TypeError", "u_weight has dtype", "ops.embedding_dot_bias_forward(users, items, U.int(), V, ub, ib, None, None, None)"),
    ("edb_fwd tables disagree", "TypeError", "i_weight has dtype", "ops.embedding_dot_bias_forward(users, items, U, V.double(), ub, ib, None, None, None)"),
    ("edb_fwd factors", "ValueError", "u_weight has 4 factors but i_weight has 5", "ops.embedding_dot_bias_forward(users, items, U, torch.randn(8, 5, device='cuda'), ub, ib, None, None, None)"),
    ("edb_fwd bias rows", "ValueError", "u_bias has 9 rows", "ops.embedding_dot_bias_forward(users, items, U, V, ub[:9], ib, None, None, None)"),
    ("edb_fwd bias shape", "ValueError", r"i_bias must have shape \(n,\) or \(n, 1\)", "ops.embedding_dot_bias_forward(users, items, U, V, ub, ib.expand(8, 2), None, None, None)"),
    ("edb_fwd half range", "ValueError", "y_lo and y_hi", "ops.embedding_dot_bias_forward(users, items, U, V, ub, ib, 0.0, None, None)"),
    ("edb_fwd errors dtype", "TypeError", "index_errors has dtype", "ops.embedding_dot_bias_forward(users, items, U, V, ub, ib, None, None, torch.zeros(9, device='cuda'))"),
    ("edb_fwd errors shape", "ValueError", "index_errors must be a contiguous", "ops.embedding_dot_bias_forward(users, items, U, V, ub, ib, None, None, torch.zeros(4, dtype=torch.long, device='cuda'))"),
    ("edb_bwd lengths", "ValueError", "one entry per sample", "ops.embedding_dot_bias_backward(g[:1, 0].expand(5), users, items, U, V, ub, ib, 10, 8, None, None, True, True, True, True, False, False)"),
    ("edb_bwd grad_out dtype", "TypeError", "grad_out has dtype", "ops.embedding_dot_bias_backward(users, users, items, U, V, ub, ib, 10, 8, None, None, True, True, True, True, False, False)"),
    ("edb_bwd partner missing", "ValueError", "i_weight is needed", "ops.embedding_dot_bias_backward(U[:6, 0].contiguous(), users, items, U, None, ub, ib, 10, 8, None, None, True, False, False, False, False, False)"),
    ("edb_bwd num_users", "ValueError", "u_weight has 10 rows but num_users is 11", "ops.embedding_dot_bias_backward(U[:6, 0].contiguous(), users, items, U, V, ub, ib, 11, 8, None, None, True, True, True, True, False, False)"),
    ("edb_bwd range tables", "ValueError", "all four tables", "ops.embedding_dot_bias_backward(U[:6, 0].contiguous(), users, items, U, V, None, ib, 10, 8, 0.0, 5.0, True, True, False, True, False, False)"),
    ("edb_bwd negative rows", "ValueError", "must be >= 0", "ops.embedding_dot_bias_backward(U[:6, 0].contiguous(), users, items, None, None, None, None, -1, 8, None, None, False, False, False, False, False, False)"),
    ("edb autograd users float", "TypeError", "users has dtype", "ops.embedding_dot_bias(users.float(), items, U, V, ub, ib, None, None, False, None)"),
    ("edb autograd errors shape", "ValueError", "index_errors must be a contiguous", "ops.embedding_dot_bias(users, items, U.requires_grad_(), V, ub, ib, None, None, False, torch.zeros(2, 9, dtype=torch.long, device='cuda'))"),
    ("sgd grads count", "ValueError", "got 1 params but 0 grads", "ops.sgd_step([p], [], [], None, 0.1, 0.0, 0.0, 0.0, False, False, False, False, None, None, None)"),
    ("sgd grads dtype", "TypeError", r"grads\[0\] has dtype", "ops.sgd_step([p], [p.double()], [], None, 0.1, 0.0, 0.0, 0.0, False, False, False, False, None, None, None)"),
    ("sgd buffers count", "ValueError", "0 momentum_buffers", "ops.sgd_step([p], [p.clone()], [], None, 0.1, 0.9, 0.0, 0.0, False, False, False, False, None, None, None)"),
    ("sgd grads strides", "ValueError", r"grads\[0\] has shape \[10\] and strides \[2\]", "ops.sgd_step([p], [torch.randn(10, 2, device='cuda')[:, 0]], [], None, 0.1, 0.0, 0.0, 0.0, False, False, False, False, None, None, None)"),
    ("sgd params not dense", "ValueError", r"params\[0\] must be dense", "ops.sgd_step([torch.randn(10, 2, device='cuda')[:, 0]], [torch.randn(10, 2, device='cuda')[:, 1]], [], None, 0.1, 0.0, 0.0, 0.0, False, False, False, False, None, None, None)"),
    # All tensors on the CPU: the dispatcher finds no CPU kernel before the op runs.
    ("sgd params on cpu", "NotImplementedError", "fastcore5_cuda::sgd_step' with arguments from the 'CPU' backend", "ops.sgd_step([p.cpu()], [p.cpu()], [], None, 0.1, 0.0, 0.0, 0.0, False, False, False, False, None, None, None)"),
    ("sgd lr_tensor size", "ValueError", "lr_tensor must have exactly one element", "ops.sgd_step([p], [p.clone()], [], torch.ones(2, device='cuda'), 0.1, 0.0, 0.0, 0.0, False, False, False, False, None, None, None)"),
    ("sgd found_inf on cpu", "RuntimeError", "found_inf is on cpu", "ops.sgd_step([p], [p.clone()], [], None, 0.1, 0.0, 0.0, 0.0, False, False, False, False, None, torch.zeros(1), None)"),
    ("sgd skip_flag dtype", "TypeError", "skip_flag has dtype", "ops.sgd_step([p], [p.clone()], [], None, 0.1, 0.0, 0.0, 0.0, False, False, False, False, None, None, torch.zeros(1, device='cuda'))"),
    ("sgd skip_flag empty", "ValueError", "skip_flag must have at least one element", "ops.sgd_step([p], [p.clone()], [], None, 0.1, 0.0, 0.0, 0.0, False, False, False, False, None, None, torch.zeros(0, dtype=torch.long, device='cuda'))"),
]

CHILD = textwrap.dedent(
    """
    import json, sys, torch
    from fastcore5 import backends
    backends.cuda_extension()
    ops = torch.ops.fastcore5_cuda
    cases = json.loads(sys.argv[1])
    torch.manual_seed(0)
    x, w, b = torch.randn(4, 3, device="cuda"), torch.randn(2, 3, device="cuda"), torch.randn(2, device="cuda")
    out = ops.linear_relu_forward(x, w, b, False)
    g = torch.randn_like(out)
    U, V = torch.randn(10, 4, device="cuda"), torch.randn(8, 4, device="cuda")
    ub, ib = torch.randn(10, 1, device="cuda"), torch.randn(8, 1, device="cuda")
    users, items = torch.randint(0, 10, (6,), device="cuda"), torch.randint(0, 8, (6,), device="cuda")
    p = torch.randn(10, device="cuda")
    expected_out = torch.relu(x @ w.T + b)
    for name, call in cases:
        print(json.dumps({"case": name, "started": True}), flush=True)
        try:
            eval(call)
            raised, message = None, ""
        except Exception as error:  # the case's expected type is asserted by the parent
            raised, message = type(error).__name__, str(error).splitlines()[0]
        again = ops.linear_relu_forward(x.detach(), w, b, False)  # the process and context still work
        torch.cuda.synchronize()
        good = bool(torch.allclose(again, expected_out, rtol=1e-4, atol=1e-4))
        print(json.dumps({"case": name, "raised": raised, "message": message, "good_call_after": good}), flush=True)
    """
)


def test_every_bad_argument_raises_its_named_exception_and_the_process_survives():
    cuda_ops()
    cases = [(name, call) for name, _, _, call in BAD_CALLS]
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", CHILD, json.dumps(cases)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300, env={**os.environ, "TORCH_SHOW_CPP_STACKTRACES": "0"})
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    finished = {r["case"]: r for r in reports if "raised" in r}
    started = [r["case"] for r in reports if r.get("started")]
    assert proc.returncode == 0, (
        f"the child died (exit {proc.returncode}) in case {started[-1] if started else None!r}:\n{proc.stderr[-4000:]}"
    )
    problems = []
    for name, error, pattern, _ in BAD_CALLS:
        report = finished[name]
        if report["raised"] != error or not re.search(pattern, report["message"]):
            problems.append(f"{name}: expected {error} matching {pattern!r}, got {report['raised']}: {report['message']}")
        if not report["good_call_after"]:
            problems.append(f"{name}: the good call after it gave a wrong result")
    assert not problems, "\n".join(problems)


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
    errors = torch.zeros(INDEX_ERROR_SLOTS, dtype=torch.long, device="cuda")
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
    clean = torch.zeros(INDEX_ERROR_SLOTS, dtype=torch.long, device="cuda")
    ops.embedding_dot_bias_forward(users, items, *tables, 1.0, 5.0, clean)
    assert clean.tolist() == [0] * INDEX_ERROR_SLOTS


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
    errors = torch.zeros(INDEX_ERROR_SLOTS, dtype=torch.long, device="cuda")
    torch.library.opcheck(ops.embedding_dot_bias_forward.default, (users, items, *tables, None, None, None))
    torch.library.opcheck(ops.embedding_dot_bias_forward.default, (users.int(), items, *tables, 0.5, 4.5, errors))
    grad_out = torch.randn(50, device="cuda")
    for deterministic, sparse in [(False, False), (True, False), (False, True)]:
        torch.library.opcheck(
            ops.embedding_dot_bias_backward.default,
            (grad_out, users, items, *tables, 40, 30, 1.0, 5.0, True, True, True, True, deterministic, sparse),
        )
    torch.library.opcheck(
        ops.embedding_dot_bias_backward.default,
        (grad_out, users, items, None, tables[1], None, None, 40, 30, None, None, True, False, False, False, False, False),
    )
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
    skip = torch.zeros(INDEX_ERROR_SLOTS, dtype=torch.long, device="cuda")
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
    skip = torch.zeros(INDEX_ERROR_SLOTS, dtype=torch.long, device="cuda")
    torch.library.opcheck(ops.sgd_step.default, _sgd_args(params, grads, buffers, skip_flag=skip))
    torch.library.opcheck(ops.sgd_step.default, _sgd_args(params, grads, buffers))


def test_sgd_step_in_a_cuda_graph_replays_like_eager():
    """The metadata staging buffer must outlive the capture: every replay copies from it."""
    ops = cuda_ops()
    params, grads, buffers = _sgd_tensors()
    eager = [[t.clone() for t in group] for group in (params, grads, buffers)]
    skip = torch.zeros(INDEX_ERROR_SLOTS, dtype=torch.long, device="cuda")
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
