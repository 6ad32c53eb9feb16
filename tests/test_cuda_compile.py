"""Compile check of the CUDA C++ backend (csrc/) on a machine without a GPU.

Every csrc/*.cu and csrc/*.cpp is compiled to an object file for Hopper (sm_90: nvcc runs
ptxas, so resource errors show up too) against the headers of the installed torch wheel, which
for the CPU build lacks the generated c10/cuda/impl/cuda_cmake_macros.h (hence
-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE) and every CUDA library header. The CUDA files therefore
include only c10/cuda and ATen/core headers (ATen/cuda/CUDAContext.h would pull cuSPARSE and
cuSOLVER headers that neither the wheel nor a minimal toolkit has); cuBLASLt's header comes from
the toolkit or from the nvidia-cublas wheel (a test dependency, see pyproject.toml).

The tests fail on: a compile error, a warning whose location is in csrc/, and a fastcore5::
symbol that some object uses but none defines (the link step the GPU build would do next).
They are skipped only when nvcc is not installed.
"""
from __future__ import annotations

import concurrent.futures
import importlib.util
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
SOURCES = sorted(p.name for p in CSRC.iterdir() if p.suffix in (".cu", ".cpp"))


def _compile_check_script():
    """scripts/compile_check.py, whose nvcc look-ups (the compiler, cuBLASLt's header) this test shares."""
    spec = importlib.util.spec_from_file_location("compile_check", ROOT / "scripts" / "compile_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_SCRIPT = _compile_check_script()


def _cxx_standard() -> str:
    # The standard torch's own extension builder passes (C++20 from torch 2.10 on, C++17 before):
    # the GPU build uses that, so the check must too.
    return "c++20" if "-std=c++20" in Path(cpp_extension.__file__).read_text() else "c++17"


NVCC = _SCRIPT.nvcc_path()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed (no CUDA toolkit on this machine)")


def _flags(cublaslt_include: str | None) -> list[str]:
    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    if cublaslt_include:
        includes.append(cublaslt_include)
    return [
        f"-std={_cxx_standard()}",
        "-O3",
        "-gencode", "arch=compute_90,code=sm_90",
        "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
        "-DFASTCORE5_WITH_CUDA",  # as setup.py's CUDA build: registration.cpp registers the CUDA kernels
        *cpp_extension.COMMON_NVCC_FLAGS,
        "-Xcompiler", "-fPIC",
        *[f"-I{d}" for d in includes],
    ]


def _compile(source: str, out_dir: Path, flags: list[str]) -> dict:
    obj = out_dir / (source + ".o")
    start = time.perf_counter()
    proc = subprocess.run(
        [NVCC, "-c", str(CSRC / source), "-o", str(obj), *flags], capture_output=True, text=True, cwd=ROOT
    )
    return {
        "source": source,
        "returncode": proc.returncode,
        "output": proc.stdout + proc.stderr,
        "seconds": time.perf_counter() - start,
        "object": obj,
    }


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, dict]:
    """Compile every source once, two at a time (the CI machine has 2 cores)."""
    out_dir = tmp_path_factory.mktemp("csrc_objects")
    cublaslt = _SCRIPT.cublaslt_include(NVCC)
    flags = _flags(cublaslt)
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda s: _compile(s, out_dir, flags), SOURCES))
    for r in results:
        r["cublaslt_include"] = cublaslt
        print(f"nvcc {r['source']}: {r['seconds']:.1f} s, exit {r['returncode']}", file=sys.stderr)
    return {r["source"]: r for r in results}


def _own_warnings(output: str) -> list[str]:
    """Diagnostics located in csrc/ (torch's headers have warnings of their own we cannot fix)."""
    lines = output.splitlines()
    return [line for line in lines if re.search(r"csrc/[\w.]+[(:]\d+", line) and "warning" in line.lower()]


def test_sources_exist():
    assert {"linear_relu.cu", "embedding_dot_bias.cu", "sgd.cu", "linear_relu_op.cpp", "embedding_dot_bias_op.cpp",
            "sgd_op.cpp", "registration.cpp"} <= set(SOURCES)


@pytest.mark.parametrize("source", SOURCES)
def test_compiles_for_sm90(compiled, source, record_property):
    result = compiled[source]
    record_property("nvcc_seconds", round(result["seconds"], 1))
    if result["returncode"] != 0 and "cublasLt.h" in result["output"] and result["cublaslt_include"] is None:
        pytest.fail(
            f"{source} needs cublasLt.h, found neither in the CUDA toolkit nor in an nvidia-cublas wheel: "
            "`pip install nvidia-cublas` (it is in the test extra)"
        )
    assert result["returncode"] == 0, f"nvcc failed on {source}:\n{result['output'][-6000:]}"
    assert not _own_warnings(result["output"]), "\n".join(_own_warnings(result["output"]))


def _symbols(obj: Path, undefined: bool) -> set[str]:
    args = ["nm", "-C", "--undefined-only" if undefined else "--defined-only", str(obj)]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    names = set()
    for line in out.splitlines():
        parts = line.split(maxsplit=1 if undefined else 2)
        name = parts[-1].strip()
        if name.startswith("fastcore5::") and "(anonymous namespace)" not in name:
            names.add(name)
    return names


@pytest.mark.skipif(shutil.which("nm") is None, reason="binutils' nm is not installed")
def test_every_fastcore5_symbol_is_defined(compiled):
    """What the op files (csrc/*_op.cpp) call in the .cu files (declared in csrc/fastcore5.h) is defined with
    the same signature: a mismatch compiles but would fail only when the GPU build links."""
    failed = [s for s, r in compiled.items() if r["returncode"] != 0]
    assert not failed, f"cannot check symbols: {failed} did not compile"
    defined = set().union(*(_symbols(r["object"], undefined=False) for r in compiled.values()))
    used = set().union(*(_symbols(r["object"], undefined=True) for r in compiled.values()))
    assert used, "registration.cpp should call into the .cu files"
    assert used <= defined, f"used but not defined: {sorted(used - defined)}"


def test_registration_declares_every_op():
    """The schemas in registration.cpp name exactly the ops fastcore5/_native_ops.py gives fakes to
    and fastcore5/ops/*.py call; the CUDA build implements all but the CPU-only ones, which
    csrc/cpu/ implements."""
    text = (CSRC / "registration.cpp").read_text()
    defined = set(re.findall(r'm\.def\(\s*"(\w+)\(', text))
    implemented = set(re.findall(r'm\.impl\("(\w+)"', text))
    cpu_implemented = set(re.findall(r'm\.impl\("(\w+)"', "".join(p.read_text() for p in (CSRC / "cpu").glob("*.cpp"))))
    from fastcore5 import _native_ops

    expected = {"linear_relu_forward", "linear_relu_backward", "linear_relu", "embedding_dot_bias_forward",
                "embedding_dot_bias_backward", "embedding_dot_bias", "sgd_step"}
    cpu_only = {"sgd_sparse_step"}
    assert defined == expected | cpu_only
    assert implemented == expected
    assert cpu_only <= cpu_implemented
    assert set(_native_ops.FAKES) == expected | cpu_only


def test_every_fake_takes_the_schema_arguments():
    """Each fake in fastcore5/_native_ops.py takes the arguments of its schema, by name and in order
    (register_fake binds them by name when torch.compile or opcheck call the fake)."""
    import inspect

    from fastcore5 import _native_ops

    for name, schema in _registered_schemas().items():
        assert list(inspect.signature(_native_ops.FAKES[name]).parameters) == _argument_names(schema), name


def _registered_schemas() -> dict[str, str]:
    """Each op's schema in registration.cpp, by op name."""
    text = (CSRC / "registration.cpp").read_text()
    schemas = ("".join(re.findall(r'"([^"]*)"', literal)) for literal in re.findall(r'm\.def\(\s*((?:"[^"]*"\s*)+)\)', text))
    return {schema.partition("(")[0]: schema for schema in schemas}


def _argument_names(schema: str) -> list[str]:
    arguments = re.match(r"\w+\((.*)\) ->", schema).group(1)
    return [argument.split()[-1] for argument in arguments.split(",")]


@pytest.mark.parametrize("op, contract", [("sgd", "LAUNCHER_SCHEMA"), ("embedding_dot_bias", "BACKWARD_LAUNCHER_SCHEMA")])
def test_both_backends_follow_the_launcher_schema_of_the_op_layer(op, contract):
    """The launcher contract is written once, in the op layer (LAUNCHER_SCHEMA): the C++ op declares
    exactly that schema and the Triton launcher takes exactly its arguments."""
    import importlib
    import inspect

    schema = getattr(importlib.import_module(f"fastcore5.ops.{op}"), contract)
    name = schema.partition("(")[0]
    assert _registered_schemas()[name] == schema
    triton_launcher = getattr(importlib.import_module(f"fastcore5.kernels.{op}"), name)
    parameters = [
        name for name, p in inspect.signature(triton_launcher).parameters.items() if p.kind is not p.KEYWORD_ONLY
    ]
    assert parameters == _argument_names(schema)
