"""The lesson's tools for reading what an EmbeddingDotBias learned: its biases and factors by id
or class label, the items (or users) with the most extreme biases, and a PCA of the factors.

Each function takes the model (``fastcore5.nn.EmbeddingDotBias``); the model's methods of the
same names call them. Results are detached and on the CPU. A model built with
``EmbeddingDotBias.from_classes`` remembers its vocabularies (``classes``, ``user``, ``item``), so
ids are class labels, as in fastai; otherwise they are integer row indices.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from ._checks import check_int


class EmbeddingDotBias(Protocol):
    """What these tools read of a model: its four tables, as fastcore5.nn.EmbeddingDotBias (and
    fastai's) has them. A protocol rather than an import of the class: the module's methods call
    these functions, so this module sits below fastcore5.nn and must not import it."""

    u_weight: nn.Embedding
    i_weight: nn.Embedding
    u_bias: nn.Embedding
    i_bias: nn.Embedding


def _vocabulary(model: EmbeddingDotBias, is_item: bool):
    """The class labels of the item (or user) rows, or None for a model built without classes."""
    if not hasattr(model, "classes"):
        return None
    return model.classes[model.item if is_item else model.user]


def row_indices(model: EmbeddingDotBias, ids, is_item: bool = True) -> Tensor:
    """Row indices (int64, CPU) for ``ids``: class labels mapped through the vocabulary when the
    model was built with from_classes, else integer indices checked against the table."""
    what = "item" if is_item else "user"
    vocabulary = _vocabulary(model, is_item)
    if vocabulary is not None:
        position = {label: index for index, label in enumerate(vocabulary)}
        labels = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        missing = [label for label in labels if label not in position]
        if missing:
            raise KeyError(
                f"{what} labels not in the training vocabulary: {missing[:5]}; a label seen only in "
                "the validation split has no embedding"
            )
        return torch.tensor([position[label] for label in labels], dtype=torch.int64)
    rows = (model.i_weight if is_item else model.u_weight).num_embeddings
    index = torch.as_tensor(ids, dtype=torch.int64).reshape(-1).cpu()
    if index.numel() and (index.min() < 0 or index.max() >= rows):
        raise IndexError(f"{what} ids must lie in [0, {rows}), got values from {index.min()} to {index.max()}")
    return index


def row_labels(model: EmbeddingDotBias, rows: Tensor, is_item: bool = True) -> list:
    """The class labels of item (or user) ``rows``, or the row indices for a model without classes."""
    vocabulary = _vocabulary(model, is_item)
    if vocabulary is None:
        return rows.tolist()
    return [vocabulary[r] for r in rows.tolist()]


def bias(model: EmbeddingDotBias, ids, is_item: bool = True) -> Tensor:
    """The learned biases (1-D, detached, on the CPU) of the items (or users) ``ids``."""
    table = (model.i_bias if is_item else model.u_bias).weight.detach()
    return table[row_indices(model, ids, is_item).to(table.device)].reshape(-1).cpu()


def weight(model: EmbeddingDotBias, ids, is_item: bool = True) -> Tensor:
    """The learned factors (len(ids), n_factors), detached, on the CPU, of items (or users) ``ids``."""
    table = (model.i_weight if is_item else model.u_weight).weight.detach()
    return table[row_indices(model, ids, is_item).to(table.device)].cpu()


def top_by_bias(
    model: EmbeddingDotBias, k: int = 10, is_item: bool = True, largest: bool = True
) -> list[tuple[object, float]]:
    """The ``k`` items (or users) with the largest (``largest=False``: smallest) bias, as
    (label or index, bias) pairs, most extreme first. The lesson reads these as the movies
    people like (or dislike) more than their factors alone predict."""
    k = check_int("k", k, 1)
    biases = (model.i_bias if is_item else model.u_bias).weight.detach().reshape(-1).float().cpu()
    values, rows = torch.topk(biases, min(k, biases.numel()), largest=largest)
    return list(zip(row_labels(model, rows, is_item), values.tolist()))


def bottom_by_bias(model: EmbeddingDotBias, k: int = 10, is_item: bool = True) -> list[tuple[object, float]]:
    """The ``k`` items (or users) with the smallest bias, smallest first."""
    return top_by_bias(model, k, is_item=is_item, largest=False)


def pca(model: EmbeddingDotBias, k: int = 3, ids=None, is_item: bool = True) -> Tensor:
    """Coordinates (len(ids) or n_items, k) of the item (or user) factors on their first ``k``
    principal components: the factors of ``ids`` (all rows when None) are centred and
    projected on the top right singular vectors (as fastai's ``Tensor.pca``; each component's
    sign is arbitrary). Returned in float32."""
    if ids is None:
        factors = (model.i_weight if is_item else model.u_weight).weight.detach().cpu()
    else:
        factors = weight(model, ids, is_item=is_item)
    factors = factors.double()
    k = check_int("k", k, 1, min(factors.shape))
    centred = factors - factors.mean(0)
    _, _, components = torch.linalg.svd(centred, full_matrices=False)
    return (centred @ components[:k].T).float()
