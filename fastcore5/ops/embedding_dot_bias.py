"""fastcore5.embedding_dot_bias — fastai's EmbeddingDotBias forward, differentiable and fused.

The path of an eager call mirrors fastcore5.ops.linear_relu: argument checks once (the detailed
errors are built only when the fast test fails), a cached backend choice, one autograd boundary
(``_EmbeddingDotBias`` around the Triton launchers, or on the cpu and cuda backends the C++ op
``fastcore5_native::embedding_dot_bias`` whose autograd is in C++), the launchers from the static
table ``KERNELS``. Under torch.compile the call goes through the custom ops
``fastcore5::embedding_dot_bias`` and ``fastcore5::embedding_dot_bias_backward`` instead.

Index validation (``validate``):
  "device"  (default on CUDA tensors) the kernels check every index; a bad one reads nothing
            out of bounds, scores NaN, gets no gradient, and is reported as an IndexError by the
            next fastcore5 call, with no host sync on the way (fastcore5/index_errors.py), while
            fastcore5.optim.SGD skips its updates on that device until the error is raised.
  "sync"    (default on CPU tensors) an immediate IndexError: on the cpu backend the forward
            kernel checks every index in its own pass and its record is read as it returns
            (nothing else is read); on the other backends one min/max per index tensor on the
            host before any kernel runs (one device-to-host sync per forward on a GPU).
  "off"     no report at all. The kernels still never read or write outside a table (a bad
            sample scores NaN and gets no gradient); use it for indices validated elsewhere.
The reference ("torch") backend cannot check inside a kernel, so there "device" means "sync";
its "off" masks bad samples to NaN with no gradient, as the kernels do (``embedding_dot_bias_torch``).
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor

from .. import _op_shapes as op_shapes
from .. import backends, index_errors
from .._checks import FLOAT_DTYPES, INDEX_DTYPES
from ._once import not_twice_differentiable, once_only
from .embedding_dot_bias_checks import (
    VALIDATE_MODES, bias_fits, check_index_range, check_y_range, raise_bad_arguments, raise_recorded_index_error,
)
from .embedding_dot_bias_torch import torch_backend, torch_kernels

OP = "embedding_dot_bias"
_FLOATS = frozenset(FLOAT_DTYPES)
_INDICES = frozenset(INDEX_DTYPES)
_STRIDED = torch.strided


def _triton_kernels():
    from ..kernels import embedding_dot_bias as kernels

    return SimpleNamespace(
        forward=kernels.embedding_dot_bias_forward, backward=kernels.embedding_dot_bias_backward, with_autograd=None,
        checks_sync_in_pass=False,
    )


def _native_kernels(device_type: str):
    """The C++ ops, which dispatch to their CUDA or CPU kernels by device; ``with_autograd`` has its
    autograd in C++ (csrc/embedding_dot_bias_autograd.cpp) on both."""
    backends.native_extension()
    ops = torch.ops.fastcore5_native
    return SimpleNamespace(
        forward=ops.embedding_dot_bias_forward,
        backward=ops.embedding_dot_bias_backward,
        # The overload's C++ entry point: calling the OpOverload object adds a Python frame per call.
        with_autograd=getattr(ops.embedding_dot_bias.default, "_op", ops.embedding_dot_bias.default),
        # On CPU the kernel's own pass checks the indices and its record is read at once.
        checks_sync_in_pass=device_type == "cpu",
    )


# "torch": the reference as launchers, for torch.compile only (the custom-op path compiles where
# the eager reference's sparse gradients cannot; eager calls run the reference directly).
KERNELS = backends.KernelTable(
    triton=_triton_kernels,
    cuda=lambda: _native_kernels("cuda"),
    cpu=lambda: _native_kernels("cpu"),
    torch=torch_kernels,
)


def _forward(launch, users, items, u_weight, i_weight, u_bias, i_bias, y_lo, y_hi, validate, sync_in_pass):
    """``launch`` (a forward launcher: users, ..., y_lo, y_hi, index_errors) with the index
    validation of ``validate``. ``sync_in_pass``: "sync" is checked by the kernel's own pass (a
    fresh record read right after it, CPU only) instead of a min/max over the indices first."""
    if validate == "sync":
        if not sync_in_pass:
            check_index_range(users, items, u_weight.shape[0], i_weight.shape[0])
            return launch(users, items, u_weight, i_weight, u_bias, i_bias, y_lo, y_hi, None)
        record = torch.zeros(index_errors.SLOTS, dtype=torch.int64)
        out = launch(users, items, u_weight, i_weight, u_bias, i_bias, y_lo, y_hi, record)
        raise_recorded_index_error(record, u_weight.shape[0], i_weight.shape[0])
        return out
    flag = index_errors.flag_for(u_weight.device) if validate == "device" else None
    out = launch(users, items, u_weight, i_weight, u_bias, i_bias, y_lo, y_hi, None if flag is None else flag.tensor)
    if flag is not None:
        flag.after_launch()
    return out


def _save_for_backward(ctx, users, items, u_weight, i_weight, u_bias, i_bias, y_lo, y_hi, sparse, output=None):
    """``output``: the forward's output, given when the y_range derivative is to come from it
    (``_coefficient_from_output``) instead of a score recomputed from all four tables."""
    need_u_weight, need_i_weight = ctx.needs_input_grad[2:4]
    recomputes = y_lo is not None and output is None
    # Each weight gradient needs the other weight table; only a recomputed score needs all four.
    ctx.save_for_backward(
        users,
        items,
        u_weight if need_i_weight or recomputes else None,
        i_weight if need_u_weight or recomputes else None,
        u_bias if recomputes else None,
        i_bias if recomputes else None,
        output,
    )
    ctx.y_range = (y_lo, y_hi)
    ctx.sparse = sparse
    ctx.num_users, ctx.num_items, ctx.factors = u_weight.shape[0], i_weight.shape[0], u_weight.shape[1]
    ctx.u_bias_shape, ctx.i_bias_shape = u_bias.shape, i_bias.shape


def _sparse_grad(indices: Tensor, values: Tensor, size) -> Tensor:
    """An uncoalesced COO gradient with one entry per sample, as nn.Embedding(sparse=True) gives.
    A bad index (value 0, see the kernels) is clamped into the table so the tensor stays valid."""
    rows = indices.to(torch.int64).clamp(0, max(size[0] - 1, 0)).unsqueeze(0)
    return torch.sparse_coo_tensor(rows, values, size, check_invariants=False)


def _range_from_output(backend, output, y_lo):
    """Whether the backward forms the y_range derivative from the output: the C++ autograd's rule
    (range_from_output in csrc/embedding_dot_bias_autograd.cpp) for the cpu backend, whose eager
    calls take that path, so that torch.compile gives eager's bits."""
    return backend == "cpu" and y_lo is not None and output.dtype in (torch.float32, torch.float64)


def _coefficient_from_output(grad_out, output, y_lo, y_hi):
    """grad_out * d output / d score for output = sigmoid(score) * (hi - lo) + lo, from the output:
    the operations of coefficient_from_output in csrc/embedding_dot_bias_autograd.cpp, in its order."""
    return torch.sub(output, y_lo).mul_(torch.rsub(output, y_hi)).mul_(grad_out).mul_(1.0 / (y_hi - y_lo))


def _table_gradients(ctx, grad_out, backward):
    """The four table gradients (None where not needed) from ``backward``, a launcher or the
    backward custom op, given the saved context."""
    users, items, u_weight, i_weight, u_bias, i_bias, output = ctx.saved_tensors
    needs = ctx.needs_input_grad[2:6]
    if not any(needs):
        return None, None, None, None
    y_range = ctx.y_range
    if output is not None:
        grad_out, y_range = _coefficient_from_output(grad_out, output, *y_range), (None, None)
    grad_uw, grad_iw, grad_ub, grad_ib = backward(
        grad_out, users, items, u_weight, i_weight, u_bias, i_bias, ctx.num_users, ctx.num_items,
        *y_range, *needs, torch.are_deterministic_algorithms_enabled(), ctx.sparse,
    )
    if ctx.sparse:
        B = users.shape[0]
        grad_uw = _sparse_grad(users, grad_uw, (ctx.num_users, ctx.factors))
        grad_iw = _sparse_grad(items, grad_iw, (ctx.num_items, ctx.factors))
        grad_ub = _sparse_grad(users, grad_ub.reshape((B,) + tuple(ctx.u_bias_shape[1:])), ctx.u_bias_shape)
        grad_ib = _sparse_grad(items, grad_ib.reshape((B,) + tuple(ctx.i_bias_shape[1:])), ctx.i_bias_shape)
    else:
        grad_ub = grad_ub.reshape(ctx.u_bias_shape) if needs[2] else None
        grad_ib = grad_ib.reshape(ctx.i_bias_shape) if needs[3] else None
    return tuple(g if need else None for g, need in zip((grad_uw, grad_iw, grad_ub, grad_ib), needs))


class _EmbeddingDotBias(torch.autograd.Function):
    """The eager autograd boundary around the Triton launchers."""

    @staticmethod
    def forward(ctx, users, items, u_weight, i_weight, u_bias, i_bias, y_lo, y_hi, sparse, validate, kernels):
        out = _forward(
            kernels.forward, users, items, u_weight, i_weight, u_bias, i_bias, y_lo, y_hi, validate,
            kernels.checks_sync_in_pass,
        )
        _save_for_backward(ctx, users, items, u_weight, i_weight, u_bias, i_bias, y_lo, y_hi, sparse)
        ctx.kernels = kernels
        return out

    @staticmethod
    @not_twice_differentiable("embedding_dot_bias")
    def backward(ctx, grad_out):
        return (None, None) + _table_gradients(ctx, grad_out, ctx.kernels.backward) + (None,) * 5


# Every EmbeddingDotBias op declares its schema as a string, as the backward's comes from the
# launcher contract: the types are torch's, and the signature is not written again in Python.
@torch.library.custom_op(
    "fastcore5::embedding_dot_bias",
    mutates_args=(),
    schema="(Tensor users, Tensor items, Tensor u_weight, Tensor i_weight, Tensor u_bias, Tensor i_bias, "
    "float? y_lo, float? y_hi, bool sparse, str validate, str backend) -> Tensor",
)
def embedding_dot_bias_op(users, items, u_weight, i_weight, u_bias, i_bias, y_lo, y_hi, sparse, validate, backend):
    """(B,) scores in the table dtype. ``sparse`` only shapes the backward (it is an input here
    because setup_context sees only the op's inputs). The index-error flag that "device"
    validation writes is fastcore5's own state, not an input: the compiler never sees it."""
    kernels = KERNELS[backend]
    return _forward(
        kernels.forward, users, items, u_weight, i_weight, u_bias, i_bias, y_lo, y_hi, validate,
        kernels.checks_sync_in_pass,
    )


embedding_dot_bias_op.register_fake(op_shapes.embedding_dot_bias_forward)


# The backward launchers' arguments, in order, as a torch schema: written once, here; the custom
# op takes them and the backend's name.
BACKWARD_LAUNCHER_SCHEMA = (
    "embedding_dot_bias_backward(Tensor grad_out, Tensor users, Tensor items, Tensor? u_weight, Tensor? i_weight, "
    "Tensor? u_bias, Tensor? i_bias, int num_users, int num_items, float? y_lo, float? y_hi, bool need_u_weight, "
    "bool need_i_weight, bool need_u_bias, bool need_i_bias, bool deterministic, bool sparse) "
    "-> (Tensor, Tensor, Tensor, Tensor)"
)
_BACKWARD_ARGUMENTS = [a.split()[-1] for a in BACKWARD_LAUNCHER_SCHEMA.partition("(")[2].partition(") ->")[0].split(", ")]
_NEEDS = slice(_BACKWARD_ARGUMENTS.index("need_u_weight"), _BACKWARD_ARGUMENTS.index("need_i_bias") + 1)


@torch.library.custom_op(
    "fastcore5::embedding_dot_bias_backward",
    mutates_args=(),
    schema=BACKWARD_LAUNCHER_SCHEMA.removeprefix("embedding_dot_bias_backward").replace(") ->", ", str backend) ->", 1),
)
def embedding_dot_bias_backward_op(*launcher_args_and_backend) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The backward launcher's arguments (``BACKWARD_LAUNCHER_SCHEMA``), then the backend; returns
    (grad_u_weight, grad_i_weight, grad_u_bias, grad_i_bias), bias gradients 1-D: dense
    (num_users, D), (num_items, D), (num_users,), (num_items,), or with ``sparse`` the per-sample
    COO values (B, D), (B, D), (B,), (B,). A gradient not asked for comes back as an empty tensor
    (custom ops cannot return None); the CUDA launcher may return either."""
    *launcher_args, backend = launcher_args_and_backend
    grads = KERNELS[backend].backward(*launcher_args)
    grad_out = launcher_args[0]
    return tuple(g if need else grad_out.new_empty(0) for g, need in zip(grads, launcher_args[_NEEDS]))


embedding_dot_bias_backward_op.register_fake(op_shapes.embedding_dot_bias_backward)


def _setup_context(ctx, inputs, output):
    users, items, u_weight, i_weight, u_bias, i_bias, y_lo, y_hi, sparse, validate, backend = inputs
    saved_output = output if _range_from_output(backend, output, y_lo) else None
    _save_for_backward(ctx, users, items, u_weight, i_weight, u_bias, i_bias, y_lo, y_hi, sparse, saved_output)
    ctx.backend = backend


def _backward(ctx, grad_out):
    def backward(*args):
        return embedding_dot_bias_backward_op(*args, ctx.backend)

    return (None, None) + _table_gradients(ctx, grad_out, backward) + (None,) * 5


embedding_dot_bias_op.register_autograd(_backward, setup_context=_setup_context)


# The same parameters as reference.embedding_dot_bias, written again on purpose (a duplicate pair
# that stays): the public op is a drop-in for the spec, so its signature is the spec's, spelled out
# for readers and tools, plus sparse and validate; tests/test_reference.py checks that they agree.
def embedding_dot_bias(
    users: Tensor,
    items: Tensor,
    u_weight: Tensor,
    i_weight: Tensor,
    u_bias: Tensor,
    i_bias: Tensor,
    y_range: tuple[float, float] | None = None,
    sparse: bool = False,
    validate: str | None = None,
) -> Tensor:
    """fastai's EmbeddingDotBias forward, fused: for each b,
    res[b] = <u_weight[users[b]], i_weight[items[b]]> + u_bias[users[b]] + i_bias[items[b]],
    and with ``y_range=(lo, hi)``: sigmoid(res) * (hi - lo) + lo.

    Args:
        users, items: (B,) int32 or int64 indices, any stride. Every index must lie in
            [0, rows of its table); how a bad one is reported depends on ``validate``.
        u_weight, i_weight: (n_users, D) and (n_items, D) tables of one float dtype (fp32, bf16,
            fp16; fp64 for testing), any strides.
        u_bias, i_bias: (n_users, 1) / (n_items, 1) as fastai's nn.Embedding(n, 1), or 1-D.
        y_range: None or (lo, hi). The compiled GPU kernels take lo and hi as fp32 scalars.
        sparse: gradients as nn.Embedding(sparse=True) gives them — uncoalesced COO tensors with
            one entry per sample — for all four tables, biases included, so torch.optim.SparseAdam
            can take every parameter. Default: dense gradients, as nn.Embedding.
        validate: how out-of-range indices are caught (module docstring): "device" (default on
            CUDA tensors: no host sync, IndexError at the next fastcore5 call, fastcore5 SGD skips
            the bad batch's update), "sync" (default on CPU tensors: IndexError before any kernel
            runs, one host sync), or "off". No mode ever reads or writes outside a table or
            raises a device-side assert.
    Returns (B,) in the table dtype (fp32 accumulation; fp64 for fp64 tables). Not affected by
    autocast (as nn.Embedding).

    Backward: dense gradients for all four tables in one pass over the batch, without any
    gathered (B, D) tensor. By default the sums over repeated rows use atomic adds, whose order
    varies between runs (results may differ in the last bits); under
    torch.use_deterministic_algorithms(True) a sort + segment reduction is used instead, bitwise
    identical from run to run. Sparse gradients are deterministic either way. Not differentiable
    twice. On the cpu backend with a y_range and fp32/fp64 tables the backward forms the
    sigmoid's derivative from the saved output, as torch.sigmoid does: modifying the output in
    place before backward raises autograd's "modified by an inplace operation" error.
    """
    # linear_relu's pattern (a fast check, the detailed one only when it fails), written out on
    # purpose: a shared helper would cost a Python call on every op call, which the host-time rule counts.
    if index_errors.watching:
        index_errors.raise_pending()
    try:
        device = u_weight.device
        dtype = u_weight.dtype
        usable = (
            users.dtype in _INDICES
            and items.dtype in _INDICES
            and users.layout is _STRIDED
            and items.layout is _STRIDED
            and u_weight.layout is _STRIDED
            and i_weight.layout is _STRIDED
            and users.dim() == 1
            and items.shape == users.shape
            and dtype in _FLOATS
            and u_weight.dim() == 2
            and i_weight.dim() == 2
            and i_weight.dtype is dtype
            and i_weight.shape[1] == u_weight.shape[1]
            and bias_fits(u_bias, u_weight.shape[0], dtype, device)
            and bias_fits(i_bias, i_weight.shape[0], dtype, device)
            and users.device == device
            and items.device == device
            and i_weight.device == device
            and (sparse is True or sparse is False)
            and (validate is None or validate in VALIDATE_MODES)
        )
    except (AttributeError, TypeError, IndexError):
        usable = False
    if not usable:
        raise_bad_arguments(users, items, u_weight, i_weight, u_bias, i_bias, sparse, validate)
    y_lo, y_hi = check_y_range(y_range, dtype)
    device_type = backends.device_type(u_weight)
    if validate is None:
        validate = "device" if device_type == "cuda" else "sync"

    compiling = torch.compiler.is_compiling()
    backend = (backends.select if compiling else backends.select_eager)(OP, device_type, dtype)
    if backend == "torch" and sparse and compiling:
        # Inductor cannot trace F.embedding(sparse=True) ("Cannot access storage of
        # SparseTensorImpl"); the custom op hides the sparse gradients from it, as for the kernels.
        mode = "off" if validate == "off" else "sync"
        return embedding_dot_bias_op(users, items, u_weight, i_weight, u_bias, i_bias, y_lo, y_hi, sparse, mode, backend)
    if backend == "torch":
        return once_only(torch_backend(users, items, u_weight, i_weight, u_bias, i_bias, y_lo, y_hi, sparse, validate), OP)
    if compiling:
        return embedding_dot_bias_op(users, items, u_weight, i_weight, u_bias, i_bias, y_lo, y_hi, sparse, validate, backend)
    kernels = KERNELS[backend]
    tables_need_grad = torch.is_grad_enabled() and (
        u_weight.requires_grad or i_weight.requires_grad or u_bias.requires_grad or i_bias.requires_grad
    )
    if not tables_need_grad:
        return _forward(
            kernels.forward, users, items, u_weight, i_weight, u_bias, i_bias, y_lo, y_hi, validate,
            kernels.checks_sync_in_pass,
        )
    if kernels.with_autograd is not None:
        def launch(*args):
            return kernels.with_autograd(*args[:8], sparse, args[8])

        return _forward(
            launch, users, items, u_weight, i_weight, u_bias, i_bias, y_lo, y_hi, validate, kernels.checks_sync_in_pass
        )
    return _EmbeddingDotBias.apply(users, items, u_weight, i_weight, u_bias, i_bias, y_lo, y_hi, sparse, validate, kernels)
