"""Training metrics: one JSON line per logging window in <workdir>/metrics.jsonl, TensorBoard scalars when a
SummaryWriter is installed (tensorboardX, or torch with tensorboard), and a progress bar with loss and steps/s.

Step metrics stay on the device until a window closes, so logging never stalls the dispatch of the next steps.
steps_per_sec is measured per window; the first window of a process includes compilation.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from sdjax import distributed
from sdjax.errors import DiskFullError
from sdjax.progress import ProgressBar

log = logging.getLogger("sdjax.train")


def _tensorboard_writer(directory: Path):
    for module in ("tensorboardX", "torch.utils.tensorboard"):
        try:
            return __import__(module, fromlist=["SummaryWriter"]).SummaryWriter(str(directory))
        except ImportError:
            continue
    log.info("TensorBoard logging is off: install tensorboardX (or tensorboard) to get it")
    return None


def _step_of(line: str) -> int | None:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None


def truncate_after(path: Path, step: int) -> None:
    """Drop the lines of a metrics file past `step`: after a resume, those steps are trained again. A line that
    does not parse (half-written when the process was killed) is dropped too, with a warning."""
    if not path.is_file():
        return
    rows = [(line, _step_of(line)) for line in path.read_text().splitlines() if line.strip()]
    unreadable = [line for line, row_step in rows if row_step is None]
    if unreadable:
        log.warning("%s: dropping %d unreadable line(s) (written when the run was killed?): %.60s",
                    path, len(unreadable), unreadable[-1])
    kept = [line for line, row_step in rows if row_step is not None and row_step <= step]
    path.write_text("".join(line + "\n" for line in kept))


class MetricsLog:
    """Collects per-step metrics and writes their mean every `every` steps."""

    def __init__(self, workdir: Path, *, every: int, start_step: int, total_steps: int,
                 host_metrics: Callable[[int], dict[str, float]] = lambda step: {}, write: bool = True):
        """write=False (every process but the first of a multi-process run): compute, show, write nothing."""
        self.path = workdir / "metrics.jsonl"
        self.host_metrics = host_metrics
        if write:
            truncate_after(self.path, start_step)
        self.every = every
        self._file = self.path.open("a") if write else open(os.devnull, "w")
        self._pending: list[dict] = []
        self._window_start = time.perf_counter()
        self._writer = _tensorboard_writer(workdir / "tensorboard") if write else None
        self.bar = ProgressBar(total_steps, label="train")
        self.last: dict[str, float] = {}

    def add(self, step: int, metrics: dict) -> None:
        """Record one step's (device) metrics; writes a line when the window closes."""
        self._pending.append(metrics)
        if step % self.every == 0:
            self.flush(step)

    def flush(self, step: int) -> None:
        """Write the mean of the pending steps' metrics, with `host_metrics(step)`, as the line of `step`."""
        if not self._pending:
            return
        fetched = distributed.to_host(self._pending)
        elapsed = time.perf_counter() - self._window_start
        row = {"step": step, **{key: float(np.mean([m[key] for m in fetched])) for key in fetched[0]},
               **self.host_metrics(step), "steps_per_sec": len(fetched) / max(elapsed, 1e-9)}
        try:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise DiskFullError(f"no room to write {self.path} (step {step}): the disk is full. The newest "
                                f"checkpoint is intact (a half-written line is dropped on resume); free space and "
                                f"rerun the same command to resume") from None
        if self._writer is not None:
            for key, value in row.items():
                if key != "step":
                    self._writer.add_scalar(f"train/{key}", value, step)
        self.bar.show(step, f"loss {row['loss']:.4f} {row['steps_per_sec']:.2f} steps/s")
        self.last, self._pending, self._window_start = row, [], time.perf_counter()

    def close(self) -> None:
        try:
            self._file.close()
        except OSError as err:  # a full disk: flush() has already raised DiskFullError for it
            log.warning("closing %s: %s", self.path, err)
        if self._writer is not None:
            self._writer.close()
