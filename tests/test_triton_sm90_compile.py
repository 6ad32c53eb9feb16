"""Every Triton kernel compiles for Hopper (sm_90), checked on a CPU-only machine.

The interpreter runs the kernels' arithmetic but not Triton's compiler; this test runs the
compiler: tests/sm90_compile.py calls each launcher in a subprocess without TRITON_INTERPRET,
with Triton's launch replaced by a compile to an sm_90 cubin for the largest and smallest
autotune config. A language error, an unsupported dot shape or a kernel that fits no Hopper
SM fails here instead of on the GPU.
"""
import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("sm90_compile.py")
sys.path.insert(0, str(SCRIPT.parent))
from sm90_compile import LAUNCHES  # noqa: E402  (importing does not compile anything)


@pytest.mark.parametrize("op", sorted(LAUNCHES))
def test_kernels_compile_for_sm90(op):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTCORE5_POISON")}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run([sys.executable, str(SCRIPT), op], capture_output=True, text=True, env=env, timeout=1200)
    assert run.returncode == 0, run.stderr[-4000:]
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    assert rows, f"no kernel of {op} was launched"
    fits = collections.defaultdict(bool)
    for row in rows:
        fits[(row["kernel"], row["signature"])] |= row["fits_hopper"]
    too_big = [key for key, ok in fits.items() if not ok]
    assert not too_big, f"no autotune config fits a Hopper SM's shared memory for {too_big}"
