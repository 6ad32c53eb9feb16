"""The Hopper (TMA, persistent) Linear+ReLU kernels of kernels/linear_relu_hopper.py.

Three ways in, by what the machine has:
- CPU, interpreter: the kernels' arithmetic (descriptor loads zero-filled at the edges, clipped
  descriptor stores, several tiles per persistent program, the ReLU mask on grad_out tiles, the
  bias sum of the first K column) against float64, called directly (the launchers dispatch to
  them only on an sm_90+ GPU);
- CPU, compiler: scripts/compile_check.py compiles them for sm_90 and the generated code is
  checked for TMA bulk copies, wgmma and multi-buffered (pipelined) operand tiles;
- GPU (marked ``gpu``, run by scripts/gpu_check.sh): the public op dispatches to them on
  sm_90+ and matches float64 at small versions of the benchmark shapes.
"""
import pytest
import torch

import fastcore5
from fastcore5 import use_backend
from fastcore5.kernels import _tuning
from fastcore5.kernels._common import HOPPER_SHARED_MEMORY_BYTES
from fastcore5.kernels import linear_relu as portable
from fastcore5.kernels import linear_relu_hopper as hopper
from fastcore5.kernels import tma_descriptors

from conftest import HAS_CUDA
from helpers import allow_tf32, assert_parity
from test_linear_relu import _masked, check_layout_parity, check_tf32_operand_rounding, make_inputs
from test_compile_check import compile_op
from test_mlp import forward_backward

ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def _reference_grads(grad_out, out, x, w):
    """Float64 gradients for the mask ``out > 0`` of the kernel under test (a pre-activation
    that rounds across zero flips relu' in any implementation; see test_linear_relu)."""
    g = _masked(grad_out, out).double()
    return g @ w.double(), g.T @ x.double(), g.sum(0)


def _torch_grads(grad_out, out, x, w):
    """The same products by torch in the operands' dtype: the error the parity rule allows twice."""
    g = _masked(grad_out, out)
    return g @ w, g.T @ x, g.float().sum(0).to(g.dtype)


# ---- interpreter: arithmetic ----------------------------------------------------------------

# Extents whose rows are whole 16-byte multiples (TMA), none a multiple of the 16-wide
# interpreter tiles but N and K in 16-bit: edge tiles in every dimension, 3-4 tiles per program.
SHAPES = [(45, 40, 24), (70, 24, 56), (16, 64, 32)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("M, K, N", SHAPES)
def test_forward_and_backward_match_float64(dtype, M, K, N):
    x, w, b = make_inputs(M, K, N, dtype)
    grad_out = torch.randn(M, N, dtype=dtype)
    out = hopper.forward(x, w, b)
    grads = hopper.backward(grad_out, out, x, w, True, True, True)
    assert out.dtype == dtype and out.shape == (M, N)
    exact_out = torch.relu(x.double() @ w.double().T + b.double())
    assert_parity(out, torch.relu(x @ w.T + b), exact_out, ATOL[dtype], what="out")
    for name, ours, theirs, exact in zip(
        ("grad_x", "grad_w", "grad_b"), grads, _torch_grads(grad_out, out, x, w), _reference_grads(grad_out, out, x, w)
    ):
        assert ours.dtype == dtype and ours.shape == exact.shape, name
        assert_parity(ours, theirs, exact, ATOL[dtype], what=name)


@pytest.mark.parametrize(
    "needs", [(True, False, False), (False, True, False), (False, True, True), (True, True, False)]
)
def test_only_requested_gradients_are_computed(needs):
    M, K, N = 37, 32, 40
    x, w, _ = make_inputs(M, K, N, torch.float32, bias=False)
    out = hopper.forward(x, w, None)
    torch.testing.assert_close(out, torch.relu(x @ w.T))
    grad_out = torch.randn(M, N)
    grads = hopper.backward(grad_out, out, x, w, *needs)
    for need, ours, exact in zip(needs, grads, _reference_grads(grad_out, out, x, w)):
        if need:
            torch.testing.assert_close(ours.double(), exact, rtol=1e-5, atol=1e-5)
        else:
            assert ours is None


def test_tf32_operands_are_rounded(monkeypatch):
    """With TF32 allowed, each TMA kernel rounds its fp32 operands to tf32 like the portable ones;
    the bias sum is not rounded."""
    monkeypatch.setattr(hopper, "dot_precision", lambda dtype: "tf32" if dtype == torch.float32 else "ieee")
    check_tf32_operand_rounding(hopper.forward, hopper.backward, 45, 72, 40)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bias_gradient_over_many_tiles(dtype):
    """grad_b alone is written by the programs of the first K tile, summed over every M step:
    by tl.sum in fp32, by the narrow dot with ones in 16-bit."""
    M, K, N = 80, 96, 24  # 6 K tiles, 5 M steps, 2 N tiles of the 16-wide interpreter tiles
    x, w, _ = make_inputs(M, K, N, dtype)
    out = torch.relu(torch.randn(M, N, dtype=dtype))
    grad_out = torch.randn(M, N, dtype=dtype)
    _, _, grad_b = hopper.backward(grad_out, out, x, w, False, True, True)
    g = _masked(grad_out, out)
    assert_parity(grad_b, g.float().sum(0).to(dtype), g.double().sum(0), ATOL[dtype], what="grad_b")


def test_launchers_hand_eligible_calls_to_the_tma_kernels(monkeypatch):
    """The hook at the top of kernels/linear_relu.py's launchers, end to end through the public op
    and autograd on CPU: with eligibility forced (it needs an sm_90 GPU), forward and backward
    reach the TMA launchers with their arguments in order, and the results are right."""
    calls = []
    for name in ("forward", "backward"):
        real = getattr(hopper, name)
        monkeypatch.setattr(hopper, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    monkeypatch.setattr(hopper, "forward_eligible", lambda *a: True)
    monkeypatch.setattr(hopper, "backward_eligible", lambda *a: True)
    x, w, b = make_inputs(37, 24, 40, torch.float32, requires_grad=True)
    grad_out = torch.randn(37, 40)
    with use_backend("triton"):
        out = fastcore5.linear_relu(x, w, b)
        grads = torch.autograd.grad(out, (x, w, b), grad_out)
    assert calls == ["forward", "backward"]
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    exact = torch.relu(x64 @ w64.T + b64)
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5)
    for ours, expected in zip(grads, _reference_grads(grad_out, out.detach(), x.detach(), w.detach())):
        torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-5)


# ---- descriptor cache ----------------------------------------------------------------------

def test_descriptor_cache_hits_only_for_the_same_address_shape_strides_block_dtype_and_device():
    """A cached TMA descriptor found for the wrong tensor would make a GPU kernel read or write the
    wrong memory, silently: every fact a descriptor encodes must be in its key."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    tma_descriptors._DESCRIPTORS.clear()
    memory = torch.randn(64 * 64, dtype=torch.bfloat16)
    t = memory[: 64 * 48].view(64, 48)
    d = tma_descriptors.cached_descriptor(t, (16, 32))
    fresh = TensorDescriptor(t, list(t.shape), list(t.stride()), [16, 32])
    assert (d.base.data_ptr(), d.base.dtype, d.shape, d.strides, d.block_shape) == (
        fresh.base.data_ptr(), fresh.base.dtype, fresh.shape, fresh.strides, fresh.block_shape)
    assert tma_descriptors.cached_descriptor(t, (16, 32)) is d
    assert tma_descriptors.cached_descriptor(memory[: 64 * 48].view(64, 48), (16, 32)) is d  # another view, same layout
    changed = {
        "address": memory[16 : 16 + 64 * 48].view(64, 48),
        "shape": memory[: 63 * 48].view(63, 48),
        "strides": memory.as_strided((64, 48), (64, 1)),
        "dtype": t.view(torch.float16),
        "copy": t.clone(),
    }
    for what, other in changed.items():
        assert tma_descriptors.cached_descriptor(other, (16, 32)) is not d, what
        assert tma_descriptors.cached_descriptor(other, (16, 32)).base.data_ptr() == other.data_ptr(), what
    assert tma_descriptors.cached_descriptor(t, (32, 16)) is not d  # block shape
    assert tma_descriptors.cached_descriptor(t, (16, 32)) is d  # still there


def test_descriptor_key_names_the_device():
    class OnDevice:
        """What the key reads of a tensor, on a device of our choosing."""
        shape, dtype = (64, 48), torch.bfloat16

        def __init__(self, device):
            self.device = device

        def data_ptr(self):
            return 1 << 20

        def stride(self):
            return (48, 1)

        def get_device(self):
            return self.device

    assert tma_descriptors.descriptor_key(OnDevice(0), (16, 32)) == tma_descriptors.descriptor_key(OnDevice(0), (16, 32))
    assert tma_descriptors.descriptor_key(OnDevice(0), (16, 32)) != tma_descriptors.descriptor_key(OnDevice(1), (16, 32))


def test_descriptor_cache_keeps_no_tensor_alive_and_stays_bounded(monkeypatch):
    import gc
    import weakref

    t = torch.randn(64, 48, dtype=torch.bfloat16)
    alive = weakref.ref(t)
    descriptor = tma_descriptors.cached_descriptor(t, (16, 32))
    del t
    gc.collect()
    assert alive() is None and descriptor.base.data_ptr() % 16 == 0
    monkeypatch.setattr(tma_descriptors, "_MAX_DESCRIPTORS", 4)
    tma_descriptors._DESCRIPTORS.clear()
    keep = [torch.randn(16, 16) for _ in range(10)]
    for x in keep:
        tma_descriptors.cached_descriptor(x, (16, 16))
        assert len(tma_descriptors._DESCRIPTORS) <= 4


# ---- eligibility -----------------------------------------------------------------------------

def test_tma_compatible_needs_unit_inner_stride_16_byte_rows_and_alignment():
    base = torch.randn(32, 64, dtype=torch.bfloat16)
    assert hopper.tma_compatible(base)
    assert not hopper.tma_compatible(base.t())  # column-major: inner stride 32
    assert not hopper.tma_compatible(base[:, ::2])  # inner stride 2
    assert not hopper.tma_compatible(torch.randn(32, 60, dtype=torch.bfloat16))  # rows 120 bytes apart
    assert hopper.tma_compatible(torch.randn(32, 72, dtype=torch.bfloat16)[:, :56])  # rows 144 bytes apart
    assert not hopper.tma_compatible(torch.randn(32 * 64 + 1, dtype=torch.bfloat16)[1:].view(32, 64))  # base + 2 bytes
    assert hopper.tma_compatible(torch.randn(32 * 64 + 8, dtype=torch.bfloat16)[8:].view(32, 64))  # base + 16 bytes


def test_dtypes_eligible_are_16_bit_and_fp32_with_tf32(monkeypatch):
    for precision, fp32_eligible in (("tf32", True), ("ieee", False)):
        monkeypatch.setattr(hopper, "dot_precision", lambda dtype, p=precision: p if dtype == torch.float32 else "ieee")
        assert hopper.dtype_eligible(torch.bfloat16) and hopper.dtype_eligible(torch.float16)
        assert hopper.dtype_eligible(torch.float32) == fp32_eligible
        assert not hopper.dtype_eligible(torch.float64)


def test_cpu_launches_stay_on_the_portable_kernels():
    x, w, _ = make_inputs(32, 64, 16, torch.bfloat16)
    out = torch.relu(torch.randn(32, 16, dtype=torch.bfloat16))
    assert hopper.device_capability(x) is None
    assert not hopper.forward_eligible(x, w)
    assert not hopper.backward_eligible(torch.randn_like(out), out, x, w, True, True, True)


@pytest.fixture
def sm90(monkeypatch):
    """The kernel choice as an sm_90 GPU makes it, for CPU tensors (the TMA kernels then run in
    the interpreter), with no size threshold: tests' shapes are far below MIN_MACS."""
    monkeypatch.setattr(hopper, "device_capability", lambda t: (9, 0))
    monkeypatch.setattr(hopper, "MIN_MACS", 1)


def test_the_kernel_choice(sm90, monkeypatch):
    """takes_tma, the one choice: sm_90 only, eligible dtypes, unit inner strides, 16-byte rows
    and addresses, the size threshold; traced (fake tensors) judges everything but the address."""
    x, w, _ = make_inputs(64, 48, 40, torch.bfloat16)
    assert hopper.forward_eligible(x, w)
    for capability in ((8, 0), (8, 9), (10, 0), None):
        monkeypatch.setattr(hopper, "device_capability", lambda t, c=capability: c)
        assert not hopper.forward_eligible(x, w), capability
    monkeypatch.setattr(hopper, "device_capability", lambda t: (9, 0))
    assert not hopper.forward_eligible(x.double(), w.double())
    with allow_tf32(False):
        assert not hopper.forward_eligible(x.float(), w.float())
    with allow_tf32(True):
        assert hopper.forward_eligible(x.float(), w.float())
    assert not hopper.forward_eligible(x, w[:36])  # N = 36: 72-byte output rows
    assert not hopper.forward_eligible(x.T.contiguous().T, w)  # column-major x
    misaligned = torch.randn(64 * 48 + 1, dtype=torch.bfloat16)[1:].view(64, 48)
    assert not hopper.forward_eligible(misaligned, w)
    monkeypatch.setattr(hopper, "MIN_MACS", 64 * 48 * 40 + 1)
    assert not hopper.forward_eligible(x, w)
    monkeypatch.setattr(hopper, "MIN_MACS", 1)
    out = torch.relu(torch.randn(64, 40, dtype=torch.bfloat16))
    grad = torch.randn_like(out)
    assert hopper.backward_eligible(grad, out, x, w, True, True, True)
    assert not hopper.backward_eligible(grad, out, x, w, False, False, True)  # grad_b alone
    assert not hopper.backward_eligible(grad, out.T.contiguous().T, x, w, True, True, True)
    assert hopper.grad_input_eligible(grad, w, x) and not hopper.grad_input_eligible(grad, w, x.T.contiguous().T)
    assert hopper.grad_weight_eligible(grad, x) and not hopper.grad_weight_eligible(grad, misaligned)
    # at trace time (torch.compile's fake CUDA tensors): no address, the rest as above
    from torch._subclasses.fake_tensor import FakeTensorMode

    def fake(*shape, dtype=torch.bfloat16, strides=None):
        strides = strides or (shape[1], 1)
        return torch.empty_strided(shape, strides, dtype=dtype, device="cuda")

    with FakeTensorMode():
        assert hopper.forward_eligible(fake(64, 48), fake(40, 48), traced=True)
        assert not hopper.forward_eligible(fake(64, 48), fake(36, 48), traced=True)
        assert not hopper.forward_eligible(fake(64, 48, strides=(1, 64)), fake(40, 48), traced=True)
        assert not hopper.forward_eligible(fake(64, 48, dtype=torch.float64), fake(40, 48, dtype=torch.float64), traced=True)


# Every Triton kernel a Linear+ReLU or MLP launch can run, by the name its launches are recorded under.
_FWD_AND_GRAD_INPUT = "_fwd_and_grad_input_kernel"  # the forward when B_TRANSPOSED, else grad_x
_TMA_KERNELS = {_FWD_AND_GRAD_INPUT, "_bwd_weight_kernel"}
_PORTABLE_KERNELS = {"_linear_relu_fwd_kernel", "_linear_relu_bwd_input_kernel", "_linear_relu_bwd_weight_kernel",
                     "_mlp_grad_input_kernel"}


@pytest.fixture
def launches(monkeypatch):
    """The (kernel, flags) of every launch of the GEMM kernels, in order; each launch still runs."""
    from fastcore5.kernels import linear_relu as portable_module, mlp as mlp_module

    flag_names = ("B_TRANSPOSED", "HAS_BIAS", "RELU", "MASK_GRAD", "MASK_BELOW", "MASK", "HAS_BIAS_GRAD", "HAS_WEIGHT_GRAD")
    seen = []
    kernels = [getattr(m, name) for m in (hopper, portable_module, mlp_module) for name in dir(m)
               if name in _TMA_KERNELS | _PORTABLE_KERNELS]
    for kernel in kernels:
        def run(*args, _kernel=kernel, _run=kernel.run, **kwargs):
            bound = {**dict(zip(_kernel.arg_names, args)), **kwargs}
            seen.append((_kernel.__name__, tuple(f for f in flag_names if bound.get(f) is True)))
            return _run(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", run)
    return seen


def _quarters(*shape, dtype=torch.float32, device="cpu"):
    """Random multiples of 1/4 in [-0.75, 0.75]. With inputs and parameters drawn so, the hidden
    layers' pre-activations are exact in any dtype here (few bits, fp32 accumulation; the sizes
    used keep them under 2**8 significant bits), so every implementation applies the same ReLU
    mask as float64: no element's gradient differs by a mask that rounding flipped, and each can
    be held to a rounding-sized bound."""
    return (torch.randint(-3, 4, shape, device=device) / 4).to(dtype)


def _mlp_with_random_parameters(sizes, dtype=torch.float32, device="cpu"):
    from fastcore5.nn import MLP

    mlp = MLP(sizes, dtype=dtype, device=device)
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(_quarters(*p.shape))
    return mlp


def _float64_twin(mlp):
    """The same stack as a plain float64 nn.Sequential (the reference)."""
    twin = torch.nn.Sequential(*(torch.nn.Linear(m.in_features, m.out_features, dtype=torch.float64, device=m.weight.device)
                                 if isinstance(m, torch.nn.Linear) else torch.nn.ReLU() for m in mlp))
    twin.load_state_dict({k: v.double() for k, v in mlp.state_dict().items()})
    return twin


# TF32 rounds each fp32 operand to 10 mantissa bits: ~1e-3 of the sizes' dot products here.
_TF32_TOLERANCE = {"rtol": 1e-2, "atol": 1e-2}


def _run_and_compare(model, x, grad_out, mlp):
    """model (mlp, or a compiled mlp) against mlp's float64 twin, fp32 with TF32 rounding."""
    ours, our_grads = forward_backward(model, x, grad_out)
    exact, exact_grads = forward_backward(_float64_twin(mlp), x.double(), grad_out.double())
    for o, e in zip([ours] + our_grads, [exact] + exact_grads):
        torch.testing.assert_close(o.double(), e, **_TF32_TOLERANCE)


# What each path launches for a 3-layer MLP (bias everywhere), forward then backward, when the
# choice says TMA: hidden layers' forward with ReLU, the output layer's without, the output
# layer's grad_W, its grad-input masked by the hidden layer below, and so on down to grad_x.
_MLP_TMA_LAUNCHES = [
    (_FWD_AND_GRAD_INPUT, ("B_TRANSPOSED", "HAS_BIAS", "RELU")), (_FWD_AND_GRAD_INPUT, ("B_TRANSPOSED", "HAS_BIAS", "RELU")),
    (_FWD_AND_GRAD_INPUT, ("B_TRANSPOSED", "HAS_BIAS")),
    ("_bwd_weight_kernel", ("HAS_BIAS_GRAD",)), (_FWD_AND_GRAD_INPUT, ("MASK_BELOW",)),
    ("_bwd_weight_kernel", ("HAS_BIAS_GRAD",)), (_FWD_AND_GRAD_INPUT, ("MASK_BELOW",)),
    ("_bwd_weight_kernel", ("HAS_BIAS_GRAD",)), (_FWD_AND_GRAD_INPUT, ()),
]


@pytest.mark.parametrize("capability", [(9, 0), (8, 9)])
def test_eager_mlp_and_linear_relu_launch_what_the_choice_names(launches, monkeypatch, capability):
    """nn.MLP's fused backward and nn.LinearReLU, forward and backward, on CPU tensors with the
    device query answering ``capability``: on sm_90 every GEMM runs a TMA kernel (in the
    interpreter), elsewhere none does, and the results match float64 either way."""
    monkeypatch.setattr(hopper, "device_capability", lambda t: capability)
    monkeypatch.setattr(hopper, "MIN_MACS", 1)
    with allow_tf32(True):  # fp32 reaches the TMA kernels only with TF32 allowed; the interpreter computes in fp32
        mlp = _mlp_with_random_parameters((24, 40, 32, 16))
        x, grad_out = _quarters(37, 24), _quarters(37, 16)
        with use_backend("triton"):
            _run_and_compare(mlp, x, grad_out, mlp)
        if capability == (9, 0):
            assert launches == _MLP_TMA_LAUNCHES
        else:
            assert launches and {name for name, _ in launches} <= _PORTABLE_KERNELS
        launches.clear()
        layer = fastcore5.nn.LinearReLU(24, 40)
        with use_backend("triton"):
            out = layer(torch.randn(37, 24, requires_grad=True))
            out.backward(torch.randn_like(out))  # (.sum()'s expanded gradient has stride 0: no TMA)
    expected = _TMA_KERNELS if capability == (9, 0) else {"_linear_relu_fwd_kernel", "_linear_relu_bwd_input_kernel",
                                                         "_linear_relu_bwd_weight_kernel"}
    assert {name for name, _ in launches} == expected


@pytest.mark.parametrize("capability", [(9, 0), (8, 9)])
def test_compiled_mlp_launches_what_the_choice_names(launches, monkeypatch, capability):
    """torch.compile(fullgraph=True) of nn.MLP (aot_eager on CPU: the per-layer ops are custom ops
    that call the eager launchers): the same choice as in eager mode."""
    monkeypatch.setattr(hopper, "device_capability", lambda t: capability)
    monkeypatch.setattr(hopper, "MIN_MACS", 1)
    torch._dynamo.reset()
    with allow_tf32(True):
        mlp = _mlp_with_random_parameters((24, 40, 32, 16))
        x, grad_out = _quarters(37, 24), _quarters(37, 16)
        with use_backend("triton"):
            _run_and_compare(torch.compile(mlp, backend="aot_eager", fullgraph=True), x, grad_out, mlp)
    torch._dynamo.reset()
    tma = [launch for launch in launches if launch[0] in _TMA_KERNELS]
    if capability == (9, 0):  # hidden layers by the fused op, the output layer by F.linear (torch's)
        assert {name for name, _ in tma} == _TMA_KERNELS and len(tma) == len(launches)
    else:
        assert launches and not tma


@pytest.mark.parametrize("capability", [(9, 0), (8, 9)])
def test_triton_op_bodies_divert_to_the_opaque_tma_ops_on_sm90(launches, monkeypatch, capability):
    """Where the ops are triton_ops (a CUDA machine), their bodies run at trace time and launch
    through wrap_triton, which cannot carry TMA descriptors: on sm_90 they call the opaque ops of
    fastcore5/ops/linear_relu_tma.py instead (which run the eager launcher), elsewhere they wrap
    the portable kernels. Simulated on CPU: the bodies told they are triton_ops, wrap_triton
    recording what it wraps."""
    from fastcore5.ops import _library, linear_relu_tma
    from fastcore5.ops.linear_relu import linear_relu_backward_op, linear_relu_op

    monkeypatch.setattr(hopper, "device_capability", lambda t: capability)
    monkeypatch.setattr(hopper, "MIN_MACS", 1)
    monkeypatch.setattr(_library, "SEES_TRITON_KERNELS", True)
    monkeypatch.setattr(linear_relu_tma, "SEES_TRITON_KERNELS", True)
    wrapped, opaque = [], []
    monkeypatch.setattr(torch.library, "wrap_triton", lambda kernel: wrapped.append(kernel.__name__) or kernel, raising=False)
    for name in ("forward_op", "backward_op"):
        real = getattr(linear_relu_tma, name)
        monkeypatch.setattr(linear_relu_tma, name, lambda *a, _real=real, _name=name: opaque.append(_name) or _real(*a))
    x, w, b = make_inputs(37, 24, 40, torch.bfloat16)
    out = linear_relu_op(x, w, b, "triton")
    grads = linear_relu_backward_op(torch.randn_like(out), out, x, w, True, True, True, "triton")
    assert_parity(out, torch.relu(x @ w.T + b), torch.relu(x.double() @ w.double().T + b.double()), 1e-2, what="out")
    assert [g.shape for g in grads] == [x.shape, w.shape, b.shape]
    on_sm90 = capability == (9, 0)
    assert opaque == (["forward_op", "backward_op"] if on_sm90 else [])
    assert (wrapped == []) == on_sm90
    assert {name in _TMA_KERNELS for name, _ in launches} == {on_sm90}


def _bucket(rows, cols, reduction, dtype="bfloat16", element_bytes=2):
    return (("dtype", dtype), ("precision", "ieee"), ("flags", "1"), ("rows", rows), ("cols", cols),
            ("reduction", reduction), ("bytes", element_bytes))


def _tiles(configs):
    return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages, c.num_warps) for c in configs}


def test_candidates_fit_shared_memory_and_the_problem(monkeypatch):
    monkeypatch.setattr(hopper, "interpreting", lambda: False)  # the list a GPU process tunes over
    large = _bucket(8192, 4096, 1024)
    for streamed, element_bytes in ((1, 2), (2, 2), (1, 4), (2, 4)):
        tiles = _tiles(hopper.candidates(_bucket(8192, 4096, 1024, element_bytes=element_bytes), streamed))
        assert tiles
        assert all(hopper._shared_bytes(t, streamed, element_bytes) <= HOPPER_SHARED_MEMORY_BYTES for t in tiles)
    # 128x256x64 in 3 stages fits the forward's two operands, not the backward's three
    assert (128, 256, 64, 3, 8) in _tiles(hopper.candidates(large, 1))
    assert (128, 256, 64, 3, 8) not in _tiles(hopper.candidates(large, 2))
    small = _tiles(hopper.candidates(_bucket(64, 64, 64), 2))
    assert small and all(max(t[:3]) <= 64 for t in small)


# ---- sm_90 compile (CPU) -----------------------------------------------------------------------

def _estimate_inputs(row) -> tuple[int, int]:
    """(streamed tiles, output tiles) of the launcher that launched a TMA kernel's row."""
    c = row["constexprs"]
    if row["kernel"] == _FWD_AND_GRAD_INPUT and c["B_TRANSPOSED"] == "True":  # the forward
        return 1, 1
    if row["kernel"] == _FWD_AND_GRAD_INPUT:  # grad_x
        return (2, 1) if c["MASK_GRAD"] == "True" else (1, 2)  # Linear+ReLU's, the MLP's
    return (2, 1) if c["RELU"] == "True" else (1, 1)


def test_kernels_compile_for_sm90_with_tma_wgmma_and_pipelined_operands():
    """Every TMA kernel in every variant that Linear+ReLU's and the MLP's launchers (and so
    torch.compile's opaque TMA ops) can send to it, in bf16, fp16 and fp32 with TF32, at the
    largest and the smallest candidate config and the default: the PTX issues bulk tensor copies
    (cp.async.bulk.tensor) and wgmma, the TTGIR multi-buffers the operand tiles (loads run ahead of
    the dots), and the shared memory used stays within both a Hopper SM and the estimate the
    candidates were pruned by."""
    rows = [r for r in compile_op("linear_relu_hopper") if r["kernel"] in _TMA_KERNELS]
    seen = {(r["kernel"], r["signature"].split("<")[1].split("[")[0]) for r in rows}
    assert seen == {(k, d) for k in _TMA_KERNELS for d in ("bf16", "fp16", "fp32")}
    flag_names = ("B_TRANSPOSED", "HAS_BIAS", "RELU", "MASK_GRAD", "MASK_BELOW", "HAS_BIAS_GRAD")
    variants = {(r["kernel"], *(f for f in flag_names if r["constexprs"].get(f) == "True")) for r in rows}
    forward, grad_input = (_FWD_AND_GRAD_INPUT, "B_TRANSPOSED"), (_FWD_AND_GRAD_INPUT,)
    assert variants == {
        (*forward, "HAS_BIAS", "RELU"), (*forward, "RELU"),  # Linear+ReLU
        (*forward, "HAS_BIAS"), forward,  # the MLP's output layer
        (*grad_input, "MASK_GRAD"),  # Linear+ReLU
        (*grad_input, "MASK_BELOW"), grad_input,  # the MLP, above a hidden layer / the input
        ("_bwd_weight_kernel", "RELU", "HAS_BIAS_GRAD"), ("_bwd_weight_kernel", "RELU"),  # Linear+ReLU
        ("_bwd_weight_kernel", "HAS_BIAS_GRAD"), ("_bwd_weight_kernel",),  # the MLP
    }
    for row in rows:
        c = row["constexprs"]
        tile = tuple(int(c[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")) + (row["options"]["num_stages"], 0)
        operand_bytes = {"bf16": 2, "fp16": 2, "fp32": 4}[row["signature"].split("<")[1].split("[")[0]]
        streamed, outputs = _estimate_inputs(row)
        assert row["fits"] and row["shared_bytes"] <= hopper._shared_bytes(tile, streamed, operand_bytes, outputs), row
        assert row["tma"] and row["ptx_bulk_tensor_copies"] > 0, row
        assert row["wgmma"] and row["ptx_wgmma"] > 0, row
        assert row["operand_buffers"] >= 2, row
        assert row["spill_stores"] == 0 or "default" not in row["roles"], row
    bias_rows = [r for r in rows if r["constexprs"].get("HAS_BIAS_GRAD") == "True"]
    assert {r["constexprs"]["BIAS_BY_DOT"] for r in bias_rows} == {"True", "False"}  # 16-bit by dot, fp32 by sum


# ---- GPU ---------------------------------------------------------------------------------------

def _on_hopper() -> bool:
    return HAS_CUDA and torch.cuda.get_device_capability()[0] >= 9


@pytest.fixture
def three_candidates(monkeypatch, tmp_path):
    """Tune among three tiles (two warpgroups with 16-bit and with fp32 operands, one small):
    each new bucket compiles every candidate of three kernels, which the full list would make
    minutes of a test run. The choices go to a scratch tuning cache, not the user's."""
    monkeypatch.setattr(hopper, "_TILES", [(128, 256, 32, 4, 8), (128, 128, 32, 3, 8), (64, 64, 64, 4, 4)])
    monkeypatch.setattr(hopper, "MIN_MACS", 1)  # the tests' shapes are below the host-time threshold
    monkeypatch.setenv("FASTCORE5_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FASTCORE5_TUNING", "on")  # scripts/gpu_check.sh turns it off for the other tests
    _tuning.forget_disk_cache()
    yield
    _tuning.forget_disk_cache()


@pytest.fixture
def tf32(request):
    with allow_tf32(request.param):
        yield request.param


@pytest.mark.gpu
@pytest.mark.skipif(HAS_CUDA and not _on_hopper(), reason="the TMA kernels need sm_90+")
@pytest.mark.parametrize("dtype, tf32", [(torch.bfloat16, False), (torch.float16, False), (torch.float32, True)], indirect=["tf32"])
@pytest.mark.parametrize("shape, N", [((1024, 256), 1024), ((1024, 1024), 256), ((1000, 264), 776)])
def test_gpu_parity_through_the_tma_path(three_candidates, monkeypatch, dtype, tf32, shape, N):
    """The public op at small versions of the benchmark shapes (and a ragged one): it takes the
    TMA kernels, and forward and gradients are within 2x torch's error against float64."""
    calls = []
    for name in ("forward", "backward"):
        real = getattr(hopper, name)
        monkeypatch.setattr(hopper, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    x = torch.randn(*shape, dtype=dtype, device="cuda")
    w = torch.randn(N, shape[-1], dtype=dtype, device="cuda") / shape[-1] ** 0.5
    b = torch.randn(N, dtype=dtype, device="cuda")
    grad_out = torch.randn(shape[0], N, dtype=dtype, device="cuda")
    check_layout_parity(x, w, b, grad_out, {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-3}[dtype])
    assert calls == ["forward", "backward"]


@pytest.mark.gpu
@pytest.mark.skipif(HAS_CUDA and not _on_hopper(), reason="the TMA kernels need sm_90+")
def test_gpu_ineligible_layouts_take_the_portable_kernels(three_candidates, monkeypatch):
    calls = []
    monkeypatch.setattr(hopper, "forward", lambda *a: calls.append(a))
    x = torch.randn(256, 2 * 128, dtype=torch.bfloat16, device="cuda")[:, ::2]  # inner stride 2
    w = torch.randn(64, 128, dtype=torch.bfloat16, device="cuda")
    with use_backend("triton"):
        out = fastcore5.linear_relu(x, w)
    assert calls == []
    assert_parity(out, torch.relu(x @ w.T), torch.relu(x.double() @ w.double().T), 5e-2)
    assert not hopper.forward_eligible(x, w, None)
    assert not hopper.forward_eligible(x.contiguous().double(), w.double(), None)  # fp64
    with allow_tf32(False):
        assert not hopper.forward_eligible(x.contiguous().float(), w.float(), None)  # fp32 without TF32
    assert not hopper.forward_eligible(x.contiguous(), w[:60], None)  # N = 60: 120-byte output rows
    assert hopper.forward_eligible(x.contiguous(), w, None)
    monkeypatch.setattr(hopper, "MIN_MACS", 256 * 64 * 128 + 1)  # one multiply-add short: host-bound, portable
    assert not hopper.forward_eligible(x.contiguous(), w, None)


@pytest.mark.gpu
@pytest.mark.skipif(HAS_CUDA and not _on_hopper(), reason="the TMA kernels need sm_90+")
def test_gpu_backward_is_deterministic(three_candidates):
    """No atomics: two backward passes on the same inputs agree bit for bit, grad_b included."""
    x, w, b = make_inputs(2048, 512, 768, torch.bfloat16, device="cuda")
    out = portable.linear_relu_forward(x, w, b)
    grad_out = torch.randn_like(out)
    assert hopper.backward_eligible(grad_out, out, x, w, True, True, True)
    first = portable.linear_relu_backward(grad_out, out, x, w, True, True, True)
    second = portable.linear_relu_backward(grad_out, out, x, w, True, True, True)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


def test_opaque_tma_ops_pass_opcheck(sm90):
    """The ops torch.compile's graph calls on sm_90 in place of the traced kernels: schema, fake
    implementation and autograd registration agree with what they compute (here through the TMA
    kernels, in the interpreter)."""
    from fastcore5.ops import linear_relu_tma

    x, w, b = make_inputs(37, 24, 40, torch.bfloat16)
    out = linear_relu_tma.forward_op(x, w, b)
    torch.library.opcheck(linear_relu_tma.forward_op, (x, w, b))
    torch.library.opcheck(linear_relu_tma.forward_op, (x, w, None))
    grad_out = torch.randn_like(out)
    torch.library.opcheck(linear_relu_tma.backward_op, (grad_out, out, x, w, True, True, True))
    torch.library.opcheck(linear_relu_tma.backward_op, (grad_out, out, None, w, True, False, False))
