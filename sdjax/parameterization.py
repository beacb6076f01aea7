"""How a discrete-time diffusion U-Net is parameterised: written once, read by the samplers' denoiser and by the
training loss alike (Karras et al. 2022's preconditioning, in Stable Diffusion's terms).

Training (variance-preserving, DDPM): x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps at timestep t, and the
network F(x_t, t) regresses `target(x0, eps, alpha_bar)`: eps ("epsilon"), v = sqrt(alpha_bar) eps -
sqrt(1 - alpha_bar) x0 ("v_prediction", Salimans & Ho 2022) or x0 ("sample").

Sampling (variance-exploding): x = x0 + sigma eps with sigma = sqrt((1 - alpha_bar) / alpha_bar), so the same
network is the denoiser

    D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, t(sigma)),    c_in = 1 / sqrt(1 + sigma^2)

(c_in is EDM's with sigma_data = 1; t(sigma), EDM's c_noise, interpolates the training schedule in log sigma).

A target's mean squared error weighs the error of the implied x0 by a power of the SNR it carries (eps: SNR,
v: SNR + 1, x0: 1); Min-SNR-gamma (Hang et al. 2023) replaces that by min(SNR, gamma).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from sdjax.errors import InvalidArgumentError

# ------------------------------------------------------------------------------------------ noise levels

def per_sample(value, x):
    """A scalar or per-sample (batch,) value shaped to broadcast against x (batch, ...), in x's dtype."""
    value = jnp.asarray(value, x.dtype)
    return value.reshape(value.shape + (1,) * (x.ndim - value.ndim))


def alpha_bar_from_sigma(sigma):
    """alpha_bar = 1 / (1 + sigma^2): the VP signal fraction at VE noise level sigma."""
    return 1.0 / (1.0 + jnp.square(sigma))


def sigma_from_alpha_bar(alpha_bar):
    """sigma = sqrt((1 - alpha_bar) / alpha_bar)."""
    return jnp.sqrt((1.0 - alpha_bar) / alpha_bar)


def snr(alpha_bar):
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) = 1 / sigma^2."""
    return alpha_bar / (1.0 - alpha_bar)


def c_in(sigma):
    """1 / sqrt(1 + sigma^2): scales a VE sample to the network's VP input."""
    return jax.lax.rsqrt(1.0 + jnp.square(sigma))


def to_vp(x, sigma):
    """x_VP = c_in(sigma) x. sigma scalar or (batch,)."""
    return x * c_in(per_sample(sigma, x))


def from_vp(x_vp, sigma):
    """x = x_VP sqrt(1 + sigma^2): a VP latent back to VE scaling; the inverse of `to_vp`."""
    return x_vp * jnp.sqrt(1.0 + jnp.square(per_sample(sigma, x_vp)))


def add_noise(x0, noise, alpha_bar):
    """x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) noise: the forward process at per-sample alpha_bar."""
    alpha_bar = per_sample(alpha_bar, x0)
    return jnp.sqrt(alpha_bar) * x0 + jnp.sqrt(1.0 - alpha_bar) * noise


def sigma_to_t(sigma, log_sigmas, quantize: bool = False, *, xp=jnp):
    """The training timestep of noise level sigma, linear in log sigma between table entries.

    `log_sigmas` is log of the model's ascending sigma table (index = timestep). A sigma equal to a table
    entry maps to exactly that integer; sigmas outside the table clamp to 0 or N-1. `quantize=True` returns
    the nearest table index instead (k-diffusion's `quantize`, ComfyUI's discrete models). xp=numpy evaluates
    it on the host (the scheduler-config plans, in float64).
    """
    log_sigma = xp.log(xp.asarray(sigma, log_sigmas.dtype))
    if quantize:
        nearest = xp.argmin(xp.abs(log_sigma[..., None] - log_sigmas), axis=-1)
        return nearest.astype(log_sigmas.dtype)
    return xp.interp(log_sigma, log_sigmas, xp.arange(log_sigmas.shape[0], dtype=log_sigmas.dtype))


# ------------------------------------------------------------------------------------- prediction types

@dataclasses.dataclass(frozen=True)
class Parameterization:
    """One prediction type: its denoiser coefficients, its training target and its Min-SNR weight.

    c_skip, c_out: sigma -> coefficient (sigma already shaped per sample). target: (x0, noise, alpha_bar) ->
    what the network should output. min_snr: (SNR, gamma) -> min(SNR, gamma) / the SNR weight the target
    carries, written without 0 / 0 so that a zero-terminal-SNR timestep gets a finite weight.
    """
    prediction_type: str
    c_skip: Callable
    c_out: Callable
    target: Callable
    min_snr: Callable

    def denoised(self, x, sigma, output):
        """x0 = c_skip x + c_out F from the network's (guided) output F at VE sample x."""
        sigma = per_sample(sigma, x)
        return self.c_skip(sigma) * x + self.c_out(sigma) * output

    def loss_weight(self, alpha_bar, min_snr_gamma: float):
        """Per-sample weight of the target's squared error: Min-SNR-gamma, or uniform when gamma <= 0."""
        if min_snr_gamma <= 0:
            return jnp.ones_like(alpha_bar)
        return self.min_snr(snr(alpha_bar), min_snr_gamma)


def _v_target(x0, noise, alpha_bar):
    alpha_bar = per_sample(alpha_bar, x0)
    return jnp.sqrt(alpha_bar) * noise - jnp.sqrt(1.0 - alpha_bar) * x0


PARAMETERIZATIONS = {p.prediction_type: p for p in (
    Parameterization("epsilon", c_skip=lambda sigma: 1.0, c_out=lambda sigma: -sigma,
                     target=lambda x0, noise, alpha_bar: noise,
                     min_snr=lambda ratio, gamma: jnp.minimum(1.0, gamma / ratio)),
    Parameterization("v_prediction", c_skip=lambda sigma: jnp.square(c_in(sigma)),
                     c_out=lambda sigma: -sigma * c_in(sigma), target=_v_target,
                     min_snr=lambda ratio, gamma: jnp.minimum(ratio, gamma) / (ratio + 1.0)),
    Parameterization("sample", c_skip=lambda sigma: 0.0, c_out=lambda sigma: 1.0,
                     target=lambda x0, noise, alpha_bar: x0,
                     min_snr=lambda ratio, gamma: jnp.minimum(ratio, gamma)),
)}
"""diffusers' `prediction_type` -> its Parameterization."""


def parameterization(prediction_type: str) -> Parameterization:
    try:
        return PARAMETERIZATIONS[prediction_type]
    except KeyError:
        raise InvalidArgumentError(f"unknown prediction_type {prediction_type!r}; valid: "
                                   f"{', '.join(PARAMETERIZATIONS)}") from None
