"""Compile every kernel of fastcore5 for the GPUs it ships to, on a machine without a GPU.

Triton part: the real launchers are called with CPU tensors in a process without
TRITON_INTERPRET, with Triton's launch replaced by a compile (``triton.compile`` of an
``ASTSource`` for a ``GPUTarget``; the ptxas that does the last step ships in the triton wheel).
A tuned launcher's choice is replaced by "compile every candidate and the default": the
candidates are what autotuning may pick, the default is what it launches with FASTCORE5_TUNING=off,
during CUDA-graph capture and under torch.compile (kernels/_tuning.py, kernels/gemm_launch.py).
Every dtype an op accepts is compiled (fp32 with TF32 on and off, fp16, bf16, fp64 where the op
takes it) and the EmbeddingDotBias kernels with int32 and int64 indices.

CUDA C++ part (``--cuda``): every csrc/*.cu and *.cpp compiled by nvcc with one ``-gencode`` per
arch, against the installed torch's headers; ptxas's resource usage of every kernel is reported.

Output: one JSON line per compiled (kernel, config, dtype, arch) on stdout (shared memory,
registers, spill bytes, which role the config plays), then a summary on stderr. Exit 1 when a
kernel fails to compile, a config needs more shared memory than the card has, a default config
spills registers, or a @triton.jit kernel of the checked modules was reached by no launch.

    python scripts/compile_check.py --arch 80,86,89,90 [--all-configs] [--ops linear_relu,sgd] [--cuda]

Without --all-configs each tuned launcher compiles its default and its first and last candidate
(what CI runs); with it, every candidate.
"""
from __future__ import annotations

import argparse
import ast
import concurrent.futures
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
from fastcore5.kernels._common import SHARED_MEMORY_PER_BLOCK as SHARED_MEMORY_LIMIT  # noqa: E402

OPS = ("linear_relu", "mlp", "linear_relu_hopper", "embedding_dot_bias", "sgd")
# The modules each op's kernels live in: every @triton.jit entry point defined there must compile.
OP_MODULES = {
    "linear_relu": ("linear_relu",),
    "mlp": ("mlp",),
    "linear_relu_hopper": ("linear_relu_hopper_kernels",),
    "embedding_dot_bias": ("embedding_dot_bias_kernels", "segment_reduce"),
    "sgd": ("sgd_kernel",),
}
HOPPER_ONLY = {"linear_relu_hopper"}  # TMA and wgmma: launched on sm_90 and newer only


# ---------------------------------------------------------------------------------------------
# Worker: one process per arch compiles what the launchers launch.

class Compiler:
    """Replaces Triton's launch by a compile for one target and records one row per compile."""

    _OPTION_NAMES = ("num_warps", "num_stages", "num_ctas", "maxnreg")

    def __init__(self, arch: int):
        import triton
        from triton.backends.compiler import GPUTarget

        self.arch = arch
        self.target = GPUTarget("cuda", arch, 32)
        self.limit = SHARED_MEMORY_LIMIT[arch]
        self.context = {"dtype": None, "index": None, "role": "fixed"}
        self.rows: list[dict] = []
        self._seen: dict[str, dict] = {}
        self.triton_version = triton.__version__

    def compile_launch(self, jit_fn, args: tuple, kwargs: dict) -> None:
        import triton
        from triton.backends.compiler import BaseBackend
        from triton.backends.nvidia.compiler import CUDABackend
        from triton.compiler import ASTSource
        from triton.runtime.jit import native_specialize_impl

        options = {name: kwargs.pop(name) for name in self._OPTION_NAMES if name in kwargs}
        for launch_only in ("grid", "warmup", "stream"):
            kwargs.pop(launch_only, None)
        bound = dict(zip(jit_fn.arg_names, args))
        bound.update(kwargs)
        # Specialise as Triton's JIT does at launch (ints equal to 1 become constants, 16-divisible
        # ints and 16-byte aligned pointers get divisibility hints): the same code a GPU would run.
        signature, constexprs, attrs = {}, {}, {}
        for index, param in enumerate(jit_fn.params):
            value = bound[param.name]
            if param.is_constexpr:
                signature[param.name] = "constexpr"
                constexprs[(index,)] = value
                continue
            kind, key = native_specialize_impl(
                CUDABackend, value, param.is_const, not param.do_not_specialize,
                not param.do_not_specialize_on_alignment,
            )
            signature[param.name] = kind
            if kind == "constexpr":
                constexprs[(index,)] = key
            elif key is not None and BaseBackend.parse_attr(key):
                attrs[(index,)] = BaseBackend.parse_attr(key)
        named = {jit_fn.arg_names[i[0]]: str(v) for i, v in constexprs.items()}
        identity = json.dumps([jit_fn.__name__, signature, sorted(named.items()), sorted(options.items())])
        seen = self._seen.get(identity)
        if seen is not None:
            if self.context["role"] not in seen["roles"]:
                seen["roles"].append(self.context["role"])
            return
        row = {
            "kernel": jit_fn.__name__, "arch": f"sm_{self.arch}", "triton": self.triton_version,
            "dtype": self.context["dtype"], "index_dtype": self.context["index"],
            "roles": [self.context["role"]],
            "config": {k: v for k, v in named.items() if k.startswith(("BLOCK", "GROUP", "TILE"))} | options,
            "constexprs": named, "options": options,
            "signature": ",".join(v for v in signature.values() if v != "constexpr"),
        }
        self._seen[identity] = row
        self.rows.append(row)
        start = time.perf_counter()
        log = io.StringIO()
        try:
            # ptxas -v's report (registers, spills) is printed by Triton when dump_ptxas_log is on;
            # the worker's private cache directory makes every compile run ptxas.
            with contextlib.redirect_stdout(log):
                compiled = triton.compile(
                    ASTSource(fn=jit_fn, signature=signature, constexprs=constexprs, attrs=attrs),
                    target=self.target, options=options,
                )
        except Exception as err:  # every compile error is a row of the report, and a failure
            row["error"] = f"{type(err).__name__}: {str(err).strip()[-1500:]}"
            row["seconds"] = round(time.perf_counter() - start, 2)
            return
        row["shared_bytes"] = compiled.metadata.shared
        row["shared_limit"] = self.limit
        row["fits"] = compiled.metadata.shared <= self.limit
        row.update(_ptxas_usage(log.getvalue()))
        row.update(_code_facts(compiled.asm["ttgir"], compiled.asm["ptx"]))
        row["seconds"] = round(time.perf_counter() - start, 2)


def _ptxas_usage(log: str) -> dict:
    """Registers and spill bytes from ptxas -v's report of the (one) kernel compiled."""
    registers = re.findall(r"Used (\d+) registers", log)
    stores = re.findall(r"(\d+) bytes spill stores", log)
    loads = re.findall(r"(\d+) bytes spill loads", log)
    if not registers:
        return {"registers": None, "spill_stores": None, "spill_loads": None}
    return {"registers": int(registers[-1]), "spill_stores": int(stores[-1]) if stores else 0,
            "spill_loads": int(loads[-1]) if loads else 0}


def _code_facts(ttgir: str, ptx: str) -> dict:
    """What the generated code says about memory access and the GEMMs' shape: vector widths of
    global loads/stores, wgmma (Hopper's warpgroup dot), operand copies issued asynchronously
    (cp.async or TMA, so pipelined across K), and the deepest operand's buffer count."""
    return {
        "global_memory_ops": sorted(set(re.findall(r"(?:ld|st)\.global[\w.]*", ptx))),
        "wgmma": "warp_group_dot" in ttgir,
        "async_copies": len(re.findall(r"async_copy_global_to_local|async_tma_copy_global_to_local", ttgir)),
        "tma": "async_tma_copy_global_to_local" in ttgir,
        "ptx_bulk_tensor_copies": ptx.count("cp.async.bulk.tensor"),
        "ptx_wgmma": ptx.count("wgmma.mma_async"),
        "operand_buffers": max(map(int, re.findall(r"local_alloc : \(\) -> !ttg\.memdesc<(\d+)x\d+x\d+x", ttgir)),
                               default=1),
    }


def _patch(compiler: Compiler, configs: str) -> None:
    """Route every launch to ``compiler``: plain launches, and the tuned launchers' choice."""
    from triton.runtime.jit import JITFunction

    from fastcore5.kernels import _common, _tuning

    def run(self, *args, **kwargs):
        compiler.compile_launch(self, args, dict(kwargs))

    def choose(self, bucket, device_name, runs):
        candidates = self.candidates(bucket)
        picked = {"all": candidates, "ends": list(dict.fromkeys([candidates[0], candidates[-1]])), "none": []}[configs]
        for config in picked:
            with _role(compiler, "candidate"):
                runs(config)()
        # the default: FASTCORE5_TUNING=off, CUDA-graph capture, torch.compile
        default = self.default_for(bucket)
        with _role(compiler, "default"):
            runs(default)()
        self.chosen[(bucket, device_name)] = {"config": default, "source": "compile check", "ms": None}
        return default

    JITFunction.run = run
    _tuning.TunedKernel.choose = choose
    _common.set_compile_target(compiler.arch)


@contextlib.contextmanager
def _role(compiler: Compiler, role: str):
    previous = compiler.context["role"]
    compiler.context["role"] = role
    try:
        yield
    finally:
        compiler.context["role"] = previous


@contextlib.contextmanager
def _case(compiler: Compiler, dtype: str, index: str | None = None):
    compiler.context.update(dtype=dtype, index=index)
    yield


# The float dtypes and their labels; fp32 twice, with TF32 on and off (the GEMMs' dot precision).
def _float_cases():
    import torch

    return [("fp32-tf32", torch.float32, True), ("fp32", torch.float32, False), ("fp16", torch.float16, False),
            ("bf16", torch.bfloat16, False), ("fp64", torch.float64, False)]


def _set_tf32(on: bool) -> None:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = on


# Sizes: 16-divisible like the benchmark shapes (the same specialisation, hence pipelining), and at
# least as large as the largest tile, so that no candidate is pruned for the problem's size.
GEMM_M, GEMM_K, GEMM_N = 512, 256, 384


def _linear_relu_launches(compiler: Compiler) -> None:
    import torch

    from fastcore5.kernels import linear_relu as k

    M, K, N = GEMM_M, GEMM_K, GEMM_N
    for label, dtype, tf32 in _float_cases():
        _set_tf32(tf32)
        with _case(compiler, label):
            x, w, b = torch.randn(M, K, dtype=dtype), torch.randn(N, K, dtype=dtype), torch.randn(N, dtype=dtype)
            out = k.linear_relu_forward(x, w, b)
            k.linear_relu_forward(x, w, None)
            grad = torch.randn(M, N, dtype=dtype)
            k.linear_relu_backward(grad, out, x, w, True, True, True)
            k.linear_relu_backward(grad, out, x, w, False, True, False)
            k.linear_relu_backward(grad, out, None, None, False, False, True)  # the bias-only launch
    _set_tf32(False)


def _mlp_launches(compiler: Compiler) -> None:
    import torch

    from fastcore5.kernels import mlp as k

    M, K, N = GEMM_M, GEMM_K, GEMM_N
    for label, dtype, tf32 in _float_cases():
        _set_tf32(tf32)
        with _case(compiler, label):
            x, w, b, g = (torch.randn(*s, dtype=dtype) for s in ((M, K), (N, K), (N,), (M, N)))
            k.linear_forward(x, w, b)
            k.linear_forward(x, w, None)
            k.grad_input(g, w, x)
            k.grad_input(g, w, None)
            k.grad_weight(g, x, True, True)
            k.grad_weight(g, x, True, False)
    _set_tf32(False)


def _linear_relu_hopper_launches(compiler: Compiler) -> None:
    """The TMA kernels, reached as a GPU reaches them: through Linear+ReLU's and the MLP's
    launchers (torch.compile's opaque TMA ops call the same ones), with the one kernel choice
    (linear_relu_hopper.takes_tma) told that the CPU tensors sit on this arch and that no product
    is too small. Every variant the choice can send to a TMA kernel is compiled; what it keeps on
    the portable kernels (fp32 without TF32, fp64, the bias-only gradient) recompiles nothing."""
    from fastcore5.kernels import linear_relu_hopper as k

    real = k.device_capability, k.MIN_MACS
    k.device_capability, k.MIN_MACS = (lambda t: divmod(compiler.arch, 10)), 1
    try:
        _linear_relu_launches(compiler)
        _mlp_launches(compiler)
    finally:
        k.device_capability, k.MIN_MACS = real


def _embedding_dot_bias_launches(compiler: Compiler) -> None:
    import torch

    from fastcore5.index_errors import SLOTS
    from fastcore5.kernels import embedding_dot_bias as k

    n_users, n_items, factors, batch = 1024, 512, 64, 4096
    for label, dtype, _ in _float_cases():
        if label == "fp32-tf32":
            continue  # no dot products on tensor cores here: TF32 changes nothing
        for index_dtype in (torch.int32, torch.int64):
            with _case(compiler, label, str(index_dtype).replace("torch.", "")):
                U, V = torch.randn(n_users, factors, dtype=dtype), torch.randn(n_items, factors, dtype=dtype)
                ub, ib = torch.randn(n_users, 1, dtype=dtype), torch.randn(n_items, 1, dtype=dtype)
                users = torch.randint(0, n_users, (batch,), dtype=index_dtype)
                items = torch.randint(0, n_items, (batch,), dtype=index_dtype)
                grad = torch.randn(batch, dtype=dtype)
                for y_range in ((None, None), (0.0, 5.5)):
                    for index_errors in (None, torch.zeros(SLOTS, dtype=torch.int64)):
                        k.embedding_dot_bias_forward(users, items, U, V, ub, ib, *y_range, index_errors)
                    for deterministic, sparse in ((False, False), (True, False), (False, True)):
                        k.embedding_dot_bias_backward(
                            grad, users, items, U, V, ub, ib, n_users, n_items, *y_range,
                            True, True, True, True, deterministic, sparse,
                        )
                    # biases only: the segment reduction without its weight loop
                    k.embedding_dot_bias_backward(
                        grad, users, items, U, V, ub, ib, n_users, n_items, *y_range,
                        False, False, True, True, True, False,
                    )


def _sgd_launches(compiler: Compiler) -> None:
    import torch

    from fastcore5.kernels.sgd import sgd_step

    for label, dtype, _ in _float_cases():
        if label == "fp32-tf32":
            continue
        with _case(compiler, label):
            params = [torch.randn(5000).to(dtype), torch.randn(64).to(dtype)]
            grads, buffers = [torch.randn_like(p) for p in params], [torch.randn_like(p) for p in params]
            sgd_step(params, grads, buffers, None, 0.1, 0.9, 0.0, 0.01, False, False, False, False, None, None, None)
            sgd_step(params, grads, buffers, torch.tensor(0.1), 0.0, 0.9, 0.1, 0.01, True, True, True, True,
                     torch.tensor(2.0), torch.tensor(0.0), torch.zeros(9, dtype=torch.int64))


LAUNCHES = {
    "linear_relu": _linear_relu_launches,
    "mlp": _mlp_launches,
    "linear_relu_hopper": _linear_relu_hopper_launches,
    "embedding_dot_bias": _embedding_dot_bias_launches,
    "sgd": _sgd_launches,
}


def worker(arch: int, ops: list[str], configs: str) -> list[dict]:
    """Compile the launches of ``ops`` for ``arch``; one row per compile. ``configs``: which
    candidates of a tuned launcher besides its default: "all", "ends" (first and last), "none"."""
    compiler = Compiler(arch)
    _patch(compiler, configs)
    for op in ops:
        if op in HOPPER_ONLY and arch < 90:
            continue
        try:
            LAUNCHES[op](compiler)
        except Exception as err:  # a launcher that raised before compiling: a failure row
            compiler.rows.append({"kernel": f"<launcher of {op}>", "arch": f"sm_{arch}",
                                  "triton": compiler.triton_version, "dtype": compiler.context["dtype"],
                                  "error": f"{type(err).__name__}: {err}"})
    return compiler.rows


# ---------------------------------------------------------------------------------------------
# The kernels that must be reached, and the verdict.

def entry_kernels(ops: list[str]) -> dict[str, str]:
    """kernel name -> module, for every @triton.jit function defined in ``ops``' modules that no
    @triton.jit function of kernels/ calls (a kernel, not a helper); read from the sources."""
    kernels_dir = ROOT / "kernels"
    defined: dict[str, str] = {}
    called: set[str] = set()
    for path in sorted(kernels_dir.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and any(_is_triton_jit(d) for d in node.decorator_list):
                defined.setdefault(node.name, path.stem)
                for inner in ast.walk(node):
                    if isinstance(inner, ast.Call):
                        target = inner.func
                        called.add(target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", ""))
    modules = {m for op in ops for m in OP_MODULES[op]}
    return {name: module for name, module in defined.items() if module in modules and name not in called}


def _is_triton_jit(decorator: ast.expr) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return isinstance(target, ast.Attribute) and target.attr == "jit"


def failures(rows: list[dict], entries: dict[str, str], arches: list[int]) -> list[str]:
    problems = []
    for row in rows:
        where = f"{row['kernel']} {row['arch']} {row.get('dtype')} {row.get('index_dtype') or ''} {row.get('config', '')}"
        if "error" in row:
            problems.append(f"does not compile: {where}: {row['error'].splitlines()[0] if row['error'] else ''}")
        elif row["shared_bytes"] > row["shared_limit"]:
            problems.append(f"needs {row['shared_bytes']} bytes of shared memory, the card has {row['shared_limit']}: "
                            f"{where} (roles {row['roles']})")
        elif "default" in row["roles"] and row.get("spill_stores"):
            problems.append(f"default config spills {row['spill_stores']} bytes ({row['registers']} registers): {where}")
    reached = {row["kernel"] for row in rows if "error" not in row}
    for name, module in sorted(entries.items()):
        if module in {m for op in HOPPER_ONLY for m in OP_MODULES[op]} and max(arches) < 90:
            continue
        if name not in reached:
            problems.append(f"@triton.jit kernel {module}.{name} was reached by no launch")
    return problems


def summary(rows: list[dict], problems: list[str]) -> str:
    lines = []
    by_kernel: dict[tuple, list[dict]] = {}
    for row in rows:
        by_kernel.setdefault((row["kernel"], row["arch"]), []).append(row)
    lines.append(f"{'kernel':48} {'arch':6} {'compiles':>8} {'max shared':>10} {'max regs':>8} "
                 f"{'spilling':>8} {'default spills':>14}")
    for (kernel, arch), group in sorted(by_kernel.items()):
        ok = [r for r in group if "error" not in r]
        shared = max((r["shared_bytes"] for r in ok), default=0)
        regs = max((r["registers"] or 0 for r in ok), default=0)
        spilling = sum(1 for r in ok if r.get("spill_stores"))
        default_spills = sum(1 for r in ok if r.get("spill_stores") and "default" in r["roles"])
        lines.append(f"{kernel:48} {arch:6} {len(group):>8} {shared:>10} {regs:>8} {spilling:>8} {default_spills:>14}")
    lines.append(f"{len(rows)} compiles, {len(problems)} problems")
    lines.extend(f"FAIL {p}" for p in problems)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# CUDA C++: csrc/ through nvcc, one -gencode per arch.

def nvcc_path() -> str | None:
    import shutil

    found = shutil.which("nvcc")
    if found:
        return found
    for candidate in (os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"):
        path = Path(candidate, "bin", "nvcc")
        if candidate and path.is_file():
            return str(path)
    return None


def cublaslt_include(nvcc: str) -> str | None:
    """The directory holding cublasLt.h: the toolkit's, else the nvidia-cublas wheel's."""
    roots = [Path(nvcc).resolve().parent.parent]
    try:
        import nvidia

        roots += [sub for base in nvidia.__path__ for sub in sorted(Path(base).iterdir())]
    except ImportError:
        pass
    for root in roots:
        if (root / "include" / "cublasLt.h").is_file():
            return str(root / "include")
    return None


def nvcc_flags(arches: list[int]) -> list[str]:
    """What the GPU build passes nvcc (torch's standard and common flags), one -gencode per arch,
    the CPU torch wheel's headers (which lack the generated CUDA cmake macros)."""
    import sysconfig

    from torch.utils import cpp_extension

    nvcc = nvcc_path()
    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    extra = cublaslt_include(nvcc) if nvcc else None
    if extra:
        includes.append(extra)
    standard = "c++20" if "-std=c++20" in Path(cpp_extension.__file__).read_text() else "c++17"
    gencode = [flag for arch in arches for flag in ("-gencode", f"arch=compute_{arch},code=sm_{arch}")]
    return [f"-std={standard}", "-O3", *gencode, "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
            *cpp_extension.COMMON_NVCC_FLAGS, "-Xcompiler", "-fPIC", *[f"-I{d}" for d in includes]]


def compile_csrc(source: str, out_dir: Path, arches: list[int]) -> dict:
    """nvcc -c csrc/<source> for ``arches``: returncode, output, seconds, object, and for .cu files
    ptxas's registers and spills per kernel and arch."""
    obj = out_dir / (source + ".o")
    start = time.perf_counter()
    command = [nvcc_path(), "-c", str(ROOT / "csrc" / source), "-o", str(obj), *nvcc_flags(arches)]
    if source.endswith(".cu"):
        command.append("--resource-usage")
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    output = proc.stdout + proc.stderr
    return {"source": source, "returncode": proc.returncode, "output": output,
            "seconds": round(time.perf_counter() - start, 1), "object": obj, "kernels": _nvcc_usage(output)}


def _nvcc_usage(output: str) -> list[dict]:
    rows, current = [], None
    for line in output.splitlines():
        entry = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line)
        if entry:
            current = {"kernel": entry.group(1), "arch": entry.group(2)}
            continue
        if current is not None:
            spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
            if spills:
                current["spill_stores"], current["spill_loads"] = int(spills.group(1)), int(spills.group(2))
            used = re.search(r"Used (\d+) registers", line)
            if used:
                current["registers"] = int(used.group(1))
                shared = re.search(r"(\d+) bytes smem", line)
                current["shared_bytes"] = int(shared.group(1)) if shared else 0
                rows.append(current)
                current = None
    return rows


def check_csrc(arches: list[int], jobs: int) -> tuple[list[dict], list[str]]:
    sources = sorted(p.name for p in (ROOT / "csrc").iterdir() if p.suffix in (".cu", ".cpp"))
    problems, rows = [], []
    if nvcc_path() is None:
        return rows, ["--cuda: nvcc is not installed"]
    with tempfile.TemporaryDirectory() as out_dir, concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        for result in pool.map(lambda s: compile_csrc(s, Path(out_dir), arches), sources):
            if result["returncode"] != 0:
                problems.append(f"nvcc fails on csrc/{result['source']}: {result['output'][-3000:]}")
            for kernel in result["kernels"]:
                row = {"source": result["source"], **kernel,
                       "shared_limit": SHARED_MEMORY_LIMIT[int(kernel["arch"][3:])]}
                rows.append(row)
                if row["shared_bytes"] > row["shared_limit"]:
                    problems.append(f"csrc kernel {row['kernel']} needs {row['shared_bytes']} bytes of shared memory "
                                    f"on {row['arch']}")
            print(f"nvcc {result['source']}: {result['seconds']} s, exit {result['returncode']}", file=sys.stderr)
    return rows, problems


# ---------------------------------------------------------------------------------------------

def _arches(text: str) -> list[int]:
    arches = [int(a) for a in text.split(",") if a.strip()]
    unknown = [a for a in arches if a not in SHARED_MEMORY_LIMIT]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown arch {unknown}; known: {sorted(SHARED_MEMORY_LIMIT)}")
    return arches


def _ops(text: str) -> list[str]:
    ops = [o for o in text.split(",") if o.strip()]
    unknown = [o for o in ops if o not in LAUNCHES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown op {unknown}; known: {', '.join(LAUNCHES)}")
    return ops


def _run_worker(arch: int, ops: list[str], configs: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTCORE5_POISON")}
    with tempfile.TemporaryDirectory(prefix="fastcore5-compile-check-") as cache:
        env["TRITON_CACHE_DIR"] = cache
        env["TRITON_DUMP_PTXAS_LOG"] = "1"
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is its default
        command = [sys.executable, __file__, "--worker", "--arch", str(arch), "--ops", ",".join(ops), "--configs", configs]
        proc = subprocess.run(command, capture_output=True, text=True, env=env)
    rows = []
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            rows.append(json.loads(line))
    if proc.returncode != 0:
        rows.append({"kernel": "<worker>", "arch": f"sm_{arch}", "dtype": None,
                     "error": f"worker exited {proc.returncode}: {proc.stderr[-3000:]}"})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=_arches, default=[80, 86, 89, 90], help="compute capabilities, e.g. 80,86,89,90")
    parser.add_argument("--ops", type=_ops, default=list(LAUNCHES), help=f"ops to compile ({','.join(LAUNCHES)})")
    parser.add_argument("--all-configs", action="store_const", const="all", dest="configs", default="ends",
                        help="every autotune candidate, not only the first and the last")
    parser.add_argument("--defaults-only", action="store_const", const="none", dest="configs",
                        help="no autotune candidate, only the configs launched untuned")
    parser.add_argument("--cuda", action="store_true", help="also compile csrc/ with nvcc for every arch")
    parser.add_argument("--no-triton", action="store_true", help="skip the Triton kernels (with --cuda)")
    parser.add_argument("--jobs", type=int, default=2, help="arches compiled at once")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--configs", choices=("all", "ends", "none"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1" and args.worker:
        sys.exit("compile_check: TRITON_INTERPRET=1 is set; the workers compile real kernels without it")
    if args.worker:
        for row in worker(args.arch[0], args.ops, args.configs):
            print(json.dumps(row), flush=True)
        return 0
    rows: list[dict] = []
    problems: list[str] = []
    start = time.perf_counter()
    if not args.no_triton:
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            for arch_rows in pool.map(lambda a: _run_worker(a, args.ops, args.configs), args.arch):
                for row in arch_rows:
                    print(json.dumps(row), flush=True)
                rows += arch_rows
        problems += failures(rows, entry_kernels(args.ops), args.arch)
    if args.cuda:
        cuda_rows, cuda_problems = check_csrc(args.arch, args.jobs)
        for row in cuda_rows:
            print(json.dumps(row), flush=True)
        problems += cuda_problems
    print(summary(rows, problems), file=sys.stderr)
    print(f"compile check: {time.perf_counter() - start:.0f} s, arches {args.arch}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
