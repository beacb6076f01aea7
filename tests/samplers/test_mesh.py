"""Every sampler, and the sampler of every diffusers scheduler class sdjax reproduces, runs inside
`jax.shard_map` (the data-parallel generation program) and gives the images it gives on one device. A loop carry
initialised from constants (a multistep history of zeros, dpm_adaptive's error memory) is invariant over the mesh
axis while the step's output varies: unless the loop casts it, the scan does not type-check. The tests run over
the registries, so a new sampler or scheduler class is covered without being listed."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax import schedules
from sdjax.samplers.registry import INTERNAL_SAMPLERS, SAMPLERS, get_sampler
from sdjax.scheduler_config import SCHEDULER_CLASSES, plan_from_scheduler_config, resolve_config

P = jax.sharding.PartitionSpec
SIGMAS = np.asarray([14.6, 6.0, 2.5, 1.0, 0.4, 0.1, 0.03, 0.0], np.float32)


def denoise(x, sigma):
    """The exact denoiser of data ~ N(0, I)."""
    return x / (1.0 + sigma**2)


def per_device(name, sigmas, options=()):
    sampler = get_sampler(name)
    sigmas = jnp.asarray(sigmas, jnp.float32)
    return lambda xs, keys: jax.vmap(lambda x, key: sampler(denoise, x, sigmas, key, **dict(options)))(xs, keys)


@pytest.fixture(scope="module")
def mesh():
    devices = jax.devices()[:4]  # tests/conftest.py gives the process 8 CPU devices
    assert len(devices) == 4
    return jax.sharding.Mesh(np.asarray(devices), ("data",))


def assert_mesh_matches_one_device(mesh, name, sigmas, options=()):
    """8 images, 2 per device, against the same 8 on one device, both in one compiled program."""
    xs = jax.random.normal(jax.random.key(0), (8, 4, 4, 2)) * sigmas[0]
    keys = jax.random.split(jax.random.key(1), 8)
    alone = per_device(name, sigmas, options)
    on_mesh = jax.shard_map(alone, mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P("data"))
    sharded, reference = jax.jit(lambda xs, keys: (on_mesh(xs, keys), alone(xs, keys)))(xs, keys)
    assert np.isfinite(np.asarray(reference)).all()
    # Not bitwise: 2 images per device vectorise differently from 8 (batch_invariant generation is); dpm_adaptive's
    # step-size controller carries that float32 rounding into its step sizes (3e-5 seen on outputs of size ~2).
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(reference), rtol=0, atol=1e-4)


# SD 1.5's scheduler config loaded into each class (as `Scheduler.from_config(pipe.scheduler.config)` does), and
# the settings that switch a class to another sampler: together they reach every internal sampler.
SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
            set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
SCHEDULER_CONFIGS = {name: {"_class_name": name, **SD15} for name in SCHEDULER_CLASSES} | {
    "DDIMScheduler, trailing": {"_class_name": "DDIMScheduler", **SD15, "timestep_spacing": "trailing"},
    "DPMSolverMultistepScheduler, SDE": {"_class_name": "DPMSolverMultistepScheduler", **SD15,
                                          "algorithm_type": "sde-dpmsolver++"},
    "DPMSolverMultistepScheduler, order 3": {"_class_name": "DPMSolverMultistepScheduler", **SD15, "solver_order": 3},
    "DPMSolverSinglestepScheduler, order 3": {"_class_name": "DPMSolverSinglestepScheduler", **SD15,
                                              "solver_order": 3}}


def plan(config):
    return plan_from_scheduler_config(config, 6, schedules.alphas_cumprod_from_config(resolve_config(config)))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_on_a_mesh_matches_one_device(name, mesh):
    assert_mesh_matches_one_device(mesh, name, SIGMAS)


@pytest.mark.parametrize("config", sorted(SCHEDULER_CONFIGS))
def test_every_scheduler_class_on_a_mesh_matches_one_device(config, mesh):
    """Each config's plan: its sampler with the plan's options on the plan's grid."""
    chosen = plan(SCHEDULER_CONFIGS[config])
    assert_mesh_matches_one_device(mesh, chosen.sampler, chosen.sigmas, chosen.options)


def test_the_scheduler_configs_reach_every_internal_sampler():
    assert {plan(config).sampler for config in SCHEDULER_CONFIGS.values()} >= set(INTERNAL_SAMPLERS)
