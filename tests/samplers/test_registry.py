"""The sampler registry: public zoo and internal diffusers-parity samplers, names, aliases and checks."""
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax import schedules
from sdjax.errors import InvalidArgumentError
from sdjax.samplers import SAMPLERS, get_sampler, registry
from sdjax.sampling_plan import SamplingPlan, plan_from_names
from sdjax.scheduler_config import CLASS_DEFAULTS, SCHEDULER_CLASSES

INTERNAL = ["ddim_fixed_stride", "dpmpp_singlestep"]
GRID = np.array([2.0, 1.0, 0.0])


def test_importing_the_package_registers_every_sampler_module():
    modules = {fn.__module__ for fn in [*SAMPLERS.values(), *registry.INTERNAL_SAMPLERS.values()]}
    assert modules == {f"sdjax.samplers.{name}" for name in ("singlestep", "multistep", "unipc",
                                                               "diffusers_solvers")}


@pytest.mark.parametrize("name", INTERNAL)
def test_internal_samplers_stay_out_of_the_public_zoo(name):
    assert name not in SAMPLERS and name in registry.INTERNAL_SAMPLERS
    assert get_sampler(name) is registry.INTERNAL_SAMPLERS[name]          # what a scheduler-config plan runs
    assert SamplingPlan(name, GRID).sampler == name
    with pytest.raises(InvalidArgumentError, match="not a public sampler") as error:
        get_sampler(name, public_only=True)
    assert name not in str(error.value).split("Valid names:")[1]
    with pytest.raises(InvalidArgumentError, match=f"unknown sampler {name!r}"):
        plan_from_names(name, None, 4, schedules.alphas_cumprod_from_config({}))


def test_unknown_name_suggests_the_closest_public_one():
    with pytest.raises(InvalidArgumentError, match="unknown sampler 'dpmpp_2n'. Did you mean 'dpmpp_2m'?"):
        get_sampler("dpmpp_2n")


def test_aliases_name_the_same_function_and_names_are_unique():
    assert SAMPLERS["plms"] is SAMPLERS["pndm"]
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("euler")(lambda denoise, x, sigmas, key=None: x)
    assert SAMPLERS["euler"].__name__ == "euler"


def test_default_nfe_is_one_evaluation_per_step():
    assert SAMPLERS["dpmpp_2m"].nfe(7) == 7 and SAMPLERS["heun"].nfe(7) == 13
    assert SAMPLERS["dpm_adaptive"].nfe is None


def test_every_sampler_names_an_unknown_option_and_checks_the_grid():
    for name, fn in [*SAMPLERS.items(), *registry.INTERNAL_SAMPLERS.items()]:
        with pytest.raises(InvalidArgumentError, match="unknown option 'bogus'"):
            fn(lambda x, sigma: x, jnp.zeros(2), GRID, bogus=1)
        with pytest.raises(InvalidArgumentError, match="descending"):
            fn(lambda x, sigma: x, jnp.zeros(2), GRID[::-1])


def test_every_supported_scheduler_class_has_a_row_in_the_one_table():
    assert set(SCHEDULER_CLASSES) == set(CLASS_DEFAULTS)
