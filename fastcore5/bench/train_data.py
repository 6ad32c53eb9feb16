"""The training benchmark's sizes, synthetic data and eager models (see train.py): the data and
the models are built the same way for every variant, so the four runs differ only in how they run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fastcore5.nn import MLP

__all__ = [
    "CollabSize", "MLPSize", "ITEM_ZIPF", "USER_ZIPF", "zipf_ids", "synthetic_ratings", "mlp_data",
    "EagerDotBias", "mlp",
]


@dataclass(frozen=True)
class CollabSize:
    n_ratings: int
    n_users: int
    n_items: int
    n_factors: int
    batch: int
    lr: float  # one-cycle peak; the loss is a mean over the batch, hence large for embedding rows
    valid_fraction: float = 0.1
    y_range: tuple[float, float] = (0.0, 5.5)
    momentum: float = 0.9
    weight_decay: float = 1e-4


@dataclass(frozen=True)
class MLPSize:
    batch: int
    widths: tuple[int, ...]
    steps: int
    lr: float = 0.01
    momentum: float = 0.9


ITEM_ZIPF = (1.0, 50.0)  # p(rank r) ~ 1 / (r + 50): top item 0.28% of ratings at full size (ML-25M: ~0.3%)
USER_ZIPF = (0.5, 100.0)  # users are skewed too, less so


# ----------------------------------------------------------------------------------------- data


def zipf_ids(count: int, n: int, exponent: float, offset: float, generator: torch.Generator, device) -> torch.Tensor:
    """``count`` ids in [0, n) drawn with p(rank r) proportional to 1 / (r + offset)**exponent, the
    ranks scattered over the ids by a random permutation (popular rows are not all at the start)."""
    ranks = torch.arange(n, dtype=torch.float64, device=device)
    cdf = torch.cumsum((ranks + 1 + offset).pow(-exponent), 0)
    cdf /= cdf[-1].clone()
    draws = torch.rand(count, generator=generator, device=device, dtype=torch.float64)
    picked = torch.searchsorted(cdf, draws).clamp_(max=n - 1)
    return torch.randperm(n, generator=generator, device=device)[picked]


def synthetic_ratings(size: CollabSize, device, seed: int = 0):
    """Shuffled (train_x, train_y, valid_x, valid_y): (user, item) pairs and half-star ratings in
    [0.5, 5] from a planted rank-8 model with biases and noise, so there is something to learn."""
    generator = torch.Generator(device=device).manual_seed(seed)

    def normal(*shape, std):
        return torch.randn(*shape, generator=generator, device=device) * std

    users = zipf_ids(size.n_ratings, size.n_users, *USER_ZIPF, generator, device)
    items = zipf_ids(size.n_ratings, size.n_items, *ITEM_ZIPF, generator, device)
    user_factors, item_factors = normal(size.n_users, 8, std=0.4), normal(size.n_items, 8, std=0.4)
    user_bias, item_bias = normal(size.n_users, std=0.3), normal(size.n_items, std=0.5)
    ratings = torch.empty(size.n_ratings, device=device)
    chunk = 1 << 22  # bounds the (chunk, 8) gathers
    for start in range(0, size.n_ratings, chunk):
        u, i = users[start:start + chunk], items[start:start + chunk]
        score = 3.5 + user_bias[u] + item_bias[i] + (user_factors[u] * item_factors[i]).sum(1)
        ratings[start:start + chunk] = score + normal(u.numel(), std=0.5)
    ratings = (ratings * 2).round_().clamp_(1, 10) / 2
    pairs = torch.stack([users, items], dim=1)
    order = torch.randperm(size.n_ratings, generator=generator, device=device)
    n_valid = int(size.n_ratings * size.valid_fraction)
    valid, train = order[:n_valid], order[n_valid:]
    return pairs[train], ratings[train], pairs[valid], ratings[valid]


# --------------------------------------------------------------------------------------- models


class EagerDotBias(nn.Module):
    """The lesson's formula on nn.Embedding, as fastai writes it; parameter names as fastai's, so
    fastcore5's EmbeddingDotBias state_dict loads here unchanged."""

    def __init__(self, n_factors, n_users, n_items, y_range, device=None):
        super().__init__()
        self.y_range = y_range
        self.u_weight = nn.Embedding(n_users, n_factors, device=device)
        self.i_weight = nn.Embedding(n_items, n_factors, device=device)
        self.u_bias = nn.Embedding(n_users, 1, device=device)
        self.i_bias = nn.Embedding(n_items, 1, device=device)

    def forward(self, x):
        users, items = x[:, 0], x[:, 1]
        res = (self.u_weight(users) * self.i_weight(items)).sum(1) + self.u_bias(users)[:, 0] + self.i_bias(items)[:, 0]
        low, high = self.y_range
        return torch.sigmoid(res) * (high - low) + low


def mlp(widths: tuple[int, ...], fused: bool, device) -> nn.Sequential:
    """Linear -> ReLU for every layer but the last (plain Linear): fastcore5.nn.MLP, the stack as
    one fused op, or the same layers as a plain nn.Sequential."""
    model = MLP(widths, device=device)
    return model if fused else nn.Sequential(*model)


def mlp_data(size: MLPSize, device, seed: int = 0, n_batches: int = 4):
    """Batches of inputs and targets of a fixed random teacher (with a ReLU, so not learnt at once)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    n_in, n_out = size.widths[0], size.widths[-1]
    teacher = torch.randn(n_in, n_out, generator=generator, device=device) / math.sqrt(n_in)
    inputs = [torch.randn(size.batch, n_in, generator=generator, device=device) for _ in range(n_batches)]
    return inputs, [torch.relu(x @ teacher) for x in inputs]
