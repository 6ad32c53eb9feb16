"""Where a benchmark run happened, for its JSON: card, versions, commit and date, and the
checkout (if any) it ran from. Shared by the kernel benchmarks (runner.py) and the training
benchmark (train.py), below both."""
from __future__ import annotations

import datetime as dt
import platform
import re
import subprocess
from pathlib import Path

import torch

import fastcore5

BENCH_DIR = Path(__file__).resolve().parent


def source_checkout() -> Path | None:
    """The repository checkout the package runs from (a source tree or an editable install), or
    None for an installed wheel."""
    root = BENCH_DIR.parent.parent
    return root if (root / "setup.py").is_file() and (root / "bench").is_dir() else None


CHECKOUT = source_checkout()


def environment(device: str, quick: bool) -> dict:
    """Card, versions, commit and date for the JSON."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device == "cuda":
        card = torch.cuda.get_device_name()
    else:
        card = _cpu_name()
    commit, dirty = _git_commit()
    return {
        "card": card,
        "torch": torch.__version__,
        "triton": triton_version,
        "fastcore5": fastcore5.__version__,
        "python": platform.python_version(),
        "commit": commit,
        "dirty": dirty,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + " (CPU)"
    except OSError:
        pass
    return (platform.processor() or platform.machine()) + " (CPU)"


def _git_commit() -> tuple[str | None, bool | None]:
    if CHECKOUT is None:
        return None, None  # an installed wheel: no commit to name

    def git(*args):
        return subprocess.run(["git", *args], cwd=CHECKOUT, capture_output=True, text=True, timeout=10, check=True).stdout

    try:
        return git("rev-parse", "HEAD").strip(), bool(git("status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, subprocess.SubprocessError):
        return None, None  # a copy of the tree without .git, or no git installed


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
