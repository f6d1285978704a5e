"""A one-line progress bar on stderr with speed and ETA (``python -m zslfast train``'s epochs and feature extraction).

    bar = Progress("epoch 3/100", total=141, unit="step", enabled=rank == 0)
    bar.update(done, "loss 2.3104")      redrawn at most every ``interval`` seconds, and always at the end;
                                         ``extra`` may be a callable, called only when the line is redrawn
    bar.close()                          ends the line (once)

Prints ``epoch 3/100 [############..................] 57/141 12.3 step/s ETA 0:07 loss 2.3104``; the line is
redrawn in place (carriage return), so a log file gets the successive states of one line.
"""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


def clock(seconds: float) -> str:
    """1:02:03 / 2:03 for a duration in seconds."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    WIDTH = 30

    def __init__(self, label: str, total: int, unit: str = "it", enabled: bool = True,
                 stream: Optional[TextIO] = None, interval: float = 0.25):
        self.label, self.total, self.unit, self.enabled = label, max(int(total), 0), unit, enabled
        self.stream, self.interval = stream or sys.stderr, interval
        self.start = self.last = time.perf_counter()
        self.done, self.drawn, self.closed = 0, -1, False
        self.extra = ""

    def update(self, done: int, extra="") -> None:
        self.done, self.extra = done, extra
        now = time.perf_counter()
        if not self.enabled or (now - self.last < self.interval and done < self.total):
            return
        self.last, self.drawn = now, done
        elapsed = now - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        filled = int(self.WIDTH * done / self.total) if self.total else self.WIDTH
        eta = clock((self.total - done) / rate) if rate > 0 else "?"
        extra = extra() if callable(extra) else extra
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (self.WIDTH - filled)}] {done}/{self.total} "
                          f"{rate:.1f} {self.unit}/s ETA {eta} {extra}".rstrip() + " ")
        self.stream.flush()

    def close(self) -> float:
        """End the line; returns the seconds since the bar started."""
        elapsed = time.perf_counter() - self.start
        if self.enabled and not self.closed:
            if self.drawn != self.done:
                self.last = float("-inf")
                self.update(self.done, self.extra)
            self.stream.write("\n")
            self.stream.flush()
        self.closed = True
        return elapsed
