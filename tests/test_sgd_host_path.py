"""fastcore5.optim.SGD's host-side machinery: contiguous mode's flat buffers, normal mode's plan
cache, a step that never reads a device value on the host, and CUDA-graph capture. Each result
is compared with normal mode or torch.optim.SGD (float64 twins, see sgd_twins.py).
"""
from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import numpy as np
import torch

from fastcore5 import backends
from fastcore5.optim import SGD

from sgd_twins import F64, SHAPES, assert_same, assert_same_buffers, set_grads


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


# ---------------------------------------------------------------------- normal mode's plans


def test_host_side_descriptions_are_cached():
    """The plan (which params step in which launch) is rebuilt only when the set of gradients,
    the buffers, momentum or a param's address change; new gradient tensors at the addresses of
    earlier ones reuse the kernel's chunk table; a gradient laid out unlike its param is refused."""
    ps = [torch.randn(s, dtype=F64, requires_grad=True) for s in SHAPES]
    grads = [torch.randn_like(p) for p in ps]
    for p, g in zip(ps, grads):
        p.grad = g
    with backends.use_backend("triton"):  # the Triton launcher's chunk tables are what is checked
        opt = SGD(ps, lr=0.1, momentum=0.9)
        builds = []
        original = opt._plan
        opt._plan = lambda *a: builds.append(1) or original(*a)
        opt.step()  # builds a plan, creates buffers
        opt.step()  # rebuilds once: the buffers exist now
        (launch,) = opt._plans[0].launches
        tables = launch.prepared.triton.tables
        tables.clear()
        for _ in range(3):
            for p, g in zip(ps, grads):
                p.grad = g.view(g.shape)  # a new tensor object at the same address, as set_to_none gives
            opt.step()
        assert len(builds) == 2
        assert len(tables) == 1  # same addresses: one table, reused
        ps[0].grad = torch.randn(3, 7, dtype=F64).T
        with pytest.raises(ValueError, match=r"the \.grad of param 0 of param group 0 must be a dense tensor"):
            opt.step()
        ps[0].grad = torch.randn_like(ps[0])
        ps[1].data = ps[1].detach().clone()  # the param moved: the plan must follow it
        expected = ps[1].detach() - 0.1 * (0.9 * opt.state[ps[1]]["momentum_buffer"] + ps[1].grad)
        opt.step()
        assert len(builds) == 3
        torch.testing.assert_close(ps[1].detach(), expected, rtol=0, atol=1e-13)
        ps[2].grad = None
        opt.step()
        assert len(builds) == 4


def test_step_hooks_and_profiler_label_work_as_torchs():
    """SGD.step runs torch.optim's hook protocol itself (torch's wrapper would enter a profiler
    label at every step): global and per-optimizer pre-hooks (which may replace the arguments) and
    post-hooks, in torch's order, and the label "Optimizer.step#SGD.step" while a profiler runs."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    assert getattr(SGD.step, "hooked", False)
    p = torch.nn.Parameter(torch.randn(5))
    opt = SGD([p], lr=0.1)
    calls = []
    handles = [
        register_optimizer_step_pre_hook(lambda o, args, kwargs: calls.append(("global pre", o, args, kwargs))),
        opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", len(args))) or ((o,), {"closure": None})),
        opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", args, kwargs))),
        register_optimizer_step_post_hook(lambda o, args, kwargs: calls.append(("global post",))),
    ]
    try:
        p.grad = torch.randn_like(p)
        assert opt.step(lambda: torch.tensor(2.0)) is None  # the pre-hook replaced the closure
        assert [c[0] for c in calls] == ["global pre", "pre", "post", "global post"]
        assert calls[0][1] is opt and len(calls[0][2]) == 2 and calls[1] == ("pre", 2)
        assert calls[2] == ("post", (opt,), {"closure": None})
    finally:
        for handle in handles:
            handle.remove()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    assert "Optimizer.step#SGD.step" in {event.name for event in prof.events()}


# ------------------------------------------------------------------------ no host sync, capture

HOST_READS = ("item", "cpu", "tolist", "__float__", "__bool__", "__int__", "__index__")


@pytest.fixture
def no_host_reads(monkeypatch):
    """Inside the block, every way of reading a tensor's value on the host raises."""
    @contextlib.contextmanager
    def forbid():
        with monkeypatch.context() as m:
            for name in HOST_READS:
                def refuse(self, *args, _name=name, **kwargs):
                    raise AssertionError(f"host read Tensor.{_name} inside an optimizer step")
                m.setattr(torch.Tensor, name, refuse)
            yield

    return forbid


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("contiguous", [False, True], ids=["normal", "contiguous"])
def test_a_step_never_reads_a_device_value_on_the_host(backend, contiguous, no_host_reads):
    """First steps (buffers created), GradScaler steps (overflowed and not), a tensor lr, the index
    error flag and a scheduler: none of it reads a tensor's value on the host. The same run
    without the patch is the reference."""
    def run(forbid):
        torch.manual_seed(5)
        ps = [torch.randn(s, dtype=F64, requires_grad=True) for s in SHAPES]
        opt = SGD(ps, lr=torch.tensor(0.1, dtype=F64), momentum=0.9, weight_decay=0.01, contiguous=contiguous)
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        for step in range(3):
            for p in ps:
                if contiguous:
                    p.grad.copy_(torch.randn_like(p))
                else:
                    p.grad = torch.randn_like(p)
            opt.grad_scale = torch.tensor(2.0, dtype=F64)
            opt.found_inf = torch.tensor(1.0 if step == 0 else 0.0, dtype=F64)
            with backends.use_backend(backend), forbid():
                opt.step()
            del opt.grad_scale, opt.found_inf
            scheduler.step()
        return ps

    assert_same(run(contextlib.nullcontext), run(no_host_reads))


def test_the_no_host_read_patch_catches_a_host_read(no_host_reads):
    with no_host_reads(), pytest.raises(AssertionError, match="host read Tensor.__float__"):
        float(torch.tensor(1.0))


def test_capturable_refuses_what_cannot_be_captured():
    p = torch.randn(4, requires_grad=True)
    with pytest.raises(ValueError, match="capturable=True needs lr as a tensor"):
        SGD([p], lr=0.1, capturable=True)
    opt = SGD([p], lr=torch.tensor(0.1), capturable=True)
    opt.param_groups[0]["lr"] = 0.2  # a float slipped in later: a replay would never see it change
    p.grad = torch.randn_like(p)
    with pytest.raises(ValueError, match="lr as a tensor on its params' device"):
        opt.step()
    opt.param_groups[0]["lr"] = torch.tensor(0.2)
    before = p.detach().clone()
    opt.step()  # eager steps of a capturable optimizer are ordinary steps
    torch.testing.assert_close(p.detach(), before - 0.2 * p.grad)


def _cuda_graph_training(capturable_steps, lr_values, contiguous=False, set_to_none=False):
    """A small MLP trained by a captured step (forward, loss, backward, optimizer step) replayed
    with the tensor lr changed in place (as a scheduler does), next to the same run done eagerly.
    With set_to_none the captured backward allocates new gradients in the graph's pool, so the
    step builds its chunk table during the capture."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).cuda()
    eager_model = copy.deepcopy(model)
    data = [(torch.randn(16, 32, device="cuda"), torch.randn(16, 8, device="cuda")) for _ in range(capturable_steps)]
    config = dict(momentum=0.9, weight_decay=1e-3, nesterov=True)
    opt = SGD(model.parameters(), lr=torch.tensor(lr_values[0], device="cuda"), capturable=True, contiguous=contiguous,
              **config)
    eager_opt = SGD(eager_model.parameters(), lr=torch.tensor(lr_values[0], device="cuda"), **config)
    x_static, y_static = data[0][0].clone(), data[0][1].clone()

    def train_step(net, optimizer, x, y):
        optimizer.zero_grad(set_to_none=set_to_none)
        torch.nn.functional.mse_loss(net(x), y).backward()
        optimizer.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        train_step(model, opt, x_static, y_static)  # warm-up: creates the momentum buffers
    torch.cuda.current_stream().wait_stream(side)
    train_step(eager_model, eager_opt, *data[0])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        train_step(model, opt, x_static, y_static)
    for step in range(1, capturable_steps):
        for o in (opt, eager_opt):
            o.param_groups[0]["lr"].fill_(lr_values[step])
        x_static.copy_(data[step][0])
        y_static.copy_(data[step][1])
        graph.replay()
        train_step(eager_model, eager_opt, *data[step])
    torch.cuda.synchronize()
    return model, eager_model


@pytest.mark.gpu
@pytest.mark.parametrize("contiguous,set_to_none", [(False, False), (False, True), (True, False)],
                         ids=["normal", "normal-set_to_none", "contiguous"])
def test_cuda_graph_captured_step_replays_like_eager(contiguous, set_to_none):
    lrs = [0.05, 0.04, 0.03, 0.02, 0.01]
    model, eager_model = _cuda_graph_training(len(lrs), lrs, contiguous, set_to_none)
    for p, q in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


@pytest.mark.gpu
def test_capture_without_capturable_is_refused():
    p = torch.randn(8, device="cuda", requires_grad=True)
    opt = SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.randn_like(p)
    opt.step()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="capturable=True"):
        with torch.cuda.graph(graph):
            opt.step()


@pytest.mark.gpu
@pytest.mark.parametrize("contiguous", [False, True], ids=["normal", "contiguous"])
def test_training_step_has_no_sync_on_cuda(contiguous):
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).cuda()
    opt = SGD(model.parameters(), lr=torch.tensor(0.05, device="cuda"), momentum=0.9, contiguous=contiguous)
    scaler = torch.amp.GradScaler("cuda")
    x, y = torch.randn(16, 32, device="cuda"), torch.randn(16, 8, device="cuda")
    loss = torch.nn.functional.mse_loss(model(x), y)
    scaler.scale(loss).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()  # first step: buffers are created
        opt.step()
        opt.grad_scale = torch.tensor(4.0, device="cuda")
        opt.found_inf = torch.tensor(1.0, device="cuda")
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        for name in ("grad_scale", "found_inf"):
            opt.__dict__.pop(name, None)


def test_a_table_built_during_graph_capture_pins_no_memory(monkeypatch):
    """After zero_grad(set_to_none=True) the captured step's gradients have new addresses, so a new
    chunk table is built while the stream is capturing. Pinning host memory allocates, which
    capture forbids: the table must fill a block pinned before capture began. Simulated on CPU:
    the launch believes it is on CUDA, pinning records whether capture was on."""
    from fastcore5.kernels import sgd as sgd_kernels

    capturing = [False]
    pinned_while_capturing = []

    def pinned_empty(shape):
        pinned_while_capturing.append(capturing[0])
        return torch.empty(shape, dtype=torch.int64)

    monkeypatch.setattr(sgd_kernels, "_pinned_empty", pinned_empty)
    monkeypatch.setattr(sgd_kernels, "_to_device", lambda pinned, device: pinned)
    monkeypatch.setattr(sgd_kernels, "_capturing", lambda device: capturing[0])
    params = [torch.randn(3000), torch.randn(7)]
    launch = sgd_kernels.StepLaunch(params, [torch.zeros_like(p) for p in params])
    launch.device = torch.device("cuda")
    launch.table_for([torch.randn_like(p) for p in params])  # eager: pins, keeps spares
    capturing[0] = True
    grads = [torch.randn_like(p) for p in params]
    table, _ = launch.table_for(grads)
    assert True not in pinned_while_capturing
    expected_offsets = (np.array([g.data_ptr() for g in grads]) - params[0].data_ptr()) // 4
    assert table[0, 1].item() == expected_offsets[0] and table[-1, 1].item() == expected_offsets[1]


def test_the_step_launch_passes_its_constexprs_positionally(monkeypatch):
    """The kernel's 13 constexprs go positionally from a tuple cached per combination of flags: a
    launch with ~25 keyword arguments spent ~1 us of host time binding them."""
    from fastcore5.kernels import sgd as sgd_kernels

    launches = []
    real_run = sgd_kernels.sgd_kernel.run
    monkeypatch.setattr(sgd_kernels.sgd_kernel, "run", lambda *a, **k: launches.append((a, k)) or real_run(*a, **k))
    params = [torch.randn(300), torch.randn(7)]
    for _ in range(2):
        sgd_kernels.sgd_step(params, [torch.randn_like(p) for p in params], [torch.zeros_like(p) for p in params],
                             None, 0.1, 0.9, 0.0, 0.0, False, False, False, True, None, None, None)
    assert [set(kwargs) for _, kwargs in launches] == [{"grid", "warmup", "num_warps"}] * 2
    assert len(launches[0][0]) == len(sgd_kernels.sgd_kernel.arg_names)
