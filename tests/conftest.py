"""Test set-up shared by every test file.

Each test seeds torch from a stable hash of its id (``seed_for``: the same in every process, unlike
Python's salted ``hash``), so rerunning a failed test by its id draws the same inputs; a failure's
report names the seed in a "seed" section.

Without a CUDA device the Triton kernels run on CPU tensors through Triton's interpreter, which
must be switched on before triton is first imported: hence this happens at the top of conftest,
before any test module imports fastcore5.kernels. FASTCORE5_POISON=1 makes every launcher fill
its outputs with NaN before the kernel writes them, so a missed element fails the comparison.
"""
import hashlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FASTCORE5_POISON", "1")
os.environ.pop("FASTCORE5_BACKEND", None)  # tests choose backends explicitly

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; scripts/gpu_check.sh runs these on the GPU machine")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


def seed_for(test_id: str) -> int:
    """The torch seed of the test ``test_id`` (its pytest node id): 31 bits of its SHA-256."""
    return int.from_bytes(hashlib.sha256(test_id.encode()).digest()[:4], "little") & 0x7FFFFFFF


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different seed per test (derived from its id), so inputs are fresh yet reproducible."""
    request.node.torch_seed = seed_for(request.node.nodeid)
    torch.manual_seed(request.node.torch_seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    seed = getattr(item, "torch_seed", None)
    if report.failed and seed is not None:
        report.sections.append(("seed", f"torch.manual_seed({seed}) (from the test id {item.nodeid!r})"))


@pytest.fixture
def device():
    return DEVICE
