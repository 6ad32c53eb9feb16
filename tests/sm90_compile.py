"""Compile every Triton kernel for Hopper (sm_90) on a machine without a GPU.

Run as a script in a process WITHOUT TRITON_INTERPRET (the test suite starts it in a subprocess,
tests/test_triton_sm90_compile.py). It calls the real launchers with CPU tensors, but patches
Triton's launch path so that, instead of running, each launch is compiled to a cubin for
sm_90 — for every autotune config the launcher would try. That catches what the interpreter
cannot: type errors of the compiled language, unsupported dot shapes, and configs whose shared
memory does not fit a Hopper SM. Prints one JSON line per compiled (kernel, config).

Usage: python tests/sm90_compile.py [--all-configs] [OP ...]   (default: every op in LAUNCHES)
"""
from __future__ import annotations

import json
import os
import re
import sys
import time

import torch
import triton
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction, native_specialize_impl

HOPPER = GPUTarget("cuda", 90, 32)
HOPPER_SHARED_MEMORY_PER_BLOCK = 232448  # bytes an H100/H200 block may opt into
_OPTION_NAMES = ("num_warps", "num_stages", "num_ctas", "maxnreg")
ALL_CONFIGS = "--all-configs" in sys.argv
results: list[dict] = []
_seen: set[str] = set()


def compile_launch(jit_fn: JITFunction, args: tuple, kwargs: dict) -> dict:
    """Compile one launch of ``jit_fn`` with these arguments for sm_90; return its facts."""
    options = {name: kwargs.pop(name) for name in _OPTION_NAMES if name in kwargs}
    kwargs.pop("grid", None)
    kwargs.pop("warmup", None)
    bound = dict(zip(jit_fn.arg_names, args))
    bound.update(kwargs)
    # Specialise exactly as Triton's JIT would at launch: ints equal to 1 become constants,
    # 16-divisible ints and 16-byte-aligned pointers get tt.divisibility. Without this the
    # compiler cannot vectorise or pipeline the loads and the result says nothing about the
    # kernel a GPU would run.
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(jit_fn.params):
        value = bound[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[(index,)] = value
            continue
        kind, key = native_specialize_impl(
            CUDABackend, value, param.is_const, not param.do_not_specialize, not param.do_not_specialize_on_alignment
        )
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[(index,)] = key
        elif key is not None and BaseBackend.parse_attr(key):
            attrs[(index,)] = BaseBackend.parse_attr(key)
    identity = json.dumps([jit_fn.__name__, signature, sorted((k[0], str(v)) for k, v in constexprs.items()), options])
    if identity in _seen:
        return None
    _seen.add(identity)
    start = time.perf_counter()
    source = ASTSource(fn=jit_fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=HOPPER, options=options)
    shared = compiled.metadata.shared
    return {
        "kernel": jit_fn.__name__,
        "signature": ",".join(signature.values()),
        "constexprs": {jit_fn.arg_names[i[0]]: str(v) for i, v in constexprs.items()},
        "options": options,
        "shared_bytes": shared,
        "fits_hopper": shared <= HOPPER_SHARED_MEMORY_PER_BLOCK,
        "global_memory_ops": sorted(set(re.findall(r"(?:ld|st)\.global[\w.]*", compiled.asm["ptx"]))),
        # what the TTGIR says about the GEMM's shape on Hopper: wgmma, operand copies issued
        # asynchronously (cp.async or TMA) and so pipelined across K iterations
        "wgmma": "warp_group_dot" in compiled.asm["ttgir"],
        "async_copies": len(re.findall(r"async_copy_global_to_local|async_tma_copy_global_to_local", compiled.asm["ttgir"])),
        "tma": "async_tma_copy_global_to_local" in compiled.asm["ttgir"],
        # the PTX of TMA kernels: bulk tensor copies, wgmma, and how many shared-memory buffers
        # the deepest multi-buffered operand has (>= 2: loads run ahead of the dots)
        "ptx_bulk_tensor_copies": compiled.asm["ptx"].count("cp.async.bulk.tensor"),
        "ptx_wgmma": compiled.asm["ptx"].count("wgmma.mma_async"),
        "operand_buffers": max(map(int, re.findall(r"local_alloc : \(\) -> !ttg\.memdesc<(\d+)x\d+x\d+x", compiled.asm["ttgir"])), default=1),
        "seconds": round(time.perf_counter() - start, 2),
    }


def _record(row: dict | None) -> None:
    if row is not None:
        results.append(row)


def _jit_run(self, *args, **kwargs):
    _record(compile_launch(self, args, dict(kwargs)))


def _configs_to_compile(configs: list) -> list:
    # By default the largest and the smallest config: enough to catch language errors and
    # shared-memory overflow in CI time; --all-configs compiles every one.
    return configs if ALL_CONFIGS else [configs[0], configs[-1]]


def _compile_candidates(runs: dict) -> dict:
    """Stands in for kernels/_tuning.benchmark: each candidate launch compiles (JITFunction.run
    is patched) instead of being timed; every candidate then counts as equally fast."""
    for config in _configs_to_compile(list(runs)):
        runs[config]()
    return {config: 0.0 for config in runs}


def _autotuner_run(self, *args, **kwargs):
    configs = _configs_to_compile(self.configs)
    for config in dict.fromkeys(configs):
        launch = dict(kwargs)
        launch.update(config.all_kwargs())
        _record(compile_launch(self.fn, args, launch))


def _linear_relu_launches():
    from fastcore5.kernels import linear_relu as k

    # Benchmark-like sizes (multiples of 16, as the large shapes are) so the compile sees the
    # same specialisation, hence the same pipelining, as the benchmark launches.
    M, K, N = 512, 256, 128
    for dtype, tf32 in ((torch.bfloat16, False), (torch.float32, True)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        x, w, b = torch.randn(M, K, dtype=dtype), torch.randn(N, K, dtype=dtype), torch.randn(N, dtype=dtype)
        out = k.linear_relu_forward(x, w, b)
        k.linear_relu_backward(torch.randn(M, N, dtype=dtype), out, x, w, True, True, True)
    x, w = torch.randn(M, K, dtype=torch.float16), torch.randn(N, K, dtype=torch.float16)
    out = k.linear_relu_forward(x, w, None)
    k.linear_relu_backward(torch.randn(M, N, dtype=torch.float16), out, None, None, False, False, True)
    torch.backends.cuda.matmul.allow_tf32 = False


def _linear_relu_hopper_launches():
    from fastcore5.kernels import linear_relu_hopper as k

    # called directly: forward_eligible is false for CPU tensors, which is all this script has
    M, K, N = 512, 256, 384
    for dtype, tf32 in ((torch.bfloat16, False), (torch.float16, False), (torch.float32, True)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        x, w, b = torch.randn(M, K, dtype=dtype), torch.randn(N, K, dtype=dtype), torch.randn(N, dtype=dtype)
        out = k.forward(x, w, b)
        # fp16 without grad_b: the grad_W kernel's variant without the bias sum
        k.backward(torch.randn(M, N, dtype=dtype), out, x, w, True, True, dtype != torch.float16)
    torch.backends.cuda.matmul.allow_tf32 = False


def _embedding_dot_bias_launches():
    from fastcore5.index_errors import SLOTS
    from fastcore5.kernels import embedding_dot_bias as k

    n_users, n_items, factors, batch = 1024, 512, 64, 4096
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        U, V = torch.randn(n_users, factors, dtype=dtype), torch.randn(n_items, factors, dtype=dtype)
        ub, ib = torch.randn(n_users, 1, dtype=dtype), torch.randn(n_items, 1, dtype=dtype)
        users = torch.randint(0, n_users, (batch,))
        items = torch.randint(0, n_items, (batch,), dtype=torch.int32)
        grad = torch.randn(batch, dtype=dtype)
        for y_range in ((None, None), (0.0, 5.5)):
            for index_errors in (None, torch.zeros(SLOTS, dtype=torch.int64)):
                k.embedding_dot_bias_forward(users, items, U, V, ub, ib, *y_range, index_errors)
            for deterministic, sparse in ((False, False), (True, False), (False, True)):
                k.embedding_dot_bias_backward(
                    grad, users, items, U, V, ub, ib, n_users, n_items, *y_range, True, True, True, True, deterministic, sparse
                )


def _sgd_launches():
    from fastcore5.kernels.sgd import sgd_step

    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        params = [torch.randn(5000).to(dtype), torch.randn(64).to(dtype)]
        grads, buffers = [torch.randn_like(p) for p in params], [torch.randn_like(p) for p in params]
        sgd_step(params, grads, buffers, None, 0.1, 0.9, 0.0, 0.01, False, False, False, False, None, None, None)
        if dtype == torch.float32:
            sgd_step(params, grads, buffers, torch.tensor(0.1), 0.0, 0.9, 0.1, 0.01, True, True, True, True,
                     torch.tensor(2.0), torch.tensor(0.0), torch.zeros(9, dtype=torch.int64))


# op name -> a function that calls that op's launchers at representative dtypes and flags
def _mlp_launches():
    from fastcore5.kernels import mlp as k

    M, K, N = 512, 256, 128  # 16-divisible like the benchmark shapes: the same specialisation
    for dtype, tf32 in ((torch.bfloat16, False), (torch.float32, True)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        x, w, b, g = (torch.randn(*s, dtype=dtype) for s in ((M, K), (N, K), (N,), (M, N)))
        k.linear_forward(x, w, b)
        k.grad_input(g, w, x)
        k.grad_weight(g, x, True, True)
    torch.backends.cuda.matmul.allow_tf32 = False


LAUNCHES = {
    "linear_relu": _linear_relu_launches,
    "linear_relu_hopper": _linear_relu_hopper_launches,
    "mlp": _mlp_launches,
    "embedding_dot_bias": _embedding_dot_bias_launches,
    "sgd": _sgd_launches,
}


def main(ops: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("run without TRITON_INTERPRET=1: this compiles the real kernels")
    from fastcore5.kernels import _tuning

    JITFunction.run = _jit_run
    Autotuner.run = _autotuner_run
    _tuning.benchmark = _compile_candidates
    for op in ops:
        LAUNCHES[op]()
    for row in results:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main([a for a in sys.argv[1:] if not a.startswith("--")] or list(LAUNCHES)))
