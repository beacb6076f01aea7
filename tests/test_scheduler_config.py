"""plan_from_scheduler_config against diffusers' schedulers, driven step by step as StableDiffusionPipeline drives
them, with one analytic model on both sides.

The model: the exact denoiser of a 2-D Gaussian mixture (tests/samplers/mixture.py) at the noise level of the
timestep it is given (the sigma table interpolated linearly at t), plus a term in sin(t) so that the timestep
itself matters, not only the noise level; it answers in the config's prediction_type. diffusers runs it in
float32 from unit noise * init_noise_sigma through scale_model_input and step; sdjax runs the plan as
sdjax.generation does, with the same model wrapped by discrete_denoiser. Both sides count evaluations and
record the timesteps the model saw.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sdjax import schedules
from sdjax.denoisers import discrete_denoiser, pin_timesteps
from sdjax.errors import ConfigError
from sdjax.samplers import get_sampler
from sdjax.samplers.common import step_noise
from sdjax.samplers.diffusers_solvers import singlestep_orders
from sdjax.parameterization import to_vp
from sdjax.scheduler_config import plan_from_scheduler_config, resolve_config
from tests.samplers.mixture import default_mixture

diffusers = pytest.importorskip("diffusers")
# diffusers hands torch tensors to numpy in set_timesteps, which numpy 2 warns about on every call.
pytestmark = pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")

MIXTURE = default_mixture()
NOISE = np.random.default_rng(0).standard_normal((16, 2)).astype(np.float32)   # unit noise, as the pipeline draws
KEY = jax.random.key(11)
TOLERANCE = 1e-5                   # relative L2 of the final latents, float32 on both sides
TIMESTEP_TOLERANCE = 5e-4          # diffusers' float32 table puts log-interpolated t near 999 off by ~2e-4
WIGGLE = 0.02                      # size of the model's direct dependence on t

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
# runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1, scheduler/scheduler_config.json.
SD15_PNDM = dict(_class_name="PNDMScheduler", _diffusers_version="0.6.0", **SD_BETAS, num_train_timesteps=1000,
                 set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, trained_betas=None,
                 clip_sample=False)
SD21_DDIM = dict(_class_name="DDIMScheduler", _diffusers_version="0.8.0", **SD_BETAS, clip_sample=False,
                 num_train_timesteps=1000, prediction_type="v_prediction", set_alpha_to_one=False,
                 skip_prk_steps=True, steps_offset=1, trained_betas=None)


def sd15_as(class_name, **overrides):
    """SD 1.5's config loaded into another class, as `Scheduler.from_config(pipe.scheduler.config)` does: the
    loaded PNDMScheduler's config also holds its defaults, timestep_spacing="leading" among them."""
    return {**SD15_PNDM, "timestep_spacing": "leading", "_class_name": class_name, **overrides}


def plain(class_name, **overrides):
    """A config naming only the class, SD's betas and `overrides`: the class's defaults do the rest."""
    return dict(_class_name=class_name, **SD_BETAS, **overrides)


# ---- the model, once for torch and once for jax -----------------------------------------------------------------

def _finish(x_vp, t, sigma, x0_at_sigma, prediction_type, sin, tanh, sqrt):
    x = x_vp * sqrt(1 + sigma**2)
    x0 = x0_at_sigma(x, sigma) + WIGGLE * sin(t / 7.0) * tanh(x_vp)
    eps = (x - x0) / sigma
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    alpha = 1 / sqrt(1 + sigma**2)
    return alpha * eps - sigma * alpha * x0          # v = alpha_t eps - sigma_t x0 (VP)


class TorchModel:
    """The model on diffusers' side: (x_vp, scalar timestep tensor) -> raw output; records what it saw."""

    def __init__(self, table, prediction_type):
        self.table = torch.from_numpy(np.asarray(table, np.float32))
        self.prediction_type, self.seen = prediction_type, []

    def __call__(self, x_vp, t):
        self.seen.append(float(t))
        t = torch.as_tensor(t, dtype=torch.float32).clamp(0, len(self.table) - 1)
        low = t.floor().long().clamp(max=len(self.table) - 2)
        frac = t - low
        sigma = self.table[low] * (1 - frac) + self.table[low + 1] * frac
        return _finish(x_vp, t, sigma, MIXTURE.denoise_torch, self.prediction_type, torch.sin, torch.tanh,
                       torch.sqrt)


class JaxModel:
    """The same model as a sdjax model_fn (x_vp, t of shape (batch,)); records t through a host callback."""

    def __init__(self, table, prediction_type):
        self.table = np.asarray(table, np.float32)
        self.prediction_type, self.seen = prediction_type, []

    def _record(self, t):
        self.seen.append(float(t))

    def __call__(self, x_vp, t):
        jax.debug.callback(self._record, t[0])
        t = t[0]
        sigma = jnp.interp(t, jnp.arange(len(self.table), dtype=jnp.float32), jnp.asarray(self.table))
        return _finish(x_vp, t, sigma, MIXTURE.denoise_jax, self.prediction_type, jnp.sin, jnp.tanh, jnp.sqrt)


# ---- the two runs ----------------------------------------------------------------------------------------------

def our_noise(steps):
    """The per-step noise sdjax's stochastic samplers draw from KEY."""
    x = jnp.asarray(NOISE)
    return [np.asarray(step_noise(KEY, i, x)) for i in range(steps)]


def run_diffusers(config, steps, monkeypatch, noisy=False):
    """StableDiffusionPipeline's denoising loop around the scheduler -> (final latents, model)."""
    scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    if noisy:   # every noise draw of the scheduler replays ours, in order
        feed = iter(our_noise(2 * steps))
        module = __import__(type(scheduler).__module__, fromlist=["randn_tensor"])
        monkeypatch.setattr(module, "randn_tensor", lambda *args, **kwargs: torch.from_numpy(next(feed)))
    model = TorchModel(schedules.sigma_table(scheduler.alphas_cumprod.double().numpy()),
                       scheduler.config.prediction_type)
    scheduler.set_timesteps(steps)
    latents = torch.from_numpy(NOISE) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        output = model(scheduler.scale_model_input(latents, t), t)
        latents = scheduler.step(output, t, latents, return_dict=False)[0]
    return latents.numpy(), model


def run_sdjax(config, steps):
    """The plan run as sdjax.generation runs it -> (final latents, plan, model)."""
    resolved = resolve_config(config)
    alphas_cumprod = schedules.alphas_cumprod_from_config(resolved)
    plan = plan_from_scheduler_config(config, steps, alphas_cumprod)
    model = JaxModel(schedules.sigma_table(alphas_cumprod), resolved["prediction_type"])
    model_fn = model
    if plan.model_timesteps is not None:
        model_fn = pin_timesteps(model, alphas_cumprod, plan.model_timesteps, plan.quantize_timesteps)
    denoise = discrete_denoiser(model_fn, alphas_cumprod, resolved["prediction_type"],
                                quantize=plan.quantize_timesteps)
    sigmas = jnp.asarray(plan.sigmas, jnp.float32)
    x = jnp.asarray(NOISE) * jnp.float32(plan.start_noise_sigma)
    x = get_sampler(plan.sampler)(denoise, x, sigmas, KEY, **dict(plan.options))
    latents = x if plan.ve_latents else to_vp(x, sigmas[-1])
    jax.effects_barrier()
    return np.asarray(latents), plan, model


def relative_l2(ours, reference):
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))


def check_parity(config, steps, monkeypatch, *, noisy=False, tolerance=TOLERANCE, skipped=0,
                 timestep_tolerance=TIMESTEP_TOLERANCE):
    """Final latents within `tolerance`, the same timesteps seen, plan.nfe evaluations on both sides
    (diffusers' last `skipped` evaluations feed a zero-length final step that sdjax leaves out)."""
    reference, theirs = run_diffusers(config, steps, monkeypatch, noisy)
    ours, plan, model = run_sdjax(config, steps)
    error = relative_l2(ours, reference)
    print(f"{config['_class_name']} {steps} steps -> {plan.sampler}: rel L2 {error:.2e}, nfe {len(model.seen)}"
          f" (diffusers {len(theirs.seen)})")
    assert len(model.seen) == plan.nfe == len(theirs.seen) - skipped
    np.testing.assert_allclose(model.seen, theirs.seen[:plan.nfe], atol=timestep_tolerance, rtol=0)
    assert error < tolerance, f"relative L2 {error:.2e}"
    return plan


# ---- deterministic parity ---------------------------------------------------------------------------------------

DETERMINISTIC = {
    "sd15_pndm": (SD15_PNDM, 25),
    "sd15_pndm_10": (SD15_PNDM, 10),
    "pndm_set_alpha_to_one": (dict(SD15_PNDM, set_alpha_to_one=True), 20),
    "sd21_ddim_v": (SD21_DDIM, 25),
    "ddim_trailing_uneven_stride": (plain("DDIMScheduler", clip_sample=False, timestep_spacing="trailing"), 15),
    "ddim_linspace": (plain("DDIMScheduler", clip_sample=False, timestep_spacing="linspace"), 12),
    "euler_linspace": (plain("EulerDiscreteScheduler"), 25),
    "euler_leading_v": (sd15_as("EulerDiscreteScheduler", prediction_type="v_prediction"), 20),
    "euler_karras": (sd15_as("EulerDiscreteScheduler", use_karras_sigmas=True), 20),
    "euler_log_linear": (plain("EulerDiscreteScheduler", interpolation_type="log_linear"), 12),
    "euler_zero_snr_trailing": (plain("EulerDiscreteScheduler", rescale_betas_zero_snr=True,
                                      timestep_spacing="trailing", prediction_type="v_prediction"), 15),
    "euler_beta_sigmas_sample": (plain("EulerDiscreteScheduler", use_beta_sigmas=True, prediction_type="sample"),
                                 10),
    "heun_linspace": (plain("HeunDiscreteScheduler"), 15),
    "heun_leading": (sd15_as("HeunDiscreteScheduler"), 12),
    "lms_linspace": (plain("LMSDiscreteScheduler"), 20),
    "lms_leading_karras": (sd15_as("LMSDiscreteScheduler", use_karras_sigmas=True), 15),
    "kdpm2_linspace": (plain("KDPM2DiscreteScheduler"), 12),
    "kdpm2_leading": (sd15_as("KDPM2DiscreteScheduler"), 12),
    "kdpm2_karras": (sd15_as("KDPM2DiscreteScheduler", use_karras_sigmas=True), 12),
    "dpmpp_2m": (sd15_as("DPMSolverMultistepScheduler"), 20),
    "dpmpp_2m_karras": (sd15_as("DPMSolverMultistepScheduler", use_karras_sigmas=True), 20),
    "dpmpp_2m_linspace_v": (plain("DPMSolverMultistepScheduler", prediction_type="v_prediction"), 12),
    "dpmpp_2m_heun_euler_at_final": (plain("DPMSolverMultistepScheduler", solver_type="heun",
                                           euler_at_final=True), 16),
    "dpmpp_2m_zero_snr": (plain("DPMSolverMultistepScheduler", rescale_betas_zero_snr=True,
                                timestep_spacing="trailing", prediction_type="v_prediction"), 12),
    "dpmpp_3m_sigma_min": (plain("DPMSolverMultistepScheduler", solver_order=3, final_sigmas_type="sigma_min"), 12),
    "dpmpp_1": (plain("DPMSolverMultistepScheduler", solver_order=1), 10),
    "dpmpp_2m_lu": (plain("DPMSolverMultistepScheduler", use_lu_lambdas=True), 15),
    "dpmpp_2m_exponential": (plain("DPMSolverMultistepScheduler", use_exponential_sigmas=True), 15),
    "dpmpp_2s": (plain("DPMSolverSinglestepScheduler"), 20),
    "dpmpp_2s_odd": (plain("DPMSolverSinglestepScheduler"), 15),
    "dpmpp_3s": (plain("DPMSolverSinglestepScheduler", solver_order=3), 20),
    "dpmpp_3s_heun_karras": (plain("DPMSolverSinglestepScheduler", solver_order=3, solver_type="heun",
                                   use_karras_sigmas=True), 16),
    "dpmpp_2s_heun_sigma_min": (plain("DPMSolverSinglestepScheduler", solver_type="heun",
                                      final_sigmas_type="sigma_min"), 16),
    "unipc": (sd15_as("UniPCMultistepScheduler"), 20),
    "unipc_3_karras": (plain("UniPCMultistepScheduler", solver_order=3, use_karras_sigmas=True), 15),
    "unipc_bh1_sigma_min": (plain("UniPCMultistepScheduler", solver_type="bh1", final_sigmas_type="sigma_min"), 12),
    "unipc_exponential": (plain("UniPCMultistepScheduler", use_exponential_sigmas=True), 10),
    "deis": (sd15_as("DEISMultistepScheduler"), 20),
    "deis_3": (plain("DEISMultistepScheduler", solver_order=3), 12),
}

# Grids whose last step diffusers takes with zero length (one evaluation, no change): sdjax leaves it out.
ZERO_LENGTH_FINAL_STEP = {
    "euler_sigma_min_final": (plain("EulerDiscreteScheduler", final_sigmas_type="sigma_min"), 12),
    "dpmpp_2m_karras_sigma_min": (plain("DPMSolverMultistepScheduler", use_karras_sigmas=True,
                                        final_sigmas_type="sigma_min"), 12),
    "deis_karras": (plain("DEISMultistepScheduler", use_karras_sigmas=True), 12),
}


@pytest.mark.parametrize("case", list(DETERMINISTIC))
def test_matches_diffusers(case, monkeypatch):
    check_parity(*DETERMINISTIC[case], monkeypatch)


@pytest.mark.parametrize("case", list(ZERO_LENGTH_FINAL_STEP))
def test_zero_length_final_step_is_left_out(case, monkeypatch):
    config, steps = ZERO_LENGTH_FINAL_STEP[case]
    assert check_parity(config, steps, monkeypatch, skipped=1).steps == steps - 1


def test_ddim_zero_terminal_snr_is_off_by_the_sigma_floor(monkeypatch):
    """diffusers' DDIM takes alpha_bar = 0 at the last timestep (sigma = inf), which VE scaling cannot hold:
    sdjax floors it at 2^-24 (sigma = 4096) as diffusers' Euler and DPM-Solver classes do, an error of order
    1 / 4096 in the first x0 estimate."""
    config = dict(SD21_DDIM, rescale_betas_zero_snr=True, timestep_spacing="trailing")
    check_parity(config, 20, monkeypatch, tolerance=2e-4)


# ---- stochastic classes: the same noise in, the same latents out ----------------------------------------------

STOCHASTIC = {
    "euler_ancestral": (plain("EulerAncestralDiscreteScheduler"), 20, "euler_ancestral"),
    "euler_ancestral_leading_v": (sd15_as("EulerAncestralDiscreteScheduler", prediction_type="v_prediction"), 12,
                                  "euler_ancestral"),
    "kdpm2_ancestral": (sd15_as("KDPM2AncestralDiscreteScheduler"), 12, "dpm_2_ancestral"),
    "kdpm2_ancestral_linspace": (plain("KDPM2AncestralDiscreteScheduler"), 12, "dpm_2_ancestral"),
    "ddpm": (plain("DDPMScheduler", clip_sample=False), 20, "ddpm"),
    "ddpm_trailing_v": (plain("DDPMScheduler", clip_sample=False, timestep_spacing="trailing",
                              prediction_type="v_prediction"), 15, "ddpm"),
    "dpmpp_2m_sde_karras": (sd15_as("DPMSolverMultistepScheduler", algorithm_type="sde-dpmsolver++",
                                    use_karras_sigmas=True), 20, "dpmpp_2m_sde"),
    "dpmpp_sde_order_1": (sd15_as("DPMSolverMultistepScheduler", algorithm_type="sde-dpmsolver++", solver_order=1),
                          12, "euler_ancestral"),
    "dpmpp_2s_sde": (plain("DPMSolverSinglestepScheduler", algorithm_type="sde-dpmsolver++"), 12,
                     "dpmpp_singlestep"),
    "dpmpp_3s_sde": (plain("DPMSolverSinglestepScheduler", algorithm_type="sde-dpmsolver++", solver_order=3), 12,
                     "dpmpp_singlestep"),
}


@pytest.mark.parametrize("case", list(STOCHASTIC))
def test_stochastic_matches_diffusers_with_the_same_noise(case, monkeypatch):
    config, steps, sampler = STOCHASTIC[case]
    # KDPM2 a's midpoint is the next grid sigma, where diffusers' linspace grid gives the model a linearly
    # interpolated t and the midpoint a log-interpolated one, ~1e-3 apart: sdjax gives both the grid point's.
    timestep_tolerance = 2e-3 if case == "kdpm2_ancestral_linspace" else TIMESTEP_TOLERANCE
    plan = check_parity(config, steps, monkeypatch, noisy=True, timestep_tolerance=timestep_tolerance)
    assert plan.sampler == sampler


# ---- what the plans say ---------------------------------------------------------------------------------------

def plan_for(config, steps=20):
    return plan_from_scheduler_config(config, steps, schedules.alphas_cumprod_from_config(resolve_config(config)))


@pytest.mark.parametrize("config, sampler, options, quantize", [
    (SD15_PNDM, "pndm", {}, False),
    (SD21_DDIM, "ddim", {}, False),
    (sd15_as("DPMSolverMultistepScheduler", use_karras_sigmas=True), "dpmpp_2m",
     dict(solver_type="midpoint", lower_order_final=False, euler_at_final=False), True),
    (sd15_as("DPMSolverMultistepScheduler", algorithm_type="sde-dpmsolver++", use_karras_sigmas=True),
     "dpmpp_2m_sde", dict(eta=1.0, solver_type="midpoint", lower_order_final=False, euler_at_final=False), True),
    (plain("DPMSolverMultistepScheduler", solver_order=3), "dpmpp_3m_sde",
     dict(eta=0.0, solver_type="midpoint", lower_order_final=False, euler_at_final=False), False),
    (sd15_as("EulerAncestralDiscreteScheduler"), "euler_ancestral", {}, False),
    (sd15_as("KDPM2AncestralDiscreteScheduler"), "dpm_2_ancestral", {}, False),
    (plain("UniPCMultistepScheduler", disable_corrector=[0]), "unipc",
     dict(order=2, variant="bh2", lower_order_final=True, disable_corrector=(0,)), False),
    (plain("DEISMultistepScheduler"), "deis", dict(order=2, lower_order_final=False), False),
])
def test_plan_names_the_equivalent_sampler(config, sampler, options, quantize):
    plan = plan_for(config)
    assert (plan.sampler, dict(plan.options), plan.quantize_timesteps) == (sampler, options, quantize)


def test_lower_order_final_applies_below_15_steps():
    assert dict(plan_for(plain("DPMSolverMultistepScheduler"), 14).options)["lower_order_final"]
    assert not dict(plan_for(plain("DPMSolverMultistepScheduler"), 15).options)["lower_order_final"]


@pytest.mark.parametrize("config, expected", [
    # VP schedulers start from unit VP noise: sqrt(1 + sigma_0^2) in VE scaling; the Euler family from sigma_max,
    # or from sqrt(sigma_max^2 + 1) with leading spacing.
    (SD15_PNDM, lambda sigma: math.sqrt(1 + sigma**2)),
    (plain("EulerDiscreteScheduler"), lambda sigma: sigma),
    (sd15_as("EulerDiscreteScheduler"), lambda sigma: math.sqrt(1 + sigma**2)),
    (plain("HeunDiscreteScheduler", timestep_spacing="trailing"), lambda sigma: sigma),
])
def test_initial_noise_scale(config, expected):
    plan = plan_for(config)
    assert plan.start_noise_sigma == pytest.approx(expected(plan.sigmas[0]), rel=1e-12)


@pytest.mark.parametrize("steps, order, lower_order_final, final", [
    (steps, order, lower, final) for steps in (1, 2, 3, 4, 5, 6, 7, 12) for order in (1, 2, 3)
    for lower in (False, True) for final in ("zero", "sigma_min")])
def test_singlestep_orders_match_diffusers(steps, order, lower_order_final, final):
    scheduler = diffusers.DPMSolverSinglestepScheduler(solver_order=order, lower_order_final=lower_order_final,
                                                       final_sigmas_type=final)
    scheduler.set_timesteps(steps)
    ours = singlestep_orders(steps, order, lower_order_final or final == "zero")
    if final == "zero":       # the sampler itself makes the step into sigma = 0 first order
        ours[-1] = 1
    assert ours == scheduler.order_list


def test_pinned_timesteps_reach_the_model_exactly():
    """Euler's linspace grid interpolates sigma linearly at fractional timesteps; the model must see those
    timesteps, not the log-sigma interpolation of its sigma."""
    config = plain("EulerDiscreteScheduler")
    alphas_cumprod = schedules.alphas_cumprod_from_config(resolve_config(config))
    plan = plan_from_scheduler_config(config, 25, alphas_cumprod)
    assert plan.model_timesteps is not None and not plan.quantize_timesteps
    seen = []

    @jax.jit   # the rows are a traced input, as generation would pass them
    def timestep_seen(rows, sigma):
        model_fn = pin_timesteps(lambda x_vp, t: seen.append(t) or x_vp, alphas_cumprod, rows)
        discrete_denoiser(model_fn, alphas_cumprod)(jnp.zeros((1, 2)), sigma)
        return seen.pop()
    got = [timestep_seen(plan.model_timesteps, jnp.float32(sigma)) for sigma in plan.sigmas[:-1]]
    np.testing.assert_allclose(np.concatenate(got), np.linspace(999, 0, 25), atol=2e-4, rtol=0)


# ---- errors -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config, culprit", [
    (dict(_class_name="FlowMatchEulerDiscreteScheduler"), "_class_name='FlowMatchEulerDiscreteScheduler'"),
    ({}, "_class_name=None"),
    (plain("DDIMScheduler"), "clip_sample=True"),          # DDIM's and DDPM's default
    (plain("DDPMScheduler", clip_sample=False, thresholding=True), "thresholding=True"),
    (plain("DDPMScheduler", clip_sample=False, variance_type="fixed_large"), "variance_type='fixed_large'"),
    (plain("EulerDiscreteScheduler", prediction_type="flow_prediction"), "prediction_type='flow_prediction'"),
    (plain("EulerDiscreteScheduler", timestep_spacing="uniform"), "timestep_spacing='uniform'"),
    (plain("EulerDiscreteScheduler", interpolation_type="cubic"), "interpolation_type='cubic'"),
    (plain("EulerDiscreteScheduler", timestep_type="continuous", prediction_type="v_prediction"),
     "timestep_type='continuous'"),
    (plain("EulerDiscreteScheduler", use_karras_sigmas=True, use_beta_sigmas=True), "use_karras_sigmas and"),
    (plain("KDPM2AncestralDiscreteScheduler", use_karras_sigmas=True), "two different timesteps"),
    (plain("PNDMScheduler"), "skip_prk_steps=False"),
    (dict(SD15_PNDM, prediction_type="v_prediction"), "prediction_type='v_prediction'"),
    (dict(SD15_PNDM, timestep_spacing="trailing"), "timestep_spacing='trailing' at steps=12"),
    (plain("DPMSolverMultistepScheduler", algorithm_type="dpmsolver"), "algorithm_type='dpmsolver'"),
    (plain("DPMSolverMultistepScheduler", algorithm_type="sde-dpmsolver++", solver_order=3), "solver_order=3"),
    (plain("DPMSolverMultistepScheduler", solver_order=4), "solver_order=4"),
    (plain("DPMSolverMultistepScheduler", lambda_min_clipped=-5.1), "lambda_min_clipped=-5.1"),
    (plain("DPMSolverMultistepScheduler", variance_type="learned_range"), "variance_type='learned_range'"),
    (plain("DPMSolverMultistepScheduler", use_flow_sigmas=True), "use_flow_sigmas=True"),
    (plain("DPMSolverMultistepScheduler", solver_order=3, use_karras_sigmas=True, final_sigmas_type="sigma_min"),
     "solver_order=3"),
    (plain("DPMSolverSinglestepScheduler", algorithm_type="sde-dpmsolver++", solver_order=3, solver_type="heun"),
     "solver_type='heun'"),
    (plain("UniPCMultistepScheduler", predict_x0=False), "predict_x0=False"),
    (plain("UniPCMultistepScheduler", use_karras_sigmas=True, final_sigmas_type="sigma_min"),
     "final_sigmas_type='zero'"),
    (plain("DEISMultistepScheduler", solver_order=3, use_karras_sigmas=True), "solver_order=3"),
    (sd15_as("DDIMScheduler", clip_sample=False, steps_offset=100), "steps_offset=100"),
])
def test_unsupported_settings_are_config_errors(config, culprit):
    alphas_cumprod = schedules.alphas_cumprod_from_config(SD_BETAS)
    with pytest.raises(ConfigError, match=culprit.replace("(", r"\(").replace("+", r"\+")):
        plan_from_scheduler_config(config, 12, alphas_cumprod)


def test_schedule_length_must_match_the_config():
    with pytest.raises(ConfigError, match="num_train_timesteps"):
        plan_from_scheduler_config(SD15_PNDM, 20, schedules.alphas_cumprod_from_config(dict(num_train_timesteps=500)))


@pytest.mark.parametrize("steps", [0, -3, 2.5, True])
def test_steps_must_be_a_positive_integer(steps):
    with pytest.raises(ConfigError, match="steps"):
        plan_from_scheduler_config(SD15_PNDM, steps, schedules.alphas_cumprod_from_config(SD_BETAS))


def test_class_defaults_fill_missing_keys():
    """Heun and KDPM2 default to Stable Diffusion's betas, the other classes to DDPM's."""
    assert resolve_config({"_class_name": "HeunDiscreteScheduler"})["beta_start"] == 0.00085
    assert resolve_config({"_class_name": "EulerDiscreteScheduler"})["beta_start"] == 0.0001
    assert resolve_config({"_class_name": "DDIMScheduler"})["timestep_spacing"] == "leading"
    # diffusers renames another class's solver_type when loading it, and so does sdjax
    assert resolve_config({"_class_name": "DPMSolverMultistepScheduler", "solver_type": "bh2"})["solver_type"] == \
        "midpoint"


# ---- the two samplers diffusers_solvers.py adds --------------------------------------------------------------

def test_ddim_fixed_stride_with_next_sigmas_as_targets_is_ddim():
    sigmas = jnp.asarray(np.append(np.geomspace(14.6, 0.03, 10), 0.0), jnp.float32)
    x = jnp.asarray(NOISE) * sigmas[0]
    ours = get_sampler("ddim_fixed_stride")(MIXTURE.denoise_jax, x, sigmas, targets=tuple(np.asarray(sigmas[1:])))
    np.testing.assert_allclose(ours, get_sampler("ddim")(MIXTURE.denoise_jax, x, sigmas), rtol=1e-6, atol=1e-6)


def test_dpmpp_singlestep_of_order_1_is_euler():
    sigmas = jnp.asarray(np.append(np.geomspace(14.6, 0.03, 10), 0.0), jnp.float32)
    x = jnp.asarray(NOISE) * sigmas[0]
    ours = get_sampler("dpmpp_singlestep")(MIXTURE.denoise_jax, x, sigmas, order=1)
    np.testing.assert_allclose(ours, get_sampler("euler")(MIXTURE.denoise_jax, x, sigmas), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, options", [
    ("dpmpp_singlestep", dict(order=3, solver_type="heun")),
    ("dpmpp_singlestep", dict(order=2, eta=1.0)),
    ("ddim_fixed_stride", dict(targets=tuple(np.geomspace(9.0, 0.02, 7).tolist()) + (0.0,), eta=0.5)),
])
def test_new_samplers_trace_once_for_any_grid_of_the_same_length(name, options):
    traces = []

    def denoise(x, sigma):
        traces.append(1)
        return MIXTURE.denoise_jax(x, sigma)
    run = jax.jit(lambda x, sigmas: get_sampler(name)(denoise, x, sigmas, KEY, **options))
    first = run(jnp.asarray(NOISE), jnp.asarray(np.append(np.geomspace(10.0, 0.03, 8), 0.0), jnp.float32))
    traced = len(traces)
    second = run(jnp.asarray(NOISE), jnp.asarray(np.append(np.geomspace(14.0, 0.05, 8), 0.0), jnp.float32))
    assert len(traces) == traced <= 2
    assert np.all(np.isfinite(first)) and np.all(np.isfinite(second))


@pytest.mark.parametrize("name, options, culprit", [
    ("dpmpp_singlestep", dict(order=4), "order"),
    ("dpmpp_singlestep", dict(solver_type="bh2"), "solver_type"),
    ("dpmpp_singlestep", dict(orders=2), "orders"),
    ("ddim_fixed_stride", dict(targets=(1.0,)), "targets"),
    ("ddim_fixed_stride", dict(targets=(1.0, 0.0), eta=-1.0), "eta"),
])
def test_new_samplers_name_a_bad_option(name, options, culprit):
    from sdjax.errors import InvalidArgumentError
    with pytest.raises(InvalidArgumentError, match=culprit):
        get_sampler(name)(MIXTURE.denoise_jax, jnp.zeros((2, 2)), jnp.array([2.0, 1.0, 0.0]), KEY, **options)


@pytest.mark.parametrize("name, options", [("dpmpp_singlestep", dict(eta=1.0)),
                                           ("ddim_fixed_stride", dict(targets=(1.0, 0.0), eta=1.0))])
def test_new_samplers_need_a_key_to_draw_noise(name, options):
    from sdjax.errors import InvalidArgumentError
    with pytest.raises(InvalidArgumentError, match="key"):
        get_sampler(name)(MIXTURE.denoise_jax, jnp.zeros((2, 2)), jnp.array([2.0, 1.0, 0.0]), **options)
