"""Checkpoints: a crash in the middle of a save leaves the previous one loadable; the optimizer state keeps its
structure; another model's checkpoint is refused."""
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax.train.checkpoint import CheckpointMismatchError, CheckpointStore
from sdjax.train.config import OptimizerConfig
from sdjax.train.state import checkpointed, create_state, make_optimizer
from tests.train.conftest import REPO

MODEL = {"stage": "unet", "trained": {"unet": {"block_out_channels": [32, 64]}}}


def tree(value):
    return {"w": jnp.full((3,), value, jnp.float32), "step": jnp.int32(value)}


def test_crash_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    # The child saves step 1, then dies (os._exit, no cleanup) while step 2 is written but not yet committed.
    script = textwrap.dedent("""
        import os, sys
        import jax.numpy as jnp
        from orbax.checkpoint._src.path import atomicity
        from sdjax.train.checkpoint import CheckpointStore
        store = CheckpointStore(sys.argv[1])
        model = {"stage": "unet", "trained": {"unet": {"block_out_channels": [32, 64]}}}
        store.save(1, {"w": jnp.full((3,), 1.0), "step": jnp.int32(1)}, {"epoch": 0, "position": 1}, model)
        store.wait()
        async def crash(*args, **kwargs):
            os._exit(17)
        atomicity.AtomicRenameTemporaryPath.finalize = crash
        store.save(2, {"w": jnp.full((3,), 2.0), "step": jnp.int32(2)}, {"epoch": 0, "position": 2}, model)
        store.wait()
    """)
    directory = tmp_path / "checkpoints"
    child = subprocess.run([sys.executable, "-c", script, str(directory)], cwd=REPO, capture_output=True, text=True,
                           check=False, env={"PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "PATH": ""}, timeout=120)
    assert child.returncode == 17, child.stderr[-2000:]
    assert any("tmp" in p.name for p in directory.iterdir()), "the interrupted save should have left its temp folder"

    store = CheckpointStore(directory)
    assert store.latest_step() == 1
    restored, data_state = store.restore(tree(0.0))
    np.testing.assert_array_equal(restored["w"], np.ones(3))
    assert int(restored["step"]) == 1
    assert data_state == {"epoch": 0, "position": 1}
    store.save(2, tree(2.0), {"epoch": 0, "position": 2}, MODEL)  # the same step can be written again
    store.wait()
    assert store.all_steps() == [1, 2] and not any("tmp" in p.name for p in directory.iterdir())


def test_optimizer_state_round_trips_with_its_structure(tmp_path):
    optimizer = make_optimizer(OptimizerConfig(), 10)
    state = checkpointed(create_state({"unet": {"kernel": jnp.ones((2, 2))}}, {}, optimizer))
    store = CheckpointStore(tmp_path / "c")
    store.save(0, state, {}, MODEL)
    store.wait()
    restored, _ = store.restore(jax.tree.map(jnp.zeros_like, state))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    jax.tree.map(np.testing.assert_array_equal, restored, state)


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    store = CheckpointStore(tmp_path / "c")
    store.save(3, tree(3.0), {}, MODEL)
    store.wait()
    store.check_model(MODEL)
    other = {"stage": "unet", "trained": {"unet": {"block_out_channels": [32, 32]}}}
    with pytest.raises(CheckpointMismatchError, match=r"step 3.*unet\.block_out_channels: \[32, 64\].*\[32, 32\]"):
        store.check_model(other)
