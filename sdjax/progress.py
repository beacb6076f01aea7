"""A one-line progress bar over sampler steps.

The host advances it between calls of the compiled generation program, which runs one window of steps per
call (`sdjax.samplers.stepping`); nothing inside the program talks to the host, so the program can be read
from JAX's persistent compilation cache.
"""
from __future__ import annotations

import sys
import time


class ProgressBar:
    """A one-line text bar on a stream (stderr by default): `label  k/n [=====     ] rate it/s`."""

    def __init__(self, total: int, label: str = "sampling", stream=None, width: int = 30):
        self.total, self.label, self.width = max(int(total), 1), label, width
        self.stream = stream if stream is not None else sys.stderr
        self.count = 0
        self.started = None

    def advance(self, amount: int = 1) -> None:
        if self.started is None:
            self.started = time.perf_counter()
        self.count = min(self.count + amount, self.total)
        self._draw()

    def _draw(self) -> None:
        filled = self.width * self.count // self.total
        # The clock starts at the first tick (compilation comes before it), so the rate counts the ticks after it.
        elapsed = time.perf_counter() - self.started
        rate = f"{(self.count - 1) / elapsed:.2f} it/s" if self.count > 1 and elapsed > 0 else ""
        self.stream.write(f"\r{self.label} {self.count}/{self.total} [{'=' * filled}{' ' * (self.width - filled)}] {rate}")
        if self.count == self.total:
            self.stream.write("\n")
        self.stream.flush()
