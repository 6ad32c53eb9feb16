"""The per-test seed of tests/conftest.py: stable across processes, and named when a test fails."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from conftest import seed_for

TESTS = Path(__file__).resolve().parent


def test_the_seed_is_the_same_in_another_process_with_another_hash_salt(request):
    code = f"import sys; sys.path.insert(0, {str(TESTS)!r}); from conftest import seed_for; print(seed_for({request.node.nodeid!r}))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True)
    assert int(done.stdout) == seed_for(request.node.nodeid) == request.node.torch_seed
    assert seed_for("tests/a.py::test_one") != seed_for("tests/a.py::test_two")


def test_the_test_runs_with_its_seed(request):
    drawn = torch.rand(4)
    torch.manual_seed(seed_for(request.node.nodeid))
    assert torch.equal(drawn, torch.rand(4))


def test_a_failure_report_names_the_seed(tmp_path):
    shutil.copy(TESTS / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_fails.py").write_text("def test_fails():\n    assert False\n")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider", "test_fails.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"torch.manual_seed({seed_for('test_fails.py::test_fails')})" in done.stdout, done.stdout
