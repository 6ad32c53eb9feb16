"""What the tests of the C++ CPU backend (csrc/cpu/, backend "cpu") share.

The extension fastcore5._C is built on every machine with a C++ compiler (setup.py), so a test
of a CPU kernel is skipped only while the kernel's source does not exist yet or when the machine
has no compiler at all. A source that exists but whose kernel is not loaded (a failed or stale
build) fails the test: the install swallowed a build error that CI must see.
"""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from fastcore5 import backends

CPU_SOURCES = Path(__file__).resolve().parent.parent / "csrc" / "cpu"


def compiler_available() -> bool:
    """Whether the C++ compiler torch's extension builder would use is installed."""
    return shutil.which(cpp_extension.get_cxx_compiler()) is not None


def native_ops_loaded() -> bool:
    """Loads fastcore5._C if it can; whether it is there."""
    return backends.native_extension() is not None


def require_cpu_kernel(op: str):
    """torch.ops.fastcore5_native, for a test of ``op``'s CPU kernel (``op`` one of backends.OPS, its
    source csrc/cpu/<op>.cpp): skips while that source does not exist or without a compiler,
    fails when the kernel is not loaded."""
    if not (CPU_SOURCES / f"{op}.cpp").is_file():
        pytest.skip(f"csrc/cpu/{op}.cpp does not exist yet")
    if not compiler_available():
        pytest.skip("no C++ compiler here, so fastcore5._C could not be built")
    reason = backends.unavailable_reason("cpu", op, torch.device("cpu"))
    assert reason is None, f"csrc/cpu/{op}.cpp exists but the cpu backend cannot run {op}: {reason}"
    return torch.ops.fastcore5_native


@contextlib.contextmanager
def threads(n: int):
    """torch's intra-op thread count set to ``n`` inside the block (the kernels' thread-count tests)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
