"""Out-of-range EmbeddingDotBias indices found by the kernels, reported without a host sync.

Contract (implementation in progress):
  * ``flag_for(device)`` -> the int64 tensor of INDEX_ERROR_SLOTS elements on ``device`` that the
    EmbeddingDotBias forward kernels fill when they meet a bad index (see ``describe``).
  * ``pending_skip_flag(device)`` -> that tensor when it exists (a bad index may have been seen on
    ``device`` and not yet reported), else None. Element 0 nonzero means "skip the optimizer step".
  * ``raise_pending()`` -> raises IndexError naming ``users``/``items`` and the bad value when a
    kernel's report has reached the host; never waits for the device.
"""
from __future__ import annotations

import torch

INDEX_ERROR_SLOTS = 9


def pending_skip_flag(device: torch.device) -> torch.Tensor | None:
    return None


def raise_pending() -> None:
    return None
