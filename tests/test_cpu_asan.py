"""The C++ CPU kernels under AddressSanitizer: setup.py's COMMON_SOURCES and csrc/cpu/*.cpp are
built with -fsanitize=address into a fresh library and loaded in a child process (libasan
preloaded, fastcore5._C never loaded there), which runs every bad-input call of
the kernels' tests and a few good calls on awkward sizes. Any out-of-bounds access aborts the child
with ASan's report (checked by hand: a full-width store in the SGD kernel's tail was reported as a
heap-buffer-overflow). The build has no CPU_CAPABILITY flags, so Vectorized is ATen's portable
8-lane fp32 vector there.

A kernel's test file adds its calls as a module-level ASAN_CALLS list of (name, expected exception
or None, callable taking torch.ops.fastcore5_native) and its name to CALL_MODULES below. Marked slow: the
instrumented build takes about a minute on two cores.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from torch.utils import cpp_extension

from native_cpu import CPU_SOURCES, compiler_available

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
# The test modules whose ASAN_CALLS the child runs: each a list of (name, exception or None, callable).
CALL_MODULES = ["test_cpu_sgd", "test_cpu_sgd_sparse", "test_cpu_embedding_dot_bias", "test_cpu_linear_relu"]

CHILD = textwrap.dedent(
    """
    import ast, glob, importlib, sys
    import torch
    from torch.utils.cpp_extension import load

    root, build = sys.argv[1], sys.argv[2]
    setup = ast.parse(open(f"{root}/setup.py").read())
    common = next(ast.literal_eval(node.value) for node in setup.body
                  if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "COMMON_SOURCES")
    sources = [f"{root}/{path}" for path in common] + sorted(glob.glob(f"{root}/csrc/cpu/*.cpp"))
    flags = ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address", "-fopenmp"]
    load(name="fastcore5_asan", sources=sources, extra_cflags=flags, extra_ldflags=["-fsanitize=address", "-fopenmp"],
         build_directory=build, is_python_module=False)
    sys.path.insert(0, f"{root}/tests")
    failures, ran = [], 0
    for module in sys.argv[3:]:
        for name, error, call in importlib.import_module(module).ASAN_CALLS:
            ran += 1
            try:
                call(torch.ops.fastcore5_native)
            except Exception as err:
                if error is None or not isinstance(err, error):
                    failures.append(f"{name}: raised {type(err).__name__}: {err}")
            else:
                if error is not None:
                    failures.append(f"{name}: expected {error.__name__}, nothing raised")
    print("ran", ran)
    print("\\n".join(failures))
    """
)


def _compiler_library(name: str) -> str | None:
    found = subprocess.run(
        [cpp_extension.get_cxx_compiler(), f"-print-file-name={name}"], capture_output=True, text=True
    ).stdout.strip()
    return found if os.path.isabs(found) and os.path.exists(found) else None


def _preload() -> str | None:
    """libasan first, then libstdc++: ASan's __cxa_throw interceptor finds no real __cxa_throw
    (and aborts at the first C++ exception) when libstdc++ is loaded only later, with torch."""
    libraries = [_compiler_library("libasan.so"), _compiler_library("libstdc++.so")]
    return None if None in libraries else " ".join(libraries)


def test_kernels_under_address_sanitizer(tmp_path):
    if not compiler_available() or not any(CPU_SOURCES.glob("*.cpp")):
        pytest.skip("no C++ compiler or no CPU kernel source")
    preload = _preload()
    if preload is None:
        pytest.skip("the compiler has no libasan (AddressSanitizer runtime) or no libstdc++.so")
    env = {
        **os.environ,
        "LD_PRELOAD": preload,
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:halt_on_error=1",  # CPython's allocations are not leaks
        "PYTHONPATH": str(ROOT / "tests") + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(ROOT), str(tmp_path), *CALL_MODULES],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    ran, _, failures = done.stdout.partition("\n")
    assert ran.startswith("ran ") and int(ran.split()[1]) > 0, done.stdout
    assert not failures.strip(), failures
