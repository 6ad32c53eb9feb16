"""Contiguous mode's part of ``SGD`` (a mixin): building the flat buffers of a param group,
zeroing their gradients, and the step's checks and launches over them, eager and traced. The
buffers themselves are ``flat.FlatBuffers``; the mode's constraints are in the ``fastcore5.optim``
docstring.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .. import backends, index_errors
from ..ops.sgd import OP, SGDHyper, run_traced_step
from .checks import check_capturable, param_name
from .flat import FlatBuffers

__all__ = ["ContiguousMode", "device_skip_flag"]


def device_skip_flag(skip_flags: dict, device: torch.device) -> Tensor | None:
    """The pending index-error flag of ``device`` for this step, read once per device."""
    if device not in skip_flags:
        skip_flags[device] = index_errors.pending_skip_flag(device)
    return skip_flags[device]


class ContiguousMode:
    """The methods of ``SGD`` that run only with ``contiguous=True`` (state: ``self._flats``)."""

    def _build_flats(self, index: int) -> None:
        params = self.param_groups[index]["params"]
        by_kind: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            by_kind.setdefault((p.device, p.dtype), []).append(i)
        self._flats[index] = [
            FlatBuffers([params[i] for i in members], self.state, [param_name(i, index) for i in members])
            for members in by_kind.values()
        ]

    def _zero_flat_grads(self) -> None:
        flats = [flat for group_flats in self._flats.values() for flat in group_flats]
        changed = [flat.refs_changed() for flat in flats]
        for flat, refs_changed in zip(flats, changed):
            if refs_changed:
                flat.check_grads()
        for flat, refs_changed in zip(flats, changed):
            if refs_changed:
                flat.readopt_grads(copy=False)
            flat.flat_grad.zero_()
            flat.mark_grads_seen()

    def _check_flat(self, index, hyper, capturing) -> list:
        """Contiguous mode's checks of one group before any write: [(flat, gradients replaced)]."""
        momentum_on = hyper.momentum != 0
        checked = []
        for flat in self._flats.get(index, ()):
            flat.check_params()
            replaced = flat.grads_maybe_replaced()
            if replaced:
                flat.check_grads(hyper)
            if self.capturable:
                new_buffers = momentum_on and any(t and not b for t, b in zip(flat.trainable, flat.has_buffer))
                check_capturable(hyper, flat.device, new_buffers, capturing)
            checked.append((flat, replaced))
        return checked

    def _step_flat(self, checked, hyper, grad_scale, found_inf, skip_flags) -> None:
        momentum_on = hyper.momentum != 0
        for flat, replaced in checked:
            if replaced and flat.readopt_grads(copy=True) and not self._warned_regrad:
                self._warned_regrad = True
                warnings.warn(
                    "fastcore5.optim.SGD(contiguous=True): some .grad tensors were replaced (model.zero_grad() "
                    "with set_to_none, create_graph=True, ...); they were copied back into the flat gradient "
                    "buffer, which costs a copy per step. Use optimizer.zero_grad() to keep the fast path.",
                    stacklevel=3,
                )
            segments = flat.segments_for(momentum_on)
            skip_flag = device_skip_flag(skip_flags, flat.device)
            for first, (ps, gs, bs, prepared) in segments.items():
                prepared.run(ps, gs, bs, hyper, first, grad_scale, found_inf, skip_flag)
            if True in segments:
                flat.record_new_buffers(self.state)
            flat.mark_grads_seen()


    def _traced_flat_step(self, flat: FlatBuffers, hyper: SGDHyper) -> None:
        """Contiguous mode under torch.compile: the op over views of the flat buffers themselves.
        The params cannot be the op's arguments there: they all share the flat buffer's storage,
        and inductor's functionalisation of a custom op mutating such aliased graph inputs fails
        (an assertion in its auto_functionalized decomposition)."""
        momentum_on = hyper.momentum != 0
        if momentum_on and flat.flat_buffer is None:
            flat.flat_buffer = torch.zeros(flat.numel, dtype=flat.dtype, device=flat.device)
        backend = backends.select(OP, flat.device, flat.dtype)
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        any_first = False
        for first in (False, True):
            members = [
                i for i, train in enumerate(flat.trainable)
                if train and (momentum_on and not flat.has_buffer[i]) == first
            ]
            if not members:
                continue
            any_first = any_first or first
            ranges = [(flat.starts[i], flat.ends[i]) for i in members]
            ps = [flat.flat_param[s:e] for s, e in ranges]
            gs = [flat.flat_grad[s:e] for s, e in ranges]
            bs = [flat.flat_buffer[s:e] for s, e in ranges] if momentum_on else []
            run_traced_step(backend, ps, gs, bs, hyper, first, grad_scale, found_inf)
        if any_first:
            flat.record_new_buffers(self.state)
