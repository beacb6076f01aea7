"""Checkpoints: a crash in the middle of a save leaves the previous one loadable; the optimizer state keeps its
structure; another model's checkpoint is refused."""
import logging
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax.train.checkpoint import CheckpointDamagedError, CheckpointMismatchError, CheckpointStore, DiskFullError
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


def _damage(step_dir):
    """Truncate every file of a written checkpoint to half its size, as a disk fault or a bad copy would."""
    for path in step_dir.rglob("*"):
        if path.is_file():
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_a_damaged_latest_checkpoint_is_moved_aside_and_the_one_before_resumes(tmp_path):
    directory = tmp_path / "c"
    store = CheckpointStore(directory)
    for step in (1, 2):
        store.save(step, tree(float(step)), {"epoch": 0, "position": step}, MODEL)
    store.wait()
    _damage(directory / "2")

    store = CheckpointStore(directory)
    store.check_model(MODEL)  # the damaged fingerprint is passed over, the intact one compared
    warnings = logging.Handler(logging.WARNING)
    warnings.emit = lambda record: warned.append(record.getMessage())
    warned = []
    logging.getLogger("sdjax.train").addHandler(warnings)  # caplog misses it once the CLI stopped propagation
    try:
        step, restored, data_state = store.restore_latest(tree(0.0))
    finally:
        logging.getLogger("sdjax.train").removeHandler(warnings)
    assert step == 1 and int(restored["step"]) == 1 and data_state == {"epoch": 0, "position": 1}
    assert len(warned) == 1 and "does not read back" in warned[0] and "2.damaged" in warned[0]
    assert (directory / "2.damaged").is_dir() and store.all_steps() == [1]  # kept for inspection, out of the way
    store.save(2, tree(2.0), {"epoch": 0, "position": 2}, MODEL)  # the run writes step 2 again
    store.wait()
    assert CheckpointStore(directory).restore_latest(tree(0.0))[0] == 2


def test_no_intact_checkpoint_is_an_error_and_an_empty_store_is_a_fresh_start(tmp_path):
    assert CheckpointStore(tmp_path / "empty").restore_latest(tree(0.0)) is None
    store = CheckpointStore(tmp_path / "c")
    store.save(1, tree(1.0), {}, MODEL)
    store.wait()
    _damage(tmp_path / "c" / "1")
    with pytest.raises(CheckpointDamagedError, match=r"no checkpoint in .*c reads back.*1.*new --workdir"):
        CheckpointStore(tmp_path / "c").restore_latest(tree(0.0))
    assert (tmp_path / "c" / "1.damaged").is_dir()


def test_a_full_disk_is_refused_before_the_save_starts(tmp_path, monkeypatch):
    import shutil as real_shutil

    store = CheckpointStore(tmp_path / "c")
    store.save(1, tree(1.0), {}, MODEL)
    store.wait()
    usage = real_shutil.disk_usage(tmp_path)
    monkeypatch.setattr("sdjax.train.checkpoint.shutil.disk_usage",
                        lambda path: usage._replace(free=512 * 1024))
    with pytest.raises(DiskFullError, match=r"no room for checkpoint 2 .*MiB free; checkpoint 1 is intact.*rerun"):
        store.save(2, tree(2.0), {}, MODEL)
    store.wait()
    assert store.all_steps() == [1] and sorted(p.name for p in (tmp_path / "c").iterdir()) == ["1"]
