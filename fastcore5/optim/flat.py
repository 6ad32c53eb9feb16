"""Contiguous mode's flat buffers (``SGD(contiguous=True)``; the constraints are in the
``fastcore5.optim`` docstring): one ``FlatBuffers`` per param group and (device, dtype) holds the
params, gradients and momentum buffers as views of three flat tensors, and hands the step a few
large ranges whatever the number of tensors.
"""
from __future__ import annotations

import operator

import torch
from torch import Tensor

from .. import backends
from ..ops.sgd import OP, PreparedStep, SGDHyper
from ..ops.sgd_checks import check_sparse_grad
from .plan import backend_request

__all__ = ["FlatBuffers"]

_REQUIRES_GRAD = operator.attrgetter("requires_grad")
_ALIGN_BYTES = 64  # start of every parameter view inside a flat buffer


def _use_count(storage) -> int:
    return torch._C._storage_Use_Count(storage._cdata)


class FlatBuffers:
    """One param group's params of one (device, dtype), living in flat buffers.

    Whether the gradients are still the flat views is known in O(1) per step from two facts
    about the flat gradient buffer: how many tensors share its storage (each .grad view is one;
    the optimizer keeps no per-param views of its own, so a .grad that is replaced or set to None
    and freed lowers the count) and its version counter (shared by all views; autograd bumps it
    when it accumulates into them). If the count moved, or nothing was written into the views
    since the last fill or step, every .grad is checked (O(n)) and repaired.
    """

    def __init__(self, params: list[Tensor], state, names: list[str]):
        first = params[0]
        self.names = names  # "param i of param group g", for errors
        self.device, self.dtype = first.device, first.dtype
        align = max(1, _ALIGN_BYTES // first.element_size())
        self.params = params
        self.starts, self.ends = [], []
        total = 0
        for p in params:
            self.starts.append(total)
            self.ends.append(total + p.numel())
            total = -(-(total + p.numel()) // align) * align
        self.numel = total
        with torch.no_grad():
            self.flat_param = torch.zeros(total, dtype=self.dtype, device=self.device)
            self.flat_grad = torch.zeros(total, dtype=self.dtype, device=self.device)
            for p, s, e in zip(params, self.starts, self.ends):
                self.flat_param[s:e].copy_(p.detach().reshape(-1))
                if p.grad is not None:
                    self.flat_grad[s:e].copy_(p.grad.reshape(-1))
            for p, s, e in zip(params, self.starts, self.ends):
                p.data = self.flat_param[s:e].view(p.shape)
        self.grad_storage = self.flat_grad.untyped_storage()
        self.grad_ptrs = [self.flat_grad[s:e].data_ptr() for s, e in zip(self.starts, self.ends)]
        for i, p in enumerate(params):
            p.grad = self.grad_view(i)
        self.first_ptr = params[0].data_ptr()
        self.last_ptr = params[-1].data_ptr()
        self.flat_buffer: Tensor | None = None
        self.has_buffer = [False] * len(params)
        self.trainable = list(map(_REQUIRES_GRAD, params))
        self.layout = 0  # bumped whenever trainable or has_buffer change; keys the segments
        self.segments_key = None
        self.segments: dict[bool, tuple[list, list, list]] = {}
        self.adopt_buffers(state)
        self.mark_grads_seen()

    def grad_view(self, i: int) -> Tensor:
        return self.flat_grad[self.starts[i]:self.ends[i]].view(self.params[i].shape)

    def adopt_buffers(self, state) -> None:
        """Move momentum buffers found in ``state`` (e.g. a loaded checkpoint) into the flat buffer."""
        for i, p in enumerate(self.params):
            entry = state.get(p)
            buf = entry.get("momentum_buffer") if entry else None
            if buf is None:
                self.has_buffer[i] = False
                continue
            if buf.shape != p.shape:  # copy_ would broadcast a (1,) buffer silently
                raise ValueError(
                    f"the momentum_buffer of {self.names[i]} must match it in shape: got {tuple(buf.shape)} "
                    f"for {tuple(p.shape)}"
                )
            view = self.buffer_view(i)
            if buf.data_ptr() != view.data_ptr():
                with torch.no_grad():
                    view.copy_(buf)
                entry["momentum_buffer"] = view
            self.has_buffer[i] = True
        self.layout += 1

    def refresh_trainable(self) -> None:
        self.trainable = list(map(_REQUIRES_GRAD, self.params))
        self.layout += 1

    def buffer_view(self, i: int) -> Tensor:
        if self.flat_buffer is None:
            self.flat_buffer = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
        return self.flat_buffer[self.starts[i]:self.ends[i]].view(self.params[i].shape)

    def check_params(self) -> None:
        if self.params[0].data_ptr() != self.first_ptr or self.params[-1].data_ptr() != self.last_ptr:
            raise RuntimeError(
                "contiguous mode: the parameters no longer live in the optimizer's flat buffer (the model was "
                "moved, cast or re-allocated after the optimizer was built, e.g. model.to()/half()); build the "
                "optimizer after moving the model"
            )

    def mark_grads_seen(self) -> None:
        self.grad_refs = _use_count(self.grad_storage)
        self.grad_version = self.flat_grad._version

    def refs_changed(self) -> bool:
        return _use_count(self.grad_storage) != self.grad_refs

    def grads_maybe_replaced(self) -> bool:
        return self.refs_changed() or self.flat_grad._version == self.grad_version

    def check_grads(self, hyper: SGDHyper | None = None) -> None:
        """What ``readopt_grads`` will copy: dense gradients, or sparse COO ones (copied dense) that
        ``hyper`` allows (checked first, so a refused step or zero_grad changes nothing)."""
        for i, p in enumerate(self.params):
            g = p.grad
            if g is not None and g.layout is not torch.strided:
                name = f"the .grad of {self.names[i]}"
                if hyper is None:
                    if g.layout is not torch.sparse_coo:
                        raise TypeError(f"{name} must be a dense (strided) or sparse COO tensor, got layout {g.layout}")
                else:
                    check_sparse_grad(p, g, self.names[i], name, hyper)

    def readopt_grads(self, copy: bool) -> bool:
        """Make every .grad its flat view again; with ``copy``, first copy into the view any
        gradient that replaced it (a missing one counts as zero). Returns True if one was replaced.
        Call ``check_grads`` first."""
        replaced = False
        with torch.no_grad():
            for i, p in enumerate(self.params):
                g = p.grad
                # same address, shape and dense layout (dtype is enforced by torch): the flat slot itself
                if (g is not None and g.layout is torch.strided and g.data_ptr() == self.grad_ptrs[i]
                        and g.shape == p.shape and g.is_contiguous()):
                    continue
                view = self.grad_view(i)
                if copy:
                    if g is None:
                        view.zero_()
                    else:
                        view.copy_(g if g.layout is torch.strided else g.to_dense())
                p.grad = view
                replaced = True
        return replaced

    def segments_for(self, momentum_on: bool):
        """{first_step: (param ranges, grad ranges, buffer ranges, PreparedStep)}: maximal runs of
        consecutive trainable params alike in having a buffer (padding between them rides along: it
        is zero in every flat buffer and stays zero)."""
        key = (self.layout, momentum_on, backend_request())
        if key == self.segments_key:
            return self.segments
        runs: dict[bool, list[tuple[int, int]]] = {False: [], True: []}
        current = None  # (first, start, end)
        for i, keep in enumerate(self.trainable):
            if not keep:
                if current:
                    runs[current[0]].append(current[1:])
                current = None
                continue
            first = momentum_on and not self.has_buffer[i]
            if current and current[0] == first:
                current = (first, current[1], self.ends[i])
            else:
                if current:
                    runs[current[0]].append(current[1:])
                current = (first, self.starts[i], self.ends[i])
        if current:
            runs[current[0]].append(current[1:])
        if momentum_on and any(runs.values()) and self.flat_buffer is None:
            self.flat_buffer = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
        backend = backends.select(OP, self.device, self.dtype)
        self.segments = {}
        for first, ranges in runs.items():
            if ranges:
                ps = [self.flat_param[s:e] for s, e in ranges]
                gs = [self.flat_grad[s:e] for s, e in ranges]
                bs = [self.flat_buffer[s:e] for s, e in ranges] if momentum_on else []
                self.segments[first] = (ps, gs, bs, PreparedStep(backend, ps, bs, grads=gs))
        self.segments_key = key
        return self.segments

    def record_new_buffers(self, state) -> None:
        """After a first step: the trainable params without a buffer now have one (a flat view)."""
        for i, p in enumerate(self.params):
            if self.trainable[i] and not self.has_buffer[i]:
                state[p]["momentum_buffer"] = self.buffer_view(i)
                self.has_buffer[i] = True
        self.layout += 1
