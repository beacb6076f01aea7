"""A NaN/inf loss or gradient never reaches the weights: the step's update is dropped, and the run stops with its
finite state saved (nonfinite=stop) or goes on counting the dropped steps (nonfinite=skip). A resume may change
settings only when asked to, and then keeps the run's original config.json."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sdjax.errors import ConfigError, NonFiniteLossError
from sdjax.train import load_config, train
from sdjax.train.checkpoint import CheckpointStore
from sdjax.train.state import checkpointed, create_state
from sdjax.train.step import make_train_step
from tests.train.conftest import EXPERIMENT, run_training


def test_a_nonfinite_step_leaves_params_optimizer_and_ema_untouched():
    loss_fn = lambda params, frozen, batch, key: (jnp.sum(params["w"] * batch["x"]) ** 2,  # noqa: E731
                                                  {"loss": jnp.sum(params["w"] * batch["x"]) ** 2})
    optimizer = optax.adam(0.1)
    state = create_state({"w": jnp.ones(3)}, {}, optimizer)
    step = make_train_step(loss_fn, optimizer, ema_decay=0.9)
    finite, metrics = step(state, {"x": jnp.ones((3,))}, jax.random.key(0))
    assert float(metrics["nonfinite"]) == 0.0 and not np.allclose(finite.params["w"], 1.0)
    before = jax.tree.map(np.asarray, finite)
    after, metrics = step(finite, {"x": jnp.full((3,), jnp.nan)}, jax.random.key(1))
    assert float(metrics["nonfinite"]) == 1.0 and int(after.step) == int(before.step) + 1
    for name in ("params", "opt_state", "ema_params"):
        jax.tree.map(np.testing.assert_array_equal, getattr(after, name), getattr(before, name))


@pytest.mark.slow
def test_a_diverging_run_stops_with_its_finite_state_then_resumes_skipping(tiny_overrides, compilation_cache,
                                                                         tmp_path):
    workdir = tmp_path / "run"
    diverging = ["optimizer.learning_rate=1e30", "optimizer.warmup_steps=0", "num_steps=6", "keep_checkpoints=5"]
    with pytest.raises(NonFiniteLossError, match="NaN/inf .* up to step (\\d).*checkpoint \\1 holds the last finite"):
        run_training(tiny_overrides, workdir, *diverging)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    stopped = rows[-1]["step"]
    assert rows[-1]["nonfinite"] == 1.0 and all(row["nonfinite"] == 0.0 for row in rows[:-1])
    assert CheckpointStore(workdir / "checkpoints").latest_step() == stopped

    # Changing a training setting on resume is refused unless allowed (nonfinite is bookkeeping); an allowed
    # change is recorded and leaves the run's config.json as it began. (The seed, not the learning rate: a
    # learning rate is a constant of the compiled step, and a new one would compile it again.)
    changed = [*diverging, "nonfinite=skip", "seed=1"]
    with pytest.raises(ConfigError, match="seed.*--allow-changed-settings"):
        run_training(tiny_overrides, workdir, *changed)
    original = (workdir / "config.json").read_text()
    misses = []
    count_misses = lambda event, **_: misses.append(event) if event.endswith("cache_misses") else None  # noqa: E731
    jax.monitoring.register_event_listener(count_misses)
    try:
        result = train(load_config(EXPERIMENT, [*tiny_overrides, *changed]), workdir, allow_changed_settings=True)
    finally:
        jax.monitoring.unregister_event_listener(count_misses)
    # The resumed state (restored, on the device) lowers to the first run's programs: all read from the cache.
    assert misses == []
    assert result.step == 6 and all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(result.state.params))
    assert (workdir / "config.json").read_text() == original
    assert json.loads((workdir / f"config.step_{stopped}.json").read_text())["seed"] == 1
    last = json.loads((workdir / "runs.jsonl").read_text().splitlines()[-1])
    assert last["start_step"] == stopped and any("seed" in change for change in last["changed_settings"])
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, 7)) and rows[-1]["nonfinite"] == 1.0
    # The checkpoint the stop wrote holds the finite state of that step.
    like = jax.tree.map(np.zeros_like, checkpointed(result.state))
    saved, _ = CheckpointStore(workdir / "checkpoints").restore(like, stopped)
    assert int(saved["step"]) == stopped and all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(saved))
