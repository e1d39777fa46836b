"""Progress of a long encode or generate, on the terminal and in the log: items done, rate, time left.

One line every `every` seconds (and one at the end when the work took that long), through the logger, so that it
reaches both the terminal and the job's log file; short work prints nothing."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("components.evaluation.progress")


def progress_line(label: str, done: int, total: int, seconds: float, unit: str = "texts") -> str:
    """'encode teacher LocalSICK-R: 1,024/2,660 texts (38%), 45.1/s, 36s left' (the time left at the rate so far)."""
    rate = done / seconds if seconds > 0 else 0.0
    left = (total - done) / rate if rate > 0 else float("inf")
    eta = f"{left:.0f}s left" if left != float("inf") else "time left unknown"
    if done >= total:
        eta = f"done in {seconds:.0f}s"
    return f"{label}: {done:,}/{total:,} {unit} ({100 * done / max(total, 1):.0f}%), {rate:.1f}/s, {eta}"


class Progress:
    """Call `update(n)` after each chunk of `total` items."""

    def __init__(self, label: str, total: int, unit: str = "texts", every: float = 10.0):
        self.label, self.total, self.unit, self.every = label, total, unit, every
        self.done = 0
        self.started = self.last = time.perf_counter()

    def update(self, count: int) -> None:
        self.done += count
        now = time.perf_counter()
        finished = self.done >= self.total
        if now - self.last >= self.every or (finished and now - self.started >= self.every):
            self.last = now
            log.info("%s", progress_line(self.label, self.done, self.total, now - self.started, self.unit))
