"""Helpers shared by the test files: random EmbeddingDotBias inputs on the test device, the float64
reference run, the deterministic-algorithms and TF32 switches and the low-precision parity rule."""
import contextlib

import pytest
import torch

import fastcore5
from fastcore5 import reference
from fastcore5.kernels import segment_reduce

from conftest import DEVICE

# fastai's names of EmbeddingDotBias's four tables, as its state_dict keys.
FASTAI_KEYS = ("u_weight.weight", "i_weight.weight", "u_bias.weight", "i_bias.weight")


@pytest.fixture(autouse=True)
def tensors_on_test_device():
    """Factory calls without a device make their tensors on DEVICE (CUDA when there is one). An
    autouse fixture for the test files that import it."""
    with contextlib.nullcontext() if DEVICE == "cpu" else torch.device(DEVICE):
        yield


def random_tables(
    n_users, n_items, factors, dtype=torch.float32, *, bias_1d=False, device=None, requires_grad=False
):
    """Fresh normal u_weight, i_weight, u_bias, i_bias; biases (n, 1) as nn.Embedding's, or (n,)."""
    bias_shapes = ((n_users,), (n_items,)) if bias_1d else ((n_users, 1), (n_items, 1))
    shapes = ((n_users, factors), (n_items, factors)) + bias_shapes
    return [torch.randn(shape, dtype=dtype, device=device).requires_grad_(requires_grad) for shape in shapes]


def random_indices(n, batch, dtype=torch.int64, device=None):
    """``batch`` indices drawn uniformly from [0, n)."""
    return torch.randint(0, n, (batch,), dtype=dtype, device=device)


def reference_fwd_bwd(users, items, tables, y_range, grad_out):
    """Output and the four table gradients of fastcore5.reference, in float64."""
    tables64 = [t.detach().double().requires_grad_() for t in tables]
    out = reference.embedding_dot_bias(users.long(), items.long(), *tables64, y_range=y_range)
    out.backward(grad_out.double())
    return out.detach(), [t.grad for t in tables64]


def fused_fwd_bwd(users, items, tables, y_range, grad_out, **options):
    """Output and the four table gradients of fastcore5.embedding_dot_bias (``options``: sparse,
    validate) on fresh leaf copies of ``tables``."""
    tables = [t.detach().clone().requires_grad_() for t in tables]
    out = fastcore5.embedding_dot_bias(users, items, *tables, y_range=y_range, **options)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in tables]


@contextlib.contextmanager
def deterministic_algorithms(enabled=True):
    """torch.use_deterministic_algorithms(enabled) inside the block, the previous setting after."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def cuda_ops():
    """torch.ops.fastcore5_native, failing the test (not skipping it) when the extension was built
    without its CUDA kernels (a CPU-only fastcore5._C loads too): a GPU run is only complete with them."""
    missing = [
        op for op in fastcore5.backends.OPS
        if fastcore5.backends.unavailable_reason("cuda", op, torch.device("cuda")) is not None
    ]
    assert not missing, (
        f"fastcore5._C has no CUDA kernels for {missing}: FASTCORE5_BUILD_CUDA=1 pip install --no-deps "
        "--no-build-isolation -e ."
    )
    return torch.ops.fastcore5_native


@contextlib.contextmanager
def allow_tf32(enabled=True):
    """torch.backends.cuda.matmul.allow_tf32 = enabled inside the block, the previous setting after."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def use_segment_tile(monkeypatch, entries):
    """Make the deterministic backward's segment reduction cut tiles of ``entries``, so that small
    batches run through many carry levels."""
    monkeypatch.setattr(segment_reduce, "SEGMENT_TILE", entries)


def assert_parity(ours, torch_same_dtype, exact, atol, rtol=0.0, what="values", *, torch_exact=None):
    """The low-precision parity rule, element by element: each element of ``ours`` is within 2x
    PyTorch's own error *at that element* in the same dtype (``torch_same_dtype``), plus one
    rounding to ``ours``'s dtype (eps * |exact|: torch's result may have rounded the lucky way at
    an element where ours did not), plus atol + rtol*|exact|, against the float64 ``exact``. (It
    allowed every element twice torch's largest error, which hides a wrong small element beside
    a large one.)

    ``torch_exact``: the float64 reference PyTorch's result is measured against, where it is not
    ``exact`` (Linear+ReLU gradients follow each implementation's own ReLU mask)."""
    torch_exact = exact if torch_exact is None else torch_exact
    eps = torch.finfo(ours.dtype).eps if ours.dtype.is_floating_point else 0.0
    ours, torch_same_dtype = ours.double(), torch_same_dtype.double()
    torch_error = (torch_same_dtype - torch_exact).abs()
    allowed = 2 * torch_error + atol + (rtol + eps) * exact.abs()
    error = (ours - exact).abs()
    assert torch.isfinite(ours).all(), f"{what}: non-finite values"
    if not (error <= allowed).all():
        worst = (error - allowed).argmax()
        raise AssertionError(
            f"{what}: element {tuple(int(i) for i in torch.unravel_index(worst, error.shape))} is off by "
            f"{error.flatten()[worst].item():.3g} where torch's error there is {torch_error.flatten()[worst].item():.3g} "
            f"(exact {exact.flatten()[worst].item():.3g}; atol {atol:.3g}, rtol {rtol}, eps {eps:.3g})"
        )


def opcheck_embedding_dot_bias_ops(ops, users, items, tables, errors):
    """torch.library.opcheck on the C++ ops embedding_dot_bias_forward and _backward (either
    device's kernels) with 40 x 30 tables and 50 samples: with and without y_range and the
    index_errors flag, every backward mode, and a backward given only the table it needs."""
    torch.library.opcheck(ops.embedding_dot_bias_forward.default, (users, items, *tables, None, None, None))
    torch.library.opcheck(ops.embedding_dot_bias_forward.default, (users.int(), items, *tables, 0.5, 4.5, errors))
    grad_out = torch.randn(50, device=users.device)
    for deterministic, sparse in [(False, False), (True, False), (False, True)]:
        torch.library.opcheck(
            ops.embedding_dot_bias_backward.default,
            (grad_out, users, items, *tables, 40, 30, 1.0, 5.0, True, True, True, True, deterministic, sparse),
        )
    torch.library.opcheck(
        ops.embedding_dot_bias_backward.default,
        (grad_out, users, items, None, tables[1], None, None, 40, 30, None, None, True, False, False, False, False, False),
    )
