"""Every Triton launcher runs its kernels on its tensors' device, not on the current one.

Triton launches on the current CUDA device, so tensors on cuda:1 while cuda:0 is current went to
kernels on cuda:0. The guard (kernels/_common.on_device_of) is checked here on CPU: every public
launcher carries it, and it switches the current device exactly when the tensors are elsewhere.
"""
import contextlib

import pytest
import torch

from fastcore5.kernels import _common, embedding_dot_bias, linear_relu, linear_relu_hopper, mlp, sgd

LAUNCHERS = [
    linear_relu.linear_relu_forward, linear_relu.linear_relu_backward,
    linear_relu_hopper.forward, linear_relu_hopper.backward,
    mlp.linear_forward, mlp.grad_input, mlp.grad_weight,
    embedding_dot_bias.embedding_dot_bias_forward, embedding_dot_bias.embedding_dot_bias_backward,
    sgd.sgd_step,
]


@pytest.mark.parametrize("launcher", LAUNCHERS, ids=lambda f: f"{f.__module__}.{f.__name__}")
def test_every_launcher_is_guarded(launcher):
    assert getattr(launcher, "device_guard", False)


class _OnDevice:
    """Stands in for a tensor on ``device``: what the guard reads of one (a CUDA tensor's
    get_device() is its device's index)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"

    def get_device(self):
        return self.device.index if self.is_cuda else -1


@pytest.fixture
def switches(monkeypatch):
    """cuda:0 is current; records every device the guard switches to."""
    seen = []

    @contextlib.contextmanager
    def device(d):
        seen.append(torch.device(d))
        yield

    monkeypatch.setattr(_common, "_current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", device)
    return seen


def test_the_guard_switches_to_the_tensors_device_only_when_it_is_not_current(switches):
    calls = []
    launch = _common.on_device_of(lambda args: args[0])(lambda t, n: calls.append(n) or n)
    assert launch(_OnDevice("cuda:1"), 1) == 1
    assert switches == [torch.device("cuda:1")]
    launch(_OnDevice("cuda:0"), 2)
    launch(_OnDevice("cpu"), 3)
    assert switches == [torch.device("cuda:1")] and calls == [1, 2, 3]


def test_sgd_with_no_params_launches_nothing_and_needs_no_device(switches):
    assert sgd.sgd_step([], [], [], None, 0.1, 0.0, 0.0, 0.0, False, False, False, False, None, None, None) is None
    assert switches == []
