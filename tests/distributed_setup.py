"""What the two-process (gloo, CPU) optimizer tests share: the model, the batches, the training
loop, where each rank takes its half of every batch, and a free port for the process group."""
from __future__ import annotations

import socket

import torch

WORLD = 2
CONFIG = dict(lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True)


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).double()


def batches(steps: int):
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(8, 5, generator=generator, dtype=torch.float64), torch.randn(8, 3, generator=generator, dtype=torch.float64))
        for _ in range(steps)
    ]


def train(model, optimizer, batches, shard=None):
    """Mean-squared-error steps; with ``shard`` (a rank) only that rank's half of each batch."""
    for x, y in batches:
        if shard is not None:
            x, y = x[shard::WORLD], y[shard::WORLD]
        optimizer.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        optimizer.step()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
