"""EmbeddingDotBias: fastai's collaborative-filtering model on the fused op. The lesson's tools for
reading what it learned are in fastcore5.interpret; the model's methods of the same names call them."""
from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from .. import interpret
from .._checks import INDEX_DTYPES, check_tensor
from ..ops.embedding_dot_bias import embedding_dot_bias
from ..ops.embedding_dot_bias_checks import check_modes, check_y_range


def _fastai_init_(weight: Tensor) -> None:
    """fastai's embedding init: a normal truncated (by fmod) to +-2 sigma, scaled to std 0.01."""
    with torch.no_grad():
        weight.normal_().fmod_(2).mul_(0.01)


class EmbeddingDotBias(nn.Module):
    """Drop-in for ``fastai.collab.EmbeddingDotBias`` (fastai 2.8), computed by one fused kernel.

    Parameters are four nn.Embedding modules with fastai's names and shapes — ``u_weight``
    (n_users, n_factors), ``i_weight`` (n_items, n_factors), ``u_bias`` (n_users, 1),
    ``i_bias`` (n_items, 1) — and fastai's init, so a state_dict saved from fastai's model loads
    here unchanged and gives the same predictions.

    ``forward(x)`` takes a (B, 2) integer tensor of (user, item) index pairs and returns
    ``(U[u] * V[i]).sum(1) + ub[u] + ib[i]``, squashed into ``y_range`` by a sigmoid when given.
    The output is always shape (B,), B == 1 included. (fastai ``.squeeze()``s its (B, 1) bias
    lookups, which gives 0-d biases when B == 1; its output is still (1,) because they are added
    to the (1,) dot product. We never squeeze, so no batch size can produce a 0-d result.)

    Extras beyond fastai, keyword-only: ``sparse=True`` gives nn.Embedding(sparse=True)-style
    COO gradients for all four tables (use torch.optim.SparseAdam or SGD); ``validate`` picks how
    out-of-range ids are reported ("device", "sync" or "off"; None: "device" on CUDA, "sync" on
    CPU; see fastcore5.embedding_dot_bias); ``device``/``dtype`` as for any torch module.
    """

    def __init__(
        self,
        n_factors: int, n_users: int, n_items: int,  # fastai's order
        y_range: tuple[float, float] | None = None,
        *,
        sparse: bool = False,
        validate: str | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        for name, value in (("n_factors", n_factors), ("n_users", n_users), ("n_items", n_items)):
            _check_positive_count(name, value)
        check_y_range(y_range, dtype)
        check_modes(sparse, validate)
        self.y_range = y_range
        self.sparse = sparse
        self.validate = validate
        factory = {"device": device, "dtype": dtype}
        self.u_weight = nn.Embedding(n_users, n_factors, sparse=sparse, **factory)
        self.i_weight = nn.Embedding(n_items, n_factors, sparse=sparse, **factory)
        self.u_bias = nn.Embedding(n_users, 1, sparse=sparse, **factory)
        self.i_bias = nn.Embedding(n_items, 1, sparse=sparse, **factory)
        for embedding in (self.u_weight, self.i_weight, self.u_bias, self.i_bias):
            _fastai_init_(embedding.weight)

    @classmethod
    def from_classes(
        cls,
        n_factors: int,
        classes: Mapping[str, Sequence],
        user: str | None = None,
        item: str | None = None,
        y_range: tuple[float, float] | None = None,
        **kwargs,
    ) -> "EmbeddingDotBias":
        """Size the tables from ``classes`` (a DataLoaders' ``classes``: name -> vocabulary),
        taking the first key as the user column and the second as the item column unless named.
        The model remembers the vocabularies, so ``bias``/``weight`` accept class labels
        (see fastcore5.interpret)."""
        names = list(classes.keys())
        if user is None or item is None:
            if len(names) < 2:
                raise ValueError(f"classes must name a user and an item column, got keys {names}")
        user = names[0] if user is None else user
        item = names[1] if item is None else item
        for role, name in (("user", user), ("item", item)):
            if name not in classes:
                raise KeyError(f"{role} column {name!r} is not in classes (keys: {names})")
        model = cls(n_factors, len(classes[user]), len(classes[item]), y_range=y_range, **kwargs)
        model.classes, model.user, model.item = classes, user, item
        return model

    def forward(self, x: Tensor) -> Tensor:
        check_tensor("x", x, dtypes=INDEX_DTYPES, ndim=2)
        if x.shape[1] != 2:
            raise ValueError(f"x must have shape (B, 2) of (user, item) index pairs, got {tuple(x.shape)}")
        return embedding_dot_bias(
            x[:, 0], x[:, 1],
            self.u_weight.weight, self.i_weight.weight, self.u_bias.weight, self.i_bias.weight,
            y_range=self.y_range, sparse=self.sparse, validate=self.validate,
        )

    # The lesson's interpretation tools: fastcore5.interpret, reached from the model as in fastai.

    def bias(self, ids, is_item: bool = True) -> Tensor:
        """The learned biases of the items (or users) ``ids``: see fastcore5.interpret.bias."""
        return interpret.bias(self, ids, is_item)

    def weight(self, ids, is_item: bool = True) -> Tensor:
        """The learned factors of the items (or users) ``ids``: see fastcore5.interpret.weight."""
        return interpret.weight(self, ids, is_item)

    def top_by_bias(self, k: int = 10, is_item: bool = True, largest: bool = True) -> list[tuple[object, float]]:
        """The ``k`` items (or users) with the most extreme bias: see fastcore5.interpret.top_by_bias."""
        return interpret.top_by_bias(self, k, is_item, largest)

    def bottom_by_bias(self, k: int = 10, is_item: bool = True) -> list[tuple[object, float]]:
        """The ``k`` items (or users) with the smallest bias: see fastcore5.interpret.bottom_by_bias."""
        return interpret.bottom_by_bias(self, k, is_item)

    def pca(self, k: int = 3, ids=None, is_item: bool = True) -> Tensor:
        """The item (or user) factors on their first ``k`` principal components: see fastcore5.interpret.pca."""
        return interpret.pca(self, k, ids, is_item)


def _check_positive_count(name: str, value) -> None:
    try:
        count = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if isinstance(value, bool) or count < 1:
        raise ValueError(f"{name} must be at least 1, got {value!r}")
