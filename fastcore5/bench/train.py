"""`python -m bench --train`: end-to-end training speed, fastcore5 against eager PyTorch and torch.compile.

Two training runs, each done four ways from the same initial weights and the same batches:

* **collab** — the lesson's collaborative-filtering model at MovieLens-25M scale: 25M synthetic
  ratings, 162541 users, 59047 items, 64 factors, batch 65536, ``y_range=(0, 5.5)``, SGD with
  momentum 0.9 (held: only the learning rate follows the one-cycle schedule) and weight decay
  1e-4, one epoch, then the validation MSE on a held-out 10%. Item popularity is Zipf-like, as in
  the real data (``zipf_ids``): the most popular items appear in most batches, most items in few.
* **mlp** — 8192 x 1024 -> 4096 -> 4096 -> 1024 (ReLU after the hidden layers), bf16 autocast, SGD
  with momentum, 200 steps on synthetic data.

The four ways: ``fastcore5`` (``fastcore5.nn.EmbeddingDotBias`` / ``fastcore5.nn.MLP`` +
``fastcore5.optim.SGD``), ``eager`` (nn.Embedding / nn.Linear + nn.ReLU with the same formula +
``torch.optim.SGD(fused=True)``), ``torch.compile`` of the eager model's forward and loss (default
mode) and the same with ``mode="reduce-overhead"`` (CUDA graphs). Each way first runs a few
warm-up steps (compilation, autotuning, graph capture; reported as ``warmup_s``), then the
weights are reset and the timed run starts. Reported: seconds, samples/s or steps/s, peak GPU
memory, and the final quality — the validation MSE for collab, which must agree across the four
ways within ``MSE_RTOL`` (the run fails otherwise), the last training loss for the MLP.

Without a CUDA device the same pipeline runs on tiny sizes with fastcore5 on its plain-PyTorch
reference (never the Triton interpreter): it checks the pipeline, its numbers are not the point.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fastcore5 import backends
from fastcore5.nn import EmbeddingDotBias
from fastcore5.optim import SGD

from .run_record import result_stem, start_run
from .table import render
from .train_data import (
    ITEM_ZIPF, USER_ZIPF, CollabSize, EagerDotBias, MLPSize, mlp, mlp_data, synthetic_ratings,
)

VARIANTS = ("fastcore5", "eager", "torch.compile", "torch.compile reduce-overhead")
OURS = "fastcore5"
# The four ways differ only in the order of floating-point sums (atomics, fusion), so their
# validation MSEs agree far closer than this; a wrong kernel or optimizer misses it by a lot.
MSE_RTOL = 0.01
TARGETS = {"collab": {"eager": 3.0, "torch.compile": 1.5}, "mlp": {"eager": 1.2}}
WARMUP_STEPS = 3
# what torch.compile compiles with; the pipeline's CPU test swaps in "eager" (inductor's CPU
# compile takes minutes there and is not what the test checks)
COMPILE_BACKEND = "inductor"

# lr: the per-row step size scales as lr * (rows' share of a batch) / batch. At 1/10 of the full
# size (users, items, ratings and batch all divided by 10: the same occurrences of a row per batch)
# lr 5, 10, 20 and 50 reached validation MSE 0.482, 0.478, 0.480, 0.483 in one epoch of eager
# training (CPU, 2026-11-27, momentum held at 0.9); 100 at full size is 10 at that scale. The
# tiny CPU size was scanned directly (0.5 to 5: best 2, validation MSE 0.544 against a variance of 0.726).
COLLAB = {"cuda": CollabSize(25_000_000, 162_541, 59_047, 64, 65_536, lr=100.0),
          "cpu": CollabSize(60_000, 800, 400, 16, 2_048, lr=2.0)}
MLP = {"cuda": MLPSize(8192, (1024, 4096, 4096, 1024), 200), "cpu": MLPSize(64, (32, 64, 64, 32), 12)}


def loss_function(model: nn.Module, variant: str, autocast: bool, device: str) -> Callable:
    """forward + MSE loss, compiled as the variant says (the backward follows the compiled graph)."""

    def loss(x, y):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
        return F.mse_loss(out.float(), y)

    if variant == "torch.compile":
        return torch.compile(loss, backend=COMPILE_BACKEND)
    if variant == "torch.compile reduce-overhead":
        return torch.compile(loss, mode="reduce-overhead", backend=COMPILE_BACKEND)
    return loss


def optimizer_for(variant: str, params, hyper: dict, device: str, one_cycle_steps: int | None = None):
    """The variant's SGD and, given ``one_cycle_steps``, its one-cycle learning-rate schedule (else None).

    The schedule holds the momentum at ``hyper["momentum"]``: OneCycleLR by default cycles it
    0.95 -> 0.85 -> 0.95, which would make the run's stated momentum untrue.
    """
    lr, momentum, weight_decay = hyper["lr"], hyper["momentum"], hyper["weight_decay"]
    if variant == OURS:
        opt = SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=device == "cuda")
    if one_cycle_steps is None:
        return opt, None
    return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=one_cycle_steps, cycle_momentum=False)


# ------------------------------------------------------------------------------------- training


def train_steps(loss_fn, optimizer, scheduler, batches, device) -> torch.Tensor:
    """Run one step per batch; the summed loss stays on the device (no host sync per step)."""
    total = torch.zeros((), device=device)
    for x, y in batches:
        loss = loss_fn(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        total += loss.detach()
    return total


def timed_run(model: nn.Module, variant: str, initial: dict, make_batches: Callable, n_steps: int,
              hyper: dict, autocast: bool, device: str, one_cycle: bool) -> dict:
    """Warm up (then restore ``initial``), then time ``n_steps`` steps from ``initial``."""
    loss_fn = loss_function(model, variant, autocast, device)

    def fresh_optimizer():
        return optimizer_for(variant, model.parameters(), hyper, device, n_steps if one_cycle else None)

    synchronize = (lambda: torch.cuda.synchronize()) if device == "cuda" else (lambda: None)
    started = time.perf_counter()
    opt, _ = fresh_optimizer()
    train_steps(loss_fn, opt, None, make_batches(WARMUP_STEPS), device)
    synchronize()
    warmup_s = time.perf_counter() - started
    with torch.no_grad():  # in place: compiled graphs and captured CUDA graphs keep these tensors
        for name, tensor in model.state_dict().items():
            tensor.copy_(initial[name])
    opt, scheduler = fresh_optimizer()
    batches = make_batches(n_steps)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    synchronize()
    started = time.perf_counter()
    total = train_steps(loss_fn, opt, scheduler, batches, device)
    synchronize()
    seconds = time.perf_counter() - started
    row = {"seconds": seconds, "warmup_s": warmup_s, "mean_train_loss": float(total) / n_steps}
    if device == "cuda":
        row["peak_mem_MiB"] = torch.cuda.max_memory_allocated() / 2**20
        row["peak_extra_mem_MiB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return row


def collab_run(variant: str, size: CollabSize, data, initial: dict, device: str) -> dict:
    train_x, train_y, valid_x, valid_y = data
    n_steps = train_x.shape[0] // size.batch  # whole batches only: one shape for CUDA graphs

    def batches(count):
        return ((train_x[k * size.batch:(k + 1) * size.batch], train_y[k * size.batch:(k + 1) * size.batch])
                for k in range(min(count, n_steps)))

    model_cls = EmbeddingDotBias if variant == OURS else EagerDotBias
    model = model_cls(size.n_factors, size.n_users, size.n_items, size.y_range, device=device)
    model.load_state_dict(initial)
    hyper = {"lr": size.lr, "momentum": size.momentum, "weight_decay": size.weight_decay}
    row = timed_run(model, variant, initial, batches, n_steps, hyper, autocast=False, device=device, one_cycle=True)
    row["samples_per_s"] = n_steps * size.batch / row["seconds"]
    row["steps"] = n_steps
    with torch.no_grad():
        squared = torch.zeros((), device=device, dtype=torch.float64)
        step = size.batch * 4
        for start in range(0, valid_x.shape[0], step):
            pred = model(valid_x[start:start + step])
            squared += (pred.double() - valid_y[start:start + step].double()).square().sum()
    row["valid_mse"] = float(squared) / valid_x.shape[0]
    return row


def mlp_run(variant: str, size: MLPSize, data, initial: dict, device: str) -> dict:
    inputs, targets = data
    model = mlp(size.widths, fused=variant == OURS, device=device)
    model.load_state_dict(initial)  # the fused MLP has the plain Sequential's state_dict
    initial_here = {name: tensor.clone() for name, tensor in model.state_dict().items()}

    def batches(count):
        return ((inputs[k % len(inputs)], targets[k % len(targets)]) for k in range(count))

    hyper = {"lr": size.lr, "momentum": size.momentum, "weight_decay": 0.0}
    row = timed_run(model, variant, initial_here, batches, size.steps, hyper, autocast=True, device=device, one_cycle=False)
    row["steps_per_s"] = size.steps / row["seconds"]
    row["steps"] = size.steps
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        row["final_loss"] = float(F.mse_loss(model(inputs[0]).float(), targets[0]))
    return row


# ---------------------------------------------------------------------------------------- report


def check_collab_mse(rows: list[dict], rtol: float = MSE_RTOL) -> list[str]:
    """Problems with the collab runs' validation MSEs: any way that fails or disagrees with eager."""
    mse = {row["variant"]: row.get("valid_mse") for row in rows if row["task"] == "collab"}
    anchor = mse.get("eager")
    if anchor is None or not math.isfinite(anchor):
        return [f"collab: no finite eager validation MSE to compare with (got {anchor})"]
    problems = []
    for variant, value in mse.items():
        if value is None or not math.isfinite(value) or abs(value - anchor) > rtol * anchor:
            problems.append(f"collab: {variant} validation MSE {value} differs from eager's {anchor:.6g} by more than {rtol:.0%}")
    return problems


def add_speedups(rows: list[dict]) -> None:
    """speedup[other] = other's time / ours, on each of our rows (above 1: ours is faster)."""
    for task in {row["task"] for row in rows}:
        times = {row["variant"]: row["seconds"] for row in rows if row["task"] == task and "seconds" in row}
        for row in rows:
            if row["task"] == task and row["variant"] == OURS and OURS in times:
                row["speedup"] = {v: t / times[OURS] for v, t in times.items() if v != OURS}


def target_lines(rows: list[dict]) -> list[str]:
    lines = []
    for row in rows:
        if row["variant"] != OURS or "speedup" not in row:
            continue
        for other, wanted in TARGETS[row["task"]].items():
            got = row["speedup"].get(other)
            if got is not None:
                lines.append(f"target {row['task']}: fastcore5 {got:.2f}x {other} (wanted >= {wanted}x): "
                             f"{'met' if got >= wanted else 'MISSED'}")
    return lines


def format_table(rows: list[dict]) -> str:
    headers = ["task", "way", "seconds", "throughput", "fastcore5 speedup", "peak MiB", "quality", "warm-up s"]
    speedups = {row["task"]: row.get("speedup", {}) for row in rows if row["variant"] == OURS}
    lines = []
    for row in rows:
        if "error" in row:
            lines.append([row["task"], row["variant"], "error", row["error"][:70], "", "", "", ""])
            continue
        if row["task"] == "collab":
            throughput, quality = f"{row['samples_per_s']:.4g} samples/s", f"valid MSE {row['valid_mse']:.5f}"
        else:
            throughput, quality = f"{row['steps_per_s']:.4g} steps/s", f"final loss {row['final_loss']:.5f}"
        speedup = speedups.get(row["task"], {}).get(row["variant"])
        lines.append([
            row["task"], row["variant"], f"{row['seconds']:.4g}", throughput,
            f"{speedup:.2f}x" if speedup is not None else ("(ours)" if row["variant"] == OURS else ""),
            f"{row['peak_mem_MiB']:.0f}" if "peak_mem_MiB" in row else "-", quality, f"{row['warmup_s']:.3g}",
        ])
    return "\n".join([
        "fastcore5 speedup = that way's seconds / fastcore5's: above 1 = fastcore5 faster",
        render(headers, lines, {"seconds", "throughput", "fastcore5 speedup", "peak MiB", "warm-up s"}),
    ])


def plot(rows: list[dict], path: Path, card: str) -> Path | None:
    """One figure: per task, each way's throughput relative to eager."""
    try:
        import matplotlib
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install 'fastcore5[bench]')")
        return None
    matplotlib.use("Agg")  # off-screen; must precede the pyplot import
    import matplotlib.pyplot as plt

    tasks = [task for task in ("collab", "mlp") if any(row["task"] == task and "seconds" in row for row in rows)]
    if not tasks:
        return None
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        timed = {row["variant"]: row["seconds"] for row in rows if row["task"] == task and "seconds" in row}
        eager = timed.get("eager")
        labels = [v for v in VARIANTS if v in timed]
        values = [eager / timed[v] if eager else 1 / timed[v] for v in labels]
        ax.bar(range(len(labels)), values, color=[f"C{VARIANTS.index(v)}" for v in labels])
        ax.set_xticks(range(len(labels)), [v.replace(" ", "\n") for v in labels], fontsize=8)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylabel("training speed relative to eager (x)" if eager else "1 / seconds (1/s)")
        ax.set_title(f"{task}: {'one epoch' if task == 'collab' else 'MLP steps'} on {card}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------ main


def run_task(task: str, run_one: Callable, device: str) -> list[dict]:
    """One row per way; a way that raises is recorded with its error instead of ending the run."""
    rows = []
    for variant in VARIANTS:
        started = time.perf_counter()
        try:
            row = {"task": task, "variant": variant, **run_one(variant)}
        except Exception as err:  # noqa: BLE001 - reported in the table, the JSON and the exit status
            traceback.print_exc()
            row = {"task": task, "variant": variant, "error": f"{type(err).__name__}: {err}"}
        rows.append(row)
        print(f"{task} / {variant}: done in {time.perf_counter() - started:.1f} s")
        torch._dynamo.reset()  # compiled graphs (and their CUDA graph pools) do not outlive their way
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def collab_task(size: CollabSize, device: str) -> list[dict]:
    data = synthetic_ratings(size, device)
    initial = EmbeddingDotBias(size.n_factors, size.n_users, size.n_items, size.y_range, device=device).state_dict()
    return run_task("collab", lambda variant: collab_run(variant, size, data, initial, device), device)


def mlp_task(size: MLPSize, device: str) -> list[dict]:
    data = mlp_data(size, device)
    initial = mlp(size.widths, fused=False, device=device).state_dict()
    return run_task("mlp", lambda variant: mlp_run(variant, size, data, initial, device), device)


def main(args: argparse.Namespace, out: Path) -> int:
    """The training benchmark into ``out`` (checked writable by the runner); the exit status:
    1 when a way failed or the MSEs disagree, or (with --check) a target was missed."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    collab_size, mlp_size = COLLAB[device], MLP[device]
    if args.quick and device == "cuda":
        mlp_size = MLPSize(mlp_size.batch, mlp_size.widths, 50)
    run, notes = start_run("training benchmark", device, out, [
        "No CUDA GPU: tiny sizes on CPU tensors, with fastcore5 on its plain-PyTorch reference. This checks the "
        "pipeline; its numbers are not the point. The training-speed numbers need a GPU: "
        'STAGES="install train" bash scripts/gpu_check.sh.'
    ])
    started = time.perf_counter()
    rows: list[dict] = []
    # On a CPU, forcing the reference keeps TRITON_INTERPRET=1 (set by the test suite) from
    # timing the interpreter; on a GPU the automatic choice is the point.
    reference_only = backends.use_backend("torch") if device == "cpu" else contextlib.nullcontext()
    with reference_only:
        fastcore5_backend = {op: backends.select(op, device, torch.float32) for op in ("embedding_dot_bias", "linear_relu")}
        rows += collab_task(collab_size, device)  # its data is freed before the MLP's is made
        rows += mlp_task(mlp_size, device)

    add_speedups(rows)
    problems = [f"{row['task']} / {row['variant']}: {row['error']}" for row in rows if "error" in row]
    problems += check_collab_mse([row for row in rows if "error" not in row])
    print()
    print(format_table(rows))
    targets = target_lines(rows) if device == "cuda" else []
    for line in targets:
        print(line)
    report = {
        **run, "device": device, "quick": args.quick, "kind": "train", "fastcore5_backend": fastcore5_backend,
        "compile_backend": COMPILE_BACKEND,
        "sizes": {"collab": asdict(collab_size), "mlp": asdict(mlp_size)},
        "item_zipf": ITEM_ZIPF, "user_zipf": USER_ZIPF, "mse_rtol": MSE_RTOL, "targets": TARGETS,
        "target_results": targets, "notes": notes, "problems": problems,
        "seconds": time.perf_counter() - started, "results": rows,
    }
    stem = result_stem("train", run)
    json_path = out.resolve() / f"{stem}.json"
    json_path.write_text(json.dumps(report, indent=1))
    print(f"\nJSON: {json_path}")
    if not args.no_plots:
        path = plot(rows, out.resolve() / f"{stem}.png", run["card"])
        if path is not None:
            print(f"plot: {path}")
    for note in notes:
        print(note)
    for problem in problems:
        print(problem, file=sys.stderr)
    missed = [line for line in targets if line.endswith("MISSED")]
    if missed and args.check:
        print(f"{len(missed)} target(s) missed", file=sys.stderr)
    return 1 if problems or (missed and args.check) else 0

