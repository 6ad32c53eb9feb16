"""Part 2 of the demo: an MLP of fastcore5.nn.LinearReLU layers on scikit-learn's 8x8 digits
(1,797 images that ship inside scikit-learn, so nothing is downloaded).

Trained the way the lesson fine-tunes: the layers form groups (two LinearReLU layers of "body",
a Linear head); first the body is frozen and only the head trains, then everything trains with
discriminative learning rates, slice(lr / lr_spread, lr) spread geometrically from the first
group to the head, under fastcore5.optim.SGD with momentum and weight decay and a one-cycle
schedule per phase.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TextIO

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..nn import LinearReLU
from ..optim import SGD, discriminative_param_groups, lr_range
from . import _console
from ._common import DemoError, EpochStats, Stopwatch, backends_for, interpreter_estimate, one_cycle, train_one_epoch

OPS = ("linear_relu", "sgd")
N_CLASSES = 10


@dataclass
class DigitsSettings:
    epochs: int = 8  # with the whole network training, after the frozen epochs
    freeze_epochs: int = 1  # head only, as fastai's fine_tune does first
    batch_size: int = 64
    lr: float = 0.5  # peak lr of the head; the body's groups get less (see lr_spread)
    lr_spread: float = 10.0  # first group's lr = lr / lr_spread
    momentum: float = 0.9
    weight_decay: float = 1e-4
    hidden: tuple[int, ...] = (128, 64)
    valid_fraction: float = 0.2
    seed: int = 0
    max_samples: int | None = None  # use only this many images (for quick checks)


@dataclass
class DigitsResult:
    model: nn.Module
    history: list[EpochStats]
    layer_group_lrs: list[float]
    backends: dict[str, str]
    seconds: float
    n_train: int
    n_valid: int

    @property
    def valid_accuracy(self) -> float:
        return self.history[-1].valid_accuracy


def load_digits_tensors(seed: int, valid_fraction: float, max_samples: int | None = None):
    """(x_train, y_train, x_valid, y_valid): pixels standardised with the training split's mean
    and std per pixel (a pixel that is constant in training is only centred)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError(
            "the digits part of the demo needs scikit-learn (its 8x8 digits data ships inside it): "
            "pip install 'fastcore5[demo]' or pip install scikit-learn"
        ) from err
    images, labels = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(labels))[:max_samples]
    images, labels = images[order].astype(np.float32), labels[order].astype(np.int64)
    n_valid = max(1, int(len(labels) * valid_fraction))
    x_valid, x_train = images[:n_valid], images[n_valid:]
    mean, std = x_train.mean(0), x_train.std(0)
    std[std == 0] = 1.0

    def standardise(x):
        return torch.from_numpy((x - mean) / std)

    return standardise(x_train), torch.from_numpy(labels[n_valid:]), standardise(x_valid), torch.from_numpy(labels[:n_valid])


def build_mlp(hidden: tuple[int, ...], n_inputs: int = 64) -> tuple[nn.Sequential, list[nn.Module]]:
    """The MLP and its layer groups: one group per LinearReLU layer, then the Linear head."""
    widths = (n_inputs, *hidden)
    layers = [LinearReLU(a, b) for a, b in zip(widths, widths[1:])] + [nn.Linear(widths[-1], N_CLASSES)]
    return nn.Sequential(*layers), layers


def train_digits(settings: DigitsSettings, device: torch.device, stream: TextIO) -> DigitsResult:
    stopwatch = Stopwatch(device)
    x_train, y_train, x_valid, y_valid = (
        t.to(device) for t in load_digits_tensors(settings.seed, settings.valid_fraction, settings.max_samples)
    )
    steps_per_epoch = len(x_train) // settings.batch_size
    if steps_per_epoch == 0:
        raise DemoError(
            f"{len(x_train)} training images are fewer than one batch of {settings.batch_size}: "
            f"lower --batch-size to {len(x_train)} or less"
        )
    torch.manual_seed(settings.seed)
    model, layer_groups = build_mlp(settings.hidden)
    model.to(device)
    lrs = slice(settings.lr / settings.lr_spread, settings.lr)
    optimizer = SGD(
        discriminative_param_groups(layer_groups, lrs),
        lr=settings.lr,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
    )
    group_lrs = lr_range(lrs, len(layer_groups))
    used = backends_for(OPS, device)

    layer_names = " -> ".join([f"LinearReLU({m.in_features}, {m.out_features})" for m in layer_groups[:-1]] + ["Linear head"])
    stream.write(
        f"  {len(x_train)} images to train on, {len(x_valid)} to validate; {layer_names}\n"
        f"  SGD momentum {settings.momentum} (cycled 0.95-0.85), weight decay {settings.weight_decay:g}, "
        f"batch size {settings.batch_size}; {_console.plural(settings.freeze_epochs, 'epoch')} with the body frozen, then "
        f"{settings.epochs} with discriminative lrs slice({lrs.start:g}, {lrs.stop:g}) -> "
        f"{', '.join(f'{lr:.3g}' for lr in group_lrs)} per layer group\n"
    )
    stream.write(f"  {'epoch':>5}  {'phase':<8}  {'train loss':>10}  {'valid loss':>10}  {'accuracy':>8}  {'time':>8}\n")
    generator = torch.Generator().manual_seed(settings.seed)
    estimate = interpreter_estimate(used, device, (settings.freeze_epochs + settings.epochs) * steps_per_epoch, stream)
    history: list[EpochStats] = []
    phases = [("frozen", settings.freeze_epochs, optimizer.freeze), ("unfrozen", settings.epochs, optimizer.unfreeze)]
    for phase, epochs, set_trainable in phases:
        if epochs == 0:
            continue
        set_trainable()
        schedule = one_cycle(optimizer, group_lrs, epochs * steps_per_epoch)
        for _ in range(epochs):
            clock = Stopwatch(device)
            order = torch.randperm(len(x_train), generator=generator).to(device)
            epoch = len(history) + 1
            train_loss = train_one_epoch(
                model, optimizer, schedule, F.cross_entropy, x_train, y_train, order, settings.batch_size,
                stream, f"epoch {epoch} ({phase})", "loss", after_warm_up=estimate if epoch == 1 else None,
            )
            valid_loss, accuracy = evaluate(model, x_valid, y_valid)
            stats = EpochStats(epoch, phase, train_loss, valid_loss, accuracy, clock.elapsed())
            history.append(stats)
            stream.write(
                f"  {epoch:>5}  {phase:<8}  {stats.train_loss:>10.4f}  {valid_loss:>10.4f}  {accuracy:>8.1%}  "
                f"{_console.seconds(stats.seconds):>8}\n"
            )
            stream.flush()
    stream.write(
        f"  validation accuracy {history[-1].valid_accuracy:.1%} on {len(x_valid)} images "
        f"(chance: {1 / N_CLASSES:.0%})\n"
    )
    return DigitsResult(model, history, group_lrs, used, stopwatch.elapsed(), len(x_train), len(x_valid))


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(cross-entropy, accuracy) over the whole set."""
    model.eval()
    logits = model(x)
    return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())
