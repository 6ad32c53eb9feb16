"""Linear+ReLU: fastcore5 against eager F.linear+relu, the cuBLASLt epilogue
(torch._addmm_activation) and torch.compile, forward and forward+backward."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fastcore5

from .common import Case, Rotating, copies_to_exceed_l2

SHAPES = [(8192, 1024, 4096), (8192, 4096, 1024), (65536, 256, 256), (1024, 1024, 1024)]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _eager(x, w, b):
    return F.relu(F.linear(x, w, b))


def _fwd_bwd(fn, grad_out):
    def run(x, w, b):
        out = fn(x, w, b)
        out.backward(grad_out)
        x.grad = w.grad = b.grad = None

    return run


def _chosen_configs(dtype, M, K, N):
    """The Triton configs this process launched for this case's kernels (empty on other backends):
    forward (rows M, cols N, reduction K), grad_x (M, K, N), grad_W (N, K, M)."""

    def details():
        from fastcore5.kernels.linear_relu import tuned_configs  # triton only when a case has run

        dims = {
            "Linear+ReLU forward": f" cols={N} reduction={K} ",
            "Linear+ReLU grad_x": f" cols={K} reduction={N} ",
            "Linear+ReLU grad_W/grad_b": f" rows={N} cols={K} ",
        }
        dtype_part = "dtype=" + str(dtype).replace("torch.", "")
        return {
            "triton_configs": [
                row for row in tuned_configs()
                if dtype_part in row["bucket"] and dims[row["kernel"].removesuffix(" (TMA)")] in row["bucket"]
            ]
        }

    return details


def _shape_cases(device, dtype_name, dtype, M, K, N, compiled) -> list[Case]:
    def make():
        x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
        w = (torch.randn(N, K, device=device, dtype=dtype) / K**0.5).requires_grad_()
        b = torch.randn(N, device=device, dtype=dtype, requires_grad=True)
        return x, w, b

    set_bytes = (M * K + N * K + M * N) * torch.finfo(dtype).bits // 8
    inputs = Rotating(make, copies_to_exceed_l2(set_bytes, device))
    grad_out = torch.randn(M, N, device=device, dtype=dtype)
    shape = f"{M}x{K}x{N}"
    anchor = f"linrelu.{dtype_name}.{shape}"
    forward = {"fastcore5": fastcore5.linear_relu, "eager": _eager, "torch.compile": compiled}
    if device == "cuda":
        forward["cublaslt_epilogue"] = lambda x, w, b: torch._addmm_activation(b, x, w.t())
    flops = 2.0 * M * K * N
    fwd = Case(
        "linear_relu", shape, dtype_name, "fwd",
        {label: (lambda fn=fn: fn(*inputs.next())) for label, fn in forward.items()},
        flops=flops,
        anchor_keys={"eager": anchor + ".eager_fwd_ms", "cublaslt_epilogue": anchor + ".cublaslt_epilogue_fwd_ms"},
        details=_chosen_configs(dtype, M, K, N),
    )
    fwdbwd = Case(
        "linear_relu", shape, dtype_name, "fwdbwd",
        {
            label: (lambda step=_fwd_bwd(fn, grad_out): step(*inputs.next()))
            for label, fn in forward.items()
            if label != "cublaslt_epilogue"
        },
        flops=3 * flops,
        anchor_keys={"eager": anchor + ".eager_fwdbwd_ms"},
        details=_chosen_configs(dtype, M, K, N),
    )
    return [fwd, fwdbwd]


def cases(device: str, quick: bool = False) -> list[Case]:
    if device == "cuda":
        shapes = SHAPES[:2] if quick else SHAPES
        dtypes = {"bf16": DTYPES["bf16"]} if quick else DTYPES
    else:
        shapes, dtypes = [(256, 256, 256)], {"fp32": torch.float32}
    compiled = torch.compile(_eager)
    return [
        case
        for dtype_name, dtype in dtypes.items()
        for M, K, N in shapes
        for case in _shape_cases(device, dtype_name, dtype, M, K, N, compiled)
    ]
