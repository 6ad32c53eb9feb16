"""The argument checks of the raw C++ ops in torch.ops.fastcore5_native (built from csrc/): every
check raises its named Python exception (TypeError, ValueError, RuntimeError) and leaves the
process and the CUDA context usable; the H200 run of commit f02c316 crashed the process instead
(issue 11). The bad calls run in a child process, so a crash fails one test, names the case it
died in, and cannot take the test worker down with it.

GPU only (skipped without a CUDA device; scripts/gpu_check.sh builds the extension with
FASTCORE5_BUILD_CUDA=1 and runs them). The ops' other contracts are in tests/test_cuda_ops.py.
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

from helpers import cuda_ops

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parent.parent


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
    # All tensors on the CPU would run the CPU kernel (csrc/cpu/sgd.cpp); one CPU grad reaches the CUDA kernel's check.
    ("sgd grads on cpu", "RuntimeError", r"grads\[0\] must be a CUDA tensor, got a cpu tensor", "ops.sgd_step([p], [p.cpu()], [], None, 0.1, 0.0, 0.0, 0.0, False, False, False, False, None, None, None)"),
    ("sgd lr_tensor size", "ValueError", "lr_tensor must have exactly one element", "ops.sgd_step([p], [p.clone()], [], torch.ones(2, device='cuda'), 0.1, 0.0, 0.0, 0.0, False, False, False, False, None, None, None)"),
    ("sgd found_inf on cpu", "RuntimeError", "found_inf is on cpu", "ops.sgd_step([p], [p.clone()], [], None, 0.1, 0.0, 0.0, 0.0, False, False, False, False, None, torch.zeros(1), None)"),
    ("sgd skip_flag dtype", "TypeError", "skip_flag has dtype", "ops.sgd_step([p], [p.clone()], [], None, 0.1, 0.0, 0.0, 0.0, False, False, False, False, None, None, torch.zeros(1, device='cuda'))"),
    ("sgd skip_flag empty", "ValueError", "skip_flag must have at least one element", "ops.sgd_step([p], [p.clone()], [], None, 0.1, 0.0, 0.0, 0.0, False, False, False, False, None, None, torch.zeros(0, dtype=torch.long, device='cuda'))"),
]

CHILD = textwrap.dedent(
    """
    import json, sys, torch
    from fastcore5 import backends
    backends.native_extension()
    ops = torch.ops.fastcore5_native
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
