"""The README and the pages under docs/ hold their promises: every python block runs as written, as
a user would paste it (each block on its own, no names borrowed from another block, in a fresh
process with the user's environment: no TRITON_INTERPRET from this suite), on the GPU when there is
one, else on the CPU. The README's blocks also print no warning and, on a CPU, exactly the output
shown in the text block that follows each; its headline table is the one scripts/readme_headline.py
generates from the published result files, and every page it links to exists."""
from __future__ import annotations

import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
README = REPO_ROOT / "README.md"
DOCS = sorted((REPO_ROOT / "docs").glob("*.md"))

_RUN_EACH_ALONE = """
import contextlib, io, json, sys, traceback, warnings
results = []
for number, block in enumerate(json.loads(sys.stdin.read()), start=1):
    printed, failure = io.StringIO(), None
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(printed):
        warnings.simplefilter("always")
        try:
            exec(compile(block, f"python block {number}", "exec"), {"__name__": "__main__"})
        except BaseException:
            failure = traceback.format_exc()
    results.append({"failure": failure, "stdout": printed.getvalue(),
                    "warnings": [f"{w.category.__name__}: {w.message}" for w in caught]})
print(json.dumps(results))
"""


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.DOTALL | re.MULTILINE)


def blocks_with_output(text: str) -> list[tuple[str, str | None]]:
    """Each python block with the text block right after it (its printed output), or None."""
    found = re.findall(r"^```python\n(.*?)^```\n(?:\n```text\n(.*?)^```$)?", text, flags=re.DOTALL | re.MULTILINE)
    return [(code, shown or None) for code, shown in found]


def _run_each_alone(blocks: list[str]) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTCORE5_POISON", "FASTCORE5_BACKEND")}
    done = subprocess.run(
        [sys.executable, "-c", _RUN_EACH_ALONE], input=json.dumps(blocks), cwd=REPO_ROOT, env=env,
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_readme_has_a_usage_block_per_op():
    used = "\n".join(python_blocks(README.read_text()))
    for name in ("LinearReLU", "linear_relu", "MLP", "EmbeddingDotBias", "SGD"):
        assert name in used


def test_every_readme_block_runs_alone_prints_no_warning_and_what_the_readme_shows():
    pairs = blocks_with_output(README.read_text())
    assert len(pairs) >= 4 and all(len(code.splitlines()) <= 12 for code, _ in pairs)
    results = _run_each_alone([code for code, _ in pairs])
    for (code, shown), result in zip(pairs, results):
        assert result["failure"] is None, result["failure"]
        assert result["warnings"] == [], (code, result["warnings"])
        assert shown is not None, f"no output shown after:\n{code}"
        if not torch.cuda.is_available():  # the values shown are a CPU's
            assert result["stdout"] == shown


def test_every_docs_python_block_runs_on_its_own():
    blocks = [block for page in DOCS for block in python_blocks(page.read_text())]
    assert blocks
    failures = [result["failure"] for result in _run_each_alone(blocks) if result["failure"]]
    assert failures == [], "\n".join(failures)


def test_the_docs_keep_the_blocks_the_old_readme_had():
    used = "\n".join(block for page in DOCS for block in python_blocks(page.read_text()))
    for name in ("discriminative_param_groups", "use_backend", "fully_shard", "patch_learner"):
        assert name in used


def test_a_block_that_borrows_a_name_from_another_fails():
    blocks = python_blocks("```python\nx = 1\n```\ntext\n```python\ny = x + 1\n```\n")
    assert blocks == ["x = 1\n", "y = x + 1\n"]
    results = _run_each_alone(blocks)
    assert results[0]["failure"] is None
    assert "NameError: name 'x' is not defined" in results[1]["failure"]


def test_the_headline_table_is_generated_from_the_published_results():
    generator = runpy.run_path(str(REPO_ROOT / "scripts" / "readme_headline.py"))
    text = README.read_text()
    assert generator["readme_with"](text, generator["headline"]()) == text, (
        "README's headline differs from bench/results/published: run python scripts/readme_headline.py --write"
    )
    rows = [line for line in generator["headline"]().splitlines()[2:]]
    assert any("H200" in row for row in rows) and any("(CPU)" in row for row in rows)


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda path: path.name)
def test_every_linked_file_exists(page):
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
        assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"
