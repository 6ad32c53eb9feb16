"""The installed package stands alone: a non-editable install of this checkout, run from a folder
outside it, has the `fastcore5 bench` command with its cases and its H200 anchors (package data),
and writes its results under the current folder.

The install goes into a ``--target`` folder (put first on PYTHONPATH) rather than a fresh venv: a
venv made from the test venv's python with --system-site-packages would see the base
interpreter's packages, not this venv's torch. Marked slow: it builds a wheel (about 10 s).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def _ignore_build_outputs(folder: str, names: list[str]) -> set[str]:
    """What a copy of the source tree leaves behind: git data, build outputs and any venv."""
    skipped = {".git", "build", "dist", "__pycache__", ".pytest_cache", ".benchmarks", "results"}
    return {
        name for name in names
        if name in skipped or name.endswith(".egg-info") or (Path(folder, name) / "pyvenv.cfg").is_file()
    }


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A wheel of this checkout installed without dependencies (this venv's torch serves) into a
    fresh folder. A copy of the tree is built, so the checkout gets no build/ or egg-info."""
    root = tmp_path_factory.mktemp("wheel")
    source, target = root / "source", root / "site"
    shutil.copytree(REPO_ROOT, source, ignore=_ignore_build_outputs)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(source)],
        env={**os.environ, "FASTCORE5_BUILD_CUDA": "0"},  # the pure-Python package is what is checked
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return target


def test_the_wheel_carries_the_kernels_as_files(installed):
    """fastcore5/kernels is a link in the checkout; the wheel holds the files themselves."""
    kernels = installed / "fastcore5" / "kernels"
    assert not kernels.is_symlink()
    assert {"__init__.py", "sgd.py", "linear_relu.py", "embedding_dot_bias.py"} <= {p.name for p in kernels.iterdir()}


def _run_outside(installed: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(installed)}
    return subprocess.run(
        [sys.executable, *args], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120,
    )


def test_fastcore5_bench_runs_from_the_installed_wheel(installed, tmp_path):
    help_run = _run_outside(installed, tmp_path, "-m", "fastcore5", "bench", "--help")
    assert help_run.returncode == 0, help_run.stderr
    assert help_run.stdout.startswith("usage: fastcore5 bench")
    assert "results in the current folder" in " ".join(help_run.stdout.split())  # not a checkout's bench/results

    run = _run_outside(installed, tmp_path, "-m", "fastcore5", "bench", "--quick", "--op", "sgd", "--no-plots")
    assert run.returncode == 0, run.stderr
    [json_path] = (tmp_path / "elsewhere" / "bench-results").glob("bench-*.json")
    report = json.loads(json_path.read_text())
    assert report["ops"] == ["sgd"] and report["skipped_ops"] == {}
    assert report["results"] and all("error" not in row and row["ms"][row["ours"]] > 0 for row in report["results"])
    # the runner that ran is the installed one (the anchors path comes from its __file__), it found
    # its anchors as package data, and it knows it is not in a checkout
    assert Path(report["anchors_file"]).is_relative_to(installed)
    assert json.loads(Path(report["anchors_file"]).read_text())["device"] == "NVIDIA H200"
    assert report["commit"] is None
