# Quick start: `make demo` runs the main job, `make test` runs the whole test suite.
# Each creates its own virtual environment in $(VENV) and installs what it needs.
# TORCH_SPEC picks the torch to install first: the default is the CPU build that suits a machine
# without a GPU; on a GPU machine use e.g. `make test TORCH_SPEC='torch>=2.11,<2.15'`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastcore5-installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet setuptools wheel
	$(PY) -c 'import torch; print("torch==" + torch.__version__.split("+")[0])' > $(VENV)/torch-pin.txt
	$(PY) -m pip install --quiet --no-build-isolation -c $(VENV)/torch-pin.txt -e ".[test,bench,demo,fastai]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m fastcore5 demo

test: $(STAMP)
	$(PY) -m pytest tests -q

bench: $(STAMP)
	$(PY) -m bench --quick

clean:
	rm -rf $(VENV) build *.egg-info
