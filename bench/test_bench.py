"""The benchmark cases of fastcore5/bench/bench_<op>.py as pytest-benchmark tests:

    pytest bench/ --benchmark-only                       every case and callable
    FASTCORE5_BENCH_QUICK=1 pytest bench/ --benchmark-only   the --quick set
    pytest bench/ --benchmark-disable                    each body once, as a smoke test

One test per (op, case, callable), e.g. ``test_case[linear_relu-8192x1024x4096-bf16-fwd-eager]``;
extra_info carries the case's description and the H200 anchor for that callable when there is
one. ``python -m bench`` runs the same bodies with CUDA-event timing and writes the report.
"""
from __future__ import annotations

import contextlib
import os

import pytest
import torch

from fastcore5 import backends
from fastcore5.bench.common import synchronize
from fastcore5.bench.runner import OPS, load_anchors, load_cases_module

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
QUICK = os.environ.get("FASTCORE5_BENCH_QUICK", "0") == "1"


def _collect() -> list[tuple[str, int, str, str]]:
    """(op, case index, label, test id) for every callable of every case. The cases are built
    here only to be named; each op's are rebuilt when its tests run (see _cases), so the inputs
    of one op at a time are in memory."""
    params = []
    for op in OPS:
        module = load_cases_module(op)
        if module is None:
            continue
        for index, case in enumerate(module.cases(DEVICE, QUICK)):
            for label in case.fns:
                params.append((op, index, label, f"{op}-{case.shape}-{case.dtype}-{case.mode}-{label}"))
    return params


PARAMS = _collect()
_built: dict[str, list] = {}


def _cases(op: str) -> list:
    if op not in _built:
        _built.clear()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        _built[op] = load_cases_module(op).cases(DEVICE, QUICK)
    return _built[op]


@pytest.mark.parametrize(("op", "index", "label"), [p[:3] for p in PARAMS], ids=[p[3] for p in PARAMS])
def test_case(benchmark, op, index, label):
    case = _cases(op)[index]
    fn = case.fns[label]
    anchors, _ = load_anchors()
    benchmark.group = f"{op} {case.shape} {case.dtype} {case.mode}"
    benchmark.extra_info.update(op=op, shape=case.shape, dtype=case.dtype, mode=case.mode, label=label, device=DEVICE)
    key = case.anchor_keys.get(label)
    if key in anchors:
        benchmark.extra_info["h200_anchor_ms"] = anchors[key]

    def call():
        fn()
        synchronize(DEVICE)

    # On a CPU fastcore5 runs its reference (the Triton interpreter is never timed), as in the runner.
    with backends.use_backend("torch") if DEVICE == "cpu" else contextlib.nullcontext():
        benchmark(call)
