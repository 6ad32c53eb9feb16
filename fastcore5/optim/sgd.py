"""``SGD``: torch.optim.SGD with one fused kernel launch per step, a drop-in (see the
``fastcore5.optim`` docstring). Normal mode's launch plans are in ``plan.py``, contiguous mode's
flat buffers in ``flat.py`` and its steps in ``contiguous.py``, the optimizer's argument checks in
``checks.py``, the step's hook wrapper in ``hooks.py``, the layer-group freezing (a mixin) in
``freezing.py``, the kernels behind both modes in ``fastcore5.ops.sgd``.
"""
from __future__ import annotations

import operator
from itertools import repeat

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import backends, index_errors
from ..ops.sgd import OP, PreparedStep, SGDHyper, cpu_step_plan, new_momentum_buffers, on_device, sgd_step
from ..ops.sgd_sparse import SparseGradStep
from ..ops.sgd_checks import check_param_and_grad, check_same_strides, check_sparse_grad
from .checks import (
    check_capturable, check_contiguous_groups, check_group, check_loaded_buffers, param_name,
)
from .contiguous import ContiguousMode, device_skip_flag
from .distributed import is_dtensor, local_tensor
from .flat import FlatBuffers
from .freezing import LayerGroupFreezing
from .hooks import capturing_cuda_graph, with_hooks
from .plan import Launch, Plan, backend_request

__all__ = ["SGD"]

_GRAD = operator.attrgetter("grad")


class SGD(LayerGroupFreezing, ContiguousMode, Optimizer):
    """torch.optim.SGD (momentum, dampening, weight decay, Nesterov, maximize) with a fused step.

    Args: as torch.optim.SGD — ``params``, ``lr`` (float or 1-element tensor; a tensor is read on
    the device, so put it on the params' device), ``momentum``, ``dampening``, ``weight_decay``,
    ``nesterov``, ``maximize``; ``foreach`` and ``fused`` are accepted for compatibility and
    ignored (the step is always fused); ``differentiable=True`` is refused. Extras:

    decoupled_weight_decay: apply ``p -= lr * weight_decay * p`` to the weights instead of adding
        ``weight_decay * p`` to the gradient (fastai's "true weight decay"). Saved in the param
        groups; torch.optim.SGD ignores the key when it loads such a checkpoint.
    contiguous: keep params, grads and momentum buffers in flat buffers so a step costs one launch
        over a few ranges regardless of the number of tensors (constraints in the
        ``fastcore5.optim`` docstring).

    capturable: the step may be captured in a CUDA graph (``torch.cuda.graph``) and replayed. lr must
        then be a tensor on the params' device (a scheduler updates it in place, which replays
        see); run at least one step eagerly before capturing, so the momentum buffers exist.
        momentum, dampening, weight_decay and the flags are baked into a captured step: changing
        them (OneCycleLR's momentum cycling) needs a new capture. Without it, capturing a step
        raises.

    Params whose ``.grad`` is None are skipped. Sparse gradients (``nn.Embedding(sparse=True)``) are
    stepped as torch.optim.SGD steps them (``fastcore5.ops.sgd_sparse.SparseGradStep``). A refused call
    changes nothing: a step checks every group before its first write (docs/errors.md). Works with ``torch.optim.lr_scheduler`` (also
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
        self._plans: dict[int, Plan] = {}
        self._flats: dict[int, list[FlatBuffers]] = {}
        self.contiguous = bool(contiguous)
        self.capturable = bool(capturable)
        self._warned_regrad = False
        # Contiguous mode moves params into flat buffers only once every group passed its checks,
        # so a refused constructor leaves the params (and their .grad) as they were.
        self._building = True
        super().__init__(params, defaults)
        self._building = False
        if self.contiguous:
            check_contiguous_groups(self.param_groups, range(len(self.param_groups)))
            for index in range(len(self.param_groups)):
                self._build_flats(index)
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
        self.__dict__.setdefault("_building", False)
        self._plans.clear()
        self._step_supports_amp_scaling = True

    def add_param_group(self, param_group: dict) -> None:
        """torch's add_param_group, plus fastcore5's checks; a refused group is not kept."""
        index = len(self.param_groups)
        super().add_param_group(param_group)
        try:
            check_group(index, self.param_groups[index])
            if self.contiguous and not self._building:
                check_contiguous_groups(self.param_groups, [index])
                self._build_flats(index)
        except BaseException:
            del self.param_groups[index:]
            raise

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load_state_dict; a momentum buffer that does not fit its param (shape, or not a
        tensor) is refused naming the param, and the optimizer keeps its own state."""
        kept_state, kept_groups = self.state, self.param_groups
        super().load_state_dict(state_dict)
        try:
            check_loaded_buffers(self.param_groups, self.state)
        except BaseException:
            self.state, self.param_groups = kept_state, kept_groups
            raise
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
        self._zero_flat_grads()

    # ------------------------------------------------------------------------------------- step

    @with_hooks
    def step(self, closure=None):
        """One optimisation step (closure: re-evaluates the model and returns the loss)."""
        if torch.compiler.is_compiling():
            with torch.no_grad():
                return self._traced_step(closure)
        grad_enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)  # torch.no_grad(), without its Python context manager
        try:
            return self._eager_step(closure)
        finally:
            torch._C._set_grad_enabled(grad_enabled)

    def _eager_step(self, closure):
        capturing = capturing_cuda_graph()
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
        # All or nothing: every group is checked (and its launches planned) before the first write,
        # so a refused step leaves params, grads, buffers and state as they were.
        ready = []
        for index, group in enumerate(self.param_groups):
            hyper = SGDHyper.from_group(group)
            hyper.check_types()
            if self.contiguous:
                ready.append((self._check_flat(index, hyper, capturing), hyper, None))
            else:
                ready.append(self._prepare_group(index, group, hyper, capturing))
        skip_flags: dict[torch.device, Tensor | None] = {}
        for prepared, hyper, grads in ready:
            if self.contiguous:
                self._step_flat(prepared, hyper, grad_scale, found_inf, skip_flags)
            else:
                self._step_group(prepared, grads, hyper, grad_scale, found_inf, skip_flags)
        return loss

    def _traced_step(self, closure):
        """The step as torch.compile traces it: the functional ``sgd_step`` (one custom op per
        device and dtype) over each group's params with gradients, without the eager path's
        caches, which key on tensor addresses that a trace does not have. Contiguous mode steps
        views of its flat buffers (``_traced_flat_step``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            if self.contiguous:
                for flat in self._flats.get(index, ()):
                    self._traced_flat_step(flat, SGDHyper.from_group(group))
                continue
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

    def _plan(self, index: int, group: dict, grads: list, missing: list, momentum_on: bool) -> Plan:
        params = group["params"]
        hyper = SGDHyper.from_group(group)
        by_launch: dict[tuple, list[int]] = {}
        sparse_members: set[int] = set()
        for i, p in enumerate(params):
            if missing[i]:
                continue
            name = param_name(i, index)
            if grads[i].layout is not torch.strided and not is_dtensor(p):
                check_sparse_grad(p, grads[i], name, f"the .grad of {name}", hyper)
                sparse_members.add(i)
            else:
                check_param_and_grad(p, grads[i], name, f"the .grad of {name}")
            entry = self.state.get(p)
            buf = entry.get("momentum_buffer") if entry else None
            if momentum_on and buf is not None and (buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device):
                raise ValueError(
                    f"the momentum_buffer of {name} must match it in shape, dtype and device: got {tuple(buf.shape)} "
                    f"{buf.dtype} {buf.device} for {tuple(p.shape)} {p.dtype} {p.device}"
                )
            if momentum_on and buf is not None and is_dtensor(buf) != is_dtensor(p):
                raise ValueError(
                    f"the momentum_buffer of {name} must be a DTensor exactly when the param is one (FSDP2): load "
                    "a sharded optimizer state dict (torch.distributed.checkpoint.state_dict.set_state_dict)"
                )
            key = (p.device, p.dtype, is_dtensor(p), momentum_on and buf is None, i in sparse_members)
            by_launch.setdefault(key, []).append(i)
        launches = []
        for (device, dtype, dtensor, first, sparse), idx in by_launch.items():
            members = [params[i] for i in idx]
            if first:  # recorded in state by the step that fills them, after every check passed
                buffers = new_momentum_buffers(members)
            elif momentum_on:
                buffers = [self.state[p]["momentum_buffer"] for p in members]
            else:
                buffers = []
            launch_grads = [grads[i] for i in idx]
            if dtensor:
                members_local, launch_grads = list(map(local_tensor, members)), list(map(local_tensor, launch_grads))
                device = members_local[0].device
            else:
                members_local = members
            launch = Launch(members, idx, buffers, first, None, dtensor)
            launch.new_buffers = buffers if first else None
            names = [param_name(i, index) for i in idx]
            if sparse:
                launch.prepared = SparseGradStep(backends.select(OP, device, dtype), names)
            else:
                launch.prepared = PreparedStep(backends.select(OP, device, dtype), members_local, launch.buffers, names)
            launch.prepared.check_grads(members_local, launch_grads)
            launches.append(launch)
        plan = Plan(missing, momentum_on, launches, backend_request())
        plan.native = self._native_plan(params, missing, launches)
        self._plans[index] = plan
        return plan

    def _native_plan(self, params: list, missing: list, launches: list):
        """The group's steps as one ``cpu_step_plan`` (its ``(prepare, run)``), when they are one dense
        launch with its buffers on the cpu backend: the steady state of a model on a CPU. None
        otherwise (a first step, several dtypes, DTensors, sparse gradients, other backends)."""
        if self.capturable or len(launches) != 1:
            return None
        launch = launches[0]
        if launch.first or launch.dtensor or type(launch.prepared) is not PreparedStep or launch.prepared.backend != "cpu":
            return None
        return cpu_step_plan(launch.members, launch.buffers, None, [p for p, miss in zip(params, missing) if miss])

    def _current_plan(self, index: int, group: dict, grads: list, momentum_on: bool, capturing: bool) -> Plan:
        """The plan for this step's gradients: the cached one when nothing it depends on changed,
        found by C-level passes over the tensors; a new one otherwise. New gradient tensors
        (set_to_none makes new ones every step) are checked for their strides only."""
        missing = list(map(operator.is_, grads, repeat(None)))
        plan = self._plans.get(index)
        if (
            plan is None or plan.stale or plan.missing != missing or plan.momentum_on != momentum_on
            or plan.request != backend_request()
            or not all(launch.prepared.addresses_unchanged(launch.params()) for launch in plan.launches)
        ):
            if capturing and momentum_on and self._would_create_buffers(group, missing):
                check_capturable(SGDHyper.from_group(group), group["params"][0].device, True, True)
            return self._plan(index, group, grads, missing, momentum_on)
        try:
            for launch in plan.launches:
                launch.prepared.check_grads(launch.params(), launch.grads(grads))
        except TypeError:  # a gradient changed layout (sparse <-> dense): plan again, which names a bad one
            return self._plan(index, group, grads, missing, momentum_on)
        return plan

    def _would_create_buffers(self, group: dict, missing: list) -> bool:
        return any(
            not miss and (self.state.get(p) or {}).get("momentum_buffer") is None
            for p, miss in zip(group["params"], missing)
        )

    def _prepare_group(self, index, group, hyper, capturing) -> tuple:
        """(plan, hyper, grads) for one group in normal mode: every check, no write. grads is None
        when the plan's ``cpu_step_plan`` read and checked them (in C++, no pass here)."""
        plan = self._plans.get(index)
        if (
            plan is not None and plan.native is not None and plan.momentum_on == (hyper.momentum != 0)
            and plan.request == backend_request() and plan.native[0]()
        ):
            return plan, hyper, None
        grads = list(map(_GRAD, group["params"]))
        plan = self._current_plan(index, group, grads, hyper.momentum != 0, capturing)
        if plan.native is not None:
            if plan.native[0]():  # a new plan: this step runs through it already
                return plan, hyper, None
            # The plan's checks refused what the Python ones passed: name it before any group is
            # written (else the op would raise while stepping, after the groups before this one).
            for launch in plan.launches:
                for k, (i, p) in enumerate(zip(launch.index, launch.members)):
                    name = param_name(i, index)
                    check_same_strides(p, grads[i], name, f"the .grad of {name}")
                    if launch.buffers:
                        check_same_strides(p, launch.buffers[k], name, f"the momentum_buffer of {name}")
        if self.capturable:
            for launch in plan.launches:
                check_capturable(hyper, launch.device, launch.first, capturing)
        return plan, hyper, grads

    def _step_group(self, plan, grads, hyper, grad_scale, found_inf, skip_flags) -> None:
        if grads is None:  # prepared by the plan's cpu_step_plan
            device = plan.launches[0].device
            plan.native[1](
                hyper.on(device), False, on_device(device, grad_scale), on_device(device, found_inf),
                device_skip_flag(skip_flags, device),
            )
            return
        for launch in plan.launches:
            if launch.new_buffers:
                for p, buf in zip(launch.members, launch.new_buffers):
                    self.state[p]["momentum_buffer"] = buf
            launch.prepared.run(
                launch.params(), launch.grads(grads), launch.buffers, hyper, launch.first, grad_scale, found_inf,
                device_skip_flag(skip_flags, launch.device),
            )
