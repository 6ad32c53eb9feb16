"""Every kernel compiles for the GPUs fastcore5 ships to, checked on a CPU-only machine.

The interpreter runs the kernels' arithmetic but not Triton's compiler; scripts/compile_check.py
runs the compiler, through the real launchers, in a subprocess without TRITON_INTERPRET. What CI
runs here: every op for sm_90 (each tuned launcher's default and its first and last candidate),
and the untuned defaults of the GEMM launchers for sm_80/86/89. The full matrix (every
candidate, every arch, csrc/ through nvcc) is ``make compile-check`` (docs/gpu-check.md).
A language error, an unsupported dot shape, a config that needs more shared memory than its card
has, a default config that spills registers, a kernel no launch reaches, or memory accesses that
lost their vector width fail here instead of on the GPU.
"""
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "compile_check.py"
OPS = ("linear_relu", "linear_relu_hopper", "mlp", "embedding_dot_bias", "sgd")


@functools.lru_cache(maxsize=None)
def run_compile_check(*args: str) -> tuple[int, list[dict], str]:
    """(exit status, rows, summary) of one compile_check run, from a fresh compiler process."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTCORE5_POISON")}
    run = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=1800)
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    return run.returncode, rows, run.stderr


def compile_op(op: str) -> list[dict]:
    """The rows of ``op``'s kernels compiled for sm_90; fails the test when the check failed."""
    status, rows, summary = run_compile_check("--arch", "90", "--ops", op)
    assert status == 0, summary[-6000:]
    return rows


@pytest.mark.parametrize("op", OPS)
def test_every_kernel_compiles_and_fits_a_hopper_sm(op):
    rows = compile_op(op)
    assert rows, f"no kernel of {op} was launched"
    assert all(row["fits"] and row["registers"] for row in rows)
    assert any("default" in row["roles"] or "fixed" in row["roles"] for row in rows)


def test_untuned_gemm_configs_fit_and_do_not_spill_on_every_card():
    """What FASTCORE5_TUNING=off, CUDA-graph capture and torch.compile launch, in every dtype
    (fp32 with and without TF32, fp16, bf16, fp64), on sm_80/86/89: no spill (the former default
    spilled up to 1.9 KB per thread in fp32), no more shared memory than the card has."""
    status, rows, summary = run_compile_check("--arch", "80,86,89", "--ops", "linear_relu,mlp", "--defaults-only")
    assert status == 0, summary[-6000:]
    assert {row["dtype"] for row in rows} == {"fp32-tf32", "fp32", "fp16", "bf16", "fp64"}
    assert {row["arch"] for row in rows} == {"sm_80", "sm_86", "sm_89"}
    assert all(row["spill_stores"] == 0 and row["fits"] for row in rows)


def test_sgd_moves_memory_in_16_byte_vectors():
    """The SGD step is pure bandwidth: its unmasked pieces must load and store 16 bytes per
    access in every dtype (the alignment hints on the chunk table's offsets must hold)."""
    rows = compile_op("sgd")
    assert {r["signature"].split(",")[0] for r in rows} == {"*fp32", "*bf16", "*fp16", "*fp64"}
    for row in rows:
        vector = "v2.b64" if row["constexprs"]["COMPUTE"] == "fp64" else "v4.b32"
        ops = row["global_memory_ops"]
        assert f"ld.global.{vector}" in ops and f"st.global.{vector}" in ops, row


def test_linear_relu_gemms_use_wgmma_and_pipelined_copies():
    """At benchmark-like shapes (16-divisible, unit inner strides) every Linear+ReLU GEMM config
    with a full warpgroup (>= 4 warps) and tensor-core operands compiles to Hopper's wgmma with
    its operand tiles copied asynchronously, i.e. software-pipelined over K; the fp32
    tf32-rounding path included."""
    rows = [r for r in compile_op("linear_relu") if r["constexprs"].get("K") != "1"]  # not the bias-only launch
    tensor_core = [r for r in rows if r["options"]["num_warps"] >= 4 and r["dtype"] in ("bf16", "fp16", "fp32-tf32")]
    assert {r["dtype"] for r in tensor_core} == {"bf16", "fp16", "fp32-tf32"}
    assert any(r["constexprs"]["ROUND_TF32"] == "True" for r in tensor_core)
    for row in tensor_core:
        assert row["wgmma"] and row["async_copies"] > 0, row


def test_embedding_dot_bias_compiles_in_every_mode_with_both_index_dtypes():
    """One per-sample backward kernel does three jobs (its MODE) beside the segment reduction of
    the deterministic path: each of them is compiled, with int32 and int64 indices (triton 3.6
    could not compile the int64 forward nor the int32 segment reduction)."""
    from fastcore5.kernels import embedding_dot_bias as kernels

    rows = compile_op("embedding_dot_bias")
    modes = {row["constexprs"]["MODE"] for row in rows if row["kernel"] == "_embedding_dot_bias_bwd_per_sample_kernel"}
    assert modes == {str(mode.value) for mode in (kernels.MODE_COEF, kernels.MODE_ATOMIC, kernels.MODE_SPARSE)}
    for kernel in ("_embedding_dot_bias_fwd_kernel", "_embedding_dot_bias_bwd_segment_kernel"):
        assert {row["index_dtype"] for row in rows if row["kernel"] == kernel} == {"int32", "int64"}


def test_a_kernel_reached_by_no_launch_fails_the_check():
    """The check's own verdict: an entry kernel that no launch compiled is a failure."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import compile_check
    finally:
        sys.path.remove(str(SCRIPT.parent))
    entries = compile_check.entry_kernels(["sgd"])
    assert entries == {"sgd_kernel": "sgd_kernel"}  # its @triton.jit helpers are not entries
    problems = compile_check.failures([], entries, [90])
    assert problems == ["@triton.jit kernel sgd_kernel.sgd_kernel was reached by no launch"]
