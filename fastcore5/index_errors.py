"""Out-of-range EmbeddingDotBias indices found by the kernels, reported without a host sync.

With ``validate="device"`` (the default for CUDA tensors) the forward kernel checks every index
itself. A sample with a bad index reads and writes nothing out of bounds (every EmbeddingDotBias
kernel bounds-checks every index, whatever the mode): its score is NaN and it contributes no
gradient. The kernel also records the bad index in this device's *flag*, an int64 tensor of
``SLOTS`` elements:

    slot 0      bad indices seen, users and items together
    slots 1-4   users: how many were bad, the most negative one (0 if none), the largest one past
                the table (0 if none), the rows of u_weight
    slots 5-8   the same for items and i_weight

The host learns of it without waiting: after a launch the flag is copied to pinned memory
behind a CUDA event, and the next fastcore5 call (any op's public function, or
``fastcore5.optim.SGD.step``) looks at the copy once the event has passed and raises IndexError
naming ``users`` or ``items`` and the bad value. Until then the flag stays set on the device, and
fastcore5.optim.SGD skips its update on that device (``pending_skip_flag``), so no parameter is
changed by the bad batch or by any step queued before the error was raised. Raising clears the
flag. On CPU tensors the flag is read directly (no device to wait for).

During CUDA-graph capture nothing is copied or polled (the kernels still write the flag, and the
optimizer still skips); the error surfaces at the first fastcore5 call outside the graph, or
call ``raise_pending(wait=True)`` after replaying.
"""
from __future__ import annotations

import time

import torch

SLOTS = 9
_FIELDS = (("users", "u_weight", 1), ("items", "i_weight", 5))


class _DeviceFlag:
    """One device's flag, its pinned host copy and the event that says the copy has landed.

    At most one copy is in flight, and the host copy is read only when none is writing it. Each
    copy remembers how many known launches it covers: a copy that landed clean but was started
    before the latest launch proves nothing about that launch, so the next poll starts another
    (before, such a stale copy made a bad index show one call late, or, with ``wait``, not at
    all). Kernels that ran where no launch is counted (a compiled graph, a replayed CUDA graph)
    are seen by a poll's copy, started at most every POLL_SECONDS when no launch is known, so an
    op that polls does not pay a device-to-host copy on every call."""

    POLL_SECONDS = 0.001
    __slots__ = ("tensor", "host", "seen", "event", "copy_pending", "launches", "covered", "copied_at")

    def __init__(self, device: torch.device):
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "EmbeddingDotBias(validate='device') needs its index-error flag on this device before CUDA-graph "
                "capture begins: run one eager forward (a warm-up step) before capturing"
            )
        self.tensor = torch.zeros(SLOTS, dtype=torch.int64, device=device)
        if device.type == "cuda":
            self.host = torch.zeros(SLOTS, dtype=torch.int64, pin_memory=True)
            self.event = torch.cuda.Event()
        else:
            self.host = self.tensor
            self.event = None
        self.seen = self.host.numpy()  # a view: reading it costs no torch dispatch
        self.copy_pending = False
        self.launches = 0  # known launches that may have written the flag
        self.covered = 0  # how many of them the last copy started after
        self.copied_at = float("-inf")

    def after_launch(self) -> None:
        """A kernel that may write the flag was launched: start a copy unless one is on its way
        (the poll that finds that one landed starts the next)."""
        self.launches += 1
        if self.event is not None and not self.copy_pending:
            self._start_copy()

    def _start_copy(self) -> bool:
        if torch.cuda.is_current_stream_capturing():
            return False
        self.host.copy_(self.tensor, non_blocking=True)
        self.event.record()
        self.copy_pending = True
        self.covered = self.launches
        self.copied_at = time.perf_counter()
        return True

    def _landed(self, wait: bool) -> bool:
        """Whether the host copy may be read now (waiting for it if ``wait``)."""
        if not self.copy_pending:
            return True
        if wait:
            self.event.synchronize()
        elif torch.cuda.is_current_stream_capturing() or not self.event.query():
            return False
        self.copy_pending = False
        return True

    def report(self, wait: bool) -> list[int] | None:
        """The flag's values if it shows a bad index, else None (clearing the flag). Never
        blocks unless ``wait``; with ``wait`` the answer covers every kernel queued so far."""
        if self.event is not None:
            if not self._landed(wait):
                return None
            if self.seen[0] == 0:
                stale = self.covered < self.launches
                if wait or stale or time.perf_counter() - self.copied_at >= self.POLL_SECONDS:
                    if not self._start_copy() or not (wait and self._landed(True)):
                        return None
                else:
                    return None
        if self.seen[0] == 0:
            return None
        values = self.seen.tolist()
        self.tensor.zero_()
        if self.event is not None:
            self.seen.fill(0)
        return values


_flags: dict[torch.device, _DeviceFlag] = {}
# True once any flag exists: until then the public functions skip raise_pending altogether.
watching = False


def flag_for(device: torch.device) -> _DeviceFlag:
    """The index-error flag of ``device`` (a tensor's own device, so CUDA devices carry an index),
    created zeroed on first use."""
    global watching
    flag = _flags.get(device)
    if flag is None:
        flag = _flags[device] = _DeviceFlag(device)
        watching = True
    return flag


def pending_skip_flag(device: torch.device) -> torch.Tensor | None:
    """The flag tensor of ``device`` if kernels on it may have written one, else None: an optimizer
    step on ``device`` given it must do nothing while its element 0 is nonzero."""
    flag = _flags.get(device)
    return None if flag is None else flag.tensor


def describe(values: list[int]) -> str:
    """The IndexError message for a flag's values."""
    problems = []
    for name, table, base in _FIELDS:
        count, most_negative, largest, rows = values[base:base + 4]
        if not count:
            continue
        if most_negative < 0:
            problems.append(f"{name} contains the negative index {most_negative}; indices must lie in [0, {rows})")
        if largest >= rows and (largest > 0 or most_negative == 0):
            problems.append(f"{name} contains the index {largest}, out of range for {table} with {rows} rows")
        problems[-1] += f" ({count} bad {name} entr{'y' if count == 1 else 'ies'} in one batch)" if problems else ""
    return (
        "; ".join(problems)
        + ". Found on the device by an earlier EmbeddingDotBias forward: the bad samples scored NaN and got no "
        "gradient, and fastcore5.optim.SGD skipped its updates on this device until now"
    )


def raise_pending(wait: bool = False) -> None:
    """Raise IndexError if a kernel's report of a bad index has reached the host. Without
    ``wait`` this never blocks: a report still in flight is picked up by a later call. Inside a
    torch.compile'd region it does nothing (the compiled graph cannot raise from host memory)."""
    if torch.compiler.is_compiling():
        return
    for flag in _flags.values():
        values = flag.report(wait)
        if values is not None:
            raise IndexError(describe(values))
