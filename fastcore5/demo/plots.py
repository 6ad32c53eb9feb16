"""PNG plots of the demo's results (matplotlib, drawn off-screen with the Agg backend)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .collab import CollabResult, Interpretation
from .data import Ratings
from .digits import DigitsResult

PCA_EXTREMES = 4  # items labelled at each end of each axis: the lesson reads the extremes


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
    ax.set(xlabel="epoch", ylabel="mean squared error (stars²)", title="EmbeddingDotBias learning curve")
    ax.legend()
    paths.append(_save(fig, directory / "collab_learning_curve.png", plt))

    panels = 2 if ratings.planted is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
    ax = axes[0, 0]
    points = ax.scatter(found.mean_rating, found.item_bias, s=4 + 40 * found.count / found.count.max(), c=np.log10(found.count), alpha=0.6)
    fig.colorbar(points, ax=ax, label="log10(number of ratings)")
    ax.set(xlabel="mean rating (stars)", ylabel="learned item bias (model units)", title=f"Item bias, {len(found.items)} most-rated items")
    if ratings.planted is not None:
        ax = axes[0, 1]
        ax.scatter(ratings.planted.item_bias[found.items], found.item_bias, s=5, alpha=0.6)
        ax.set(
            xlabel="planted item bias (generator units)",
            ylabel="learned item bias (model units)",
            title=f"Learned vs planted (r = {found.item_bias_correlation:.3f} over all items)",
        )
    paths.append(_save(fig, directory / "collab_item_bias.png", plt))

    fig, ax = plt.subplots(figsize=(9, 7))
    ax.scatter(found.pca[:, 0], found.pca[:, 1], s=6, color="tab:blue", alpha=0.35, label=f"{len(found.items)} most-rated items")
    labelled = _label_extremes(ax, fig, found.pca[:, :2], [ratings.titles[i] for i in found.items])
    ax.scatter(found.pca[labelled, 0], found.pca[labelled, 1], s=14, color="tab:red", label="labelled: the ends of each axis")
    ax.set(
        xlabel="principal component 1 of the item factors (unitless)",
        ylabel="principal component 2 (unitless)",
        title="Item factors on their first two principal components",
    )
    ax.legend(loc="lower right", fontsize=8)
    paths.append(_save(fig, directory / "collab_item_pca.png", plt))
    return paths


def _label_extremes(ax, fig, points: np.ndarray, names: list[str]) -> list[int]:
    """Labels the PCA_EXTREMES items at each end of each axis, each where it overlaps no label
    already placed (a label that fits nowhere is left out); the indices labelled."""
    order_x, order_y = np.argsort(points[:, 0], kind="stable"), np.argsort(points[:, 1], kind="stable")
    ends = PCA_EXTREMES
    candidates = list(dict.fromkeys([*order_x[:ends], *order_x[::-1][:ends], *order_y[:ends], *order_y[::-1][:ends]]))
    fig.canvas.draw()  # fixes the axis limits, so label boxes are measured where they will be drawn
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    placed, labelled = [], []
    centre = points.mean(axis=0)
    for index in candidates:
        x, y = points[index]
        # text grows from the point towards the middle of the cloud, so an extreme stays on the canvas
        across, up = (1 if x < centre[0] else -1), (1 if y < centre[1] else -1)
        for dx, dy in ((8, 4), (8, 16), (8, -8), (20, 28), (20, -20), (4, 40)):
            text = ax.annotate(names[index], (x, y), xytext=(across * dx, up * dy), textcoords="offset points",
                               ha="left" if across > 0 else "right", va="center", fontsize=9,
                               arrowprops=dict(arrowstyle="-", color="grey", linewidth=0.5))
            box = text.get_window_extent(renderer).expanded(1.04, 1.2)
            if frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1) and not any(box.overlaps(o) for o in placed):
                placed.append(box)
                labelled.append(int(index))
                break
            text.remove()
    return labelled


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
    ax.set(xlabel="epoch", ylabel="cross-entropy (nats)", title="LinearReLU MLP on the 8x8 digits")
    accuracy_axis = ax.twinx()
    accuracy_axis.plot(epochs, [s.valid_accuracy for s in result.history], "s--", color="tab:green", label="validation accuracy")
    accuracy_axis.set(ylabel="validation accuracy (fraction)", ylim=(0, 1))
    lines, labels = ax.get_legend_handles_labels()
    more_lines, more_labels = accuracy_axis.get_legend_handles_labels()
    ax.legend(lines + more_lines, labels + more_labels, loc="center right")
    return [_save(fig, directory / "digits_learning_curve.png", plt)]


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
