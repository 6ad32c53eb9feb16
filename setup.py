"""Packaging: maps kernels/ to fastcore5.kernels and, when it can, builds fastcore5._C from csrc/.

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

PACKAGES = ["fastcore5", "fastcore5.ops", "fastcore5.nn", "fastcore5.kernels"]
PACKAGE_DIR = {"fastcore5": "fastcore5", "fastcore5.kernels": "kernels"}


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


def _cuda_extension_kwargs():
    import torch
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    if "TORCH_CUDA_ARCH_LIST" not in os.environ:
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    sources = sorted(glob.glob("csrc/*.cu") + glob.glob("csrc/*.cpp"))
    extension = CUDAExtension(
        name="fastcore5._C",
        sources=sources,
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17"]},
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}


setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    **(_cuda_extension_kwargs() if _want_cuda_extension() else {}),
)
