"""nn.MLP on an sm_90 GPU, eager and under torch.compile (inductor): every GEMM the choice sends to
the TMA kernels runs there, and each element of the output and of every gradient is within twice
torch's own error at that element (nn.Sequential in the same dtype, against float64).

GPU only (scripts/gpu_check.sh runs it, in a file of its own so that its inductor compile has its
own time limit). The same paths are checked on CPU, kernels and routing, with the device query
answering sm_90, in tests/test_linear_relu_hopper.py; only a GPU shows the compiled TMA kernels'
values and that inductor's graph really calls the opaque TMA ops.
"""
import pytest
import torch

from fastcore5 import use_backend
from fastcore5.kernels import linear_relu_hopper as hopper

from conftest import HAS_CUDA
from helpers import allow_tf32, assert_parity
from test_mlp import forward_backward
from test_linear_relu_hopper import (  # noqa: F401 (launches is a fixture)
    _MLP_TMA_LAUNCHES, _TMA_KERNELS, _float64_twin, _mlp_with_random_parameters, _quarters, launches,
)

# M above every tile of the default configs and ragged against them (1000); each layer's rows
# whole 16-byte multiples (TMA); small enough that the file's compiles dominate its time. With
# quarter-valued inputs and parameters (_quarters) the first hidden layer's outputs stay under
# 2**11 sixteenths, exact in TF32 and rounded once (the same way by torch and by us) in bf16, so
# both hidden layers' pre-activations are exact and every implementation's ReLU mask is
# float64's: parity can be judged element by element.
M, SIZES = 1000, (128, 512, 136, 40)


def _on_sm90() -> bool:
    return HAS_CUDA and torch.cuda.get_device_capability()[0] == 9


@pytest.fixture
def untuned(monkeypatch):
    """Default configs (what capture and torch.compile launch, and the GPU check's setting), and no
    size threshold: these products are below MIN_MACS, the host-time cut-off."""
    monkeypatch.setenv("FASTCORE5_TUNING", "off")
    monkeypatch.setattr(hopper, "MIN_MACS", 1)


def _torch_twin(mlp):
    """nn.Sequential(Linear, ReLU, ...) in mlp's dtype with its parameters: torch's own error."""
    twin = torch.nn.Sequential(*(torch.nn.Linear(m.in_features, m.out_features, dtype=m.weight.dtype, device="cuda")
                                 if isinstance(m, torch.nn.Linear) else torch.nn.ReLU() for m in mlp))
    twin.load_state_dict(mlp.state_dict())
    return twin


def _check_parity(model, mlp, dtype):
    x, grad_out = _quarters(M, SIZES[0], dtype=dtype, device="cuda"), _quarters(M, SIZES[-1], dtype=dtype, device="cuda")
    with use_backend("triton"):
        ours, our_grads = forward_backward(model, x, grad_out)
    theirs, their_grads = forward_backward(_torch_twin(mlp), x, grad_out)
    exact, exact_grads = forward_backward(_float64_twin(mlp), x.double(), grad_out.double())
    names = ["output", "grad_x"] + [name for name, _ in mlp.named_parameters()]
    for name, o, t, e in zip(names, [ours] + our_grads, [theirs] + their_grads, [exact] + exact_grads):
        assert_parity(o, t, e, atol=1e-3 * e.abs().max().item(), what=name)


@pytest.mark.gpu
@pytest.mark.skipif(HAS_CUDA and not _on_sm90(), reason="the TMA kernels run on sm_90")
@pytest.mark.parametrize("dtype, tf32", [(torch.bfloat16, False), (torch.float32, True)])
def test_gpu_eager_mlp_runs_every_gemm_on_the_tma_kernels(untuned, launches, dtype, tf32):
    with allow_tf32(tf32):
        mlp = _mlp_with_random_parameters(SIZES, dtype, "cuda")
        _check_parity(mlp, mlp, dtype)
    assert launches == _MLP_TMA_LAUNCHES


@pytest.mark.gpu
@pytest.mark.skipif(HAS_CUDA and not _on_sm90(), reason="the TMA kernels run on sm_90")
def test_gpu_compiled_mlp_runs_its_fused_layers_on_the_tma_kernels(untuned, launches):
    """Under inductor the hidden layers are the triton_ops fastcore5::linear_relu(_backward), whose
    traced bodies call the opaque TMA ops on sm_90 (fastcore5/ops/linear_relu_tma.py); the
    output layer is F.linear (torch's). Inductor launches portable kernels its own way, so every
    launch recorded here is an eager launcher's: all of them must be TMA kernels, all three."""
    torch._dynamo.reset()
    mlp = _mlp_with_random_parameters(SIZES, torch.bfloat16, "cuda")
    _check_parity(torch.compile(mlp, fullgraph=True), mlp, torch.bfloat16)
    torch._dynamo.reset()
    assert {name for name, _ in launches} == _TMA_KERNELS
