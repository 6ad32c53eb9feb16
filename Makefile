# Quick start: `make demo` runs the main job, `make test` runs the whole test suite.
# Each target creates a virtual environment in $(VENV) and installs only what it needs there
# (the package's install compiles its C++ CPU kernels, fastcore5._C, with the system's C++
# compiler and ninja, pip-installed here; FASTCORE5_BUILD_CPU=0 make ... skips that):
# `make demo` the package and its `demo` extra, `make test` the package and its `test` extra
# (plus `nvcc-check` when nvcc is installed), `make bench` the `bench` extra.
#
# Where torch comes from (the first thing installed, so nothing else can pull another build):
#   TORCH_SPEC   which torch to install (default torch==2.13.0, the version CI runs)
#   TORCH_INDEX  the package index to take it from. Default: PyTorch's CPU wheel index when this
#                machine has no NVIDIA GPU (no nvidia-smi, no /dev/nvidia0), so that a CPU machine
#                does not download several GB of CUDA libraries; pip's own index otherwise (on
#                Linux x86_64 PyPI's torch is the CUDA build). Override either way:
#                  make demo TORCH_INDEX=                                        # pip's own index
#                  make demo TORCH_INDEX=https://download.pytorch.org/whl/cu130  # a CUDA index
#                When the index cannot be reached, torch comes from pip's own index and
#                configured mirrors instead, with a line saying so.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
CPU_TORCH_INDEX := https://download.pytorch.org/whl/cpu
HAVE_NVIDIA_GPU := $(shell command -v nvidia-smi 2>/dev/null || ls /dev/nvidia0 2>/dev/null)
TORCH_INDEX ?= $(if $(HAVE_NVIDIA_GPU),,$(CPU_TORCH_INDEX))
# numpy comes with torch: `import torch` without it prints "Failed to initialize NumPy".
NUMPY_SPEC := numpy>=1.26
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet

# tests/test_cuda_compile.py compiles csrc/ with nvcc when one is installed; it then needs
# cublasLt.h, which the `nvcc-check` extra's nvidia-cublas wheel provides (~720 MB of
# libraries come with the header). Without nvcc those tests skip and the wheel is not needed.
comma := ,
HAVE_NVCC := $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
TEST_EXTRAS := test,fastai$(if $(HAVE_NVCC),$(comma)nvcc-check)

.PHONY: install demo test bench compile-check clean

# One stamp per set of extras: `make demo` then `make test` adds the test extras to the same venv.
$(VENV)/.torch-installed:
	$(PYTHON) -m venv $(VENV)
	index="$(TORCH_INDEX)"; \
	if [ -n "$$index" ] && ! $(PY) -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=10)' "$$index" 2>/dev/null; then \
	  echo "fastcore5: cannot reach $$index; installing $(TORCH_SPEC) from pip's own index instead"; index=""; \
	fi; \
	$(PIP) $${index:+--index-url "$$index"} "$(TORCH_SPEC)" "$(NUMPY_SPEC)"
	$(PIP) setuptools wheel ninja
	$(PY) -c 'import torch; print("torch==" + torch.__version__.split("+")[0])' > $(VENV)/torch-pin.txt
	touch $@

# The torch installed above stays: an extra that depends on torch cannot swap it for another build.
$(VENV)/.installed-%: pyproject.toml setup.py $(VENV)/.torch-installed
	$(PIP) --no-build-isolation -c $(VENV)/torch-pin.txt -e ".[$*]"
	touch $@

install: $(VENV)/.installed-demo

demo: $(VENV)/.installed-demo
	$(PY) -m fastcore5 demo

test: $(VENV)/.installed-$(TEST_EXTRAS)
	$(PY) -m pytest tests -q

bench: $(VENV)/.installed-bench
	$(PY) -m bench --quick

# The compile matrix (scripts/compile_check.py, docs/gpu-check.md): every Triton kernel through its
# launchers for ARCH, every autotune candidate and default, every dtype; csrc/ too when nvcc is
# installed. No GPU needed. TRITON=3.6.0 runs it under that triton (what the GPU machine has) in a
# side venv, $(VENV)-triton-3.6.0, that sees the main venv's packages behind its own triton.
# CONFIGS= (empty) compiles each tuned launcher's first and last candidate and its default only.
ARCH ?= 80,86,89,90
CONFIGS ?= --all-configs
TRITON ?=
CHECK_VENV := $(if $(TRITON),$(VENV)-triton-$(TRITON),$(VENV))
CHECK_READY := $(if $(TRITON),$(CHECK_VENV)/.triton-installed,$(VENV)/.installed-$(TEST_EXTRAS))

$(VENV)-triton-%/.triton-installed: $(VENV)/.installed-$(TEST_EXTRAS)
	$(PY) -m venv $(@D)
	$(PY) -c 'import site; print(f"import site; site.addsitedir({site.getsitepackages()[0]!r})")' \
		> "$$($(@D)/bin/python -c 'import site; print(site.getsitepackages()[0])')/zz-fastcore5-main-venv.pth"
	$(@D)/bin/python -m pip install --quiet --no-deps "triton==$*"
	touch $@

compile-check: $(CHECK_READY)
	$(CHECK_VENV)/bin/python scripts/compile_check.py --arch $(ARCH) $(CONFIGS) $(if $(HAVE_NVCC),--cuda)

clean:
	rm -rf $(VENV) $(VENV)-triton-* build *.egg-info
