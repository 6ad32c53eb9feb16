"""fastcore5.mlp and nn.MLP against nn.Sequential(Linear, ReLU, ..., Linear).

On CPU the Triton kernels run through the interpreter (conftest): the fused path, one autograd
Function over the whole stack with each ReLU mask applied in the grad-input epilogue of the layer
above, runs for real. Shapes stay small because the interpreter is slow.
"""
import pytest
import torch
from torch import nn

import fastcore5
from fastcore5 import use_backend
from fastcore5.nn import MLP

from conftest import DEVICE
from helpers import allow_tf32, assert_parity, deterministic_algorithms

SIZES = [(7, 5), (13, 17, 6), (11, 19, 9, 3)]  # one, two and three layers, odd sizes


def sequential(sizes, bias=True, dtype=torch.float32):
    """The unfused stack, with fresh nn.Linear initialisation."""
    layers = []
    for i, o in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(i, o, bias=bias, dtype=dtype, device=DEVICE), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def randomize(module):
    """Biases drawn like the weights (nn.Linear's small uniform biases rarely move a ReLU)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) / max(p.shape[-1], 1) ** 0.5)
    return module


def forward_backward(module, x, grad_out):
    """Output and the gradients of x and of every parameter, on a fresh leaf copy of x."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out = module(x)
    out.backward(grad_out)
    return out.detach(), [x.grad] + [p.grad for p in module.parameters()]


def float64_copy(module):
    sizes = [m.in_features for m in module[::2]] + [module[-1].out_features]
    copy = sequential(sizes, module[0].bias is not None, torch.float64)
    copy.load_state_dict({k: v.double() for k, v in module.state_dict().items()})
    return copy


@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_float64_and_the_unfused_sequential(sizes, bias, dtype):
    unfused = randomize(sequential(sizes, bias, dtype))
    fused = MLP(sizes, bias=bias, dtype=dtype, device=DEVICE)
    fused.load_state_dict(unfused.state_dict())
    x = torch.randn(23, sizes[0], dtype=dtype, device=DEVICE)
    grad_out = torch.randn(23, sizes[-1], dtype=dtype, device=DEVICE)
    with use_backend("triton"):
        ours, our_grads = forward_backward(fused, x, grad_out)
    theirs, their_grads = forward_backward(unfused, x, grad_out)
    exact, exact_grads = forward_backward(float64_copy(unfused), x.double(), grad_out.double())
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-12, "rtol": 1e-12}
    assert ours.dtype == dtype and ours.shape == (23, sizes[-1])
    torch.testing.assert_close(ours, theirs, **tolerance)
    torch.testing.assert_close(ours.double(), exact, **tolerance)
    assert len(our_grads) == len(exact_grads) == 1 + (2 if bias else 1) * (len(sizes) - 1)
    for ours_g, theirs_g, exact_g in zip(our_grads, their_grads, exact_grads):
        assert ours_g.dtype == dtype
        torch.testing.assert_close(ours_g, theirs_g, **tolerance)
        torch.testing.assert_close(ours_g.double(), exact_g, **tolerance)


@pytest.mark.parametrize("sizes", SIZES[1:])
@pytest.mark.parametrize("bias", [True, False])
def test_bfloat16_within_torchs_own_error(sizes, bias):
    unfused = randomize(sequential(sizes, bias, torch.bfloat16))
    fused = MLP.from_sequential(unfused)
    x = torch.randn(29, sizes[0], dtype=torch.bfloat16, device=DEVICE)
    grad_out = torch.randn(29, sizes[-1], dtype=torch.bfloat16, device=DEVICE)
    with use_backend("triton"):
        ours, our_grads = forward_backward(fused, x, grad_out)
    theirs, their_grads = forward_backward(unfused, x, grad_out)
    exact, exact_grads = forward_backward(float64_copy(unfused), x.double(), grad_out.double())
    assert ours.dtype == torch.bfloat16
    assert_parity(ours, theirs, exact, atol=2e-2, rtol=0, what="output")
    for index, (ours_g, theirs_g, exact_g) in enumerate(zip(our_grads, their_grads, exact_grads)):
        assert ours_g.dtype == torch.bfloat16
        assert_parity(ours_g, theirs_g, exact_g, atol=2e-2, rtol=0, what=f"gradient {index}")


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_float64(bias):
    weights = [torch.randn(o, i, dtype=torch.float64, requires_grad=True) for i, o in ((3, 4), (4, 5), (5, 2))]
    biases = [torch.randn(w.shape[0], dtype=torch.float64, requires_grad=True) for w in weights] if bias else []
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)

    def stack(x, *params):
        return fastcore5.mlp(x, params[:3], params[3:] or None)

    with use_backend("triton"):
        assert torch.autograd.gradcheck(stack, (x, *weights, *biases))


def test_gradgrad_is_not_claimed():
    fused = MLP((4, 5, 3), dtype=torch.float64)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    with use_backend("triton"):
        (grad_x,) = torch.autograd.grad(fused(x).sum(), (x,), create_graph=True)
    with pytest.raises(RuntimeError):
        grad_x.sum().backward()


def test_one_autograd_boundary_for_the_whole_stack():
    fused = MLP((6, 8, 8, 4), dtype=torch.float64)
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    with use_backend("triton"):
        out = fused(x)
    assert type(out.grad_fn).__name__ == "_MLPBackward"
    inputs = [fn for fn, _ in out.grad_fn.next_functions if fn is not None]
    assert [type(fn).__name__ for fn in inputs] == ["AccumulateGrad"] * 7  # x, 3 weights, 3 biases


@pytest.mark.parametrize(
    "frozen",
    [
        {"x"},  # every parameter, not the input
        {"x", "0.weight", "0.bias"},  # a frozen first layer
        {"x", "0.weight", "0.bias", "2.weight", "4.weight", "4.bias"},  # only a middle bias
        {"0.weight", "2.weight", "2.bias", "4.weight", "4.bias"},  # x and the first bias only
        {"0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"},  # x only
    ],
)
def test_only_requested_gradients_are_computed(frozen):
    fused = randomize(MLP((5, 7, 6, 3), dtype=torch.float64))
    unfused = nn.Sequential(*fused)  # the same modules and parameters
    x = torch.randn(9, 5, dtype=torch.float64)
    grad_out = torch.randn(9, 3, dtype=torch.float64)
    grads = {}
    for module, backend in ((fused, "triton"), (unfused, "torch")):
        leaves = {"x": x.clone(), **{name: p for name, p in module.named_parameters()}}
        for name, t in leaves.items():
            t.grad = None
            t.requires_grad_(name not in frozen)
        with use_backend(backend):
            module(leaves["x"]).backward(grad_out)
        grads[backend] = {name: t.grad for name, t in leaves.items()}
    for name, ours in grads["triton"].items():
        if name in frozen:
            assert ours is None, name
        else:
            torch.testing.assert_close(ours, grads["torch"][name], msg=name)


def test_saves_only_what_the_backward_needs():
    """With only the last layer's weight trainable, the backward needs the last hidden output
    (its input) and nothing else: no weights, no masks, no x."""
    fused = MLP((5, 7, 6, 3), dtype=torch.float64)
    for name, p in fused.named_parameters():
        p.requires_grad_(name == "4.weight")
    x = torch.randn(4, 5, dtype=torch.float64)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with use_backend("triton"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fused(x)
    last_hidden = torch.relu(fused[2](torch.relu(fused[0](x))))
    assert len(saved) == 1 and saved[0].shape == (4, 6)
    torch.testing.assert_close(saved[0], last_hidden)


def test_backward_is_deterministic():
    fused = randomize(MLP((9, 12, 10, 4)))
    x = torch.randn(21, 9)
    grad_out = torch.randn(21, 4)
    with use_backend("triton"), deterministic_algorithms():
        first = forward_backward(fused, x, grad_out)[1]
        second = forward_backward(fused, x, grad_out)[1]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("batch", [0, 1])
def test_tiny_batches(batch):
    fused = randomize(MLP((3, 4, 2), dtype=torch.float64))
    x = torch.randn(batch, 3, dtype=torch.float64)
    grad_out = torch.randn(batch, 2, dtype=torch.float64)
    with use_backend("triton"):
        ours, our_grads = forward_backward(fused, x, grad_out)
    theirs, their_grads = forward_backward(nn.Sequential(*fused), x, grad_out)
    torch.testing.assert_close(ours, theirs)
    for a, b in zip(our_grads, their_grads):
        torch.testing.assert_close(a, b)


def test_leading_batch_dims_and_non_contiguous_input():
    fused = randomize(MLP((6, 5, 4), dtype=torch.float64))
    x = torch.randn(6, 3, 2, dtype=torch.float64).permute(2, 1, 0)  # (2, 3, 6), not contiguous
    with use_backend("triton"):
        out = fused(x)
    assert out.shape == (2, 3, 4)
    torch.testing.assert_close(out, nn.Sequential(*fused)(x))


def test_transposed_and_strided_parameters():
    weights = [torch.randn(5, 6, dtype=torch.float64).t(), torch.randn(4, 12, dtype=torch.float64)[:, ::2]]
    biases = [torch.randn(12, dtype=torch.float64)[::2], None]  # (6, 5) column-major, (4, 6) strided
    params = [p.requires_grad_() for p in (*weights, biases[0])]
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(7, 4, dtype=torch.float64)
    with use_backend("triton"):
        ours = torch.autograd.grad(fastcore5.mlp(x, weights, biases), (x, *params), grad_out)
    with use_backend("torch"):
        theirs = torch.autograd.grad(fastcore5.mlp(x, weights, biases), (x, *params), grad_out)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


def test_no_grad_forward_and_the_other_backends_agree():
    fused = randomize(MLP((8, 6, 5)))
    x = torch.randn(7, 8)
    expected = nn.Sequential(*fused)(x)
    with use_backend("triton"), torch.no_grad():
        torch.testing.assert_close(fused(x), expected)
    with use_backend("torch"):
        out = fused(x)
    # composed layer by layer, behind the wrapper that makes double backward raise as on the kernels
    assert type(out.grad_fn).__name__ == "_DifferentiableOnceBackward"
    assert type(out.grad_fn.next_functions[0][0]).__name__ == "AddmmBackward0"
    torch.testing.assert_close(out, expected)


def test_autocast_computes_in_the_autocast_dtype():
    fused = randomize(MLP((12, 10, 6)))
    x = torch.randn(5, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with use_backend("triton"):
            ours = fused(x)
        theirs = nn.Sequential(*fused)(x)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    exact = float64_copy(fused)(x.double())
    assert_parity(ours, theirs, exact, atol=2e-2, rtol=0, what="autocast output")
    with torch.autocast("cpu", dtype=torch.bfloat16), use_backend("triton"):
        mixed = fused(x.bfloat16())  # bf16 input, fp32 parameters: one dtype once cast
    assert mixed.dtype == torch.bfloat16
    with use_backend("triton"), pytest.raises(TypeError, match=r"x is torch.bfloat16, weights\[0\] is torch.float32"):
        fused(x.bfloat16())


def test_torch_compile_fullgraph():
    fused = randomize(MLP((9, 7, 5), dtype=torch.float64))
    x = torch.randn(2, 4, 9, dtype=torch.float64, requires_grad=True)
    with use_backend("triton"):
        out = torch.compile(fused, backend="aot_eager", fullgraph=True)(x)
        out.sum().backward()
    grad_x = x.grad.clone()
    x.grad = None
    expected = nn.Sequential(*fused)(x)
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grad_x, x.grad)


def test_state_dict_moves_between_mlp_and_sequential():
    torch.manual_seed(0)
    plain = sequential((10, 8, 8, 3))
    torch.manual_seed(0)
    fused = MLP((10, 8, 8, 3), device=DEVICE)
    assert list(fused.state_dict()) == list(plain.state_dict()) == [
        "0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"
    ]
    for a, b in zip(fused.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b)  # the same initialisation
    other = randomize(sequential((10, 8, 8, 3)))
    fused.load_state_dict(other.state_dict())
    x = torch.randn(4, 10)
    with use_backend("triton"):
        torch.testing.assert_close(fused(x), other(x))
    plain.load_state_dict(fused.state_dict())
    for a, b in zip(plain.parameters(), other.parameters()):
        assert torch.equal(a, b)
    assert MLP((4, 3), bias=False, dtype=torch.float64)[0].bias is None


def test_from_sequential_shares_the_linears():
    plain = randomize(sequential((6, 5, 4)))
    fused = MLP.from_sequential(plain)
    assert fused[0] is plain[0] and fused[2] is plain[2]
    assert isinstance(fused[0:2], nn.Sequential) and not isinstance(fused[0:2], MLP)
    x = torch.randn(3, 6)
    with use_backend("triton"):
        torch.testing.assert_close(fused(x), plain(x))


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), ValueError,
         r"\(Linear, ReLU, \.\.\., ReLU, Linear\); got \(Linear, Linear\)"),
        (lambda: nn.Sequential(nn.Linear(3, 4), nn.ReLU()), ValueError, "got \\(Linear, ReLU\\)"),
        (lambda: nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(5, 2)), ValueError, r"sequential\[2\] has in_features=5"),
    ],
)
def test_from_sequential_refuses_other_stacks(make, error, match):
    with pytest.raises(error, match=match):
        MLP.from_sequential(make())


@pytest.mark.parametrize(
    "sizes, error, match",
    [((5,), ValueError, "at least two"), ((5, 0), ValueError, r"sizes\[1\] must be a positive int"),
     (5, TypeError, "sizes must be a list"), ((4, 2.0), ValueError, r"sizes\[1\]")],
)
def test_bad_sizes_name_the_argument(sizes, error, match):
    with pytest.raises(error, match=match):
        MLP(sizes)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf * 0 in the interpreter's numpy matmul, on purpose
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_and_inf_propagate_like_the_unfused_sequential(backend, value):
    """A NaN reaching a hidden ReLU stays NaN and its gradient flows on, as in nn.ReLU; a mask of
    (h > 0) in the fused grad-input epilogue would silently zero both."""
    unfused = randomize(sequential((5, 7, 3), dtype=torch.float64))
    x = torch.randn(4, 5, dtype=torch.float64, device=DEVICE)
    x[1, 2] = value
    grad_out = torch.randn(4, 3, dtype=torch.float64, device=DEVICE)
    with use_backend(backend):
        ours, our_grads = forward_backward(MLP.from_sequential(unfused), x, grad_out)
    theirs, their_grads = forward_backward(unfused, x, grad_out)
    assert not theirs.isfinite().all()  # the poison reached the output
    for o, t in zip([ours] + our_grads, [theirs] + their_grads):
        torch.testing.assert_close(o, t, equal_nan=True)


def _args(x_shape=(3, 4), shapes=((5, 4), (2, 5)), bias_shapes=(5, 2), **changes):
    args = {
        "x": torch.randn(*x_shape),
        "weights": [torch.randn(*s) for s in shapes],
        "biases": [torch.randn(s) for s in bias_shapes],
    }
    args.update({k: v() for k, v in changes.items()})
    return args


@pytest.mark.parametrize(
    "args, error, match",
    [
        (lambda: _args(shapes=((5, 4), (2, 6))), ValueError, r"weights\[1\] has in_features=6 but weights\[0\] \(out_features\) gives 5"),
        (lambda: _args(shapes=((5, 3), (2, 5))), ValueError, r"weights\[0\] has in_features=3 but x's last dimension gives 4"),
        (lambda: _args(bias_shapes=(5, 3)), ValueError, r"biases\[1\] has 3 elements"),
        (lambda: _args(biases=lambda: [torch.randn(5)]), ValueError, "biases has 1 entries but weights has 2"),
        (lambda: _args(weights=lambda: []), TypeError, "weights must be a non-empty list"),
        (lambda: _args(weights=lambda: torch.randn(5, 4)), TypeError, "weights must be a non-empty list"),
        (lambda: _args(weights=lambda: [torch.randn(5, 4), torch.randn(2, 5, 1)]), ValueError, r"weights\[1\] must have 2 dimensions"),
        (lambda: _args(x=lambda: torch.randint(0, 3, (3, 4))), TypeError, "x has dtype torch.int64"),
        (lambda: _args(x=lambda: torch.randn(())), ValueError, "x must have at least 1 dimension"),
        (lambda: _args(biases=lambda: [torch.randn(5), torch.randn(2, dtype=torch.float64)]), TypeError, r"biases\[1\] is torch.float64"),
        (lambda: _args(biases=lambda: [torch.randn(5, device="meta"), None]), ValueError, r"biases\[0\] on meta"),
        (lambda: _args(x=lambda: [[1.0]]), TypeError, "x must be a torch.Tensor"),
        (lambda: _args(weights=lambda: [torch.randn(5, 4), torch.randn(2, 5).to_sparse()]), TypeError, r"weights\[1\] must be a dense"),
    ],
)
def test_bad_input_names_the_argument(args, error, match):
    with use_backend("triton"), pytest.raises(error, match=match):
        fastcore5.mlp(**args())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tf32", [(torch.bfloat16, False), (torch.float32, False), (torch.float32, True)])
# 2048 x (1024, 2048, 1024, 512): many tiles and above the TMA kernels' MIN_MACS, a twentieth of the multiply-adds of the
# former 8192 x (1024, 4096, 4096, 1024), whose fp32 and float64 passes did not fit the GPU check's window
@pytest.mark.parametrize("M, sizes", [(2048, (1024, 2048, 1024, 512)), (1000, (999, 513, 97, 10))])
def test_gpu_parity_with_the_unfused_sequential(dtype, tf32, M, sizes):
    """The compiled kernels (no float64 tl.dot on a GPU): each gradient within 2x the error of
    torch's own nn.Sequential in the same dtype against float64, plus 1e-3 of its largest value."""
    unfused = randomize(sequential(sizes, True, dtype).cuda())
    fused = MLP.from_sequential(unfused)
    x = torch.randn(M, sizes[0], dtype=dtype, device="cuda")
    grad_out = torch.randn(M, sizes[-1], dtype=dtype, device="cuda")
    with allow_tf32(tf32):
        with use_backend("triton"):
            ours, our_grads = forward_backward(fused, x, grad_out)
        theirs, their_grads = forward_backward(unfused, x, grad_out)
    exact, exact_grads = forward_backward(float64_copy(unfused).cuda(), x.double(), grad_out.double())
    names = ["output", "grad_x"] + [name for name, _ in unfused.named_parameters()]
    for name, o, t, e in zip(names, [ours] + our_grads, [theirs] + their_grads, [exact] + exact_grads):
        assert_parity(o, t, e, atol=1e-3 * e.abs().max().item(), rtol=0, what=name)


def test_mlp_kernels_compile_for_hopper_with_wgmma_and_pipelined_copies():
    """The MLP's kernels (Linear+ReLU's grad-input GEMM masked by the layer below, its forward and
    grad_W kernels with RELU=False) compiled for sm_90 by scripts/compile_check.py: each fits a
    Hopper SM, and every config with a full warpgroup uses wgmma with asynchronous operand copies."""
    from test_compile_check import compile_op

    rows = compile_op("mlp")
    flags = ("MASK_GRAD", "MASK_BELOW", "RELU")
    kernels = {(r["kernel"], *(r["constexprs"].get(flag) for flag in flags)) for r in rows}
    assert kernels == {
        ("_linear_relu_fwd_kernel", None, None, "False"),
        ("_linear_relu_bwd_input_kernel", "False", "True", None),
        ("_linear_relu_bwd_input_kernel", "False", "False", None),
        ("_linear_relu_bwd_weight_kernel", None, None, "False"),
    }
    assert {r["signature"].split(",")[0] for r in rows} == {"*bf16", "*fp16", "*fp32", "*fp64"}
    for row in rows:
        assert row["fits"], row
        if row["options"]["num_warps"] >= 4 and row["dtype"] in ("bf16", "fp16", "fp32-tf32"):
            assert row["wgmma"] and row["async_copies"] > 0, row
