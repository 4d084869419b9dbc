"""A one-line progress bar for uploads and downloads, on stderr.

The SDK reports a transfer's progress through a callback,
``progress(done_bytes, total_bytes)`` (``Progress``), and prints nothing
itself; ``ProgressBar`` is the callback the command line passes:

    upload digits  [##########..........]  50%  12.0/24.0 MiB  8.1 MiB/s  1 s left

It redraws the line in place (``\\r``) at most every ``interval_s`` and ends
it with a newline once every byte is done.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO

# progress(done_bytes, total_bytes): called as a transfer moves forward.
Progress = Callable[[int, int], None]

BAR_WIDTH = 20


def human_bytes(size: float) -> str:
    """``512 B``, ``1.5 KiB``, ``12.0 MiB``, ``3.2 GiB`` (GiB is the largest unit)."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, rest = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {rest:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def render(label: str, done: int, total: int, elapsed_s: float) -> str:
    """The bar's line (without ``\\r``) for ``done`` of ``total`` bytes after
    ``elapsed_s`` seconds."""
    fraction = min(done / total, 1.0) if total > 0 else 1.0
    filled = round(fraction * BAR_WIDTH)
    parts = [
        label,
        f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}]",
        f"{fraction:4.0%}",
        f"{human_bytes(done).removesuffix(' B')}/{human_bytes(total)}",
    ]
    if elapsed_s > 0 and done > 0:
        rate = done / elapsed_s
        parts.append(f"{human_bytes(rate)}/s")
        if done < total:
            parts.append(f"{_seconds((total - done) / rate)} left")
        else:
            parts.append(f"in {_seconds(elapsed_s)}")
    return "  ".join(parts)


class ProgressBar:
    """A ``Progress`` callback that draws ``render``'s line on ``stream``."""

    def __init__(
        self,
        label: str,
        stream: TextIO,
        *,
        interval_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.stream = stream
        self.interval_s = interval_s
        self.clock = clock
        self._start: float | None = None
        self._drawn_at: float | None = None
        self._width = 0  # of the line drawn last, to blank what a shorter one leaves
        self._finished = False

    def __call__(self, done: int, total: int) -> None:
        now = self.clock()
        if self._start is None:
            self._start = now
        finished = done >= total
        if self._finished or (
            not finished and self._drawn_at is not None and now - self._drawn_at < self.interval_s
        ):
            return
        self._drawn_at = now
        line = render(self.label, done, total, now - self._start)
        self.stream.write("\r" + line.ljust(self._width) + ("\n" if finished else ""))
        self.stream.flush()
        self._width = len(line)
        self._finished = finished
