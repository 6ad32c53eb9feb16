"""fastcore5.optim.SGD as a drop-in for torch.optim.SGD, the reference, and the lesson helpers.

The reference is torch.optim.SGD itself (fastcore5.reference.sgd_step is checked against it in
test_reference.py): every trajectory below runs torch's optimizer and ours side by side from the
same start on the same fresh random gradients, in float64 so a wrong term shows up far above
rounding. The Triton kernel runs through the interpreter on CPU (conftest); its chunk size there
is 1024 elements in pieces of 256, so the 1031-element tensors cross both boundaries.

The host-side machinery (contiguous mode, the plan cache, no host reads, CUDA-graph capture) is
tested in test_sgd_host_path.py; the fused op and its low-precision contract in test_sgd_op.py.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import fastcore5
from fastcore5.ops import sgd as sgd_ops
from fastcore5.optim import SGD, discriminative_param_groups, even_mults, lr_range

from conftest import DEVICE
from sgd_twins import F64, SHAPES, assert_same, assert_same_buffers, eager_and_compiled_sgd_run, set_grads, torch_pair


# Every configuration torch's own SGD tests cover (test/optim: optim_inputs_func_sgd).
CONFIGS = {
    "default": dict(),
    "lr": dict(lr=0.02),
    "tensor_lr": dict(lr=torch.tensor(0.03, dtype=F64)),
    "weight_decay": dict(lr=0.05, weight_decay=0.1),
    "momentum": dict(lr=0.05, momentum=0.9),
    "dampening": dict(lr=0.05, momentum=0.9, dampening=0.5),
    "nesterov": dict(lr=0.05, momentum=0.9, nesterov=True),
    "maximize": dict(lr=0.05, momentum=0.9, weight_decay=0.1, maximize=True),
    "weight_decay_momentum": dict(lr=0.05, momentum=0.9, weight_decay=0.1),
    "nesterov_weight_decay": dict(lr=0.05, momentum=0.8, weight_decay=0.2, nesterov=True),
}


# ----------------------------------------------------------------------------- trajectories


@pytest.mark.parametrize("contiguous", [False, True], ids=["normal", "contiguous"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_trajectory_matches_torch_sgd(name, contiguous):
    config = CONFIGS[name]
    theirs, ours, torch_opt = torch_pair(**config)
    our_opt = SGD(ours, contiguous=contiguous, **config)
    for _ in range(4):
        set_grads(theirs, ours, [torch.randn_like(p) for p in theirs], contiguous)
        torch_opt.step()
        our_opt.step()
        assert_same(theirs, ours)
    assert_same_buffers(torch_opt, our_opt, theirs, ours)


def test_float32_trajectory_matches_torch_sgd():
    config = CONFIGS["nesterov_weight_decay"]
    theirs, ours, torch_opt = torch_pair(dtype=torch.float32, **config)
    our_opt = SGD(ours, **config)
    for _ in range(3):
        set_grads(theirs, ours, [torch.randn_like(p) for p in theirs])
        torch_opt.step()
        our_opt.step()
    # fp32 math in both; only the order of roundings (fused multiply-adds) differs
    assert_same(theirs, ours, atol=2e-6)
    assert_same_buffers(torch_opt, our_opt, theirs, ours, atol=2e-6)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_decoupled_weight_decay_is_the_lesson_formula(momentum):
    lr, wd = 0.1, 0.2
    p = torch.randn(1031, dtype=F64, requires_grad=True)
    w, buf = p.detach().clone(), None
    opt = SGD([p], lr=lr, momentum=momentum, weight_decay=wd, decoupled_weight_decay=True)
    for _ in range(3):
        grad = torch.randn_like(w)
        p.grad = grad.clone()
        opt.step()
        # w -= lr*wd*w, then the plain (momentum) gradient step; the gradient itself is not decayed
        w = w - lr * wd * w
        if momentum:
            buf = grad.clone() if buf is None else momentum * buf + grad
            w = w - lr * buf
        else:
            w = w - lr * grad
        torch.testing.assert_close(p.detach(), w, rtol=0, atol=1e-13)
    assert opt.param_groups[0]["decoupled_weight_decay"] is True


def test_param_groups_with_different_hyperparameters():
    theirs = [torch.randn(s, dtype=F64, requires_grad=True) for s in SHAPES]
    ours = [p.detach().clone().requires_grad_() for p in theirs]

    def groups(ps):
        return [
            {"params": ps[:1], "lr": 0.2, "momentum": 0.5, "dampening": 0.1},
            {"params": ps[1:3], "nesterov": True, "momentum": 0.9, "weight_decay": 0.05},
            {"params": ps[3:], "lr": torch.tensor(0.3, dtype=F64), "maximize": True},
        ]

    torch_opt = torch.optim.SGD(groups(theirs), lr=0.05, foreach=False)
    our_opt = SGD(groups(ours), lr=0.05)
    for _ in range(3):
        set_grads(theirs, ours, [torch.randn_like(p) for p in theirs])
        torch_opt.step()
        our_opt.step()
        assert_same(theirs, ours)
    assert_same_buffers(torch_opt, our_opt, theirs, ours)


@pytest.mark.parametrize("contiguous", [False, True], ids=["normal", "contiguous"])
def test_frozen_params_are_untouched(contiguous):
    ps = [torch.randn(s, dtype=F64, requires_grad=True) for s in SHAPES]
    opt = SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1, contiguous=contiguous)
    frozen = ps[1]
    frozen.requires_grad_(False)
    if contiguous:
        opt.refresh()  # contiguous mode reads requires_grad on freeze_to/refresh, not every step
    else:
        frozen.grad = None  # normal mode: a param without .grad is skipped, as in torch
    before = frozen.detach().clone()
    for _ in range(3):
        for p in ps:
            if p is not frozen:
                if contiguous:
                    p.grad.copy_(torch.randn_like(p))
                else:
                    p.grad = torch.randn_like(p)
        opt.step()
    assert torch.equal(frozen.detach(), before)
    assert "momentum_buffer" not in opt.state.get(frozen, {})
    assert all("momentum_buffer" in opt.state[p] for p in ps if p is not frozen)


@pytest.mark.parametrize("contiguous", [False, True], ids=["normal", "contiguous"])
def test_state_dict_moves_both_ways_mid_training(contiguous):
    config = dict(lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=True)
    a = [torch.randn(s, dtype=F64, requires_grad=True) for s in SHAPES]
    grads = [[torch.randn_like(p) for p in a] for _ in range(6)]
    start = [p.detach().clone() for p in a]

    def run(first_cls, second_cls):
        ps = [s.clone().requires_grad_() for s in start]

        def make(cls):
            kwargs = {"contiguous": contiguous} if cls is SGD else {"foreach": False}
            return cls(ps, **config, **kwargs)

        opt = make(first_cls)
        for step in range(6):
            if step == 3:  # hand the checkpoint over mid-training
                saved = copy.deepcopy(opt.state_dict())
                opt = make(second_cls)
                opt.load_state_dict(saved)
            for p, g in zip(ps, grads[step]):
                if contiguous and isinstance(opt, SGD):
                    p.grad.copy_(g)
                else:
                    p.grad = g.clone()
            opt.step()
        return ps, opt

    reference_run, _ = run(torch.optim.SGD, torch.optim.SGD)
    torch_to_ours, ours_after = run(torch.optim.SGD, SGD)
    ours_to_torch, torch_after = run(SGD, torch.optim.SGD)
    assert_same(reference_run, torch_to_ours)
    assert_same(reference_run, ours_to_torch)
    assert set(ours_after.state_dict()["state"][0]) == {"momentum_buffer"}
    assert ours_after.state_dict()["param_groups"][0]["decoupled_weight_decay"] is False
    assert torch_after.state_dict()["param_groups"][0]["nesterov"] is True


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float_lr", "tensor_lr"])
def test_step_lr_scheduler(tensor_lr):
    lr = torch.tensor(0.1, dtype=F64) if tensor_lr else 0.1
    theirs, ours, torch_opt = torch_pair(lr=lr if not tensor_lr else lr.clone(), momentum=0.9)
    our_opt = SGD(ours, lr=lr, momentum=0.9)
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.3) for o in (torch_opt, our_opt)]
    for _ in range(5):
        set_grads(theirs, ours, [torch.randn_like(p) for p in theirs])
        torch_opt.step()
        our_opt.step()
        for s in schedulers:
            s.step()
        assert_same(theirs, ours)
    assert math.isclose(float(our_opt.param_groups[0]["lr"]), 0.1 * 0.3**2)


def test_one_cycle_lr_cycles_momentum_too():
    theirs, ours, torch_opt = torch_pair(lr=0.1, momentum=0.9, weight_decay=0.01)
    our_opt = SGD(ours, lr=0.1, momentum=0.9, weight_decay=0.01)
    kwargs = dict(max_lr=0.5, total_steps=6, pct_start=0.5, base_momentum=0.8, max_momentum=0.95)
    schedulers = [torch.optim.lr_scheduler.OneCycleLR(o, **kwargs) for o in (torch_opt, our_opt)]
    momenta = []
    for _ in range(6):
        set_grads(theirs, ours, [torch.randn_like(p) for p in theirs])
        torch_opt.step()
        our_opt.step()
        momenta.append(our_opt.param_groups[0]["momentum"])
        for s in schedulers:
            s.step()
        assert_same(theirs, ours)
    assert len(set(momenta)) > 3  # the momentum really moved, and the kernel followed it
    assert_same_buffers(torch_opt, our_opt, theirs, ours)


# ------------------------------------------------------------------------------- GradScaler


@pytest.mark.parametrize("contiguous", [False, True], ids=["normal", "contiguous"])
def test_grad_scaler_skips_overflowed_steps_first_and_later(contiguous):
    """torch's GradScaler hands our optimizer grad_scale/found_inf (fused protocol); torch's own
    for-loop SGD gets the classic protocol (unscale, host check, skip). Overflows on step 0 (our
    buffers are created zero-filled and stay zero; torch creates none, and with dampening 0 the
    next step agrees: momentum*0 + g == g) and on step 2 (buffers exist and must not change)."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3)).double()
    twin = copy.deepcopy(model)
    x, y = torch.randn(16, 6, dtype=F64), torch.randn(16, 3, dtype=F64)
    torch_opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01, foreach=False)
    our_opt = SGD(twin.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01, contiguous=contiguous)
    assert our_opt._step_supports_amp_scaling
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10) for _ in range(2)]
    for step in range(5):
        buffers_before = {id(p): s["momentum_buffer"].clone() for p, s in our_opt.state.items()}
        params_before = [p.detach().clone() for p in twin.parameters()]
        for net, opt, scaler in zip((model, twin), (torch_opt, our_opt), scalers):
            opt.zero_grad()
            scaler.scale(((net(x) - y) ** 2).mean()).backward()
            if step in (0, 2):
                net[0].weight.grad[1, 2] = float("inf")
            scaler.step(opt)
            scaler.update()
        assert scalers[0].get_scale() == scalers[1].get_scale()
        assert_same(list(model.parameters()), list(twin.parameters()))
        if step in (0, 2):
            assert all(torch.equal(p.detach(), b) for p, b in zip(twin.parameters(), params_before))
            for p, s in our_opt.state.items():
                expected = buffers_before.get(id(p), torch.zeros_like(p))
                assert torch.equal(s["momentum_buffer"], expected)
            assert len(our_opt.state) == len(list(twin.parameters()))
        else:
            # after a taken step the grads are unscaled, as GradScaler leaves them for torch's SGD
            for p, q in zip(model.parameters(), twin.parameters()):
                torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-13)
    assert_same_buffers(torch_opt, our_opt, list(model.parameters()), list(twin.parameters()))
    assert not hasattr(our_opt, "found_inf")  # GradScaler removes what it set


# ------------------------------------------------------------------- dtypes and devices


def test_mixed_dtypes_in_one_group_step_per_dtype():
    dtypes = [torch.float32, F64, torch.bfloat16, torch.float16, F64]
    theirs = [torch.randn(5, 3).to(d).requires_grad_() for d in dtypes]
    ours = [p.detach().clone().requires_grad_() for p in theirs]
    torch_opt = torch.optim.SGD(theirs, lr=0.1, momentum=0.9, foreach=False)
    our_opt = SGD(ours, lr=0.1, momentum=0.9)
    for _ in range(2):
        set_grads(theirs, ours, [torch.randn_like(p) for p in theirs])
        torch_opt.step()
        our_opt.step()
    assert [len(launch.members) for launch in our_opt._plans[0].launches] == [1, 2, 1, 1]
    for p, q in zip(theirs, ours):
        assert q.dtype == p.dtype
        tol = 1e-13 if p.dtype == F64 else (1e-5 if p.dtype == torch.float32 else 2e-2)
        torch.testing.assert_close(q.detach(), p.detach(), rtol=0, atol=tol)


def test_params_on_two_devices_in_one_group_are_stepped_per_device():
    """CPU runs the Triton kernel; the meta device has no Triton backend and falls back to the
    reference. Each device's params are their own launch; nothing crosses devices."""
    cpu = torch.randn(6, dtype=F64, requires_grad=True)
    meta = torch.empty(6, dtype=F64, device="meta", requires_grad=True)
    cpu.grad, meta.grad = torch.randn(6, dtype=F64), torch.empty(6, dtype=F64, device="meta")
    expected = cpu.detach() - 0.1 * cpu.grad
    SGD([cpu, meta], lr=0.1).step()
    torch.testing.assert_close(cpu.detach(), expected, rtol=0, atol=1e-15)
    assert meta.device.type == "meta"


@pytest.mark.gpu
def test_cpu_and_cuda_params_in_one_group():
    theirs = [torch.randn(7, requires_grad=True), torch.randn(7, device="cuda", requires_grad=True)]
    ours = [p.detach().clone().requires_grad_() for p in theirs]
    torch_opt = torch.optim.SGD(theirs, lr=0.1, momentum=0.9)
    our_opt = SGD(ours, lr=0.1, momentum=0.9)
    for _ in range(2):
        set_grads(theirs, ours, [torch.randn_like(p) for p in theirs])
        torch_opt.step()
        our_opt.step()
    assert_same(theirs, ours, atol=1e-5)


# ----------------------------------------------------------------------------- bad input


BAD = {
    "negative lr": dict(lr=-0.1),
    "negative tensor lr": dict(lr=torch.tensor(-0.1)),
    "two-element lr": dict(lr=torch.tensor([0.1, 0.2])),
    "negative momentum": dict(momentum=-0.5),
    "negative weight_decay": dict(weight_decay=-1e-4),
    "nesterov without momentum": dict(nesterov=True),
    "nesterov with dampening": dict(momentum=0.9, dampening=0.1, nesterov=True),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_hyperparameters_refused_like_torch(name):
    p = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError) as torch_error:
        torch.optim.SGD([p], **BAD[name])
    with pytest.raises(ValueError) as our_error:
        SGD([p], **BAD[name])
    assert str(our_error.value) == str(torch_error.value)


def test_other_bad_input_is_refused_clearly():
    p = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match="differentiable"):
        SGD([p], differentiable=True)
    with pytest.raises(TypeError, match="real floating"):
        SGD([torch.randn(3, dtype=torch.complex64, requires_grad=True)])
    with pytest.raises(ValueError, match="Invalid learning rate"):
        SGD([{"params": [p], "lr": -1.0}])
    with pytest.raises(ValueError, match=r"grads\[1\] must match params\[1\]"):
        sgd_ops.sgd_step([p, p.detach()], [torch.randn(3), torch.randn(4)], [None, None], lr=0.1)
    with fastcore5.use_backend("triton"), pytest.raises(ValueError, match=r"grads\[0\] must be a dense tensor"):
        sgd_ops.sgd_step([torch.randn(4, 3)], [torch.randn(3, 4).T], [None], lr=0.1)
    with pytest.raises(ValueError, match="found_inf must have exactly one element"):
        sgd_ops.sgd_step([p.detach()], [torch.randn(3)], [None], lr=0.1, found_inf=torch.zeros(2))


def _sparse_grad_with_l2_weight_decay(opt, p):
    opt.param_groups[0]["weight_decay"] = 0.1  # torch refuses this too (add(sparse, dense))
    p.grad = torch.ones_like(p).to_sparse()


def _one_element_momentum_buffer(opt, p):
    state = opt.state_dict()
    state["state"] = {0: {"momentum_buffer": torch.ones(1)}}  # copy_ into a (3,) view would broadcast it
    opt.load_state_dict(state)
    p.grad = torch.ones_like(p)


@pytest.mark.parametrize("contiguous", [False, True], ids=["normal", "contiguous"])
@pytest.mark.parametrize(
    "spoil, error, match",
    [
        (_sparse_grad_with_l2_weight_decay, ValueError, r"the \.grad of param 0 of param group 0 is sparse, and weight_decay"),
        (_one_element_momentum_buffer, ValueError, r"momentum_buffer of param 0 of param group 0 must match it in shape"),
    ],
    ids=["sparse grad with L2 weight decay", "momentum buffer of another shape"],
)
def test_bad_state_is_refused_naming_the_param_in_both_modes(contiguous, spoil, error, match):
    p = torch.randn(3, requires_grad=True)
    opt = SGD([p], lr=0.1, momentum=0.9, contiguous=contiguous)
    with pytest.raises(error, match=match):
        spoil(opt, p)
        opt.step()


def test_layout_errors_name_the_param_in_its_group():
    """The Triton step checks layouts per launch; the error still names the param by its place in
    its group, not in the launch (a param without a gradient is in no launch)."""
    idle, stepped = torch.randn(2, device=DEVICE, requires_grad=True), torch.randn(4, 3, device=DEVICE, requires_grad=True)
    opt = SGD([idle, stepped], lr=0.1, momentum=0.9)
    with fastcore5.use_backend("triton"):
        stepped.grad = torch.randn(4, 3, device=DEVICE)
        opt.step()  # the launch plan is cached from here on
        stepped.grad = torch.randn(3, 4, device=DEVICE).T
        with pytest.raises(ValueError, match=r"the \.grad of param 1 of param group 0 must be a dense tensor"):
            opt.step()
        opt.param_groups[0]["weight_decay"] = 0.1
        stepped.grad = torch.randn(4, 3, device=DEVICE).to_sparse()  # a new plan, refused by name
        with pytest.raises(ValueError, match=r"the \.grad of param 1 of param group 0 is sparse, and weight_decay"):
            opt.step()


@pytest.mark.filterwarnings("ignore:optimizer contains a parameter group with duplicate parameters")
def test_contiguous_mode_refuses_a_param_listed_twice():
    p = torch.randn(3, requires_grad=True)
    SGD([p, p], lr=0.1)  # torch warns and steps it twice; so does normal mode
    with pytest.raises(ValueError, match="param group 0 holds a param twice"):
        SGD([p, p], lr=0.1, contiguous=True)


@pytest.mark.parametrize("hyper", [dict(momentum="0.9"), dict(momentum=0.9, dampening="0.1"), dict(weight_decay=None)])
def test_non_numeric_hyperparameters_are_refused_by_name(hyper):
    name = next(k for k, v in hyper.items() if not isinstance(v, float))
    with pytest.raises(TypeError, match=f"{name} must be a float"):
        SGD([torch.randn(3, requires_grad=True)], lr=0.1, **hyper)


def test_numpy_scalar_lr_is_taken_as_torch_takes_it():
    mine, theirs = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    opts = SGD([mine], lr=np.float32(0.5)), torch.optim.SGD([theirs], lr=np.float32(0.5))
    for p, opt in zip((mine, theirs), opts):
        p.grad = torch.full_like(p, 2.0)
        opt.step()
    torch.testing.assert_close(mine, theirs)


@pytest.mark.parametrize("n", [1.5, "1", None, True])
def test_freeze_to_needs_an_int(n):
    opt = SGD([{"params": [torch.randn(3, requires_grad=True)]}, {"params": [torch.randn(3, requires_grad=True)]}])
    with pytest.raises(TypeError, match="n must be an int"):
        opt.freeze_to(n)


# ------------------------------------------------------------------------- lesson helpers


def test_even_mults_and_lr_range_follow_fastai():
    torch.testing.assert_close(torch.tensor(even_mults(1e-5, 1e-3, 3)), torch.tensor([1e-5, 1e-4, 1e-3]))
    assert even_mults(1e-5, 1e-3, 1) == [1e-3]
    assert lr_range(slice(1e-5, 1e-3), 3) == even_mults(1e-5, 1e-3, 3)
    assert lr_range(slice(1e-3), 3) == [1e-4, 1e-4, 1e-3]
    assert lr_range(3e-3, 2) == [3e-3, 3e-3]
    with pytest.raises(TypeError):
        lr_range("fast", 2)


@pytest.mark.parametrize("contiguous", [False, True], ids=["normal", "contiguous"])
def test_discriminative_groups_and_freezing_train_only_what_they_should(contiguous):
    body, head = torch.nn.Linear(4, 6).double(), torch.nn.Linear(6, 2).double()
    model = torch.nn.Sequential(body, torch.nn.ReLU(), head)
    opt = SGD(discriminative_param_groups([body, head], slice(1e-2), momentum=0.9), lr=0.5, contiguous=contiguous)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-2]
    assert all(g["momentum"] == 0.9 for g in opt.param_groups)

    def train_step():
        opt.zero_grad()
        model(torch.randn(5, 4, dtype=F64)).pow(2).mean().backward()
        opt.step()

    train_step()  # everything trains; every param now has a .grad and a momentum buffer
    opt.freeze()
    body_before = [p.detach().clone() for p in body.parameters()]
    head_before = [p.detach().clone() for p in head.parameters()]
    opt.step()  # stale gradients are still around: freezing must still keep the body still
    train_step()
    assert all(torch.equal(p, b) for p, b in zip(body.parameters(), body_before))
    assert not any(torch.equal(p, b) for p, b in zip(head.parameters(), head_before))
    opt.unfreeze()
    train_step()
    assert not any(torch.equal(p, b) for p, b in zip(body.parameters(), body_before))
    with pytest.warns(UserWarning, match="whole model is frozen"):
        opt.freeze_to(2)
    assert not any(p.requires_grad for p in model.parameters())


# ------------------------------------------------------------------------- torch.compile


def test_optimizer_step_compiles_fullgraph_and_matches_eager():
    """torch.compile traces the step through the functional op (no address-keyed caches); the
    first step (new buffers) and later ones match the eager optimizer bit for bit."""
    eager, compiled = (eager_and_compiled_sgd_run("auto", compiled) for compiled in (False, True))
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))
