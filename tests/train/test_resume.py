"""Interrupted runs, in real processes: SIGKILL after a checkpoint, then SIGTERM mid-run, then a damaged latest
checkpoint, then completion must reproduce the uninterrupted reference run bit for bit (losses, params, optimizer
state, EMA)."""
import json
import signal
import time

import jax
import numpy as np
import pytest

from sdjax.errors import ConfigError
from sdjax.train.checkpoint import CheckpointStore
from sdjax.train.state import checkpointed
from tests.train.conftest import REFERENCE_STEPS, read_losses, run_training, start_training_process


def wait_for(condition, process, timeout=180.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"training ended (code {process.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def finished_checkpoints(workdir):
    folder = workdir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def last_logged_step(workdir):
    path = workdir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return json.loads(lines[-1])["step"] if lines else 0


def starts(workdir):
    path = workdir / "runs.jsonl"
    return [json.loads(line)["start_step"] for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.mark.slow
def test_killed_then_terminated_run_resumes_exactly(reference_run, tiny_overrides, compilation_cache, tmp_path):
    workdir = tmp_path / "run"

    # 1. SIGKILL (no chance to clean up) once the checkpoint of step 4 is complete.
    process = start_training_process(tiny_overrides, workdir, compilation_cache)
    wait_for(lambda: 4 in finished_checkpoints(workdir), process, what="checkpoint 4")
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    killed_at = max(finished_checkpoints(workdir))
    assert 4 <= killed_at < REFERENCE_STEPS

    # A kill can cut the last metrics line short; resuming drops it instead of failing on it.
    with (workdir / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"step": 99, "loss": 0.12')
    # Resuming with other training settings is refused before anything is written.
    recorded = (workdir / "config.json").read_text()
    with pytest.raises(ConfigError, match=r"other settings \(seed 0 -> 1; optimizer.learning_rate"):
        run_training(tiny_overrides, workdir, "seed=1", "optimizer.learning_rate=0.5", "log_every=2")
    assert (workdir / "config.json").read_text() == recorded

    # 2. Resume; SIGTERM a couple of steps later: a checkpoint at the current step and exit code 0.
    process = start_training_process(tiny_overrides, workdir, compilation_cache)
    # (runs.jsonl gets its line once the killed run's extra metrics lines have been dropped)
    wait_for(lambda: len(starts(workdir)) == 2 and last_logged_step(workdir) >= killed_at + 2, process,
             what="two steps after resuming")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 0, workdir.with_suffix(".log").read_text()[-3000:]
    terminated_at = last_logged_step(workdir)
    assert finished_checkpoints(workdir)[-1] == terminated_at < REFERENCE_STEPS
    assert not (workdir / "export").exists()

    # 3. A disk fault damages the latest checkpoint: resuming moves it aside and continues from the one before.
    previous = finished_checkpoints(workdir)[-2]
    for path in (workdir / "checkpoints" / str(terminated_at)).rglob("*"):
        if path.is_file():
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    # 4. Resume to the end.
    process = start_training_process(tiny_overrides, workdir, compilation_cache)
    assert process.wait(timeout=300) == 0, workdir.with_suffix(".log").read_text()[-3000:]
    assert starts(workdir) == [0, killed_at, previous]
    assert (workdir / "checkpoints" / f"{terminated_at}.damaged").is_dir()

    reference_dir, reference = reference_run
    assert read_losses(workdir) == read_losses(reference_dir)
    like = checkpointed(reference.state)
    final, data_state = CheckpointStore(workdir / "checkpoints").restore(jax.tree.map(np.zeros_like, like))
    assert int(final["step"]) == REFERENCE_STEPS
    jax.tree.map(np.testing.assert_array_equal, final, like)
    assert data_state == CheckpointStore(reference_dir / "checkpoints").restore(like)[1]
