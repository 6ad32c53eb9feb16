"""Differentiable once, on every backend: the fused backward passes are not themselves
differentiable, so double backward (``create_graph=True`` through an op, then differentiating the
gradient) raises the same RuntimeError, naming the op, on every backend, the "torch" reference
backend included (plain torch could differentiate twice there, but one promise per option: code
that works on the reference must work on the kernels). ``fastcore5.reference`` itself stays plain
torch, for whoever needs higher derivatives.
"""
from __future__ import annotations

import functools

import torch
from torch._C import _functions


def twice_error(op: str) -> bytes:
    return (
        f"fastcore5.{op} is differentiable once: double backward (differentiating a gradient taken "
        f"with create_graph=True) is not supported on any backend; use fastcore5.reference.{op} for that"
    ).encode()


def not_twice_differentiable(op: str):
    """torch's ``once_differentiable`` for an autograd.Function backward, with an error naming ``op``."""

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            if not torch.is_grad_enabled():  # the engine's default (no create_graph): nothing to mark
                return backward(ctx, *grads)
            with torch.no_grad():
                outputs = backward(ctx, *grads)
            if not any(isinstance(g, torch.Tensor) and g.requires_grad for g in grads):
                return outputs
            many = isinstance(outputs, tuple)
            outputs = outputs if many else (outputs,)
            error = _functions.DelayedError(twice_error(op), len(outputs))
            marked = error(*[None if o is None else o.detach().requires_grad_() for o in outputs])
            marked = marked if isinstance(marked, tuple) else (marked,)
            return marked if many else marked[0]

        return wrapper

    return decorate


class _DifferentiableOnce(torch.autograd.Function):
    """The identity, whose backward refuses to be differentiated (see ``once_only``)."""

    @staticmethod
    def forward(ctx, out, op):
        ctx.op = op
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        return _backward_once(ctx, grad), None


def _backward_once(ctx, grad):
    return not_twice_differentiable(ctx.op)(lambda _, g: g)(ctx, grad)


def once_only(out: torch.Tensor, op: str) -> torch.Tensor:
    """``out`` (a reference-backend result), differentiable once like the kernels' results. Not
    applied under torch.compile (the traced graph's backward is opaque to a second pass anyway)."""
    if torch.compiler.is_compiling() or not (torch.is_grad_enabled() and out.requires_grad):
        return out
    return _DifferentiableOnce.apply(out, op)
