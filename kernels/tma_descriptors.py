"""TMA tensor descriptors built on the host for the Hopper kernels (kernels/linear_relu_hopper.py),
cached per address, shape, strides, block shape, dtype and device (``cached_descriptor``).

TMA needs 16-byte aligned base pointers and leading strides and a unit inner stride; whether an
operand has them is the launchers' kernel choice (``linear_relu_hopper.tma_compatible``)."""
import torch
from triton.tools.tensor_descriptor import TensorDescriptor

from ._common import interpreting


class _DescriptorBase:
    """What a launch reads of a descriptor's tensor: its address and dtype (Triton's launcher
    calls ``base.data_ptr()``, its specialisation reads ``base.dtype``). A cached descriptor holds
    this instead of the tensor, so the cache keeps no tensor's memory alive."""

    __slots__ = ("dtype", "_address")

    def __init__(self, dtype: torch.dtype, address: int):
        self.dtype = dtype
        self._address = address

    def data_ptr(self) -> int:
        return self._address


_DESCRIPTORS: dict = {}
_MAX_DESCRIPTORS = 1024


def descriptor_key(t: torch.Tensor, block_shape: tuple) -> tuple:
    """Everything a TMA descriptor encodes: address, shape, strides, block shape, dtype, and the
    device the address belongs to. Two tensors with the same key get bitwise the same descriptor,
    so a descriptor found under a tensor's key is that tensor's, even if the memory it was built
    for has been freed and reused since."""
    return (t.data_ptr(), tuple(t.shape), t.stride(), block_shape, t.dtype, t.get_device())


def cached_descriptor(t: torch.Tensor, block_shape: tuple) -> TensorDescriptor:
    """The TMA descriptor of ``t`` tiled by ``block_shape``, built once per descriptor_key.
    Building one (TensorDescriptor's checks of alignment, strides and block shape) cost 2-5 us of
    host time per operand per launch; a lookup costs the key's ~1 us."""
    key = descriptor_key(t, block_shape)
    descriptor = _DESCRIPTORS.get(key)
    if descriptor is None:
        if len(_DESCRIPTORS) >= _MAX_DESCRIPTORS:
            _DESCRIPTORS.clear()
        descriptor = _DESCRIPTORS[key] = TensorDescriptor(
            _DescriptorBase(t.dtype, key[0]), list(key[1]), list(key[2]), list(block_shape)
        )
    return descriptor


def _fresh_descriptor(t: torch.Tensor, block_shape: tuple) -> TensorDescriptor:
    return TensorDescriptor(t, list(t.shape), list(t.stride()), list(block_shape))


# The interpreter copies each descriptor's tensor to the host and back: it needs the tensor itself.
descriptor = _fresh_descriptor if interpreting() else cached_descriptor
