"""``SGD``: torch.optim.SGD with one fused kernel launch per step, a drop-in (see the
``fastcore5.optim`` docstring). Normal mode's launch plans are in ``plan.py``, contiguous mode's
flat buffers in ``flat.py``, the kernels behind both in ``fastcore5.ops.sgd``.
"""
from __future__ import annotations

import operator
import warnings
from itertools import repeat

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import backends, index_errors
from .._checks import check_int
from ..ops.sgd import (
    OP, PreparedStep, SGDHyper, SparseGradStep, check_param_and_grad, check_sparse_grad, new_momentum_buffers,
    run_traced_step, sgd_step,
)
from .distributed import is_dtensor, local_tensor
from .flat import FlatBuffers
from .plan import Launch, Plan, backend_request

__all__ = ["SGD"]

_GRAD = operator.attrgetter("grad")


def _capturing() -> bool:
    """A CUDA graph capture is under way on the current stream (never initialises CUDA)."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def _param_name(index: int, group_index: int) -> str:
    """How errors name a param: by its place in its group, as the user listed it."""
    return f"param {index} of param group {group_index}"


def _first_shared_memory(named: list) -> tuple[str, str] | None:
    """The names, in listing order, of two of the (tensor, name) pairs whose memory overlaps, or None."""
    spans = []
    for order, (p, name) in enumerate(named):
        if p.numel() == 0 or p.device.type == "meta":
            continue
        start = p.storage_offset() * p.element_size()
        last = sum((size - 1) * stride for size, stride in zip(p.shape, p.stride())) * p.element_size()
        spans.append((p.untyped_storage().data_ptr(), start, start + last + p.element_size(), order))
    spans.sort()
    for (storage, _, end, order), (next_storage, next_start, _, next_order) in zip(spans, spans[1:]):
        if storage == next_storage and next_start < end:
            first, second = sorted((order, next_order))
            return named[first][1], named[second][1]
    return None


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
        over a few ranges regardless of the number of tensors (constraints in the
        ``fastcore5.optim`` docstring).

    capturable: the step may be captured in a CUDA graph (``torch.cuda.graph``) and replayed. lr must
        then be a tensor on the params' device (a scheduler updates it in place, which replays
        see); run at least one step eagerly before capturing, so the momentum buffers exist.
        momentum, dampening, weight_decay and the flags are baked into a captured step: changing
        them (OneCycleLR's momentum cycling) needs a new capture. Without it, capturing a step
        raises.

    Params whose ``.grad`` is None are skipped. Sparse gradients (``nn.Embedding(sparse=True)``) are
    stepped as torch.optim.SGD steps them (``fastcore5.ops.sgd.SparseGradStep``). A refused call
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
            self._check_contiguous_groups(range(len(self.param_groups)))
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
            self._check_group(index, self.param_groups[index])
            if self.contiguous and not self._building:
                self._check_contiguous_groups([index])
                self._build_flats(index)
        except BaseException:
            del self.param_groups[index:]
            raise

    def _check_group(self, index: int, group: dict) -> None:
        SGDHyper.from_group(group).check()
        if group.get("differentiable"):
            raise ValueError("differentiable=True is not supported by fastcore5.optim.SGD; use torch.optim.SGD")
        for i, p in enumerate(group["params"]):
            if p.is_sparse or p.is_complex() or not p.dtype.is_floating_point:
                raise TypeError(
                    f"{_param_name(i, index)} is {p.dtype}"
                    f"{' sparse' if p.is_sparse else ''}; fastcore5.optim.SGD supports dense real floating params"
                )

    def _check_contiguous_groups(self, indices) -> None:
        """What contiguous mode cannot hold, for the groups ``indices``: DTensors, a param listed
        twice, and params sharing memory (tied weights that are distinct tensors, views of one
        tensor), which separate flat slots would silently untie."""
        for index in indices:
            params = self.param_groups[index]["params"]
            if any(map(is_dtensor, params)):
                raise ValueError(
                    "contiguous=True cannot hold DTensor params (FSDP2's fully_shard owns their storage); "
                    "use the default contiguous=False, which steps the local shards in one launch"
                )
            if len(set(map(id, params))) != len(params):
                raise ValueError(
                    f"param group {index} holds a param twice; contiguous=True keeps one flat slot per param, "
                    "so list each param once"
                )
        named = [(p, _param_name(i, g)) for g, group in enumerate(self.param_groups) for i, p in enumerate(group["params"])]
        shared = _first_shared_memory(named)
        if shared is not None:
            raise ValueError(
                f"{shared[0]} and {shared[1]} share memory (tied weights or views of one tensor); contiguous=True "
                "gives each param its own slot in a flat buffer, which would untie them: pass the shared "
                "tensor once, or use contiguous=False (which keeps the sharing, as torch.optim.SGD does)"
            )

    def _build_flats(self, index: int) -> None:
        params = self.param_groups[index]["params"]
        by_kind: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            by_kind.setdefault((p.device, p.dtype), []).append(i)
        self._flats[index] = [
            FlatBuffers([params[i] for i in members], self.state, [_param_name(i, index) for i in members])
            for members in by_kind.values()
        ]

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load_state_dict; a momentum buffer that does not fit its param (shape, or not a
        tensor) is refused naming the param, and the optimizer keeps its own state."""
        kept_state, kept_groups = self.state, self.param_groups
        super().load_state_dict(state_dict)
        try:
            self._check_loaded_buffers()
        except BaseException:
            self.state, self.param_groups = kept_state, kept_groups
            raise
        self._plans.clear()
        for flats in self._flats.values():
            for flat in flats:
                flat.adopt_buffers(self.state)
        self.refresh()

    def _check_loaded_buffers(self) -> None:
        for g, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                entry = self.state.get(p)
                buf = entry.get("momentum_buffer") if entry else None
                if buf is None:
                    continue
                if not isinstance(buf, Tensor):
                    raise TypeError(f"the momentum_buffer of {_param_name(i, g)} must be a tensor, got {type(buf).__name__}")
                if buf.shape != p.shape:
                    raise ValueError(
                        f"the momentum_buffer of {_param_name(i, g)} must match it in shape: got "
                        f"{tuple(buf.shape)} for {tuple(p.shape)}"
                    )
                if buf.layout is not torch.strided:  # torch's SGD keeps a sparse one after sparse gradients
                    entry["momentum_buffer"] = buf.to_dense()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Normal mode: torch's zero_grad. Contiguous mode: one fill per flat gradient buffer
        (``set_to_none`` is ignored: the flat views must stay the gradients)."""
        if not self.contiguous:
            return super().zero_grad(set_to_none)
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

    def _plan(self, index: int, group: dict, grads: list, missing: list, momentum_on: bool) -> Plan:
        params = group["params"]
        hyper = SGDHyper.from_group(group)
        by_launch: dict[tuple, list[int]] = {}
        sparse_members: set[int] = set()
        for i, p in enumerate(params):
            if missing[i]:
                continue
            name = _param_name(i, index)
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
            names = [_param_name(i, index) for i in idx]
            if sparse:
                launch.prepared = SparseGradStep()
            else:
                launch.prepared = PreparedStep(backends.select(OP, device, dtype), members_local, launch.buffers, names)
            launch.prepared.check_grads(members_local, launch_grads)
            launches.append(launch)
        plan = Plan(missing, momentum_on, launches, backend_request())
        self._plans[index] = plan
        return plan

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
                self._check_capturable(SGDHyper.from_group(group), group["params"][0].device, True, True)
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
        """(plan, hyper, grads) for one group in normal mode: every check, no write."""
        grads = list(map(_GRAD, group["params"]))
        plan = self._current_plan(index, group, grads, hyper.momentum != 0, capturing)
        if self.capturable:
            for launch in plan.launches:
                self._check_capturable(hyper, launch.device, launch.first, capturing)
        return plan, hyper, grads

    def _step_group(self, plan, grads, hyper, grad_scale, found_inf, skip_flags) -> None:
        for launch in plan.launches:
            if launch.new_buffers:
                for p, buf in zip(launch.members, launch.new_buffers):
                    self.state[p]["momentum_buffer"] = buf
            launch.prepared.run(
                launch.params(), launch.grads(grads), launch.buffers, hyper, launch.first, grad_scale, found_inf,
                self._skip_flag(skip_flags, launch.device),
            )

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
                self._check_capturable(hyper, flat.device, new_buffers, capturing)
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
        n = check_int("n", n, -count, count)
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
