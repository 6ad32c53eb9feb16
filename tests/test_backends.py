"""Backend selection: the automatic choice, the environment variable, the context manager,
and the errors for a backend that cannot run."""
import pytest
import torch

from fastcore5 import backends, use_backend
from fastcore5.backends import BackendUnavailableError

CPU = torch.device("cpu")


@pytest.fixture
def without_cpu_kernels(monkeypatch):
    """The automatic choice as on a machine where fastcore5._C has no CPU kernels (the cpu
    backend, first on CPU tensors, is tested in test_cpu_backend.py)."""
    monkeypatch.setattr(backends, "_selected", {})
    monkeypatch.setattr(backends, "_native_kernels_missing", lambda backend, op: ["every_op"])


def test_automatic_choice_on_cpu_follows_the_interpreter(monkeypatch, without_cpu_kernels):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends.select("linear_relu", CPU) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert backends.select("linear_relu", CPU) == "torch"


def test_environment_variable_and_context_manager(monkeypatch, without_cpu_kernels):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert backends.select("linear_relu", CPU) == "torch"
    with use_backend("triton"):
        assert backends.select("linear_relu", CPU) == "triton"
        with use_backend("auto"):
            assert backends.select("linear_relu", CPU) == "triton"
        assert backends.select("linear_relu", CPU) == "triton"
    assert backends.select("linear_relu", CPU) == "torch"


def test_context_manager_restores_after_an_exception():
    with pytest.raises(KeyError):
        with use_backend("torch"):
            raise KeyError("boom")
    assert backends.requested() is None


def test_explicit_unavailable_backend_says_how_to_get_it(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with use_backend("triton"), pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        backends.select("linear_relu", CPU)
    with use_backend("cuda"), pytest.raises(BackendUnavailableError, match="CUDA tensors"):
        backends.select("linear_relu", CPU)


def test_missing_cuda_extension_names_the_build_switch(monkeypatch):
    monkeypatch.setattr(backends, "native_extension", lambda: None)
    reason = backends.unavailable_reason("cuda", "sgd", torch.device("cuda"))
    assert "FASTCORE5_BUILD_CUDA=1" in reason


def test_unknown_names_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="choose one of"):
        with use_backend("cudnn"):
            pass
    monkeypatch.setenv(backends.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="FASTCORE5_BACKEND"):
        backends.select("sgd", CPU)
    monkeypatch.delenv(backends.ENV_VAR)
    with pytest.raises(ValueError, match="unknown op"):
        backends.select("conv2d", CPU)


def test_float64_linear_relu_on_cuda_is_not_sent_to_compiled_triton():
    reason = backends.unavailable_reason("triton", "linear_relu", torch.device("cuda"), torch.float64)
    assert "float64" in reason


def test_kernel_table_loads_each_backend_once_and_refuses_the_reference():
    from fastcore5.kernels import sgd
    from fastcore5.ops.sgd import KERNELS

    assert KERNELS["triton"].sgd_step is sgd.sgd_step
    assert KERNELS["triton"] is KERNELS["triton"]
    with pytest.raises(ValueError, match="no fused kernels for backend 'torch'"):
        KERNELS["torch"]


def test_selection_is_cached_and_follows_every_request(monkeypatch, without_cpu_kernels):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert backends.select("sgd", CPU) == "triton"
    assert backends.select("sgd", "cpu") == "triton"  # a device type works too
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert backends.select("sgd", CPU) == "torch"
    with use_backend("triton"):
        assert backends.select("sgd", CPU) == "triton"
    monkeypatch.setenv(backends.ENV_VAR, "bogus")
    with pytest.raises(backends.BackendConfigError, match="FASTCORE5_BACKEND='bogus'"):
        backends.select("sgd", CPU)
