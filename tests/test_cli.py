"""The first-run mistakes of issue 12, as a user makes them: each ends in one clear line, before
any training, and output reaches a pipe as it happens."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastcore5.cli import main
from fastcore5.demo import DemoOptions, run_demo
from fastcore5.demo._console import ProgressBar

REPO_ROOT = Path(__file__).resolve().parent.parent
ALLOWED = ("triton", "cuda", "cpu", "torch", "auto")


def _user_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: none of the test suite's settings."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTCORE5_POISON", "FASTCORE5_BACKEND")}
    return {**env, **extra}


def _no_training(monkeypatch):
    import fastcore5.demo as demo

    def refuse(*args, **kwargs):
        pytest.fail("training started before the options were checked")

    monkeypatch.setattr(demo, "train_collab", refuse)
    monkeypatch.setattr(demo, "train_digits", refuse)


def _one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("problem", ["a_file", "under_a_file"])
def test_bad_plots_path_fails_before_training(tmp_path, capsys, monkeypatch, problem):
    _no_training(monkeypatch)
    taken = tmp_path / "taken.png"
    taken.write_text("")
    plots = taken if problem == "a_file" else taken / "plots"
    assert main(["demo", "--plots", str(plots)]) == 2
    assert _one_error_line(capsys).startswith(f"fastcore5 demo: error: --plots {plots}:")


def test_plots_folder_is_created_up_front(tmp_path, capsys, monkeypatch):
    _no_training(monkeypatch)
    plots = tmp_path / "new" / "plots"
    with pytest.raises(pytest.fail.Exception, match="training started"):
        main(["demo", "--part", "digits", "--plots", str(plots)])
    assert plots.is_dir()


def test_bad_backend_variable_is_one_line_from_the_command():
    done = subprocess.run(
        [sys.executable, "-m", "fastcore5", "demo", "--epochs", "1"],
        cwd=REPO_ROOT, env=_user_env(FASTCORE5_BACKEND="bogus"), capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastcore5 demo: error: FASTCORE5_BACKEND='bogus'"), done.stderr
    assert all(name in lines[0] for name in ALLOWED)
    assert "epoch" not in done.stdout


def test_bad_backend_variable_is_reported_at_import_and_raised_at_first_use(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(
        "import torch\n"
        "import fastcore5\n"
        "print('imported')\n"
        "try:\n"
        "    fastcore5.linear_relu(torch.randn(2, 3), torch.randn(4, 3))\n"
        "except fastcore5.backends.BackendConfigError as err:\n"
        "    print('raised:', err)\n"
    )
    done = subprocess.run(
        [sys.executable, str(script)], env=_user_env(FASTCORE5_BACKEND="bogus"), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    warning = [line for line in done.stderr.splitlines() if "Warning" in line]
    assert len(warning) == 1 and warning[0].startswith(f"{script}:2: UserWarning: FASTCORE5_BACKEND='bogus'"), done.stderr
    assert all(name in warning[0] for name in ALLOWED)
    assert done.stdout.splitlines()[0] == "imported"
    assert done.stdout.splitlines()[1].startswith("raised: FASTCORE5_BACKEND='bogus'")


def test_good_backend_variable_imports_silently():
    done = subprocess.run(
        [sys.executable, "-W", "always", "-c", "import fastcore5"],
        env=_user_env(FASTCORE5_BACKEND="torch"), capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0 and "FASTCORE5_BACKEND" not in done.stderr, done.stderr


def test_cuda_backend_on_a_cpu_says_how_to_get_it(capsys, monkeypatch):
    _no_training(monkeypatch)
    assert main(["demo", "--device", "cpu", "--backend", "cuda"]) == 2
    line = _one_error_line(capsys)
    assert line.startswith("fastcore5 demo: error: --backend cuda")
    assert "FASTCORE5_BUILD_CUDA=1" in line and "--device cuda" in line
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in line


def _ratings_csv(folder: Path, n: int) -> Path:
    folder.mkdir()
    rows = "".join(f"{1 + i % 7},{1 + i % 5},{1 + i % 5}.0,0\n" for i in range(n))
    (folder / "ratings.csv").write_text("userId,movieId,rating,timestamp\n" + rows)
    return folder


def test_too_few_ratings_name_the_real_cause(tmp_path, capsys):
    none_to_validate = _ratings_csv(tmp_path / "four", 4)  # 20% of 4 rounds down to 0
    assert main(["demo", "--part", "collab", "--ratings", str(none_to_validate), "--backend", "torch"]) == 2
    line = _one_error_line(capsys)
    assert "leave none for validation" in line and "at least 5 ratings" in line and "--batch-size" not in line

    small = _ratings_csv(tmp_path / "forty", 40)  # 32 to train on, default batch 256
    assert main(["demo", "--part", "collab", "--ratings", str(small), "--backend", "torch"]) == 2
    line = _one_error_line(capsys)
    assert "32 for training, fewer than one batch of 256" in line and "lower --batch-size to 32 or less" in line

    one_item = tmp_path / "one_item"
    one_item.mkdir()
    (one_item / "ratings.csv").write_text("userId,movieId,rating,timestamp\n" + "".join(f"1,7,{r}.0,0\n" for r in range(1, 6)))
    assert main(["demo", "--part", "collab", "--ratings", str(one_item), "--batch-size", "2", "--backend", "torch"]) == 2
    captured = capsys.readouterr()
    assert "data: " in captured.out and ": 1 user, 1 item, 5 ratings (" in captured.out
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "the ratings cover 1 item" in lines[0] and "at least 2 items" in lines[0]


def test_counts_are_written_in_words_that_agree():
    out = io.StringIO()
    run_demo(
        DemoOptions(
            epochs=1, device="cpu", backend="torch", synthetic_size=dict(n_users=30, n_items=40, n_ratings=600),
            collab_overrides=dict(n_factors=4, batch_size=64), digits_overrides=dict(hidden=(8,), max_samples=200),
        ),
        out,
    )
    text = out.getvalue()
    assert "1 epoch\n" in text and "1 epochs" not in text
    assert "1 epoch with the body frozen" in text and "epoch(s)" not in text


def test_progress_reaches_a_pipe_while_the_demo_runs():
    """With stdout a pipe (a log, `| tee`), lines arrive as they are printed, not at exit."""
    process = subprocess.Popen(
        [sys.executable, "-m", "fastcore5", "demo", "--epochs", "3"],
        cwd=REPO_ROOT, env=_user_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        first = process.stdout.readline()
        still_running = process.poll() is None
    finally:
        process.kill()
        process.wait()
    assert first.startswith("fastcore5 demo")
    assert still_running


def test_progress_lines_on_a_log_during_a_long_epoch():
    log = io.StringIO()
    bar = ProgressBar(3, log, "epoch 1/1", log_interval_s=0.0)
    for step in range(3):
        bar.update(note=lambda: f"MSE {step}")
    bar.close()
    assert log.getvalue() == "  epoch 1/1: step 1/3 MSE 0\n  epoch 1/1: step 2/3 MSE 1\n"


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(y_range=(5.5, 0)), ValueError, "y_range must be finite with low < high"),
        (dict(y_range=(0, float("nan"))), ValueError, "y_range must be finite"),
        (dict(y_range=5.5), ValueError, "y_range must be a pair of numbers"),
        (dict(n_factors=0), ValueError, "n_factors must be at least 1, got 0"),
        (dict(n_users=-3), ValueError, "n_users must be at least 1"),
        (dict(n_items=2.5), TypeError, "n_items must be an int, got float"),
    ],
)
def test_embedding_dot_bias_refuses_a_model_that_cannot_work(kwargs, error, message):
    from fastcore5.nn import EmbeddingDotBias

    valid = dict(n_factors=4, n_users=5, n_items=6, y_range=(0, 5.5))
    EmbeddingDotBias(**valid)
    with pytest.raises(error, match=message):
        EmbeddingDotBias(**(valid | kwargs))


def test_shape_errors_count_dimensions_in_words_that_agree():
    import fastcore5

    with pytest.raises(ValueError, match=r"^bias must have 1 dimension, got shape \(5, 1\)$"):
        fastcore5.linear_relu(torch.randn(3, 4), torch.randn(5, 4), torch.randn(5, 1))


def test_bad_backend_variable_is_one_line_from_the_benchmarks():
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick"],
        cwd=REPO_ROOT, env=_user_env(FASTCORE5_BACKEND="Bogus"), capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m bench: error: FASTCORE5_BACKEND='Bogus'"), done.stderr
    assert "ceilings" not in done.stdout
