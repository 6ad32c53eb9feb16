from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ..ops.mlp import mlp


class MLP(nn.Sequential):
    """``nn.Sequential(Linear, ReLU, Linear, ReLU, ..., Linear)`` computed as one fused op.

    ``sizes`` = (in_features, hidden_1, ..., out_features), at least two sizes: ``len(sizes) - 1``
    Linear layers with a ReLU after each but the last. ``bias``, ``device`` and ``dtype`` are passed
    to every nn.Linear.

    It *is* that nn.Sequential — the same children (plain nn.Linear and nn.ReLU) at the same
    indices, so the same initialisation, parameter names (``0.weight``, ``0.bias``, ``2.weight``,
    ...: layer i's Linear sits at index 2i) and state_dict, which loads into and from the
    unfused Sequential unchanged. Only ``forward`` differs: it calls ``fastcore5.mlp`` with the
    Linears' parameters. That fuses the whole stack on the Triton backend (CUDA tensors; CPU
    tensors under TRITON_INTERPRET=1): one autograd boundary, and each hidden layer's ReLU mask
    applied in the epilogue of the grad-input GEMM of the layer above. On the CUDA and torch
    backends and under torch.compile the layers run one by one (fastcore5.linear_relu per hidden
    layer, F.linear for the last). Keep the structure as built: forward reads the Linears at the
    even indices.
    """

    def __init__(self, sizes: Sequence[int], bias: bool = True, device=None, dtype=None):
        sizes = _check_sizes(sizes)
        layers: list[nn.Module] = []
        for in_features, out_features in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype), nn.ReLU()]
        super().__init__(*layers[:-1])

    @classmethod
    def from_sequential(cls, sequential: nn.Sequential) -> "MLP":
        """An MLP holding ``sequential``'s Linear modules themselves (parameters shared, not copied),
        for a Sequential of the form (Linear, ReLU, ..., Linear)."""
        modules = list(sequential)
        shape_ok = len(modules) % 2 == 1 and all(
            type(m) is nn.Linear if i % 2 == 0 else isinstance(m, nn.ReLU) for i, m in enumerate(modules)
        )
        if not shape_ok:
            kinds = ", ".join(type(m).__name__ for m in modules)
            raise ValueError(f"sequential must be (Linear, ReLU, ..., ReLU, Linear); got ({kinds})")
        for i in range(2, len(modules), 2):
            if modules[i].in_features != modules[i - 2].out_features:
                raise ValueError(
                    f"sequential[{i}] has in_features={modules[i].in_features} but sequential[{i - 2}] "
                    f"has out_features={modules[i - 2].out_features}"
                )
        mlp_module = cls.__new__(cls)
        nn.Sequential.__init__(mlp_module, *(m if i % 2 == 0 else nn.ReLU() for i, m in enumerate(modules)))
        return mlp_module

    def linears(self) -> list[nn.Linear]:
        return list(self._modules.values())[::2]

    def __getitem__(self, index):
        """An index gives the module; a slice gives a plain nn.Sequential (a slice need not end in
        a Linear, so it need not be an MLP)."""
        if isinstance(index, slice):
            return nn.Sequential(*list(self._modules.values())[index])
        return super().__getitem__(index)

    def forward(self, input: Tensor) -> Tensor:
        linears = self.linears()
        return mlp(input, [m.weight for m in linears], [m.bias for m in linears])


def _check_sizes(sizes) -> list[int]:
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence):
        raise TypeError(f"sizes must be a list or tuple of ints (in_features, ..., out_features), got {type(sizes).__name__}")
    if len(sizes) < 2:
        raise ValueError(f"sizes needs at least two entries (in_features, out_features), got {list(sizes)}")
    for i, size in enumerate(sizes):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"sizes[{i}] must be a positive int, got {size!r}")
    return list(sizes)
