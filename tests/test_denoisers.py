"""sdjax.denoisers against k-diffusion's DiscreteEpsDDPMDenoiser / DiscreteVDDPMDenoiser (float64), diffusers'
EulerDiscreteScheduler scale_model_input + step (all prediction types, float32), diffusers' _sigma_to_t, and
diffusers' StableDiffusionPipeline guidance arithmetic (CFG + rescale_noise_cfg)."""
from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sdjax import denoisers as D
from sdjax import parameterization as P
from sdjax import schedules as S
from sdjax.errors import InvalidArgumentError
from tests import kdiffusion_ref

diffusers = pytest.importorskip("diffusers")

SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
ALPHA_BAR = S.alphas_cumprod_from_config(SD)
TABLE = S.sigma_table(ALPHA_BAR)
# Per-sample noise levels: table entries, points between entries, and values beyond both ends (these clamp
# to t = 0 / 999). One batch row per sigma keeps every comparison to a single (compiled) call.
SIGMAS = np.array([TABLE[0], TABLE[1], 0.5 * (TABLE[10] + TABLE[11]), 1.0, TABLE[500], 7.3, TABLE[-1],
                   0.01, 20.0])
SHAPE = (len(SIGMAS), 4, 4, 2)  # NHWC


def torch_model(x, t, context=None):
    """A smooth stand-in U-Net (NCHW-agnostic: acts elementwise, t per sample)."""
    t = t.to(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))  # k-diffusion's quantized t is int64
    out = torch.tanh(x) * (1 + t / 1000) + 0.1 * torch.cos(t / 100)
    return out if context is None else out + context.reshape(out.shape[:1] + (1,) * (x.ndim - 2) + (-1,))


def jax_model(x, t, context=None):
    t = t.reshape((-1,) + (1,) * (x.ndim - 1))
    out = jnp.tanh(x) * (1 + t / 1000) + 0.1 * jnp.cos(t / 100)
    return out if context is None else out + context.reshape(out.shape[:1] + (1,) * (x.ndim - 2) + (-1,))


def kdiffusion_external():
    package = kdiffusion_ref.load().__name__.rsplit(".", 1)[0]
    return importlib.import_module(f"{package}.external")


def max_rel(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    return float(np.max(np.abs(actual - expected) / np.maximum(np.abs(expected), 1e-12)))


def sample_x(dtype, seed=0):
    return np.random.default_rng(seed).normal(size=SHAPE).astype(dtype) * 3.0


# ------------------------------------------------------------------------------------------ sigma -> t

def test_sigma_to_t_matches_diffusers_in_float64():
    scheduler = diffusers.EulerDiscreteScheduler(**SD)
    log_sigmas = np.log(TABLE)
    sigmas = np.concatenate([SIGMAS, S.karras(30, TABLE[0], TABLE[-1])[:-1], np.geomspace(1e-3, 100, 50)])
    reference = scheduler._sigma_to_t(sigmas, log_sigmas)
    with jax.enable_x64(True):
        ours = np.asarray(P.sigma_to_t(jnp.asarray(sigmas), jnp.asarray(log_sigmas)))
    assert ours.dtype == np.float64
    np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("x64", [False, True])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_table_sigmas_map_to_exact_integer_timesteps(x64, zero_snr):
    alpha_bar = S.alphas_cumprod_from_config({**SD, "rescale_betas_zero_snr": zero_snr})
    table = S.sigma_table(alpha_bar)

    def timestep_model(x, t):  # with "sample" prediction, D(x, sigma) = t
        return jnp.broadcast_to(t[:, None], x.shape)

    with jax.enable_x64(x64):
        dtype = jnp.float64 if x64 else jnp.float32
        denoise = jax.jit(D.discrete_denoiser(timestep_model, alpha_bar, "sample"))
        for t in [0, 1, 2, 500, 998, 999]:
            ours = denoise(jnp.zeros((2, 1), dtype), jnp.asarray(table[t], dtype))
            assert ours.dtype == dtype
            np.testing.assert_array_equal(ours, t)
        assert denoise._cache_size() == 1  # sigma is traced


def test_quantized_sigma_to_t_matches_kdiffusion():
    external = kdiffusion_external()
    schedule = external.DiscreteSchedule(torch.from_numpy(TABLE), quantize=True)
    sigmas = np.concatenate([SIGMAS, np.geomspace(0.02, 20, 200)])
    reference = schedule.sigma_to_t(torch.from_numpy(sigmas)).numpy()
    with jax.enable_x64(True):
        ours = np.asarray(P.sigma_to_t(jnp.asarray(sigmas), jnp.log(jnp.asarray(TABLE)), quantize=True))
    np.testing.assert_array_equal(ours, reference)


# ---------------------------------------------------------------------------------- denoiser parity

@pytest.mark.parametrize("prediction_type,wrapper", [
    ("epsilon", "DiscreteEpsDDPMDenoiser"), ("v_prediction", "DiscreteVDDPMDenoiser")])
@pytest.mark.parametrize("quantize", [False, True])
def test_discrete_denoiser_matches_kdiffusion_in_float64(prediction_type, wrapper, quantize):
    reference_denoiser = getattr(kdiffusion_external(), wrapper)(torch_model, torch.from_numpy(ALPHA_BAR), quantize)
    x = sample_x(np.float64)
    reference = reference_denoiser(torch.from_numpy(x), torch.from_numpy(SIGMAS)).numpy()
    reference_scalar = reference_denoiser(torch.from_numpy(x), torch.full((len(x),), 7.3, dtype=torch.float64))
    with jax.enable_x64(True):
        denoise = jax.jit(D.discrete_denoiser(jax_model, ALPHA_BAR, prediction_type, quantize=quantize))
        ours = np.asarray(denoise(jnp.asarray(x), jnp.asarray(SIGMAS)))
        scalar = np.asarray(denoise(jnp.asarray(x), jnp.asarray(7.3)))  # t broadcast over the batch
    assert ours.dtype == np.float64
    assert max_rel(ours, reference) <= 1e-6
    assert max_rel(scalar, reference_scalar.numpy()) <= 1e-6


@pytest.mark.parametrize("prediction_type", list(P.PARAMETERIZATIONS))
@pytest.mark.parametrize("spacing,karras", [("leading", False), ("trailing", False), ("linspace", True)])
def test_discrete_denoiser_matches_diffusers_euler_in_float32(prediction_type, spacing, karras):
    """Model input (scale_model_input), timestep and x0 (step's pred_original_sample) at every step."""
    scheduler = diffusers.EulerDiscreteScheduler(**SD, prediction_type=prediction_type, timestep_spacing=spacing,
                                                 steps_offset=1, use_karras_sigmas=karras)
    scheduler.alphas_cumprod = torch.from_numpy(ALPHA_BAR)  # same table; only the conversions are compared
    scheduler.set_timesteps(12)
    seen = {}

    def recording_model(x_vp, t):
        seen.update(x_vp=x_vp, t=t)
        return jax_model(x_vp, t)

    denoise = D.discrete_denoiser(recording_model, ALPHA_BAR, prediction_type)
    x = torch.from_numpy(sample_x(np.float32))
    for i, t in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(x, t)
        raw = torch_model(model_input, t.expand(x.shape[0]))
        reference = scheduler.step(raw, t, x).pred_original_sample
        ours = denoise(jnp.asarray(x.numpy()), jnp.asarray(scheduler.sigmas[i].item(), jnp.float32))
        assert ours.dtype == jnp.float32
        np.testing.assert_allclose(seen["t"], np.full(len(x), t.item()), rtol=0, atol=0 if not karras else 2e-3)
        np.testing.assert_allclose(seen["x_vp"], model_input.numpy(), rtol=2e-6, atol=1e-6)
        np.testing.assert_allclose(ours, reference.numpy(), rtol=2e-5, atol=1e-5)


def test_unknown_prediction_type_is_rejected():
    with pytest.raises(InvalidArgumentError, match="unknown prediction_type 'eps'; valid: epsilon, v_prediction, "
                                                   "sample"):
        D.discrete_denoiser(jax_model, ALPHA_BAR, "eps")


# ------------------------------------------------------------------------------------ VP <-> VE helpers

def test_vp_helpers_invert_the_kdiffusion_table():
    alpha_bar = diffusers.DDIMScheduler(**SD).alphas_cumprod.double()
    sigma = ((1 - alpha_bar) / alpha_bar) ** 0.5  # k-diffusion's DiscreteSchedule table
    with jax.enable_x64(True):
        np.testing.assert_allclose(P.alpha_bar_from_sigma(jnp.asarray(sigma.numpy())), alpha_bar.numpy(),
                                   rtol=1e-12)
        np.testing.assert_allclose(P.sigma_from_alpha_bar(jnp.asarray(alpha_bar.numpy())), sigma.numpy(),
                                   rtol=1e-12)
        x = jnp.asarray(sample_x(np.float64)[:3])
        sigma_b = jnp.asarray([0.1, 2.0, 14.0])
        np.testing.assert_allclose(P.from_vp(P.to_vp(x, sigma_b), sigma_b), x, rtol=1e-12)


# ------------------------------------------------------------------------------ classifier-free guidance

def diffusers_guided_torch_model(cond, uncond, guidance_scale, guidance_rescale):
    """The raw-output guidance of diffusers' StableDiffusionPipeline.__call__, as a torch model."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    def model(x_in, t):
        out_uncond, out_cond = torch_model(torch.cat([x_in] * 2), torch.cat([t] * 2),
                                           torch.cat([uncond, cond])).chunk(2)
        guided = out_uncond + guidance_scale * (out_cond - out_uncond)
        return rescale_noise_cfg(guided, out_cond, guidance_rescale) if guidance_rescale > 0 else guided

    return model


@pytest.mark.parametrize("prediction_type,wrapper", [
    ("epsilon", "DiscreteEpsDDPMDenoiser"), ("v_prediction", "DiscreteVDDPMDenoiser")])
@pytest.mark.parametrize("guidance_rescale", [0.0, 0.7])
def test_cfg_denoiser_matches_diffusers_guidance_in_float64(prediction_type, wrapper, guidance_rescale):
    rng = np.random.default_rng(1)
    cond, uncond = rng.normal(size=(len(SIGMAS), 2)), rng.normal(size=(len(SIGMAS), 2)) * 0.1
    guidance_scale = 7.5
    reference_model = diffusers_guided_torch_model(torch.from_numpy(cond), torch.from_numpy(uncond),
                                                   guidance_scale, guidance_rescale)
    reference_denoiser = getattr(kdiffusion_external(), wrapper)(reference_model, torch.from_numpy(ALPHA_BAR), False)
    x = sample_x(np.float64)
    reference = reference_denoiser(torch.from_numpy(x), torch.from_numpy(SIGMAS)).numpy()
    with jax.enable_x64(True):
        denoise = D.cfg_denoiser(jax_model, ALPHA_BAR, {"context": jnp.asarray(cond)},
                                 {"context": jnp.asarray(uncond)}, guidance_scale,
                                 guidance_rescale=guidance_rescale, prediction_type=prediction_type)
        ours = np.asarray(jax.jit(denoise)(jnp.asarray(x), jnp.asarray(SIGMAS)))
    assert max_rel(ours, reference) <= 1e-6


def test_cfg_makes_one_batched_call_uncond_first():
    calls = []

    def model(x, t, context):
        calls.append((x.shape, t.shape, np.asarray(context)))
        return jax_model(x, t, context)

    x = jnp.ones((3, 4, 4, 2))
    cond, uncond = jnp.ones((3, 2)), jnp.zeros((3, 2))
    D.cfg_denoiser(model, ALPHA_BAR, {"context": cond}, {"context": uncond}, 5.0)(x, 1.0)
    assert len(calls) == 1
    x_shape, t_shape, context = calls[0]
    assert x_shape == (6, 4, 4, 2) and t_shape == (6,)
    np.testing.assert_array_equal(context, np.concatenate([np.zeros((3, 2)), np.ones((3, 2))]))


def test_guidance_scale_and_rescale_are_traced():
    traces = []

    def model(x, t, context):
        traces.append(None)
        return jax_model(x, t, context)

    cond, uncond = jnp.asarray([[0.5, -1.0]] * 3), jnp.zeros((3, 2))  # changes the output's spread

    @jax.jit
    def run(x, sigma, guidance_scale, guidance_rescale):
        return D.cfg_denoiser(model, ALPHA_BAR, {"context": cond}, {"context": uncond}, guidance_scale,
                              guidance_rescale=guidance_rescale)(x, sigma)

    x = jnp.asarray(sample_x(np.float32)[:3])
    outputs = [run(x, 2.0, g, r) for g, r in [(1.0, 0.0), (7.5, 0.0), (7.5, 0.7), (jnp.asarray([1.0, 7.5, 7.5]), 0.0)]]
    assert len(traces) == 2  # scalar scales, then (batch,) scales: one trace each, whatever the values
    np.testing.assert_allclose(outputs[0], D.discrete_denoiser(jax_model, ALPHA_BAR)(x, 2.0, context=cond),
                               atol=1e-6)  # guidance scale 1: the conditional prediction
    assert not np.allclose(outputs[1], outputs[2])
    per_sample = np.asarray(outputs[3])  # sample i guided with its own scale
    np.testing.assert_allclose(per_sample[0], outputs[0][0], rtol=1e-6)
    np.testing.assert_allclose(per_sample[1:], outputs[1][1:], rtol=1e-6)


def test_rescale_guidance_leaves_constant_output_finite():
    guided = jnp.ones((2, 3, 3, 1))
    np.testing.assert_array_equal(D.rescale_guidance(guided, guided * 2, 0.7), guided)


def test_guidance_runs_in_the_sampler_dtype_for_a_bfloat16_model():
    def bf16_model(x, t, context):
        return jax_model(x, t, context).astype(jnp.bfloat16)

    x = jnp.asarray(sample_x(np.float32)[:3])
    cond, uncond = jnp.asarray([[0.5, -1.0]] * 3), jnp.zeros((3, 2))
    ours = D.cfg_denoiser(bf16_model, ALPHA_BAR, {"context": cond}, {"context": uncond}, 7.5)(x, 2.0)
    assert ours.dtype == jnp.float32
    # Reference: the bfloat16 outputs upcast first, then guided and converted in float32.
    t = jnp.full((3,), float(P.sigma_to_t(2.0, jnp.log(jnp.asarray(TABLE, jnp.float32)))))
    x_vp = P.to_vp(x, 2.0)
    out_uncond, out_cond = (bf16_model(x_vp, t, c).astype(jnp.float32) for c in (uncond, cond))
    expected = P.parameterization("epsilon").denoised(x, 2.0, out_uncond + 7.5 * (out_cond - out_uncond))
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-6)
