"""What `make demo` and `make test` install (read from `make -n` and pyproject.toml, nothing is
installed): each target only its own extra, torch first (from PyTorch's CPU index without an NVIDIA GPU,
or TORCH_INDEX),
and no CUDA libraries in an extra that does not need them."""
from __future__ import annotations

import http.server
import re
import shutil
import socket
import subprocess
import sys
import threading
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


def test_torch_comes_from_the_cpu_index_without_an_nvidia_gpu_and_the_user_can_override_it(tmp_path):
    def first_install(*assignments):
        commands = _dry_run("demo", tmp_path, *assignments)
        return next(line for line in commands if "pip install" in line and "torch==" in line), commands

    torch_line, commands = first_install("HAVE_NVIDIA_GPU=")
    assert f'index="{CPU_INDEX}"' in "\n".join(commands) and "--index-url" in torch_line
    assert "numpy" in torch_line  # with torch, so that importing torch never says "Failed to initialize NumPy"
    assert not any("--index-url" in line for line in _installs(commands)[1:])
    _, with_gpu = first_install("HAVE_NVIDIA_GPU=/usr/bin/nvidia-smi")
    assert 'index=""' in "\n".join(with_gpu)
    _, emptied = first_install("HAVE_NVIDIA_GPU=", "TORCH_INDEX=")
    assert 'index=""' in "\n".join(emptied)


def _install_torch_step(tmp_path: Path, index: str) -> str:
    """Runs the Makefile's torch step with pip replaced by echo: which pip command it chose."""
    venv = tmp_path / "venv"
    venv.mkdir()  # PYTHON=true makes no venv
    done = subprocess.run(
        ["make", "-s", f"{venv}/.torch-installed", f"VENV={venv}", f"TORCH_INDEX={index}", "PYTHON=true",
         f"PY={sys.executable}", "PIP=echo pip install"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_an_unreachable_torch_index_falls_back_to_pips_own_index_with_a_line_saying_so(tmp_path):
    port = socket.socket()
    port.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    url = f"http://127.0.0.1:{port.getsockname()[1]}/whl/cpu"
    out = _install_torch_step(tmp_path, url)
    port.close()
    assert f"cannot reach {url}" in out
    assert "pip install torch==2.13.0 numpy>=1.26" in out and "--index-url" not in out


def test_a_reachable_torch_index_is_used(tmp_path):
    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), QuietHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/"
    try:
        out = _install_torch_step(tmp_path, url)
    finally:
        server.shutdown()
    assert f"pip install --index-url {url} torch==2.13.0" in out and "cannot reach" not in out


def test_extras_carry_no_cuda_libraries_they_do_not_need():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for name in ("demo", "test", "bench"):
        assert not [req for req in extras[name] if req.startswith("nvidia")], name
    assert all(req.startswith("nvidia-cublas") for req in extras["nvcc-check"])
    assert not [req for req in extras["demo"] if "pytest" in req]


def test_the_package_reports_the_version_it_was_installed_as():
    import importlib.metadata

    import fastcore5

    assert re.fullmatch(r"\d+\.\d+\.\d+", fastcore5.__version__)
    assert importlib.metadata.version("fastcore5") == fastcore5.__version__
    assert f"## {fastcore5.__version__} " in (REPO_ROOT / "CHANGELOG.md").read_text()
