"""Fused multi-tensor SGD step (momentum, dampening, L2 or decoupled weight decay, Nesterov,
maximize, GradScaler unscaling and inf skipping): one launch updates every tensor of a list.

How the kernel sees many tensors
--------------------------------
All tensors of one launch share a device and a dtype. Every address is written as a signed
element offset from one *base* tensor (the first parameter), so the kernel reaches any of them as
``base_ptr + offset``: ordinary pointer arithmetic on a real kernel argument. The same code
therefore runs compiled and under TRITON_INTERPRET=1 (where CPU tensors are addressed by their
host addresses), needs no int-to-pointer casts, and keeps the base pointer's 16-byte alignment,
which together with ``tl.multiple_of`` on the offsets lets the compiler emit 16-byte vector
loads and stores.

Each tensor is cut into chunks of CHUNK elements; the *chunk table* (int64, one row per chunk,
on the device) holds, per chunk, the element offsets of its first element in the param, the
grad and the momentum buffer, and its length (<= CHUNK). One program handles one chunk: it loops
over it in BLOCK-sized pieces, unmasked, and finishes with at most one masked piece. So a launch
over 1 tensor of 64M elements and one over 2000 tensors of 4096 cost the same host work: one
table (prepared once, see ``StepLaunch``) and one launch.

The kernel itself, and what it computes per element, is in sgd_kernel.py.
"""
from __future__ import annotations

import collections

import numpy as np
import torch
import triton.language as tl

from ._common import in_signature_order, interpreting, on_device_of
from .sgd_kernel import TABLE_COLUMNS, block_sizes, sgd_kernel, split_fp32


def _names(count: int, param_names: list[str] | None) -> list[tuple[str, str, str]]:
    """(param, grad, buffer) names for errors: sgd_step's argument names, or, given the params'
    names (the optimizer's "param i of param group g"), names derived from them."""
    if param_names is None:
        return [(f"params[{i}]", f"grads[{i}]", f"momentum_buffers[{i}]") for i in range(count)]
    return [(name, f"the .grad of {name}", f"the momentum_buffer of {name}") for name in param_names]


def _dense_layout(name: str, t: torch.Tensor, like: torch.Tensor, like_name: str) -> None:
    # The kernel walks numel() consecutive elements from data_ptr(); that is the tensor exactly when
    # it is contiguous (or channels-last) and the param, grad and buffer share their strides.
    dense = t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)) or (
        t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d)
    )
    if t is like and not dense:
        raise ValueError(f"{name} must be a dense tensor (contiguous or channels-last); got strides {t.stride()}")
    if not dense or t.stride() != like.stride():
        raise ValueError(
            f"{name} must be a dense tensor (contiguous or channels-last) with the same strides as {like_name}; "
            f"got strides {t.stride()} for {like_name} strides {like.stride()}"
        )


_data_ptr = torch.Tensor.data_ptr
_stride = torch.Tensor.stride
_is_contiguous = torch.Tensor.is_contiguous

# Device chunk tables read by a CUDA graph: a captured launch reads its table (and the captured
# host-to-device copy re-reads the pinned source) at every replay, so neither may ever be freed
# or reused. Whatever a launch uses while the stream is capturing is kept here for the process.
_kept_for_graphs: list[torch.Tensor] = []


def _pinned_empty(shape) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.int64, pin_memory=True)


def _to_device(pinned: torch.Tensor, device: torch.device) -> torch.Tensor:
    return pinned.to(device, non_blocking=True)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class StepLaunch:
    """The launch of one (device, dtype) group whose params and momentum buffers stay the same
    tensors from step to step, while the gradients may be new tensors each step (set_to_none).

    Everything that depends only on the params and buffers is computed here once: their layout
    checks, their addresses and the chunk table without its gradient column (one row per chunk:
    offsets from params[0] of the chunk in p, grad and buffer, and its length). A step reads the
    gradients' addresses and looks the device table up by them; the caching allocator usually
    hands each step's gradients the addresses of the last step's, so a step seldom builds one, and
    building one is a numpy gather. It holds no tensor: the caller passes the same params and
    buffers to every call, checks that they still live where they did (``addresses_unchanged``)
    and that the gradients are laid out like the params (``check_grads``).
    """

    _TABLES_KEPT = 4  # per launch: the gradient address sets seen most recently

    def __init__(self, params: list[torch.Tensor], buffers: list[torch.Tensor], param_names: list[str] | None = None):
        self.names = _names(len(params), param_names)
        for (p_name, _, _), p in zip(self.names, params):
            _dense_layout(p_name, p, p, p_name)
        for (p_name, _, b_name), p, b in zip(self.names, params, buffers):
            _dense_layout(b_name, b, p, p_name)
        first = params[0]
        self.device, self.dtype, self.itemsize = first.device, first.dtype, first.element_size()
        self.block, chunk, self.num_warps = block_sizes()
        self.strides = list(map(_stride, params))
        self.contiguous = all(map(_is_contiguous, params))
        self.count = len(params)
        lengths = np.fromiter(map(torch.Tensor.numel, params), dtype=np.int64, count=self.count)
        chunks = (lengths + chunk - 1) // chunk
        self.owner = np.repeat(np.arange(self.count), chunks)
        first_chunk = np.cumsum(chunks) - chunks
        self.start = (np.arange(len(self.owner), dtype=np.int64) - first_chunk[self.owner]) * chunk
        self.rows = len(self.owner)
        self.p_ptrs = self._ptrs(params)
        self.b_ptrs = self._ptrs(buffers) if buffers else self.p_ptrs
        self.base = int(self.p_ptrs[0])
        self.vector = max(1, 16 // self.itemsize)  # elements per 16-byte access
        self.align = self.vector if not ((self.p_ptrs % 16).any() or (self.b_ptrs % 16).any()) else 1
        self.host_table = np.empty((self.rows, TABLE_COLUMNS), dtype=np.int64)
        self.host_table[:, 0] = self._offsets(self.p_ptrs, "params")[self.owner] + self.start
        self.host_table[:, 2] = self._offsets(self.b_ptrs, "momentum_buffers")[self.owner] + self.start
        self.host_table[:, 3] = np.minimum(lengths[self.owner] - self.start, chunk)
        self.tables: collections.OrderedDict = collections.OrderedDict()
        self.spare_pinned: list[torch.Tensor] = []
        self.meta_parameters: dict[tuple, tuple] = {}  # flags -> the kernel's constexprs, in order
        if self.device.type == "cuda" and not _capturing(self.device):
            self._keep_spare_pinned()

    def _offsets(self, ptrs: np.ndarray, name: str) -> np.ndarray:
        """Element offsets of ``ptrs`` from params[0]: the kernel adds them to its one base pointer."""
        delta = ptrs - self.base
        if (delta % self.itemsize).any():
            raise ValueError(f"{name} addresses are not a multiple of the element size ({self.itemsize} bytes) apart")
        return delta // self.itemsize

    def _ptrs(self, tensors) -> np.ndarray:
        return np.fromiter(map(_data_ptr, tensors), dtype=np.int64, count=self.count)

    def addresses_unchanged(self, params: list[torch.Tensor]) -> bool:
        """The params still live where they did (``p.data = ...`` and ``model.to()`` move them). The
        momentum buffers are the optimizer's own: only ``load_state_dict`` replaces them, and it
        drops the launch."""
        return bool((self._ptrs(params) == self.p_ptrs).all())

    def check_grads(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        """Gradients the kernel may walk: laid out like their params (torch already ties a .grad's
        shape, dtype and device to its param; the strides are ours to check). Contiguous params
        need contiguous grads, a cheaper test than comparing strides."""
        try:
            same = all(map(_is_contiguous, grads)) if self.contiguous else list(map(_stride, grads)) == self.strides
        except RuntimeError:  # a sparse gradient has no strides
            same = False
        if not same:
            for (p_name, g_name, _), p, g in zip(self.names, params, grads):
                if g.layout != torch.strided:
                    raise TypeError(f"{g_name} must be a dense (strided) tensor, got layout {g.layout}")
                _dense_layout(g_name, g, p, p_name)

    def table_for(self, grads: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
        g_ptrs = self._ptrs(grads)
        key = g_ptrs.tobytes()
        hit = self.tables.get(key)
        capturing = _capturing(self.device)
        if hit is None:
            # Every address is a multiple of the element size (the base too), so one OR over the
            # gradient addresses tells both that their offsets are whole elements and whether all
            # are 16-byte aligned.
            low_bits = int(np.bitwise_or.reduce(g_ptrs)) if self.count else 0
            if low_bits % self.itemsize:
                raise ValueError(f"grads addresses are not multiples of the element size ({self.itemsize} bytes)")
            align = self.align if low_bits % 16 == 0 else 1
            on_cuda = self.device.type == "cuda"
            # Pinned, so the copy is asynchronous; torch's host allocator keeps the pinned block
            # alive until the copy has run (and _kept_for_graphs keeps a captured one forever).
            # Pinning allocates, which CUDA-graph capture forbids: a table built while capturing
            # (the gradients got new addresses, after zero_grad(set_to_none=True)) fills a block
            # pinned beforehand.
            source = self._pinned_block(capturing) if on_cuda else torch.empty(self.host_table.shape, dtype=torch.int64)
            host = source.numpy()
            host[:] = self.host_table
            np.add(((g_ptrs - self.base) // self.itemsize)[self.owner], self.start, out=host[:, 1])
            table = source
            if on_cuda:
                table = _to_device(source, self.device)
                if capturing:
                    _kept_for_graphs.append(source)
                else:
                    self._keep_spare_pinned()
            hit = self.tables[key] = (table, align)
            if len(self.tables) > self._TABLES_KEPT:
                self.tables.popitem(last=False)
        else:
            self.tables.move_to_end(key)
        if capturing:
            _kept_for_graphs.append(hit[0])
        return hit

    _SPARE_PINNED = 2  # pinned table blocks kept for tables built during capture

    def _keep_spare_pinned(self) -> None:
        while len(self.spare_pinned) < self._SPARE_PINNED:
            self.spare_pinned.append(_pinned_empty(self.host_table.shape))

    def _pinned_block(self, capturing: bool) -> torch.Tensor:
        if not capturing:
            return _pinned_empty(self.host_table.shape)
        if not self.spare_pinned:
            raise RuntimeError(
                "fastcore5 SGD: the gradients moved more than twice during one CUDA-graph capture; run "
                "the captured step once eagerly before capturing (warm-up), as torch.cuda.graphs asks"
            )
        return self.spare_pinned.pop()

    def launch(self, base: torch.Tensor, grads, lr_tensor, lr, momentum, dampening, weight_decay, nesterov, maximize,
               decoupled_weight_decay, first_step, grad_scale, found_inf, skip_flag) -> None:
        """One step over the gradients ``grads``; ``base`` is params[0] (other arguments as ``sgd_step``)."""
        if self.rows == 0:
            return
        table, align = self.table_for(grads)
        has_momentum = momentum != 0
        lr_hi, lr_lo = split_fp32(lr)
        momentum_hi, momentum_lo = split_fp32(momentum)
        keep_hi, keep_lo = split_fp32(1.0 - dampening)
        wd_hi, wd_lo = split_fp32(weight_decay)
        flags = (lr_tensor is not None, grad_scale is not None, found_inf is not None, skip_flag is not None,
                 has_momentum, bool(first_step), bool(nesterov) and has_momentum, bool(maximize), weight_decay != 0,
                 bool(decoupled_weight_decay), align)
        meta_parameters = self.meta_parameters.get(flags)
        if meta_parameters is None:
            meta_parameters = self.meta_parameters[flags] = in_signature_order(sgd_kernel, _RUNTIME_ARGS, {
                **dict(zip(_FLAG_NAMES, flags)),
                "COMPUTE": tl.float64 if self.dtype == torch.float64 else tl.float32, "BLOCK": self.block,
            })
        sgd_kernel.run(
            base, table,
            table if lr_tensor is None else lr_tensor,  # the table stands in for absent pointers; never read
            table if grad_scale is None else grad_scale,
            table if found_inf is None else found_inf,
            table if skip_flag is None else skip_flag,
            lr_hi, lr_lo, momentum_hi, momentum_lo, keep_hi, keep_lo, wd_hi, wd_lo,
            *meta_parameters, grid=(self.rows,), warmup=False, num_warps=self.num_warps,
        )


_RUNTIME_ARGS = 14  # sgd_kernel's arguments before its constexprs
_FLAG_NAMES = ("LR_ON_DEVICE", "HAS_SCALE", "HAS_FOUND_INF", "HAS_SKIP", "HAS_MOMENTUM", "FIRST_STEP", "NESTEROV",
               "MAXIMIZE", "HAS_WD", "DECOUPLED", "ALIGN")


# (device, dtype, param and buffer addresses, lengths, strides) -> StepLaunch, least recently used
_launches: collections.OrderedDict = collections.OrderedDict()
_LAUNCHES_KEPT = 32


def prepared_launch(params: list[torch.Tensor], momentum_buffers: list[torch.Tensor]) -> StepLaunch:
    """The StepLaunch for these params and buffers, from a small cache keyed by their addresses."""
    key = (
        params[0].device, params[0].dtype, tuple(map(_data_ptr, params)), tuple(map(_data_ptr, momentum_buffers)),
        tuple(map(torch.Tensor.numel, params)), tuple(map(_stride, params)),
    )
    launch = _launches.get(key)
    if launch is None:
        launch = _launches[key] = StepLaunch(params, momentum_buffers)
        if len(_launches) > _LAUNCHES_KEPT:
            _launches.popitem(last=False)
    else:
        _launches.move_to_end(key)
    return launch


@on_device_of(lambda args: args[0][0] if args[0] else None)
def sgd_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor],
    lr_tensor: torch.Tensor | None,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
    first_step: bool,
    grad_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None,
    skip_flag: torch.Tensor | None,
) -> None:
    """One SGD step, in place, over tensors that share one device and one floating dtype.

    params, grads: same shapes and strides, pairwise; dense (contiguous or channels-last).
    momentum_buffers: [] when momentum == 0, else one per param (same shape/strides). With
        first_step=True their contents are ignored and they receive the gradient (torch's
        "buf = grad" first step); otherwise they hold the running buffers.
    lr_tensor: a one-element tensor on the params' device that holds lr (read on the device;
        ``lr`` is then ignored), or None to use the float ``lr``.
    grad_scale: None or a one-element float tensor on the device; grads are divided by it and the
        unscaled grads written back (as torch's fused SGD does with a GradScaler).
    found_inf: None or a one-element float tensor on the device; when nonzero nothing is written.
    skip_flag: None or an int64 tensor on the device; when its element 0 is nonzero nothing is
        written (fastcore5.index_errors: a bad index was seen since the last step).
    momentum == 0 means no buffers; nesterov is then ignored.
    Empty tensors are allowed. Returns None: everything happens in place.
    """
    if not params:
        return
    if interpreting() and params[0].device.type != "cpu":
        raise RuntimeError(
            "under TRITON_INTERPRET=1 the SGD kernel addresses tensors by host address and needs CPU tensors; "
            f"got {params[0].device.type} tensors"
        )
    buffers = list(momentum_buffers) if momentum != 0 else []
    launch = prepared_launch(list(params), buffers)
    launch.check_grads(params, grads)
    launch.launch(params[0], list(grads), lr_tensor, lr, momentum, dampening, weight_decay, nesterov, maximize,
                  decoupled_weight_decay, first_step, grad_scale, found_inf, skip_flag)
