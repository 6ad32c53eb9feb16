"""The C++ CPU kernels of Linear+ReLU (csrc/cpu/linear_relu.cpp, backend "cpu") and fastcore5.mlp
on them: parity with the float64 reference in every dtype and layout, edge shapes, gradcheck,
opcheck, torch.compile, NaN semantics, thread counts, and the argument checks' named exceptions."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

import fastcore5
from fastcore5 import backends, use_backend
from fastcore5.ops.linear_relu import linear_relu_backward_op, linear_relu_op

from helpers import assert_parity
from native_cpu import require_cpu_kernel, threads

F64 = torch.float64
# (dtype, atol of the parity rule): fp64 and fp32 through the oneDNN or BLAS GEMM, bf16/fp16
# with one rounding per stored value.
DTYPES = [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)]


@pytest.fixture(autouse=True)
def cpu_kernel():
    return require_cpu_kernel("linear_relu")


def reference(x, weight, bias):
    return F.relu(F.linear(x, weight, bias))


def leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def fwd_bwd(fn, x, weight, bias, grad_out):
    """(out, grad_x, grad_weight, grad_bias or None) of fn on fresh leaves."""
    x, weight, bias = leaves(x, weight, bias)
    out = fn(x, weight, bias)
    wrt = [t for t in (x, weight, bias) if t is not None]
    grads = torch.autograd.grad(out, wrt, grad_out)
    return out, *grads, *([None] if bias is None else [])


def on_cpu_backend(x, weight, bias):
    with use_backend("cpu"):
        return fastcore5.linear_relu(x, weight, bias)


def check_against_float64(x, weight, bias, atol):
    """fastcore5 on the cpu backend vs torch in the same dtype, both vs float64, forward and all
    three gradients (parity rule: at most 2x torch's error plus atol)."""
    out_shape = (*x.shape[:-1], weight.shape[0])
    grad_out = torch.randn(out_shape, dtype=x.dtype)
    ours = fwd_bwd(on_cpu_backend, x, weight, bias, grad_out)
    theirs = fwd_bwd(reference, x, weight, bias, grad_out)
    up = [None if t is None else t.double() for t in (x, weight, bias)]
    exact = fwd_bwd(reference, *up, grad_out.double())
    for name, o, t, e in zip(("out", "grad_x", "grad_weight", "grad_bias"), ours, theirs, exact):
        if e is None:
            assert o is None
            continue
        assert o.dtype == x.dtype and o.shape == e.shape, name
        assert_parity(o, t, e, atol, what=name)


def test_auto_picks_the_cpu_kernel():
    assert backends.select("linear_relu", "cpu", torch.float32) == "cpu"


@pytest.mark.parametrize("dtype, atol", DTYPES, ids=lambda v: str(v).removeprefix("torch."))
@pytest.mark.parametrize(
    "M, K, N",
    [(37, 29, 23), (1, 16, 16), (1, 1, 1), (131, 67, 257), (64, 128, 96), (200, 3, 33)],
)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_parity_with_float64(dtype, atol, M, K, N, bias):
    x = torch.randn(M, K, dtype=dtype)
    weight = torch.randn(N, K, dtype=dtype) / K**0.5
    b = torch.randn(N, dtype=dtype) if bias else None
    check_against_float64(x, weight, b, atol)


@pytest.mark.parametrize("dtype, atol", DTYPES, ids=lambda v: str(v).removeprefix("torch."))
@pytest.mark.parametrize("layout", ["x_transposed", "w_transposed", "x_sliced", "w_sliced", "leading_dims", "permuted"])
def test_layouts(dtype, atol, layout):
    M, K, N = 45, 38, 29
    x = torch.randn(M, K, dtype=dtype)
    weight = torch.randn(N, K, dtype=dtype) / K**0.5
    bias = torch.randn(N, dtype=dtype)
    if layout == "x_transposed":
        x = torch.randn(K, M, dtype=dtype).t()
    elif layout == "w_transposed":
        weight = (torch.randn(K, N, dtype=dtype) / K**0.5).t()
    elif layout == "x_sliced":
        x = torch.randn(M, 2 * K + 1, dtype=dtype)[:, 1::2]
    elif layout == "w_sliced":
        weight = torch.randn(2 * N, K + 3, dtype=dtype)[::2, 2:-1] / K**0.5
        bias = torch.randn(2 * N, dtype=dtype)[1::2]
    elif layout == "leading_dims":
        x = torch.randn(3, 5, 7, K, dtype=dtype)
    else:
        x = torch.randn(K, 4, 9, dtype=dtype).permute(2, 1, 0)
    check_against_float64(x, weight, bias, atol)


@pytest.mark.parametrize("M, K, N", [(0, 5, 7), (4, 0, 7), (4, 5, 0), (0, 0, 0), (2, 3, 0)])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_empty_dimensions(M, K, N, bias):
    x = torch.randn(M, K, dtype=F64)
    weight = torch.randn(N, K, dtype=F64)
    b = torch.randn(N, dtype=F64) if bias else None
    grad_out = torch.randn(M, N, dtype=F64)
    ours = fwd_bwd(on_cpu_backend, x, weight, b, grad_out)
    theirs = fwd_bwd(reference, x, weight, b, grad_out)
    for o, t in zip(ours, theirs):
        if t is None:
            assert o is None
        else:
            torch.testing.assert_close(o, t, rtol=0, atol=0)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 7)])
def test_gradcheck_float64(bias, shape):
    x = torch.randn(*shape, dtype=F64, requires_grad=True)
    weight = torch.randn(4, 7, dtype=F64, requires_grad=True)
    b = torch.randn(4, dtype=F64, requires_grad=True) if bias else None
    inputs = (x, weight, b) if bias else (x, weight)
    assert torch.autograd.gradcheck(lambda *a: on_cpu_backend(*a, *([None] if not bias else [])), inputs)


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True), (True, True, False)])
def test_only_requested_gradients(needs):
    x, weight, bias = (torch.randn(*s, dtype=F64) for s in ((9, 6), (5, 6), (5,)))
    for t, need in zip((x, weight, bias), needs):
        t.requires_grad_(need)
    grad_out = torch.randn(9, 5, dtype=F64)
    out = on_cpu_backend(x, weight, bias)
    out.backward(grad_out)
    expected = leaves(x, weight, bias)
    reference(*expected).backward(grad_out)
    for t, e, need in zip((x, weight, bias), expected, needs):
        if need:
            torch.testing.assert_close(t.grad, e.grad, rtol=0, atol=1e-12)
        else:
            assert t.grad is None


@pytest.mark.parametrize("poisoned, value", [("x", float("nan")), ("weight", float("nan")), ("bias", float("nan")), ("x", float("inf"))])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_nan_and_inf_like_torch(poisoned, value, dtype):
    """torch.relu keeps a NaN and its backward passes the gradient of a NaN output; oneDNN's relu
    post-op would turn the NaN into 0, which is why the kernel applies relu itself."""
    x = torch.randn(6, 5, dtype=dtype)
    w = torch.randn(4, 5, dtype=dtype)
    b = torch.randn(4, dtype=dtype)
    {"x": x, "weight": w, "bias": b}[poisoned].view(-1)[1] = value
    grad_out = torch.randn(6, 4, dtype=dtype)
    ours = fwd_bwd(on_cpu_backend, x, w, b, grad_out)
    theirs = fwd_bwd(reference, x, w, b, grad_out)
    assert not theirs[0].isfinite().all()  # the poison reached the output
    for o, t in zip(ours, theirs):
        # same non-finite pattern; finite values within the dtype's rounding
        assert torch.equal(o.isnan(), t.isnan()) and torch.equal(o.isinf(), t.isinf())
        torch.testing.assert_close(o, t, equal_nan=True, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows, features", [(3, 4), (256, 128)], ids=["at_mm", "onednn"])
def test_overflowing_finite_inputs_give_relu_of_the_gemm(dtype, rows, features):
    """Finite inputs whose products overflow take the relu pass (not oneDNN's relu post-op, which
    would turn a NaN into 0): the output is torch.relu of the GEMM's own pre-activation. Which
    infinities (or NaN) the GEMM makes is the library's: oneDNN's FMAs give -inf for the last
    column where MKL's eager F.linear gives NaN. The kernel takes oneDNN only from about 4M
    multiply-adds (csrc/cpu/linear_relu.cpp), at::mm below: both sizes are checked."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch without oneDNN: the kernel's GEMM is at::mm, compared elsewhere")
    x = torch.full((rows, features), 1e30, dtype=dtype)
    w = torch.full((features, features), 1e30, dtype=dtype)
    w[1] = -1e30
    w[2, 0] = -1e30
    if rows * features * features >= 1 << 22:
        pre = torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    else:
        pre = x @ w.T
    assert not pre.isfinite().any()
    torch.testing.assert_close(on_cpu_backend(x, w, None), torch.relu(pre), equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_one_and_two_threads_give_identical_results(dtype):
    """The fused passes are elementwise or reduce in fixed row blocks, so they are bitwise the same
    for any thread count; the GEMMs (oneDNN for fp32/bf16, MKL for fp64) gave identical results
    at this shape too."""
    x = torch.randn(517, 129, dtype=dtype)
    w = torch.randn(263, 129, dtype=dtype) / 129**0.5
    b = torch.randn(263, dtype=dtype)
    grad_out = torch.randn(517, 263, dtype=dtype)
    results = []
    for n in (1, 2):
        with threads(n):
            results.append(fwd_bwd(on_cpu_backend, x, w, b, grad_out))
    for one, two in zip(*results):
        assert torch.equal(one, two)


def test_bias_gradient_is_identical_for_any_thread_count_in_the_pass():
    """The bias gradient alone (no GEMM involved): fixed row blocks summed in block order."""
    ops = torch.ops.fastcore5_native
    grad_out = torch.randn(1000, 77)
    out = torch.randn(1000, 77)
    sums = []
    for n in (1, 2):
        with threads(n):
            sums.append(ops.linear_relu_backward(grad_out, out, None, None, False, False, True, False)[2])
    assert torch.equal(sums[0], sums[1])
    torch.testing.assert_close(sums[0], (grad_out * (out > 0)).sum(0), rtol=1e-5, atol=1e-5)


def test_opcheck_forward_and_backward():
    x = torch.randn(11, 9, dtype=F64)
    w = torch.randn(7, 9, dtype=F64)
    b = torch.randn(7, dtype=F64)
    torch.library.opcheck(linear_relu_op, (x, w, b, "cpu"))
    torch.library.opcheck(linear_relu_op, (x.clone().requires_grad_(), w.clone().requires_grad_(), None, "cpu"))
    out = reference(x, w, b)
    grad_out = torch.randn_like(out)
    torch.library.opcheck(linear_relu_backward_op, (grad_out, out, x, w, True, True, True, "cpu"))
    torch.library.opcheck(linear_relu_backward_op, (grad_out, out, None, w, True, False, False, "cpu"))
    ops = torch.ops.fastcore5_native
    for dtype in (F64, torch.float32):
        xs, ws, bs = (t.to(dtype) for t in (x, w, b))
        torch.library.opcheck(ops.linear_relu_forward, (xs, ws, bs, False))
        o = reference(xs, ws, bs)
        torch.library.opcheck(ops.linear_relu_backward, (grad_out.to(dtype), o, xs, ws, True, True, True, False))


@pytest.mark.parametrize(
    "args, error, match",
    [
        (lambda: (torch.randn(3, 4), torch.randn(5, 6), None), ValueError, "weight expects in_features=6"),
        (lambda: (torch.randn(3, 4), torch.randn(5, 4), torch.randn(6)), ValueError, "bias has 6 elements"),
        (lambda: (torch.randn(3, 4), torch.randn(5, 4, 1), None), ValueError, "weight must have 2 dimensions"),
        (lambda: (torch.randint(0, 3, (3, 4)), torch.randn(5, 4), None), TypeError, "x has dtype torch.int64"),
        (lambda: (torch.randn(3, 4), torch.randn(5, 4, dtype=F64), None), TypeError, "weight is torch.float64"),
        (lambda: (torch.randn(()), torch.randn(5, 4), None), ValueError, "x must have at least 1 dimension"),
    ],
)
def test_bad_input_names_the_argument(args, error, match):
    with use_backend("cpu"), pytest.raises(error, match=match):
        fastcore5.linear_relu(*args())


# (call on torch.ops.fastcore5_native, expected exception, message) of the raw kernel ops' checks.
KERNEL_BAD_CALLS = [
    (lambda ops: ops.linear_relu_forward(torch.randn(3, 4), torch.randn(5, 6), None, False), ValueError, "weight has in_features=6"),
    (lambda ops: ops.linear_relu_forward(torch.randn(3, 4), torch.randn(5, 4), torch.randn(6), False), ValueError, "bias has 6 elements"),
    (lambda ops: ops.linear_relu_forward(torch.randn(3, 4, 1), torch.randn(5, 4), None, False), ValueError, "x must have 2 dimensions"),
    (lambda ops: ops.linear_relu_forward(torch.ones(3, 4, dtype=torch.int32), torch.randn(5, 4), None, False), TypeError, "x has dtype Int"),
    (lambda ops: ops.linear_relu_forward(torch.randn(3, 4), torch.randn(5, 4, dtype=F64), None, False), TypeError, "weight has dtype Double"),
    (lambda ops: ops.linear_relu_backward(torch.randn(3, 5), torch.randn(3, 4), None, None, False, False, True, False), ValueError, "grad_out has shape"),
    (lambda ops: ops.linear_relu_backward(torch.randn(3, 5), torch.randn(3, 5), None, None, True, False, False, False), ValueError, "weight is needed"),
    (lambda ops: ops.linear_relu_backward(torch.randn(3, 5), torch.randn(3, 5), None, torch.randn(5, 2), False, True, False, False), ValueError, "x is needed"),
    (lambda ops: ops.linear_relu_backward(torch.randn(3, 5), torch.randn(3, 5), torch.randn(4, 2), None, False, True, False, False), ValueError, "x has 4 rows"),
    (lambda ops: ops.linear_relu_backward(torch.randn(3, 5), torch.randn(3, 5), torch.randn(3, 2), torch.randn(5, 3), True, True, False, False), ValueError, "x has 2 features"),
]


@pytest.mark.parametrize("call, error, match", KERNEL_BAD_CALLS)
def test_kernel_ops_raise_named_exceptions(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.ops.fastcore5_native)


def _good_kernel_calls(M, K, N, dtype, bias, transposed):
    """Forward and every gradient on the raw ops; ``transposed`` hands x and weight as
    transposed views (strided GEMM operands)."""
    def run(ops):
        x, weight = torch.randn(M, K, dtype=dtype), torch.randn(N, K, dtype=dtype)
        if transposed:
            x, weight = torch.randn(K, M, dtype=dtype).t(), torch.randn(K, N, dtype=dtype).t()
        b = torch.randn(N, dtype=dtype) if bias else None
        out = ops.linear_relu_forward(x, weight, b, False)
        ops.linear_relu_backward(torch.randn(M, N, dtype=dtype), out, x, weight, True, True, bias, False)
    return run


# What tests/test_cpu_asan.py runs against the AddressSanitizer build: every raw bad call, and good
# calls on empty, tiny, prime and vector-tail sizes, strided operands, every dtype, and a GEMM large
# enough for oneDNN (4M multiply-adds and up).
ASAN_CALLS = [(f"bad: {match}", error, call) for call, error, match in KERNEL_BAD_CALLS] + [
    (f"good: {M}x{K}->{N} {dtype} bias={bias} transposed={transposed}", None, _good_kernel_calls(M, K, N, dtype, bias, transposed))
    for M, K, N in [(1, 1, 1), (0, 5, 7), (4, 0, 7), (17, 3, 33), (5, 67, 129), (256, 128, 129)]
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    for bias in (True, False)
    for transposed in (False, True)
]


# ---- fastcore5.mlp / nn.MLP on the cpu backend ----

MLP_SIZES = [(7, 5), (13, 17, 6), (11, 19, 9, 3), (64, 131, 257, 16)]


def mlp_params(sizes, dtype, bias=True):
    weights = [torch.randn(o, i, dtype=dtype) / i**0.5 for i, o in zip(sizes[:-1], sizes[1:])]
    biases = [torch.randn(o, dtype=dtype) / i**0.5 if bias else None for i, o in zip(sizes[:-1], sizes[1:])]
    return weights, biases


def mlp_fwd_bwd(fn, x, weights, biases, grad_out):
    """(out, grad_x, the weights' grads, the biases' grads) on fresh leaves."""
    x, *params = leaves(x, *weights, *biases)
    out = fn(x, params[: len(weights)], params[len(weights):])
    wrt = [t for t in (x, *params) if t is not None]
    return [out, *torch.autograd.grad(out, wrt, grad_out)]


def unfused_mlp(x, weights, biases):
    for w, b in zip(weights[:-1], biases[:-1]):
        x = F.relu(F.linear(x, w, b))
    return F.linear(x, weights[-1], biases[-1])


def mlp_on_cpu_backend(x, weights, biases):
    with use_backend("cpu"):
        return fastcore5.mlp(x, weights, biases)


@pytest.mark.parametrize("dtype, atol", DTYPES[:3], ids=lambda v: str(v).removeprefix("torch."))
@pytest.mark.parametrize("sizes", MLP_SIZES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_mlp_parity_with_float64(dtype, atol, sizes, bias):
    weights, biases = mlp_params(sizes, dtype, bias)
    x = torch.randn(3, 37, sizes[0], dtype=dtype)  # leading batch dims
    grad_out = torch.randn(3, 37, sizes[-1], dtype=dtype)
    ours = mlp_fwd_bwd(mlp_on_cpu_backend, x, weights, biases, grad_out)
    theirs = mlp_fwd_bwd(unfused_mlp, x, weights, biases, grad_out)
    up = lambda ts: [None if t is None else t.double() for t in ts]  # noqa: E731
    exact = mlp_fwd_bwd(unfused_mlp, x.double(), up(weights), up(biases), grad_out.double())
    assert len(ours) == len(exact)
    for k, (o, t, e) in enumerate(zip(ours, theirs, exact)):
        assert o.dtype == dtype and o.shape == e.shape
        assert_parity(o, t, e, atol, what=f"output {k}")


def test_mlp_is_one_autograd_boundary_on_cpu():
    weights, biases = mlp_params((6, 8, 8, 4), F64)
    params = [p.requires_grad_() for p in (*weights, *biases)]
    out = mlp_on_cpu_backend(torch.randn(5, 6, dtype=F64, requires_grad=True), weights, biases)
    assert type(out.grad_fn).__name__ == "_MLPBackward"
    inputs = [fn for fn, _ in out.grad_fn.next_functions if fn is not None]
    assert [type(fn).__name__ for fn in inputs] == ["AccumulateGrad"] * (1 + len(params))


@pytest.mark.parametrize(
    "trainable",
    [
        {"x"},  # the input only
        {"w0", "b0"},  # the first layer only
        {"b1"},  # only a middle bias
        {"w2", "b2"},  # only the output layer
        {"x", "w0", "b1", "w2"},
    ],
    ids=str,
)
def test_mlp_only_requested_gradients(trainable):
    weights, biases = mlp_params((5, 7, 6, 3), F64)
    x = torch.randn(9, 5, dtype=F64)
    grad_out = torch.randn(9, 3, dtype=F64)
    results = []
    for fn in (mlp_on_cpu_backend, unfused_mlp):
        named = {"x": x.clone(), **{f"w{l}": w.clone() for l, w in enumerate(weights)},
                 **{f"b{l}": b.clone() for l, b in enumerate(biases)}}
        for name, t in named.items():
            t.requires_grad_(name in trainable)
        fn(named["x"], [named[f"w{l}"] for l in range(3)], [named[f"b{l}"] for l in range(3)]).backward(grad_out)
        results.append({name: t.grad for name, t in named.items()})
    for name, ours in results[0].items():
        if name in trainable:
            torch.testing.assert_close(ours, results[1][name], rtol=0, atol=1e-12, msg=name)
        else:
            assert ours is None, name


def test_mlp_gradcheck_float64():
    weights, biases = mlp_params((4, 6, 5, 3), F64)
    x = torch.randn(7, 4, dtype=F64)
    inputs = [t.requires_grad_() for t in (x, *weights, *biases)]
    assert torch.autograd.gradcheck(lambda x, *p: mlp_on_cpu_backend(x, p[:3], p[3:]), inputs)


@pytest.mark.parametrize("batch", [0, 1])
def test_mlp_tiny_batches(batch):
    weights, biases = mlp_params((5, 7, 3), F64)
    x = torch.randn(batch, 5, dtype=F64)
    grad_out = torch.randn(batch, 3, dtype=F64)
    ours = mlp_fwd_bwd(mlp_on_cpu_backend, x, weights, biases, grad_out)
    theirs = mlp_fwd_bwd(unfused_mlp, x, weights, biases, grad_out)
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o, t, rtol=0, atol=1e-12)


def test_mlp_torch_compile_fullgraph():
    module = fastcore5.nn.MLP((9, 12, 5), dtype=F64)
    x = torch.randn(2, 4, 9, dtype=F64, requires_grad=True)
    with use_backend("cpu"):
        out = torch.compile(module, backend="aot_eager", fullgraph=True)(x)
    weights = [module[0].weight, module[2].weight]
    biases = [module[0].bias, module[2].bias]
    torch.testing.assert_close(out, unfused_mlp(x, weights, biases))
    (grad_x,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(grad_x, torch.autograd.grad(unfused_mlp(x, weights, biases).sum(), x)[0])
