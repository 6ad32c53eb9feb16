"""`fastcore5 bench` (`python -m bench` in a checkout): every op's benchmark cases, in one
process, on the device present.

Order of work: measure the card's ceilings (common.measure_ceilings), then for each op whose
bench_<op>.py exists beside this file collect ``cases(device, quick)`` and time every callable of
every case (common.run_case). The result is a table on stdout, one JSON file (card,
versions, commit, date, ceilings and every number) and, unless --no-plots, PNG plots of the
speedups and of the fraction of the ceiling reached.

Without a CUDA device (or with --device cpu) the cases run on CPU tensors, with their CPU
shapes: the fastcore5 column is the C++ CPU kernel where the op has one (backend "cpu"), else
the plain-PyTorch reference (the Triton interpreter is a correctness tool and is never timed);
contenders are timed interleaved and compared by the median of paired ratios
(common.run_case). The GPU kernels' numbers need a GPU (scripts/gpu_check.sh).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

from fastcore5 import backends
from fastcore5._output_paths import OutputPathError, writable_file, writable_folder

from .common import Case, measure_ceilings, run_case
from .plots import plot
from .run_record import DEFAULT_OUT, result_stem, start_run
from .table import ceiling_note, format_table, is_noisy, missed_targets

OPS = ("linear_relu", "embedding_dot_bias", "sgd")
BENCH_DIR = Path(__file__).resolve().parent
# Eager / torch.compile / cuBLASLt / torch.optim.SGD times measured on one H200 (torch 2.11,
# triton 3.6) by the project's anchors/measure_anchors.py, which lives with the design notes outside
# this repository (the file records device and versions); shown beside a CUDA run's own numbers.
# Shipped as package data (setup.py), so an installed wheel has it too.
ANCHORS_FILE = BENCH_DIR / "anchors" / "h200-2026-11-26.json"


def build_parser(prog: str = "python -m bench") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Benchmark every fastcore5 op against its anchors (eager PyTorch, torch.compile, cuBLASLt, "
            "torch.optim.SGD foreach/fused) on the device present: a table, JSON and PNG plots."
        ),
        epilog="Without a CUDA GPU the cases run on CPU tensors, on fastcore5's C++ CPU kernels where the extension "
        "was built (else its reference): the GPU numbers need a GPU.",
    )
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repetitions (under two minutes on a GPU)")
    parser.add_argument(
        "--op", dest="ops", action="extend", nargs="+", choices=OPS, metavar="OP",
        help=f"benchmark only these ops (any of: {', '.join(OPS)}; repeatable; default: all)",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, metavar="DIR",
        help="where to write the JSON and the plots (default: results in the current folder, under bench-results/)",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots (matplotlib is then not needed)")
    parser.add_argument(
        "--device", choices=("cuda", "cpu"), default=None,
        help="where the kernel benchmarks run (default: cuda when there is a CUDA device, else cpu)",
    )
    parser.add_argument(
        "--host", action="store_true",
        help="instead: the host time of every public entry point next to eager PyTorch (fastcore5/bench/host.py; runs without a GPU)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="with --host: also write its results as JSON to PATH")
    parser.add_argument("--train", action="store_true", help="end-to-end training speed instead (fastcore5/bench/train.py)")
    parser.add_argument(
        "--check", action="store_true",
        help="exit 1 when a row misses its target (the --host and --train targets; kernel cases that set one)",
    )
    return parser


def option_conflict(args: argparse.Namespace) -> str | None:
    """Why the options asked for cannot go together, or None: an option that the chosen run would
    ignore is refused rather than dropped silently."""
    if args.host and args.train:
        return "--host and --train are separate runs: pick one"
    if args.json is not None and not args.host:
        return "--json is for --host; the kernel and training benchmarks write their JSON into --out"
    if args.ops and (args.host or args.train):
        return f"--op picks kernel benchmarks; {'--host' if args.host else '--train'} runs every op it has"
    if args.device and (args.host or args.train):
        return f"--device picks where the kernel benchmarks run; {'--host' if args.host else '--train'} runs on the device present"
    if args.device == "cuda" and not torch.cuda.is_available():
        return "--device cuda: no CUDA device here"
    return None


def main(argv: list[str] | None = None, prog: str = "python -m bench") -> int:
    args = build_parser(prog).parse_args(argv)
    conflict = option_conflict(args)
    if conflict:
        print(f"{prog}: error: {conflict}", file=sys.stderr)
        return 2
    ignore_torch_deprecations()
    try:
        backends.check_environment()
    except backends.BackendConfigError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    try:
        if args.host:
            host_json = writable_file(args.json, "--json").resolve() if args.json else None
        else:
            out = writable_folder(args.out, "--out")
    except OutputPathError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    if args.host:
        # A fresh process, with Triton's interpreter on from its start when there is no GPU: importing
        # the fastcore5 package imports triton, which reads TRITON_INTERPRET once (see host.py).
        # The parent's -W options too, so `python -W error::DeprecationWarning -m bench --host` checks the child.
        warning_options = [f"-W{option}" for option in sys.warnoptions]
        command = [sys.executable, *warning_options, "-m", f"{__package__}.host"]
        if host_json:
            command += ["--json", str(host_json)]
        if args.check:
            command += ["--check"]
        env = os.environ if torch.cuda.is_available() else {**os.environ, "TRITON_INTERPRET": "1"}
        return subprocess.call(command, env=env)
    if args.train:
        from . import train

        return train.main(args, out)
    return kernel_benchmarks(args, out)


def kernel_benchmarks(args: argparse.Namespace, out: Path) -> int:
    """Every case of the chosen ops: table, JSON, plots; the exit status."""
    ops = list(dict.fromkeys(args.ops or OPS))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cpu_notes = [
        "CPU timings: fastcore5 runs its C++ CPU kernels where an op has one, else its plain-PyTorch "
        "reference (see which ran, per op). The GPU kernels' numbers need a GPU (scripts/gpu_check.sh runs "
        "this on one)."
    ]
    if backends.interpreter_active():
        cpu_notes.append("TRITON_INTERPRET=1 is set: the Triton interpreter is a correctness tool and is not timed.")
    run, notes = start_run("benchmarks", device, out, cpu_notes)

    started = time.perf_counter()
    ceilings = measure_ceilings(device, args.quick)
    print("ceilings: " + ", ".join(f"{name} {value:.4g}" for name, value in ceilings.items()))
    anchors, anchors_path = load_anchors()

    results, skipped, op_backends = [], {}, {}
    for op in ops:
        module = load_cases_module(op)
        if module is None:
            skipped[op] = f"fastcore5/bench/bench_{op}.py does not exist yet"
            print(f"{op}: skipped ({skipped[op]})")
            continue
        # Never the Triton interpreter on a CPU (TRITON_INTERPRET=1, set by the test suite, say,
        # would time it for minutes): the reference where the op has no CPU kernel.
        interpreted = device == "cpu" and backends.select(op, device, torch.float32) == "triton"
        with backends.use_backend("torch") if interpreted else contextlib.nullcontext():
            op_backends[op] = backends.select(op, device, torch.float32)
            op_started = time.perf_counter()
            cases = module.cases(device, args.quick)
            for case in cases:
                results.append(run_one(case, device, ceilings, args.quick, anchors))
            print(f"{op}: {len(cases)} cases in {time.perf_counter() - op_started:.1f} s (fastcore5 ran on {op_backends[op]})")
            del cases
            if device == "cuda":
                torch.cuda.empty_cache()

    print()
    print(format_table(results))
    above = ceiling_note(results, ceilings)
    if above:
        notes.append(above)
        print(above)
    errors = [row for row in results if "error" in row]
    report = {
        **run,
        "device": device,
        "quick": args.quick,
        "ops": ops,
        "fastcore5_backend": op_backends,
        "ceilings": ceilings,
        "anchors_file": str(anchors_path) if anchors_path else None,
        "skipped_ops": skipped,
        "notes": notes,
        "seconds": time.perf_counter() - started,
        "results": results,
    }
    stem = result_stem("bench", run)
    json_path = out.resolve() / f"{stem}.json"
    json_path.write_text(json.dumps(report, indent=1))
    print(f"\nJSON: {json_path}")
    if not args.no_plots:
        for path in plot(results, out.resolve(), stem, run["card"]):
            print(f"plot: {path}")
    return exit_status(results, args.check)


def exit_status(results: list[dict], check: bool) -> int:
    """1 when a case failed, or (with --check) when a row missed its target; 0 otherwise. Rows too
    noisy to trust are counted in a line but fail nothing: the machine, not the code, moved them."""
    errors = [row for row in results if "error" in row]
    missed = [row for row in results if "error" not in row and missed_targets(row)]
    noisy = [row for row in results if "error" not in row and is_noisy(row)]
    if noisy:
        print(f"{len(noisy)} of {len(results)} row(s) too noisy to trust (marked ~): rerun on an idle machine")
    if errors:
        print(f"{len(errors)} case(s) failed: see 'error' in the table and the JSON", file=sys.stderr)
    if missed:
        print(f"{len(missed)} case(s) missed a target (marked MISS)" + ("" if check else "; --check would exit 1"),
              file=sys.stderr if check else sys.stdout)
    return 1 if errors or (check and missed) else 0


def ignore_torch_deprecations() -> None:
    """torch.compile imports torch.utils.mkldnn, whose classes use torch's own deprecated
    torch.jit.script_method: torch's deprecation, not ours, ignored here as pyproject.toml ignores it
    for the tests, so that `python -W error::DeprecationWarning -m bench` fails on ours only."""
    warnings.filterwarnings(
        "ignore", message="`torch.jit.script_method` is deprecated", category=DeprecationWarning, module="torch"
    )


def load_anchors() -> tuple[dict[str, float], Path | None]:
    """The H200 anchor times by key, and the file they came from; ({}, None) without the file
    (a trimmed copy of the tree): the table then has no anchor column."""
    path = ANCHORS_FILE
    try:
        return json.loads(path.read_text()), path
    except FileNotFoundError:
        return {}, None
    except (OSError, ValueError) as err:
        print(f"warning: cannot read the anchors file {path}: {err}", file=sys.stderr)
        return {}, None


def load_cases_module(op: str):
    """bench_<op>.py beside this file, or None while that op has no benchmark file."""
    if not (BENCH_DIR / f"bench_{op}.py").is_file():
        return None
    return importlib.import_module(f"{__package__}.bench_{op}")


def run_one(case: Case, device: str, ceilings: dict, quick: bool, anchors: dict) -> dict:
    """One result row; a case that raises is recorded with its error instead of ending the run."""
    try:
        row = run_case(case, device, ceilings, quick)
    except Exception as err:  # noqa: BLE001 - reported in the table, the JSON and the exit status
        traceback.print_exc()
        row = {"op": case.op, "shape": case.shape, "dtype": case.dtype, "mode": case.mode, "error": f"{type(err).__name__}: {err}"}
    row["ours"] = case.ours
    found = {label: anchors[key] for label, key in case.anchor_keys.items() if key in anchors}
    if found:
        row["h200_anchor_ms"] = found
    return row
