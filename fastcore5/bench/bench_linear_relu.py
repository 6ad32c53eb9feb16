"""Linear+ReLU: fastcore5 against eager F.linear+relu, the cuBLASLt epilogue
(torch._addmm_activation) and torch.compile, forward and forward+backward; and the MLP built from
it (fastcore5.nn.MLP, shape "mlp:...") against eager nn.Sequential, forward+backward."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fastcore5

from .common import Case, Rotating, copies_to_exceed_l2

SHAPES = [(8192, 1024, 4096), (8192, 4096, 1024), (65536, 256, 256), (1024, 1024, 1024)]
MLP_SHAPE = (8192, (1024, 4096, 4096, 1024))  # issue 14's target: batch, layer sizes
# CPU: issue 24's targets (the GEMMs dominate at K=512; at K=64, the size of tabular and collab
# MLPs, eager's extra passes are a third of the time) and a tabular-sized MLP.
CPU_SHAPES = [(4096, 512, 1024), (4096, 64, 1024)]
MLP_CPU_SHAPE = (4096, (64, 1024, 1024, 16))
MLP_CPU_QUICK_SHAPE = (1024, (64, 256, 256, 16))
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
    elif dtype in (torch.float32, torch.bfloat16) and torch.backends.mkldnn.is_available():
        # oneDNN's GEMM with its own bias+relu post-op (torch's CPU inductor path): the contender
        # to the cpu kernel's relu pass, not used by it because the post-op turns NaN into 0
        forward["onednn_relu_post_op"] = lambda x, w, b: torch.ops.mkldnn._linear_pointwise(x, w, b, "relu", [], "")
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
            if label not in ("cublaslt_epilogue", "onednn_relu_post_op")
        },
        flops=3 * flops,
        anchor_keys={"eager": anchor + ".eager_fwdbwd_ms"},
        details=_chosen_configs(dtype, M, K, N),
    )
    return [fwd, fwdbwd]


def _mlp_case(device, dtype_name, dtype, M, sizes) -> Case:
    """fwd+bwd of the stack Linear, ReLU, ..., Linear on one set of parameters: fastcore5.nn.MLP
    (one autograd boundary, each ReLU mask applied in the grad-input GEMM above it), the same
    stack of per-layer fused LinearReLU modules, and eager nn.Sequential."""
    torch.manual_seed(0)
    linears = [torch.nn.Linear(k, n, device=device, dtype=dtype) for k, n in zip(sizes[:-1], sizes[1:])]
    eager = torch.nn.Sequential(*[m for linear in linears for m in (linear, torch.nn.ReLU())][:-1])
    fused = fastcore5.nn.MLP.from_sequential(eager)
    per_layer = torch.nn.Sequential()
    for linear in linears[:-1]:
        layer = fastcore5.nn.LinearReLU(linear.in_features, linear.out_features, device="meta")
        layer.weight, layer.bias = linear.weight, linear.bias
        per_layer.append(layer)
    per_layer.append(linears[-1])
    inputs = Rotating(
        lambda: (torch.randn(M, sizes[0], device=device, dtype=dtype),),
        copies_to_exceed_l2(M * sizes[0] * torch.finfo(dtype).bits // 8, device),
    )
    grad_out = torch.randn(M, sizes[-1], device=device, dtype=dtype)

    def step(module):
        def run():
            module(*inputs.next()).backward(grad_out)
            module.zero_grad(set_to_none=True)

        return run

    flops = 3 * 2.0 * M * sum(k * n for k, n in zip(sizes[:-1], sizes[1:]))
    fns = {
        "fastcore5": step(fused), "per_layer_linear_relu": step(per_layer), "eager": step(eager),
        "torch.compile": step(torch.compile(eager)),
    }
    # Listed under the Linear+ReLU op, whose backend it runs on; the shape names the stack.
    return Case("linear_relu", f"mlp:{M}x" + "-".join(map(str, sizes)), dtype_name, "fwdbwd", fns, flops=flops)


def cases(device: str, quick: bool = False) -> list[Case]:
    if device == "cuda":
        shapes = SHAPES[:2] if quick else SHAPES
        dtypes = {"bf16": DTYPES["bf16"]} if quick else DTYPES
    else:
        shapes, dtypes = (CPU_SHAPES[1:] if quick else CPU_SHAPES), {"fp32": torch.float32}
    compiled = torch.compile(_eager)
    if device == "cuda":
        mlp = _mlp_case(device, "bf16", torch.bfloat16, *MLP_SHAPE)
    else:
        mlp = _mlp_case(device, "fp32", torch.float32, *(MLP_CPU_QUICK_SHAPE if quick else MLP_CPU_SHAPE))
    return [
        case
        for dtype_name, dtype in dtypes.items()
        for M, K, N in shapes
        for case in _shape_cases(device, dtype_name, dtype, M, K, N, compiled)
    ] + [mlp]
