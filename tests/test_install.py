"""What `make demo` and `make test` install (read from `make -n` and pyproject.toml, nothing is
installed): each target only its own extra, torch first and from TORCH_INDEX when one is given,
and no CUDA libraries in an extra that does not need them."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
CPU_INDEX = "https://download.pytorch.org/whl/cpu"

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _dry_run(target: str, tmp_path: Path, *assignments: str) -> list[str]:
    """The commands `make TARGET` would run for a fresh venv."""
    done = subprocess.run(
        ["make", "-n", target, f"VENV={tmp_path / 'venv'}", *assignments],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=True,
    )
    return done.stdout.splitlines()


def _installs(commands: list[str]) -> list[str]:
    return [line for line in commands if "pip install" in line]


def _editable_extras(commands: list[str]) -> set[str]:
    found = [re.search(r'-e "\.\[([^\]]*)\]"', line) for line in _installs(commands)]
    return {extra for match in found if match for extra in match.group(1).split(",")}


def test_demo_installs_only_the_demo_extra(tmp_path):
    commands = _dry_run("demo", tmp_path)
    assert _editable_extras(commands) == {"demo"}
    assert "torch==2.13.0" in _installs(commands)[0]  # torch first, before anything can pull another


def test_test_installs_the_test_extra_and_nothing_for_the_demo_or_bench(tmp_path):
    extras = _editable_extras(_dry_run("test", tmp_path))
    assert {"test", "fastai"} <= extras <= {"test", "fastai", "nvcc-check"}


def test_torch_index_is_used_for_torch_only_when_given(tmp_path):
    default = _installs(_dry_run("demo", tmp_path))
    assert not any("--index-url" in line for line in default)
    chosen = _installs(_dry_run("demo", tmp_path, f"TORCH_INDEX={CPU_INDEX}"))
    assert f'--index-url "{CPU_INDEX}"' in chosen[0] and "torch==" in chosen[0]
    assert not any("--index-url" in line for line in chosen[1:])


def test_extras_carry_no_cuda_libraries_they_do_not_need():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for name in ("demo", "test", "bench"):
        assert not [req for req in extras[name] if req.startswith("nvidia")], name
    assert all(req.startswith("nvidia-cublas") for req in extras["nvcc-check"])
    assert not [req for req in extras["demo"] if "pytest" in req]
