"""fastcore5.embedding_dot_bias against the float64 reference: values, gradients (dense, sparse,
deterministic), opcheck, torch.compile, and bad input to the op and to nn.EmbeddingDotBias. The
module as fastai's drop-in is tested in test_embedding_dot_bias_module.py.

On CPU the Triton kernels run through the interpreter (conftest), so shapes are small and large
blocks of samples go to each program. Every comparison is against fastcore5.reference in float64
on fresh random tables (never zeros); launcher outputs are NaN-poisoned (FASTCORE5_POISON=1).
With a CUDA device the same tests make their tensors on it and run the compiled kernels.
"""
import numpy as np
import pytest
import torch
from torch import nn

import fastcore5
from fastcore5.kernels import embedding_dot_bias as kernels
from fastcore5.kernels import segment_reduce
from fastcore5.nn import EmbeddingDotBias
from fastcore5.ops.embedding_dot_bias import embedding_dot_bias_backward_op, embedding_dot_bias_op
from fastcore5.ops.embedding_dot_bias_checks import check_y_range

from helpers import (  # noqa: F401 (tensors_on_test_device is an autouse fixture)
    FASTAI_KEYS, assert_parity, deterministic_algorithms, fused_fwd_bwd, random_indices, random_tables,
    reference_fwd_bwd, tensors_on_test_device, use_segment_tile,
)

pytestmark = pytest.mark.any_device


@pytest.fixture(autouse=True)
def triton_backend():
    """The Triton kernels (on CPU the cpu backend would run first): the tests that hold for every
    backend run on the C++ CPU kernels too, from tests/test_cpu_embedding_dot_bias.py."""
    with fastcore5.use_backend("triton"):
        yield


def zipf_indices(n, batch, exponent=1.2):
    """Indices with P(row k) proportional to 1 / (k + 1)^exponent: a few rows take most samples."""
    weights = 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** exponent
    return torch.multinomial(weights, batch, replacement=True)


@pytest.fixture(params=["atomic", "deterministic"])
def backward_path(request):
    """Run the test body with the atomic backward, then with the sorted deterministic one."""
    with deterministic_algorithms(request.param == "deterministic"):
        yield request.param


DTYPE_TOLERANCES = [
    (torch.float64, 1e-12, 1e-12),
    (torch.float32, 1e-5, 1e-5),
    (torch.bfloat16, 1e-2, 0.0),
    (torch.float16, 1e-3, 0.0),
]


# --- values and gradients ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_TOLERANCES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("y_range", [None, (0.5, 5.5)], ids=["no_range", "y_range"])
def test_matches_reference(dtype, atol, rtol, y_range, backward_path):
    # 13 x 17 rows for 600 samples: every row repeats; D = 70 spans two column blocks; the
    # batch spans two interpreter programs and two levels of deterministic tiles.
    users = random_indices(13, 600)
    items = random_indices(17, 600, torch.int32)
    tables = random_tables(13, 17, 70, dtype)
    grad_out = torch.randn(600, dtype=dtype)
    out, grads = fused_fwd_bwd(users, items, tables, y_range, grad_out)
    exact_out, exact_grads = reference_fwd_bwd(users, items, tables, y_range, grad_out)
    torch_out, torch_grads = fused_in_torch(users, items, tables, y_range, grad_out)
    assert out.dtype == dtype and out.shape == (600,)
    assert_parity(out, torch_out, exact_out, atol, rtol, "output")
    for name, table, grad, torch_grad, exact in zip(FASTAI_KEYS, tables, grads, torch_grads, exact_grads):
        assert grad.dtype == dtype and grad.shape == table.shape, name
        assert_parity(grad, torch_grad, exact, atol, rtol, f"grad of {name}")


def fused_in_torch(users, items, tables, y_range, grad_out):
    """The same computation by the "torch" backend (the reference in the tables' dtype)."""
    with fastcore5.use_backend("torch"):
        return fused_fwd_bwd(users, items, tables, y_range, grad_out)


def test_strided_tables_indices_and_grad_out(backward_path):
    """Transposed weight storage, biases that are columns of wider tensors, indices that are the
    columns of a (B, 2) tensor, and an expanded grad_out (from .sum())."""
    n_users, n_items, factors, batch = 11, 7, 5, 97
    u_weight = torch.randn(factors, n_users, dtype=torch.float64).t()
    i_weight = torch.randn(factors, n_items, dtype=torch.float64).t()
    u_bias = torch.randn(n_users, 3, dtype=torch.float64)[:, 1:2]
    i_bias = torch.randn(n_items, 2, dtype=torch.float64)[:, 0]
    pairs = torch.stack([random_indices(n_users, batch), random_indices(n_items, batch)], dim=1)
    tables = [t.requires_grad_() for t in (u_weight, i_weight, u_bias, i_bias)]
    out = fastcore5.embedding_dot_bias(pairs[:, 0], pairs[:, 1], *tables, y_range=(-1.0, 3.0))
    out.sum().backward()
    exact_out, exact_grads = reference_fwd_bwd(
        pairs[:, 0], pairs[:, 1], tables, (-1.0, 3.0), torch.ones(batch, dtype=torch.float64)
    )
    torch.testing.assert_close(out, exact_out, atol=1e-12, rtol=1e-12)
    for table, exact in zip(tables, exact_grads):
        torch.testing.assert_close(table.grad, exact.reshape(table.shape), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("batch", [0, 1, 2])
def test_tiny_batches(batch, backward_path):
    users, items = random_indices(6, batch), random_indices(9, batch)
    tables = random_tables(6, 9, 4)
    grad_out = torch.randn(batch)
    out, grads = fused_fwd_bwd(users, items, tables, (0.0, 5.5), grad_out)
    exact_out, exact_grads = reference_fwd_bwd(users, items, tables, (0.0, 5.5), grad_out)
    assert out.shape == (batch,)
    torch.testing.assert_close(out.double(), exact_out, atol=1e-5, rtol=1e-5)
    for table, grad, exact in zip(tables, grads, exact_grads):
        assert grad.shape == table.shape
        torch.testing.assert_close(grad.double(), exact, atol=1e-5, rtol=1e-5)


def test_int32_and_int64_indices_agree():
    users, items = random_indices(20, 300), random_indices(30, 300)
    tables = random_tables(20, 30, 16)
    grad_out = torch.randn(300)
    out64, grads64 = fused_fwd_bwd(users, items, tables, (1.0, 5.0), grad_out)
    out32, grads32 = fused_fwd_bwd(users.int(), items.int(), tables, (1.0, 5.0), grad_out)
    assert torch.equal(out32, out64)
    exact_out, exact_grads = reference_fwd_bwd(users, items, tables, (1.0, 5.0), grad_out)
    torch.testing.assert_close(out64.double(), exact_out, atol=1e-5, rtol=1e-5)
    for grad32, grad64, exact in zip(grads32, grads64, exact_grads):
        torch.testing.assert_close(grad32, grad64, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(grad64.double(), exact, atol=1e-5, rtol=1e-5)


def skewed_indices(skew, batch):
    """(users, items) where a few rows take most of the batch."""
    if skew == "one_user":
        return torch.full((batch,), 3, dtype=torch.int64), random_indices(40, batch)
    return random_indices(50, batch), zipf_indices(40, batch)


def check_skewed_batch(skew, batch):
    users, items = skewed_indices(skew, batch)
    tables = random_tables(50, 40, 6, torch.float64)
    grad_out = torch.randn(batch, dtype=torch.float64)
    out, grads = fused_fwd_bwd(users, items, tables, (0.0, 5.0), grad_out)
    exact_out, exact_grads = reference_fwd_bwd(users, items, tables, (0.0, 5.0), grad_out)
    torch.testing.assert_close(out, exact_out, atol=1e-12, rtol=1e-12)
    for grad, exact in zip(grads, exact_grads):
        torch.testing.assert_close(grad, exact, atol=1e-11, rtol=1e-11)


@pytest.mark.parametrize("skew", ["one_user", "zipf_items"])
def test_heavy_duplicates(skew, backward_path):
    """Rows hit by most of the batch: every sample the same user, or Zipf-distributed items."""
    check_skewed_batch(skew, 600)


@pytest.mark.parametrize("skew", ["one_user", "zipf_items"])
def test_heavy_duplicates_through_many_carry_levels(skew, monkeypatch):
    """Tiles of 4 entries halve the sequence per level: 150 samples take 7 levels."""
    use_segment_tile(monkeypatch, 4)
    with deterministic_algorithms():
        check_skewed_batch(skew, 150)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_deterministic_low_precision_gradients_are_rounded_once(dtype, monkeypatch):
    """The deterministic path writes each gradient row's fp32 sum once, so bf16/fp16 gradients
    equal the same computation on fp32 copies of the tables, rounded at the end (no partial
    sums rounded on the way)."""
    use_segment_tile(monkeypatch, 8)
    users, items = zipf_indices(12, 200), random_indices(15, 200)
    tables = random_tables(12, 15, 9, dtype)
    grad_out = torch.randn(200, dtype=dtype)
    with deterministic_algorithms():
        _, low = fused_fwd_bwd(users, items, tables, (0.0, 5.0), grad_out)
        _, wide = fused_fwd_bwd(users, items, [t.float() for t in tables], (0.0, 5.0), grad_out.float())
    for name, low_grad, wide_grad in zip(FASTAI_KEYS, low, wide):
        assert torch.equal(low_grad, wide_grad.to(dtype)), name


class LaunchSpy:
    """Stands in for a Triton kernel (indexed by its grid) and records each launch as
    (name, MODE), MODE being None for a kernel without one."""

    def __init__(self, kernel, name, log):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.name, kwargs.get("MODE")))
            return self.kernel[grid](*args, **kwargs)

        return launch

    @property
    def arg_names(self):
        return self.kernel.arg_names

    def run(self, *args, **kwargs):
        """The launchers' direct launch: constexprs positional, after the runtime arguments."""
        self.log.append((self.name, dict(zip(self.kernel.arg_names, args)).get("MODE")))
        return self.kernel.run(*args, **kwargs)


def test_deterministic_path_is_bitwise_reproducible(monkeypatch):
    """Under use_deterministic_algorithms the sorted segment reduction runs (and no atomics),
    and two runs give bitwise identical gradients; without it the atomic kernel runs."""
    launched = []
    for module, name in (
        (segment_reduce, "_embedding_dot_bias_bwd_segment_kernel"),
        (kernels, "_embedding_dot_bias_bwd_per_sample_kernel"),
    ):
        monkeypatch.setattr(module, name, LaunchSpy(getattr(module, name), name, launched))
    segment_launch = ("_embedding_dot_bias_bwd_segment_kernel", None)
    coefficient_launch = ("_embedding_dot_bias_bwd_per_sample_kernel", kernels.MODE_COEF.value)
    atomic_launch = ("_embedding_dot_bias_bwd_per_sample_kernel", kernels.MODE_ATOMIC.value)

    users, items = zipf_indices(30, 700), zipf_indices(25, 700)
    tables = random_tables(30, 25, 12)
    grad_out = torch.randn(700)
    with deterministic_algorithms(True):
        runs = [fused_fwd_bwd(users, items, tables, (0.0, 5.5), grad_out)[1] for _ in range(2)]
    assert segment_launch in launched and set(launched) == {coefficient_launch, segment_launch}
    launched.clear()
    with deterministic_algorithms(False):
        atomic_grads = fused_fwd_bwd(users, items, tables, (0.0, 5.5), grad_out)[1]
    assert launched == [atomic_launch]
    for first, second, atomic in zip(*runs, atomic_grads):
        assert torch.equal(first, second)
        torch.testing.assert_close(first, atomic, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("y_range", [None, (-1.0, 2.0)], ids=["no_range", "y_range"])
def test_gradcheck(y_range, backward_path, monkeypatch):
    use_segment_tile(monkeypatch, 4)  # two carry levels on 8 samples
    users = torch.tensor([0, 3, 3, 3, 2, 3, 1, 3])
    items = random_indices(5, 8)
    tables = [t.requires_grad_() for t in random_tables(4, 5, 3, torch.float64)]

    def fused(*tables):
        return fastcore5.embedding_dot_bias(users, items, *tables, y_range=y_range)

    assert torch.autograd.gradcheck(fused, tables, atol=1e-8, rtol=1e-6)


def test_opcheck():
    users, items = random_indices(5, 23), random_indices(7, 23, torch.int32)
    for y_lo, y_hi in ((None, None), (0.5, 5.5)):
        tables = [t.requires_grad_() for t in random_tables(5, 7, 6, torch.float64)]
        for validate in ("sync", "device"):
            torch.library.opcheck(embedding_dot_bias_op, (users, items, *tables, y_lo, y_hi, False, validate, "triton"))
    grad_out = torch.randn(23, dtype=torch.float64)
    tables = random_tables(5, 7, 6, torch.float64, bias_1d=True)
    for deterministic, sparse in ((False, False), (True, False), (False, True)):
        needs = (True, True, True, True) if not deterministic else (True, False, False, True)
        torch.library.opcheck(
            embedding_dot_bias_backward_op,
            (grad_out, users, items, *tables, 5, 7, 0.0, 5.0, *needs, deterministic, sparse, "triton"),
        )


def check_compiles_fullgraph(compile_backend="aot_eager", exact=False):
    """torch.compile(fullgraph=True) of a y_range call, forward and backward, against eager: close,
    or with ``exact`` bitwise equal."""
    torch._dynamo.reset()
    users, items = random_indices(8, 50), random_indices(9, 50)
    tables = random_tables(8, 9, 5)
    grad_out = torch.randn(50)

    @torch.compile(fullgraph=True, backend=compile_backend)
    def compiled(users, items, *tables):
        return fastcore5.embedding_dot_bias(users, items, *tables, y_range=(0.0, 5.5))

    compiled_tables = [t.clone().requires_grad_() for t in tables]
    # AOTAutograd's on-disk cache keys a graph by its ops, not by a custom op's autograd formula:
    # a backward compiled by an older fastcore5 would be reused (correct, other bits).
    with torch._functorch.config.patch(enable_autograd_cache=False):
        out = compiled(users, items, *compiled_tables)
        out.backward(grad_out)
    eager_out, eager_grads = fused_fwd_bwd(users, items, tables, (0.0, 5.5), grad_out)
    tolerance = dict(atol=0.0, rtol=0.0) if exact else dict(atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out, eager_out, **tolerance)
    for table, eager in zip(compiled_tables, eager_grads):
        torch.testing.assert_close(table.grad, eager, **tolerance)


def test_compiles_fullgraph():
    check_compiles_fullgraph()


# --- sparse gradients --------------------------------------------------------------------------


def test_sparse_gradients_match_nn_embedding(backward_path):
    users, items = zipf_indices(9, 130), random_indices(11, 130)
    tables = random_tables(9, 11, 7, torch.float64)
    grad_out = torch.randn(130, dtype=torch.float64)
    _, grads = fused_fwd_bwd(users, items, tables, (0.0, 5.0), grad_out, sparse=True)
    _, exact_grads = reference_fwd_bwd(users, items, tables, (0.0, 5.0), grad_out)
    # nn.Embedding(sparse=True): uncoalesced COO with one entry per sample.
    embeddings = [nn.Embedding(*t.shape, sparse=True, _weight=t.clone(), dtype=torch.float64) for t in tables]
    reference_out = torch.sigmoid(
        (embeddings[0](users) * embeddings[1](items)).sum(1) + embeddings[2](users)[:, 0] + embeddings[3](items)[:, 0]
    ) * 5.0
    reference_out.backward(grad_out)
    for grad, embedding, exact in zip(grads, embeddings, exact_grads):
        expected = embedding.weight.grad
        assert grad.layout == torch.sparse_coo and not grad.is_coalesced()
        assert grad.shape == expected.shape
        assert torch.equal(grad._indices(), expected._indices())
        torch.testing.assert_close(grad._values(), expected._values(), atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(grad.to_dense(), exact, atol=1e-12, rtol=1e-12)


def test_sparse_torch_backend_and_sparse_adam():
    users, items = random_indices(6, 40), random_indices(8, 40)
    model = EmbeddingDotBias(4, 6, 8, y_range=(0.0, 5.0), sparse=True)
    with fastcore5.use_backend("torch"):
        model(torch.stack([users, items], 1)).sum().backward()
    torch_grads = [p.grad.coalesce().to_dense() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    model(torch.stack([users, items], 1)).sum().backward()
    for p, torch_grad in zip(model.parameters(), torch_grads):
        assert p.grad.layout == torch.sparse_coo
        torch.testing.assert_close(p.grad.coalesce().to_dense(), torch_grad, atol=1e-6, rtol=1e-6)
    before = [p.detach().clone() for p in model.parameters()]
    torch.optim.SparseAdam(list(model.parameters()), lr=0.1).step()
    touched_users = torch.unique(users)
    assert not torch.equal(model.u_weight.weight[touched_users], before[0][touched_users])


# --- bad input -------------------------------------------------------------------------------


def _bad_call(**changes):
    args = dict(
        users=random_indices(5, 8), items=random_indices(6, 8),
        u_weight=torch.randn(5, 3), i_weight=torch.randn(6, 3), u_bias=torch.randn(5, 1), i_bias=torch.randn(6, 1),
    )
    args.update(changes)
    return lambda: fastcore5.embedding_dot_bias(**args)


BAD_INPUTS = {
    "user_past_table": (_bad_call(users=torch.tensor([0, 1, 5, 2, 0, 1, 2, 3])), IndexError, r"users .*index 5.*5 rows"),
    "negative_item": (_bad_call(items=torch.tensor([0, 1, -1, 2, 0, 1, 2, 3])), IndexError, r"items .*negative"),
    "float_users": (_bad_call(users=torch.zeros(8)), TypeError, r"users has dtype torch.float32"),
    "matrix_items": (_bad_call(items=torch.zeros(8, 2, dtype=torch.int64)), ValueError, r"items must have 1 dim"),
    "lengths_differ": (_bad_call(items=random_indices(6, 7)), ValueError, r"users and items must have the same length"),
    "factors_differ": (_bad_call(i_weight=torch.randn(6, 4)), ValueError, r"u_weight and i_weight .* factors"),
    "wide_bias": (_bad_call(u_bias=torch.randn(5, 2)), ValueError, r"u_bias must have shape \(5, 1\) or \(5,\)"),
    "bias_rows_differ": (_bad_call(i_bias=torch.randn(7, 1)), ValueError, r"i_bias has 7 rows but i_weight has 6"),
    "dtype_mismatch": (_bad_call(i_weight=torch.randn(6, 3, dtype=torch.float64)), TypeError, r"i_weight is torch.float64"),
    "device_mismatch": (_bad_call(u_bias=torch.randn(5, 1, device="meta")), ValueError, r"u_bias on meta"),
    "sparse_users": (_bad_call(users=random_indices(5, 8).to_sparse()), TypeError, r"users must be a dense .*sparse_coo"),
    "sparse_table": (_bad_call(i_weight=torch.randn(6, 3).to_sparse()), TypeError, r"i_weight must be a dense"),
    "sparse_bias": (_bad_call(u_bias=torch.randn(5, 1).to_sparse()), TypeError, r"u_bias must be a dense"),
}


@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_names_the_argument(case):
    call, error, message = case
    with pytest.raises(error, match=message):
        call()


BAD_Y_RANGES = {
    "not_pair": ((1.0,), ValueError, r"y_range must be a pair of numbers \(low, high\) or None"),
    "not_iterable": (5.5, ValueError, r"y_range must be a pair of numbers"),
    "strings": (("0", "5"), TypeError, r"y_range must hold two real numbers"),
    "bool": ((False, 5.0), TypeError, r"y_range must hold two real numbers"),
    "reversed": ((5.0, 0.0), ValueError, r"y_range must be finite with low < high"),
    "empty": ((1.0, 1.0), ValueError, r"y_range must be finite with low < high"),
    "nan": ((0.0, float("nan")), ValueError, r"y_range must be finite"),
    "inf": ((float("-inf"), 5), ValueError, r"y_range must be finite"),
}


@pytest.mark.parametrize("case", BAD_Y_RANGES.values(), ids=BAD_Y_RANGES.keys())
@pytest.mark.parametrize("caller", ["op", "module"])
def test_bad_y_range_gets_one_message_from_op_and_module(case, caller):
    y_range, error, message = case
    with pytest.raises(error, match=message):
        if caller == "op":
            _bad_call(y_range=y_range)()
        else:
            EmbeddingDotBias(3, 5, 6, y_range=y_range)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(validate="bogus"), ValueError, r"validate must be None or one of"),
        (dict(sparse="yes"), TypeError, r"sparse must be a bool, got str"),
        (dict(n_factors=0), ValueError, r"n_factors must be at least 1"),
        (dict(n_users=5.0), TypeError, r"n_users must be an int"),
    ],
)
def test_bad_module_arguments_are_refused_at_construction(kwargs, error, message):
    with pytest.raises(error, match=message):
        EmbeddingDotBias(**{"n_factors": 3, "n_users": 5, "n_items": 6, **kwargs})


def test_y_range_of_ints_and_numpy_scalars_is_accepted_as_floats():
    assert check_y_range((0, np.float32(5.5))) == (0.0, 5.5)
    assert check_y_range(None) == (None, None)
    model = EmbeddingDotBias(3, 5, 6, y_range=(1, np.int64(4)))
    out = model(torch.stack([random_indices(5, 9), random_indices(6, 9)], 1))
    assert ((out > 1) & (out < 4)).all()


def test_bad_index_on_torch_backend_and_module():
    with fastcore5.use_backend("torch"), pytest.raises(IndexError, match="users"):
        _bad_call(users=torch.tensor([0, 1, 2, -3, 0, 1, 2, 3]))()
    model = EmbeddingDotBias(3, 4, 5)
    with pytest.raises(IndexError, match="items .*index 5"):
        model(torch.tensor([[0, 5]]))
    with pytest.raises(ValueError, match=r"x must have shape \(B, 2\)"):
        model(torch.zeros(4, 3, dtype=torch.int64))
