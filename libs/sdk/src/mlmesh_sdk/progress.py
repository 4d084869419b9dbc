"""One-line progress on stderr: transfers' bars and batch jobs' lines.

The SDK reports a transfer's progress through a callback,
``progress(done_bytes, total_bytes)`` (``Progress``), and prints nothing
itself; ``ProgressBar`` is the callback the command line passes:

    upload digits  [##########..........]  50%  12.0/24.0 MiB  8.1 MiB/s  1 s left

It redraws the line in place (``\\r``) at most every ``interval_s`` and ends
it with a newline once every byte is done. ``LiveLine`` is that redrawing
alone, for any line (``mlmesh batch`` draws a job's rows with it).
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


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 05 min``."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, rest = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {rest:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def bar(fraction: float) -> str:
    """``[#####...............]`` for a fraction from 0 to 1."""
    filled = round(min(max(fraction, 0.0), 1.0) * BAR_WIDTH)
    return f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}]"


def render(label: str, done: int, total: int, elapsed_s: float) -> str:
    """The bar's line (without ``\\r``) for ``done`` of ``total`` bytes after
    ``elapsed_s`` seconds."""
    fraction = min(done / total, 1.0) if total > 0 else 1.0
    parts = [
        label,
        bar(fraction),
        f"{fraction:4.0%}",
        f"{human_bytes(done).removesuffix(' B')}/{human_bytes(total)}",
    ]
    if elapsed_s > 0 and done > 0:
        rate = done / elapsed_s
        parts.append(f"{human_bytes(rate)}/s")
        if done < total:
            parts.append(f"{duration((total - done) / rate)} left")
        else:
            parts.append(f"in {duration(elapsed_s)}")
    return "  ".join(parts)


class LiveLine:
    """One line on ``stream``, redrawn in place (``\\r``) at most every
    ``interval_s``; the final one is always drawn, and ends with a newline."""

    def __init__(
        self,
        stream: TextIO,
        *,
        interval_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream
        self.interval_s = interval_s
        self.clock = clock
        self._drawn_at: float | None = None
        self._width = 0  # of the line drawn last, to blank what a shorter one leaves
        self.finished = False

    def draw(self, line: str, *, final: bool = False) -> None:
        now = self.clock()
        if self.finished or (
            not final and self._drawn_at is not None and now - self._drawn_at < self.interval_s
        ):
            return
        self._drawn_at = now
        self.stream.write("\r" + line.ljust(self._width) + ("\n" if final else ""))
        self.stream.flush()
        self._width = len(line)
        self.finished = final

    def close(self) -> None:
        """Ends a line left unfinished (an interrupted watch), so what is
        printed next starts on a line of its own."""
        if self._drawn_at is not None and not self.finished:
            self.stream.write("\n")
            self.stream.flush()
            self.finished = True


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
        self.clock = clock
        self._line = LiveLine(stream, interval_s=interval_s, clock=clock)
        self._start: float | None = None

    def __call__(self, done: int, total: int) -> None:
        now = self.clock()
        if self._start is None:
            self._start = now
        self._line.draw(render(self.label, done, total, now - self._start), final=done >= total)
