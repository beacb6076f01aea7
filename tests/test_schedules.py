"""sdjax.schedules against diffusers (betas, alpha-bar, zero-SNR rescaling, timestep spacing, sigma grids),
k-diffusion (get_sigmas_*, DiscreteSchedule.get_sigmas), scipy (Beta inverse CDF) and ComfyUI's scheduler
definitions (transcribed below as index formulas: ComfyUI is not installed)."""
from __future__ import annotations

import contextlib
import importlib

import jax
import numpy as np
import pytest
import torch

from sdjax import schedules as S
from sdjax.errors import ConfigError, InvalidArgumentError
from tests import kdiffusion_ref

diffusers = pytest.importorskip("diffusers")
scipy_stats = pytest.importorskip("scipy.stats")

SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
STEP_COUNTS = [1, 2, 3, 7, 10, 20, 25, 30, 50, 333, 1000]
F32_ULP = float(np.finfo(np.float32).eps)


def sd_table(**overrides):
    return S.sigma_table(S.alphas_cumprod_from_config({**SD, **overrides}))


def max_rel(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    return float(np.max(np.abs(actual - expected) / np.maximum(np.abs(expected), 1e-300)))


@contextlib.contextmanager
def torch_default_dtype(dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def with_float64_table(scheduler, alphas_cumprod):
    """diffusers computes its table in float32; give it sdjax's float64 one so that only the code under test
    (spacing, interpolation, grid formulas) differs. Zero SNR is floored as in EulerDiscreteScheduler."""
    scheduler.alphas_cumprod = torch.from_numpy(np.maximum(alphas_cumprod, S.ZERO_SNR_ALPHA_BAR))
    return scheduler


# ------------------------------------------------------------------------------ training schedule

@pytest.mark.parametrize("beta_schedule", S.BETA_SCHEDULES)
@pytest.mark.parametrize("beta_range", [(0.0001, 0.02), (0.00085, 0.012)])
def test_betas_match_diffusers_to_float32_rounding(beta_schedule, beta_range):
    reference = diffusers.DDPMScheduler(beta_schedule=beta_schedule, beta_start=beta_range[0],
                                        beta_end=beta_range[1]).betas.numpy()
    ours = S.betas(beta_schedule, 1000, *beta_range)
    assert ours.dtype == np.float64
    assert max_rel(ours, reference) <= 4 * F32_ULP  # diffusers rounds (and for linspace computes) in float32


@pytest.mark.parametrize("beta_schedule", S.BETA_SCHEDULES)
@pytest.mark.parametrize("zero_snr", [False, True])
def test_alphas_cumprod_from_config_matches_diffusers(beta_schedule, zero_snr):
    config = {**SD, "beta_schedule": beta_schedule, "rescale_betas_zero_snr": zero_snr}
    reference = diffusers.DDIMScheduler(**config).alphas_cumprod.double().numpy()
    ours = S.alphas_cumprod_from_config(config)
    # diffusers multiplies 1000 float32 factors: its relative error grows to ~N * eps32 / 2 at the tail.
    np.testing.assert_allclose(ours, reference, rtol=1000 * F32_ULP / 2, atol=1e-9)
    assert (ours[-1] == 0.0) == zero_snr


@pytest.mark.parametrize("beta_schedule", S.BETA_SCHEDULES)
def test_rescale_zero_terminal_snr_matches_diffusers_in_float64(beta_schedule):
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

    betas = S.betas(beta_schedule, 1000, 0.00085, 0.012)
    reference = rescale_zero_terminal_snr(torch.from_numpy(betas)).numpy()
    ours = S.rescale_zero_terminal_snr(betas)
    assert max_rel(ours, reference) <= 1e-6
    alpha_bar = S.alphas_cumprod(ours)
    assert alpha_bar[-1] == 0.0
    np.testing.assert_allclose(alpha_bar[0], S.alphas_cumprod(betas)[0], rtol=1e-12)


def test_trained_betas_config_wins_over_beta_schedule():
    trained = np.linspace(0.001, 0.01, 50)
    ours = S.alphas_cumprod_from_config({"trained_betas": trained.tolist(), "beta_schedule": "nonsense"})
    np.testing.assert_allclose(ours, np.cumprod(1 - trained), rtol=1e-14)


def test_sigma_table_floors_zero_snr_like_euler_discrete():
    config = {**SD, "rescale_betas_zero_snr": True}
    reference = diffusers.EulerDiscreteScheduler(**config).sigmas.numpy()[:-1][::-1]  # ascending, no final 0
    ours = sd_table(rescale_betas_zero_snr=True)
    assert np.isfinite(ours).all()
    assert max_rel(ours[-1], reference[-1]) <= 2 * F32_ULP  # ~4096: sqrt((1 - 2^-24) / 2^-24)
    np.testing.assert_allclose(ours, reference, rtol=1e-4)  # float32 cancellation in 1 - alpha_bar at small t


# ----------------------------------------------------------------------- diffusers' timestep spacing

# (scheduler, integer linspace, steps + 1 points with the last dropped)
SCHEDULER_FAMILIES = [
    ("DDIMScheduler", True, False), ("DDPMScheduler", True, False),
    ("EulerDiscreteScheduler", False, False), ("EulerAncestralDiscreteScheduler", False, False),
    ("HeunDiscreteScheduler", False, False), ("LMSDiscreteScheduler", False, False),
    ("DPMSolverMultistepScheduler", True, True), ("UniPCMultistepScheduler", True, True),
    ("DEISMultistepScheduler", True, True),
]


@pytest.mark.parametrize("scheduler_name,integer,drop_final_point", SCHEDULER_FAMILIES)
@pytest.mark.parametrize("spacing", S.TIMESTEP_SPACINGS)
def test_timesteps_match_diffusers_set_timesteps(scheduler_name, integer, drop_final_point, spacing):
    for steps_offset in (0, 1):
        scheduler = getattr(diffusers, scheduler_name)(**SD, timestep_spacing=spacing, steps_offset=steps_offset)
        for steps in STEP_COUNTS:
            scheduler.set_timesteps(steps)
            reference = scheduler.timesteps.double().numpy()
            if scheduler_name == "HeunDiscreteScheduler":
                reference = reference[::2]  # Heun lists every timestep after the first twice
            ours = S.timesteps(steps, spacing, 1000, steps_offset, integer=integer,
                               drop_final_point=drop_final_point)
            # Euler-family linspace keeps fractional timesteps, which diffusers rounds to float32.
            np.testing.assert_allclose(ours, reference, rtol=0, atol=0 if integer else 1e-4,
                                       err_msg=f"{spacing} offset={steps_offset} steps={steps}")


@pytest.mark.parametrize("scheduler_name,drop_final_point",
                         [("EulerDiscreteScheduler", False), ("DPMSolverMultistepScheduler", True)])
@pytest.mark.parametrize("spacing", S.TIMESTEP_SPACINGS)
@pytest.mark.parametrize("zero_snr", [False, True])
def test_spaced_sigmas_match_diffusers(scheduler_name, drop_final_point, spacing, zero_snr):
    config = {**SD, "rescale_betas_zero_snr": zero_snr}
    alpha_bar = S.alphas_cumprod_from_config(config)
    scheduler = getattr(diffusers, scheduler_name)(**config, timestep_spacing=spacing, steps_offset=1)
    with_float64_table(scheduler, alpha_bar)
    for steps in [1, 3, 10, 20, 30, 50]:
        scheduler.set_timesteps(steps)
        ours = S.spaced(steps, S.sigma_table(alpha_bar), spacing, 1,
                        integer=drop_final_point, drop_final_point=drop_final_point)
        assert max_rel(ours, scheduler.sigmas.double().numpy()) <= 1e-6  # diffusers' final float32 cast


# ------------------------------------------------------------------------------- continuous grids

def _kdiffusion_grids(sampling, steps):
    return {
        "karras": (sampling.get_sigmas_karras(steps, 0.0292, 14.6146, rho=7.0), S.karras(steps, 0.0292, 14.6146)),
        "karras_rho3": (sampling.get_sigmas_karras(steps, 0.1, 80.0, rho=3.0), S.karras(steps, 0.1, 80.0, 3.0)),
        "exponential": (sampling.get_sigmas_exponential(steps, 0.0292, 14.6146),
                        S.exponential(steps, 0.0292, 14.6146)),
        "polyexponential": (sampling.get_sigmas_polyexponential(steps, 0.0292, 14.6146, rho=2.5),
                            S.polyexponential(steps, 0.0292, 14.6146, 2.5)),
        "vp": (sampling.get_sigmas_vp(steps, beta_d=19.9, beta_min=0.1, eps_s=1e-3), S.vp(steps)),
    }


@pytest.mark.parametrize("steps", [1, 2, 5, 20, 100])
def test_continuous_grids_match_kdiffusion_in_float64(steps):
    sampling = kdiffusion_ref.load()
    with torch_default_dtype(torch.float64):
        grids = _kdiffusion_grids(sampling, steps)
    for name, (reference, ours) in grids.items():
        assert reference.dtype == torch.float64
        assert max_rel(ours, reference.numpy()) <= 1e-6, name


def test_continuous_grids_match_kdiffusion_in_float32():
    grids = _kdiffusion_grids(kdiffusion_ref.load(), 20)
    del grids["vp"]  # k-diffusion's exp(.) - 1 cancels in float32 near t = eps_s; sdjax uses expm1 in float64
    for name, (reference, ours) in grids.items():
        assert reference.dtype == torch.float32
        assert max_rel(ours.astype(np.float32), reference.numpy()) <= 16 * F32_ULP, name  # pow/exp in float32


@pytest.mark.parametrize("option,build", [
    ("use_karras_sigmas", S.karras), ("use_exponential_sigmas", S.exponential)])
@pytest.mark.parametrize("spacing", S.TIMESTEP_SPACINGS)
def test_range_grids_match_diffusers_use_x_sigmas(option, build, spacing):
    """diffusers takes the range from its spaced sigmas (so it depends on timestep_spacing)."""
    alpha_bar = S.alphas_cumprod_from_config(SD)
    table = S.sigma_table(alpha_bar)
    scheduler = diffusers.EulerDiscreteScheduler(**SD, timestep_spacing=spacing, steps_offset=1, **{option: True})
    with_float64_table(scheduler, alpha_bar)
    for steps in [2, 10, 25]:
        scheduler.set_timesteps(steps)
        spaced = S.spaced(steps, table, spacing, 1)
        ours = build(steps, sigma_min=spaced[-2], sigma_max=spaced[0])
        assert max_rel(ours, scheduler.sigmas.double().numpy()) <= 1e-6


# ------------------------------------------------------------------------- grids on the sigma table

def test_normal_matches_kdiffusion_discrete_schedule():
    external = importlib.import_module(kdiffusion_ref.load().__name__.rsplit(".", 1)[0] + ".external")
    table = sd_table()
    schedule = external.DiscreteSchedule(torch.from_numpy(table), quantize=False)
    for steps in [1, 2, 4, 10, 20, 37, 50]:
        # k-diffusion interpolates with a float32 weight; grids whose timesteps are integers are exact.
        exact = (999 % max(steps - 1, 1)) == 0
        assert max_rel(S.normal(steps, table), schedule.get_sigmas(steps).numpy()) <= (1e-14 if exact else 1e-6)


def _log_interp(table, t):
    low = np.floor(t).astype(int)
    high = np.minimum(low + 1, len(table) - 1)
    w = t - low
    return np.exp((1 - w) * np.log(table[low]) + w * np.log(table[high]))


def test_sgm_uniform_is_normal_without_t0():
    table = sd_table()
    for steps in [1, 4, 20]:
        t = np.linspace(999, 0, steps + 1)[:-1]
        expected = np.append(_log_interp(table, t), 0.0)
        assert max_rel(S.sgm_uniform(steps, table), expected) <= 1e-12
        np.testing.assert_array_equal(S.SCHEDULES["sgm_uniform"](steps, table), S.normal(steps, table, sgm=True))


@pytest.mark.parametrize("steps,expected_t", [
    (1, [999]), (4, [999, 749, 499, 249]), (10, list(range(999, 0, -100))),
    (3, [999, 666, 333]),  # 1000 / 3 = 333.33.. truncated: 0, 333, 666
    (7, [999, 857, 714, 571, 428, 285, 142]),
])
def test_simple_picks_table_entries_from_the_top(steps, expected_t):
    table = sd_table()
    np.testing.assert_array_equal(S.simple(steps, table), np.append(table[expected_t], 0.0))


@pytest.mark.parametrize("steps", [1, 10, 20, 30, 999])
def test_ddim_uniform_picks_every_kth_entry_from_t1(steps):
    table = sd_table()
    stride = 1000 // steps
    t = np.arange(1, 1000, stride)[::-1]
    np.testing.assert_array_equal(S.ddim_uniform(steps, table), np.append(table[t], 0.0))
    if steps == 30:
        assert len(t) == 31  # ComfyUI's grid is one step longer when the stride does not divide 999


@pytest.mark.parametrize("alpha,beta", [(0.6, 0.6), (0.5, 0.7), (2.0, 2.0)])
@pytest.mark.parametrize("steps", [1, 5, 20, 60])
def test_beta_schedule_uses_beta_quantiles_of_the_timesteps(alpha, beta, steps):
    table = sd_table()
    t = np.rint(scipy_stats.beta.ppf(1 - np.arange(steps) / steps, alpha, beta) * 999).astype(int)
    t = t[np.concatenate([[True], t[1:] != t[:-1]])]
    np.testing.assert_array_equal(S.beta(steps, table, alpha, beta), np.append(table[t], 0.0))


@pytest.mark.parametrize("a,b", [(0.6, 0.6), (0.5, 2.0), (2.0, 5.0), (1.0, 1.0), (10.0, 0.3), (50.0, 50.0),
                                 (0.1, 0.1)])
def test_beta_ppf_and_cdf_match_scipy(a, b):
    q = np.concatenate([[0.0, 1e-12, 1e-6], np.linspace(0.001, 0.999, 97), [1 - 1e-9, 1.0]])
    np.testing.assert_allclose(S.beta_ppf(q, a, b), scipy_stats.beta.ppf(q, a, b), rtol=1e-9, atol=1e-12)
    x = np.linspace(0, 1, 101)
    np.testing.assert_allclose(S.beta_cdf(x, a, b), scipy_stats.beta.cdf(x, a, b), rtol=1e-11, atol=1e-14)


# --------------------------------------------------------------------------------------- registry

@pytest.mark.parametrize("name", sorted(S.SCHEDULES))
@pytest.mark.parametrize("zero_snr", [False, True])
def test_every_schedule_is_descending_and_ends_in_zero(name, zero_snr):
    table = sd_table(rescale_betas_zero_snr=zero_snr)
    for steps in [1, 2, 20]:
        sigmas = S.get_schedule(name)(steps, table)
        assert sigmas.dtype == np.float64 and sigmas.ndim == 1
        assert sigmas[-1] == 0.0 and np.all(np.diff(sigmas) < 0), (name, steps, sigmas)
        assert np.all(np.isfinite(sigmas))


def test_range_schedules_default_to_the_table_ends():
    table = sd_table()
    np.testing.assert_array_equal(S.SCHEDULES["karras"](10, table), S.karras(10, table[0], table[-1]))
    np.testing.assert_array_equal(S.SCHEDULES["exponential"](10, None, sigma_min=0.1, sigma_max=10.0),
                                  S.exponential(10, 0.1, 10.0))
    np.testing.assert_array_equal(S.SCHEDULES["polyexponential"](10, table, rho=2.0, sigma_max=5.0),
                                  S.polyexponential(10, table[0], 5.0, 2.0))


def test_grid_runs_as_a_traced_argument_without_recompiling():
    from sdjax.samplers import SAMPLERS

    euler = SAMPLERS["euler"]
    traces = []

    def denoise(x, sigma):
        traces.append(None)  # runs once per trace, not per call
        return x / (1 + sigma**2)  # exact denoiser of N(0, 1) data

    run = jax.jit(lambda x, sigmas: euler(denoise, x, sigmas, jax.random.key(0)))
    x = np.ones((2, 3), np.float32) * 14.6
    table = sd_table()
    first = run(x, S.karras(10, table[0], table[-1]))
    traces_after_first = len(traces)
    second = run(x, S.exponential(10, table[0], table[-1]))
    assert len(traces) == traces_after_first
    eager = euler(denoise, x, S.exponential(10, table[0], table[-1]), jax.random.key(0))
    np.testing.assert_allclose(second, eager, rtol=1e-6)
    assert not np.allclose(first, second)


# --------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("call,message", [
    (lambda: S.get_schedule("karas"), "unknown schedule 'karas'. Did you mean 'karras'?"),
    (lambda: S.get_schedule("nope"), "Valid names: beta, ddim_uniform, exponential"),
    (lambda: S.karras(0, 0.1, 10.0), "steps must be a positive integer, got 0"),
    (lambda: S.karras(2.5, 0.1, 10.0), "steps must be a positive integer, got 2.5"),
    (lambda: S.exponential(True, 0.1, 10.0), "steps must be a positive integer, got True"),
    (lambda: S.karras(10, 10.0, 0.1), "sigma_min (10.0) must be < sigma_max (0.1)"),
    (lambda: S.exponential(10, 0.0, 1.0), "sigma_min must be a finite number > 0, got 0.0"),
    (lambda: S.polyexponential(10, 0.1, float("inf")), "sigma_max must be a finite number > 0"),
    (lambda: S.karras(10, 0.1, 10.0, rho=0), "rho must be a finite number > 0, got 0"),
    (lambda: S.vp(10, eps_s=1.5), "eps_s must be in (0, 1), got 1.5"),
    (lambda: S.betas("cosine"), "unknown beta_schedule 'cosine'; valid: linear, scaled_linear, squaredcos_cap_v2"),
    (lambda: S.timesteps(10, "uniform"), "unknown timestep_spacing 'uniform'; valid: leading, trailing, linspace"),
    (lambda: S.timesteps(1001, "leading"), "steps (1001) must be <= num_train_timesteps (1000)"),
    (lambda: S.normal(10, None), "model_sigmas is required"),
    (lambda: S.SCHEDULES["karras"](10), "model_sigmas is required"),
    (lambda: S.simple(10, sd_table()[::-1]), "model_sigmas must be finite, > 0 and strictly ascending"),
    (lambda: S.beta(10, sd_table(), alpha=-1.0), "alpha must be a finite number > 0"),
    (lambda: S.beta_ppf([0.5, 1.5], 1.0, 1.0), "probabilities must be in [0, 1]"),
])
def test_errors_name_the_argument(call, message):
    with pytest.raises(InvalidArgumentError) as error:
        call()
    assert message in str(error.value)


def test_bad_scheduler_config_is_a_config_error():
    with pytest.raises(ConfigError, match="scheduler config: unknown beta_schedule 'cosine'"):
        S.alphas_cumprod_from_config({"beta_schedule": "cosine"})
