"""The specification of every fused op, in plain PyTorch.

Each function is what the lesson writes by hand; every kernel in fastcore5 is tested against
these (in float64 where precision matters), and the "torch" backend runs them directly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def linear_relu(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """relu(x @ weight.T + bias): an affine layer shaped like nn.Linear, then ReLU."""
    return F.relu(F.linear(x, weight, bias))


def embedding_dot_bias(
    users: Tensor,
    items: Tensor,
    u_weight: Tensor,
    i_weight: Tensor,
    u_bias: Tensor,
    i_bias: Tensor,
    y_range: tuple[float, float] | None = None,
) -> Tensor:
    """fastai's EmbeddingDotBias forward for index vectors ``users`` and ``items`` of shape (B,).

    res[b] = <U[users[b]], V[items[b]]> + ub[users[b]] + ib[items[b]], squashed into
    ``y_range = (lo, hi)`` by sigmoid(res) * (hi - lo) + lo when given. Returns shape (B,).
    The bias tables may be (n, 1) like fastai's nn.Embedding(n, 1) or (n,).
    """
    dot = (u_weight[users] * i_weight[items]).sum(-1)
    res = dot + u_bias.reshape(-1)[users] + i_bias.reshape(-1)[items]
    if y_range is None:
        return res
    lo, hi = y_range
    return torch.sigmoid(res) * (hi - lo) + lo


@torch.no_grad()
def sgd_step(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    *,
    lr: float | Tensor,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
) -> list[Tensor | None]:
    """One SGD step, in place on ``params``, with torch.optim.SGD's exact rule.

    g = -grad if maximize else grad
    L2 decay (default):          g += weight_decay * p
    decoupled ("true") decay:    p -= lr * weight_decay * p   (before the gradient step; g untouched)
    momentum: buf = g on the first step, else buf = momentum * buf + (1 - dampening) * g
              g = g + momentum * buf if nesterov else buf
    p -= lr * g
    Returns the momentum buffers (new tensors where a buffer was None); all None without momentum.
    """
    new_buffers: list[Tensor | None] = []
    for p, grad, buf in zip(params, grads, momentum_buffers):
        g = -grad if maximize else grad
        if momentum != 0 and g.layout is not torch.strided:
            g = g.to_dense()  # a sparse gradient (nn.Embedding(sparse=True)): momentum touches every row anyway
        if weight_decay != 0:
            if decoupled_weight_decay:
                p.mul_(1 - lr * weight_decay)
            else:
                g = g.add(p, alpha=weight_decay)
        if momentum != 0:
            if buf is None:
                buf = torch.clone(g).detach()
            else:
                buf.mul_(momentum).add_(g, alpha=1 - dampening)
            g = g.add(buf, alpha=momentum) if nesterov else buf
        if isinstance(lr, Tensor):
            p.sub_(g * lr)
        else:
            p.add_(g, alpha=-lr)
        new_buffers.append(buf)
    return new_buffers
