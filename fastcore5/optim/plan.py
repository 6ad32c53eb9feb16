"""Normal mode's per-group launch plans: what keeps ``SGD.step``'s host work to C-level passes.

For every param group the optimizer keeps a *plan*: the params that have gradients split by
(device, dtype, DTensor or not) and by whether their momentum buffer exists yet, with the buffers
and, per launch, a ``fastcore5.ops.sgd.PreparedStep`` (for Triton: the chunk table without its
gradient column, checked layouts and addresses). A step makes C-level passes only: it gathers the
``.grad`` of every param, compares which are None with the plan, checks that the params still
live where they did and that the gradients are contiguous like their params (set_to_none makes
new gradient tensors every step), reads the gradients' addresses (the device table is cached by
them: the CUDA caching allocator hands a step's gradients the last step's addresses) and bumps
the params' version counters; then one launch per (device, dtype). The plan is rebuilt when a
gradient appears or disappears, a buffer is created, momentum is switched on or off, a param
moves, the backend request changes, a param group is added or a state dict is loaded. The
launcher is called directly, not through the dispatcher (see ``PreparedStep``). Contiguous mode
removes even the per-tensor passes.
"""
from __future__ import annotations

import operator
from collections.abc import Sequence

from torch import Tensor

from .. import backends
from .distributed import local_tensor

__all__ = ["Launch", "Plan", "backend_request"]


def _picker(index: Sequence[int]):
    """A C-level function list -> tuple of the items at ``index`` (itemgetter returns a bare item
    for one index, hence the special case)."""
    if len(index) == 1:
        only = index[0]
        return lambda items: (items[only],)
    return operator.itemgetter(*index)


class Launch:
    """Tensors of one (device, dtype) that step together: all with, or all without, buffers.

    For DTensor params (FSDP2) the kernel steps each rank's local shards: ``members`` are the
    DTensors (the optimizer's state is keyed by them and holds DTensor buffers, so state_dict and
    torch.distributed.checkpoint see sharded tensors), ``buffers`` the buffers' local shards, and
    the local shards of the params and gradients are read at every step, since FSDP2 owns them."""

    __slots__ = ("members", "index", "pick", "buffers", "first", "device", "prepared", "dtensor", "new_buffers")

    def __init__(self, members, index, buffers, first, prepared, dtensor):
        self.members = members
        self.index = index  # the members' places in the param group
        self.pick = _picker(index)
        self.buffers = list(map(local_tensor, buffers)) if dtensor else buffers
        self.first = first
        self.device = (local_tensor(members[0]) if dtensor else members[0]).device
        self.prepared = prepared
        self.dtensor = dtensor
        self.new_buffers = None  # a first launch's buffers, for the step to put in the state

    def params(self) -> list[Tensor]:
        return list(map(local_tensor, self.members)) if self.dtensor else self.members

    def grads(self, grads: list) -> list[Tensor]:
        picked = self.pick(grads)
        return list(map(local_tensor, picked)) if self.dtensor else picked


class Plan:
    """One param group's launches, valid while the same gradients are None, momentum stays on or
    off, the params stay where they are, no buffer is new and the backend request is the same."""

    __slots__ = ("missing", "momentum_on", "launches", "request", "stale", "native")

    def __init__(self, missing, momentum_on, launches, request):
        self.missing = missing
        self.momentum_on = momentum_on
        self.launches = launches
        self.request = request
        self.stale = any(launch.first for launch in launches)  # after this step the buffers exist
        # (prepare, run) of a fastcore5.ops.sgd.cpu_step_plan doing the whole group's step, or None
        self.native = None


# The backend choice a cached plan (or a flat buffer's segments) was made under: a change rebuilds it.
backend_request = backends.request_key
