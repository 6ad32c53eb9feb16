"""The fused SGD op (fastcore5.ops.sgd) against fastcore5.reference and torch.optim.SGD: the skip
protocol (GradScaler's found_inf, the index-error flag), the functional form on awkward shapes,
the custom op (opcheck, torch.compile), the "torch" backend, and the low-precision contract of
tests/sgd_rounding.py.
"""
from __future__ import annotations

import pytest
import torch

from fastcore5 import backends, reference
from fastcore5.ops import sgd as sgd_ops
from fastcore5.optim import SGD

from helpers import cuda_ops
from native_cpu import require_cpu_kernel
from sgd_twins import F64, SHAPES, assert_same, set_grads, torch_pair


# --------------------------------------------------------------------------- skip protocol


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("flag", ["found_inf", "skip_flag"])
@pytest.mark.parametrize("first_step", [True, False], ids=["first_step", "running"])
def test_a_raised_flag_leaves_every_tensor_bit_identical(backend, flag, first_step):
    """found_inf (GradScaler) and skip_flag (index errors: int64, element 0) skip everything on the
    device, grads included; new buffers come back zero. A lowered flag steps normally."""
    ps = [torch.randn(s, dtype=torch.float32) for s in SHAPES]
    gs = [torch.randn_like(p) for p in ps]
    bufs = [None] * len(ps) if first_step else [torch.randn_like(p) for p in ps]
    before = [t.clone() for t in ps + gs + ([] if first_step else bufs)]
    raised = {"found_inf": torch.tensor(1.0), "skip_flag": torch.tensor([3, 1, -2, 0, 7, 0, 0, 0, 0])}[flag]
    config = dict(lr=0.1, momentum=0.9, weight_decay=0.1, grad_scale=torch.tensor(8.0))
    with backends.use_backend(backend):
        new_bufs = sgd_ops.sgd_step(ps, gs, bufs, **config, **{flag: raised})
    assert all(torch.equal(a, b) for a, b in zip(ps + gs + ([] if first_step else new_bufs), before))
    if first_step:
        assert all(torch.equal(b, torch.zeros_like(b)) for b in new_bufs)
    lowered = torch.zeros_like(raised)
    with backends.use_backend(backend):
        sgd_ops.sgd_step(ps, gs, bufs, **config, **{flag: lowered})
    for g, g0 in zip(gs, before[len(ps): 2 * len(ps)]):
        torch.testing.assert_close(g, g0 / 8)
    assert not torch.equal(ps[0], before[0])


def test_optimizer_skips_the_step_a_bad_index_reached(monkeypatch):
    """fastcore5.optim.SGD asks index_errors for each device's pending flag and hands it to the
    kernel; a raised flag leaves params and buffers alone, and raise_pending runs first."""
    from fastcore5 import index_errors

    flag = torch.zeros(9, dtype=torch.int64)
    calls = []
    monkeypatch.setattr(index_errors, "pending_skip_flag", lambda device: calls.append(device) or flag)
    monkeypatch.setattr(index_errors, "raise_pending", lambda: calls.append("raise_pending"))
    theirs, ours, torch_opt = torch_pair(lr=0.1, momentum=0.9)
    our_opt = SGD(ours, lr=0.1, momentum=0.9)
    for step in range(4):
        set_grads(theirs, ours, [torch.randn_like(p) for p in theirs])
        flag[0] = 1 if step == 2 else 0
        before = [p.detach().clone() for p in ours], [our_opt.state[p]["momentum_buffer"].clone() for p in ours] if step else []
        our_opt.step()
        if step == 2:
            assert all(torch.equal(p, b) for p, b in zip(ours, before[0]))
            assert all(torch.equal(our_opt.state[p]["momentum_buffer"], b) for p, b in zip(ours, before[1]))
        else:
            torch_opt.step()
        assert_same(theirs, ours)
    assert calls[0] == "raise_pending" and torch.device("cpu") in calls
    with pytest.raises(IndexError, match="users"):
        monkeypatch.setattr(index_errors, "raise_pending", lambda: (_ for _ in ()).throw(IndexError("users: 7")))
        our_opt.step()


# ------------------------------------------------------------------- functional form, op


def test_functional_sgd_step_matches_reference_on_awkward_shapes():
    shapes = [(0,), (1,), (255,), (256,), (257,), (1024,), (1025,), (2, 3, 5, 7)]
    params = [torch.randn(s, dtype=F64) for s in shapes]
    params.append(torch.randn(2, 3, 4, 5, dtype=F64).to(memory_format=torch.channels_last))
    expected = [p.clone() for p in params]
    buffers, expected_buffers = [None] * len(params), [None] * len(params)
    config = dict(lr=0.07, momentum=0.8, dampening=0.2, weight_decay=0.03)
    for _ in range(2):
        grads = [torch.randn_like(p) for p in params]  # randn_like keeps channels-last
        buffers = sgd_ops.sgd_step(params, grads, buffers, **config)
        expected_buffers = reference.sgd_step(expected, grads, expected_buffers, **config)
    for got, want in zip(params + buffers, expected + expected_buffers):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-13)


@pytest.mark.parametrize("first_step", [True, False], ids=["first_step", "running"])
def test_opcheck(first_step):
    params = [torch.randn(s) for s in [(5, 3), (300,)]]
    grads = [torch.randn_like(p) for p in params]
    buffers = [torch.randn_like(p) for p in params]
    args = (params, grads, buffers, None if first_step else torch.tensor(0.2), 0.1, 0.9, 0.1, 0.01,
            False, True, not first_step, first_step, torch.tensor(4.0), torch.tensor(0.0),
            torch.zeros(9, dtype=torch.int64), "triton")
    torch.library.opcheck(sgd_ops.sgd_step_op, args)


def test_custom_op_under_torch_compile_fullgraph():
    """The op traces (fake impl, list mutations functionalised) and the compiled call mutates the
    caller's tensors and orders the read after the update."""
    params = [torch.randn(5, 3, dtype=F64), torch.randn(300, dtype=F64)]
    grads = [torch.randn_like(p) for p in params]
    buffers = [torch.randn_like(p) for p in params]
    expected, expected_buffers = [p.clone() for p in params], [b.clone() for b in buffers]

    def step(ps, gs, bs, lr):
        sgd_ops.sgd_step_op(ps, gs, bs, lr, 0.0, 0.9, 0.1, 0.01, False, True, False, False, None, None, None, "triton")
        return ps[0].sum()

    total = torch.compile(step, backend="aot_eager", fullgraph=True)(params, grads, buffers, torch.tensor(0.1, dtype=F64))
    reference.sgd_step(expected, grads, expected_buffers, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01,
                       maximize=True)
    for got, want in zip(params + buffers, expected + expected_buffers):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-13)
    torch.testing.assert_close(total, expected[0].sum(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kernel", ["triton", "cpu"])
def test_torch_backend_follows_the_same_protocol(kernel):
    """The "torch" backend (reference + the skip protocol through torch.where) and each kernel
    agree, through a GradScaler step that overflowed between two that did not."""
    if kernel == "cpu":
        require_cpu_kernel("sgd")
    results = []
    for backend in ("torch", kernel):
        torch.manual_seed(3)
        ps = [torch.randn(s, dtype=F64, requires_grad=True) for s in SHAPES]
        opt = SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
        with backends.use_backend(backend):
            for found_inf in (0.0, 1.0, 0.0):
                opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.tensor(found_inf)
                for p in ps:
                    p.grad = torch.randn_like(p)
                opt.step()
        results.append(ps)
    assert_same(*results)


# ------------------------------------------------------------------ low precision contract

LOW_PRECISION_CONFIGS = {
    "momentum": dict(lr=0.05, momentum=0.9),
    "dampening_wd": dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01),
    "nesterov_wd": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    "decoupled": dict(lr=0.05, momentum=0.9, weight_decay=0.1, decoupled_weight_decay=True),
    "maximize_no_momentum": dict(lr=0.05, weight_decay=0.01, maximize=True),
}


def _low_precision_run(dtype, config, device, backend, steps=5, scaled=False):
    """Our functional step and the fp32 contract reference side by side; returns both states and
    the largest operand seen (for the tolerance)."""
    from sgd_rounding import fp32_sgd_step

    shapes = [(1,), (7,), (1031,), (33, 65), (2, 3, 5, 7)]
    params = [torch.randn(s, device=device).to(dtype) for s in shapes]
    ref_params = [p.clone() for p in params]
    buffers, ref_buffers = [None] * len(params), [None] * len(params)
    bound = 0.0
    for _ in range(steps):
        grads = [torch.randn(s, device=device).to(dtype) for s in shapes]
        scale = torch.tensor(4.0, device=device) if scaled else None
        ref_grads = [g.clone() for g in grads]
        with backends.use_backend(backend):
            buffers = sgd_ops.sgd_step(params, grads, buffers, grad_scale=scale, **config)
        ref_buffers = fp32_sgd_step(ref_params, ref_grads, ref_buffers, grad_scale=scale, **config)
        bound = max([bound] + [t.abs().max().item() for t in ref_params + ref_grads])
    return (params, buffers), (ref_params, ref_buffers), bound


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "grad_scale"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(LOW_PRECISION_CONFIGS))
def test_low_precision_step_is_fp32_math_rounded_once(name, dtype, scaled):
    """The contract: fp32 math, one rounding per stored value and step. The interpreter computes
    without fused multiply-adds, so it must match the contract's reference bit for bit."""
    from sgd_rounding import tolerance

    ours, ref, bound = _low_precision_run(dtype, LOW_PRECISION_CONFIGS[name], "cpu", "triton", scaled=scaled)
    tol = tolerance(dtype, 5, bound, exact=True)
    for got, want in zip(ours[0] + [b for b in ours[1] if b is not None], ref[0] + [b for b in ref[1] if b is not None]):
        assert got.dtype == dtype
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(LOW_PRECISION_CONFIGS))
def test_low_precision_step_on_gpu_within_the_derived_tolerance(name, dtype, backend):
    from sgd_rounding import tolerance

    if backend == "cuda":
        cuda_ops()  # on a CUDA machine a failed extension build is a failure, not a skip
    reason = backends.unavailable_reason(backend, "sgd", torch.device("cuda"), dtype)
    assert reason is None, reason
    ours, ref, bound = _low_precision_run(dtype, LOW_PRECISION_CONFIGS[name], "cuda", backend)
    tol = tolerance(dtype, 5, bound, exact=False)
    for got, want in zip(ours[0] + [b for b in ours[1] if b is not None], ref[0] + [b for b in ref[1] if b is not None]):
        torch.testing.assert_close(got, want, **tol)


def test_contract_reference_differs_from_torch_only_by_torchs_extra_roundings():
    """The looser check against torch.optim.SGD itself: torch's bf16 SGD rounds after every op, so
    it drifts from the fp32 contract by a few bf16 ulps per step, never more."""
    config = dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01)
    start = [torch.randn(s).to(torch.bfloat16) for s in [(33, 5), (1031,)]]
    ours = [p.clone().requires_grad_() for p in start]
    theirs = [p.clone().requires_grad_() for p in start]
    our_opt, torch_opt = SGD(ours, **config), torch.optim.SGD(theirs, foreach=False, **config)
    steps = 5
    for _ in range(steps):
        grads = [torch.randn(p.shape).to(torch.bfloat16) for p in start]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        our_opt.step()
        torch_opt.step()
    bound = max(t.abs().max().item() for t in ours + theirs)
    for p, q in zip(ours, theirs):
        # torch rounds each of its ~4 ops per step to bf16 (half an ulp of operands up to `bound`
        # each); ours rounds once: at most 4 bf16 ulps of drift per step, relative or of the bound
        tol = steps * 4 * 2.0**-8
        torch.testing.assert_close(p.detach(), q.detach(), rtol=tol, atol=tol * bound)


# ------------------------------------------------------------------- bf16 against torch


def test_bf16_params_mean_error_comparable_to_torch():
    """Parity rule for low precision: our mean error against a float64 run is at most 1.5x torch's
    bf16 optimizer's. Our math is fp32 in registers; torch rounds to bf16 after every op. The
    mean, not the max: the max error over a few hundred elements is one or two ulp flips and
    varied by more than 2x between random draws (a CI run failed on a 2.1x max), while the mean
    ratio stayed at or below 1.04 over 150 draws. The exact rounding contract is checked
    element-wise against tests/sgd_rounding.py elsewhere in this file."""
    config = dict(lr=0.05, momentum=0.9, weight_decay=0.1, nesterov=True)
    start = [torch.randn(s).to(torch.bfloat16) for s in [(33, 5), (1031,)]]
    exact = [p.double().requires_grad_() for p in start]
    theirs = [p.clone().requires_grad_() for p in start]
    ours = [p.clone().requires_grad_() for p in start]
    opts = [torch.optim.SGD(exact, foreach=False, **config), torch.optim.SGD(theirs, foreach=False, **config),
            SGD(ours, **config)]
    for _ in range(4):
        grads = [torch.randn(p.shape).to(torch.bfloat16) for p in start]
        for group, g in zip((exact, theirs, ours), (grads, grads, grads)):
            for p, gi in zip(group, g):
                p.grad = gi.to(p.dtype)
        for o in opts:
            o.step()
    for e, t, o in zip(exact, theirs, ours):
        assert o.dtype == torch.bfloat16 and opts[2].state[o]["momentum_buffer"].dtype == torch.bfloat16
        torch_err = (t.detach().double() - e.detach()).abs().mean()
        our_err = (o.detach().double() - e.detach()).abs().mean()
        assert our_err <= 1.5 * torch_err, (our_err, torch_err)
