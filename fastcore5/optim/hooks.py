"""The optimizer-step wrapper of ``fastcore5.optim.SGD`` (torch.optim's hooks without its profiler
label's cost) and the CUDA-graph capture test its step makes."""
from __future__ import annotations

import functools
from itertools import chain

import torch

__all__ = ["capturing_cuda_graph", "with_hooks"]


def capturing_cuda_graph() -> bool:
    """A CUDA graph capture is under way on the current stream (never initialises CUDA)."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def with_hooks(step):
    """``step`` wrapped as torch.optim wraps every optimizer's step (``Optimizer.profile_hook_step``:
    global and per-optimizer pre- and post-hooks, ``_optimizer_step_code``, a profiler label), except
    that the label (``record_function``, two dispatcher calls, a third of a small step's host time on
    a CPU when the caches are cold) is entered only while a profiler runs or torch.compile traces.
    Marked ``hooked``, so Optimizer.__init__ does not wrap it again. On a torch without the global
    hook tables, torch's own wrapper is kept."""
    try:
        from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks
    except ImportError:
        return step

    def run_hooked(self, args, kwargs):
        if _global_optimizer_pre_hooks or self._optimizer_step_pre_hooks:
            for pre_hook in chain(_global_optimizer_pre_hooks.values(), self._optimizer_step_pre_hooks.values()):
                result = pre_hook(self, args, kwargs)
                if result is not None:
                    if not (isinstance(result, tuple) and len(result) == 2):
                        raise RuntimeError(
                            f"{step} must return None or a tuple of (new_args, new_kwargs), but got {result}."
                        )
                    args, kwargs = result
        out = step(*args, **kwargs)
        self._optimizer_step_code()
        if self._optimizer_step_post_hooks or _global_optimizer_post_hooks:
            for post_hook in chain(self._optimizer_step_post_hooks.values(), _global_optimizer_post_hooks.values()):
                post_hook(self, args, kwargs)
        return out

    @functools.wraps(step)
    def wrapper(*args, **kwargs):
        self = args[0]
        if not (torch.compiler.is_compiling() or torch.autograd._profiler_enabled()):
            return run_hooked(self, args, kwargs)
        with torch.autograd.profiler.record_function(f"Optimizer.step#{type(self).__name__}.step"):
            return run_hooked(self, args, kwargs)

    wrapper.hooked = True
    return wrapper
