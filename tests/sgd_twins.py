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
