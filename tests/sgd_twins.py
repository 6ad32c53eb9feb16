"""Twin parameter sets for the SGD tests: torch.optim.SGD steps one, fastcore5.optim.SGD the
other, from equal values on equal gradients (float64 by default, so a wrong term shows far above
rounding), and the checks that the two stayed equal."""
from __future__ import annotations

import torch

F64 = torch.float64
SHAPES = [(7, 3), (1031,), (2, 2, 2), (1,)]



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


def eager_and_compiled_sgd_run(backend: str, compiled: bool) -> list[torch.Tensor]:
    """Params and momentum buffers after three fastcore5.optim.SGD steps (the first creates the
    buffers) on ``backend``, the step eager or torch.compile(fullgraph=True)'d; the same inputs
    on every call."""
    import fastcore5
    from fastcore5.optim import SGD

    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=generator) for s in [(5,), (3, 4), (1,), (4099,)]]
    grads = [[torch.randn(s.shape, generator=generator) for s in start] for _ in range(3)]
    params = [s.clone().requires_grad_() for s in start]
    optimizer = SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True)
    step = torch.compile(optimizer.step, fullgraph=True, backend="aot_eager") if compiled else optimizer.step
    with fastcore5.use_backend(backend):
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            step()
    return params + [optimizer.state[p]["momentum_buffer"] for p in params]
