"""SGD (momentum 0.9, weight decay 1e-2, lr 0.01), one optimizer step: fastcore5.optim.SGD in
its normal and its contiguous mode against torch.optim.SGD with foreach=True and fused=True,
on the three parameter sets of the H200 anchors (anchors/, measured by the project's
measure_anchors.py, which is not in this repository):

    one_64M               one fp32 tensor of 2**26 parameters
    resnet50_like_161x    161 tensors, 40,028,608 parameters (107 small + 54 large, seeded mix)
    many_small_2000x4096  2000 tensors of 4096 parameters (host overhead, not bandwidth)

On CPU tensors (no GPU, or --device cpu) two other sets, the issue-24 targets of the C++ CPU
kernel (fastcore5 runs it there, backend "cpu"):

    collab_40x            the four tables of the lesson's collab model at ML-100k sizes
                          (944x50, 1683x50, 944x1, 1683x1) ten times over: 40 tensors, 1,339,770
                          parameters, about the size of one CPU's L2+L3 (p + grad + buf: 16 MB)
    one_16M               one fp32 tensor of 2**24 parameters (192 MB: memory bandwidth)

bytes_moved = 20 bytes per parameter (read p, grad, buf; write p, buf). Every optimizer owns its
parameters (same values, same fixed gradients), so the runs do not disturb each other; each
set is larger than L2 (the smallest, 8.2M parameters, is 98 MB of p + grad + buf), so no
rotation is needed. The first call of each step creates the momentum buffers (and compiles the
kernel); the timers warm up past it.
"""
from __future__ import annotations

import random

import torch

from fastcore5.optim import SGD

from .common import Case

HYPER = dict(lr=0.01, momentum=0.9, weight_decay=1e-2)


def resnet50_like_sizes() -> list[int]:
    """The anchors' 161-tensor mix: the same seeded draws as measure_anchors.py."""
    draw = random.Random(0)
    small = [draw.choice([64, 256, 512, 2048]) for _ in range(107)]
    large = [draw.choice([36864, 147456, 589824, 2359296, 1048576]) for _ in range(54)]
    return small + large


COLLAB_ML100K_TABLES = [944 * 50, 1683 * 50, 944, 1683]


def parameter_sets(device: str, quick: bool) -> dict[str, list[int]]:
    if device != "cuda":
        return {"collab_40x": COLLAB_ML100K_TABLES * 10, "one_16M": [1 << 24]}
    return {
        "one_64M": [1 << 26],
        "resnet50_like_161x": resnet50_like_sizes(),
        "many_small_2000x4096": [4096] * 2000,
    }


def _params(values):
    params = [torch.nn.Parameter(v.clone()) for v in values]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def _step(optimizer):
    return lambda: optimizer.step()


def _contiguous_step(optimizer, grad_view):
    # In training, backward accumulates into the flat gradient views, which bumps their shared
    # version counter: the optimizer's O(1) sign that the views are still the gradients. Bumping
    # it here (host-only, no device work) stands in for that backward; without it every step
    # would take the O(n) path that looks at each .grad.
    def step():
        torch.autograd.graph.increment_version(grad_view)
        optimizer.step()

    return step


def cases(device: str, quick: bool = False) -> list[Case]:
    result = []
    for name, sizes in parameter_sets(device, quick).items():
        numel = sum(sizes)
        values = [torch.randn(n, device=device) for n in sizes]
        torch_fns = {
            "foreach": _step(torch.optim.SGD(_params(values), foreach=True, **HYPER)),
            "fused": _step(torch.optim.SGD(_params(values), fused=True, **HYPER)),
        }
        normal = SGD(_params(values), **HYPER)
        flat_params = _params(values)
        contiguous = SGD(flat_params, contiguous=True, **HYPER)
        for p in flat_params:
            p.grad.normal_()  # the flat gradient buffer: fresh values, as a backward would leave
        del values
        prefix = f"sgd.{name}.{numel}p"
        anchors = {"foreach": f"{prefix}.foreach_ms", "fused": f"{prefix}.fused_ms"} if device == "cuda" else {}
        ours = (
            ("step", "fastcore5", _step(normal)),
            ("step.contiguous", "fastcore5.contiguous", _contiguous_step(contiguous, flat_params[0].grad)),
        )
        for mode, label, fn in ours:
            result.append(
                Case(
                    "sgd", f"{name}.{numel}p", "fp32", mode,
                    {label: fn, **torch_fns},
                    ours=label, bytes_moved=20.0 * numel, anchor_keys=anchors,
                )
            )
    return result
