"""The C++ CPU backend ("cpu"): the extension is built and loaded, and the backend is chosen,
named and refused as fastcore5/backends.py says. The kernels' own tests build on
tests/native_cpu.py."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastcore5 import backends, use_backend
from fastcore5.backends import BackendUnavailableError

from native_cpu import compiler_available, native_ops_loaded

CPU = torch.device("cpu")


@pytest.fixture
def fresh_selection(monkeypatch):
    """select() remembers its choices per process; each test here changes what is available."""
    monkeypatch.setattr(backends, "_selected", {})


def _cpu_kernels_present(monkeypatch, present: bool):
    monkeypatch.setattr(backends, "_native_kernels_missing", lambda backend, op: [] if present else ["an_op"])


def test_extension_loads_where_a_compiler_is():
    """A machine with a C++ compiler builds fastcore5._C at install: a failure there is swallowed
    by the install (so that the package still works) and must surface here."""
    if not compiler_available():
        pytest.skip("no C++ compiler: the install could not build fastcore5._C")
    if os.environ.get("FASTCORE5_BUILD_CPU") == "0":
        pytest.skip("FASTCORE5_BUILD_CPU=0: the extension was left out on purpose")
    assert native_ops_loaded(), (
        f"fastcore5._C did not load: {backends.native_extension.missing_reason}. "
        "Rebuild with `FASTCORE5_BUILD_CPU=1 pip install --no-deps --no-build-isolation -e .` to see the error"
    )
    assert backends.BUILD_ERROR_FILE.exists() is False, backends.BUILD_ERROR_FILE.read_text()[:2000]


def test_every_schema_is_defined_on_a_cpu_only_build():
    """The schemas do not depend on the CUDA kernels being built."""
    if not native_ops_loaded():
        pytest.skip("fastcore5._C is not built (test_extension_loads_where_a_compiler_is says why)")
    for names in backends.NATIVE_OPS.values():
        for name in names:
            assert hasattr(torch.ops.fastcore5_native, name), name


def test_availability_is_per_dispatch_key():
    """An op whose schema exists but which has no CPU kernel is unavailable on the cpu backend,
    and the reason says so (the op's mere presence is not enough)."""
    if not native_ops_loaded():
        pytest.skip("fastcore5._C is not built (test_extension_loads_where_a_compiler_is says why)")
    library = torch.library.Library("fastcore5_native", "FRAGMENT")
    library.define("test_only_meta_kernel(Tensor x) -> Tensor")
    library.impl("test_only_meta_kernel", lambda x: torch.empty_like(x), "Meta")
    try:
        assert backends._native_kernels_missing("cpu", "sgd") in ([], ["sgd_step"])
        backends.NATIVE_OPS["test_op"] = ("test_only_meta_kernel",)
        try:
            assert backends._native_kernels_missing("cpu", "test_op") == ["test_only_meta_kernel"]
            assert backends._native_kernels_missing("cuda", "test_op") == ["test_only_meta_kernel"]
            reason = backends.unavailable_reason("cpu", "test_op", CPU)
            assert "no CPU kernel for test_op" in reason and "test_only_meta_kernel" in reason
        finally:
            del backends.NATIVE_OPS["test_op"]
    finally:
        library._destroy()


@pytest.mark.parametrize("interpret", ["1", "0"])
def test_automatic_choice_on_cpu_puts_the_native_kernels_first(monkeypatch, fresh_selection, interpret):
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    _cpu_kernels_present(monkeypatch, True)
    if not native_ops_loaded():
        monkeypatch.setattr(backends, "native_extension", lambda: object())
    assert backends.select("sgd", CPU) == "cpu"
    with use_backend("torch"):
        assert backends.select("sgd", CPU) == "torch"


def test_automatic_choice_without_the_cpu_kernel_falls_back(monkeypatch, fresh_selection):
    _cpu_kernels_present(monkeypatch, False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends.select("linear_relu", CPU) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert backends.select("linear_relu", CPU) == "torch"


def test_cuda_tensors_never_choose_the_cpu_backend(monkeypatch, fresh_selection):
    _cpu_kernels_present(monkeypatch, True)
    assert "cpu" not in backends.PREFERENCE["sgd"]
    reason = backends.unavailable_reason("cpu", "sgd", torch.device("cuda"))
    assert "need CPU tensors" in reason
    with use_backend("cpu"), pytest.raises(BackendUnavailableError, match="need CPU tensors"):
        backends.select("sgd", torch.device("cuda"))


def test_explicit_request_without_the_extension_says_how_to_build_it(monkeypatch, fresh_selection):
    monkeypatch.setattr(backends, "native_extension", lambda: None)
    monkeypatch.setattr(backends.native_extension, "missing_reason", "its build failed at install time (boom)", raising=False)
    with use_backend("cpu"), pytest.raises(BackendUnavailableError, match="FASTCORE5_BUILD_CPU=1") as raised:
        backends.select("sgd", CPU)
    assert "boom" in str(raised.value)


def test_explicit_request_without_the_ops_kernel_names_the_op(monkeypatch, fresh_selection):
    _cpu_kernels_present(monkeypatch, False)
    if not native_ops_loaded():
        monkeypatch.setattr(backends, "native_extension", lambda: object())
    with use_backend("cpu"), pytest.raises(BackendUnavailableError, match="no CPU kernel for embedding_dot_bias"):
        backends.select("embedding_dot_bias", CPU)


_MISSING_EXTENSION_RUN = textwrap.dedent(
    """
    import importlib.abc, sys, warnings

    class HideExtension(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "fastcore5._C":
                raise ModuleNotFoundError("No module named 'fastcore5._C'", name=name)

    sys.meta_path.insert(0, HideExtension())
    warnings.simplefilter("always")
    import torch, fastcore5
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x, w, b = torch.randn(3, 4), torch.randn(5, 4), torch.randn(5)
        for _ in range(3):
            out = fastcore5.linear_relu(x, w, b)
            assert torch.allclose(out, torch.relu(x @ w.T + b))
            fastcore5.ops.sgd.sgd_step([w], [torch.randn(5, 4)], [None], lr=0.1, momentum=0.9)
    print(fastcore5.backends.select("sgd", "cpu"))
    for warning in caught:
        print(type(warning.message).__name__, warning.message)
    """
)


def test_missing_extension_runs_the_reference_with_one_warning():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTCORE5_BACKEND")}
    result = subprocess.run(
        [sys.executable, "-c", _MISSING_EXTENSION_RUN], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "torch"
    warned = [line for line in lines[1:] if line.startswith("NativeBuildWarning")]
    assert len(warned) == 1 and len(lines) == 2, lines
    assert "FASTCORE5_BUILD_CPU=1" in warned[0] and "reference" in warned[0]
