"""``SGDHyper``: one param group's SGD hyper-parameters, checked as torch.optim.SGD checks them and
passed to the launchers in the launcher contract's order (``fastcore5.ops.sgd.LAUNCHER_SCHEMA``)."""
from __future__ import annotations

from numbers import Real
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["SGDHyper", "on_device"]

_PLAIN_NUMBERS = frozenset((float, int))


class SGDHyper(NamedTuple):
    """One param group's hyper-parameters, as torch.optim.SGD names them (plus the decoupled decay)."""

    lr: float | Tensor
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    maximize: bool = False
    decoupled_weight_decay: bool = False

    @classmethod
    def from_group(cls, group: dict) -> SGDHyper:
        return cls(
            group["lr"], group["momentum"], group["dampening"], group["weight_decay"], group["nesterov"],
            group["maximize"], group["decoupled_weight_decay"],
        )

    def on(self, device: torch.device) -> SGDHyper:
        """These hyper-parameters with a tensor lr on ``device`` (copied without blocking if needed)."""
        lr = self.lr
        if type(lr) is float or not isinstance(lr, Tensor) or lr.device == device:
            return self
        return self._replace(lr=lr.to(device, non_blocking=True))

    def check_types(self) -> None:
        """The types a step needs (torch itself fails on these only inside its step, halfway)."""
        lr = self.lr
        if (type(lr) in _PLAIN_NUMBERS and type(self.momentum) in _PLAIN_NUMBERS
                and type(self.dampening) in _PLAIN_NUMBERS and type(self.weight_decay) in _PLAIN_NUMBERS):
            return  # the common case, at every step: four type lookups
        if isinstance(lr, Tensor):
            if lr.numel() != 1:
                raise ValueError("Tensor lr must be 1-element")
            if not lr.dtype.is_floating_point:
                raise TypeError(f"Tensor lr must be floating point, got {lr.dtype}")
        elif not isinstance(lr, Real) or isinstance(lr, bool):  # Real: NumPy scalars too, as torch takes them
            raise TypeError(f"lr must be a float or a 1-element tensor, got {type(lr).__name__}")
        for name in ("momentum", "dampening", "weight_decay"):
            value = getattr(self, name)
            if not isinstance(value, (Real, Tensor)) or isinstance(value, Tensor) and value.numel() != 1:
                raise TypeError(f"{name} must be a float, got {type(value).__name__}")

    def check(self, read_tensor_lr: bool = True) -> None:
        """torch.optim.SGD's checks, with its messages (plus type checks torch leaves to later errors).
        ``read_tensor_lr=False`` skips the sign check of a tensor lr, which reads it on the host (a
        sync for a device tensor); the optimizer checks it once, at construction, as torch does."""
        self.check_types()
        lr = self.lr
        if isinstance(lr, Tensor):
            if read_tensor_lr and lr < 0.0:
                raise ValueError(f"Invalid learning rate: {lr}")
        elif lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if self.momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {self.momentum}")
        if self.weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {self.weight_decay}")
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")

    def launcher_args(self, device: torch.device) -> tuple:
        """(lr_tensor, lr, momentum, dampening, weight_decay, nesterov, maximize, decoupled_weight_decay)
        in the launcher contract's order and types; a tensor lr is read on ``device``."""
        lr = self.lr
        if isinstance(lr, Tensor):
            lr_tensor, lr = on_device(device, lr.detach()), 0.0
        else:
            lr_tensor, lr = None, float(lr)
        return (
            lr_tensor, lr, float(self.momentum), float(self.dampening), float(self.weight_decay),
            bool(self.nesterov), bool(self.maximize), bool(self.decoupled_weight_decay),
        )


def on_device(device: torch.device, t: Tensor | None) -> Tensor | None:
    """``t`` (None, or a tensor such as grad_scale) on ``device``, copied without blocking if it is elsewhere."""
    return t if t is None or t.device == device else t.to(device, non_blocking=True)
