"""The lesson-5 demo end to end (CPU reference, and one short fused run), the ratings loaders on
fixture files written here, and the command line."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastcore5 import backends
from fastcore5.cli import build_parser, main
from fastcore5.demo import DemoOptions, run_demo
from fastcore5.demo._console import ProgressBar
from fastcore5.demo.data import RatingsFileError, load_ratings, synthetic_movielens

from native_cpu import require_cpu_kernel

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REPO_ROOT = Path(__file__).resolve().parent.parent


def test_demo_end_to_end_on_reference_backend(tmp_path):
    threads = torch.get_num_threads()
    out = io.StringIO()
    report = run_demo(DemoOptions(epochs=2, device="cpu", backend="torch", plots=str(tmp_path / "plots")), out)
    text = out.getvalue()
    assert torch.get_num_threads() == threads  # the demo trains on one thread and restores the count

    assert report.collab.valid_mse < 0.85 * report.collab.baseline_mse
    assert report.digits.valid_accuracy > 0.8  # chance is 0.1
    assert report.interpretation.item_bias_correlation > 0.7
    assert report.interpretation.user_bias_correlation > 0.7
    assert len(report.interpretation.highest_bias) == len(report.interpretation.lowest_bias) == 10
    assert report.interpretation.highest_bias[0][1] > report.interpretation.lowest_bias[0][1]
    assert report.backends == {"embedding_dot_bias": "torch", "sgd": "torch", "linear_relu": "torch"}
    assert [s.epoch for s in report.collab.history] == [1, 2]
    assert [s.phase for s in report.digits.history] == ["frozen", "unfrozen", "unfrozen"]
    assert "plain-PyTorch reference" in text
    assert "collab part took" in text and "digits part took" in text
    names = sorted(p.name for p in report.plots)
    assert names == ["collab_item_bias.png", "collab_item_pca.png", "collab_learning_curve.png", "digits_learning_curve.png"]
    for path in report.plots:
        assert path.read_bytes()[:8] == PNG_SIGNATURE


def _tiny_options(backend: str, device: str) -> DemoOptions:
    # A few steps of each part: the Triton interpreter takes ~1 ms per tile iteration.
    return DemoOptions(
        epochs=1, device=device, backend=backend, seed=3,
        synthetic_size=dict(n_users=30, n_items=40, n_ratings=600),
        collab_overrides=dict(n_factors=8, batch_size=64),
        digits_overrides=dict(hidden=(16,), max_samples=200, batch_size=16),
    )


def test_fused_demo_matches_reference_run(device):
    """The same tiny demo through the fused Triton kernels (the interpreter on a CPU) and through
    the reference gives the same numbers."""
    if device == "cpu" and not backends.interpreter_active():
        pytest.fail("tests/conftest.py should have set TRITON_INTERPRET=1 on a machine without CUDA")
    fused_out, reference_out = io.StringIO(), io.StringIO()
    fused = run_demo(_tiny_options("triton", device), fused_out)
    reference = run_demo(_tiny_options("torch", device), reference_out)
    if device == "cpu":  # the interpreter's minutes are announced up front, then estimated per part
        assert "TRITON_INTERPRET=1 runs the Triton kernels through Triton's CPU interpreter" in fused_out.getvalue()
        assert fused_out.getvalue().count("Triton's interpreter takes") == 2
    assert "interpreter" not in reference_out.getvalue().split("Summary")[0]

    assert set(fused.backends.values()) == {"triton"}
    for mine, theirs in zip(fused.collab.history, reference.collab.history):
        assert mine.train_loss == pytest.approx(theirs.train_loss, rel=1e-4)
        assert mine.valid_loss == pytest.approx(theirs.valid_loss, rel=1e-4)
    for mine, theirs in zip(fused.digits.history, reference.digits.history):
        assert mine.train_loss == pytest.approx(theirs.train_loss, rel=1e-4)
        assert mine.valid_loss == pytest.approx(theirs.valid_loss, rel=1e-4)
    assert len(fused.digits.history) == 2  # one frozen epoch, one unfrozen


def test_cpu_demo_runs_the_native_sgd_and_times_a_reference_epoch():
    """On a CPU the collab part runs the C++ SGD kernel (backend auto) and, for comparison, one
    epoch of a fresh model on the reference; the summary shows both epoch times."""
    require_cpu_kernel("sgd")
    out = io.StringIO()
    options = _tiny_options("auto", "cpu")
    options.part = "collab"
    report = run_demo(options, out)
    text = out.getvalue()
    assert report.backends["sgd"] == "cpu"
    assert report.collab.reference_epoch_seconds > 0 and report.collab.epoch_seconds > 0
    summary = text.split("Summary")[1]
    assert "with fastcore5's kernels" in summary and "on the reference" in summary
    native = ", ".join(sorted(op for op, name in report.backends.items() if name == "cpu"))
    assert f"fastcore5's C++ CPU kernels ran {native}" in summary and "sgd" in native


def test_synthetic_ratings_have_movielens_100k_shape():
    ratings = synthetic_movielens(seed=5)
    assert (ratings.n_users, ratings.n_items, len(ratings)) == (943, 1682, 100_000)
    assert set(np.unique(ratings.ratings.numpy())) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    pairs = ratings.users * ratings.n_items + ratings.items
    assert len(torch.unique(pairs)) == len(ratings)  # no (user, item) pair twice
    assert torch.bincount(ratings.users, minlength=943).min() >= 20
    _, count = ratings.item_stats()
    assert count.max() > 10 * np.median(count)  # Zipf-skewed popularity (ml-100k: 583 vs 27)
    again = synthetic_movielens(seed=5)
    assert torch.equal(again.ratings, ratings.ratings) and torch.equal(again.items, ratings.items)
    assert not torch.equal(synthetic_movielens(seed=6).items, ratings.items)


def _write_ml100k(folder: Path, data_lines: list[str], with_titles: bool = True) -> Path:
    folder.mkdir()
    (folder / "u.data").write_text("".join(line + "\n" for line in data_lines), encoding="latin-1")
    if with_titles:
        (folder / "u.item").write_bytes(
            "5|Café Society (1995)|01-Jan-1995||http://x|0|1\n"
            "7|Heat (1995)|01-Jan-1995||http://x|0|1\n"
            "100|Fargo (1996)|14-Feb-1997||http://x|0|1\n".encode("latin-1")
        )
    return folder


def _write_ml_latest(folder: Path, rating_rows: list[str]) -> Path:
    folder.mkdir()
    (folder / "ratings.csv").write_text("userId,movieId,rating,timestamp\n" + "".join(r + "\n" for r in rating_rows))
    (folder / "movies.csv").write_text(
        'movieId,title,genres\n1,"American President, The (1995)",Comedy|Drama|Romance\n50,Heat (1995),Action\n'
    )
    return folder


def test_ml100k_folder_is_loaded_with_contiguous_ids_and_latin1_titles(tmp_path):
    folder = _write_ml100k(tmp_path / "ml-100k", ["30\t100\t4\t881250949", "10\t5\t3\t881250950", "20\t7\t5\t1", "10\t100\t1\t2"])
    for path in (folder, folder / "u.data"):
        ratings = load_ratings(path)
        assert (ratings.n_users, ratings.n_items, len(ratings)) == (3, 3, 4)
        assert ratings.user_ids.tolist() == [10, 20, 30] and ratings.item_ids.tolist() == [5, 7, 100]
        assert ratings.users.tolist() == [2, 0, 1, 0] and ratings.items.tolist() == [2, 0, 1, 2]
        assert ratings.ratings.tolist() == [4.0, 3.0, 5.0, 1.0]
        assert ratings.titles == ["Café Society (1995)", "Heat (1995)", "Fargo (1996)"]


def test_ml_latest_folder_is_loaded_with_quoted_titles(tmp_path):
    folder = _write_ml_latest(tmp_path / "ml-latest-small", ["7,50,3.5,964982703", "3,1,4.0,964981247", "7,1,0.5,1"])
    ratings = load_ratings(folder / "ratings.csv")
    assert ratings.user_ids.tolist() == [3, 7] and ratings.item_ids.tolist() == [1, 50]
    assert ratings.users.tolist() == [1, 0, 1] and ratings.items.tolist() == [1, 0, 0]
    assert ratings.ratings.tolist() == [3.5, 4.0, 0.5]
    assert ratings.titles == ["American President, The (1995)", "Heat (1995)"]
    assert ratings.y_range() == pytest.approx((0.0, 4.4))


def test_missing_titles_file_falls_back_to_ids(tmp_path):
    ratings = load_ratings(_write_ml100k(tmp_path / "ml", ["1\t5\t3\t0", "2\t9\t4\t0"], with_titles=False))
    assert ratings.titles == ["item 5", "item 9"]
    assert "no u.item" in ratings.source


@pytest.mark.parametrize(
    ("layout", "lines", "message"),
    [
        ("ml-100k", ["1\t5\t3\t0", "2\t7\t4\t0", "3 7 4 0"], "u.data, line 3: expected tab-separated"),
        ("ml-100k", ["1\t5\t3\t0", "x\t7\t4\t0"], "u.data, line 2: user id 'x' is not an integer"),
        ("ml-100k", ["1\t5\tfour\t0"], "u.data, line 1: rating 'four' is not a number"),
        ("ml-100k", ["1\t5\tnan\t0"], "u.data, line 1: rating 'nan' is not a finite number"),
        ("ml-latest", ["1,50,4.0,0", "2,1,3.0,0", "2,50,abc,0"], "ratings.csv, line 4: rating 'abc' is not a number"),
        ("ml-latest", ["1,50,4.0,0", "2,1,3.0"], "ratings.csv, line 3: expected 4 comma-separated fields, got 3"),
    ],
)
def test_malformed_ratings_line_is_named(tmp_path, layout, lines, message):
    writer = _write_ml100k if layout == "ml-100k" else _write_ml_latest
    folder = writer(tmp_path / layout, lines)
    with pytest.raises(RatingsFileError, match=message):
        load_ratings(folder)


def test_malformed_or_missing_files_are_named(tmp_path):
    with pytest.raises(RatingsFileError, match="nowhere: no such file or directory"):
        load_ratings(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RatingsFileError, match="found neither u.data .* nor ratings.csv"):
        load_ratings(tmp_path / "empty")
    headless = tmp_path / "headless"
    headless.mkdir()
    (headless / "ratings.csv").write_text("1,50,4.0,0\n")
    with pytest.raises(RatingsFileError, match="ratings.csv, line 1: expected a header naming the columns userId, movieId, rating"):
        load_ratings(headless)
    bad_titles = _write_ml_latest(tmp_path / "bad-titles", ["1,50,4.0,0"])
    (bad_titles / "movies.csv").write_text("movieId,title,genres\n1,Heat (1995),Action\nfifty,Up (2009),Animation\n")
    with pytest.raises(RatingsFileError, match="movies.csv, line 3: movieId 'fifty' is not an integer"):
        load_ratings(bad_titles)
    bad_items = _write_ml100k(tmp_path / "bad-items", ["1\t5\t3\t0"])
    (bad_items / "u.item").write_bytes(b"5|Heat (1995)\nno separator here\n")
    with pytest.raises(RatingsFileError, match="u.item, line 2: expected '|'-separated"):
        load_ratings(bad_items)
    empty_data = _write_ml100k(tmp_path / "no-ratings", [])
    with pytest.raises(RatingsFileError, match="u.data: the file holds no ratings"):
        load_ratings(empty_data)


def test_cli_trains_on_user_ratings_and_reports_bad_ones(tmp_path, capsys):
    rows = [f"{user},{movie},{1 + (user * movie) % 5}.0,0" for user in range(1, 13) for movie in (1, 50)]
    folder = _write_ml_latest(tmp_path / "mine", rows)
    code = main(["demo", "--part", "collab", "--ratings", str(folder), "--epochs", "1", "--batch-size", "4", "--backend", "torch"])
    printed = capsys.readouterr().out
    assert code == 0
    assert f"{folder / 'ratings.csv'}: 12 users, 2 items, 24 ratings" in printed
    assert "American President, The (1995)" in printed and "Heat (1995)" in printed

    (folder / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,50,4.0,0\n1,50\n")
    assert main(["demo", "--part", "collab", "--ratings", str(folder)]) == 2
    assert "ratings.csv, line 3: expected 4 comma-separated fields" in capsys.readouterr().err


def test_cli_refuses_unavailable_device_and_small_data(tmp_path, capsys):
    if not torch.cuda.is_available():
        assert main(["demo", "--device", "cuda"]) == 2
        assert "sees no CUDA device" in capsys.readouterr().err
    folder = _write_ml_latest(tmp_path / "tiny", ["1,50,4.0,0", "2,1,3.0,0"])
    assert main(["demo", "--part", "collab", "--ratings", str(folder), "--backend", "torch"]) == 2
    assert "leave none for validation" in capsys.readouterr().err


def test_help_explains_every_demo_option(capsys):
    parser = build_parser()
    demo = parser._subparsers._group_actions[0].choices["demo"]
    undocumented = [a.dest for a in demo._actions if a.dest != "help" and not (a.help and len(a.help) > 20)]
    assert undocumented == []
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--part", "--epochs", "--batch-size", "--lr", "--seed", "--device", "--backend", "--ratings", "--plots"):
        assert option in text


def test_python_m_fastcore5_demo_on_a_fresh_cpu_process():
    """`python -m fastcore5 demo` as the README's quick start runs it: a new process without the
    test suite's TRITON_INTERPRET, so the automatic backend choice is the one a CPU user gets; with
    deprecations as errors, as pyproject.toml's filter makes them for in-process tests."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTCORE5_POISON", "FASTCORE5_BACKEND")}
    done = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-m", "fastcore5", "demo", "--part", "digits", "--epochs", "1"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    if torch.cuda.is_available():
        expected = "triton"
    else:  # the C++ CPU kernel where the extension was built, else the reference
        expected = "cpu" if backends.unavailable_reason("cpu", "linear_relu", torch.device("cpu")) is None else "torch"
    assert f"linear_relu runs on: {expected}" in done.stdout
    assert "validation accuracy" in done.stdout and "digits part took" in done.stdout


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_draws_on_a_terminal_only():
    terminal, log = _Terminal(), io.StringIO()
    for stream in (terminal, log):
        bar = ProgressBar(4, stream, "epoch 1/1", width=8, min_interval_s=0.0)
        for step in range(4):
            bar.update(note=lambda: f"MSE {step}")
        bar.close()
    assert log.getvalue() == ""
    drawn = terminal.getvalue()
    assert "epoch 1/1 [##------] 1/4 MSE 0" in drawn and "[########] 4/4 MSE 3" in drawn
    assert drawn.endswith("\r\x1b[K")  # erased, so the epoch line that follows starts clean


def test_pca_plot_labels_only_the_extremes_and_no_two_labels_overlap():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastcore5.demo.plots import PCA_EXTREMES, _label_extremes

    points = np.random.default_rng(0).normal(size=(500, 2))
    fig, ax = plt.subplots(figsize=(9, 7))
    ax.scatter(points[:, 0], points[:, 1])
    labelled = _label_extremes(ax, fig, points, [f"a long movie title number {i}" for i in range(len(points))])
    extremes = {int(i) for axis in (0, 1) for i in (*np.argsort(points[:, axis])[:PCA_EXTREMES], *np.argsort(points[:, axis])[-PCA_EXTREMES:])}
    assert 0 < len(labelled) and set(labelled) <= extremes
    renderer = fig.canvas.get_renderer()
    boxes = [text.get_window_extent(renderer) for text in ax.texts]
    assert len(boxes) == len(labelled)
    assert not any(a.overlaps(b) for k, a in enumerate(boxes) for b in boxes[k + 1:])
    plt.close(fig)
