"""Where a benchmark run happened, for its JSON (card, versions, commit, date, and the checkout, if
any, it ran from), and where it writes. Shared by the kernel, host and training benchmarks
(runner.py, host.py, train.py), below them all.

Results go under the folder the command runs from (``bench-results/``) or to ``--out``: never
into the package or the checkout it was installed from, and the command prints the path.
"""
from __future__ import annotations

import datetime as dt
import platform
import re
import subprocess
from pathlib import Path

import torch

import fastcore5

DEFAULT_OUT = Path("bench-results")


def source_checkout() -> Path | None:
    """The repository checkout the package runs from (a source tree or an editable install), or
    None for an installed wheel: only to name the commit the numbers belong to."""
    root = Path(__file__).resolve().parent.parent.parent
    return root if (root / "setup.py").is_file() and (root / "bench").is_dir() else None


CHECKOUT = source_checkout()


def environment(device: str) -> dict:
    """Card, versions, commit and date for the JSON."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    card = torch.cuda.get_device_name() if device == "cuda" else _cpu_name()
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


def describe(run: dict, device: str) -> str:
    """The run's first line: what ran where, at which commit."""
    dirty = " (with uncommitted changes)" if run["dirty"] else ""
    return (f"on {run['card']} ({device}); torch {run['torch']}, triton {run['triton']}, "
            f"commit {run['commit'] or 'unknown'}{dirty}, {run['date']}")


def start_run(title: str, device: str, out: Path, cpu_notes: list[str]) -> tuple[dict, list[str]]:
    """(the run's record, its notes), announced: what runs where, where its results go and, on
    CPU, ``cpu_notes`` (why these numbers are not the GPU's)."""
    run = environment(device)
    print(f"fastcore5 {title} {describe(run, device)}")
    print(f"results will be written to {out.resolve()}")
    notes = list(cpu_notes) if device == "cpu" else []
    for note in notes:
        print(note)
    return run, notes


def result_stem(kind: str, run: dict) -> str:
    """File name stem of a run's results: kind, card and UTC time, e.g. bench-nvidia-h200-20261126T101500Z."""
    return f"{kind}-{slug(run['card'])}-{run['date'].replace(':', '').replace('-', '')}"


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
