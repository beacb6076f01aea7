"""A one-line text progress bar, for sampler steps and training steps alike.

Generation advances it between calls of the compiled program, which runs one window of steps per call
(`sdjax.samplers.stepping`); nothing inside the program talks to the host, so the program can be read from JAX's
persistent compilation cache.
"""
from __future__ import annotations

import sys
import time


def bar_line(label: str, count: int, total: int, suffix: str = "", width: int = 30) -> str:
    """`label k/n [=====     ] suffix`."""
    filled = width * min(count, total) // max(total, 1)
    return f"{label} {count}/{total} [{'=' * filled}{' ' * (width - filled)}] {suffix}".rstrip()


class ProgressBar:
    """A bar on a stream (stderr by default). On a terminal it redraws one line in place (`\\r`, padded over what
    the previous draw left); on a pipe or file each draw is a line of its own, so logs stay readable."""

    def __init__(self, total: int, label: str = "sampling", stream=None, width: int = 30):
        self.total, self.label, self.width = max(int(total), 1), label, width
        self.stream = stream if stream is not None else sys.stderr
        self.in_place = _is_terminal(self.stream)
        self.count = 0
        self.started = None
        self._drawn = 0  # length of the line on screen

    def advance(self, amount: int = 1) -> None:
        """Count `amount` more steps; the rate is measured from the first advance (compilation comes before)."""
        if self.started is None:
            self.started = time.perf_counter()
        self.count = min(self.count + amount, self.total)
        elapsed = time.perf_counter() - self.started
        self.show(self.count, f"{(self.count - 1) / elapsed:.2f} it/s" if self.count > 1 and elapsed > 0 else "")

    def show(self, count: int, suffix: str = "") -> None:
        """Draw the bar at `count` with `suffix` after it; the line ends once count reaches the total."""
        line = bar_line(self.label, count, self.total, suffix, self.width)
        if self.in_place:
            self.stream.write("\r" + line.ljust(self._drawn))
            self._drawn = len(line)
            if count >= self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())
