"""Reliability (issue 21): a refused call changes nothing, every backend keeps the same promise,
and misuse gets an error naming the argument. Each class of the issue has its section; the random
search over the whole public API is tests/test_fuzz.py."""
from __future__ import annotations

import pytest
import torch

import fastcore5
from fastcore5.optim import SGD

from reliability_helpers import CPU_BACKENDS, assert_unchanged, snapshot

F64 = torch.float64


def _params(n=3, shape=(4, 3)):
    return [torch.randn(shape, dtype=F64, requires_grad=True) for _ in range(n)]


# --------------------------------------------------------------- 1. a step is all or nothing


def _spoil_later_group_buffer(opt, params):
    opt.state[params[2]]["momentum_buffer"] = torch.ones(1, dtype=F64)  # broadcastable, wrong shape


def _spoil_later_group_lr(opt, params):
    opt.param_groups[1]["lr"] = "0.1"


def _spoil_later_group_grad_layout(opt, params):
    params[2].grad = torch.randn(3, 4, dtype=F64).T  # the Triton kernel walks memory: refused


SPOILERS = {
    "momentum buffer of another shape": (_spoil_later_group_buffer, ValueError, "param 0 of param group 1"),
    "lr of another type": (_spoil_later_group_lr, TypeError, "lr must be a float"),
    "gradient laid out unlike its param": (_spoil_later_group_grad_layout, ValueError, "param 0 of param group 1"),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("contiguous", [False, True], ids=["normal", "contiguous"])
@pytest.mark.parametrize("spoiler", list(SPOILERS))
def test_a_refused_step_changes_nothing_in_any_group(backend, contiguous, spoiler):
    spoil, error, match = SPOILERS[spoiler]
    if spoiler == "gradient laid out unlike its param" and (backend == "torch" or contiguous):
        pytest.skip("only the Triton kernel in normal mode needs a gradient laid out like its param")
    if spoiler == "momentum buffer of another shape" and contiguous:
        pytest.skip("contiguous mode holds the buffers itself; load_state_dict is its way in (class 2 tests)")
    params = _params()
    opt = SGD([{"params": params[:2]}, {"params": params[2:], "lr": 0.2}], lr=0.1, momentum=0.9, dampening=0.3,
              contiguous=contiguous)
    with fastcore5.use_backend(backend):
        for p in params:
            p.grad = torch.randn_like(p) if not contiguous else p.grad.copy_(torch.randn_like(p))
        opt.step()  # group 0 and 1 have buffers now; add a param without one to group 0's next step
        for p in params:
            if contiguous:
                p.grad.copy_(torch.randn_like(p))
            else:
                p.grad = torch.randn_like(p)
        spoil(opt, params)
        before = snapshot(params, opt)
        with pytest.raises(error, match=match):
            opt.step()
        assert_unchanged(before, snapshot(params, opt), "a refused step")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_refused_first_step_creates_no_momentum_buffer(backend):
    """The Triton step used to create (zero) buffers before refusing; the next valid step then
    stored (1 - dampening) * g where torch stores g."""
    params = _params(2)
    twins = [p.detach().clone().requires_grad_() for p in params]
    ours = SGD(params, lr=0.1, momentum=0.9, dampening=0.5)
    theirs = torch.optim.SGD(twins, lr=0.1, momentum=0.9, dampening=0.5)
    grads = [torch.randn_like(p) for p in params]
    with fastcore5.use_backend(backend):
        params[0].grad = grads[0].clone()
        params[1].grad = torch.randn(3, 4, dtype=F64).T
        opt_state_before = snapshot(params, ours)
        if backend == "triton":
            with pytest.raises(ValueError, match="param 1 of param group 0"):
                ours.step()
            assert_unchanged(opt_state_before, snapshot(params, ours), "a refused step")
        for p, t, g in zip(params, twins, grads):
            p.grad, t.grad = g.clone(), g.clone()
        ours.step()
    theirs.step()
    for p, t in zip(params, twins):
        torch.testing.assert_close(p.detach(), t.detach(), rtol=0, atol=1e-14)
        torch.testing.assert_close(ours.state[p]["momentum_buffer"], theirs.state[t]["momentum_buffer"], rtol=0, atol=1e-14)
