"""What every benchmark shares: timing, the card's ceilings, and the Case record.

Timing: on CUDA, triton.testing.do_bench (CUDA events, L2 flushed between repetitions) for each
callable, reported as its quartiles; on CPU, wall-clock repetitions in which the callables of a
case take turns (so a burst of load from other processes hits them all), each ratio being the
median of the per-repetition ratios. Every time and ratio keeps its interquartile range, so a
reader can see how far to trust it. Inputs that should not sit in L2 are rotated by the case
itself (see ``Rotating``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .table import quartiles, spread

# bytes for the copy ceiling; sized far past the H100/H200 L2 (50/60 MB) on CUDA
_COPY_BYTES = {"cuda": 1 << 30, "cpu": 1 << 26}
_MATMUL_SIZE = {"cuda": 8192, "cpu": 512}


@dataclass
class Case:
    """One benchmark: ``fns`` maps a label ("fastcore5", "eager", "torch.compile", ...) to a
    zero-argument callable; ``ours`` names the label whose ratios to the others are reported.

    ``bytes_moved`` (memory-bound ops) or ``flops`` (GEMMs) turn a time into a fraction of the
    card's copy bandwidth or bf16 matmul rate. ``anchor_keys`` maps a label to the key of the
    same measurement in the shared H200 anchors file, for reference.
    """

    op: str
    shape: str
    dtype: str
    mode: str  # "fwd", "fwdbwd" or "step"
    fns: dict[str, Callable[[], object]]
    ours: str = "fastcore5"
    bytes_moved: float | None = None
    flops: float | None = None
    anchor_keys: dict[str, str] = field(default_factory=dict)
    details: Callable[[], dict] | None = None  # facts to record in the row, asked after timing
    # label -> the least ratio (their time / ours) that counts as met; `--check` fails on a miss
    targets: dict[str, float] = field(default_factory=dict)


class Rotating:
    """Cycles through ``count`` copies of some inputs so consecutive calls miss in L2."""

    def __init__(self, make: Callable[[], tuple], count: int):
        self.sets = [make() for _ in range(max(count, 1))]
        self.index = 0

    def next(self) -> tuple:
        self.index = (self.index + 1) % len(self.sets)
        return self.sets[self.index]


def copies_to_exceed_l2(bytes_per_set: int, device: str, l2_bytes: int = 64 << 20) -> int:
    """How many input sets to rotate so together they exceed L2 (1 set on CPU)."""
    if device != "cuda":
        return 1
    return max(1, -(-3 * l2_bytes // max(bytes_per_set, 1)))


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _cpu_repetitions(quick: bool) -> int:
    return 5 if quick else 11


# Seconds each callable runs before its timing, and at least while timed (--quick: a tenth): a case
# of a few tenths of a millisecond timed after one warm-up call, 11 repetitions in all, read up to
# 2.5x slower than in steady state, and differently from run to run (bench/NOTES.md, 2026-12-04).
_CPU_WARMUP_S, _CPU_MEASURE_S, _CPU_MAX_REPETITIONS = 0.05, 0.2, 400


def _cpu_seconds(seconds: float, quick: bool) -> float:
    return seconds / 10 if quick else seconds


def _cpu_samples_ms(fns: dict[str, Callable[[], object]], quick: bool) -> dict[str, list[float]]:
    """Wall-clock ms of each callable, repetition by repetition, the callables taking turns in an
    order rotated by one each repetition: at least ``_cpu_repetitions`` of them, more (up to
    _CPU_MAX_REPETITIONS) until every callable has run for _CPU_MEASURE_S, after each has warmed
    up for _CPU_WARMUP_S."""
    warmup_s, measure_ms = _cpu_seconds(_CPU_WARMUP_S, quick), _cpu_seconds(_CPU_MEASURE_S, quick) * 1e3
    for fn in fns.values():
        start = time.perf_counter()
        fn()
        while time.perf_counter() - start < warmup_s:
            fn()
    samples: dict[str, list[float]] = {label: [] for label in fns}
    spent = dict.fromkeys(fns, 0.0)
    order = list(fns.items())
    repetitions = 0
    while repetitions < _cpu_repetitions(quick) or (
        repetitions < _CPU_MAX_REPETITIONS and min(spent.values()) < measure_ms
    ):
        # Each repetition starts one contender later: in a fixed order each callable always ran
        # right after the same other one, whose memory traffic decided how much of its data was
        # still cached (the SGD step on 40 collab tables read 1.08-1.12x torch's fused step in
        # that order and 1.29-1.47x rotated; bench/NOTES.md, 2026-12-04 night).
        first = repetitions % len(order)
        for label, fn in order[first:] + order[:first]:
            start = time.perf_counter()
            fn()
            elapsed = (time.perf_counter() - start) * 1e3
            samples[label].append(elapsed)
            spent[label] += elapsed
        repetitions += 1
    return samples


def time_ms(fn: Callable[[], object], device: str, quick: bool = False) -> list[float]:
    """Quartiles of the milliseconds per call of ``fn`` on ``device``."""
    if device == "cuda":
        import triton.testing

        return [float(t) for t in triton.testing.do_bench(
            fn, warmup=10 if quick else 25, rep=30 if quick else 100, quantiles=[0.25, 0.5, 0.75]
        )]
    return quartiles(_cpu_samples_ms({"fn": fn}, quick)["fn"])


def _copy_GBps(device: str, quick: bool) -> float:
    numel = _COPY_BYTES[device] // 4 // (4 if quick else 1)
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    return 2 * numel * 4 / time_ms(lambda: dst.copy_(src), device, quick)[1] / 1e6


def _matmul_TFLOPs(device: str, dtype: torch.dtype, quick: bool) -> float:
    size = _MATMUL_SIZE[device]
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    return 2 * size**3 / time_ms(lambda: a @ b, device, quick)[1] / 1e9


def measure_ceilings(device: str, quick: bool = False) -> dict[str, float]:
    """The card's measured copy bandwidth (GB/s, read + write) and matmul rate (TFLOP/s; bf16
    on CUDA, fp32 on CPU). Each measurement frees its buffers before the next starts."""
    ceilings = {"copy_GBps": _copy_GBps(device, quick)}
    if device == "cuda":
        ceilings["matmul_bf16_TFLOPs"] = _matmul_TFLOPs(device, torch.bfloat16, quick)
    else:
        ceilings["matmul_fp32_TFLOPs"] = _matmul_TFLOPs(device, torch.float32, quick)
    return ceilings


def _timings(case: Case, device: str, quick: bool) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(quartiles of each callable's ms, quartiles of each ratio their ms / ours)."""
    if device == "cuda":
        times = {label: time_ms(fn, device, quick) for label, fn in case.fns.items()}
        ours_low, ours_median, ours_high = times[case.ours]
        # the ratio's range from the two ranges, at their far ends: wide rather than flattering
        ratios = {label: [low / ours_high, median / ours_median, high / ours_low]
                  for label, (low, median, high) in times.items() if label != case.ours}
        return times, ratios
    samples = _cpu_samples_ms(case.fns, quick)
    ours = samples[case.ours]
    ratios = {label: quartiles([t / o for t, o in zip(times, ours)]) for label, times in samples.items() if label != case.ours}
    return {label: quartiles(times) for label, times in samples.items()}, ratios


def run_case(case: Case, device: str, ceilings: dict[str, float], quick: bool = False) -> dict:
    """Time every callable of ``case`` and return one result row (all numbers, no formatting):
    medians in "ms" and "speedup", quartiles in "ms_quartiles" and "speedup_quartiles"."""
    quartile_times, quartile_ratios = _timings(case, device, quick)
    times = {label: q[1] for label, q in quartile_times.items()}
    ours = times[case.ours]
    row = {
        "op": case.op,
        "shape": case.shape,
        "dtype": case.dtype,
        "mode": case.mode,
        "ms": times,
        "speedup": {label: q[1] for label, q in quartile_ratios.items()},
        "ms_quartiles": quartile_times,
        "speedup_quartiles": quartile_ratios,
        # the paired ratios are what the table is read for, and pairing cancels load that hits both
        "spread": max(spread(q) for q in quartile_ratios.values()) if quartile_ratios else spread(quartile_times[case.ours]),
    }
    if case.targets:
        row["targets"] = case.targets
    if case.bytes_moved is not None:
        row["GBps"] = case.bytes_moved / ours / 1e6
        row["fraction_of_copy_ceiling"] = row["GBps"] / ceilings["copy_GBps"]
    if case.flops is not None:
        row["TFLOPs"] = case.flops / ours / 1e9
        peak = ceilings.get("matmul_bf16_TFLOPs") or ceilings.get("matmul_fp32_TFLOPs")
        row["fraction_of_matmul_ceiling"] = row["TFLOPs"] / peak
    if case.anchor_keys:
        row["anchor_keys"] = case.anchor_keys
    if case.details is not None:
        row.update(case.details())
    return row
