"""The references are the spec every kernel is tested against, so they are tested against
PyTorch's own modules here."""

import pytest
import torch
import torch.nn.functional as F

from fastcore5 import reference


def test_linear_relu_matches_nn_linear_then_relu():
    layer = torch.nn.Linear(13, 7, dtype=torch.float64)
    x = torch.randn(3, 5, 13, dtype=torch.float64)
    torch.testing.assert_close(reference.linear_relu(x, layer.weight, layer.bias), torch.relu(layer(x)), rtol=0, atol=0)
    torch.testing.assert_close(reference.linear_relu(x, layer.weight), F.relu(x @ layer.weight.T), rtol=0, atol=0)


@pytest.mark.parametrize("y_range", [None, (0.0, 5.5)])
def test_embedding_dot_bias_matches_nn_embedding_model(y_range):
    n_users, n_items, factors = 11, 17, 6
    u_weight, i_weight = torch.nn.Embedding(n_users, factors), torch.nn.Embedding(n_items, factors)
    u_bias, i_bias = torch.nn.Embedding(n_users, 1), torch.nn.Embedding(n_items, 1)
    users = torch.randint(0, n_users, (40,))
    items = torch.randint(0, n_items, (40,))
    # fastai's EmbeddingDotBias.forward, written as in the lesson
    dot = u_weight(users) * i_weight(items)
    expected = dot.sum(1) + u_bias(users).squeeze() + i_bias(items).squeeze()
    if y_range is not None:
        expected = torch.sigmoid(expected) * (y_range[1] - y_range[0]) + y_range[0]
    ours = reference.embedding_dot_bias(
        users, items, u_weight.weight, i_weight.weight, u_bias.weight, i_bias.weight, y_range
    )
    torch.testing.assert_close(ours, expected)


SGD_CONFIGS = [
    dict(lr=0.1),
    dict(lr=torch.tensor(0.05)),
    dict(lr=0.1, weight_decay=0.1),
    dict(lr=0.1, momentum=0.9),
    dict(lr=0.1, momentum=0.9, dampening=0.3),
    dict(lr=0.1, momentum=0.9, nesterov=True),
    dict(lr=0.1, momentum=0.9, weight_decay=0.05, maximize=True),
    dict(lr=0.1, momentum=0.9, weight_decay=0.05, nesterov=True),
]


@pytest.mark.parametrize("config", SGD_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_sgd_step_matches_torch_optim_sgd_trajectory(config):
    shapes = [(4, 3), (5,), (2, 2, 2)]
    ours = [torch.randn(s, dtype=torch.float64) for s in shapes]
    theirs = [p.clone().requires_grad_() for p in ours]
    optimizer = torch.optim.SGD(theirs, foreach=False, **config)
    buffers = [None] * len(ours)
    for _ in range(4):
        grads = [torch.randn_like(p) for p in ours]
        for p, g in zip(theirs, grads):
            p.grad = g.clone()
        optimizer.step()
        buffers = reference.sgd_step(ours, grads, buffers, **config)
        for mine, torch_param in zip(ours, theirs):
            torch.testing.assert_close(mine, torch_param.detach(), rtol=0, atol=1e-15)
    if config.get("momentum"):
        for buf, p in zip(buffers, theirs):
            torch.testing.assert_close(buf, optimizer.state[p]["momentum_buffer"], rtol=0, atol=1e-15)
    else:
        assert buffers == [None] * len(ours)


def test_sgd_decoupled_weight_decay_is_the_lesson_formula():
    p = torch.randn(6, dtype=torch.float64)
    grad = torch.randn(6, dtype=torch.float64)
    lr, wd = 0.1, 0.3
    expected = p - lr * wd * p - lr * grad
    reference.sgd_step([p], [grad], [None], lr=lr, weight_decay=wd, decoupled_weight_decay=True)
    torch.testing.assert_close(p, expected)



@pytest.mark.parametrize("module, name", [
    ("fastcore5", "embedding_dot_bias"), ("fastcore5", "linear_relu"), ("fastcore5.ops.sgd", "sgd_step"),
])
def test_the_fused_ops_take_the_spec_parameters_first(module, name):
    """Each fused op is a drop-in for its spec: the same parameters, in order, with the same
    defaults; options of its own come after them."""
    import importlib
    import inspect

    spec = list(inspect.signature(getattr(reference, name)).parameters.values())
    ours = list(inspect.signature(getattr(importlib.import_module(module), name)).parameters.values())
    assert [(p.name, p.kind, p.default) for p in ours[: len(spec)]] == [(p.name, p.kind, p.default) for p in spec]
