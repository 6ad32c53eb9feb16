"""Plain-text output for the demo: a one-line progress bar and aligned tables."""
from __future__ import annotations

import time
from typing import Callable, Sequence, TextIO


class ProgressBar:
    """A single self-overwriting line when ``stream`` is a terminal.

    Redirected output (logs, CI, tests) gets no bar, so logs are not flooded with carriage
    returns: only, when an epoch runs long (Triton's interpreter), a plain progress line every
    ``log_interval_s`` seconds, besides the per-epoch lines the caller prints.
    """

    def __init__(
        self, total: int, stream: TextIO, label: str, width: int = 30, min_interval_s: float = 0.1,
        log_interval_s: float = 30.0,
    ):
        self.total, self.stream, self.label, self.width = max(total, 1), stream, label, width
        self.enabled = bool(getattr(stream, "isatty", lambda: False)())
        self.count, self._last_draw = 0, time.perf_counter()
        self.min_interval_s = min_interval_s if self.enabled else log_interval_s
        if self.enabled:
            self._last_draw -= min_interval_s  # draw the first step at once

    def update(self, steps: int = 1, note: Callable[[], str] | None = None) -> None:
        """Advance by ``steps``; ``note`` (e.g. the running loss) is only evaluated when the bar is
        redrawn, so a GPU loop does not synchronize on every step just to format it."""
        self.count += steps
        now = time.perf_counter()
        finished = self.count >= self.total
        if now - self._last_draw < self.min_interval_s and not (finished and self.enabled):
            return
        if finished and not self.enabled:
            return  # the caller's epoch line follows
        self._last_draw = now
        suffix = note() if note is not None else ""
        if self.enabled:
            filled = self.width * min(self.count, self.total) // self.total
            bar = "#" * filled + "-" * (self.width - filled)
            self.stream.write(f"\r  {self.label} [{bar}] {self.count}/{self.total} {suffix}\x1b[K")
        else:
            self.stream.write(f"  {self.label}: step {self.count}/{self.total} {suffix}\n")
        self.stream.flush()

    def close(self) -> None:
        """Erase the bar so the caller's next line starts clean."""
        if self.enabled:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], indent: str = "  ") -> str:
    """Columns padded to their widest cell; text left-aligned, numbers right-aligned."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    numeric = [all(isinstance(row[c], (int, float)) for row in rows) and bool(rows) for c in range(len(headers))]
    widths = [max(len(line[c]) for line in cells) for c in range(len(headers))]
    lines = []
    for line in cells:
        padded = [text.rjust(w) if is_num else text.ljust(w) for text, w, is_num in zip(line, widths, numeric)]
        lines.append(indent + "  ".join(padded).rstrip())
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def plural(count: int, noun: str) -> str:
    """'1 epoch', '2 epochs'."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def seconds(value: float) -> str:
    if value < 10:
        return f"{value:.2f} s"
    return f"{value:.1f} s" if value < 120 else f"{value / 60:.1f} min"
