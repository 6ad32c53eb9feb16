"""Linear+ReLU: fastcore5 against eager F.linear+relu, the cuBLASLt epilogue
(torch._addmm_activation) and torch.compile, forward and forward+backward."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fastcore5

from .common import Case, Rotating, copies_to_exceed_l2

SHAPES = [(8192, 1024, 4096), (8192, 4096, 1024), (65536, 256, 256), (1024, 1024, 1024)]
QUICK_SHAPES = {"cuda": SHAPES[:2], "cpu": [(256, 256, 256)]}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _eager(x, w, b):
    return F.relu(F.linear(x, w, b))


def _fwd_bwd(fn, grad_out):
    def run(x, w, b):
        out = fn(x, w, b)
        out.backward(grad_out)
        x.grad = w.grad = b.grad = None

    return run


def cases(device: str, quick: bool = False) -> list[Case]:
    shapes = QUICK_SHAPES[device] if quick else (SHAPES if device == "cuda" else QUICK_SHAPES["cpu"])
    dtypes = {"bf16": DTYPES["bf16"]} if quick else DTYPES
    if device == "cpu":
        dtypes = {"fp32": torch.float32}
    compiled = torch.compile(_eager)
    result = []
    for dtype_name, dtype in dtypes.items():
        for M, K, N in shapes:

            def make(M=M, K=K, N=N, dtype=dtype):
                x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
                w = (torch.randn(N, K, device=device, dtype=dtype) / K**0.5).requires_grad_()
                b = torch.randn(N, device=device, dtype=dtype, requires_grad=True)
                return x, w, b

            set_bytes = (M * K + N * K + M * N) * torch.finfo(dtype).bits // 8
            inputs = Rotating(make, copies_to_exceed_l2(set_bytes, device))
            grad_out = torch.randn(M, N, device=device, dtype=dtype)
            shape = f"{M}x{K}x{N}"
            anchor = f"linrelu.{dtype_name}.{shape}"
            fwd = {
                "fastcore5": lambda: fastcore5.linear_relu(*inputs.next()),
                "eager": lambda: _eager(*inputs.next()),
                "torch.compile": lambda: compiled(*inputs.next()),
            }
            if device == "cuda":
                fwd["cublaslt_epilogue"] = lambda: (lambda x, w, b: torch._addmm_activation(b, x, w.t()))(*inputs.next())
            flops = 2.0 * M * K * N
            result.append(
                Case("linear_relu", shape, dtype_name, "fwd", fwd, flops=flops,
                     anchor_keys={"eager": anchor + ".eager_fwd_ms", "cublaslt_epilogue": anchor + ".cublaslt_epilogue_fwd_ms"})
            )
            fwdbwd = {
                "fastcore5": lambda: _fwd_bwd(fastcore5.linear_relu, grad_out)(*inputs.next()),
                "eager": lambda: _fwd_bwd(_eager, grad_out)(*inputs.next()),
                "torch.compile": lambda: _fwd_bwd(compiled, grad_out)(*inputs.next()),
            }
            result.append(
                Case("linear_relu", shape, dtype_name, "fwdbwd", fwdbwd, flops=3 * flops,
                     anchor_keys={"eager": anchor + ".eager_fwdbwd_ms"})
            )
    return result
