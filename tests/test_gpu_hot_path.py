"""The hot path on a GPU: whole training steps captured in a CUDA graph and replayed, the same
models under torch.compile (inductor, reduce-overhead), no host sync anywhere in a step, and a
bad index that neither syncs nor corrupts a parameter.

Each training step is EmbeddingDotBias (or an MLP of LinearReLU) forward, MSE loss, backward and
a fastcore5.optim.SGD(capturable=True) step whose tensor lr a scheduler drives. The eager run of
the same steps from the same start is the reference: bitwise equal on the deterministic paths.
"""
import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastcore5
from fastcore5 import index_errors
from fastcore5.nn import EmbeddingDotBias, LinearReLU
from fastcore5.optim import SGD

pytestmark = pytest.mark.gpu

STEPS = 6
N_USERS, N_ITEMS, BATCH = 300, 200, 512


@contextlib.contextmanager
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def collab_model():
    return EmbeddingDotBias(16, N_USERS, N_ITEMS, y_range=(0.0, 5.5)).cuda()


def mlp_model():
    return nn.Sequential(LinearReLU(64, 128), LinearReLU(128, 128), nn.Linear(128, 1)).cuda()


def collab_batches():
    return [
        (torch.stack([torch.randint(0, N_USERS, (BATCH,)), torch.randint(0, N_ITEMS, (BATCH,))], 1).cuda(),
         torch.rand(BATCH, device="cuda") * 5.5)
        for _ in range(STEPS)
    ]


def mlp_batches():
    return [(torch.randn(BATCH, 64, device="cuda"), torch.randn(BATCH, device="cuda")) for _ in range(STEPS)]


def make_optimizer(model):
    lr = torch.tensor(0.05, device="cuda")
    optimizer = SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4, capturable=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return optimizer, scheduler


def loss_of(model, x, y):
    return F.mse_loss(model(x).reshape(-1), y)


def train_step(model, optimizer, scheduler, x, y):
    optimizer.zero_grad(set_to_none=True)
    loss = loss_of(model, x, y)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.detach().clone()


def eager_run(model, batches):
    optimizer, scheduler = make_optimizer(model)
    return [train_step(model, optimizer, scheduler, x, y) for x, y in batches]


def graph_run(model, batches):
    """Warm up on a side stream (autotuning, flags, momentum buffers), capture one step, replay."""
    optimizer, scheduler = make_optimizer(model)
    static_x, static_y = (t.clone() for t in batches[0])
    losses = []
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        losses += [train_step(model, optimizer, scheduler, x, y) for x, y in batches[:2]]
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = loss_of(model, static_x, static_y)
        static_loss.backward()
        optimizer.step()
    for x, y in batches[2:]:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        scheduler.step()
        losses.append(static_loss.detach().clone())
    return losses


@pytest.mark.parametrize("make_model, make_batches", [(collab_model, collab_batches), (mlp_model, mlp_batches)],
                         ids=["collab", "mlp"])
def test_captured_training_step_replays_the_eager_steps(make_model, make_batches):
    torch.manual_seed(0)
    model = make_model()
    batches = make_batches()
    twin = copy.deepcopy(model)
    with deterministic():
        eager_losses = eager_run(model, batches)
        graph_losses = graph_run(twin, batches)
    for eager, graphed in zip(eager_losses, graph_losses):
        assert torch.equal(eager, graphed)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("make_model, make_batches", [(collab_model, collab_batches), (mlp_model, mlp_batches)],
                         ids=["collab", "mlp"])
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_model_trains_like_eager(make_model, make_batches, mode):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = make_model()
    batches = make_batches()
    twin = copy.deepcopy(model)
    reference = copy.deepcopy(model)
    compiled = torch.compile(twin, mode=mode, fullgraph=True)
    eager_losses = eager_run(model, batches)
    compiled_losses = eager_run(compiled, batches)
    with fastcore5.use_backend("torch"):  # the plain-PyTorch reference, not the same kernels again
        reference_losses = eager_run(reference, batches)
    for eager, got, want in zip(eager_losses, compiled_losses, reference_losses):
        torch.testing.assert_close(got, eager, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
    for p, q in zip(compiled.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-3, rtol=1e-3)


def test_inductor_compiles_the_optimizer_step():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, twin = collab_model(), None
    twin = copy.deepcopy(model)
    batches = collab_batches()
    optimizer = SGD(model.parameters(), lr=0.05, momentum=0.9)
    twin_optimizer = SGD(twin.parameters(), lr=0.05, momentum=0.9)
    compiled_step = torch.compile(twin_optimizer.step, fullgraph=True)
    for x, y in batches:
        for m, opt, step in ((model, optimizer, optimizer.step), (twin, twin_optimizer, compiled_step)):
            opt.zero_grad(set_to_none=True)
            loss_of(m, x, y).backward()
            step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("make_model, make_batches", [(collab_model, collab_batches), (mlp_model, mlp_batches)],
                         ids=["collab", "mlp"])
def test_training_step_never_syncs(make_model, make_batches):
    model = make_model()
    batches = make_batches()
    optimizer, scheduler = make_optimizer(model)
    x, y = batches[0]
    loss_of(model, x, y).backward()  # warm-up: autotuning and the index-error flag
    optimizer.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, y in batches[1:]:
            optimizer.zero_grad(set_to_none=True)
            loss_of(model, x, y).backward()
            optimizer.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_bad_index_skips_the_update_and_raises_at_the_next_step():
    model = collab_model()
    optimizer = SGD(model.parameters(), lr=0.1, momentum=0.9)
    good_x, y = collab_batches()[0]
    loss_of(model, good_x, y).backward()
    optimizer.step()
    torch.cuda.synchronize()
    before = [p.detach().clone() for p in model.parameters()]
    bad_x = good_x.clone()
    bad_x[7, 0] = N_USERS + 3
    torch.cuda.set_sync_debug_mode("error")
    try:
        optimizer.zero_grad(set_to_none=True)
        loss_of(model, bad_x, y).backward()  # no exception, no device-side assert, no sync
        optimizer.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    for p, q in zip(before, model.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(IndexError, match=f"users contains the index {N_USERS + 3}"):
        optimizer.step()
    loss_of(model, good_x, y).backward()
    optimizer.step()
    torch.cuda.synchronize()
    assert not all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
    index_errors.raise_pending(wait=True)


def test_functional_ops_compile_with_inductor():
    torch._dynamo.reset()
    x = torch.randn(64, 96, device="cuda", requires_grad=True)
    w = torch.randn(48, 96, device="cuda", requires_grad=True)
    b = torch.randn(48, device="cuda", requires_grad=True)
    compiled = torch.compile(fastcore5.linear_relu, fullgraph=True)
    out = compiled(x, w, b)
    out.sum().backward()
    grads = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    exact = [t.detach().double().requires_grad_() for t in (x, w, b)]
    expected = torch.relu(F.linear(*exact))
    expected.sum().backward()
    # torch's own fp32 result against float64 sets the scale of the error allowed
    with torch.no_grad():
        torch_error = (torch.relu(F.linear(x, w, b)).double() - expected).abs().max().item()
    tolerance = dict(atol=max(4 * torch_error, 1e-4), rtol=1e-3)
    torch.testing.assert_close(out.double(), expected, **tolerance)
    for got, t in zip(grads, exact):
        torch.testing.assert_close(got.double(), t.grad, **tolerance)


def test_opcheck_on_the_triton_ops():
    """torch.library.opcheck on the triton_op registrations (schema, fake tensor, autograd
    registration, AOT dispatch), as on the C++ ops in test_cuda_ops.py."""
    from fastcore5.ops import _library
    from fastcore5.ops.linear_relu import linear_relu_backward_op, linear_relu_op

    assert _library.SEES_TRITON_KERNELS, "this torch has no triton_op: the ops are plain custom ops"
    x, w, b = (torch.randn(*s, device="cuda") for s in ((32, 48), (24, 48), (24,)))
    torch.library.opcheck(linear_relu_op, (x, w, b, "triton"))
    torch.library.opcheck(linear_relu_op, (x, w, None, "triton"))
    out = linear_relu_op(x, w, b, "triton")
    grad_out = torch.randn_like(out)
    torch.library.opcheck(linear_relu_backward_op, (grad_out, out, x, w, True, True, True, "triton"))
    torch.library.opcheck(linear_relu_backward_op, (grad_out, out, None, None, False, False, True, "triton"))
