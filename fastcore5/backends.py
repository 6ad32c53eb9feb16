"""Which implementation runs an op: the one place that decides.

Backends:
  "triton"  the Triton kernels in fastcore5.kernels (CUDA tensors; CPU tensors only under
            TRITON_INTERPRET=1, which is how CI runs them)
  "cuda"    the CUDA C++ kernels in the optional extension fastcore5._C (CUDA tensors)
  "cpu"     the C++ CPU kernels in the same extension (CPU tensors; csrc/cpu/)
  "torch"   the plain-PyTorch reference in fastcore5.reference (anywhere)

A request comes from ``use_backend(name)`` (innermost wins) or else the environment variable
FASTCORE5_BACKEND; "auto" (or nothing) lets ``select`` choose. An explicit request for a backend
that cannot run the op raises BackendUnavailableError saying how to get it; the automatic choice
falls back quietly to the next backend in PREFERENCE (CUDA tensors) or CPU_PREFERENCE.

"cuda" and "cpu" are the two halves of one library, torch.ops.fastcore5_native (C++ ops
for either device): the same ops dispatch to the CUDA or the CPU kernel by the tensors'
device, so the op layer loads both through one loader. Either half may be missing (a build
without nvcc has no CUDA kernels; an op may not have its CPU kernel yet): a backend counts as
available for an op only when every op it calls has a kernel for that backend's dispatch key.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import warnings
from pathlib import Path

import torch

from .kernels._common import interpreting

BACKENDS = ("triton", "cuda", "cpu", "torch")
ENV_VAR = "FASTCORE5_BACKEND"
OPS = ("linear_relu", "embedding_dot_bias", "sgd")

# The native ops (torch.ops.fastcore5_native.*) each op family's layer calls on the cuda and cpu backends.
NATIVE_OPS = {
    "linear_relu": ("linear_relu_forward", "linear_relu_backward", "linear_relu"),
    "embedding_dot_bias": ("embedding_dot_bias_forward", "embedding_dot_bias_backward"),
    "sgd": ("sgd_step",),
}
_DISPATCH_KEY = {"cuda": "CUDA", "cpu": "CPU"}

# Automatic order on CUDA tensors, fastest measured first. Until the CUDA extension has been
# measured against Triton on a GPU (bench/NOTES.md) Triton leads for every op.
PREFERENCE = {op: ("triton", "cuda", "torch") for op in OPS}
# On CPU tensors: the native kernels, then Triton where its interpreter runs (that is how CI
# runs the Triton code), then the reference.
CPU_PREFERENCE = ("cpu", "triton", "torch")

# Stack of use_backend() requests. A plain module list rather than a ContextVar because
# torch.compile can read (and guard on) a global list but cannot trace ContextVar.get; the
# price is that use_backend() applies to every thread of the process, not just the caller's.
_requests: list[str] = []


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here."""


class BackendConfigError(ValueError):
    """FASTCORE5_BACKEND or use_backend() names no backend; the message is one line."""


def check_environment() -> None:
    """Raise BackendConfigError when FASTCORE5_BACKEND is set to something that is not a backend."""
    raw = os.environ.get(ENV_VAR, "")
    name = raw.strip().lower()
    if name and name not in BACKENDS + ("auto",):
        raise BackendConfigError(
            f"{ENV_VAR}={raw!r} is not a backend; set it to one of {', '.join(BACKENDS + ('auto',))}, or unset it"
        )


# Whether Triton runs kernels through its CPU interpreter: one definition, beside the launchers.
interpreter_active = interpreting


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        importlib.import_module("triton")
    except ImportError as err:
        return str(err)
    return None


BUILD_ERROR_FILE = Path(__file__).with_name("_C_build_error.txt")  # written by setup.py
BUILD_ADVICE = (
    "reinstall with `FASTCORE5_BUILD_CPU=1 pip install --no-build-isolation -e .` (a C++ compiler and ninja "
    "are all it needs; =1 makes a failing build show its error)"
)


class NativeBuildWarning(UserWarning):
    """fastcore5._C is missing: CPU tensors run the plain-PyTorch reference instead of the fused kernels."""


def _missing_extension_reason(err: ImportError) -> str:
    if BUILD_ERROR_FILE.is_file():
        first_error = BUILD_ERROR_FILE.read_text().partition("\n")[0].strip() or "no message"
        return f"its build failed at install time ({first_error}; the build's output is in {BUILD_ERROR_FILE})"
    if err.name == "fastcore5._C":
        return "the package was installed without it (FASTCORE5_BUILD_CPU=0, or no torch at build time)"
    return f"it does not load ({err})"


@functools.lru_cache(maxsize=None)
def native_extension():
    """The compiled module fastcore5._C, or None when it is missing (warning once, with why).

    Loading it registers the ops torch.ops.fastcore5_native.*; their fake implementations (for
    torch.compile and opcheck) are registered here too, right after.
    """
    try:
        module = importlib.import_module("fastcore5._C")
    except ImportError as err:
        native_extension.missing_reason = _missing_extension_reason(err)
        warnings.warn(
            f"fastcore5's C++ extension fastcore5._C is not available: {native_extension.missing_reason}. CPU tensors "
            f"run the plain-PyTorch reference; for the fused CPU kernels {BUILD_ADVICE}",
            NativeBuildWarning,
            stacklevel=2,
        )
        return None
    importlib.import_module("fastcore5._native_ops").register()
    return module


native_extension.missing_reason = None


def _native_kernels_missing(backend: str, op: str) -> list[str]:
    """The ops of ``op``'s family that have no kernel for ``backend``'s dispatch key."""
    key = _DISPATCH_KEY[backend]
    return [
        name for name in NATIVE_OPS[op]
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fastcore5_native::{name}", key)
    ]


@torch.compiler.assume_constant_result  # facts about the installation: evaluated, not traced
def unavailable_reason(backend: str, op: str, device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    """Why ``backend`` cannot run ``op`` on ``device`` (for ``dtype``), with how to fix it; None if it can."""
    if backend == "torch":
        return None
    if backend == "triton":
        if _triton_import_error() is not None:
            return f"triton is not importable ({_triton_import_error()}); install it with `pip install triton` (Linux)"
        if device.type == "cuda" and dtype == torch.float64 and op == "linear_relu":
            return "compiled Triton has no float64 tl.dot (float64 runs only under TRITON_INTERPRET=1 on CPU)"
        if device.type == "cuda" or (device.type == "cpu" and interpreter_active()):
            return None
        return (
            f"Triton kernels run on CUDA tensors; got {device.type} tensors. To run them on CPU set "
            "TRITON_INTERPRET=1 in the environment before triton is imported"
        )
    if backend == "cuda":
        if device.type != "cuda":
            return f"the CUDA C++ kernels need CUDA tensors; got {device.type} tensors"
        if native_extension() is None or _native_kernels_missing("cuda", op):
            return (
                "fastcore5._C was built without its CUDA kernels; reinstall with "
                "`FASTCORE5_BUILD_CUDA=1 pip install --no-build-isolation -e .` on a machine with nvcc and a CUDA build of torch"
            )
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"the C++ CPU kernels need CPU tensors; got {device.type} tensors"
        if native_extension() is None:
            return f"the C++ extension fastcore5._C is not available: {native_extension.missing_reason}; {BUILD_ADVICE}"
        missing = _native_kernels_missing("cpu", op)
        if missing:
            return f"fastcore5._C has no CPU kernel for {op} yet (missing: {', '.join(missing)})"
        return None
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS} or 'auto'")


def requested() -> str | None:
    """The backend asked for by use_backend() or FASTCORE5_BACKEND, or None for automatic."""
    if _requests:
        name = _requests[-1]
    else:
        check_environment()
        name = os.environ.get(ENV_VAR, "").strip().lower() or None
    return None if name == "auto" else name


def _choose(op: str, device: torch.device, dtype: torch.dtype | None) -> str:
    name = requested()
    if name is not None:
        reason = unavailable_reason(name, op, device, dtype)
        if reason is not None:
            raise BackendUnavailableError(f"backend {name!r} was requested for {op} but cannot run: {reason}")
        return name
    order = PREFERENCE[op] if device.type == "cuda" else CPU_PREFERENCE
    return next(b for b in order if unavailable_reason(b, op, device, dtype) is None)


# os.environ keeps its raw mapping (_data) in sync with every assignment; reading it with a
# pre-encoded key costs about 0.1 us against 1-2 us for os.environ.get, which encodes and
# decodes. Only select()'s cache key uses these raw values.
_RAW_ENVIRONMENT = os.environ._data
_BACKEND_KEY = os.environ.encodekey(ENV_VAR)
_INTERPRET_KEY = os.environ.encodekey("TRITON_INTERPRET")


# (op, device or device type, dtype, request, FASTCORE5_BACKEND, TRITON_INTERPRET) -> backend. Everything
# the choice depends on is in the key, so use_backend() and the environment are seen at once.
_selected: dict[tuple, str] = {}


def select(op: str, device: torch.device | str, dtype: torch.dtype | None = None) -> str:
    """The backend that runs ``op`` on tensors of ``dtype`` living on ``device`` (a torch.device
    or a device type such as "cuda"; no backend depends on the device index).

    Remembered per (op, device type, dtype, request): a repeated call costs a dict lookup."""
    device_type = device if isinstance(device, str) else device.type
    if torch.compiler.is_compiling():
        return _choose(op, torch.device(device_type), dtype)
    return select_eager(op, device_type, dtype)


def select_eager(op: str, device: torch.device | str, dtype: torch.dtype | None = None) -> str:
    """``select`` for a caller that has already asked torch.compiler.is_compiling() and got False
    (an op's eager path asks once for both its own branch and this). ``device`` may be the
    torch.device the caller already holds: remembered per device then, which spares finding its
    type on every call."""
    key = (
        op, device, dtype, _requests[-1] if _requests else None,
        _RAW_ENVIRONMENT.get(_BACKEND_KEY), _RAW_ENVIRONMENT.get(_INTERPRET_KEY),
    )
    name = _selected.get(key)
    if name is None:
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}; known ops: {OPS}")
        device_type = device if isinstance(device, str) else device.type
        name = _selected[key] = _choose(op, torch.device(device_type), dtype)
    return name


def request_key() -> tuple:
    """What a backend choice depends on besides the op and the tensors, read raw (no validation:
    ``select`` validates when it chooses): the innermost use_backend() request, FASTCORE5_BACKEND
    and TRITON_INTERPRET. A choice cached elsewhere (an optimizer's step plan) stays valid while
    this is equal."""
    return _requests[-1] if _requests else None, _RAW_ENVIRONMENT.get(_BACKEND_KEY), _RAW_ENVIRONMENT.get(_INTERPRET_KEY)


def device_type(t: torch.Tensor) -> str:
    """``t.device.type``, in a fraction of its cost for the common devices."""
    return "cuda" if t.is_cuda else "cpu" if t.is_cpu else t.device.type


class KernelTable(dict):
    """One op's kernel launchers on each fused backend, each backend's loaded on first use.

    ``loaders`` maps "triton", "cuda" and "cpu" to a function that returns an object whose
    attributes are the launchers (the same names and arguments on every backend, so the op layer
    calls each the same way; "cuda" and "cpu" may share one loader of torch.ops.fastcore5_native,
    whose ops dispatch by device). A loader runs once: triton is imported, or the C++ extension
    loaded, only when that backend is first used. A dict, so that the per-call lookup of a loaded
    backend is dict's own, not a Python method."""

    def __init__(self, **loaders):
        super().__init__()
        self._loaders = loaders

    def __missing__(self, backend: str):
        if backend not in self._loaders:
            raise ValueError(f"no fused kernels for backend {backend!r}")
        kernels = self[backend] = self._loaders[backend]()
        return kernels


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops inside the block on ``name`` ("triton", "cuda", "cpu", "torch" or "auto")."""
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"use_backend got {name!r}; choose one of {BACKENDS} or 'auto'")
    _requests.append(name)
    try:
        yield
    finally:
        _requests.pop()
