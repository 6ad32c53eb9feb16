"""Packaging: the package fastcore5 (fastcore5/kernels is the link to the top-level kernels/ folder,
see ARCHITECTURE.md) and, when it can, the extension fastcore5._C built from csrc/.

Whether the CUDA extension is built is decided here and only here:
  FASTCORE5_BUILD_CUDA=1   build it (fail loudly if torch has no CUDA or nvcc is missing)
  FASTCORE5_BUILD_CUDA=0   never build it (pure-Python install)
  unset                    build it when torch is a CUDA build and nvcc is found
The architectures come from TORCH_CUDA_ARCH_LIST (default: the card present, else 9.0).
Install with --no-build-isolation so the extension is compiled against the torch you run.
"""
import glob
import os
import shutil

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


def _cuda_extension_kwargs():
    import torch
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    if "TORCH_CUDA_ARCH_LIST" not in os.environ:
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    include_dir, lib_dir, lib_file = _cublaslt_paths()
    sources = sorted(glob.glob("csrc/*.cu") + glob.glob("csrc/*.cpp"))
    # No -std flag: torch's BuildExtension adds the standard its headers need (C++17 or C++20).
    extension = CUDAExtension(
        name="fastcore5._C",
        sources=sources,
        include_dirs=[include_dir],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
        # Link the exact file (the wheel ships only libcublasLt.so.N, no unversioned name).
        extra_link_args=[f"-L{lib_dir}", f"-l:{lib_file}", f"-Wl,-rpath,{lib_dir}"],
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}


setup(
    packages=PACKAGES,
    package_data=PACKAGE_DATA,
    **(_cuda_extension_kwargs() if _want_cuda_extension() else {}),
)
