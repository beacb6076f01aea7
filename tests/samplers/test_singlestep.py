"""Single-step samplers against k-diffusion and diffusers, on a Gaussian mixture with an exact denoiser."""
import contextlib
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sdjax.errors import InvalidArgumentError
from sdjax.samplers import SAMPLERS, singlestep
from sdjax.samplers.common import step_noise, substep_noise
from tests import kdiffusion_ref
from tests.samplers.mixture import TestMixture, default_mixture

MIXTURE = default_mixture()
SIGMA_MIN, SIGMA_MAX = 0.03, 14.6
KEY = jax.random.key(7)
TOLERANCE = {"float64": 1e-8, "float32": 2e-6}   # relative L2 error vs a float64 reference


def karras_sigmas(n, ends_in_zero=True):
    """Karras et al. (2022) eq. 5 grid with rho = 7, float64."""
    ramp = np.linspace(0, 1, n)
    sigmas = (SIGMA_MAX ** (1 / 7) + ramp * (SIGMA_MIN ** (1 / 7) - SIGMA_MAX ** (1 / 7))) ** 7
    return np.append(sigmas, 0.0) if ends_in_zero else sigmas


def precision(dtype):
    """float64 needs x64 switched on, for this block only."""
    return jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()


def prior_batch(dtype, n=16, seed=0):
    return MIXTURE.sample_prior(jax.random.key(seed), n, SIGMA_MAX, jnp.dtype(dtype))


def relative_error(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return np.linalg.norm(actual - expected) / np.linalg.norm(expected)


def as_torch(array):
    return torch.from_numpy(np.array(array, np.float64))


def kdiffusion_model(x, sigma):
    return MIXTURE.denoise_torch(x, sigma[0])


def run_kdiffusion(name, x, sigmas, **options):
    sample = getattr(kdiffusion_ref.load(), f"sample_{name}")
    return sample(kdiffusion_model, as_torch(x), as_torch(sigmas), disable=True, **options).numpy()


# ---- deterministic parity with k-diffusion ----------------------------------------------------------------

DETERMINISTIC = [
    ("euler", {}), ("heun", {}), ("dpm_2", {}),
    ("euler_ancestral", {"eta": 0.0}), ("dpm_2_ancestral", {"eta": 0.0}),
    ("dpmpp_2s_ancestral", {"eta": 0.0}), ("dpmpp_sde", {"eta": 0.0}),
]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name,options", DETERMINISTIC, ids=[name for name, _ in DETERMINISTIC])
def test_deterministic_samplers_match_kdiffusion(name, options, dtype):
    sigmas = karras_sigmas(10)
    with precision(dtype):
        x = prior_batch(dtype)
        ours = SAMPLERS[name](MIXTURE.denoise_jax, x, jnp.asarray(sigmas, dtype), **options)
        assert ours.dtype == jnp.dtype(dtype)
    assert relative_error(ours, run_kdiffusion(name, x, sigmas, **options)) < TOLERANCE[dtype]


@pytest.mark.parametrize("name", ["heun", "dpm_2", "dpmpp_sde"])
def test_grid_ending_above_zero_takes_a_full_last_step(name):
    sigmas = karras_sigmas(8, ends_in_zero=False)
    options = {"eta": 0.0} if name == "dpmpp_sde" else {}
    with jax.enable_x64(True):
        x = prior_batch("float64")
        ours = SAMPLERS[name](MIXTURE.denoise_jax, x, sigmas, **options)
    assert relative_error(ours, run_kdiffusion(name, x, sigmas, **options)) < TOLERANCE["float64"]


# ---- stochastic parity with k-diffusion: the same noise injected into both --------------------------------

class NoiseFeed:
    """k-diffusion noise_sampler replaying our keyed per-step noise; calls are counted, one per noisy step."""

    def __init__(self, x):
        self.x, self.calls = x, 0

    def __call__(self, sigma=None, sigma_next=None):
        noise = as_torch(step_noise(KEY, self.calls, self.x))
        self.calls += 1
        return noise


class BrownianPairFeed(NoiseFeed):
    """dpmpp_sde's two noises per step, combined as our sampler combines them (Brownian increments)."""

    def __call__(self, sigma, sigma_to):
        step, second = divmod(self.calls, 2)
        self.calls += 1
        first = as_torch(substep_noise(KEY, step, 0, self.x))
        if not second:
            self.sigma_mid = sigma_to
            return first
        rest = as_torch(substep_noise(KEY, step, 1, self.x))
        increment = (sigma - self.sigma_mid).sqrt() * first + (self.sigma_mid - sigma_to).sqrt() * rest
        return increment / (sigma - sigma_to).sqrt()


@pytest.mark.parametrize("name", ["euler", "heun", "dpm_2"])
def test_churn_matches_kdiffusion_with_the_same_noise(name, monkeypatch):
    sigmas = karras_sigmas(10)
    options = {"s_churn": 2.0, "s_tmin": 0.1, "s_tmax": 5.0, "s_noise": 1.003}
    with jax.enable_x64(True):
        x = prior_batch("float64")
        ours = SAMPLERS[name](MIXTURE.denoise_jax, x, sigmas, KEY, **options)
        feed = NoiseFeed(x)
        monkeypatch.setattr(torch, "randn_like", lambda like: feed())   # k-diffusion's churn draws one per step
        reference = run_kdiffusion(name, x, sigmas, **options)
    assert feed.calls == len(sigmas) - 1
    assert relative_error(ours, reference) < TOLERANCE["float64"]


@pytest.mark.parametrize("name,feed_type", [("euler_ancestral", NoiseFeed), ("dpm_2_ancestral", NoiseFeed),
                                            ("dpmpp_2s_ancestral", NoiseFeed), ("dpmpp_sde", BrownianPairFeed)])
def test_ancestral_matches_kdiffusion_with_the_same_noise(name, feed_type):
    sigmas = karras_sigmas(10)
    options = {"eta": 0.8, "s_noise": 0.9}
    with jax.enable_x64(True):
        x = prior_batch("float64")
        ours = SAMPLERS[name](MIXTURE.denoise_jax, x, sigmas, KEY, **options)
        reference = run_kdiffusion(name, x, sigmas, noise_sampler=feed_type(x), **options)
    assert relative_error(ours, reference) < TOLERANCE["float64"]


# ---- dpm_adaptive ------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:To copy construct from a tensor")   # k-diffusion re-wraps our tensor bounds
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("order", [2, 3])
def test_dpm_adaptive_matches_kdiffusion(order, dtype):
    with precision(dtype):
        x = prior_batch(dtype)
        ours = singlestep.dpm_adaptive(MIXTURE.denoise_jax, x, jnp.array([SIGMA_MAX, SIGMA_MIN], dtype),
                                       order=order, h_init=0.5)
    # Tensor (not float) bounds keep k-diffusion's time arithmetic in float64.
    reference, info = kdiffusion_ref.load().sample_dpm_adaptive(
        kdiffusion_model, as_torch(x), as_torch(SIGMA_MIN), as_torch(SIGMA_MAX), order=order, h_init=0.5,
        disable=True, return_info=True)
    assert info["n_reject"] > 0   # the controller's reject path is exercised
    assert relative_error(ours, reference.numpy()) < TOLERANCE[dtype]


def test_dpm_adaptive_grid_ending_in_zero_denoises_at_the_end():
    run = jax.jit(lambda x, sigmas: singlestep.dpm_adaptive(MIXTURE.denoise_jax, x, sigmas))
    with jax.enable_x64(True):
        x = prior_batch("float64")
        stopped = run(x, jnp.array([SIGMA_MAX, 1.0, SIGMA_MIN]))   # only the end points matter
        finished = run(x, jnp.array([SIGMA_MAX, SIGMA_MIN, 0.0]))
        np.testing.assert_allclose(finished, MIXTURE.denoise_jax(stopped, SIGMA_MIN), rtol=1e-12)


# ---- ddim / ddpm / lcm against diffusers' schedulers, in VP scaling -----------------------------------------

def vp_scheduler(cls, **config):
    scheduler = cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1, **config)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()   # diffusers keeps float32; compare in float64
    if hasattr(scheduler, "final_alpha_cumprod"):
        scheduler.final_alpha_cumprod = scheduler.final_alpha_cumprod.double()
    return scheduler


def sigma_of(alpha_cumprod):
    return np.sqrt((1 - alpha_cumprod) / alpha_cumprod)


def eps_model(scheduler):
    """The mixture's exact denoiser as diffusers' eps-prediction U-Net on VP inputs."""
    def predict(x_vp, t):
        alpha_cumprod = scheduler.alphas_cumprod[t]
        sigma = ((1 - alpha_cumprod) / alpha_cumprod).sqrt()
        x_ve = x_vp / alpha_cumprod.sqrt()
        return (x_ve - MIXTURE.denoise_torch(x_ve, sigma)) / sigma
    return predict


def run_vp_scheduler(scheduler, x_ve, sigmas, step_options=lambda i: {}):
    """Step a diffusers scheduler from x_ve (VE scaling at sigmas[0]) and return its output in VE scaling."""
    model = eps_model(scheduler)
    x_vp = as_torch(x_ve) / np.sqrt(1 + sigmas[0] ** 2)
    for i, t in enumerate(scheduler.timesteps):
        x_vp = scheduler.step(model(x_vp, t), t, x_vp, **step_options(i)).prev_sample
    return x_vp.numpy() * np.sqrt(1 + sigmas[-1] ** 2)


def scheduler_sigmas(scheduler, final_sigma):
    return np.append(sigma_of(scheduler.alphas_cumprod[scheduler.timesteps].numpy()), final_sigma)


@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_ddim_matches_diffusers(eta, set_alpha_to_one):
    from diffusers import DDIMScheduler
    scheduler = vp_scheduler(DDIMScheduler, clip_sample=False, set_alpha_to_one=set_alpha_to_one)
    scheduler.set_timesteps(10)
    final_sigma = 0.0 if set_alpha_to_one else sigma_of(scheduler.alphas_cumprod[0].item())
    sigmas = scheduler_sigmas(scheduler, final_sigma)
    with jax.enable_x64(True):
        x = prior_batch("float64")
        ours = singlestep.ddim(MIXTURE.denoise_jax, x, sigmas, KEY, eta=eta)
        noise = lambda i: {"eta": eta, "variance_noise": as_torch(step_noise(KEY, i, x))}
        reference = run_vp_scheduler(scheduler, x, sigmas, noise)
    assert relative_error(ours, reference) < TOLERANCE["float64"]


def replay_randn_tensor(monkeypatch, module, x):
    """Make a diffusers scheduler module draw our keyed noise, one draw per step."""
    feed = NoiseFeed(x)
    monkeypatch.setattr(module, "randn_tensor", lambda *args, **kwargs: feed())
    return feed


def test_ddpm_matches_diffusers(monkeypatch):
    from diffusers import DDPMScheduler
    from diffusers.schedulers import scheduling_ddpm
    scheduler = vp_scheduler(DDPMScheduler, clip_sample=False)
    scheduler.set_timesteps(10)
    sigmas = scheduler_sigmas(scheduler, 0.0)
    with jax.enable_x64(True):
        x = prior_batch("float64")
        ours = singlestep.ddpm(MIXTURE.denoise_jax, x, sigmas, KEY)
        replay_randn_tensor(monkeypatch, scheduling_ddpm, x)
        reference = run_vp_scheduler(scheduler, x, sigmas)
    assert relative_error(ours, reference) < TOLERANCE["float64"]


def test_lcm_matches_diffusers(monkeypatch):
    from diffusers import LCMScheduler
    from diffusers.schedulers import scheduling_lcm
    scheduler = vp_scheduler(LCMScheduler)
    # The boundary scalings c_skip/c_out are part of an LCM's denoiser, not of the sampler: use the plain one.
    scheduler.get_scalings_for_boundary_condition_discrete = lambda timestep: (0.0, 1.0)
    scheduler.set_timesteps(4)
    sigmas = scheduler_sigmas(scheduler, 0.0)
    with jax.enable_x64(True):
        x = prior_batch("float64")
        ours = singlestep.lcm(MIXTURE.denoise_jax, x, sigmas, KEY)
        feed = replay_randn_tensor(monkeypatch, scheduling_lcm, x)
        reference = run_vp_scheduler(scheduler, x, sigmas)
    assert feed.calls == 3   # no noise on the final step
    assert relative_error(ours, reference) < TOLERANCE["float64"]


# ---- stochastic samplers: reproducible, and sampling the right distribution ----------------------------------

STOCHASTIC = [
    ("euler", {"s_churn": 1.0}), ("heun", {"s_churn": 1.0}), ("dpm_2", {"s_churn": 1.0}),
    ("euler_ancestral", {}), ("dpm_2_ancestral", {}), ("dpmpp_2s_ancestral", {}), ("dpmpp_sde", {}),
    ("ddim", {"eta": 1.0}), ("ddpm", {}), ("lcm", {}), ("dpm_adaptive", {"eta": 1.0}),
]
STOCHASTIC_IDS = [name for name, _ in STOCHASTIC]


@functools.cache
def compiled_sampler(name, options):
    """One jitted sampler per case, shared by the tests below (compiling dominates their cost)."""
    return jax.jit(lambda x, sigmas, key: SAMPLERS[name](MIXTURE.denoise_jax, x, sigmas, key,
                                                                    **dict(options)))


def sample_data(name, options, key):
    x = MIXTURE.sample_prior(jax.random.key(11), 4000, SIGMA_MAX)
    return compiled_sampler(name, tuple(options.items()))(x, jnp.asarray(karras_sigmas(100)), key)


@pytest.mark.parametrize("name,options", STOCHASTIC, ids=STOCHASTIC_IDS)
def test_same_key_same_sample_other_key_other_sample(name, options):
    first = sample_data(name, options, jax.random.key(12))
    np.testing.assert_array_equal(first, sample_data(name, options, jax.random.key(12)))
    assert not np.allclose(first, sample_data(name, options, jax.random.key(13)))


def assert_moments_close(samples, mean, covariance, z=4.5):
    """Sample mean and covariance within z standard errors (Gaussian approximations) of the truth."""
    n = len(samples)
    mean_se = np.sqrt(np.diag(covariance) / n)
    variances = np.diag(covariance)
    covariance_se = np.sqrt((np.outer(variances, variances) + covariance**2) / n)
    np.testing.assert_array_less(np.abs(samples.mean(0) - mean), z * mean_se)
    np.testing.assert_array_less(np.abs(np.cov(samples.T) - covariance), z * covariance_se)


@pytest.mark.parametrize("name,options", [case for case in STOCHASTIC if case[0] != "lcm"],
                         ids=[name for name in STOCHASTIC_IDS if name != "lcm"])
def test_stochastic_samplers_reproduce_the_data_moments(name, options):
    samples = sample_data(name, options, jax.random.key(12))
    assert_moments_close(np.asarray(samples, np.float64), MIXTURE.mean(), MIXTURE.covariance())


def test_lcm_with_an_exact_denoiser_follows_its_gaussian_recursion():
    """With an exact (posterior-mean) denoiser LCM sampling is not exact: each re-noising of E[x0 | x] loses
    variance. For Gaussian data N(mu, s^2) the chain x' = mu + g (x - mu) + sigma' z, g = s^2 / (s^2 + sigma^2),
    has variance v' = g^2 v + sigma'^2: the sampler must reproduce exactly that."""
    gaussian = TestMixture.isotropic(means=[[1.0, -0.5]], stds=[0.8], weights=[1.0])
    sigmas = karras_sigmas(6)
    variance = 0.8**2 + SIGMA_MAX**2
    for sigma, sigma_next in itertools.pairwise(sigmas):
        variance = (0.8**2 / (0.8**2 + sigma**2)) ** 2 * variance + sigma_next**2
    x = gaussian.sample_prior(jax.random.key(11), 4000, SIGMA_MAX)
    samples = singlestep.lcm(gaussian.denoise_jax, x, sigmas, jax.random.key(12))
    assert_moments_close(np.asarray(samples, np.float64), gaussian.mean(), variance * np.eye(2))
    assert variance < 0.8**2 - 0.01   # the test can tell LCM's chain from exact sampling


# ---- tracing, compilation and NFE --------------------------------------------------------------------------

ALL = STOCHASTIC   # every sampler once, with its noise on: the widest traced graph


class CountingDenoiser:
    """The mixture's denoiser, counting Python calls (traces) and, through a host callback, executions."""

    def __init__(self):
        self.traced = self.executed = 0

    def __call__(self, x, sigma):
        self.traced += 1
        jax.debug.callback(self._executed)
        return MIXTURE.denoise_jax(x, sigma)

    def _executed(self):
        self.executed += 1


@pytest.mark.parametrize("name,options", ALL, ids=STOCHASTIC_IDS)
def test_tracing_cost_is_independent_of_the_step_count(name, options):
    def traced_calls(steps):
        denoise = CountingDenoiser()
        sampler = lambda x, sigmas: SAMPLERS[name](denoise, x, sigmas, KEY, **options)
        jax.make_jaxpr(sampler)(jnp.zeros((2, 2)), jnp.asarray(karras_sigmas(steps)))
        return denoise.traced

    assert traced_calls(5) == traced_calls(50)


@pytest.mark.parametrize("name,options", ALL, ids=STOCHASTIC_IDS)
def test_a_new_grid_of_the_same_length_reuses_the_compiled_sampler_and_nfe_is_exact(name, options):
    denoise, traces = CountingDenoiser(), []

    @jax.jit
    def run(x, sigmas):
        traces.append(1)
        return SAMPLERS[name](denoise, x, sigmas, KEY, **options)

    x, sigmas = prior_batch("float32", 2), jnp.asarray(karras_sigmas(7))
    for grid in (sigmas, sigmas * 0.9):
        jax.block_until_ready(run(x, grid))
    jax.effects_barrier()
    assert len(traces) == 1
    nfe = SAMPLERS[name].nfe
    if nfe is None:   # dpm_adaptive: whole trials of `order` calls, plus the final jump to 0, per run
        assert denoise.executed % 3 == 2
    else:
        assert denoise.executed == 2 * nfe(7)


# ---- argument validation -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name,options,mentions", [
    ("euler", {"eta": 1.0}, "eta"),
    ("ddpm", {"eta": 0.5}, "eta"),
    ("euler_ancestral", {"eta": -0.1}, "eta"),
    ("ddim", {"eta": -1.0}, "eta"),
    ("dpmpp_sde", {"s_noise": -1.0}, "s_noise"),
    ("dpmpp_sde", {"r": 0.0}, "r"),
    ("heun", {"s_churn": -1.0}, "s_churn"),
    ("dpm_adaptive", {"order": 4}, "order"),
    ("dpm_adaptive", {"rtol": -0.1}, "rtol"),
    ("dpm_adaptive", {"max_iterations": 0}, "max_iterations"),
])
def test_invalid_options_name_the_argument(name, options, mentions):
    with pytest.raises(InvalidArgumentError, match=mentions):
        SAMPLERS[name](MIXTURE.denoise_jax, jnp.zeros((2, 2)), karras_sigmas(3), KEY, **options)


@pytest.mark.parametrize("name,options", [("euler", {"s_churn": 1.0}), ("euler_ancestral", {}), ("ddpm", {}),
                                          ("lcm", {}), ("dpmpp_sde", {})])
def test_stochastic_sampler_without_a_key_says_so(name, options):
    with pytest.raises(InvalidArgumentError, match="key"):
        SAMPLERS[name](MIXTURE.denoise_jax, jnp.zeros((2, 2)), karras_sigmas(3), None, **options)


def test_ascending_grid_is_rejected():
    with pytest.raises(InvalidArgumentError, match="descending"):
        singlestep.euler(MIXTURE.denoise_jax, jnp.zeros((2, 2)), np.array([0.0, 1.0, 2.0]))
