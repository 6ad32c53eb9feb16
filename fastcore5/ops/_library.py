"""How a stateless fused op is registered with torch.library, decided once per process.

On a CUDA machine whose torch has ``torch.library.triton_op``, such an op is a triton_op: its
body is traced, and the Triton kernels it launches through ``wrap_triton`` appear in inductor's
graph (and in CUDA-graph trees) instead of an opaque call. Elsewhere — the CPU interpreter,
where triton_op tracing does not work, or an older torch — it is a plain custom op with a fake
implementation. The body is the same either way: the launcher, given ``wrap`` when there is one.

Linear+ReLU is registered this way. EmbeddingDotBias and SGD stay custom ops: the first writes
fastcore5's index-error flag (process state, not an input a traced graph could carry) and the
second builds its launch table from tensor addresses, which a trace with fake tensors has not.
"""
from __future__ import annotations

import torch

from ..backends import interpreter_active

SEES_TRITON_KERNELS = (
    hasattr(torch.library, "triton_op")
    and hasattr(torch.library, "wrap_triton")
    and torch.cuda.is_available()
    and not interpreter_active()
)


def fused_op(name: str, mutates_args=()):
    """Decorator: ``torch.library.triton_op`` where inductor can see Triton kernels, else
    ``torch.library.custom_op``."""
    if SEES_TRITON_KERNELS:
        return torch.library.triton_op(name, mutates_args=mutates_args)
    return torch.library.custom_op(name, mutates_args=mutates_args)


def register_fake(op):
    """Decorator registering ``op``'s fake implementation; a triton_op traces its body instead."""
    def register(fake):
        if not SEES_TRITON_KERNELS:
            op.register_fake(fake)
        return fake

    return register


def launch(launcher, backend: str, *args):
    """``launcher(*args)`` from inside a fused_op body; Triton launchers also get
    ``wrap=torch.library.wrap_triton`` when the op is a triton_op."""
    if SEES_TRITON_KERNELS and backend == "triton":
        return launcher(*args, wrap=torch.library.wrap_triton)
    return launcher(*args)
