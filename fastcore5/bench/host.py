"""`fastcore5 bench --host` (`python -m bench --host`): what each public entry point costs the
host, next to eager PyTorch.

Every entry is called on tiny tensors, so the time per call is host work: argument checks,
backend choice, autograd, allocation, the launcher's Python and the launch itself. Without a
GPU the Triton kernels are reached through TRITON_INTERPRET=1 (which the runner sets when it
starts this module's process: importing the fastcore5 package imports triton, which reads it
once) with the interpreter's launch replaced by a no-op: the measurement then stops where a
GPU launch would start, and Triton's own launch path is not included. On a GPU the launches
are real (tiny tensors, so the device never holds the host back).

The eager equivalent runs on the same tensors: ``F.relu(F.linear(...))``, the nn.Embedding
formula of fastai's EmbeddingDotBias, and torch.optim.SGD with foreach and with fused.

Timing: fastcore5's callable and its eager equivalent run in alternating rounds of ``calls``
calls each, so both see the same machine; the ratio is the median over rounds of the two rounds'
ratio, and each time per call the best round's mean. On the 2-core CPU machine, separate
best-of-7 timings of the same callable differed by 2x between two rows of one run (other
virtual machines' load comes and goes); the paired median moved by a few percent. On CPU in
process time.
Targets (the hot-path issue): forward and forward+backward at most 1.5x eager; SGD at most torch
fused's time at 161 tensors and at most 0.3x at 2000 tensors (normal mode).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .._output_paths import OutputPathError, writable_file
from .table import host_table, quartiles

FORWARD_TARGET = 1.5
SGD_TARGETS = {161: 1.0, 2000: 0.3}


def _prepare_stubbed_launches() -> None:
    """CPU: route Triton kernels through the interpreter and make its launch a no-op. Must run
    before triton is first imported (TRITON_INTERPRET is read at import)."""
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "without a GPU, fastcore5.bench.host needs TRITON_INTERPRET=1 from the start of its process (triton reads "
            "it once, at import): run `fastcore5 bench --host`, which sets it"
        )
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ.pop("FASTCORE5_POISON", None)  # poisoning is a test aid, not part of the hot path
    from triton.runtime.interpreter import InterpretedFunction

    InterpretedFunction.run = lambda self, *args, **kwargs: None


def _timer(device: str):
    import torch

    if device == "cuda":
        def clock():
            torch.cuda.synchronize()
            return time.perf_counter()

        return clock
    return time.process_time


def paired_us(ours, eager, clock, calls: int, rounds: int) -> tuple[float, float, list[float]]:
    """(ours us per call, eager us per call, ratio quartiles): the best round of each, and the
    quartiles of the per-round ratios (the median is the ratio), from alternating rounds (module
    docstring)."""
    for fn in (ours, eager):
        for _ in range(max(calls // 10, 5)):
            fn()
    ours_us, eager_us, ratios = [], [], []
    for _ in range(rounds):
        for fn, results in ((ours, ours_us), (eager, eager_us)):
            start = clock()
            for _ in range(calls):
                fn()
            results.append((clock() - start) / calls * 1e6)
        ratios.append(ours_us[-1] / eager_us[-1])
    return min(ours_us), min(eager_us), quartiles(ratios)


def _forward_backward(fn, inputs, grad):
    """A callable running fn(*inputs).backward(grad) and dropping the gradients it made."""
    def run():
        fn(*inputs).backward(grad)
        for t in inputs:
            t.grad = None

    return run


def _linear_cases(device, torch, F, fastcore5):
    x = torch.randn(4, 8, device=device)
    weight, bias = torch.randn(16, 8, device=device), torch.randn(16, device=device)
    params = [t.clone().requires_grad_() for t in (x, weight, bias)]
    grad = torch.ones(4, 16, device=device)

    def fwd_bwd(fn):
        return _forward_backward(fn, params, grad)

    def eager(x, w, b):
        return F.relu(F.linear(x, w, b))

    return [
        ("linear_relu", "forward", lambda: fastcore5.linear_relu(x, weight, bias), lambda: eager(x, weight, bias),
         "F.relu(F.linear(x, w, b))"),
        ("linear_relu", "forward+backward", fwd_bwd(fastcore5.linear_relu), fwd_bwd(eager),
         "F.relu(F.linear(x, w, b)).backward(g)"),
    ]


def _embedding_cases(device, torch, F, fastcore5):
    n_users, n_items, factors, batch = 50, 60, 8, 32
    users = torch.randint(0, n_users, (batch,), device=device)
    items = torch.randint(0, n_items, (batch,), device=device)
    shapes = ((n_users, factors), (n_items, factors), (n_users, 1), (n_items, 1))
    tables = [torch.randn(shape, device=device) * 0.01 for shape in shapes]
    trained = [t.clone().requires_grad_() for t in tables]
    grad = torch.ones(batch, device=device)

    def eager(u_weight, i_weight, u_bias, i_bias):
        dot = F.embedding(users, u_weight) * F.embedding(items, i_weight)
        res = dot.sum(1) + F.embedding(users, u_bias).squeeze(-1) + F.embedding(items, i_bias).squeeze(-1)
        return torch.sigmoid(res) * 5.5

    def ours(*tables):
        return fastcore5.embedding_dot_bias(users, items, *tables, y_range=(0.0, 5.5), validate="device")

    def fwd_bwd(fn):
        return _forward_backward(fn, trained, grad)

    return [
        ("embedding_dot_bias", "forward", lambda: ours(*tables), lambda: eager(*tables),
         "sigmoid((emb(u,U)*emb(i,V)).sum(1) + emb(u,ub) + emb(i,ib)) * 5.5"),
        ("embedding_dot_bias", "forward+backward", fwd_bwd(ours), fwd_bwd(eager), "the same, .backward(g)"),
    ]


def _sgd_cases(device, torch, fastcore5):
    cases = []
    for count in SGD_TARGETS:
        def make_params():
            params = [torch.randn(16, device=device, requires_grad=True) for _ in range(count)]
            for p in params:
                p.grad = torch.randn(16, device=device)
            return params

        hyper = dict(lr=0.01, momentum=0.9, weight_decay=1e-4)
        torch_params = make_params()
        fused = torch.optim.SGD(torch_params, fused=True, **hyper)
        foreach = torch.optim.SGD(torch_params, foreach=True, **hyper)
        for contiguous in (False, True):
            params = make_params()
            ours = fastcore5.optim.SGD(params, contiguous=contiguous, **hyper)
            if contiguous:
                # A backward accumulates into the flat gradient buffer, bumping its version; the
                # step's O(1) check for "the .grad tensors are still the flat views" reads it.
                def step(grad=params[0].grad, bump=torch.autograd.graph.increment_version, ours=ours):
                    bump(grad)
                    ours.step()
            else:
                step = ours.step
            mode = "contiguous" if contiguous else "normal"
            cases.append(("sgd", f"step, {count} tensors, {mode}", step, fused.step, "torch.optim.SGD(fused=True)"))
            cases.append(("sgd", f"step, {count} tensors, {mode}", step, foreach.step, "torch.optim.SGD(foreach=True)"))
    return cases


def _target(op: str, entry: str, eager: str) -> float | None:
    if op != "sgd":
        return FORWARD_TARGET
    if "fused" not in eager or "normal" not in entry:
        return None
    return SGD_TARGETS[int(entry.split()[1])]


def measure(calls: int = 500, rounds: int = 21) -> dict:
    """Every entry point's host time and its eager equivalent's, as a JSON-ready dict."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        _prepare_stubbed_launches()
    import torch.nn.functional as F

    import fastcore5
    import fastcore5.optim

    backend = fastcore5.backends.select("linear_relu", device, torch.float32)
    clock = _timer(device)
    rows = []
    for op, entry, ours, eager, eager_text in (
        _linear_cases(device, torch, F, fastcore5) + _embedding_cases(device, torch, F, fastcore5)
        + _sgd_cases(device, torch, fastcore5)
    ):
        n = calls if op != "sgd" else max(calls // 20, 20)
        fastcore5_us, eager_us, ratio_quartiles = paired_us(ours, eager, clock, n, rounds)
        ratio = ratio_quartiles[1]
        target = _target(op, entry, eager_text)
        rows.append({
            "op": op, "entry": entry, "fastcore5_us": round(fastcore5_us, 2), "eager_us": round(eager_us, 2),
            "eager": eager_text, "ratio": round(ratio, 3), "ratio_quartiles": [round(q, 3) for q in ratio_quartiles],
            "target_ratio": target,
            "meets_target": None if target is None else ratio <= target,
        })
    from .run_record import environment

    return {
        **environment(device),
        "device": device,
        "backend": backend,
        "launches": (
            "real, tiny tensors" if device == "cuda"
            else "C++ CPU kernels, real, tiny tensors" if backend == "cpu"
            else "Triton interpreter launch stubbed out (no-op)"
        ),
        "clock": "perf_counter + cuda.synchronize" if device == "cuda" else "process_time",
        "torch": torch.__version__,
        "calls_per_round": calls,
        "rounds": rounds,
        "cases": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench --host", description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--calls", type=int, default=500, help="calls per round (SGD: a twentieth of it, at least 20)")
    parser.add_argument("--rounds", type=int, default=21, help="alternating rounds per pair of callables")
    parser.add_argument("--check", action="store_true", help="exit 1 when a row misses its target")
    args = parser.parse_args(argv)
    try:
        json_path = writable_file(args.json, "--json") if args.json is not None else None
    except OutputPathError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    report = measure(args.calls, args.rounds)
    print(host_table(report))
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=1))
        print(f"JSON: {json_path.resolve()}")
    missed = [row for row in report["cases"] if row["meets_target"] is False]
    if missed:
        print(f"{len(missed)} row(s) missed a target (MISS)" + ("" if args.check else "; --check would exit 1"),
              file=sys.stderr if args.check else sys.stdout)
    return 1 if missed and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
