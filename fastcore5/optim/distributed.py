"""FSDP2 support: recognising DTensor params and reaching their local shards.

FSDP2's ``fully_shard`` makes every param a DTensor. The optimizer keys its state by the DTensors
(so ``state_dict`` and torch.distributed.checkpoint see sharded tensors) and steps each rank's
local shards in one launch (see ``plan.Launch``). Contiguous mode cannot hold DTensors: FSDP2 owns
their storage.
"""
from __future__ import annotations

import operator

from torch import Tensor

__all__ = ["is_dtensor", "local_tensor"]

local_tensor = operator.attrgetter("_local_tensor")


def is_dtensor(t: Tensor) -> bool:
    """A DTensor (FSDP2's fully_shard makes every param one), recognised without importing
    torch.distributed where it is not built."""
    return type(t).__name__ == "DTensor" and hasattr(t, "_local_tensor")
