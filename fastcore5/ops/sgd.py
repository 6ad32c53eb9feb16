"""fastcore5::sgd_step — torch.optim.SGD's update for a list of tensors as one fused custom op.

Layers, as for every op (see linear_relu.py), except that SGD has no autograd (it runs under
no_grad and only mutates):
  * ``sgd_step_op``: ``custom_op("fastcore5::sgd_step")`` that mutates params, grads (only with a
    grad_scale: the unscaled grads are written back, as torch's fused SGD does) and the momentum
    buffers; its fake implementation returns nothing, so it traces under torch.compile;
  * ``step_tensors``: runs one (device, dtype) group on the selected backend — the custom op for
    "triton"/"cuda", the reference for "torch";
  * ``sgd_step``: the public functional form, mirroring ``reference.sgd_step``: it checks every
    argument (errors name it), groups the tensors by device, dtype and first-step-ness, and
    returns the momentum buffers.

Launcher contract (``fastcore5.kernels.sgd.sgd_forward``; the CUDA backend's
``torch.ops.fastcore5_cuda.sgd_forward`` must accept the same arguments, in this order):

    sgd_forward(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers,
                Tensor? lr_tensor, float lr, float momentum, float dampening,
                float weight_decay, bool nesterov, bool maximize,
                bool decoupled_weight_decay, bool first_step,
                Tensor? grad_scale, Tensor? found_inf) -> ()

All tensors of one call share one device and one floating dtype (fp32, bf16, fp16 or fp64);
params[i], grads[i] and momentum_buffers[i] share shape and strides and are dense. Math in fp32
(fp64 for fp64). momentum_buffers is [] when momentum == 0. first_step=True: the buffers'
contents are ignored and each receives its (weight-decayed, sign-adjusted) gradient. lr_tensor,
when given, is a 1-element tensor on the device read by the kernel (``lr`` is then ignored).
grad_scale (1-element, on the device): grads are divided by it and the quotient written back to
grads. found_inf (1-element, on the device): when nonzero nothing is written at all. No host
synchronisation inside.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import backends, reference
from .._checks import FLOAT_DTYPES, check_tensor
from ..kernels._common import poison_

OP = "sgd"


@torch.library.custom_op("fastcore5::sgd_step", mutates_args=("params", "grads", "momentum_buffers"))
def sgd_step_op(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    lr_tensor: Tensor | None,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
    first_step: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    backend: str,
) -> None:
    """One SGD step in place over tensors of one device and dtype; ``backend`` is "triton" or "cuda".
    Arguments as ``sgd_forward`` in the module docstring."""
    backends.launcher(backend, OP, "sgd_forward")(
        params, grads, momentum_buffers, lr_tensor, lr, momentum, dampening, weight_decay,
        nesterov, maximize, decoupled_weight_decay, first_step, grad_scale, found_inf,
    )


@sgd_step_op.register_fake
def _(params, grads, momentum_buffers, lr_tensor, lr, momentum, dampening, weight_decay,
      nesterov, maximize, decoupled_weight_decay, first_step, grad_scale, found_inf, backend):
    return None


def check_hyperparameters(lr, momentum, dampening, weight_decay, nesterov) -> None:
    """torch.optim.SGD's checks, with its messages (plus type checks torch leaves to later errors)."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not lr.dtype.is_floating_point:
            raise TypeError(f"Tensor lr must be floating point, got {lr.dtype}")
    elif not isinstance(lr, (int, float)) or isinstance(lr, bool):
        raise TypeError(f"lr must be a float or a 1-element tensor, got {type(lr).__name__}")
    if lr < 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")
    if momentum < 0.0:
        raise ValueError(f"Invalid momentum value: {momentum}")
    if weight_decay < 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")


def new_momentum_buffers(grads) -> list[Tensor]:
    """Uninitialised buffers shaped (and strided) like ``grads``, for a first step to fill."""
    return [poison_(torch.empty_like(g, memory_format=torch.preserve_format)) for g in grads]


def _on(device: torch.device, t: Tensor | None) -> Tensor | None:
    return t if t is None or t.device == device else t.to(device, non_blocking=True)


_selected: dict[tuple, str] = {}


def _backend_for(device: torch.device, dtype: torch.dtype) -> str:
    """backends.select, remembered per request, device and dtype: select() costs microseconds and
    the optimizer asks once per (device, dtype) every step. The request (use_backend /
    FASTCORE5_BACKEND) and the interpreter switch are part of the key, so changing them is seen."""
    key = (backends.requested(), backends.interpreter_active(), device, dtype)
    name = _selected.get(key)
    if name is None:
        name = _selected[key] = backends.select(OP, device, dtype)
    return name


def step_tensors(
    params,
    grads,
    momentum_buffers,
    first_step: bool,
    *,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    backend: str | None = None,
    dispatch: bool = True,
) -> None:
    """Step one group of already-checked tensors sharing a device and dtype, in place.

    ``momentum_buffers`` is a list (one per param; filled when ``first_step``) or [] without
    momentum. ``sgd_step`` is the checked entry point; the optimizer calls this directly with its
    cached groups and ``dispatch=False``: the launcher is then called without going through the
    dispatcher (torch.library's Python custom-op dispatch costs about 200 us per call plus about
    6 us per tensor in a list argument on our CPU, more than the whole step should), and the
    version counters that the dispatcher would bump are bumped here instead, so autograd still
    notices a param modified after it was saved for backward.
    """
    if not params:
        return
    device, dtype = params[0].device, params[0].dtype
    if backend is None:
        backend = _backend_for(device, dtype)
    momentum, weight_decay = float(momentum), float(weight_decay)
    lr_tensor = None
    if isinstance(lr, Tensor):
        lr_tensor = _on(device, lr.detach().reshape(()))
    if backend == "torch":
        _reference_step(
            params, grads, momentum_buffers, first_step, lr_tensor if lr_tensor is not None else float(lr),
            momentum, dampening, weight_decay, nesterov, maximize, decoupled_weight_decay, grad_scale, found_inf,
        )
        return
    args = (
        list(params), list(grads), list(momentum_buffers) if momentum != 0 else [],
        lr_tensor, 0.0 if lr_tensor is not None else float(lr), momentum, float(dampening), weight_decay,
        bool(nesterov), bool(maximize), bool(decoupled_weight_decay), bool(first_step),
        _on(device, grad_scale), _on(device, found_inf),
    )
    if dispatch:
        sgd_step_op(*args, backend)
        return
    backends.launcher(backend, OP, "sgd_forward")(*args)
    torch.autograd.graph.increment_version(args[0] + args[2] + (args[1] if grad_scale is not None else []))


def _reference_step(params, grads, buffers, first_step, lr, momentum, dampening, weight_decay, nesterov,
                    maximize, decoupled_weight_decay, grad_scale, found_inf) -> None:
    """The "torch" backend: reference.sgd_step plus the GradScaler protocol the kernels follow
    (this one reads found_inf on the host)."""
    if found_inf is not None and float(found_inf) != 0:
        return
    if grad_scale is not None:
        for g in grads:
            g.div_(grad_scale.to(g.device))
    new = reference.sgd_step(
        list(params), list(grads), [None] * len(params) if first_step or momentum == 0 else list(buffers),
        lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
        maximize=maximize, decoupled_weight_decay=decoupled_weight_decay,
    )
    if momentum != 0 and first_step:
        for buffer, value in zip(buffers, new):
            buffer.copy_(value)


def _check_scaler_tensor(name: str, t: Tensor | None) -> None:
    if t is not None:
        check_tensor(name, t, dtypes=FLOAT_DTYPES)
        if t.numel() != 1:
            raise ValueError(f"{name} must have exactly one element, got shape {tuple(t.shape)}")


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
) -> list[Tensor | None]:
    """torch.optim.SGD's update, fused: the functional form of ``fastcore5.optim.SGD``.

    Same arguments and return value as ``fastcore5.reference.sgd_step`` (a None buffer means "first
    step: the buffer becomes the gradient"; the returned list holds the buffers, new ones where
    None was given; all None without momentum), plus the GradScaler protocol: ``grad_scale``
    divides the grads (written back unscaled) and a nonzero ``found_inf`` skips the step,
    buffers included. found_inf is read on the device, except when some buffer is still None:
    then it is read once on the host to decide whether the buffer is created at all.

    Tensors may mix devices and dtypes: each (device, dtype) group is one kernel launch (two while
    some buffers are new). Params must be dense (contiguous or channels-last) with grads and
    buffers of the same shape, dtype, device and strides; sparse and complex tensors are refused.
    """
    check_hyperparameters(lr, momentum, dampening, weight_decay, nesterov)
    for name, value in (("params", params), ("grads", grads), ("momentum_buffers", momentum_buffers)):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{name} must be a list of tensors, got {type(value).__name__}")
    if not len(params) == len(grads) == len(momentum_buffers):
        raise ValueError(
            f"params, grads and momentum_buffers must have the same length, got {len(params)}, {len(grads)} "
            f"and {len(momentum_buffers)}"
        )
    _check_scaler_tensor("grad_scale", grad_scale)
    _check_scaler_tensor("found_inf", found_inf)
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
    if any(first for _, _, first in groups) and found_inf is not None and float(found_inf) != 0:
        return buffers  # an overflowed step creates no buffers (and the kernels would skip the rest)
    hyper = dict(
        lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
        maximize=maximize, decoupled_weight_decay=decoupled_weight_decay, grad_scale=grad_scale, found_inf=found_inf,
    )
    with torch.no_grad():
        for (_, _, first), index in groups.items():
            ps = [params[i] for i in index]
            gs = [grads[i] for i in index]
            if not with_momentum:
                bs = []
            elif first:
                bs = new_momentum_buffers(gs)
                for i, b in zip(index, bs):
                    buffers[i] = b
            else:
                bs = [buffers[i] for i in index]
            step_tensors(ps, gs, bs, first, **hyper)
    return buffers


def check_param_and_grad(p, g, p_name: str, g_name: str) -> None:
    """A param and its gradient as the kernels need them; errors name the argument."""
    check_tensor(p_name, p)
    check_tensor(g_name, g)
    if p.is_sparse or g.is_sparse:
        raise RuntimeError(f"fastcore5 SGD does not support sparse tensors ({p_name if p.is_sparse else g_name} is sparse)")
    if p.is_complex():
        raise TypeError(f"{p_name} is complex ({p.dtype}); fastcore5 SGD supports real floating dtypes only")
    if p.dtype not in FLOAT_DTYPES:
        allowed = ", ".join(str(d).replace("torch.", "") for d in FLOAT_DTYPES)
        raise TypeError(f"{p_name} has dtype {p.dtype}; expected one of: {allowed}")
    if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
        raise ValueError(
            f"{g_name} must match {p_name} in shape, dtype and device: got {tuple(g.shape)} {g.dtype} {g.device} "
            f"for {tuple(p.shape)} {p.dtype} {p.device}"
        )
