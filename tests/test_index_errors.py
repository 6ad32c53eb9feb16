"""Out-of-range EmbeddingDotBias indices: the three validation modes, the kernels' bounds checks
on every backward path, the deferred IndexError and its message, and a step without host syncs.

On CPU the Triton kernels run through the interpreter; the "device" mode is exercised on CPU
tensors explicitly (its default is for CUDA tensors), with the flag read straight from memory.
"""
import contextlib

import pytest
import torch

import fastcore5
from fastcore5 import index_errors, reference

from conftest import DEVICE
from helpers import (
    deterministic_algorithms, fused_fwd_bwd, random_indices, random_tables, reference_fwd_bwd, use_segment_tile,
)

pytestmark = pytest.mark.any_device

N_USERS, N_ITEMS, FACTORS = 7, 9, 5


@pytest.fixture(autouse=True)
def _no_leftover_report():
    """A test that leaves a report pending must not make the next test's first call raise."""
    yield
    with contextlib.suppress(IndexError):
        index_errors.raise_pending(wait=True)


def tables(dtype=torch.float64, requires_grad=False):
    return random_tables(N_USERS, N_ITEMS, FACTORS, dtype, device=DEVICE, requires_grad=requires_grad)


def batch_with_bad_indices():
    """20 samples; sample 3 has user N_USERS (one past the table), sample 11 item -2."""
    users = random_indices(N_USERS, 20, device=DEVICE)
    items = random_indices(N_ITEMS, 20, device=DEVICE)
    users[3] = N_USERS
    items[11] = -2
    return users, items


GOOD = torch.tensor([i not in (3, 11) for i in range(20)])


def test_device_mode_scores_bad_samples_nan_and_raises_at_the_next_call():
    users, items = batch_with_bad_indices()
    u_weight, i_weight, u_bias, i_bias = tables()
    out = fastcore5.embedding_dot_bias(users, items, u_weight, i_weight, u_bias, i_bias, (0.0, 5.0), validate="device")
    good = GOOD.to(out.device)
    assert torch.isnan(out[~good]).all()
    expected = reference.embedding_dot_bias(users[good], items[good], u_weight, i_weight, u_bias, i_bias, (0.0, 5.0))
    torch.testing.assert_close(out[good], expected, atol=1e-12, rtol=1e-12)
    with pytest.raises(IndexError) as raised:
        index_errors.raise_pending(wait=True)
    message = str(raised.value)
    assert f"users contains the index {N_USERS}, out of range for u_weight with {N_USERS} rows" in message
    assert f"items contains the negative index -2; indices must lie in [0, {N_ITEMS})" in message
    # Raising clears the flag: the next calls run normally.
    index_errors.raise_pending(wait=True)
    fastcore5.embedding_dot_bias(users.clamp(0, N_USERS - 1), items.clamp(0, N_ITEMS - 1), u_weight, i_weight, u_bias, i_bias)


def test_any_fastcore5_call_reports_a_pending_bad_index():
    users, items = batch_with_bad_indices()
    fastcore5.embedding_dot_bias(users, items, *tables(), validate="device")
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    x, weight = torch.randn(3, 4, device=DEVICE), torch.randn(2, 4, device=DEVICE)
    with pytest.raises(IndexError, match="users contains the index 7"):
        fastcore5.linear_relu(x, weight)
    fastcore5.linear_relu(x, weight)


@pytest.mark.parametrize("path", ["atomic", "deterministic", "sparse"])
def test_bad_samples_contribute_no_gradient(path, monkeypatch):
    use_segment_tile(monkeypatch, 4)  # several carry levels on 20 samples
    users, items = batch_with_bad_indices()
    model_tables = tables()
    grad_out = torch.randn(20, dtype=torch.float64, device=DEVICE)
    with deterministic_algorithms(path == "deterministic"):
        _, grads = fused_fwd_bwd(
            users, items, model_tables, (-1.0, 2.0), grad_out, sparse=path == "sparse", validate="device"
        )
    good = GOOD.to(users.device)
    _, exact_grads = reference_fwd_bwd(users[good], items[good], model_tables, (-1.0, 2.0), grad_out[good])
    for grad, expected in zip(grads, exact_grads):
        grad = grad.to_dense() if path == "sparse" else grad
        torch.testing.assert_close(grad, expected, atol=1e-12, rtol=1e-12)
    with pytest.raises(IndexError):
        index_errors.raise_pending(wait=True)


def test_off_mode_reports_nothing_and_still_stays_inside_the_tables():
    users, items = batch_with_bad_indices()
    out = fastcore5.embedding_dot_bias(users, items, *tables(), validate="off")
    assert torch.isnan(out[~GOOD.to(out.device)]).all()
    assert not torch.isnan(out[GOOD.to(out.device)]).any()
    index_errors.raise_pending(wait=True)  # nothing was recorded


def test_sync_mode_raises_before_any_kernel_runs():
    users, items = batch_with_bad_indices()
    with pytest.raises(IndexError, match="users contains the index 7"):
        fastcore5.embedding_dot_bias(users, items, *tables(), validate="sync")
    index_errors.raise_pending(wait=True)


def test_module_passes_validate_through():
    model = fastcore5.nn.EmbeddingDotBias(3, N_USERS, N_ITEMS, validate="device").to(DEVICE)
    out = model(torch.tensor([[0, 1], [N_USERS + 5, 2]], device=DEVICE))
    assert torch.isnan(out[1]) and not torch.isnan(out[0])
    with pytest.raises(IndexError, match=f"index {N_USERS + 5}"):
        index_errors.raise_pending(wait=True)


def test_unknown_validate_mode_is_refused():
    users, items = batch_with_bad_indices()
    with pytest.raises(ValueError, match="validate must be None or one of"):
        fastcore5.embedding_dot_bias(users, items, *tables(), validate="later")


def test_message_counts_and_names_both_tensors():
    values = [3, 2, -4, 12, 10, 1, 0, 9, 9]
    message = index_errors.describe(values)
    assert "users contains the negative index -4" in message
    assert "users contains the index 12, out of range for u_weight with 10 rows" in message
    assert "items contains the index 9, out of range for i_weight with 9 rows" in message


class _HostSync(Exception):
    pass


@contextlib.contextmanager
def no_host_sync():
    """On a GPU: torch's sync debug mode turns any device-to-host sync into an error. On CPU:
    every way a tensor's value reaches Python raises, and the Triton launches (whose interpreter
    copies arguments to the host by design) become no-ops, so only fastcore5's own host path runs."""
    if DEVICE == "cuda":
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(0)
        return

    from triton.runtime.interpreter import InterpretedFunction

    def refuse(*args, **kwargs):
        raise _HostSync("a tensor's value was read on the host")

    names = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")
    saved = {name: getattr(torch.Tensor, name) for name in names}
    saved_run = InterpretedFunction.run
    try:
        for name in names:
            setattr(torch.Tensor, name, refuse)
        InterpretedFunction.run = lambda self, *args, **kwargs: None
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)
        InterpretedFunction.run = saved_run


def test_no_host_sync_catches_a_host_read():
    with pytest.raises((_HostSync, RuntimeError)):
        with no_host_sync():
            torch.ones(2, device=DEVICE).sum().item()


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_device_mode_forward_and_backward_read_nothing_on_the_host(deterministic):
    users, items = random_indices(N_USERS, 30, device=DEVICE), random_indices(N_ITEMS, 30, device=DEVICE)
    model_tables = tables(torch.float32, requires_grad=True)
    fastcore5.embedding_dot_bias(users, items, *model_tables, validate="device")  # creates the flag
    with deterministic_algorithms(deterministic), no_host_sync():
        out = fastcore5.embedding_dot_bias(users, items, *model_tables, (0.0, 5.5), validate="device")
        ((out - 3.0) ** 2).mean().backward()
    assert all(t.grad is not None for t in model_tables)


class _ManualEvent:
    """A CUDA event stand-in whose copy 'lands' when the test says so."""

    def __init__(self):
        self.landed = False
        self.records = 0  # one per copy started

    def record(self):
        self.landed = False
        self.records += 1

    def query(self):
        return self.landed

    def synchronize(self):
        self.landed = True


def _flag_with_asynchronous_copy(monkeypatch):
    """A CPU flag driven through the CUDA code path: a separate host buffer and a manual event."""
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    flag = index_errors._DeviceFlag(torch.device("cpu"))
    flag.host = torch.zeros(index_errors.SLOTS, dtype=torch.int64)
    flag.seen = flag.host.numpy()
    flag.event = _ManualEvent()
    return flag


def _kernel_records_a_bad_user(flag):
    flag.tensor.copy_(torch.tensor([1, 1, 0, 7, 7, 0, 0, 0, 9]))
    flag.after_launch()


def test_a_copy_started_before_the_latest_launch_is_not_taken_as_its_answer(monkeypatch):
    """The copy in flight was started after launch 1 (clean); launch 2 records a bad index. Waiting
    must report it (the stale copy said nothing about launch 2), and so must a later poll."""
    flag = _flag_with_asynchronous_copy(monkeypatch)
    flag.after_launch()  # launch 1, clean: its copy starts
    _kernel_records_a_bad_user(flag)  # launch 2 while that copy is in flight
    assert flag.report(wait=True) is not None

    flag = _flag_with_asynchronous_copy(monkeypatch)
    flag.after_launch()
    _kernel_records_a_bad_user(flag)
    flag.event.landed = True
    assert flag.report(wait=False) is None  # the landed copy is stale: a new one starts
    flag.event.landed = True
    values = flag.report(wait=False)
    assert values is not None and values[3] == 7


def test_polls_without_a_new_launch_do_not_copy_the_flag_each_time(monkeypatch):
    """Once a copy covering every known launch landed clean, a poll within POLL_SECONDS starts
    no device-to-host copy (every op polls once any flag exists)."""
    flag = _flag_with_asynchronous_copy(monkeypatch)
    flag.after_launch()
    flag.event.landed = True
    monkeypatch.setattr(index_errors._DeviceFlag, "POLL_SECONDS", 3600.0)
    for _ in range(5):
        assert flag.report(wait=False) is None
    assert flag.event.records == 1
    monkeypatch.setattr(index_errors._DeviceFlag, "POLL_SECONDS", 0.0)  # graph replays are seen by polls
    assert flag.report(wait=False) is None and flag.event.records == 2
