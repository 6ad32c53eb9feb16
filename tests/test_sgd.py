"""fastcore5.optim.SGD and the fused SGD op against torch.optim.SGD, the reference.

The reference is torch.optim.SGD itself (fastcore5.reference.sgd_step is checked against it in
test_reference.py): every trajectory below runs torch's optimizer and ours side by side from the
same start on the same fresh random gradients, in float64 so a wrong term shows up far above
rounding. The Triton kernel runs through the interpreter on CPU (conftest); its chunk size there
is 1024 elements in pieces of 256, so the 1031-element tensors cross both boundaries.
"""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

from fastcore5 import backends, reference
from fastcore5.kernels import sgd as sgd_kernels
from fastcore5.ops import sgd as sgd_ops
from fastcore5.optim import SGD, discriminative_param_groups, even_mults, lr_range

F64 = torch.float64
SHAPES = [(7, 3), (1031,), (2, 2, 2), (1,)]


# ------------------------------------------------------------------------------- reference


def torch_pair(shapes=SHAPES, dtype=F64, **config):
    """Twin params (torch's, ours) with equal values, and torch.optim.SGD over torch's."""
    theirs = [torch.randn(s, dtype=dtype, requires_grad=True) for s in shapes]
    ours = [p.detach().clone().requires_grad_() for p in theirs]
    return theirs, ours, torch.optim.SGD(theirs, foreach=False, **config)


def set_grads(theirs, ours, grads, contiguous=False):
    for p, q, g in zip(theirs, ours, grads):
        p.grad = g.clone()
        if contiguous:
            q.grad.copy_(g)  # contiguous mode: .grad is a view of the flat buffer; fill it in place
        else:
            q.grad = g.clone()


def assert_same(theirs, ours, atol=1e-13):
    for p, q in zip(theirs, ours):
        torch.testing.assert_close(q.detach(), p.detach(), rtol=0, atol=atol)


def assert_same_buffers(torch_opt, our_opt, theirs, ours, atol=1e-13):
    for p, q in zip(theirs, ours):
        expected = torch_opt.state.get(p, {}).get("momentum_buffer")
        got = our_opt.state.get(q, {}).get("momentum_buffer")
        assert (expected is None) == (got is None)
        if expected is not None:
            torch.testing.assert_close(got, expected, rtol=0, atol=atol)


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
    for-loop SGD gets the classic protocol (unscale, host check, skip). Overflows on step 0 (no
    momentum buffer exists yet) and on step 2 (buffers exist and must not change)."""
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
            assert {id(p): s["momentum_buffer"] for p, s in our_opt.state.items()}.keys() == buffers_before.keys()
            for p, s in our_opt.state.items():
                assert torch.equal(s["momentum_buffer"], buffers_before[id(p)])
        else:
            # after a taken step the grads are unscaled, as GradScaler leaves them for torch's SGD
            for p, q in zip(model.parameters(), twin.parameters()):
                torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-13)
    assert_same_buffers(torch_opt, our_opt, list(model.parameters()), list(twin.parameters()))
    assert not hasattr(our_opt, "found_inf")  # GradScaler removes what it set


def test_found_inf_leaves_every_tensor_bit_identical():
    ps = [torch.randn(s, dtype=torch.float32) for s in SHAPES]
    gs = [torch.randn_like(p) for p in ps]
    bufs = [torch.randn_like(p) for p in ps]
    before = [t.clone() for t in ps + gs + bufs]
    sgd_ops.step_tensors(
        ps, gs, bufs, False, lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.1, nesterov=False,
        maximize=False, decoupled_weight_decay=False, grad_scale=torch.tensor(8.0), found_inf=torch.tensor(1.0),
        backend="triton",
    )
    assert all(torch.equal(a, b) for a, b in zip(ps + gs + bufs, before))
    sgd_ops.step_tensors(
        ps, gs, bufs, False, lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.1, nesterov=False,
        maximize=False, decoupled_weight_decay=False, grad_scale=torch.tensor(8.0), found_inf=torch.tensor(0.0),
        backend="triton",
    )
    for g, g0 in zip(gs, before[len(ps): 2 * len(ps)]):
        torch.testing.assert_close(g, g0 / 8)
    assert not torch.equal(ps[0], before[0])


# -------------------------------------------------------------------------- contiguous mode


def _mlp():
    return torch.nn.Sequential(
        torch.nn.Linear(9, 31), torch.nn.ReLU(), torch.nn.Linear(31, 33), torch.nn.ReLU(), torch.nn.Linear(33, 2)
    ).double()


def test_contiguous_mode_matches_normal_mode_through_autograd():
    normal_net = _mlp()
    flat_net = copy.deepcopy(normal_net)
    config = dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.02)
    normal = SGD(normal_net.parameters(), **config)
    flat = SGD(flat_net.parameters(), contiguous=True, **config)
    (flat_bucket,) = flat._flats[0]
    slow_checks = []
    original_readopt = flat_bucket.readopt_grads
    flat_bucket.readopt_grads = lambda copy: slow_checks.append(copy) or original_readopt(copy)
    for p in flat_net.parameters():
        assert p.untyped_storage().data_ptr() == flat_bucket.flat_param.untyped_storage().data_ptr()
        assert p.grad.untyped_storage().data_ptr() == flat_bucket.flat_grad.untyped_storage().data_ptr()
        assert p.data_ptr() % 64 == 0
    for _ in range(3):
        x, y = torch.randn(8, 9, dtype=F64), torch.randn(8, 2, dtype=F64)
        for net, opt in ((normal_net, normal), (flat_net, flat)):
            opt.zero_grad()
            ((net(x) - y) ** 2).mean().backward()
            opt.step()
        assert_same(list(normal_net.parameters()), list(flat_net.parameters()))
    assert slow_checks == []  # the O(n) look at every .grad never ran: the O(1) signals sufficed
    # autograd accumulated into the flat views, and zero_grad is one fill of the flat buffer
    assert all(p.grad.untyped_storage().data_ptr() == flat_bucket.flat_grad.untyped_storage().data_ptr()
               for p in flat_net.parameters())
    flat.zero_grad()
    assert not flat_bucket.flat_grad.any()
    assert_same_buffers(normal, flat, list(normal_net.parameters()), list(flat_net.parameters()))


def test_contiguous_mode_survives_replaced_grads_and_refuses_a_moved_model():
    normal_net = _mlp()
    flat_net = copy.deepcopy(normal_net)
    normal = SGD(normal_net.parameters(), lr=0.1, momentum=0.9)
    flat = SGD(flat_net.parameters(), lr=0.1, momentum=0.9, contiguous=True)
    for step in range(2):
        x = torch.randn(4, 9, dtype=F64)
        for net, opt in ((normal_net, normal), (flat_net, flat)):
            net.zero_grad()  # set_to_none: the flat views are replaced by fresh gradients
            net(x).sum().backward()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                opt.step()
            if opt is flat:
                assert any("copied back" in str(w.message) for w in caught) == (step == 0)  # warned once
        assert_same(list(normal_net.parameters()), list(flat_net.parameters()))
    flat_net.float()
    with pytest.raises(RuntimeError, match="no longer live in the optimizer's flat buffer"):
        flat.step()


@pytest.mark.parametrize("how", ["one_dropped", "all_dropped_refs_kept"])
def test_contiguous_mode_notices_dropped_grads(how):
    """Two O(1) signals guard the fast path. One .grad set to None (its view freed) while the
    others accumulate: the storage's use count drops. Every .grad set to None while the old views
    are kept alive: the count stays, but backward writes nothing into the flat buffer, which its
    version counter shows. Either way the step must use the fresh gradients."""
    normal_net = _mlp()
    flat_net = copy.deepcopy(normal_net)
    normal = SGD(normal_net.parameters(), lr=0.1)
    flat = SGD(flat_net.parameters(), lr=0.1, contiguous=True)
    x = torch.randn(4, 9, dtype=F64)
    for net, opt in ((normal_net, normal), (flat_net, flat)):
        opt.zero_grad()
        net(x).sum().backward()
        opt.step()
    kept = [p.grad for p in flat_net.parameters()] if how == "all_dropped_refs_kept" else []
    for net in (normal_net, flat_net):
        for p in list(net.parameters())[: 1 if how == "one_dropped" else None]:
            p.grad = None
    x = torch.randn(4, 9, dtype=F64)
    for net, opt in ((normal_net, normal), (flat_net, flat)):
        net(x).sum().backward()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step()
    assert_same(list(normal_net.parameters()), list(flat_net.parameters()))
    assert len(kept) in (0, 6)


def test_contiguous_mode_mixed_dtypes_and_groups_match_torch():
    theirs = [torch.randn(s, dtype=d, requires_grad=True) for s, d in
              [((5, 3), F64), ((33,), torch.float32), ((4,), F64), ((7,), torch.float32)]]
    ours = [p.detach().clone().requires_grad_() for p in theirs]

    def groups(ps):
        return [{"params": ps[:3]}, {"params": ps[3:], "lr": 0.3, "nesterov": True}]

    torch_opt = torch.optim.SGD(groups(theirs), lr=0.1, momentum=0.9, foreach=False)
    our_opt = SGD(groups(ours), lr=0.1, momentum=0.9, contiguous=True)
    assert [len(f) for f in our_opt._flats.values()] == [2, 1]  # one flat buffer per (group, dtype)
    for _ in range(3):
        set_grads(theirs, ours, [torch.randn_like(p) for p in theirs], contiguous=True)
        torch_opt.step()
        our_opt.step()
    assert_same(theirs, ours, atol=2e-6)


# ------------------------------------------------------------------- dtypes and devices


def test_bf16_params_within_twice_torch_error():
    """Parity rule for low precision: our error against a float64 run is at most 2x torch's
    bf16 optimizer's error (plus a small atol). Our math is fp32 in registers; torch rounds to
    bf16 after every op, so ours is usually the more accurate one."""
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
        torch_err = (t.double() - e).abs().max()
        our_err = (o.double() - e).abs().max()
        assert our_err <= 2 * torch_err + 1e-3, (our_err, torch_err)


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
    assert [len(launch.params) for launch in our_opt._plans[0].launches] == [1, 2, 1, 1]
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
    with pytest.raises(ValueError, match=r"grads\[0\] must be a dense tensor"):
        sgd_ops.sgd_step([torch.randn(4, 3)], [torch.randn(3, 4).T], [None], lr=0.1)
    with pytest.raises(ValueError, match="found_inf must have exactly one element"):
        sgd_ops.sgd_step([p.detach()], [torch.randn(3)], [None], lr=0.1, found_inf=torch.zeros(2))


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
            False, True, not first_step, first_step, torch.tensor(4.0), torch.tensor(0.0), "triton")
    torch.library.opcheck(sgd_ops.sgd_step_op, args)


def test_custom_op_under_torch_compile_fullgraph():
    """The op traces (fake impl, list mutations functionalised) and the compiled call mutates the
    caller's tensors and orders the read after the update."""
    params = [torch.randn(5, 3, dtype=F64), torch.randn(300, dtype=F64)]
    grads = [torch.randn_like(p) for p in params]
    buffers = [torch.randn_like(p) for p in params]
    expected, expected_buffers = [p.clone() for p in params], [b.clone() for b in buffers]

    def step(ps, gs, bs, lr):
        sgd_ops.sgd_step_op(ps, gs, bs, lr, 0.0, 0.9, 0.1, 0.01, False, True, False, False, None, None, "triton")
        return ps[0].sum()

    total = torch.compile(step, backend="aot_eager", fullgraph=True)(params, grads, buffers, torch.tensor(0.1, dtype=F64))
    reference.sgd_step(expected, grads, expected_buffers, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01,
                       maximize=True)
    for got, want in zip(params + buffers, expected + expected_buffers):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-13)
    torch.testing.assert_close(total, expected[0].sum(), rtol=0, atol=1e-12)


def test_torch_backend_follows_the_same_protocol():
    """The "torch" backend (reference + host-side GradScaler protocol) and the Triton kernel agree."""
    results = []
    for backend in ("torch", "triton"):
        torch.manual_seed(3)
        ps = [torch.randn(s, dtype=F64, requires_grad=True) for s in SHAPES]
        opt = SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
        opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.tensor(0.0)
        with backends.use_backend(backend):
            for _ in range(2):
                for p in ps:
                    p.grad = torch.randn_like(p)
                opt.step()
        results.append(ps)
    assert_same(*results)


def test_host_side_descriptions_are_cached():
    """The plan (which params step in which launch) is rebuilt only when the set of gradients,
    the buffers or momentum change; the kernel's chunk table is reused while addresses repeat."""
    ps = [torch.randn(s, dtype=F64, requires_grad=True) for s in SHAPES]
    for p in ps:
        p.grad = torch.randn_like(p)
    opt = SGD(ps, lr=0.1, momentum=0.9)
    builds = []
    original = opt._plan
    opt._plan = lambda *a: builds.append(1) or original(*a)
    opt.step()  # builds a plan, creates buffers
    opt.step()  # rebuilds once: the buffers exist now
    sgd_kernels._tables.clear()
    for _ in range(3):
        opt.step()
    assert len(builds) == 2
    assert len(sgd_kernels._tables) == 1  # same grads and buffers: one table, reused
    ps[2].grad = None
    opt.step()
    assert len(builds) == 3


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
