"""Packaging: the package fastcore5 (fastcore5/kernels is the link to the top-level kernels/ folder,
see ARCHITECTURE.md) and, when it can, the extension fastcore5._C built from csrc/.

fastcore5._C holds the native ops torch.ops.fastcore5_native.* (schemas: csrc/registration.cpp)
with their CPU kernels (csrc/cpu/*.cpp) and, on a CUDA build, their CUDA kernels (csrc/*.cu,
csrc/*_op.cpp). What is built is decided here and only here:
  FASTCORE5_BUILD_CPU=1    build the CPU kernels; a failed build fails the install
  FASTCORE5_BUILD_CPU=0    leave them out
  unset                    build them; if that fails the install goes on without fastcore5._C
                           and fastcore5 warns once, when it first looks for it, saying why
  FASTCORE5_BUILD_CUDA=1   add the CUDA kernels (fail loudly if torch has no CUDA or nvcc is missing)
  FASTCORE5_BUILD_CUDA=0   never add them
  unset                    add them when torch is a CUDA build and nvcc is found
A build that neither switch forces is optional: its failure is recorded (BUILD_ERROR_FILE) and
the package installs without the extension, running the reference on CPU tensors.
The CUDA architectures come from TORCH_CUDA_ARCH_LIST (default: the card present, else 9.0).
The CPU vector width is the one torch's own CPU kernels use on the build machine
(torch.backends.cpu.get_cpu_capability(); lower it with ATEN_CPU_CAPABILITY=avx2 or =default to
build for older machines): the extension is compiled where it runs (editable install or sdist).
Install with --no-build-isolation so the extension is compiled against the torch you run.
"""
import glob
import os
import platform
import shutil
import sys

from setuptools import setup

PACKAGES = [
    "fastcore5", "fastcore5.ops", "fastcore5.nn", "fastcore5.optim", "fastcore5.demo", "fastcore5.bench",
    "fastcore5.kernels",
]
# The benchmark runner reads its H200 anchors from the package (fastcore5 bench from a wheel).
PACKAGE_DATA = {"fastcore5.bench": ["anchors/*.json"]}


def _want_cuda_extension():
    switch = os.environ.get("FASTCORE5_BUILD_CUDA", "").strip()
    if switch == "0":
        return False
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        if switch == "1":
            raise RuntimeError("FASTCORE5_BUILD_CUDA=1 needs torch installed first (and --no-build-isolation)")
        return False
    has_toolchain = torch.version.cuda is not None and (CUDA_HOME is not None or shutil.which("nvcc"))
    if switch == "1" and not has_toolchain:
        raise RuntimeError(
            f"FASTCORE5_BUILD_CUDA=1 but torch {torch.__version__} is not a CUDA build or nvcc was not found"
        )
    return bool(has_toolchain) and bool(glob.glob("csrc/*.cu"))


def _cublaslt_paths():
    """(include dir, library dir, library file) of cuBLASLt, which csrc/linear_relu.cu uses.

    Looked for in the CUDA toolkit first, then in the nvidia-cublas wheel that CUDA builds of
    torch depend on (site-packages/nvidia/cu13 or nvidia/cublas): a toolkit that has nvcc but
    not cuBLAS (as on a minimal install) still builds against the wheel's headers.
    """
    from torch.utils.cpp_extension import CUDA_HOME

    roots = [CUDA_HOME] if CUDA_HOME else []
    try:
        import nvidia

        roots += [os.path.join(base, sub) for base in nvidia.__path__ for sub in sorted(os.listdir(base))]
    except ImportError:
        pass
    for root in roots:
        if os.path.isfile(os.path.join(root, "include", "cublasLt.h")):
            for lib_dir in ("lib64", "lib"):
                libraries = sorted(glob.glob(os.path.join(root, lib_dir, "libcublasLt.so*")))
                if libraries:
                    return os.path.join(root, "include"), os.path.join(root, lib_dir), os.path.basename(libraries[0])
    raise RuntimeError(
        "building the CUDA extension needs cuBLASLt (cublasLt.h and libcublasLt.so): install the CUDA toolkit's "
        "cuBLAS or `pip install nvidia-cublas` matching your CUDA, or set FASTCORE5_BUILD_CUDA=0"
    )


# Built whatever else is: the schemas and module (registration.cpp) and the autograd kernels that
# serve every device.
COMMON_SOURCES = [
    "csrc/registration.cpp",
    "csrc/output_buffers.cpp",
    "csrc/linear_relu_autograd.cpp",
    "csrc/embedding_dot_bias_autograd.cpp",
]
# Written beside fastcore5/__init__.py when an optional build fails (fastcore5/backends.py reads it).
BUILD_ERROR_FILE = "_C_build_error.txt"
# at::parallel_for's OpenMP loop is inline in ATen's headers: without -fopenmp the CPU kernels
# would run on one thread. Apple's clang has no -fopenmp (serial there).
OPENMP_FLAGS = [] if sys.platform == "darwin" else ["-fopenmp"]


def _switch(name):
    value = os.environ.get(name, "").strip()
    if value not in ("", "0", "1"):
        raise RuntimeError(f"{name}={value!r}: set it to 1 (build, fail loudly), 0 (skip) or leave it unset")
    return value


def _want_cpu_kernels():
    if _switch("FASTCORE5_BUILD_CPU") == "0":
        return False
    try:
        import torch  # noqa: F401
    except ImportError:
        if _switch("FASTCORE5_BUILD_CPU") == "1":
            raise RuntimeError("FASTCORE5_BUILD_CPU=1 needs torch installed first (and --no-build-isolation)")
        return False
    return True


def _cpu_vector_flags():
    """(compiler flags, macros) selecting at::vec::Vectorized's width: the ISA torch's own CPU
    kernels run with here. ATen's vector headers pick their AVX2/AVX-512 code from the
    CPU_CAPABILITY_* macros (the matching -m flags must come with them); without a macro they fall
    back to scalar loops, except on ARM, where NEON is part of the baseline and used by default."""
    import torch

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return [], []
    capability = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2" or "DEFAULT"
    if capability == "AVX512":
        return ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"], [("CPU_CAPABILITY_AVX512", None)]
    if capability == "AVX2":
        return ["-mavx2", "-mfma", "-mf16c"], [("CPU_CAPABILITY_AVX2", None)]
    return [], []


class _BuildFailed(Exception):
    def __init__(self, summary, output):
        super().__init__(summary)
        self.summary, self.output = summary, output


def _echoing_stdout(run):
    """Runs ``run()`` with file descriptor 1 (where torch's ninja build prints the compiler's
    messages) captured and echoed afterwards; raises _BuildFailed with the first compiler error
    line as its summary when ``run`` raises."""
    import tempfile

    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 1)
        failure = None
        try:
            run()
        except Exception as err:  # compile or link error, missing compiler: the install goes on
            failure = err
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
            log.seek(0)
            output = log.read().decode(errors="replace")
    sys.stdout.write(output)
    if failure is not None:
        errors = [line.strip() for line in output.splitlines() if "error" in line.lower()]
        raise _BuildFailed(errors[0] if errors else f"{type(failure).__name__}: {failure}", output)
    return output


def _make_ninja_findable():
    """torch's builder runs `ninja` from PATH; a `pip install ninja` into a venv that is not
    activated (as the Makefile's) is not on it."""
    if shutil.which("ninja"):
        return
    try:
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass  # torch falls back to a serial setuptools build, with its own warning


def _native_extension_kwargs(want_cpu, want_cuda):
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    vector_flags, macros = _cpu_vector_flags() if want_cpu else ([], [])
    # -ffp-contract=off: the compiler never fuses a*b+c into one rounding on its own, so a CPU
    # kernel rounds as its source says (the SGD kernel matches its fp32 contract bit for bit); a
    # kernel that wants a fused multiply-add asks for it (at::vec::fmadd).
    cxx_flags = ["-O3", "-ffp-contract=off", *OPENMP_FLAGS, *vector_flags]
    sources = COMMON_SOURCES + (sorted(glob.glob("csrc/cpu/*.cpp")) if want_cpu else [])
    # No -std flag: torch's BuildExtension adds the standard its headers need (C++17 or C++20).
    if want_cuda:
        sources += sorted(glob.glob("csrc/*.cu") + glob.glob("csrc/*_op.cpp"))
        extension = CUDAExtension(
            name="fastcore5._C",
            sources=sources,
            define_macros=macros + [("FASTCORE5_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
            **_cuda_build_kwargs(),
        )
    else:
        extension = CppExtension(
            name="fastcore5._C", sources=sources, define_macros=macros, extra_compile_args=cxx_flags,
            extra_link_args=OPENMP_FLAGS,
        )
    required = _switch("FASTCORE5_BUILD_CPU") == "1" or (want_cuda and _switch("FASTCORE5_BUILD_CUDA") == "1")

    class OptionalBuildExtension(BuildExtension):
        """torch's builder; a failure of a build no switch forces is recorded, not raised."""

        def run(self):
            inplace = self.inplace  # setuptools clears it while building, and leaves it cleared on an error
            error_file = os.path.join("fastcore5" if inplace else os.path.join(self.build_lib, "fastcore5"),
                                      BUILD_ERROR_FILE)
            if os.path.exists(error_file):
                os.remove(error_file)
            if required:
                super().run()
                return
            try:
                _echoing_stdout(super().run)
            except _BuildFailed as failure:
                self.inplace = inplace
                self._record_failure(error_file, failure)

        def _record_failure(self, error_file, failure):
            for ext in self.extensions:  # a library left by an earlier build no longer matches the sources
                if os.path.exists(self.get_ext_fullpath(ext.name)):
                    os.remove(self.get_ext_fullpath(ext.name))
            os.makedirs(os.path.dirname(error_file), exist_ok=True)
            with open(error_file, "w") as f:
                f.write(failure.summary + "\n\n" + failure.output[-20000:])
            print(f"WARNING: fastcore5._C was not built ({failure.summary}); installing without the native "
                  "kernels (FASTCORE5_BUILD_CPU=1 makes this an error)", file=sys.stderr)

        def get_outputs(self):  # nothing to install when the build failed
            return [path for path in super().get_outputs() if os.path.exists(path)]

    _make_ninja_findable()
    return {"ext_modules": [extension], "cmdclass": {"build_ext": OptionalBuildExtension}}


def _cuda_build_kwargs():
    """cuBLASLt's include and link arguments; sets the default TORCH_CUDA_ARCH_LIST."""
    import torch

    if "TORCH_CUDA_ARCH_LIST" not in os.environ:
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    include_dir, lib_dir, lib_file = _cublaslt_paths()
    return {
        "include_dirs": [include_dir],
        # Link the exact file (the wheel ships only libcublasLt.so.N, no unversioned name).
        "extra_link_args": [f"-L{lib_dir}", f"-l:{lib_file}", f"-Wl,-rpath,{lib_dir}", *OPENMP_FLAGS],
    }


def _extension_kwargs():
    want_cpu, want_cuda = _want_cpu_kernels(), _want_cuda_extension()
    return _native_extension_kwargs(want_cpu, want_cuda) if want_cpu or want_cuda else {}


setup(
    packages=PACKAGES,
    package_data=PACKAGE_DATA,
    **_extension_kwargs(),
)
