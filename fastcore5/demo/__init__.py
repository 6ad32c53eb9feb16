"""The lesson-5 demo: `fastcore5 demo` (or `python -m fastcore5 demo`).

Part 1 trains fastcore5.nn.EmbeddingDotBias with fastcore5.optim.SGD on MovieLens-style ratings
(synthetic by default, or the user's files) and reads the model as the lesson does; part 2 trains
an MLP of fastcore5.nn.LinearReLU layers on scikit-learn's digits with discriminative learning
rates. The report says which backend ran each op and how long each part took.
"""
from __future__ import annotations

import contextlib
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch

from .. import backends
from .._output_paths import OutputPathError, writable_folder
from . import _console
from ._common import DemoError, describe_backend
from .collab import CollabResult, CollabSettings, Interpretation, interpret_collab, train_collab
from .data import Ratings, RatingsFileError, load_ratings, synthetic_movielens
from .digits import DigitsResult, DigitsSettings, train_digits

PARTS = ("collab", "digits")
__all__ = ["DemoOptions", "DemoReport", "DemoError", "run_demo", "RatingsFileError"]


@dataclass
class DemoOptions:
    """What `fastcore5 demo` accepts; None means each part's own default (see cli.py)."""

    part: str = "all"  # "all", "collab" or "digits"
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    seed: int = 0
    device: str = "auto"
    backend: str = "auto"
    ratings: str | None = None
    plots: str | None = None
    # Knobs for quick checks (tests); not on the command line.
    collab_overrides: dict = field(default_factory=dict)
    digits_overrides: dict = field(default_factory=dict)
    synthetic_size: dict = field(default_factory=dict)  # keyword arguments of synthetic_movielens


@dataclass
class DemoReport:
    device: torch.device
    backends: dict[str, str] = field(default_factory=dict)  # op -> backend that ran it
    ratings: Ratings | None = None
    collab: CollabResult | None = None
    interpretation: Interpretation | None = None
    digits: DigitsResult | None = None
    part_seconds: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # part -> why
    plots: list[Path] = field(default_factory=list)
    seconds: float = 0.0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise DemoError(f"--device {name!r} is not a device torch knows ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DemoError(
            f"--device {name}: torch {torch.__version__} sees no CUDA device here; use --device cpu "
            "(or auto), or install a CUDA build of torch on a machine with an NVIDIA GPU"
        )
    if device.type not in ("cpu", "cuda"):
        raise DemoError(f"--device {name}: the demo runs on cpu or cuda")
    return device


def run_demo(options: DemoOptions, stream: TextIO | None = None) -> DemoReport:
    """Run the parts ``options`` asks for, printing the report to ``stream`` (default: the
    current sys.stdout); returns the numbers."""
    stream = sys.stdout if stream is None else stream
    if options.part not in ("all",) + PARTS:
        raise DemoError(f"--part must be one of all, {', '.join(PARTS)}; got {options.part!r}")
    if options.backend not in ("auto",) + backends.BACKENDS:
        raise DemoError(f"--backend must be one of auto, {', '.join(backends.BACKENDS)}; got {options.backend!r}")
    device = resolve_device(options.device)
    plots = _plots_folder(options.plots)
    parts = PARTS if options.part == "all" else (options.part,)
    report = DemoReport(device=device)
    started = time.perf_counter()
    chosen = contextlib.nullcontext() if options.backend == "auto" else backends.use_backend(options.backend)
    with chosen, _cpu_threads(device):
        _check_backends(parts, device)
        stream.write(_header(device))
        stream.write(_interpreter_note(parts, device))
        for number, part in enumerate(parts, start=1):
            part_started = time.perf_counter()
            if part == "collab":
                _run_collab(options, device, plots, report, stream, f"[{number}/{len(parts)}]")
            else:
                _run_digits(options, device, plots, report, stream, f"[{number}/{len(parts)}]", explicit=options.part == part)
            report.part_seconds[part] = time.perf_counter() - part_started
            if part not in report.skipped:
                stream.write(f"  {part} part took {_console.seconds(report.part_seconds[part])}\n\n")
    report.seconds = time.perf_counter() - started
    stream.write(_summary(report))
    return report


@contextlib.contextmanager
def _cpu_threads(device: torch.device, threads: int = 1):
    """Train on one CPU thread: the demo's tensors are small, and intra-op threads only add
    synchronisation. On a busy 2-core machine the collab part took 1.8 s with one thread and 35 s
    with two (threads waiting for descheduled siblings). Restored afterwards."""
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(min(threads, previous))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _plots_folder(plots: str | None) -> Path | None:
    """The --plots folder, checked (writable, matplotlib importable) before any training."""
    if plots is None:
        return None
    try:
        folder = writable_folder(plots, "--plots")
    except OutputPathError as err:
        raise DemoError(str(err)) from None
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise DemoError("--plots needs matplotlib: pip install 'fastcore5[demo]' or pip install matplotlib") from None
    return folder


_PART_OPS = {"collab": ("embedding_dot_bias", "sgd"), "digits": ("linear_relu", "sgd")}


def _check_backends(parts, device: torch.device) -> None:
    """Fail before training, with the backend module's own advice, if a requested backend cannot run."""
    for part in parts:
        for op in _PART_OPS[part]:
            try:
                backends.select(op, device, torch.float32)
            except backends.BackendUnavailableError as err:
                if backends.requested() == "cuda" and device.type != "cuda":
                    raise DemoError(_cuda_backend_advice(device)) from None
                raise DemoError(str(err)) from None


def _cuda_backend_advice(device: torch.device) -> str:
    where = (
        "this machine has no CUDA GPU (torch sees none)"
        if not torch.cuda.is_available()
        else f"the demo runs on {device}; add --device cuda"
    )
    return (
        f"--backend cuda runs the CUDA C++ kernels, which need CUDA tensors: {where}. On a machine with an NVIDIA "
        "GPU and a CUDA build of torch, build the extension with "
        "`FASTCORE5_BUILD_CUDA=1 pip install --no-build-isolation -e .` and run with --device cuda"
    )


def _interpreter_note(parts, device: torch.device) -> str:
    """Warn up front when Triton's CPU interpreter will run the kernels: minutes, not seconds.
    Each part then prints its own estimate once its first step has been timed."""
    if device.type != "cpu":
        return ""
    ops = {op for part in parts for op in _PART_OPS[part]}
    if not any(backends.select(op, device, torch.float32) == "triton" for op in ops):
        return ""
    return (
        "  Note: TRITON_INTERPRET=1 runs the Triton kernels through Triton's CPU interpreter, which checks them "
        "but is slow:\n  the whole demo takes over ten minutes on a CPU, `--part digits --epochs 1` a few. "
        "Each part prints its expected time after its first steps.\n\n"
    )


def _header(device: torch.device) -> str:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})"
    gpu_note = "" if torch.cuda.is_available() else ", no CUDA GPU found"
    return (
        "fastcore5 demo: lesson 5 with fused kernels\n"
        f"  torch {torch.__version__}, triton {triton_version}; running on {device} = {where}{gpu_note}\n\n"
    )


def _backend_lines(used: dict[str, str], device: torch.device) -> str:
    return "".join(f"  {op} runs on: {name} ({describe_backend(name, device)})\n" for op, name in used.items())


def _run_collab(options: DemoOptions, device, plots: Path | None, report: DemoReport, stream: TextIO, counter: str) -> None:
    clock = time.perf_counter()
    if options.ratings:
        ratings = load_ratings(options.ratings)
    else:
        ratings = synthetic_movielens(options.seed, **options.synthetic_size)
    data_seconds = time.perf_counter() - clock
    report.ratings = ratings
    stream.write(
        f"{counter} Collaborative filtering: EmbeddingDotBias trained with SGD\n"
        f"  data: {ratings.source}: {_console.plural(ratings.n_users, 'user')}, {_console.plural(ratings.n_items, 'item')}, "
        f"{_console.plural(len(ratings), 'rating')} "
        f"(loaded in {_console.seconds(data_seconds)})\n"
    )
    settings = CollabSettings(seed=options.seed, **_overrides(options), **options.collab_overrides)
    report.collab = train_collab(ratings, settings, device, stream)
    stream.write(_backend_lines(report.collab.backends, device))
    report.backends.update(report.collab.backends)
    report.interpretation = interpret_collab(report.collab.model, ratings, stream)
    if plots is not None:
        from .plots import plot_collab

        report.plots += plot_collab(report.collab, report.interpretation, ratings, plots)
    stream.write(
        f"  time: data {_console.seconds(data_seconds)}, training {_console.seconds(report.collab.seconds)}, "
        f"interpretation {_console.seconds(report.interpretation.seconds)}\n"
    )


def _run_digits(
    options: DemoOptions, device, plots: Path | None, report: DemoReport, stream: TextIO, counter: str, explicit: bool
) -> None:
    stream.write(f"{counter} An MLP of LinearReLU layers on scikit-learn's 8x8 digits, discriminative learning rates\n")
    settings = DigitsSettings(seed=options.seed, **_overrides(options), **options.digits_overrides)
    try:
        report.digits = train_digits(settings, device, stream)
    except ImportError as err:
        if explicit:
            raise DemoError(str(err)) from None
        report.skipped["digits"] = str(err)
        stream.write(f"  skipped: {err}\n\n")
        return
    stream.write(_backend_lines(report.digits.backends, device))
    report.backends.update(report.digits.backends)
    if plots is not None:
        from .plots import plot_digits

        report.plots += plot_digits(report.digits, plots)


def _overrides(options: DemoOptions) -> dict:
    chosen = {"epochs": options.epochs, "batch_size": options.batch_size, "lr": options.lr}
    return {name: value for name, value in chosen.items() if value is not None}


def _summary(report: DemoReport) -> str:
    rows = []
    if report.collab is not None:
        rows.append(
            [
                "collaborative filtering",
                f"valid MSE {report.collab.valid_mse:.4f} (predicting the mean: {report.collab.baseline_mse:.4f})",
                _console.seconds(report.part_seconds["collab"]),
            ]
        )
    if report.collab is not None and report.collab.reference_epoch_seconds is not None:
        fused, reference = report.collab.epoch_seconds, report.collab.reference_epoch_seconds
        rows.append(
            [
                "  collab epoch",
                f"{_console.seconds(fused)} with fastcore5's kernels, {_console.seconds(reference)} on the reference "
                f"({reference / fused:.2f}x)",
                "",
            ]
        )
    if report.digits is not None:
        rows.append(
            ["digits MLP", f"valid accuracy {report.digits.valid_accuracy:.1%} (chance: 10%)", _console.seconds(report.part_seconds["digits"])]
        )
    for part in report.skipped:
        rows.append([part, "skipped (see above)", "-"])
    rows.append(["total", "", _console.seconds(report.seconds)])
    lines = ["Summary", _console.table(["part", "result", "time"], rows)]
    lines.append("Backends")
    lines.append(
        _console.table(
            ["op", "backend", "what ran"],
            [[op, name, describe_backend(name, report.device)] for op, name in sorted(report.backends.items())],
        )
    )
    used = set(report.backends.values())
    native = sorted(op for op, name in report.backends.items() if name == "cpu")
    if native:
        on_reference = sorted(op for op, name in report.backends.items() if name == "torch")
        lines.append(
            f"fastcore5's C++ CPU kernels ran {', '.join(native)}"
            + (f"; {', '.join(on_reference)} ran the plain-PyTorch reference (no CPU kernel yet)." if on_reference else ".")
        )
    if report.device.type == "cpu" and used == {"torch"}:
        where = "There is no CUDA GPU here, so" if not torch.cuda.is_available() else "On the CPU"
        lines.append(
            f"{where} every op ran its plain-PyTorch reference, not a fused kernel: the numbers are right, "
            "but nothing fused ran.\nFor the fused kernels run on a machine with a CUDA GPU "
            "(fastcore5 demo --device cuda), or watch the Triton kernels run on this CPU through Triton's "
            "interpreter, which is very slow (seconds per step; this takes a few minutes):\n"
            "  TRITON_INTERPRET=1 fastcore5 demo --part digits --epochs 1"
        )
        if backends.native_extension() is None:
            lines.append(f"fastcore5's C++ CPU kernels are not built here: {backends.BUILD_ADVICE}.")
    elif report.device.type == "cpu" and "triton" in used:
        lines.append(
            "The Triton kernels ran through Triton's CPU interpreter: this checks them, it does not make them fast."
        )
    if report.plots:
        lines.append("Plots: " + ", ".join(str(p) for p in report.plots))
    return "\n".join(lines) + "\n"
