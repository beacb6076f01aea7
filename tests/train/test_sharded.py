"""Training on a (data, fsdp) mesh of 8 virtual CPU devices: the same params as on one device for the same global
batch, and clear errors for a mesh or batch that does not fit the devices."""
import jax
import numpy as np
import pytest

from sdjax import parallel
from sdjax.errors import ConfigError
from tests.train.conftest import run_training

SETTINGS = ["batch_size=8", "num_steps=2", "checkpoint_every=2"]


@pytest.fixture(scope="module")
def one_device(tiny_overrides, compilation_cache, tmp_path_factory):
    return run_training(tiny_overrides, tmp_path_factory.mktemp("one") / "run", *SETTINGS)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["data=8", "data=2,fsdp=4"])
def test_a_run_on_a_mesh_trains_the_params_of_one_device(mesh, one_device, tiny_overrides, tmp_path):
    """The batch split over every device; with fsdp, the large kernels split too."""
    sharded = run_training(tiny_overrides, tmp_path / "run", *SETTINGS, f"mesh={mesh}")
    ours, theirs = jax.tree.leaves(sharded.state.params), jax.tree.leaves(one_device.state.params)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        a, b = np.asarray(a), np.asarray(b)
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b) + 1e-7, np.abs(a - b).max()
    split = [any(axis == "fsdp" for axis in leaf.sharding.spec) for leaf in ours]
    if "fsdp" in mesh:
        assert any(split) and not all(split)  # the large kernels are split over fsdp, the small arrays replicated
    else:
        assert not any(split)
    # Every step returns the state sharded as it came in (else each new sharding compiles the step again).
    state = sharded.state.replace(frozen={})
    rules = parallel.param_shardings(state, parallel.parse_mesh(mesh))
    mismatched = [jax.tree_util.keystr(path) for path, same in jax.tree_util.tree_leaves_with_path(
        jax.tree.map(lambda leaf, rule: leaf.sharding.is_equivalent_to(rule, leaf.ndim), state, rules)) if not same]
    assert mismatched == []
    assert sharded.last_metrics["loss"] == pytest.approx(one_device.last_metrics["loss"], rel=1e-5)


@pytest.mark.parametrize("settings, message", [
    (["mesh=data=3,fsdp=2"], "mesh: mesh data=3 x fsdp=2 = 6 devices, but there are 8"),
    (["mesh=fsdp=8", "batch_size=4"], "batch_size 4 does not split over the mesh's 8 devices"),
])
def test_a_mesh_that_does_not_fit_is_refused_before_training(settings, message, tiny_overrides, tmp_path):
    with pytest.raises(ConfigError, match=message):
        run_training(tiny_overrides, tmp_path / "run", *settings)
    assert not (tmp_path / "run" / "checkpoints").exists()
