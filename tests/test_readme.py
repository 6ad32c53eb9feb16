"""The README's python blocks run as written, as a user would paste them: each block on its own
(no names borrowed from another block), in a fresh process with the user's environment (no
TRITON_INTERPRET from this suite), on the GPU when there is one, else on the CPU."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
README = REPO_ROOT / "README.md"

_RUN_EACH_ALONE = """
import json, sys, traceback
failures = []
for number, block in enumerate(json.loads(sys.stdin.read()), start=1):
    try:
        exec(compile(block, f"README python block {number}", "exec"), {"__name__": "__main__"})
    except BaseException:
        failures.append(traceback.format_exc())
print(json.dumps(failures))
"""


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.DOTALL | re.MULTILINE)


def test_readme_has_the_usage_blocks():
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 4
    used = "\n".join(blocks)
    for name in ("LinearReLU", "linear_relu", "EmbeddingDotBias", "SGD", "discriminative_param_groups", "use_backend"):
        assert name in used


def _failures_running_each_alone(blocks: list[str]) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTCORE5_POISON", "FASTCORE5_BACKEND")}
    done = subprocess.run(
        [sys.executable, "-c", _RUN_EACH_ALONE], input=json.dumps(blocks), cwd=REPO_ROOT, env=env,
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_readme_python_block_runs_on_its_own():
    failures = _failures_running_each_alone(python_blocks(README.read_text()))
    assert failures == [], "\n".join(failures)


def test_a_block_that_borrows_a_name_from_another_fails():
    blocks = python_blocks("```python\nx = 1\n```\ntext\n```python\ny = x + 1\n```\n")
    assert blocks == ["x = 1\n", "y = x + 1\n"]
    failures = _failures_running_each_alone(blocks)
    assert len(failures) == 1 and "NameError: name 'x' is not defined" in failures[0]
