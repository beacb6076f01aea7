"""Checkpoints with orbax's CheckpointManager: the training state, the data-iterator position and the model's
fingerprint, one folder per step.

Atomicity comes from orbax: a step is written into a temporary folder and renamed into place only once it
is complete, so a crash mid-save leaves the earlier steps intact (the leftover temporary folder is removed
when the next manager opens the directory). Writes are asynchronous: training continues while the previous
checkpoint is written, and `wait` blocks until it is on disk.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from sdjax.errors import SdjaxError

ITEMS = ("state", "data", "model")


class CheckpointMismatchError(SdjaxError, ValueError):
    """The run directory holds checkpoints of a different model than the config describes."""


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
        """Raise CheckpointMismatchError if the latest checkpoint was written for another model."""
        step = self.latest_step()
        if step is None:
            return
        saved = self._manager.restore(step, args=ocp.args.Composite(model=ocp.args.JsonRestore())).model
        differences = _differences(saved, fingerprint)
        if differences:
            listing = "; ".join(differences[:5]) + (f"; and {len(differences) - 5} more" if len(differences) > 5 else "")
            raise CheckpointMismatchError(
                f"{self.directory} holds a checkpoint (step {step}) of a different model: {listing}. Nothing was "
                f"changed there. Use a new --workdir, or the config that run was started with (its config.json).")

    def save(self, step: int, state_tree: Any, data_state: dict, fingerprint: dict) -> bool:
        """Start writing checkpoint `step` (returns False when it already exists)."""
        if step in self._manager.all_steps():
            return False
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

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
