"""What both demo parts share: which backend runs each op, the one-cycle schedule, timing."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from .. import backends
from . import _console


class DemoError(RuntimeError):
    """A demo option cannot be honoured here (no such device, backend unavailable, too little data
    for the batch size, ...): the CLI prints the message without a traceback."""


def backends_for(ops: tuple[str, ...], device: torch.device, dtype: torch.dtype = torch.float32) -> dict[str, str]:
    """The backend ``fastcore5.backends.select`` picks for each op on this device and dtype (the
    choice the ops themselves make when called, including any use_backend/FASTCORE5_BACKEND)."""
    return {op: backends.select(op, device, dtype) for op in ops}


def describe_backend(name: str, device: torch.device) -> str:
    if name == "triton":
        if device.type == "cpu":
            return "fused Triton kernel run by Triton's CPU interpreter, correct but slow (TRITON_INTERPRET=1)"
        return "fused Triton kernel"
    if name == "cuda":
        return "fused CUDA C++ kernel (fastcore5._C)"
    if name == "cpu":
        return "fused C++ CPU kernel (fastcore5._C)"
    return "plain-PyTorch reference from fastcore5.reference, not a fused kernel"


def one_cycle(optimizer: torch.optim.Optimizer, max_lr: float | list[float], total_steps: int):
    """The lesson's fit_one_cycle schedule: the learning rate warms up for the first 25% of the
    steps and anneals (cosine) to ~0, while momentum moves the opposite way between 0.95 and
    0.85 (fastai's defaults; torch's OneCycleLR with fastai's div factors)."""
    # OneCycleLR divides by the length of each phase, which must be positive: the warm-up ends at
    # step pct_start * total_steps - 1, so very short runs (a few batches) get a longer warm-up
    # share, and a one-step run a two-step schedule of which it takes the first step.
    total_steps = max(total_steps, 2)
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=max_lr,
        total_steps=total_steps,
        pct_start=max(0.25, 1.5 / total_steps),
        div_factor=25.0,
        final_div_factor=1e5,
        base_momentum=0.85,
        max_momentum=0.95,
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class EpochStats:
    epoch: int
    phase: str
    train_loss: float
    valid_loss: float
    valid_accuracy: float | None
    seconds: float


class Stopwatch:
    """Wall-clock seconds that include the queued GPU work (synchronizes on CUDA)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        synchronize(self.device)
        return time.perf_counter() - self.start


def train_one_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    order: torch.Tensor,
    batch_size: int,
    stream,
    label: str,
    loss_name: str,
    after_warm_up: Callable[[float, float], None] | None = None,
) -> float:
    """One pass over ``inputs[order]`` in batches (the tail that does not fill a batch is
    dropped), one optimizer and schedule step per batch; returns the mean batch loss. The
    running loss stays on the device and is read only when the progress bar redraws.
    ``after_warm_up`` gets the seconds of the first step (warm-up included) and of the second
    (or of the first again, in a one-step epoch)."""
    steps = len(order) // batch_size
    bar = _console.ProgressBar(steps, stream, label)
    model.train()
    loss_sum = torch.zeros((), device=inputs.device)
    step_seconds = []
    for step in range(steps):
        clock = Stopwatch(inputs.device) if step < 2 and after_warm_up is not None else None
        batch = order[step * batch_size : (step + 1) * batch_size]
        loss = loss_fn(model(inputs[batch]), targets[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        loss_sum += loss.detach()
        if clock is not None:
            step_seconds.append(clock.elapsed())
            if len(step_seconds) == min(2, steps):
                after_warm_up(step_seconds[0], step_seconds[-1])
        bar.update(note=lambda: f"{loss_name} {float(loss_sum) / (step + 1):.4f}")
    bar.close()
    return float(loss_sum) / steps


def interpreter_estimate(used: dict[str, str], device: torch.device, total_steps: int, stream) -> Callable[[float, float], None] | None:
    """For a part whose kernels Triton's CPU interpreter runs (minutes, where a GPU takes
    seconds): a train_one_epoch callback printing the part's expected time from its first two
    steps (the first carries the warm-up)."""
    if device.type != "cpu" or "triton" not in used.values():
        return None

    def report(first: float, typical: float) -> None:
        expected = first + typical * (total_steps - 1)
        stream.write(
            f"  Triton's interpreter takes {_console.seconds(typical)} per step here: this part's "
            f"{_console.plural(total_steps, 'step')} will take about {_console.seconds(expected)}\n"
        )
        stream.flush()

    return report
