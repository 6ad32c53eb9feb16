"""PNG plots of the demo's results (matplotlib, drawn off-screen with the Agg backend)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .collab import CollabResult, Interpretation
from .data import Ratings
from .digits import DigitsResult

PCA_LABELLED_ITEMS = 40  # the lesson labels a few dozen movies on its PCA scatter


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("--plots needs matplotlib: pip install 'fastcore5[demo]' or pip install matplotlib") from err
    matplotlib.use("Agg")  # no display needed; must precede the pyplot import
    import matplotlib.pyplot as plt

    return plt


def plot_collab(result: CollabResult, found: Interpretation, ratings: Ratings, directory: Path) -> list[Path]:
    plt = _pyplot()
    directory.mkdir(parents=True, exist_ok=True)
    paths = []

    epochs = [s.epoch for s in result.history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [s.train_loss for s in result.history], "o-", label="train MSE")
    ax.plot(epochs, [s.valid_loss for s in result.history], "o-", label="validation MSE")
    ax.axhline(result.baseline_mse, color="grey", linestyle="--", label="predicting the mean")
    ax.set(xlabel="epoch", ylabel="MSE", title="EmbeddingDotBias learning curve")
    ax.legend()
    paths.append(_save(fig, directory / "collab_learning_curve.png", plt))

    panels = 2 if ratings.planted is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
    ax = axes[0, 0]
    points = ax.scatter(found.mean_rating, found.item_bias, s=4 + 40 * found.count / found.count.max(), c=np.log10(found.count), alpha=0.6)
    fig.colorbar(points, ax=ax, label="log10(number of ratings)")
    ax.set(xlabel="mean rating", ylabel="learned item bias", title=f"Item bias, {len(found.items)} most-rated items")
    if ratings.planted is not None:
        ax = axes[0, 1]
        ax.scatter(ratings.planted.item_bias[found.items], found.item_bias, s=5, alpha=0.6)
        ax.set(
            xlabel="planted item bias",
            ylabel="learned item bias",
            title=f"Learned vs planted (r = {found.item_bias_correlation:.3f} over all items)",
        )
    paths.append(_save(fig, directory / "collab_item_bias.png", plt))

    shown = min(PCA_LABELLED_ITEMS, len(found.items))
    fig, ax = plt.subplots(figsize=(9, 7))
    ax.scatter(found.pca[:shown, 0], found.pca[:shown, 1], s=8)
    for (x, y), item in zip(found.pca[:shown, :2], found.items[:shown]):
        ax.annotate(ratings.titles[item], (x, y), fontsize=7, alpha=0.8)
    ax.set(
        xlabel="principal component 1",
        ylabel="principal component 2",
        title=f"Item factors of the {shown} most-rated items",
    )
    paths.append(_save(fig, directory / "collab_item_pca.png", plt))
    return paths


def plot_digits(result: DigitsResult, directory: Path) -> list[Path]:
    plt = _pyplot()
    directory.mkdir(parents=True, exist_ok=True)
    epochs = [s.epoch for s in result.history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [s.train_loss for s in result.history], "o-", label="train loss")
    ax.plot(epochs, [s.valid_loss for s in result.history], "o-", label="validation loss")
    frozen = [s.epoch for s in result.history if s.phase == "frozen"]
    if frozen:
        ax.axvline(max(frozen) + 0.5, color="grey", linestyle=":", label="unfreeze")
    ax.set(xlabel="epoch", ylabel="cross-entropy", title="LinearReLU MLP on the 8x8 digits")
    accuracy_axis = ax.twinx()
    accuracy_axis.plot(epochs, [s.valid_accuracy for s in result.history], "s--", color="tab:green", label="validation accuracy")
    accuracy_axis.set(ylabel="accuracy", ylim=(0, 1))
    lines, labels = ax.get_legend_handles_labels()
    more_lines, more_labels = accuracy_axis.get_legend_handles_labels()
    ax.legend(lines + more_lines, labels + more_labels, loc="center right")
    return [_save(fig, directory / "digits_learning_curve.png", plt)]


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
