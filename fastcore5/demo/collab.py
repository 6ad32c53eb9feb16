"""Part 1 of the demo: collaborative filtering as in the lesson.

fastcore5.nn.EmbeddingDotBias trained with fastcore5.optim.SGD (momentum, weight decay) under a
one-cycle schedule, reporting train and validation MSE per epoch; then the lesson's reading of
the model: items with the highest and lowest learned bias, the extremes of the first principal
components of the item factors and, on synthetic data, how well the learned biases match the
planted ones.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TextIO

import numpy as np
import torch
import torch.nn.functional as F

from .. import backends
from ..nn import EmbeddingDotBias
from ..optim import SGD
from . import _console
from ._common import DemoError, EpochStats, Stopwatch, backends_for, interpreter_estimate, one_cycle, train_one_epoch
from .data import Ratings

OPS = ("embedding_dot_bias", "sgd")
# The interpretation reads the item factors on this many principal components (one per item at most).
PCA_COMPONENTS = 2


@dataclass
class CollabSettings:
    # Tuned on the synthetic set: 5 epochs at batch 256 and peak lr 2 with L2 2e-4 reach a
    # validation MSE of ~0.65 (predicting the mean: ~1.05; lr 10 diverges). On a batch-mean loss an
    # embedding row's gradient shrinks with the batch size, hence rates far above the lesson's
    # Adam 5e-3; scale the lr with the batch size.
    epochs: int = 5
    batch_size: int = 256
    lr: float = 2.0
    momentum: float = 0.9
    weight_decay: float = 2e-4  # L2, added to the gradient (the lesson's wd * sum(w**2) penalty)
    n_factors: int = 50
    valid_fraction: float = 0.2
    seed: int = 0


@dataclass
class CollabResult:
    model: torch.nn.Module
    history: list[EpochStats]
    baseline_mse: float  # validation MSE of always predicting the training mean
    backends: dict[str, str]
    seconds: float
    train_rows: torch.Tensor  # indices into the Ratings used for training
    valid_rows: torch.Tensor
    # On a CPU whose ops ran native kernels: one more epoch, timed on the plain-PyTorch reference
    # (a fresh model), to show what the kernels gain; None otherwise.
    reference_epoch_seconds: float | None = None

    @property
    def epoch_seconds(self) -> float:
        """The median epoch time of the training run (the first epoch carries the warm-up)."""
        return float(np.median([stats.seconds for stats in self.history]))

    @property
    def valid_mse(self) -> float:
        return self.history[-1].valid_loss


@dataclass
class Interpretation:
    """What interpret_collab read from the model (arrays are over ``items``, the most-rated items)."""

    items: np.ndarray  # item indices considered, most-rated first
    item_bias: np.ndarray  # their learned biases
    mean_rating: np.ndarray
    count: np.ndarray
    pca: np.ndarray  # (len(items), components) coordinates on the principal components of the factors
    highest_bias: list[tuple[str, float, float, int]] = field(default_factory=list)  # (title, bias, mean, count)
    lowest_bias: list[tuple[str, float, float, int]] = field(default_factory=list)
    pca_extremes: list[tuple[list[str], list[str]]] = field(default_factory=list)  # per component: (high, low)
    # synthetic data only: agreement with what the generator planted
    item_bias_correlation: float | None = None
    user_bias_correlation: float | None = None
    pca_r2_planted: list[float] = field(default_factory=list)
    seconds: float = 0.0


def train_collab(ratings: Ratings, settings: CollabSettings, device: torch.device, stream: TextIO) -> CollabResult:
    stopwatch = Stopwatch(device)
    generator = torch.Generator().manual_seed(settings.seed)
    order = torch.randperm(len(ratings), generator=generator)
    n_valid = int(len(ratings) * settings.valid_fraction)
    valid_rows, train_rows = order[:n_valid], order[n_valid:]
    steps_per_epoch = len(train_rows) // settings.batch_size  # full batches only, as fastai trains
    if n_valid == 0:
        raise DemoError(
            f"{len(ratings)} ratings leave none for validation ({settings.valid_fraction:.0%} of them rounds down to 0): "
            f"use at least {math.ceil(1 / settings.valid_fraction)} ratings"
        )
    if ratings.n_items < PCA_COMPONENTS:
        raise DemoError(
            f"the ratings cover {_console.plural(ratings.n_items, 'item')}: the interpretation reads the item factors "
            f"on {PCA_COMPONENTS} principal components, so it needs ratings of at least {PCA_COMPONENTS} items"
        )
    if steps_per_epoch == 0:
        raise DemoError(
            f"{len(ratings)} ratings leave {len(train_rows)} for training, fewer than one batch of {settings.batch_size}: "
            f"lower --batch-size to {len(train_rows)} or less, or use more ratings"
        )

    pairs = torch.stack([ratings.users, ratings.items], dim=1).to(device)
    targets = ratings.ratings.to(device)
    valid_pairs, valid_targets = pairs[valid_rows.to(device)], targets[valid_rows.to(device)]
    baseline_mse = F.mse_loss(torch.full_like(valid_targets, float(targets[train_rows.to(device)].mean())), valid_targets)

    model, optimizer, schedule = _fresh_training(ratings, settings, device, settings.epochs * steps_per_epoch)
    used = backends_for(OPS, device)

    stream.write(
        f"  {len(train_rows)} ratings to train on, {n_valid} to validate; {settings.n_factors} factors, "
        f"y_range {tuple(round(v, 2) for v in ratings.y_range())}\n"
        f"  SGD momentum {settings.momentum} (cycled 0.95-0.85), weight decay {settings.weight_decay:g}, "
        f"one-cycle to lr {settings.lr:g}, batch size {settings.batch_size}, {_console.plural(settings.epochs, 'epoch')}\n"
    )
    estimate = interpreter_estimate(used, device, settings.epochs * steps_per_epoch, stream)
    history: list[EpochStats] = []
    stream.write(f"  {'epoch':>5}  {'train MSE':>9}  {'valid MSE':>9}  {'time':>8}\n")
    for epoch in range(1, settings.epochs + 1):
        epoch_clock = Stopwatch(device)
        shuffled = train_rows[torch.randperm(len(train_rows), generator=generator)].to(device)
        train_loss = train_one_epoch(
            model, optimizer, schedule, F.mse_loss, pairs, targets, shuffled, settings.batch_size,
            stream, f"epoch {epoch}/{settings.epochs}", "train MSE", after_warm_up=estimate if epoch == 1 else None,
        )
        stats = EpochStats(
            epoch=epoch,
            phase="train",
            train_loss=train_loss,
            valid_loss=evaluate_mse(model, valid_pairs, valid_targets),
            valid_accuracy=None,
            seconds=epoch_clock.elapsed(),
        )
        history.append(stats)
        stream.write(
            f"  {epoch:>5}  {stats.train_loss:>9.4f}  {stats.valid_loss:>9.4f}  {_console.seconds(stats.seconds):>8}\n"
        )
        stream.flush()
    final = history[-1].valid_loss
    stream.write(
        f"  validation MSE {final:.4f} against {float(baseline_mse):.4f} for always predicting the mean rating "
        f"({100 * (1 - final / float(baseline_mse)):.0f}% lower)\n"
    )
    seconds = stopwatch.elapsed()
    reference_epoch_seconds = None
    if device.type == "cpu" and set(used.values()) - {"torch", "triton"}:
        shuffled = train_rows[torch.randperm(len(train_rows), generator=generator)].to(device)
        reference_epoch_seconds = _reference_epoch_seconds(ratings, settings, device, pairs, targets, shuffled, stream)
        stream.write(
            f"  one epoch on the plain-PyTorch reference (a fresh model, for comparison): "
            f"{_console.seconds(reference_epoch_seconds)}, against a median of "
            f"{_console.seconds(float(np.median([stats.seconds for stats in history])))} above\n"
        )
    return CollabResult(
        model=model,
        history=history,
        baseline_mse=float(baseline_mse),
        backends=used,
        seconds=seconds,
        train_rows=train_rows,
        valid_rows=valid_rows,
        reference_epoch_seconds=reference_epoch_seconds,
    )


def _fresh_training(ratings: Ratings, settings: CollabSettings, device: torch.device, total_steps: int):
    """(model, optimizer, one-cycle schedule) as training starts, seeded by the settings."""
    torch.manual_seed(settings.seed)
    model = EmbeddingDotBias(settings.n_factors, ratings.n_users, ratings.n_items, y_range=ratings.y_range()).to(device)
    optimizer = SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    return model, optimizer, one_cycle(optimizer, settings.lr, total_steps)


def _reference_epoch_seconds(ratings, settings, device, pairs, targets, order, stream) -> float:
    """Seconds of one training epoch of a fresh model with every op on the reference backend."""
    steps = len(order) // settings.batch_size
    with backends.use_backend("torch"):
        model, optimizer, schedule = _fresh_training(ratings, settings, device, steps)
        clock = Stopwatch(device)
        train_one_epoch(
            model, optimizer, schedule, F.mse_loss, pairs, targets, order, settings.batch_size,
            stream, "reference epoch", "train MSE",
        )
        return clock.elapsed()


@torch.no_grad()
def evaluate_mse(model: torch.nn.Module, pairs: torch.Tensor, targets: torch.Tensor, chunk: int = 65536) -> float:
    model.eval()
    squared_error = sum(
        F.mse_loss(model(pairs[start : start + chunk]), targets[start : start + chunk], reduction="sum")
        for start in range(0, len(pairs), chunk)
    )
    return float(squared_error) / len(pairs)


@torch.no_grad()
def interpret_collab(
    model: EmbeddingDotBias, ratings: Ratings, stream: TextIO, top: int = 10, most_rated: int = 1000, components: int = PCA_COMPONENTS
) -> Interpretation:
    """The lesson's reading of a trained EmbeddingDotBias, printed to ``stream`` and returned.

    As in the lesson, biases and factors are read for the ``most_rated`` items with the most
    ratings only: the bias of an item seen a handful of times says little.
    """
    clock = Stopwatch(torch.device("cpu"))
    mean_rating, count = ratings.item_stats()
    items = np.argsort(-count, kind="stable")[: min(most_rated, ratings.n_items)]
    ids = torch.from_numpy(items)
    found = Interpretation(
        items=items,
        item_bias=model.bias(ids, is_item=True).double().numpy(),
        mean_rating=mean_rating[items],
        count=count[items],
        pca=model.pca(components, ids=ids, is_item=True).double().numpy(),
    )
    planted = ratings.planted

    def rows(positions):
        return [
            (ratings.titles[items[p]], float(found.item_bias[p]), float(found.mean_rating[p]), int(found.count[p]))
            for p in positions
        ]

    by_bias = np.argsort(found.item_bias, kind="stable")
    found.highest_bias, found.lowest_bias = rows(by_bias[::-1][:top]), rows(by_bias[:top])
    headers = ["title", "learned bias", "mean rating", "ratings"] + (["planted bias"] if planted else [])
    for label, chosen, positions in (
        ("highest", found.highest_bias, by_bias[::-1][:top]),
        ("lowest", found.lowest_bias, by_bias[:top]),
    ):
        table_rows = [list(row) for row in chosen]
        if planted:
            for row, p in zip(table_rows, positions):
                row.append(float(planted.item_bias[items[p]]))
        stream.write(f"  The {len(chosen)} items with the {label} learned bias, among the {len(items)} most-rated:\n")
        stream.write(_console.table(headers, table_rows, indent="    ") + "\n")

    ends = max(3, top // 2)
    for component in range(found.pca.shape[1]):
        order = np.argsort(found.pca[:, component], kind="stable")
        high = [ratings.titles[i] for i in items[order[::-1][:ends]]]
        low = [ratings.titles[i] for i in items[order[:ends]]]
        found.pca_extremes.append((high, low))
        note = ""
        if planted:
            r2 = _r_squared(found.pca[:, component], planted.item_factors[items])
            found.pca_r2_planted.append(r2)
            note = f" (R^2 {r2:.2f} against the planted item factors)"
        stream.write(f"  Principal component {component + 1} of the item factors{note}: the items at each end\n")
        stream.write(_console.table(["high end", "low end"], list(zip(high, low)), indent="    ") + "\n")

    if planted:
        learned_items = model.bias(torch.arange(ratings.n_items), is_item=True).double().numpy()
        learned_users = model.bias(torch.arange(ratings.n_users), is_item=False).double().numpy()
        found.item_bias_correlation = float(np.corrcoef(learned_items, planted.item_bias)[0, 1])
        found.user_bias_correlation = float(np.corrcoef(learned_users, planted.user_bias)[0, 1])
        stream.write(
            f"  Learned against planted biases, Pearson correlation over all items: {found.item_bias_correlation:.3f}, "
            f"all users: {found.user_bias_correlation:.3f}\n"
        )
    found.seconds = clock.elapsed()
    return found


def _r_squared(target: np.ndarray, predictors: np.ndarray) -> float:
    """Share of the variance of ``target`` a least-squares fit on ``predictors`` (plus a constant) explains."""
    design = np.column_stack([predictors, np.ones(len(target))])
    coefficients, *_ = np.linalg.lstsq(design, target, rcond=None)
    residual = target - design @ coefficients
    return float(1 - residual.var() / target.var())
