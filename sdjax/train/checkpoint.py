"""Checkpoints with orbax's CheckpointManager: the training state, the data-iterator position and the model's
fingerprint, one folder per step.

Atomicity comes from orbax: a step is written into a temporary folder and renamed into place only once it
is complete, so a crash mid-save leaves the earlier steps intact (the leftover temporary folder is removed
when the next manager opens the directory). Writes are asynchronous: training continues while the previous
checkpoint is written, and `wait` blocks until it is on disk.

What orbax cannot prevent (a file damaged or deleted afterwards, a disk that lied) is caught on resume: a
checkpoint that does not read back is moved aside to `<step>.damaged`, with a warning, and the newest intact
one is used.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from sdjax.errors import DiskFullError, SdjaxError

ITEMS = ("state", "data", "model")
log = logging.getLogger("sdjax.train")


class CheckpointMismatchError(SdjaxError, ValueError):
    """The run directory holds checkpoints of a different model than the config describes."""


class CheckpointDamagedError(SdjaxError, ValueError):
    """No checkpoint of the run directory reads back."""


def tree_bytes(tree: Any) -> int:
    return sum(int(getattr(leaf, "nbytes", 0)) for leaf in jax.tree.leaves(tree))


def _differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two JSON-like trees, with both values."""
    if isinstance(saved, dict) and isinstance(current, dict):
        found = []
        for key in sorted(set(saved) | set(current)):
            found += _differences(saved.get(key), current.get(key), f"{prefix}{key}.")
        return found
    return [] if saved == current else [f"{prefix.rstrip('.')}: {saved!r} in the checkpoint, {current!r} now"]


class CheckpointStore:
    """The checkpoints of one run directory; keeps the `keep` most recent steps."""

    def __init__(self, directory: str | Path, *, keep: int = 3):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                                               enable_async_checkpointing=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def check_model(self, fingerprint: dict[str, Any]) -> None:
        """Raise CheckpointMismatchError if the latest checkpoint whose fingerprint reads back was written for
        another model (an unreadable one is left to `restore_latest`)."""
        for step in sorted(self.all_steps(), reverse=True):
            try:
                saved = self._manager.restore(step, args=ocp.args.Composite(model=ocp.args.JsonRestore())).model
                break
            except Exception:  # noqa: BLE001 - damage of any kind; restore_latest reports it
                continue
        else:
            return
        differences = _differences(saved, fingerprint)
        if differences:
            listing = "; ".join(differences[:5]) + (f"; and {len(differences) - 5} more" if len(differences) > 5 else "")
            raise CheckpointMismatchError(
                f"{self.directory} holds a checkpoint (step {step}) of a different model: {listing}. Nothing was "
                f"changed there. Use a new --workdir, or the config that run was started with (its config.json).")

    def save(self, step: int, state_tree: Any, data_state: dict, fingerprint: dict) -> bool:
        """Start writing checkpoint `step` (returns False when it already exists). Raises DiskFullError, before
        writing anything, when the disk lacks room for it: orbax would fail midway in a background thread."""
        if step in self._manager.all_steps():
            return False
        self._manager.wait_until_finished()  # the previous save's bytes count against the free space
        needed, free = int(tree_bytes(state_tree) * 1.1) + (1 << 20), shutil.disk_usage(self.directory).free
        if free < needed:
            previous = self.latest_step()
            kept = f"checkpoint {previous} is intact; free space and rerun the same command to resume from it" \
                if previous is not None else "free space and rerun the same command"
            raise DiskFullError(f"no room for checkpoint {step} in {self.directory}: it needs about "
                                f"{needed / 2**20:.0f} MiB and the disk has {free / 2**20:.0f} MiB free; {kept}")
        return self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state_tree), data=ocp.args.JsonSave(data_state),
            model=ocp.args.JsonSave(fingerprint)), force=True)

    def restore(self, like: Any, step: int | None = None) -> tuple[Any, dict]:
        """(state tree, data-iterator state) of checkpoint `step` (default: latest), shaped like `like`."""
        step = self.latest_step() if step is None else step
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
        return restored.state, restored.data

    def restore_latest(self, like: Any) -> tuple[int, Any, dict] | None:
        """(step, state tree, data-iterator state) of the newest checkpoint that reads back, or None when there
        is none. Newer ones that fail are moved aside to `<step>.damaged` (kept, not deleted) with a warning."""
        steps = sorted(self.all_steps(), reverse=True)
        for step in steps:
            try:
                return (step, *self.restore(like, step))
            except Exception as err:  # noqa: BLE001 - orbax and TensorStore raise many types for damaged files
                aside = self.directory / f"{step}.damaged"
                log.warning("checkpoint %s does not read back (%s: %s); moved it to %s and trying the one before",
                            self.directory / str(step), type(err).__name__, str(err).splitlines()[0][:300], aside)
                os.replace(self.directory / str(step), aside)
                self._manager.reload()
        if steps:
            raise CheckpointDamagedError(
                f"no checkpoint in {self.directory} reads back (moved aside as *.damaged: "
                f"{', '.join(map(str, steps))}); the run cannot resume. Start it again in a new --workdir.")
        return None

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
