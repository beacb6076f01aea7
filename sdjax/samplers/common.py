"""Pieces shared by the samplers: the ODE derivative, ancestral splitting, per-step noise, validation.

Conventions (k-diffusion): `denoise(x, sigma) -> x0 estimate`, x in variance-exploding scaling
(x = x0 + sigma * eps), `sigmas` descending and ending in 0. Arithmetic is float32/float64.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.errors import InvalidArgumentError


def to_d(x, sigma, denoised):
    """dx/dsigma of the probability-flow ODE (Karras et al. 2022, eq. 3 with sigma(t) = t)."""
    return (x - denoised) / sigma


def ancestral_step(sigma_from, sigma_to, eta=1.0):
    """Split a step sigma_from -> sigma_to into a deterministic move to sigma_down plus fresh noise sigma_up.

    Traced-safe: eta and the sigmas may be traced values.
    """
    variance = sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2
    sigma_up = jnp.minimum(sigma_to, eta * jnp.sqrt(jnp.maximum(variance, 0.0)))
    sigma_down = jnp.sqrt(jnp.maximum(sigma_to**2 - sigma_up**2, 0.0))
    return sigma_down, sigma_up


def step_noise(key, step, x):
    """Standard normal noise for step `step`: a pure function of (key, step), so a seed fixes a run."""
    return jax.random.normal(jax.random.fold_in(key, step), x.shape, x.dtype)


def check_sigmas(sigmas, name: str = "sigmas"):
    """Raise a clear error for a concrete sigma grid that is not 1-D, strictly descending and >= 0.

    Grids normally end in 0; diffusers' `final_sigmas_type="sigma_min"` / `set_alpha_to_one=False` grids end in
    a small positive sigma instead, and the samplers then stop there. Traced grids cannot be inspected.
    """
    if isinstance(sigmas, jax.core.Tracer):
        return
    values = np.asarray(sigmas)
    if values.ndim != 1 or values.size < 2:
        raise InvalidArgumentError(f"{name} must be a 1-D array of at least 2 values, got shape {values.shape}")
    if not np.all(np.diff(values) < 0):
        raise InvalidArgumentError(f"{name} must be strictly descending, got {values.tolist()}")
    if values[-1] < 0:
        raise InvalidArgumentError(f"{name} must be >= 0 (last value is {values[-1]})")
