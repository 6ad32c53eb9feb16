"""The CUDA C++ backend (torch.ops.fastcore5_native, built from csrc/) next to the Triton backend.

GPU only (skipped without a CUDA device; scripts/gpu_check.sh runs them after building the
extension with FASTCORE5_BUILD_CUDA=1). Every check is parametrized over both backends, so the
two implementations answer to the same contract: parity with the reference (helpers.assert_parity
for low precision), only the requested gradients, the deterministic EmbeddingDotBias path bitwise
reproducible, tables past 2^31 elements, bad indices as IndexError with the CUDA context still
usable, and the SGD options including tensor lr and the GradScaler skip. The raw CUDA ops also go
through torch.compile(fullgraph=True) here; their own contracts (opcheck, the C++ autograd ops,
bad indices, skip_flag, graph capture) are tested in tests/test_cuda_ops.py, their argument
errors in tests/test_cuda_op_errors.py.

If the extension is missing on a GPU machine the "cuda" cases fail (BackendUnavailableError
naming the build switch): a GPU run is only complete with the extension built.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import fastcore5
from fastcore5 import backends, reference, use_backend
from fastcore5.nn import LinearReLU

from helpers import allow_tf32, assert_parity, cuda_ops, deterministic_algorithms

pytestmark = pytest.mark.gpu

BACKENDS = ("triton", "cuda")
CUDA_OPS = ("linear_relu_forward", "linear_relu_backward", "linear_relu", "embedding_dot_bias_forward",
            "embedding_dot_bias_backward", "embedding_dot_bias", "sgd_step")


def per_element(atol):
    """(atol, rtol) for assert_parity: ``atol`` relative to each exact value of magnitude above 1,
    absolute below, so one tolerance fits outputs and gradient sums of any magnitude. (It was
    scaled by the hottest row's value for every element, which let a cold row be off by as much
    as the hottest one.)"""
    return {"atol": atol, "rtol": atol}


def test_extension_registers_every_op():
    ops = cuda_ops()
    for name in CUDA_OPS:
        assert hasattr(ops, name), name
    for op in ("linear_relu", "embedding_dot_bias", "sgd"):
        assert backends.unavailable_reason("cuda", op, torch.device("cuda")) is None


# ---------------------------------------------------------------------------------------------
# Linear + ReLU
# ---------------------------------------------------------------------------------------------

def _linear_inputs(M, K, N, dtype, bias=True):
    x = torch.randn(M, K, dtype=dtype, device="cuda")
    w = torch.randn(N, K, dtype=dtype, device="cuda") / max(K, 1) ** 0.5
    b = torch.randn(N, dtype=dtype, device="cuda") if bias else None
    return x, w, b


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, use_tf32", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False),
                                             (torch.float16, False)])
@pytest.mark.parametrize("M, K, N, bias", [(1000, 999, 97, True), (1, 1, 1, True), (37, 29, 23, False),
                                           (4096, 1024, 2048, True), (129, 64, 8, True)])
def test_linear_relu_parity(backend, dtype, use_tf32, M, K, N, bias):
    x, w, b = _linear_inputs(M, K, N, dtype, bias)
    params = [t.requires_grad_() for t in (x, w, b) if t is not None]
    grad_out = torch.randn(M, N, dtype=dtype, device="cuda")
    with allow_tf32(use_tf32):
        with use_backend(backend):
            out = fastcore5.linear_relu(x, w, b)
            ours = (out, *torch.autograd.grad(out, params, grad_out))
        torch_out = F.relu(F.linear(x, w, b))
        theirs = (torch_out, *torch.autograd.grad(torch_out, params, grad_out))
    exact_params = [t.detach().double().requires_grad_() for t in params]
    exact_out = F.relu(F.linear(*exact_params, *([] if bias else [None])))
    exact = (exact_out, *torch.autograd.grad(exact_out, exact_params, grad_out.double()))
    atol = {torch.float32: 1e-4 if not use_tf32 else 1e-2, torch.bfloat16: 5e-2, torch.float16: 5e-3}[dtype]
    for name, o, t, e in zip(("out", "grad_x", "grad_weight", "grad_bias"), ours, theirs, exact):
        assert o.dtype == dtype and o.shape == e.shape, name
        assert_parity(o, t, e, **per_element(atol), what=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_relu_strided_and_transposed_operands(backend):
    x = torch.randn(300, 70, device="cuda")[::3, 5:69]  # rows strided, columns offset
    w = torch.randn(64, 50, device="cuda").t()          # (50, 64) column-major
    b = torch.randn(100, device="cuda")[::2]
    with allow_tf32(False), use_backend(backend):
        out = fastcore5.linear_relu(x, w, b)
    torch.testing.assert_close(out, F.relu(F.linear(x, w, b)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_relu_nan_propagates_like_torch(backend, dtype):
    """torch.relu keeps a NaN and its backward passes a NaN output's gradient on. The CUDA
    backend's forward ReLU is cuBLASLt's epilogue, whose NaN handling NVIDIA does not document:
    this is the check of it."""
    x, w, b = _linear_inputs(64, 32, 48, dtype)
    x[3, 5] = float("nan")
    grad_out = torch.randn(64, 48, dtype=dtype, device="cuda")
    results = []
    for run in (lambda *a: _linear_relu_on(backend, *a), reference.linear_relu):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        out = run(*leaves)
        results.append([out, *torch.autograd.grad(out, leaves, grad_out)])
    for name, ours, theirs in zip(("out", "grad_x", "grad_w", "grad_b"), *results):
        assert torch.equal(ours.isnan(), theirs.isnan()), f"{name}: NaN where torch has none, or none where it has"


def _linear_relu_on(backend, x, w, b):
    with use_backend(backend):
        return fastcore5.linear_relu(x, w, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M, K, N", [(0, 8, 4), (3, 0, 4), (3, 8, 0)])
def test_linear_relu_empty_dims(backend, M, K, N):
    x, w, b = _linear_inputs(M, K, N, torch.float32)
    for t in (x, w, b):
        t.requires_grad_()
    with use_backend(backend):
        out = fastcore5.linear_relu(x, w, b)
        out.backward(torch.randn_like(out))
    expected = F.relu(F.linear(x.detach(), w.detach(), b.detach()))
    torch.testing.assert_close(out.detach(), expected)
    assert x.grad.shape == x.shape and w.grad.shape == w.shape and b.grad.shape == b.shape
    assert not any(t.grad.isnan().any() for t in (x, w, b))


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True), (True, True, True)])
def test_cuda_linear_relu_backward_returns_only_requested(needs):
    ops = cuda_ops()
    x, w, b = _linear_inputs(33, 17, 9, torch.float32)
    out = ops.linear_relu_forward(x, w, b, False)
    grad_out = torch.randn_like(out)
    grads = ops.linear_relu_backward(grad_out, out, x if needs[1] else None, w if needs[0] else None, *needs, False)
    for g, need, shape in zip(grads, needs, (x.shape, w.shape, b.shape)):
        assert g.shape == (shape if need else (0,))


def test_cuda_linear_relu_compile():
    # opcheck of every op: tests/test_cuda_ops.py
    ops = cuda_ops()
    x, w, b = _linear_inputs(19, 13, 11, torch.float32)
    out = ops.linear_relu_forward(x, w, b, False)
    compiled = torch.compile(lambda *a: ops.linear_relu_forward(*a, False), fullgraph=True)
    torch.testing.assert_close(compiled(x, w, b), out)
    layer = LinearReLU(13, 11, device="cuda")
    with use_backend("cuda"):
        compiled_layer = torch.compile(layer, fullgraph=True)
        y = compiled_layer(x)
        y.sum().backward()
    torch.testing.assert_close(y, F.relu(F.linear(x, layer.weight, layer.bias)), rtol=1e-3, atol=1e-3)
    assert layer.weight.grad is not None


# ---------------------------------------------------------------------------------------------
# EmbeddingDotBias
# ---------------------------------------------------------------------------------------------

def _collab(n_users, n_items, D, B, dtype, index_dtype=torch.int64, hot=None):
    """Tables fastai-style (normal, fmod 2, * 0.01 is too small to see errors: scaled to 0.3) and a
    batch; ``hot`` rows (if given) take half the samples, to repeat indices heavily."""
    U = (torch.randn(n_users, D, device="cuda").fmod_(2) * 0.3).to(dtype)
    V = (torch.randn(n_items, D, device="cuda").fmod_(2) * 0.3).to(dtype)
    ub = torch.randn(n_users, 1, device="cuda").to(dtype)
    ib = torch.randn(n_items, 1, device="cuda").to(dtype)
    users = torch.randint(0, n_users, (B,), device="cuda")
    items = torch.randint(0, n_items, (B,), device="cuda")
    if hot is not None:
        users[: B // 2] = torch.randint(0, hot, (B // 2,), device="cuda")
        items[B // 4:] = torch.randint(0, hot, (B - B // 4,), device="cuda")
    return users.to(index_dtype), items.to(index_dtype), U, V, ub, ib


def _edb_grads(fn, users, items, tables, grad_out, y_range, sparse=False):
    params = [t.detach().clone().requires_grad_() for t in tables]
    out = fn(users, items, *params, y_range=y_range, **({"sparse": True} if sparse else {}))
    grads = torch.autograd.grad(out, params, grad_out)
    return out.detach(), [g.to_dense() if g.is_sparse else g for g in grads]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("y_range", [None, (0.0, 5.5)])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("D, B, index_dtype", [(64, 65536, torch.int64), (50, 1000, torch.int32), (1, 7, torch.int64),
                                               (128, 4099, torch.int32)])
def test_embedding_dot_bias_parity(backend, dtype, y_range, deterministic, D, B, index_dtype):
    users, items, *tables = _collab(3001, 997, D, B, dtype, index_dtype, hot=5)
    grad_out = torch.randn(B, device="cuda").to(dtype)
    with use_backend(backend), (deterministic_algorithms() if deterministic else contextlib.nullcontext()):
        ours = _edb_grads(fastcore5.embedding_dot_bias, users, items, tables, grad_out, y_range)
    theirs = _edb_grads(reference.embedding_dot_bias, users.long(), items.long(), tables, grad_out, y_range)
    exact = _edb_grads(reference.embedding_dot_bias, users.long(), items.long(), [t.double() for t in tables],
                       grad_out.double(), y_range)
    atol = 1e-5 if dtype == torch.float32 else 2e-2
    for name, o, t, e in zip(("out", "grad_u_weight", "grad_i_weight", "grad_u_bias", "grad_i_bias"),
                             [ours[0], *ours[1]], [theirs[0], *theirs[1]], [exact[0], *exact[1]]):
        assert o.dtype == dtype and o.shape == e.shape, name
        assert_parity(o, t, e, **per_element(atol), what=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embedding_dot_bias_deterministic_path_is_bitwise_reproducible(backend, dtype):
    # Few hot rows and a long batch: every hot row's samples span many chunks/tiles.
    users, items, *tables = _collab(500, 300, 64, 200_003, dtype, hot=3)
    grad_out = torch.randn(users.shape[0], device="cuda").to(dtype)
    with use_backend(backend), deterministic_algorithms():
        first = _edb_grads(fastcore5.embedding_dot_bias, users, items, tables, grad_out, (1.0, 5.0))
        second = _edb_grads(fastcore5.embedding_dot_bias, users, items, tables, grad_out, (1.0, 5.0))
    for a, b in zip(first[1], second[1]):
        assert torch.equal(a, b)
    exact = _edb_grads(reference.embedding_dot_bias, users, items, [t.double() for t in tables], grad_out.double(),
                       (1.0, 5.0))
    for name, g, e in zip(("grad_u_weight", "grad_i_weight", "grad_u_bias", "grad_i_bias"), first[1], exact[1]):
        scale = e.abs().max().item()
        tol = (1e-5 if dtype == torch.float32 else 1e-2) * scale + 1e-6
        assert (g.double() - e).abs().max().item() <= tol, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_embedding_dot_bias_sparse_gradients(backend):
    users, items, *tables = _collab(400, 300, 32, 2000, torch.float32, hot=4)
    grad_out = torch.randn(2000, device="cuda")
    with use_backend(backend):
        out, grads = _edb_grads(fastcore5.embedding_dot_bias, users, items, tables, grad_out, (0.0, 5.0), sparse=True)
    exact_out, exact = _edb_grads(reference.embedding_dot_bias, users, items, [t.double() for t in tables],
                                  grad_out.double(), (0.0, 5.0))
    torch.testing.assert_close(out.double(), exact_out, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, exact):
        torch.testing.assert_close(g.double().reshape(e.shape), e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", ["too_large", "negative"])
def test_embedding_dot_bias_bad_index_is_index_error_and_context_survives(backend, bad):
    users, items, *tables = _collab(100, 80, 16, 64, torch.float32)
    users[17] = 100 if bad == "too_large" else -1
    with use_backend(backend), pytest.raises(IndexError, match="users"):
        fastcore5.embedding_dot_bias(users, items, *tables)
    torch.cuda.synchronize()  # a device-side assert would surface here and poison the context
    users[17] = 3
    with use_backend(backend):
        out = fastcore5.embedding_dot_bias(users, items, *tables)
    torch.testing.assert_close(out, reference.embedding_dot_bias(users, items, *tables))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("deterministic", [False, True])
def test_embedding_dot_bias_table_past_2_31_elements(backend, deterministic):
    """A bf16 user table of 2^31 + 2^18 elements (4.3 GB; peak about 17 GB with the fp32
    accumulator of the atomic path): rows near the end have element offsets past 2^31."""
    D = 64
    n_users = 2**31 // D + 4096
    U = torch.randn(n_users, D, dtype=torch.bfloat16, device="cuda").mul_(0.1)
    assert U.numel() > 2**31
    V = (torch.randn(1000, D, device="cuda") * 0.1).bfloat16()
    ub = torch.randn(n_users, 1, dtype=torch.bfloat16, device="cuda")
    ib = torch.randn(1000, 1, dtype=torch.bfloat16, device="cuda")
    B = 4096
    users = torch.cat([torch.randint(n_users - 512, n_users, (B // 2,)), torch.randint(0, 64, (B // 2,))]).cuda()
    items = torch.randint(0, 1000, (B,), device="cuda")
    grad_out = torch.randn(B, device="cuda").bfloat16()
    U.requires_grad_()
    with use_backend(backend), (deterministic_algorithms() if deterministic else contextlib.nullcontext()):
        out = fastcore5.embedding_dot_bias(users, items, U, V, ub, ib)
        (grad_U,) = torch.autograd.grad(out, (U,), grad_out)
    Uu, Vi = U.detach()[users].double(), V[items].double()
    exact = (Uu * Vi).sum(-1) + ub[users, 0].double() + ib[items, 0].double()
    torch.testing.assert_close(out.double(), exact, rtol=1e-2, atol=2e-2)
    rows, inverse = torch.unique(users, return_inverse=True)
    exact_grad = torch.zeros(rows.shape[0], D, dtype=torch.float64, device="cuda")
    exact_grad.index_add_(0, inverse, grad_out.double()[:, None] * Vi)
    torch.testing.assert_close(grad_U[rows].double(), exact_grad, rtol=1e-2, atol=1e-2)
    untouched = grad_U[n_users - 4096 : n_users - 512]
    assert not untouched.any(), "rows no sample touched must have zero gradient"
    del U, grad_U
    torch.cuda.empty_cache()


def test_cuda_embedding_dot_bias_compile():
    # opcheck of every op: tests/test_cuda_ops.py
    ops = cuda_ops()
    users, items, U, V, ub, ib = _collab(50, 40, 24, 300, torch.float32, hot=3)
    compiled = torch.compile(lambda *a: ops.embedding_dot_bias_forward(*a, None, None, None), fullgraph=True)
    torch.testing.assert_close(compiled(users, items, U, V, ub, ib), reference.embedding_dot_bias(users, items, U, V, ub, ib))
    params = [t.clone().requires_grad_() for t in (U, V, ub, ib)]
    with use_backend("cuda"):
        fn = torch.compile(lambda u, i, *p: fastcore5.embedding_dot_bias(u, i, *p, y_range=(0.0, 5.0)), fullgraph=True)
        fn(users, items, *params).sum().backward()
    assert all(p.grad is not None for p in params)


# ---------------------------------------------------------------------------------------------
# SGD
# ---------------------------------------------------------------------------------------------

SGD_CASES = [
    dict(momentum=0.0),
    dict(momentum=0.9),
    dict(momentum=0.9, dampening=0.1, weight_decay=1e-2),
    dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
    dict(momentum=0.5, maximize=True),
    dict(momentum=0.9, weight_decay=0.1, decoupled_weight_decay=True),
]


def sgd_step(*args, **kwargs):
    # Imported on use: the SGD op layer is a sibling module these tests only reach on a GPU.
    from fastcore5.ops.sgd import sgd_step as step

    return step(*args, **kwargs)


def _sgd_tensors(shapes, dtype):
    params = [torch.randn(s, device="cuda").to(dtype) for s in shapes]
    grads = [[torch.randn(s, device="cuda").to(dtype) for s in shapes] for _ in range(3)]
    return params, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32])
@pytest.mark.parametrize("case", SGD_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_sgd_matches_reference_over_steps(backend, dtype, case, tensor_lr):
    # bf16/fp16 follow their own contract (fp32 math, one rounding per step), checked against the
    # reference that computes that way: tests/test_sgd.py::test_low_precision_step_on_gpu_*.
    shapes = [(1,), (7,), (4099,), (33, 65), (3, 16384 + 5), (2, 3, 5, 7)]
    params, grads = _sgd_tensors(shapes, dtype)
    ref_params = [p.clone() for p in params]
    lr = torch.tensor(0.05, device="cuda") if tensor_lr else 0.05
    buffers = [None] * len(params)
    ref_buffers = [None] * len(params)
    for step_grads in grads:
        with use_backend(backend):
            buffers = sgd_step(params, [g.clone() for g in step_grads], buffers, lr=lr, **case)
        ref_buffers = reference.sgd_step(ref_params, [g.clone() for g in step_grads], ref_buffers, lr=0.05, **case)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p, r, **tol)
    for b, r in zip(buffers, ref_buffers):
        assert (b is None) == (r is None)
        if b is not None:
            torch.testing.assert_close(b, r, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sgd_optimizer_matches_torch_on_many_tensors(backend):
    shapes = [(4096,)] * 500 + [(129, 31), (1,), (3, 3, 3)]
    model_params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in shapes]
    torch_params = [torch.nn.Parameter(p.detach().clone()) for p in model_params]
    from fastcore5.optim import SGD

    ours = SGD(model_params, lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True)
    theirs = torch.optim.SGD(torch_params, lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True, foreach=False)
    for _ in range(3):
        for p, q in zip(model_params, torch_params):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        with use_backend(backend):
            ours.step()
        theirs.step()
    for p, q in zip(model_params, torch_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sgd_grad_scaler_protocol(backend):
    params, (grads, *_) = _sgd_tensors([(1000,), (17, 3)], torch.float32)
    buffers = [torch.randn_like(p) for p in params]
    before = [t.clone() for t in (*params, *grads, *buffers)]
    scale = torch.tensor(1024.0, device="cuda")
    with use_backend(backend):
        sgd_step(params, grads, buffers, lr=0.1, momentum=0.9, grad_scale=scale, found_inf=torch.ones((), device="cuda"))
    for t, b in zip((*params, *grads, *buffers), before):
        assert torch.equal(t, b), "an overflowed step must change nothing"
    with use_backend(backend):
        sgd_step(params, grads, buffers, lr=0.1, momentum=0.9, grad_scale=scale, found_inf=torch.zeros((), device="cuda"))
    ref_params = [t.clone() for t in before[:2]]
    ref_grads = [g / 1024.0 for g in before[2:4]]
    reference.sgd_step(ref_params, ref_grads, [t.clone() for t in before[4:]], lr=0.1, momentum=0.9)
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=0)  # unscaled grads are written back


def test_cuda_sgd_compile():
    # opcheck of every op: tests/test_cuda_ops.py
    ops = cuda_ops()
    params, (grads, *_) = _sgd_tensors([(100,), (5, 7)], torch.float32)
    buffers = [torch.randn_like(p) for p in params]

    def step(ps, gs, bs):
        ops.sgd_step(ps, gs, bs, None, 0.01, 0.9, 0.0, 0.0, False, False, False, False, None, None, None)

    eager = [[t.clone() for t in group] for group in (params, grads, buffers)]
    compiled = [[t.clone() for t in group] for group in (params, grads, buffers)]
    step(*eager)
    torch.compile(step, fullgraph=True)(*compiled)
    for a, b in zip(eager[0] + eager[2], compiled[0] + compiled[2]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
