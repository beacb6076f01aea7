"""Running a sampler a window of steps at a time (what the progress bar does) gives bitwise the result of running
it whole, for single-step, multistep, predictor-corrector and stochastic samplers alike."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax.samplers import get_sampler, stepping

SIGMAS = jnp.asarray([14.6, 6.0, 2.5, 1.0, 0.4, 0.1, 0.0])
SAMPLER_NAMES = ["euler", "euler_ancestral", "heun", "dpm_2", "lms", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde",
                 "dpmpp_sde", "unipc", "deis", "ddim", "ipndm", "dpmpp_singlestep"]


def denoise(x, sigma):
    """A smooth, nonlinear stand-in for a model: x0 estimate of a Gaussian with mean 0.3 and std 0.8."""
    return (0.3 * sigma**2 + 0.64 * x) / (0.64 + sigma**2) + 0.01 * jnp.sin(x)


def inputs():
    return jax.random.normal(jax.random.key(0), (2, 3, 3, 4)) * SIGMAS[0], jax.random.key(1)


# Both windowings of a sampler run the same whole program and the same window program (start, stop and resume are
# traced), so each is compiled once per sampler and shared by the two parametrisations.
@functools.lru_cache(maxsize=None)
def whole_run(name):
    x, key = inputs()
    return jax.jit(lambda: get_sampler(name)(denoise, x, SIGMAS, key))()


@functools.lru_cache(maxsize=None)
def window_program(name):
    """(the sampler over one window as a jitted call, the zero carry it starts from)."""
    x, key = inputs()

    @jax.jit
    def call(start, stop, resume, carry):
        w = stepping.Window(start, stop, resume, carry)
        with stepping.window(w):
            out = get_sampler(name)(denoise, x, SIGMAS, key)
        return out, w.final_carry

    def discover(start, stop, resume):
        w = stepping.Window(start, stop, resume)
        with stepping.window(w):
            get_sampler(name)(denoise, x, SIGMAS, key)
        return w.final_carry

    return call, jax.tree.map(jnp.zeros_like, jax.eval_shape(discover, 0, 1, False))


def run_windows(name, windows):
    """The sampler once per window, the carry handed from one call to the next, as Pipeline does."""
    call, carry = window_program(name)
    for start, stop in windows:
        out, carry = call(start, stop, start > 0, carry)
    return out


@pytest.mark.parametrize("name", SAMPLER_NAMES)
@pytest.mark.parametrize("windows", [[(k, k + 1) for k in range(6)], [(0, 2), (2, 5), (5, 6)]])
def test_windows_reproduce_the_whole_run_bitwise(name, windows):
    np.testing.assert_array_equal(run_windows(name, windows), whole_run(name))


def test_without_a_window_the_loop_is_a_plain_scan():
    body = lambda carry, item: (carry * 2 + item, None)
    assert stepping.scan(body, jnp.float32(1), jnp.arange(3.0)) == 1 * 8 + 0 * 4 + 1 * 2 + 2
