"""Discrete-time diffusion models as denoisers `D(x, sigma) -> x0` for the samplers, and classifier-free guidance.

`discrete_denoiser` wraps

    model_fn(x_vp, t, **cond) -> raw output      (x_vp batched on axis 0; t of shape (batch,))

into D(x, sigma) = c_skip x + c_out model_fn(c_in x, t(sigma)), the coefficients of diffusers'
`prediction_type` (parameterization.py: the samplers work in variance-exploding scaling, the U-Net was trained
in variance-preserving scaling).

Classifier-free guidance (Ho & Salimans 2021) and guidance rescale (Lin et al. 2023, sec. 3.4) act on the raw
output, where diffusers' pipelines apply them: the guided eps (or v) is the one converted to x0. Guidance scale
and rescale are ordinary array inputs, so they may be traced: changing them never recompiles.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from sdjax.parameterization import parameterization, per_sample, sigma_to_t, to_vp
from sdjax.schedules import sigma_table

# ------------------------------------------------------------------------------------------ denoisers

def discrete_denoiser(model_fn, alphas_cumprod, prediction_type: str = "epsilon", *, quantize: bool = False):
    """D(x, sigma, **cond) -> x0 for a model trained on the discrete schedule `alphas_cumprod` (N,).

    D(x, sigma) = c_skip x + c_out model_fn(c_in x, t(sigma), **cond), t from `sigma_to_t`.
    sigma is a scalar or (batch,); model_fn gets t broadcast to (batch,). Arithmetic is in x's dtype; the
    raw output is cast to it (the model may compute in bfloat16).
    """
    to_x0 = parameterization(prediction_type).denoised
    table = sigma_table(alphas_cumprod)

    def denoise(x, sigma, **cond):
        # log of the table in x's dtype, so that a sigma taken from the table maps to an exact integer t.
        log_sigmas = jnp.log(jnp.asarray(table, x.dtype))
        sigma = jnp.asarray(sigma, x.dtype)
        t = jnp.broadcast_to(sigma_to_t(sigma, log_sigmas, quantize), x.shape[:1])
        raw = model_fn(to_vp(x, sigma), t, **cond).astype(x.dtype)
        return to_x0(x, sigma, raw)

    return denoise


def pin_timesteps(model_fn, alphas_cumprod, model_timesteps, quantize: bool = False):
    """model_fn(x_vp, t, **cond) that is given the pinned timestep of `model_timesteps` (a plan's (sigma, t)
    rows; may be a traced array) instead of the t the denoiser derived from sigma.

    The denoiser's t is mapped back through the same `sigma_to_t` (same table, dtype and quantize flag as
    `discrete_denoiser` uses), so at a pinned sigma the lookup lands exactly on its row; between rows t is
    interpolated linearly.
    """
    table = sigma_table(alphas_cumprod)

    def pinned(x_vp, t, **cond):
        rows = jnp.asarray(model_timesteps, x_vp.dtype)
        log_sigmas = jnp.log(jnp.asarray(table, x_vp.dtype))
        derived = sigma_to_t(rows[:, 0], log_sigmas, quantize)
        return model_fn(x_vp, jnp.interp(t, derived, rows[:, 1]), **cond)

    return pinned


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
    phi = per_sample(guidance_rescale, guided)
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
        out = out_uncond + per_sample(guidance_scale, out_cond) * (out_cond - out_uncond)
        return rescale_guidance(out, out_cond, guidance_rescale)

    return guided


def cfg_denoiser(model_fn, alphas_cumprod, cond: dict, uncond: dict, guidance_scale, *, guidance_rescale=0.0,
                 prediction_type: str = "epsilon", quantize: bool = False):
    """D(x, sigma) -> x0 of a discrete-time model under classifier-free guidance (see `guided_model_fn`)."""
    guided = guided_model_fn(model_fn, cond, uncond, guidance_scale, guidance_rescale)
    return discrete_denoiser(guided, alphas_cumprod, prediction_type, quantize=quantize)

