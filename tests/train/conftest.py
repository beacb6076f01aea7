"""Shared pieces of the training tests: a synthetic dataset, the tiny experiment's overrides, a persistent
compilation cache, and one reference run that several tests compare against."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train.synthetic import write_synthetic_dataset

REPO = Path(__file__).resolve().parents[2]
EXPERIMENT = REPO / "experiments" / "train_tiny" / "config.py"
REFERENCE_STEPS = 24


@pytest.fixture(scope="package")
def compilation_cache(tmp_path_factory):
    """A persistent XLA cache shared by in-process runs and training subprocesses, so the tiny train step is
    compiled once rather than once per process (compilation dominates these tests). Package-scoped: the rest of
    the test suite runs without it."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cache

    directory = tmp_path_factory.mktemp("xla_cache")
    settings = {"jax_compilation_cache_dir": str(directory), "jax_persistent_cache_min_compile_time_secs": 0,
                "jax_persistent_cache_min_entry_size_bytes": 0}
    previous = {name: getattr(jax.config, name) for name in settings}
    for name, value in settings.items():
        jax.config.update(name, value)
    cache.reset_cache()
    yield directory
    for name, value in previous.items():
        jax.config.update(name, value)
    cache.reset_cache()


@pytest.fixture(scope="package")
def dataset(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("data") / "images", count=8)


@pytest.fixture(scope="package")
def tiny_overrides(sd1_folder, dataset):
    """--set overrides that point the tiny experiment at the test model and data and log every step."""
    folder, _ = sd1_folder
    return [f"model.pretrained={folder}", f"data.folder={dataset}", f"num_steps={REFERENCE_STEPS}",
            "log_every=1", "checkpoint_every=4"]


def read_losses(workdir: Path) -> dict[int, float]:
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return {row["step"]: row["loss"] for row in map(json.loads, lines)}


def run_training(tiny_overrides, workdir, *extra):
    """Train the tiny experiment in this process; returns the TrainResult."""
    from sdjax.train import load_config, train
    return train(load_config(EXPERIMENT, [*tiny_overrides, *extra]), workdir)


def start_training_process(tiny_overrides, workdir, cache_dir, *extra) -> subprocess.Popen:
    """`python -m sdjax.train.cli` on the tiny experiment, sharing the session's compilation cache."""
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    command = [sys.executable, "-m", "sdjax.train.cli", str(EXPERIMENT), "--workdir", str(workdir),
               *[arg for item in [*tiny_overrides, *extra] for arg in ("--set", item)]]
    with open(Path(workdir).with_suffix(".log"), "w") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture(scope="package")
def reference_run(tiny_overrides, compilation_cache, tmp_path_factory):
    """An uninterrupted in-process run of REFERENCE_STEPS steps: (workdir, TrainResult)."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    return workdir, run_training(tiny_overrides, workdir)
