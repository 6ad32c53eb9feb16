"""The C++ CPU kernel of sgd_step (csrc/cpu/sgd.cpp, backend "cpu"): every option against the
float64 reference and torch.optim.SGD, fp32/fp64 and bf16/fp16 (fp32 math, one rounding per
store), the skip protocol, the contiguous mode, bitwise equality across thread counts, opcheck,
torch.compile, and the argument checks' named exceptions."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess

import pytest
import torch

from fastcore5 import backends, reference
from fastcore5.ops import sgd as sgd_ops
from fastcore5.optim import SGD

from native_cpu import require_cpu_kernel, threads
from sgd_twins import F64, assert_same, assert_same_buffers, eager_and_compiled_sgd_run, set_grads, torch_pair

# Sizes around the vector width (8/16/32 lanes) and the kernel's 4096-element chunk, primes, empty.
SIZES = [(0,), (1,), (15,), (33,), (4095,), (4097,), (8191, 1), (3, 5, 7), (12289,)]

CONFIGS = {
    "plain": dict(lr=0.05),
    "momentum": dict(lr=0.05, momentum=0.9),
    "dampening_wd": dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01),
    "nesterov_wd": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    "decoupled": dict(lr=0.05, momentum=0.9, weight_decay=0.1, decoupled_weight_decay=True),
    "decoupled_no_momentum": dict(lr=0.05, weight_decay=0.1, decoupled_weight_decay=True),
    "maximize_wd": dict(lr=0.05, momentum=0.8, weight_decay=0.01, maximize=True),
    "maximize_no_momentum": dict(lr=0.05, weight_decay=0.01, maximize=True),
}


@pytest.fixture(autouse=True)
def cpu_kernel():
    return require_cpu_kernel("sgd")


def test_auto_picks_the_cpu_kernel():
    assert backends.select("sgd", "cpu", torch.float32) == "cpu"


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float_lr", "tensor_lr"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_float64_steps_match_the_reference(name, tensor_lr):
    """Three steps (the first creates the buffers) in float64 against fastcore5.reference."""
    config = dict(CONFIGS[name])
    if tensor_lr:
        config["lr"] = torch.tensor(config["lr"], dtype=F64)
    params = [torch.randn(s, dtype=F64) for s in SIZES]
    expected = [p.clone() for p in params]
    buffers, expected_buffers = [None] * len(params), [None] * len(params)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        with backends.use_backend("cpu"):
            buffers = sgd_ops.sgd_step(params, grads, buffers, **config)
        expected_buffers = reference.sgd_step(expected, grads, expected_buffers, **config)
    for got, want in zip(params + buffers, expected + expected_buffers):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=0, atol=1e-13)


@pytest.mark.parametrize("contiguous", [False, True], ids=["normal", "contiguous"])
@pytest.mark.parametrize("name", [n for n in CONFIGS if not CONFIGS[n].get("decoupled_weight_decay")])
def test_optimizer_trajectory_matches_torch_sgd_in_float64(name, contiguous):
    shapes = [(7, 3), (4097,), (2, 2, 2), (1,), (0,)]
    theirs, ours, torch_opt = torch_pair(shapes, **CONFIGS[name])
    our_opt = SGD(ours, contiguous=contiguous, **CONFIGS[name])
    with backends.use_backend("cpu"):
        for _ in range(4):
            set_grads(theirs, ours, [torch.randn_like(p) for p in theirs], contiguous=contiguous)
            torch_opt.step()
            our_opt.step()
    assert_same(theirs, ours)
    assert_same_buffers(torch_opt, our_opt, theirs, ours)


def test_float32_within_rounding_of_torch_fused_sgd():
    config = dict(lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=True)
    theirs = [torch.randn(s, requires_grad=True) for s in SIZES]
    ours = [p.detach().clone().requires_grad_() for p in theirs]
    exact = [p.detach().double().requires_grad_() for p in theirs]
    opts = [torch.optim.SGD(theirs, fused=True, **config), SGD(ours, **config), torch.optim.SGD(exact, **config)]
    for _ in range(5):
        for p, q, e in zip(theirs, ours, exact):
            g = torch.randn_like(p)
            p.grad, q.grad, e.grad = g.clone(), g.clone(), g.double()
        for opt in opts:
            opt.step()
    for t, o, e in zip(theirs, ours, exact):
        if e.numel():
            # The parity rule: at most 2x torch's error, plus a few fp32 ulps of the values (the
            # max over a few elements is a handful of rounding flips on either side).
            slack = 4 * torch.finfo(torch.float32).eps * e.detach().abs().max().item()
            torch_err = (t.detach().double() - e.detach()).abs().max().item()
            our_err = (o.detach().double() - e.detach()).abs().max().item()
            assert our_err <= 2 * torch_err + slack, (our_err, torch_err)


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "grad_scale"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_low_precision_is_fp32_math_rounded_once(name, dtype, scaled):
    """The contract of tests/sgd_rounding.py: fp32 math, one rounding per stored value. The CPU
    kernel is compiled without contracting multiply-adds, so it matches the contract's reference
    bit for bit."""
    from sgd_rounding import fp32_sgd_step

    params = [torch.randn(s).to(dtype) for s in SIZES]
    ref_params = [p.clone() for p in params]
    buffers, ref_buffers = [None] * len(params), [None] * len(params)
    for _ in range(4):
        grads = [torch.randn(s).to(dtype) for s in SIZES]
        ref_grads = [g.clone() for g in grads]
        scale = torch.tensor(4.0) if scaled else None
        with backends.use_backend("cpu"):
            buffers = sgd_ops.sgd_step(params, grads, buffers, grad_scale=scale, **CONFIGS[name])
        ref_buffers = fp32_sgd_step(ref_params, ref_grads, ref_buffers, grad_scale=scale, **CONFIGS[name])
        for got, want in zip(grads, ref_grads):
            assert torch.equal(got, want)
    for got, want in zip(params + buffers, ref_params + ref_buffers):
        if want is None:
            assert got is None
        else:
            assert got.dtype == dtype
            assert torch.equal(got, want)


@pytest.mark.parametrize("flag", ["found_inf", "skip_flag"])
@pytest.mark.parametrize("first_step", [True, False], ids=["first_step", "running"])
def test_a_raised_flag_writes_nothing(flag, first_step):
    ps = [torch.randn(s) for s in SIZES]
    gs = [torch.randn_like(p) for p in ps]
    bufs = [None] * len(ps) if first_step else [torch.randn_like(p) for p in ps]
    before = [t.clone() for t in ps + gs + ([] if first_step else bufs)]
    raised = {"found_inf": torch.tensor(1.0), "skip_flag": torch.tensor([2, 0, 0, 0, 0, 1, -3, 0, 5])}[flag]
    config = dict(lr=0.1, momentum=0.9, weight_decay=0.1, grad_scale=torch.tensor(8.0))
    with backends.use_backend("cpu"):
        new_bufs = sgd_ops.sgd_step(ps, gs, bufs, **config, **{flag: raised})
    assert all(torch.equal(a, b) for a, b in zip(ps + gs + ([] if first_step else new_bufs), before))
    with backends.use_backend("cpu"):
        sgd_ops.sgd_step(ps, gs, bufs, **config, **{flag: torch.zeros_like(raised)})
    for g, g0 in zip(gs, before[len(ps): 2 * len(ps)]):
        torch.testing.assert_close(g, g0 / 8, rtol=0, atol=0)
    assert not torch.equal(ps[1], before[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_any_thread_count_gives_bitwise_the_same_result(dtype):
    """Chunks split differently across 1, 2 and 3 threads; every element goes through the same
    vector code, so the results are identical."""
    sizes = [(4097,), (1,), (8193, 3), (31,), (0,), (65537,)]
    start = [torch.randn(s).to(dtype) for s in sizes]
    grads = [[torch.randn(s).to(dtype) for s in sizes] for _ in range(3)]
    results = []
    for n in (1, 2, 3):
        params = [p.clone() for p in start]
        buffers = [None] * len(params)
        with threads(n), backends.use_backend("cpu"):
            for step_grads in grads:
                buffers = sgd_ops.sgd_step(params, [g.clone() for g in step_grads], buffers, lr=0.1, momentum=0.9,
                                           weight_decay=0.01, nesterov=True, grad_scale=torch.tensor(2.0))
        results.append(params + buffers)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_channels_last_params_step_in_place():
    p = torch.randn(2, 3, 5, 7, dtype=F64).to(memory_format=torch.channels_last)
    g = torch.randn_like(p)
    expected = p.clone()
    with backends.use_backend("cpu"):
        [buf] = sgd_ops.sgd_step([p], [g], [None], lr=0.1, momentum=0.9)
    reference.sgd_step([expected], [g], [None], lr=0.1, momentum=0.9)
    assert buf.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(p, expected, rtol=0, atol=1e-14)


def test_contiguous_mode_passes_a_few_ranges_whatever_the_number_of_tensors(monkeypatch):
    """Host work per step in contiguous mode: the kernel's plan holds the flat ranges, not one entry
    per param, and is made once per layout (a first step, then the running steps), not per step."""
    plans, runs = [], []
    real = sgd_ops.cpu_step_plan

    def recording(params, buffers, grads=None, gradless=()):
        plans.append(len(params))
        prepare, run = real(params, buffers, grads, gradless)
        return prepare, lambda *args: runs.append(1) or run(*args)

    monkeypatch.setattr(sgd_ops, "cpu_step_plan", recording)
    params = [torch.nn.Parameter(torch.randn(n)) for n in [50, 1, 3, 4096] * 50]
    opt = SGD(params, lr=0.1, momentum=0.9, contiguous=True)
    with backends.use_backend("cpu"):
        for _ in range(4):
            for p in params:
                p.grad.normal_()
            opt.step()
    assert plans == [1, 1] and len(runs) == 4, (plans, runs)


# ---------------------------------------------------------- normal mode's plans kept in C++


def _refuse_the_op(monkeypatch):
    def refuse(*args):
        raise AssertionError("the step went through the op, not the cached plan")

    monkeypatch.setattr(sgd_ops.KERNELS["cpu"], "sgd_step", refuse)


@pytest.mark.parametrize("name", [n for n in CONFIGS if not CONFIGS[n].get("decoupled_weight_decay")])
def test_normal_mode_steps_through_its_cpp_plan_like_torch(name, monkeypatch):
    """After the first step (which creates the buffers) a CPU group steps through its
    cpu_step_plan, never the op, while gradients come and go, a param's .data is replaced, the lr
    becomes a tensor and momentum is switched off: each change plans again, and every step matches
    torch.optim.SGD."""
    shapes = [(7, 3), (4097,), (2, 2, 2), (1,), (0,), (12289,)]
    theirs, ours, torch_opt = torch_pair(shapes, **CONFIGS[name])
    our_opt = SGD(ours, **CONFIGS[name])
    with backends.use_backend("cpu"):
        for step in range(9):
            grads = [torch.randn_like(p) for p in theirs]
            if step in (3, 4):
                grads[1] = None  # a frozen param: skipped, its buffer kept
            if step == 5:
                for p in (theirs[2], ours[2]):
                    p.data = torch.randn(2, 2, 2, dtype=F64, generator=torch.Generator().manual_seed(5))
            if step == 6:
                for opt in (torch_opt, our_opt):
                    opt.param_groups[0]["lr"] = torch.tensor(0.03, dtype=F64)
            if step == 7 and our_opt.param_groups[0]["momentum"] != 0:
                for opt in (torch_opt, our_opt):
                    opt.param_groups[0]["momentum"] = 0.0
                    opt.param_groups[0]["nesterov"] = False
            for p, q, g in zip(theirs, ours, grads):
                p.grad = None if g is None else g.clone()
                q.grad = None if g is None else g.clone()
            torch_opt.step()
            our_opt.step()
            if step == 1:
                assert our_opt._plans[0].native is not None
                _refuse_the_op(monkeypatch)
            assert_same(theirs, ours)
    assert_same_buffers(torch_opt, our_opt, theirs, ours)


def test_a_refused_group_leaves_the_planned_groups_untouched(monkeypatch):
    """All or nothing across groups with plans in C++: group 0 is prepared (and would step through
    its plan), group 1's gradient is refused by the checks; nothing is written anywhere."""
    first = [torch.nn.Parameter(torch.randn(33)) for _ in range(3)]
    second = [torch.nn.Parameter(torch.randn(5, 4))]
    opt = SGD([{"params": first}, {"params": second}], lr=0.1, momentum=0.9)
    with backends.use_backend("cpu"):
        for _ in range(2):
            for p in first + second:
                p.grad = torch.randn_like(p)
            opt.step()
        assert opt._plans[0].native is not None
        second[0].grad = torch.randn(4, 5).t()  # strides unlike its param's
        for p in first:
            p.grad = torch.randn_like(p)
        before = [t.clone() for t in first + second + [opt.state[p]["momentum_buffer"] for p in first + second]]
        with pytest.raises(ValueError, match=r"the \.grad of param 0 of param group 1 has strides \(1, 5\)"):
            opt.step()
        after = first + second + [opt.state[p]["momentum_buffer"] for p in first + second]
        assert all(torch.equal(a, b) for a, b in zip(before, after))
        second[0].grad = torch.randn_like(second[0])
        opt.step()  # steps again, through the plans
        assert not torch.equal(first[0], before[0])


def test_the_cpp_plan_bumps_the_params_versions():
    """autograd notices a param stepped after it was saved for backward, as with the op."""
    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = SGD([w], lr=0.1, momentum=0.9)
    with backends.use_backend("cpu"):
        for _ in range(2):
            w.grad = torch.randn_like(w)
            opt.step()
        assert opt._plans[0].native is not None
        loss = (w * w).sum()  # saves w for backward
        w.grad = torch.randn_like(w)
        opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_plan_functions_refuse_bad_arguments(cpu_kernel):
    import fastcore5._C as extension

    p = torch.randn(4)
    with pytest.raises(TypeError, match="params must be a list of tensors"):
        extension.sgd_cpu_plan(p, [], None, [])
    with pytest.raises(TypeError, match=r"buffers\[0\] must be a tensor"):
        extension.sgd_cpu_plan([p], [1.0], None, [])
    with pytest.raises(TypeError, match="takes 4 arguments"):
        extension.sgd_cpu_plan([p], [])
    assert extension.sgd_cpu_plan([p[::2]], [], None, []) is None  # not dense: the op's checks name it
    assert extension.sgd_cpu_plan([torch.ones(4, dtype=torch.long)], [], None, []) is None
    assert extension.sgd_cpu_plan([p], [torch.randn(5)], None, []) is None
    plan = extension.sgd_cpu_plan([p], [], [torch.randn(4)], [])
    hyper = sgd_ops.SGDHyper(0.1)
    with pytest.raises(ValueError):
        extension.sgd_cpu_run(object(), hyper, False, None, None, None)
    with pytest.raises(TypeError, match="takes 6 arguments"):
        extension.sgd_cpu_run(plan, hyper)
    with pytest.raises(TypeError, match="7-tuple"):
        extension.sgd_cpu_run(plan, (0.1,), False, None, None, None)
    with pytest.raises(ValueError, match="momentum != 0 but the plan has no buffers"):
        extension.sgd_cpu_run(plan, sgd_ops.SGDHyper(0.1, 0.9), False, None, None, None)
    with pytest.raises(TypeError, match="found_inf has dtype Int"):
        extension.sgd_cpu_run(plan, hyper, False, None, torch.zeros(1, dtype=torch.int32), None)
    reading = extension.sgd_cpu_plan([p], [], None, [])
    with pytest.raises(RuntimeError, match="not prepared"):
        extension.sgd_cpu_run(reading, hyper, False, None, None, None)
    assert extension.sgd_cpu_prepare(reading) is False  # p has no .grad


@pytest.mark.parametrize("first_step", [True, False], ids=["first_step", "running"])
def test_opcheck(first_step, cpu_kernel):
    params = [torch.randn(s) for s in [(5, 3), (4100,)]]
    grads = [torch.randn_like(p) for p in params]
    buffers = [torch.randn_like(p) for p in params]
    lr_tensor = None if first_step else torch.tensor(0.2)
    flags = (torch.tensor(4.0), torch.tensor(0.0), torch.zeros(9, dtype=torch.int64))
    args = (params, grads, buffers, lr_tensor, 0.1, 0.9, 0.1, 0.01, False, True, not first_step, first_step, *flags)
    torch.library.opcheck(sgd_ops.sgd_step_op, (*args, "cpu"))
    torch.library.opcheck(cpu_kernel.sgd_step.default, args)


def test_step_under_torch_compile_fullgraph():
    eager, compiled = (eager_and_compiled_sgd_run("cpu", compiled) for compiled in (False, True))
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))


def _call(ops, params, grads, buffers, momentum=0.9, lr_tensor=None, grad_scale=None, found_inf=None, skip_flag=None):
    ops.sgd_step(params, grads, buffers, lr_tensor, 0.1, momentum, 0.0, 0.0, False, False, False, False,
                 grad_scale, found_inf, skip_flag)


def _p(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


BAD_CALLS = {
    "grads count": (ValueError, "got 1 params but 2 grads", lambda: ([_p(4)], [_p(4), _p(4)], [_p(4)]), {}),
    "buffers count": (ValueError, "got 1 params but 0 momentum_buffers", lambda: ([_p(4)], [_p(4)], []), {}),
    "integer params": (TypeError, r"params\[0\] has dtype Long", lambda: ([torch.ones(4, dtype=torch.long)],) * 3, {}),
    "grad dtype": (TypeError, r"grads\[0\] has dtype Double but params\[0\] has dtype Float",
                   lambda: ([_p(4)], [_p(4, dtype=F64)], [_p(4)]), {}),
    "mixed param dtypes": (TypeError, r"params\[1\] has dtype Double",
                           lambda: ([_p(4), _p(4, dtype=F64)], [_p(4), _p(4, dtype=F64)], [_p(4), _p(4, dtype=F64)]), {}),
    "grad shape": (ValueError, r"grads\[0\] has shape \[5\]", lambda: ([_p(4)], [_p(5)], [_p(4)]), {}),
    "buffer strides": (ValueError, r"momentum_buffers\[0\] has shape \[3, 4\] and strides \[1, 3\]",
                       lambda: ([_p(3, 4)], [_p(3, 4)], [_p(4, 3).t()]), {}),
    "not dense": (ValueError, r"params\[0\] must be dense", lambda: ([_p(8)[::2]], [_p(8)[::2]], [_p(8)[::2]]), {}),
    "lr_tensor size": (ValueError, "lr_tensor must have exactly one element", lambda: ([_p(4)], [_p(4)], [_p(4)]),
                       {"lr_tensor": torch.ones(2)}),
    "lr_tensor dtype": (TypeError, "lr_tensor has dtype Long", lambda: ([_p(4)], [_p(4)], [_p(4)]),
                        {"lr_tensor": torch.ones(1, dtype=torch.long)}),
    "grad_scale size": (ValueError, "grad_scale must have exactly one element", lambda: ([_p(4)], [_p(4)], [_p(4)]),
                        {"grad_scale": torch.ones(3)}),
    "found_inf dtype": (TypeError, "found_inf has dtype Int", lambda: ([_p(4)], [_p(4)], [_p(4)]),
                        {"found_inf": torch.zeros(1, dtype=torch.int32)}),
    "skip_flag dtype": (TypeError, "skip_flag has dtype Float", lambda: ([_p(4)], [_p(4)], [_p(4)]),
                        {"skip_flag": torch.zeros(1)}),
    "skip_flag empty": (ValueError, "skip_flag must have at least one element", lambda: ([_p(4)], [_p(4)], [_p(4)]),
                        {"skip_flag": torch.zeros(0, dtype=torch.long)}),
}


def _good_call(dtype, sizes, momentum, **flags):
    def call(ops):
        params = [torch.randn(s).to(dtype) for s in sizes]
        buffers = [torch.randn_like(p) for p in params] if momentum else []
        _call(ops, params, [torch.randn_like(p) for p in params], buffers, momentum=momentum, **flags)
    return call


# What tests/test_cpu_asan.py runs against the AddressSanitizer build: every bad call, and good
# calls whose tails, empty tensors and channels-last layouts reach every load and store path.
ASAN_CALLS = [
    (f"bad: {case}", error, lambda ops, make=make, extra=extra: _call(ops, *make(), **extra))
    for case, (error, _, make, extra) in BAD_CALLS.items()
] + [
    (f"good: {dtype} momentum={momentum}", None,
     _good_call(dtype, SIZES + [(2, 3, 5, 7)], momentum, grad_scale=torch.tensor(2.0), lr_tensor=torch.tensor(0.1)))
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16) for momentum in (0.0, 0.9)
]


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_arguments_raise_the_named_exception(case, cpu_kernel):
    """The checks are those of the CUDA kernel (csrc/sgd_checks.h): same exception types and messages."""
    error, match, make, extra = BAD_CALLS[case]
    params, grads, buffers = make()
    before = [t.clone() for t in params]
    with pytest.raises(error, match=match):
        _call(cpu_kernel, params, grads, buffers, **extra)
    assert all(torch.equal(a, b) for a, b in zip(params, before))


def test_bad_arguments_through_the_public_api_name_the_argument():
    with backends.use_backend("cpu"), pytest.raises(ValueError, match=r"grads\[0\] must match params\[0\]"):
        sgd_ops.sgd_step([_p(4)], [_p(5)], [None], lr=0.1, momentum=0.9)
    with backends.use_backend("cpu"), pytest.raises(TypeError, match=r"params\[0\] has dtype torch.int64"):
        sgd_ops.sgd_step([torch.ones(4, dtype=torch.long)], [torch.ones(4, dtype=torch.long)], [None], lr=0.1)


@pytest.mark.skipif(shutil.which("nm") is None, reason="binutils' nm is not installed")
def test_extension_is_built_with_openmp():
    """at::parallel_for's OpenMP loop is compiled into the extension (setup.py's -fopenmp): without
    it the kernel would run on one thread whatever torch.get_num_threads() says."""
    import fastcore5._C as extension

    symbols = subprocess.run(["nm", "-D", extension.__file__], capture_output=True, text=True, check=True).stdout
    assert "GOMP_parallel" in symbols


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="per-thread CPU times come from Linux's /proc")
def test_two_threads_share_the_work(cpu_kernel):
    """With torch.set_num_threads(2) two OS threads each spend CPU time in the steps: the OpenMP
    loop really forks (a build without -fopenmp would run everything on the calling thread)."""
    def cpu_ticks():
        ticks = {}
        for tid in os.listdir("/proc/self/task"):
            with contextlib.suppress(FileNotFoundError):
                fields = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
                ticks[tid] = int(fields[11]) + int(fields[12])  # utime + stime
        return ticks

    p, g, b = (torch.randn(1 << 23) for _ in range(3))
    with threads(2):
        _call(cpu_kernel, [p], [g], [b])
        before = cpu_ticks()
        for _ in range(40):
            _call(cpu_kernel, [p], [g], [b])
        after = cpu_ticks()
    busy = [tid for tid, t in after.items() if t - before.get(tid, 0) > 0]
    assert len(busy) >= 2, (before, after)
