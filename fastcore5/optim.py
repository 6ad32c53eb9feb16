"""fastcore5.optim.SGD — torch.optim.SGD with one fused kernel launch per step — and the lesson's
discriminative learning rates and freezing over layer groups.

``SGD`` is a drop-in for ``torch.optim.SGD``: same signature (plus ``decoupled_weight_decay`` and
``contiguous``), same checks, same update, same param-group keys and the same state
(``{"momentum_buffer"}``), so a ``state_dict`` moves between the two in both directions. It
declares ``_step_supports_amp_scaling`` like torch's fused SGD, so ``torch.amp.GradScaler.step``
hands it ``grad_scale`` and ``found_inf`` as tensors instead of unscaling and syncing itself: the
kernel unscales the gradients and skips the step on the device.

Host work per step
------------------
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

Contiguous mode (``contiguous=True``)
-------------------------------------
At construction each param group's params of one (device, dtype) are moved into one flat buffer
(``p.data`` becomes a view; each view starts 64-byte aligned), their gradients become views of a
second flat buffer and, at the first step with momentum, the momentum buffers views of a third.
Autograd accumulates into an existing ``.grad`` in place, so after ``backward`` the flat gradient
buffer holds every gradient, and a step is one launch over a few large ranges whatever the
number of tensors; ``zero_grad`` is one fill. The per-step host work is constant: whether the
gradients are still the flat views is read from two O(1) facts (see ``_Flat``), and only when
they say something changed are the ``.grad`` tensors looked at one by one. Constraints:

* Build the optimizer after the model has its final device and dtype; moving or casting it
  afterwards (``model.to``, ``model.half``) is detected at the next step and raises.
* Parameters become contiguous (a channels-last parameter loses that layout).
* Call ``optimizer.zero_grad()`` (it zero-fills and ignores ``set_to_none``). Anything that replaces
  ``.grad`` — ``model.zero_grad()`` with set_to_none, ``backward(create_graph=True)``, DDP with
  ``gradient_as_bucket_view=True`` — still gives correct results (the step copies the new gradients
  back into the flat buffer) but loses the speed; a warning says so once.
* Which parameters train is read from ``requires_grad`` at construction, by ``freeze_to`` /
  ``freeze`` / ``unfreeze``, after ``load_state_dict`` and by ``refresh()`` — not every step (that
  would be a pass over every parameter). After toggling ``requires_grad`` yourself, call
  ``optimizer.refresh()``. Parameters with ``requires_grad=False`` are skipped (they play the part
  of ``grad=None``); a trainable parameter that received no gradient this step is stepped with a
  zero gradient (weight decay and momentum still act), as torch does after
  ``zero_grad(set_to_none=False)``.
* A contiguous optimizer that is pickled or deep-copied comes back in normal mode
  (``Optimizer.__getstate__`` keeps only defaults, state and param groups).
* ``step`` without a ``backward`` in between (nothing written into the flat gradients) takes the
  slow path that looks at every ``.grad``: correct, only slower.
"""
from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Iterable, Sequence
from itertools import repeat

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from . import backends, index_errors
from .ops.sgd import OP, PreparedStep, SGDHyper, check_param_and_grad, new_momentum_buffers, sgd_step

__all__ = ["SGD", "even_mults", "lr_range", "discriminative_param_groups"]

_GRAD = operator.attrgetter("grad")
_REQUIRES_GRAD = operator.attrgetter("requires_grad")
_ALIGN_BYTES = 64  # start of every parameter view inside a flat buffer


def _picker(index: Sequence[int]):
    """A C-level function list -> tuple of the items at ``index`` (itemgetter returns a bare item
    for one index, hence the special case)."""
    if len(index) == 1:
        only = index[0]
        return lambda items: (items[only],)
    return operator.itemgetter(*index)


_LOCAL = operator.attrgetter("_local_tensor")


def _is_dtensor(t: Tensor) -> bool:
    """A DTensor (FSDP2's fully_shard makes every param one), recognised without importing
    torch.distributed where it is not built."""
    return type(t).__name__ == "DTensor" and hasattr(t, "_local_tensor")


class _Launch:
    """Tensors of one (device, dtype) that step together: all with, or all without, buffers.

    For DTensor params (FSDP2) the kernel steps each rank's local shards: ``members`` are the
    DTensors (the optimizer's state is keyed by them and holds DTensor buffers, so state_dict and
    torch.distributed.checkpoint see sharded tensors), ``buffers`` the buffers' local shards, and
    the local shards of the params and gradients are read at every step, since FSDP2 owns them."""

    __slots__ = ("members", "pick", "buffers", "first", "device", "prepared", "dtensor")

    def __init__(self, members, index, buffers, first, prepared, dtensor):
        self.members = members
        self.pick = _picker(index)
        self.buffers = list(map(_LOCAL, buffers)) if dtensor else buffers
        self.first = first
        self.device = (members[0]._local_tensor if dtensor else members[0]).device
        self.prepared = prepared
        self.dtensor = dtensor

    def params(self) -> list[Tensor]:
        return list(map(_LOCAL, self.members)) if self.dtensor else self.members

    def grads(self, grads: list) -> list[Tensor]:
        picked = self.pick(grads)
        return list(map(_LOCAL, picked)) if self.dtensor else picked


class _Plan:
    """One param group's launches, valid while the same gradients are None, momentum stays on or
    off, the params stay where they are, no buffer is new and the backend request is the same."""

    __slots__ = ("missing", "momentum_on", "launches", "request", "stale")

    def __init__(self, missing, momentum_on, launches, request):
        self.missing = missing
        self.momentum_on = momentum_on
        self.launches = launches
        self.request = request
        self.stale = any(launch.first for launch in launches)  # after this step the buffers exist


def _backend_request() -> tuple:
    return backends.requested(), backends.interpreter_active()


def _capturing() -> bool:
    """A CUDA graph capture is under way on the current stream (never initialises CUDA)."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def _use_count(storage) -> int:
    return torch._C._storage_Use_Count(storage._cdata)


class _Flat:
    """One param group's params of one (device, dtype), living in flat buffers.

    Whether the gradients are still the flat views is known in O(1) per step from two facts
    about the flat gradient buffer: how many tensors share its storage (each .grad view is one;
    the optimizer keeps no per-param views of its own, so a .grad that is replaced or set to None
    and freed lowers the count) and its version counter (shared by all views; autograd bumps it
    when it accumulates into them). If the count moved, or nothing was written into the views
    since the last fill or step, every .grad is checked (O(n)) and repaired.
    """

    def __init__(self, params: list[Tensor], state):
        first = params[0]
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

    def readopt_grads(self, copy: bool) -> bool:
        """Make every .grad its flat view again; with ``copy``, first copy into the view any
        gradient that replaced it (a missing one counts as zero). Returns True if one was replaced."""
        replaced = False
        with torch.no_grad():
            for i, p in enumerate(self.params):
                g = p.grad
                # same address, shape and dense layout (dtype is enforced by torch): the flat slot itself
                if g is not None and g.data_ptr() == self.grad_ptrs[i] and g.shape == p.shape and g.is_contiguous():
                    continue
                view = self.grad_view(i)
                if copy:
                    if g is None:
                        view.zero_()
                    else:
                        view.copy_(g)
                p.grad = view
                replaced = True
        return replaced

    def segments_for(self, momentum_on: bool):
        """{first_step: (param ranges, grad ranges, buffer ranges, PreparedStep)}: maximal runs of
        consecutive trainable params alike in having a buffer (padding between them rides along: it
        is zero in every flat buffer and stays zero)."""
        key = (self.layout, momentum_on, _backend_request())
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
                self.segments[first] = (ps, gs, bs, PreparedStep(backend, ps, bs))
        self.segments_key = key
        return self.segments

    def record_new_buffers(self, state) -> None:
        """After a first step: the trainable params without a buffer now have one (a flat view)."""
        for i, p in enumerate(self.params):
            if self.trainable[i] and not self.has_buffer[i]:
                state[p]["momentum_buffer"] = self.buffer_view(i)
                self.has_buffer[i] = True
        self.layout += 1


class SGD(Optimizer):
    """torch.optim.SGD (momentum, dampening, weight decay, Nesterov, maximize) with a fused step.

    Args: as torch.optim.SGD — ``params``, ``lr`` (float or 1-element tensor; a tensor is read on
    the device, so put it on the params' device), ``momentum``, ``dampening``, ``weight_decay``,
    ``nesterov``, ``maximize``; ``foreach`` and ``fused`` are accepted for compatibility and
    ignored (the step is always fused); ``differentiable=True`` is refused. Extras:

    decoupled_weight_decay: apply ``p -= lr * weight_decay * p`` to the weights instead of adding
        ``weight_decay * p`` to the gradient (fastai's "true weight decay"). Saved in the param
        groups; torch.optim.SGD ignores the key when it loads such a checkpoint.
    contiguous: keep params, grads and momentum buffers in flat buffers so a step costs one launch
        over a few ranges regardless of the number of tensors (constraints in the module docstring).

    capturable: the step may be captured in a CUDA graph (``torch.cuda.graph``) and replayed. lr must
        then be a tensor on the params' device (a scheduler updates it in place, which replays
        see); run at least one step eagerly before capturing, so the momentum buffers exist.
        momentum, dampening, weight_decay and the flags are baked into a captured step: changing
        them (OneCycleLR's momentum cycling) needs a new capture. Without it, capturing a step
        raises.

    Params whose ``.grad`` is None are skipped. Works with ``torch.optim.lr_scheduler`` (also
    ``OneCycleLR`` with momentum cycling) and ``torch.amp.GradScaler``: an overflowed step changes
    nothing (read on the device). A step never reads a device value on the host. Momentum buffers
    are created zero-filled when a param first steps, even if that step is skipped (overflow, or a
    bad EmbeddingDotBias index: see below); the next step then stores ``(1 - dampening) * g``, which
    is torch's first step exactly when dampening == 0 (the only case where ours differs from torch,
    whose fused SGD leaves such a buffer uninitialised).

    Index errors: each step first raises any IndexError that an EmbeddingDotBias kernel has
    reported (``fastcore5.index_errors``), and passes each device's pending flag to the kernel,
    which skips the update on the device when a bad index reached this step's gradients.
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        contiguous: bool = False,
        capturable: bool = False,
    ) -> None:
        SGDHyper(lr, momentum, dampening, weight_decay, nesterov, maximize, decoupled_weight_decay).check()
        if differentiable:
            raise ValueError("differentiable=True is not supported by fastcore5.optim.SGD; use torch.optim.SGD")
        if capturable and not isinstance(lr, Tensor):
            raise ValueError(
                "capturable=True needs lr as a tensor on the params' device (e.g. lr=torch.tensor(0.1, device='cuda')): "
                "a float lr would be baked into the captured graph and the scheduler's changes never replayed"
            )
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
            maximize=maximize, foreach=foreach, differentiable=False, fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        self._plans: dict[int, _Plan] = {}
        self._flats: dict[int, list[_Flat]] = {}
        self.contiguous = bool(contiguous)
        self.capturable = bool(capturable)
        self._warned_regrad = False
        super().__init__(params, defaults)
        self._step_supports_amp_scaling = True

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("differentiable", False)
            group.setdefault("fused", None)
            group.setdefault("decoupled_weight_decay", False)
        # Optimizer.__getstate__ keeps only defaults, state and param_groups: an unpickled or
        # deep-copied optimizer comes back without its caches, in normal (non-contiguous) mode.
        self.__dict__.setdefault("_plans", {})
        self.__dict__.setdefault("_flats", {})
        self.__dict__.setdefault("contiguous", False)
        self.__dict__.setdefault("capturable", False)
        self.__dict__.setdefault("_warned_regrad", False)
        self._plans.clear()
        self._step_supports_amp_scaling = True

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        SGDHyper.from_group(group).check()
        if group.get("differentiable"):
            raise ValueError("differentiable=True is not supported by fastcore5.optim.SGD; use torch.optim.SGD")
        for i, p in enumerate(group["params"]):
            if p.is_sparse or p.is_complex() or not p.dtype.is_floating_point:
                raise TypeError(
                    f"param {i} of param group {len(self.param_groups) - 1} is {p.dtype}"
                    f"{' sparse' if p.is_sparse else ''}; fastcore5.optim.SGD supports dense real floating params"
                )
        if self.contiguous:
            if any(map(_is_dtensor, group["params"])):
                raise ValueError(
                    "contiguous=True cannot hold DTensor params (FSDP2's fully_shard owns their storage); "
                    "use the default contiguous=False, which steps the local shards in one launch"
                )
            by_kind: dict[tuple, list[Tensor]] = {}
            for p in group["params"]:
                by_kind.setdefault((p.device, p.dtype), []).append(p)
            self._flats[len(self.param_groups) - 1] = [_Flat(ps, self.state) for ps in by_kind.values()]

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._plans.clear()
        for flats in self._flats.values():
            for flat in flats:
                flat.adopt_buffers(self.state)
        self.refresh()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Normal mode: torch's zero_grad. Contiguous mode: one fill per flat gradient buffer
        (``set_to_none`` is ignored: the flat views must stay the gradients)."""
        if not self.contiguous:
            return super().zero_grad(set_to_none)
        for flats in self._flats.values():
            for flat in flats:
                if flat.refs_changed():
                    flat.readopt_grads(copy=False)
                flat.flat_grad.zero_()
                flat.mark_grads_seen()

    # ------------------------------------------------------------------------------------- step

    @torch.no_grad()
    def step(self, closure=None):
        """One optimisation step (closure: re-evaluates the model and returns the loss)."""
        if torch.compiler.is_compiling():
            return self._traced_step(closure)
        capturing = _capturing()
        if capturing and not self.capturable:
            raise RuntimeError(
                "fastcore5.optim.SGD.step is being captured in a CUDA graph but the optimizer was built without "
                "capturable=True; build it with capturable=True (and a tensor lr on the device)"
            )
        if not capturing:
            # A replayed graph never runs this; reading the report during a capture is not allowed.
            index_errors.raise_pending()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        skip_flags: dict[torch.device, Tensor | None] = {}
        for index, group in enumerate(self.param_groups):
            hyper = SGDHyper.from_group(group)
            if self.contiguous:
                self._step_flat(index, hyper, grad_scale, found_inf, skip_flags, capturing)
            else:
                self._step_group(index, group, hyper, grad_scale, found_inf, skip_flags, capturing)
        return loss

    def _traced_step(self, closure):
        """The step as torch.compile traces it: the functional ``sgd_step`` (one custom op per
        device and dtype) over each group's params with gradients, without the eager path's
        caches, which key on tensor addresses that a trace does not have. Contiguous mode keeps
        its flat views as the params and gradients, so the same code serves it."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            state = [self.state[p] for p in params]
            buffers = sgd_step(
                params, [p.grad for p in params], [entry.get("momentum_buffer") for entry in state],
                lr=group["lr"], momentum=group["momentum"], dampening=group["dampening"],
                weight_decay=group["weight_decay"], nesterov=group["nesterov"], maximize=group["maximize"],
                decoupled_weight_decay=group["decoupled_weight_decay"],
                grad_scale=getattr(self, "grad_scale", None), found_inf=getattr(self, "found_inf", None),
            )
            if group["momentum"] != 0:
                for entry, buffer in zip(state, buffers):
                    entry["momentum_buffer"] = buffer
        return loss

    @staticmethod
    def _skip_flag(skip_flags: dict, device: torch.device) -> Tensor | None:
        if device not in skip_flags:
            skip_flags[device] = index_errors.pending_skip_flag(device)
        return skip_flags[device]

    def _check_capturable(self, hyper: SGDHyper, device: torch.device, new_buffers: bool, capturing: bool) -> None:
        lr = hyper.lr
        if not isinstance(lr, Tensor) or lr.device != device:
            where = f"a tensor on {lr.device}" if isinstance(lr, Tensor) else f"the float {lr!r}"
            raise ValueError(
                f"capturable=True needs each param group's lr as a tensor on its params' device ({device}); got {where}"
            )
        if new_buffers and capturing:
            raise RuntimeError(
                "fastcore5.optim.SGD: a momentum buffer would be created inside a CUDA graph capture; run at least "
                "one step eagerly (a warm-up step, as torch.cuda.graph requires anyway) before capturing"
            )

    def _plan(self, index: int, group: dict, grads: list, missing: list, momentum_on: bool) -> _Plan:
        params = group["params"]
        by_launch: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            if missing[i]:
                continue
            name = f"param {i} of param group {index}"
            check_param_and_grad(p, grads[i], name, "its .grad")
            entry = self.state.get(p)
            buf = entry.get("momentum_buffer") if entry else None
            if momentum_on and buf is not None and (buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device):
                raise ValueError(
                    f"the momentum_buffer of {name} must match it in shape, dtype and device: got {tuple(buf.shape)} "
                    f"{buf.dtype} {buf.device} for {tuple(p.shape)} {p.dtype} {p.device}"
                )
            if momentum_on and buf is not None and _is_dtensor(buf) != _is_dtensor(p):
                raise ValueError(
                    f"the momentum_buffer of {name} must be a DTensor exactly when the param is one (FSDP2): load "
                    "a sharded optimizer state dict (torch.distributed.checkpoint.state_dict.set_state_dict)"
                )
            by_launch.setdefault((p.device, p.dtype, _is_dtensor(p), momentum_on and buf is None), []).append(i)
        launches = []
        for (device, dtype, dtensor, first), idx in by_launch.items():
            members = [params[i] for i in idx]
            if first:
                buffers = new_momentum_buffers(members)
                for p, buf in zip(members, buffers):
                    self.state[p]["momentum_buffer"] = buf
            elif momentum_on:
                buffers = [self.state[p]["momentum_buffer"] for p in members]
            else:
                buffers = []
            launch_grads = [grads[i] for i in idx]
            if dtensor:
                members_local, launch_grads = list(map(_LOCAL, members)), list(map(_LOCAL, launch_grads))
                device = members_local[0].device
            else:
                members_local = members
            launch = _Launch(members, idx, buffers, first, None, dtensor)
            launch.prepared = PreparedStep(backends.select(OP, device, dtype), members_local, launch.buffers)
            launch.prepared.check_grads(members_local, launch_grads)
            launches.append(launch)
        plan = _Plan(missing, momentum_on, launches, _backend_request())
        self._plans[index] = plan
        return plan

    def _current_plan(self, index: int, group: dict, grads: list, momentum_on: bool, capturing: bool) -> _Plan:
        """The plan for this step's gradients: the cached one when nothing it depends on changed,
        found by C-level passes over the tensors; a new one otherwise. New gradient tensors
        (set_to_none makes new ones every step) are checked for their strides only."""
        missing = list(map(operator.is_, grads, repeat(None)))
        plan = self._plans.get(index)
        if (
            plan is None or plan.stale or plan.missing != missing or plan.momentum_on != momentum_on
            or plan.request != _backend_request()
            or not all(launch.prepared.addresses_unchanged(launch.params()) for launch in plan.launches)
        ):
            if capturing and momentum_on and self._would_create_buffers(group, missing):
                self._check_capturable(SGDHyper.from_group(group), group["params"][0].device, True, True)
            return self._plan(index, group, grads, missing, momentum_on)
        for launch in plan.launches:
            launch.prepared.check_grads(launch.params(), launch.grads(grads))
        return plan

    def _would_create_buffers(self, group: dict, missing: list) -> bool:
        return any(
            not miss and (self.state.get(p) or {}).get("momentum_buffer") is None
            for p, miss in zip(group["params"], missing)
        )

    def _step_group(self, index, group, hyper, grad_scale, found_inf, skip_flags, capturing) -> None:
        grads = list(map(_GRAD, group["params"]))
        momentum_on = hyper.momentum != 0
        plan = self._current_plan(index, group, grads, momentum_on, capturing)
        for launch in plan.launches:
            if self.capturable:
                self._check_capturable(hyper, launch.device, launch.first, capturing)
            launch.prepared.run(
                launch.params(), launch.grads(grads), launch.buffers, hyper, launch.first, grad_scale, found_inf,
                self._skip_flag(skip_flags, launch.device),
            )

    def _step_flat(self, index, hyper, grad_scale, found_inf, skip_flags, capturing) -> None:
        momentum_on = hyper.momentum != 0
        for flat in self._flats.get(index, ()):
            flat.check_params()
            if flat.grads_maybe_replaced() and flat.readopt_grads(copy=True) and not self._warned_regrad:
                self._warned_regrad = True
                warnings.warn(
                    "fastcore5.optim.SGD(contiguous=True): some .grad tensors were replaced (model.zero_grad() "
                    "with set_to_none, create_graph=True, ...); they were copied back into the flat gradient "
                    "buffer, which costs a copy per step. Use optimizer.zero_grad() to keep the fast path.",
                    stacklevel=3,
                )
            if self.capturable:
                new_buffers = momentum_on and any(t and not b for t, b in zip(flat.trainable, flat.has_buffer))
                self._check_capturable(hyper, flat.device, new_buffers, capturing)
            segments = flat.segments_for(momentum_on)
            skip_flag = self._skip_flag(skip_flags, flat.device)
            for first, (ps, gs, bs, prepared) in segments.items():
                prepared.run(ps, gs, bs, hyper, first, grad_scale, found_inf, skip_flag)
            if True in segments:
                flat.record_new_buffers(self.state)
            flat.mark_grads_seen()

    # ------------------------------------------------------------------------- layer groups

    def freeze_to(self, n: int) -> None:
        """Treat each param group as a layer group: freeze groups [:n] (requires_grad=False and, in
        normal mode, .grad=None so the step skips them) and unfreeze groups [n:]. Negative n counts
        from the end, as in fastai: freeze_to(-1) leaves only the last group trainable."""
        count = len(self.param_groups)
        frozen = n if n >= 0 else count + n
        if frozen >= count:
            warnings.warn(f"freezing {frozen} groups of {count}: the whole model is frozen", stacklevel=2)
        for i, group in enumerate(self.param_groups):
            train = i >= frozen
            for p in group["params"]:
                p.requires_grad_(train)
                if not train and not self.contiguous:
                    p.grad = None
        self.refresh()

    def refresh(self) -> None:
        """Contiguous mode: re-read which params are trainable (requires_grad). The step reads it at
        construction, after freeze_to/freeze/unfreeze and after load_state_dict, not every step (that
        would cost a pass over all params); call this after toggling requires_grad yourself.
        Normal mode: nothing to do (params whose .grad is None are skipped at every step)."""
        for flats in self._flats.values():
            for flat in flats:
                flat.refresh_trainable()

    def freeze(self) -> None:
        """Train only the last param group (fastai's ``freeze``: the head of a pretrained model)."""
        self.freeze_to(-1)

    def unfreeze(self) -> None:
        """Train every param group."""
        self.freeze_to(0)


# ------------------------------------------------------------------------ discriminative lrs


def even_mults(start: float, stop: float, n: int) -> list[float]:
    """n values from start to stop, evenly spaced on a log scale (fastai's even_mults)."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if n == 1:
        return [float(stop)]
    if start <= 0 or stop <= 0:
        raise ValueError(f"start and stop must be positive for a geometric spread, got {start} and {stop}")
    ratio = (stop / start) ** (1 / (n - 1))
    return [start * ratio**i for i in range(n - 1)] + [float(stop)]


def lr_range(lr: float | slice, n: int) -> list[float]:
    """One learning rate per layer group, by fastai 2's rule: ``slice(lo, hi)`` spreads lo..hi
    geometrically over the n groups; ``slice(hi)`` gives hi/10 to every group but the last, which
    gets hi; a float gives every group the same rate."""
    if isinstance(lr, slice):
        if lr.step is not None:
            raise ValueError("an lr slice takes no step: use slice(lo, hi) or slice(hi)")
        if lr.stop is None:
            raise ValueError("an lr slice needs a stop: slice(lo, hi) or slice(hi)")
        if lr.start:
            return even_mults(lr.start, lr.stop, n)
        return [lr.stop / 10] * (n - 1) + [float(lr.stop)]
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr):
        raise TypeError(f"lr must be a float or a slice, got {lr!r}")
    return [float(lr)] * n


def discriminative_param_groups(layer_groups: Iterable, lr: float | slice, **hyper) -> list[dict]:
    """Param groups for an optimizer, one per layer group (an nn.Module or an iterable of params),
    with learning rates from ``lr_range(lr, len(layer_groups))`` and any other hyperparameters
    (momentum=..., weight_decay=...) copied into every group.

    Example (lesson 5): ``SGD(discriminative_param_groups([body, head], slice(1e-5, 1e-3)),
    momentum=0.9)``, then ``opt.freeze()`` / ``opt.unfreeze()`` over those groups."""
    groups = [list(g.parameters()) if isinstance(g, nn.Module) else list(g) for g in layer_groups]
    if not groups:
        raise ValueError("layer_groups is empty")
    return [dict(params=params, lr=rate, **hyper) for params, rate in zip(groups, lr_range(lr, len(groups)))]
