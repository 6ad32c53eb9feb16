"""fastcore5::sgd_step — torch.optim.SGD's update for a list of tensors as one fused custom op.

Layers, as for every op (see linear_relu.py), except that SGD has no autograd (it runs under
no_grad and only mutates):
  * ``SGDHyper`` (``sgd_hyper.py``): the hyper-parameters of one param group, the one record
    every layer passes;
  * ``sgd_step_op``: ``custom_op("fastcore5::sgd_step")`` that mutates params, grads (only with a
    grad_scale: the unscaled grads are written back, as torch's fused SGD does) and the momentum
    buffers; its fake implementation returns nothing, so it traces under torch.compile;
  * ``PreparedStep``: what ``fastcore5.optim.SGD`` keeps per (device, dtype) group between
    steps, calling the launcher without the dispatcher;
  * ``SparseGradStep`` (``sgd_sparse.py``): the step of params whose gradient is sparse;
  * ``sgd_step``: the public functional form, mirroring ``reference.sgd_step``: it checks every
    argument (errors name it), groups the tensors by device, dtype and first-step-ness, and
    returns the momentum buffers.

Launcher contract: ``LAUNCHER_SCHEMA`` below, which the Triton launcher
``fastcore5.kernels.sgd.sgd_step`` and the C++ op ``torch.ops.fastcore5_native.sgd_step`` (the cuda
and cpu backends, by device) follow (tests/test_cuda_compile.py checks both against it).

All tensors of one call share one device and one floating dtype (fp32, bf16, fp16 or fp64);
params[i], grads[i] and momentum_buffers[i] share shape and strides and are dense. Math in fp32
(fp64 for fp64), one rounding to the storage dtype per stored value and step. momentum_buffers
is [] when momentum == 0. first_step=True: the buffers' contents are ignored and each receives its
(weight-decayed, sign-adjusted) gradient. lr_tensor, when given, is a 1-element tensor on the
device read by the kernel (``lr`` is then ignored). grad_scale (1-element, on the device): grads
are divided by it and the quotient written back to grads. found_inf (1-element float) and
skip_flag (int64, element 0), on the device: when nonzero nothing is written at all. No host
synchronisation inside.

Host synchronisation: none in any step, on any backend. New momentum buffers are created
zero-filled (a device fill) and the first-step launch writes them; when that step is skipped
(found_inf or skip_flag) they stay zero and the next step's ``momentum*0 + (1-dampening)*g`` is
exactly torch's first step ``buf = g`` when dampening == 0. The one deviation: with dampening != 0,
a first step that is skipped makes the next step store ``(1-dampening)*g`` where torch (which
never created the buffer) stores ``g``.
"""
from __future__ import annotations

import functools
import operator
from types import SimpleNamespace

import torch
from torch import Tensor

from .. import backends, reference
from .._checks import FLOAT_DTYPES, check_tensor
from .sgd_checks import check_flag, check_param_and_grad
from .sgd_hyper import SGDHyper, on_device

__all__ = ["OP", "KERNELS", "LAUNCHER_SCHEMA", "SGDHyper", "PreparedStep", "cpu_step_plan", "new_momentum_buffers",
           "on_device", "reference_step", "run_traced_step", "sgd_step", "sgd_step_op"]

OP = "sgd"
_LAYOUT = operator.attrgetter("layout")


def _triton_kernels():
    from ..kernels import sgd

    return SimpleNamespace(sgd_step=sgd.sgd_step)


def _native_kernels():
    """The C++ op, which dispatches to its CUDA or CPU kernel by device (the cuda and cpu backends)."""
    backends.native_extension()
    return SimpleNamespace(sgd_step=torch.ops.fastcore5_native.sgd_step)


KERNELS = backends.KernelTable(triton=_triton_kernels, cuda=_native_kernels, cpu=_native_kernels)


# The launchers' arguments, in order, as a torch schema: written once, here; the custom op takes
# them and the backend's name.
LAUNCHER_SCHEMA = (
    "sgd_step(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, Tensor? lr_tensor, "
    "float lr, float momentum, float dampening, float weight_decay, bool nesterov, bool maximize, "
    "bool decoupled_weight_decay, bool first_step, Tensor? grad_scale, Tensor? found_inf, Tensor? skip_flag) -> ()"
)


@torch.library.custom_op(
    "fastcore5::sgd_step",
    mutates_args=("params", "grads", "momentum_buffers"),
    schema=LAUNCHER_SCHEMA.removeprefix("sgd_step").replace(") -> ()", ", str backend) -> ()"),
)
def sgd_step_op(*launcher_args_and_backend) -> None:
    """One SGD step in place over tensors of one device and dtype: the launcher's arguments
    (``LAUNCHER_SCHEMA``), then the backend, "triton", "cuda" or "cpu"."""
    *launcher_args, backend = launcher_args_and_backend
    KERNELS[backend].sgd_step(*launcher_args)


@sgd_step_op.register_fake
def _(*launcher_args_and_backend) -> None:
    return None


def new_momentum_buffers(params) -> list[Tensor]:
    """Zero-filled buffers shaped (and strided) like ``params``, for a first-step launch to fill.
    Zero, not uninitialised: a skipped first step leaves them zero, which the next step reads as
    torch's first step (module docstring), without reading found_inf on the host."""
    return [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]


def cpu_step_plan(params, buffers, grads=None, gradless=()):
    """A step over CPU tensors of one dtype kept in C++ between steps (csrc/cpu/sgd_plan.cpp), as
    ``(prepare, run)``, or None when the tensors do not fit one (or the extension has no plans).

    ``prepare()`` reads and checks this step's gradients and returns False when anything changed
    since the plan was made (plan again); it writes nothing. ``run(hyper, first_step, grad_scale,
    found_inf, skip_flag)`` steps the prepared tensors and bumps the params' version counters
    (``hyper``: an SGDHyper whose tensor lr, if any, is on the CPU; the tensors on the CPU). ``grads``: fixed gradients (contiguous mode's flat views, prepared once), or
    None to read each param's ``.grad`` at every ``prepare``; ``gradless``: params whose ``.grad``
    must stay None. A step through a plan is two C calls whatever the number of tensors: no Python
    pass over them and no dispatcher call (which unpacks every tensor of three lists)."""
    extension = backends.native_extension()
    if not hasattr(extension, "sgd_cpu_plan"):  # an extension built before the plans existed
        return None
    plan = extension.sgd_cpu_plan(list(params), list(buffers), None if grads is None else list(grads), list(gradless))
    if plan is None:
        return None
    return functools.partial(extension.sgd_cpu_prepare, plan), functools.partial(extension.sgd_cpu_run, plan)


class PreparedStep:
    """One (device, dtype) launch group of ``fastcore5.optim.SGD``, prepared once and run step after
    step while its params and buffers stay the same tensors (the gradients may change).

    The launcher is called directly, not through the dispatcher: torch.library's Python custom-op
    dispatch costs about 200 us per call plus about 6 us per tensor in a list argument on our CPU,
    more than the whole step should. The version counters that the dispatcher would bump are
    bumped here instead, for the params only (autograd saves params for backward, never the
    optimizer's buffers or the gradients; a pass over 2000 tensors costs ~0.4 ms on our CPU), so
    autograd still notices a param modified after it was saved. With fixed ``grads`` (contiguous
    mode) on the cpu backend the step runs through a ``cpu_step_plan``, bypassing even the op.
    """

    __slots__ = ("backend", "triton", "native_run")

    def __init__(self, backend: str, params: list[Tensor], buffers: list[Tensor], param_names: list[str] | None = None,
                 grads: list[Tensor] | None = None):
        """``param_names`` name the params in errors (default: ``params[i]``)."""
        self.backend = backend
        self.triton = None
        self.native_run = None
        if backend == "triton":
            from ..kernels.sgd import StepLaunch  # here, not at import: triton is optional

            self.triton = StepLaunch(params, buffers, param_names)
        elif backend == "cpu" and grads is not None:
            plan = cpu_step_plan(params, buffers, grads)
            self.native_run = None if plan is None else plan[1]

    def addresses_unchanged(self, params: list[Tensor]) -> bool:
        return self.triton is None or self.triton.addresses_unchanged(params)

    def check_grads(self, params: list[Tensor], grads: list[Tensor]) -> None:
        """The Triton kernel walks memory: gradients must be laid out like their params. (The CUDA
        and CPU C++ ops check their arguments themselves; the reference takes any layout.) A sparse
        gradient (stepped by ``SparseGradStep``) on a dense launch is a TypeError, on which the
        optimizer plans again: Triton's check finds it; the other backends look for it (one pass
        over the gradients: a C++ op would reach its sparse dispatch key, which has no kernel, and
        raise NotImplementedError instead of re-planning)."""
        if self.triton is not None:
            self.triton.check_grads(params, grads)
        elif set(map(_LAYOUT, grads)) - {torch.strided}:
            raise TypeError("a sparse gradient on a dense launch: the step is planned again")

    def run(self, params, grads, buffers, hyper: SGDHyper, first_step: bool, grad_scale, found_inf, skip_flag) -> None:
        device = params[0].device
        grad_scale, found_inf = on_device(device, grad_scale), on_device(device, found_inf)
        if self.backend == "torch":
            reference_step(params, grads, buffers, first_step, hyper, grad_scale, found_inf, skip_flag)
            return
        if self.native_run is not None:  # bumps the params' versions itself
            self.native_run(hyper.on(device), first_step, grad_scale, found_inf, skip_flag)
            return
        args = hyper.launcher_args(device)
        if self.triton is not None:
            self.triton.launch(params[0], grads, *args, first_step, grad_scale, found_inf, skip_flag)
        else:
            KERNELS[self.backend].sgd_step(params, grads, buffers, *args, first_step, grad_scale, found_inf, skip_flag)
        torch.autograd.graph.increment_version(params)


def run_traced_step(backend, params, grads, buffers, hyper: SGDHyper, first_step: bool, grad_scale, found_inf) -> None:
    """One launch group's step as torch.compile traces it: the custom op (or the reference step,
    plain torch) instead of ``PreparedStep``'s direct launcher call."""
    device = params[0].device
    grad_scale, found_inf = on_device(device, grad_scale), on_device(device, found_inf)
    if backend == "torch":
        reference_step(params, grads, buffers, first_step, hyper, grad_scale, found_inf, None)
    else:
        sgd_step_op(params, grads, buffers, *hyper.launcher_args(device), first_step, grad_scale, found_inf, None, backend)


def reference_step(params, grads, buffers, first_step, hyper: SGDHyper, grad_scale, found_inf, skip_flag) -> None:
    """The "torch" backend: reference.sgd_step plus the skip protocol the kernels follow, without
    a host read: with a flag, the update is computed on copies and written back through
    ``torch.where(skip, old, new)``, so a skipped step changes nothing, grads included. Sparse
    gradients (``SparseGradStep``) are unscaled in place and never written back through the flag."""
    skip = None
    for flag in (found_inf, skip_flag):
        if flag is not None:
            raised = flag.reshape(-1)[0] != 0
            skip = raised if skip is None else skip | raised
    lr = hyper.lr.detach().reshape(()).to(params[0].device) if isinstance(hyper.lr, Tensor) else hyper.lr
    dense_grads = [g for g in grads if g.layout is torch.strided]
    targets = list(params) + dense_grads + list(buffers)
    if skip is not None:
        params, buffers = ([t.clone() for t in ts] for ts in (params, buffers))
        grads = [g.clone() if g.layout is torch.strided else g for g in grads]
    if grad_scale is not None:
        for g in grads:
            g.div_(grad_scale.reshape(()).to(g.device))  # 0-d: sparse division takes no other divisor
    with_momentum = hyper.momentum != 0
    new = reference.sgd_step(
        list(params), list(grads), [None] * len(params) if first_step or not with_momentum else list(buffers),
        lr=lr, momentum=hyper.momentum, dampening=hyper.dampening, weight_decay=hyper.weight_decay,
        nesterov=hyper.nesterov, maximize=hyper.maximize, decoupled_weight_decay=hyper.decoupled_weight_decay,
    )
    if with_momentum and first_step:
        for buffer, value in zip(buffers, new):
            buffer.copy_(value)
    if skip is not None:
        updated = list(params) + [g for g in grads if g.layout is torch.strided] + list(buffers)
        for target, value in zip(targets, updated):
            target.copy_(torch.where(skip, target, value))


# The same parameters as reference.sgd_step, written again on purpose (a duplicate pair that stays):
# the fused form is a drop-in for the spec, so its signature is the spec's, spelled out for
# readers and tools, plus the skip protocol; tests/test_reference.py checks that they agree.
def sgd_step(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    *,
    lr: float | Tensor,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    skip_flag: Tensor | None = None,
) -> list[Tensor | None]:
    """torch.optim.SGD's update, fused: the functional form of ``fastcore5.optim.SGD``.

    Same arguments and return value as ``fastcore5.reference.sgd_step`` (a None buffer means "first
    step: the buffer becomes the gradient"; the returned list holds the buffers, new ones where
    None was given; all None without momentum), plus the skip protocol: ``grad_scale`` divides the
    grads (written back unscaled); a nonzero ``found_inf`` (1 element) or element 0 of ``skip_flag``
    (int64) skips the step, read on the device. A skipped step still returns new buffers where None
    was given, zero-filled (see the module docstring for what that means for the next step).
    Never reads a device value on the host (a tensor ``lr`` is checked for its shape and dtype only).

    Tensors may mix devices and dtypes: each (device, dtype) group is one kernel launch (two while
    some buffers are new). Params must be dense (contiguous or channels-last) with grads and
    buffers of the same shape, dtype, device and strides; sparse and complex tensors are refused.
    """
    hyper = SGDHyper(lr, momentum, dampening, weight_decay, nesterov, maximize, decoupled_weight_decay)
    hyper.check(read_tensor_lr=not isinstance(lr, Tensor) or lr.device.type == "cpu")
    for name, value in (("params", params), ("grads", grads), ("momentum_buffers", momentum_buffers)):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{name} must be a list of tensors, got {type(value).__name__}")
    if not len(params) == len(grads) == len(momentum_buffers):
        raise ValueError(
            f"params, grads and momentum_buffers must have the same length, got {len(params)}, {len(grads)} "
            f"and {len(momentum_buffers)}"
        )
    check_flag("grad_scale", grad_scale, FLOAT_DTYPES, one_element=True)
    check_flag("found_inf", found_inf, FLOAT_DTYPES, one_element=True)
    check_flag("skip_flag", skip_flag, (torch.int64,), one_element=False)
    with_momentum = momentum != 0
    groups: dict[tuple, list[int]] = {}
    for i, (p, g, buf) in enumerate(zip(params, grads, momentum_buffers)):
        check_param_and_grad(p, g, f"params[{i}]", f"grads[{i}]")
        if with_momentum and buf is not None:
            check_tensor(f"momentum_buffers[{i}]", buf)
            if buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
                raise ValueError(
                    f"momentum_buffers[{i}] must match params[{i}] in shape, dtype and device: got "
                    f"{tuple(buf.shape)} {buf.dtype} {buf.device} for {tuple(p.shape)} {p.dtype} {p.device}"
                )
        groups.setdefault((p.device, p.dtype, with_momentum and buf is None), []).append(i)
    buffers = list(momentum_buffers) if with_momentum else [None] * len(params)
    with torch.no_grad():
        for (device, dtype, first), index in groups.items():
            ps = [params[i] for i in index]
            gs = [grads[i] for i in index]
            if not with_momentum:
                bs = []
            elif first:
                bs = new_momentum_buffers(ps)
                for i, b in zip(index, bs):
                    buffers[i] = b
            else:
                bs = [buffers[i] for i in index]
            flags = (on_device(device, grad_scale), on_device(device, found_inf), on_device(device, skip_flag))
            backend = backends.select(OP, device, dtype)
            if backend == "torch":
                reference_step(ps, gs, bs, first, hyper, *flags)
            else:
                sgd_step_op(ps, gs, bs, *hyper.launcher_args(device), first, *flags, backend)
    return buffers
