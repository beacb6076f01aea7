"""Exponential-integrator algebra in log-SNR time, written once for every sampler that steps in lambda.

Notation (Lu et al. 2022b, "DPM-Solver++", and k-diffusion's sampling.py): lambda = -log sigma (half the log
signal-to-noise ratio in VE scaling); a step from sigma_s to sigma_t has length h = lambda_t - lambda_s > 0;
an evaluation made a step of length h_k earlier sits at ratio r_k = h_k / h behind.

In VE scaling the probability-flow ODE on the data prediction D(lambda) solves exactly as
    x_t = e^-h x_s + integral_0^1 h e^(-h (1 - u)) D(lambda_s + u h) du,
and expanding D in u gives the DPM-Solver++ update of order 1, 2, 3:
    x_t = e^-H x_s + phi_1 D + phi_2 D' - phi_3 D''        (D' and D'' in u, at the expansion point)
with H = (1 + eta) h: eta = 0 is the ODE, eta = 1 the reverse SDE (k-diffusion's eta between them; the SDE adds
noise of std `sde_noise_std`). phi_1, phi_2 and -phi_3 are the integrals above against 1, u and u^2 / 2
(with H for h).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


def exp_remainder(z, n: int, series_terms: int = 20):
    """e^z - sum_{j<=n} z^j / j!, the Taylor remainder that exponential integrators are built from
    (the phi-functions are phi_{n+1}(z) = exp_remainder(z, n) / z^(n+1)).

    For |z| <= 1 it is summed as its own series: the direct difference cancels catastrophically there
    (it loses about |z|^-(n+1) ulps, too many in float32 for small steps). Large |z| uses the direct form.
    """
    small = jnp.abs(z) <= 1
    z_small = jnp.where(small, z, 0.0)       # keeps the unused branch finite
    term = jnp.ones_like(z)
    for j in range(1, n + 2):                # z^(n+1) / (n+1)!
        term = term * z_small / j
    series = term
    for j in range(n + 2, n + 2 + series_terms):
        term = term * z_small / j
        series = series + term
    taylor, power = jnp.zeros_like(z), jnp.ones_like(z)
    for j in range(n + 1):
        taylor = taylor + power
        power = power * z / (j + 1)
    return jnp.where(small, series, jnp.exp(z) - taylor)


def log_step(sigma_from, sigma_to):
    """h = lambda_to - lambda_from = log(sigma_from / sigma_to): a step's length in log-SNR time (inf into 0)."""
    return jnp.log(sigma_from) - jnp.log(sigma_to)


class Coefficients(NamedTuple):
    """The weights of a DPM-Solver++ step of length h (module docstring), H = (1 + eta) h."""
    decay: jax.Array   # e^-H, the weight of x_s
    phi_1: jax.Array   # 1 - e^-H, of D
    phi_2: jax.Array   # (e^-H - 1 + H) / H, of D'
    phi_3: jax.Array   # phi_2 / H - 1/2, of -D''


def dpmpp_coefficients(h, eta) -> Coefficients:
    """The Coefficients of a step of log-SNR length h; eta may be traced. Into sigma = 0 (h = inf): decay 0,
    phi_1 = 1, so the first-order step lands on D."""
    h_eta = (1 + eta) * h
    return Coefficients(decay=jnp.exp(-h_eta), phi_1=-jnp.expm1(-h_eta),
                        phi_2=exp_remainder(-h_eta, 1) / h_eta, phi_3=exp_remainder(-h_eta, 2) / h_eta**2)


def dpmpp_data_terms(coefficients: Coefficients, values, ratios, solver_type: str = "heun",
                     second_difference_weight: float = 1.0):
    """phi_1 D + phi_2 D' - phi_3 D'' of an update of order len(values) (1 to 3), as k-diffusion writes it.

    values[0] is D at the expansion point, values[k] D at ratio r_0 + ... + r_{k-1} behind it (ratios[k] = r_k;
    negative for points ahead of it). The derivatives are divided differences in units of h: d1_0 (order 2),
    or d1 and d2 = D'' / 2 from a quadratic (order 3). values may be arrays or weight vectors over a history.

    solver_type: order 2's D' weight, phi_2 ("heun", the Taylor one) or phi_1 / 2 ("midpoint"). The order-3
    Taylor term is -2 phi_3 d2, but k-diffusion, diffusers' multistep and the DPM-Solver reference weight d2 by
    1, which leaves DPM-Solver++(3M) second order; second_difference_weight=2 is the consistent weight.
    """
    terms = coefficients.phi_1 * values[0]
    if len(values) == 1:
        return terms
    d1_0 = (values[0] - values[1]) / ratios[0]
    if len(values) == 2:
        slope_weight = 0.5 * coefficients.phi_1 if solver_type == "midpoint" else coefficients.phi_2
        return terms + slope_weight * d1_0
    d1_1 = (values[1] - values[2]) / ratios[1]
    d1 = d1_0 + (d1_0 - d1_1) * ratios[0] / (ratios[0] + ratios[1])
    d2 = (d1_0 - d1_1) / (ratios[0] + ratios[1])
    return terms + coefficients.phi_2 * d1 - second_difference_weight * coefficients.phi_3 * d2


def sde_noise_std(sigma_from, sigma_to, eta):
    """sigma_to sqrt(1 - e^(-2 eta h)): the std of the fresh noise an SDE step of DPM-Solver++ adds, written to
    stay finite (and 0) into sigma_to = 0."""
    h = jnp.where(sigma_to > 0, log_step(sigma_from, sigma_to), 0.0)
    return sigma_to * jnp.sqrt(-jnp.expm1(-2 * eta * h))
