"""A progress bar over sampler steps, driven from inside the compiled scan by `jax.debug.callback`.

The denoiser wrapped by `report_calls` tells the host each time it is evaluated; the host turns calls into
steps with the sampler's known NFE, so the bar moves while the single compiled program runs.
"""
from __future__ import annotations

import sys
import threading
import time

import jax


class ProgressBar:
    """A one-line text bar on a stream (stderr by default): `label  k/n [=====     ] rate it/s`."""

    def __init__(self, total: int, label: str = "sampling", stream=None, width: int = 30, calls_per_tick: int = 1):
        self.total, self.label, self.width = max(int(total), 1), label, width
        self.stream = stream if stream is not None else sys.stderr
        self.calls_per_tick = calls_per_tick
        self.count = 0
        self.calls = 0
        self.started = None
        self._lock = threading.Lock()

    def record_call(self) -> None:
        """Count one host callback; every `calls_per_tick` of them (one per image in the batch) is a tick."""
        with self._lock:
            self.calls += 1
            ticks = self.calls // self.calls_per_tick - self.count
        if ticks > 0:
            self.advance(ticks)

    def advance(self, amount: int = 1) -> None:
        with self._lock:
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


def report_calls(denoise, on_call):
    """`denoise` that also calls `on_call()` on the host each time it runs inside a compiled program."""

    def reporting(x, sigma):
        jax.debug.callback(lambda _: on_call(), sigma)
        return denoise(x, sigma)

    return reporting
