"""Discrete-time diffusion models as denoisers `D(x, sigma) -> x0` for the samplers, and classifier-free guidance.

A Stable Diffusion U-Net is trained in variance-preserving (VP) scaling on N timesteps:
x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps. The samplers work in variance-exploding (VE) scaling
x = x0 + sigma eps with sigma = sqrt((1 - alpha_bar) / alpha_bar), so x_VP = x / sqrt(1 + sigma^2) (Karras
et al. 2022's c_in with sigma_data = 1). `discrete_denoiser` wraps

    model_fn(x_vp, t, **cond) -> raw output      (x_vp batched on axis 0; t of shape (batch,))

into D: scale the input, map sigma to the (fractional) training timestep, and turn the raw output into x0
according to diffusers' `prediction_type`:

    epsilon:      x0 = x - sigma eps                                  (c_skip = 1, c_out = -sigma)
    v_prediction: x0 = x / (1 + sigma^2) - v sigma / sqrt(1 + sigma^2)
    sample:       x0 = raw output

Classifier-free guidance (Ho & Salimans 2021) and guidance rescale (Lin et al. 2023, sec. 3.4) act on the raw
output, where diffusers' pipelines apply them: the guided eps (or v) is the one converted to x0. Guidance scale
and rescale are ordinary array inputs, so they may be traced: changing them never recompiles.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from sdjax.errors import InvalidArgumentError
from sdjax.schedules import sigma_table

# ------------------------------------------------------------------------------- VP <-> VE conversions

def alpha_bar_from_sigma(sigma):
    """alpha_bar = 1 / (1 + sigma^2): the VP signal fraction at VE noise level sigma."""
    return 1.0 / (1.0 + jnp.square(sigma))


def sigma_from_alpha_bar(alpha_bar):
    """sigma = sqrt((1 - alpha_bar) / alpha_bar)."""
    return jnp.sqrt((1.0 - alpha_bar) / alpha_bar)


def _per_sample(value, x):
    """A scalar or per-sample (batch,) value shaped to broadcast against x (batch, ...)."""
    value = jnp.asarray(value, x.dtype)
    return value.reshape(value.shape + (1,) * (x.ndim - value.ndim))


def to_vp(x, sigma):
    """x_VP = x / sqrt(1 + sigma^2): VE sample to the model's VP input (c_in). sigma scalar or (batch,)."""
    return x * jax.lax.rsqrt(1.0 + jnp.square(_per_sample(sigma, x)))


def from_vp(x_vp, sigma):
    """x = x_VP sqrt(1 + sigma^2): a VP latent back to VE scaling; the inverse of `to_vp`."""
    return x_vp * jnp.sqrt(1.0 + jnp.square(_per_sample(sigma, x_vp)))


# ---------------------------------------------------------------------------------------- sigma -> t

def sigma_to_t(sigma, log_sigmas, quantize: bool = False):
    """The training timestep of noise level sigma, linear in log sigma between table entries.

    `log_sigmas` is log of the model's ascending sigma table (index = timestep). A sigma equal to a table
    entry maps to exactly that integer; sigmas outside the table clamp to 0 or N-1. `quantize=True` returns
    the nearest table index instead (k-diffusion's `quantize`, ComfyUI's discrete models).
    """
    log_sigma = jnp.log(jnp.asarray(sigma, log_sigmas.dtype))
    if quantize:
        nearest = jnp.argmin(jnp.abs(log_sigma[..., None] - log_sigmas), axis=-1)
        return nearest.astype(log_sigmas.dtype)
    return jnp.interp(log_sigma, log_sigmas, jnp.arange(log_sigmas.shape[0], dtype=log_sigmas.dtype))


# ------------------------------------------------------------------------------- raw output -> x0

def x0_from_epsilon(x, sigma, eps):
    """x0 = x - sigma eps."""
    return x - _per_sample(sigma, x) * eps


def x0_from_v(x, sigma, v):
    """x0 = c_skip x + c_out v with c_skip = 1 / (sigma^2 + 1), c_out = -sigma / sqrt(sigma^2 + 1).

    In VP terms x0 = sqrt(alpha_bar) x_VP - sqrt(1 - alpha_bar) v (Salimans & Ho 2022).
    """
    sigma = _per_sample(sigma, x)
    c_in = jax.lax.rsqrt(1.0 + jnp.square(sigma))
    return jnp.square(c_in) * x - sigma * c_in * v


def x0_from_sample(x, sigma, x0):
    """The model predicts x0 directly."""
    del x, sigma
    return x0


X0_FROM_PREDICTION = {"epsilon": x0_from_epsilon, "v_prediction": x0_from_v, "sample": x0_from_sample}
"""diffusers' `prediction_type` -> (x, sigma, raw output) -> x0."""


def _x0_converter(prediction_type: str):
    try:
        return X0_FROM_PREDICTION[prediction_type]
    except KeyError:
        raise InvalidArgumentError(f"unknown prediction_type {prediction_type!r}; valid: "
                                   f"{', '.join(X0_FROM_PREDICTION)}") from None


# ------------------------------------------------------------------------------------------ denoisers

def discrete_denoiser(model_fn, alphas_cumprod, prediction_type: str = "epsilon", *, quantize: bool = False):
    """D(x, sigma, **cond) -> x0 for a model trained on the discrete schedule `alphas_cumprod` (N,).

    D(x, sigma) = to_x0(x, sigma, model_fn(x / sqrt(1 + sigma^2), t(sigma), **cond)), t from `sigma_to_t`.
    sigma is a scalar or (batch,); model_fn gets t broadcast to (batch,). Arithmetic is in x's dtype; the
    raw output is cast to it (the model may compute in bfloat16).
    """
    to_x0 = _x0_converter(prediction_type)
    table = sigma_table(alphas_cumprod)

    def denoise(x, sigma, **cond):
        # log of the table in x's dtype, so that a sigma taken from the table maps to an exact integer t.
        log_sigmas = jnp.log(jnp.asarray(table, x.dtype))
        sigma = jnp.asarray(sigma, x.dtype)
        t = jnp.broadcast_to(sigma_to_t(sigma, log_sigmas, quantize), x.shape[:1])
        raw = model_fn(to_vp(x, sigma), t, **cond).astype(x.dtype)
        return to_x0(x, sigma, raw)

    return denoise


def rescale_guidance(guided, cond_output, guidance_rescale):
    """Lin et al. 2023, sec. 3.4 (diffusers' `rescale_noise_cfg`): match the guided output's per-sample std to
    the conditional output's, then blend: phi * guided * std(cond) / std(guided) + (1 - phi) * guided.

    phi = guidance_rescale (0: plain CFG; the paper uses 0.7). The std ratio is the same with or without
    Bessel's correction, so population std is used. A guided output with zero std is left unscaled.
    """
    axes = tuple(range(1, guided.ndim))
    std_cond = jnp.std(cond_output, axis=axes, keepdims=True)
    std_guided = jnp.std(guided, axis=axes, keepdims=True)
    ratio = jnp.where(std_guided > 0, std_cond / jnp.where(std_guided > 0, std_guided, 1.0), 1.0)
    phi = _per_sample(guidance_rescale, guided)
    return guided * (phi * ratio + (1.0 - phi))


def guided_model_fn(model_fn, cond: dict, uncond: dict, guidance_scale, guidance_rescale=0.0):
    """model_fn with classifier-free guidance: one batched call on [uncond; cond], then
    out = out_uncond + w (out_cond - out_uncond), optionally `rescale_guidance`d, all in raw-output space.

    cond and uncond are keyword pytrees for model_fn with matching structure and batch axis 0 (e.g.
    {"encoder_hidden_states": (B, 77, D)}). guidance_scale w and guidance_rescale are scalars or (batch,).
    """

    def guided(x_vp, t):
        both_cond = jax.tree.map(lambda u, c: jnp.concatenate([u, c], axis=0), uncond, cond)
        both = model_fn(jnp.concatenate([x_vp, x_vp], axis=0), jnp.concatenate([t, t], axis=0), **both_cond)
        both = both.astype(x_vp.dtype)  # guide in the sampler's precision, not the model's (e.g. bfloat16)
        out_uncond, out_cond = jnp.split(both, 2, axis=0)
        out = out_uncond + _per_sample(guidance_scale, out_cond) * (out_cond - out_uncond)
        return rescale_guidance(out, out_cond, guidance_rescale)

    return guided


def cfg_denoiser(model_fn, alphas_cumprod, cond: dict, uncond: dict, guidance_scale, *, guidance_rescale=0.0,
                 prediction_type: str = "epsilon", quantize: bool = False):
    """D(x, sigma) -> x0 of a discrete-time model under classifier-free guidance (see `guided_model_fn`)."""
    guided = guided_model_fn(model_fn, cond, uncond, guidance_scale, guidance_rescale)
    return discrete_denoiser(guided, alphas_cumprod, prediction_type, quantize=quantize)

