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

from conftest import HAS_CUDA
from helpers import allow_tf32, assert_parity
from test_linear_relu import _masked, check_layout_parity, check_tf32_operand_rounding, make_inputs
from test_compile_check import compile_op

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


def test_cpu_and_traced_launches_stay_on_the_portable_kernels():
    x, w, b = make_inputs(32, 64, 16, torch.bfloat16)
    out = torch.relu(torch.randn(32, 16, dtype=torch.bfloat16))
    assert not hopper.forward_eligible(x, w, b)
    assert not hopper.forward_eligible(x, w, b, wrap=lambda kernel: kernel)
    assert not hopper.backward_eligible(torch.randn_like(out), out, x, w, True, True, True)


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

def test_kernels_compile_for_sm90_with_tma_wgmma_and_pipelined_operands():
    """Every TMA kernel, in bf16, fp16 and fp32 with TF32, at the largest and the smallest
    candidate config: the PTX issues bulk tensor copies (cp.async.bulk.tensor) and wgmma, the
    TTGIR multi-buffers the operand tiles (loads run ahead of the dots), and the shared memory
    used stays within both a Hopper SM and the estimate the candidates were pruned by."""
    rows = compile_op("linear_relu_hopper")
    kernels = {"_fwd_kernel", "_bwd_input_kernel", "_bwd_weight_kernel"}
    seen = {(r["kernel"], r["signature"].split("<")[1].split("[")[0]) for r in rows}
    assert seen == {(k, d) for k in kernels for d in ("bf16", "fp16", "fp32")}
    for row in rows:
        c = row["constexprs"]
        tile = tuple(int(c[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")) + (row["options"]["num_stages"], 0)
        operand_bytes = {"bf16": 2, "fp16": 2, "fp32": 4}[row["signature"].split("<")[1].split("[")[0]]
        streamed = 1 if row["kernel"] == "_fwd_kernel" else 2
        assert row["fits"] and row["shared_bytes"] <= hopper._shared_bytes(tile, streamed, operand_bytes), row
        assert row["tma"] and row["ptx_bulk_tensor_copies"] > 0, row
        assert row["wgmma"] and row["ptx_wgmma"] > 0, row
        assert row["operand_buffers"] >= 2, row
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
