"""Every Triton kernel compiles for Hopper (sm_90), checked on a CPU-only machine.

The interpreter runs the kernels' arithmetic but not Triton's compiler; this test runs the
compiler: tests/sm90_compile.py calls each op's launchers in a subprocess without
TRITON_INTERPRET, with Triton's launch replaced by a compile to an sm_90 cubin (largest and
smallest autotune config). A language error, an unsupported dot shape, a kernel that fits no
Hopper SM, or memory accesses that lost their vector width fail here instead of on the GPU.
"""
import collections
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("sm90_compile.py")
OPS = ("linear_relu", "linear_relu_hopper", "mlp", "embedding_dot_bias", "sgd")


@functools.lru_cache(maxsize=None)
def compile_op(op: str) -> list[dict]:
    """One row per compiled kernel launch of ``op``, from a fresh compiler process."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTCORE5_POISON")}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run([sys.executable, str(SCRIPT), op], capture_output=True, text=True, env=env, timeout=1200)
    assert run.returncode == 0, run.stderr[-4000:]
    return [json.loads(line) for line in run.stdout.splitlines()]


@pytest.mark.parametrize("op", OPS)
def test_every_kernel_compiles_and_fits_a_hopper_sm(op):
    rows = compile_op(op)
    assert rows, f"no kernel of {op} was launched"
    fits = collections.defaultdict(bool)
    for row in rows:
        fits[(row["kernel"], row["signature"])] |= row["fits_hopper"]
    too_big = [key for key, ok in fits.items() if not ok]
    assert not too_big, f"no autotune config fits a Hopper SM's shared memory for {too_big}"


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
    with a full warpgroup (>= 4 warps) compiles to Hopper's wgmma with its operand tiles copied
    asynchronously, i.e. software-pipelined over K; the fp32 tf32-rounding path included."""
    rows = [r for r in compile_op("linear_relu") if r["constexprs"].get("K") != "1"]  # not the bias-only launch
    warpgroup_rows = [r for r in rows if r["options"]["num_warps"] >= 4]
    assert {r["signature"].split(",")[0] for r in warpgroup_rows} >= {"*bf16", "*fp32", "*fp16"}
    assert any(r["constexprs"]["ROUND_TF32"] == "True" for r in warpgroup_rows)
    for row in warpgroup_rows:
        assert row["wgmma"] and row["async_copies"] > 0, row


def test_embedding_dot_bias_backward_compiles_in_every_mode():
    """One per-sample backward kernel does three jobs (its MODE) beside the segment reduction of
    the deterministic path: each of them must have been compiled, not just one."""
    from fastcore5.kernels import embedding_dot_bias as kernels

    rows = compile_op("embedding_dot_bias")
    modes = {row["constexprs"]["MODE"] for row in rows if row["kernel"] == "_embedding_dot_bias_bwd_per_sample_kernel"}
    assert modes == {str(mode.value) for mode in (kernels.MODE_COEF, kernels.MODE_ATOMIC, kernels.MODE_SPARSE)}
    assert any(row["kernel"] == "_embedding_dot_bias_bwd_segment_kernel" for row in rows)
