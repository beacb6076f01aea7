"""Multistep samplers: each step reuses denoiser outputs of earlier steps (k-diffusion/ComfyUI/diffusers names).

Same contract as singlestep.py: `fn(denoise, x, sigmas, key=None, **options) -> x`, `denoise(x, sigma) -> x0`
in variance-exploding scaling, `sigmas` descending and ending in 0 or in a small positive sigma (then the last
step goes there, like diffusers' final_sigmas_type="sigma_min"). `fn.nfe(steps)` counts denoiser evaluations.

How they are built:
  * one `lax.scan` over the steps; the history is a fixed-size ring in the carry (`common.push_history`,
    newest first; slots not yet filled hold zeros);
  * every update is linear in the history, x_next = a * x + sum_j w_j * history[j] (+ noise), with scalar
    weights w computed inside the scan from the (possibly traced) grid, so a new grid of the same length never
    recompiles;
  * warm-up and lower-order final steps compute the weights of every order up to the maximum and pick one
    with an index, so tracing calls `denoise` a fixed number of times whatever the step count, and a slot
    the chosen order does not use gets weight exactly 0.

Families:
  * Adams-Bashforth in sigma on the ODE slope d = (x - D) / sigma: lms (variable-step weights), pndm / plms
    and ipndm (the fixed uniform-step weights);
  * exponential integrators in log sigma on D: dpmpp_2m, dpmpp_2m_sde, dpmpp_3m_sde (DPM-Solver++),
    res_multistep, unipc (unipc.py);
  * deis: exponential integrator on eps = d with polynomial extrapolation in log sigma.

Which of them reproduces which diffusers scheduler: the table in `sdjax/scheduler_config.py`.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from sdjax.samplers import stepping
from sdjax.samplers.common import (
    combine_history, earlier_sigma, evaluate, is_concrete_zero, pick_order, push_history, require_choice,
    require_key, require_nonnegative, require_order, step_noise, to_d, warmup_order, working_arrays)
from sdjax.samplers.exponential import (
    dpmpp_coefficients, dpmpp_data_terms, exp_remainder, log_step, sde_noise_std)
from sdjax.samplers.registry import register
# V = log(sigma_next / sigma) is clamped here: at sigma_next = 0 it is -inf, and e^-60 is already 0 to float64.
_LOG_RATIO_FLOOR = -60.0


# ---- shared machinery ---------------------------------------------------------------------------------------

def _scan_with_history(denoise, x, sigmas, depth, record, advance, history=None):
    """The loop of a one-evaluation-per-step multistep method, as one lax.scan.

    Step i evaluates denoised = denoise(x, sigmas[i]), pushes record(x, sigmas[i], denoised) onto the ring of
    the last `depth` records, and moves to sigmas[i + 1] with advance(i, x, denoised, history).
    """
    def body(carry, i):
        x, history = carry
        denoised = evaluate(denoise, x, sigmas[i])
        history = push_history(history, record(x, sigmas[i], denoised))
        return (advance(i, x, denoised, history), history), None

    if history is None:
        history = jnp.zeros((depth,) + x.shape, x.dtype)
    x, _ = stepping.scan(body, (x, history), jnp.arange(sigmas.shape[0] - 1))
    return x


def _record_slope(x, sigma, denoised):
    return to_d(x, sigma, denoised)


def _record_denoised(x, sigma, denoised):
    return denoised


def _lagrange_weights(nodes, moments):
    """Integrals of the Lagrange basis polynomials on `nodes` against a measure with monomial moments
    moments[n] = integral of u^n, n < len(nodes): the weights of an interpolatory multistep formula.

    Each basis polynomial prod_{j != k} (u - u_j) / (u_k - u_j) is expanded by multiplying out its factors
    (no Vandermonde solve, which loses digits in float32). Works on floats and traced scalars alike.
    """
    weights = []
    for k, node in enumerate(nodes):
        poly = [1.0]                                     # coefficients of u^0, u^1, ...
        for j, other in enumerate(nodes):
            if j != k:
                scale = 1.0 / (node - other)
                raised = [0.0] + poly                    # u * poly
                poly = [(raised[n] - other * (poly[n] if n < len(poly) else 0.0)) * scale
                        for n in range(len(raised))]
        weights.append(sum(c * m for c, m in zip(poly, moments)))
    return weights


def _uniform_moments(order):
    """Moments of u^n on [0, 1]: with nodes 0, -1, -2, ... (in steps) they give Adams-Bashforth weights."""
    return [1.0 / (n + 1) for n in range(order)]


def _adams_bashforth_table(max_order):
    """Row m - 1: the m-step Adams-Bashforth weights for equal steps, newest slope first ([3/2, -1/2], ...)."""
    return np.array([_lagrange_weights([-float(j) for j in range(m)], _uniform_moments(m))
                     + [0.0] * (max_order - m) for m in range(1, max_order + 1)])


_ADAMS_BASHFORTH = _adams_bashforth_table(4)


def _fixed_adams_bashforth(x, sigma, sigma_next, history, order):
    """x + (sigma_next - sigma) * (AB weights . past slopes): PLMS / iPNDM's step, blind to step-size changes."""
    weights = jnp.asarray(_ADAMS_BASHFORTH[:, :history.shape[0]], x.dtype)[order - 1]
    return x + (sigma_next - sigma) * combine_history(weights, history)


# ---- Adams-Bashforth family ---------------------------------------------------------------------------------

def _lms_weights(sigmas, i, order):
    """Variable-step Adams-Bashforth weights in sigma: the integral over [sigma_i, sigma_{i+1}] of each Lagrange
    basis polynomial on sigma_i, sigma_{i-1}, ... (what k-diffusion integrates with scipy.integrate.quad).
    Nodes are measured in units of the current step, so the weights reduce to AB's for equal steps."""
    step = sigmas[i + 1] - sigmas[i]
    candidates = []
    for m in range(1, order + 1):
        nodes = [(earlier_sigma(sigmas, i - j) - sigmas[i]) / step for j in range(m)]
        candidates.append([w * step for w in _lagrange_weights(nodes, _uniform_moments(m))])
    return candidates


@register("lms")
def lms(denoise, x, sigmas, key=None, *, order=4):
    """Linear multistep: the variable-step Adams-Bashforth method (Hairer, Norsett & Wanner, "Solving Ordinary
    Differential Equations I", III.5) on the probability-flow ODE dx/dsigma = (x - D) / sigma of Karras et al.
    2022, as k-diffusion's `sample_lms`: the slope is interpolated in sigma through the last `order` steps
    (fewer while warming up) and integrated exactly over the step."""
    require_order("lms", order, 4)
    x, sigmas = working_arrays(x, sigmas)

    def advance(i, x, denoised, slopes):
        weights = pick_order(jnp.minimum(i + 1, order), _lms_weights(sigmas, i, order), order)
        return x + combine_history(weights, slopes)
    return _scan_with_history(denoise, x, sigmas, order, _record_slope, advance)


@register("pndm", aliases=("plms",), nfe=lambda steps: steps + 1 if steps > 1 else steps)
def pndm(denoise, x, sigmas, key=None):
    """PLMS, the pseudo linear multistep method of Liu et al. 2022, "Pseudo Numerical Methods for Diffusion
    Models on Manifolds" (its "transfer part", eq. 9, is DDIM, which is an Euler step in VE scaling), as
    diffusers' PNDMScheduler(skip_prk_steps=True): the first step is Heun's (an Euler step, a second evaluation
    at its end, then the step redone with the mean slope; that end evaluation is then discarded), later steps
    use fixed Adams-Bashforth weights of order 2, 3, 4 on the slopes eps = (x - D) / sigma, including the step
    into sigma = 0."""
    x, sigmas = working_arrays(x, sigmas)
    sigma, sigma_next = sigmas[0], sigmas[1]
    slope = to_d(x, sigma, evaluate(denoise, x, sigma))
    x_euler = x + (sigma_next - sigma) * slope
    if sigmas.shape[0] == 2:
        return x_euler
    slope_end = to_d(x_euler, sigma_next, evaluate(denoise, x_euler, sigma_next))
    x = x + (sigma_next - sigma) * (slope + slope_end) / 2
    history = jnp.zeros((4,) + x.shape, x.dtype).at[0].set(slope)

    def advance(i, x, denoised, slopes):           # i counts from the second step, which has 2 slopes
        return _fixed_adams_bashforth(x, sigmas[i + 1], sigmas[i + 2], slopes, jnp.minimum(i + 2, 4))
    return _scan_with_history(denoise, x, sigmas[1:], 4, _record_slope, advance, history=history)


@register("ipndm")
def ipndm(denoise, x, sigmas, key=None, *, order=4):
    """Improved PNDM (iPNDM) of Zhang & Chen 2022, "Fast Sampling of Diffusion Models with Exponential
    Integrator" (the DEIS paper), as ComfyUI's `sample_ipndm`: fixed Adams-Bashforth weights on the slopes in
    sigma, with a lower-order multistep warm-up instead of PNDM's Runge-Kutta start; the step into sigma = 0
    returns D. The weights assume equal steps: on other grids, and through its Euler first step, the method is
    second order asymptotically, though close to fourth order at practical step counts on equal steps."""
    require_order("ipndm", order, 4)
    x, sigmas = working_arrays(x, sigmas)

    def advance(i, x, denoised, slopes):
        sigma_next = sigmas[i + 1]
        x_next = _fixed_adams_bashforth(x, sigmas[i], sigma_next, slopes, jnp.minimum(i + 1, order))
        return jnp.where(sigma_next > 0, x_next, denoised)
    return _scan_with_history(denoise, x, sigmas, order, _record_slope, advance)


# ---- DPM-Solver++ multistep ---------------------------------------------------------------------------------

def _dpmpp_update(sigmas, i, eta, solver_type, second_difference_weight=1.0):
    """DPM-Solver++'s multistep update from sigma_i to sigma_{i+1} (Lu et al. 2022b, "DPM-Solver++", Algorithm 2
    and its third-order and SDE variants, in k-diffusion's form) as (decay, [weights of orders 1, 2, 3]):
    x_next = decay x + weights . [D_i, D_{i-1}, D_{i-2}] (+ noise), in the notation of `exponential`, with
    r_0 = h_{i-1} / h and r_1 = h_{i-2} / h placing the two earlier evaluations behind this step.
    """
    h = log_step(sigmas[i], sigmas[i + 1])
    ratios = [log_step(earlier_sigma(sigmas, i - lag), earlier_sigma(sigmas, i - lag + 1)) / h for lag in (1, 2)]
    coefficients = dpmpp_coefficients(h, eta)
    slots = jnp.eye(3, dtype=coefficients.phi_1.dtype)      # D_i, D_{i-1}, D_{i-2} as weight vectors
    candidates = [dpmpp_data_terms(coefficients, slots[:order], ratios, solver_type, second_difference_weight)
                  for order in (1, 2, 3)]
    return coefficients.decay, candidates


def _dpmpp_multistep(name, denoise, x, sigmas, key, *, max_order, eta, s_noise, solver_type, lower_order_final,
                     euler_at_final, taylor_third_order=False):
    """The DPM-Solver++ multistep samplers. Beyond k-diffusion's options, for diffusers'
    DPMSolverMultistepScheduler (see sdjax/scheduler_config.py): solver_type picks the second-order term ("midpoint"
    or "heun"), lower_order_final caps step i at order steps - i, euler_at_final makes the last step first
    order. The step into sigma = 0 is always x = D, as in both references."""
    require_nonnegative(name, eta=eta, s_noise=s_noise)
    require_choice(name, "solver_type", solver_type, ("midpoint", "heun"))
    x, sigmas = working_arrays(x, sigmas)
    num_steps = sigmas.shape[0] - 1
    noisy = not (is_concrete_zero(eta) or is_concrete_zero(s_noise))
    if noisy:
        require_key(key, name, "eta > 0")

    def advance(i, x, denoised, history):
        sigma_next = sigmas[i + 1]
        order = warmup_order(i, num_steps, max_order, lower_order_final)
        if euler_at_final:
            order = jnp.where(i == num_steps - 1, 1, order)
        # Extrapolating D into sigma = 0 is meaningless (h = inf): that step is x = D.
        order = jnp.where(sigma_next > 0, order, 1)
        decay, candidates = _dpmpp_update(sigmas, i, eta, solver_type, 2.0 if taylor_third_order else 1.0)
        x_next = decay * x + combine_history(jnp.stack(candidates)[order - 1, :max_order], history)
        if noisy:
            x_next = x_next + step_noise(key, i, x) * (sde_noise_std(sigmas[i], sigma_next, eta) * s_noise)
        return x_next
    return _scan_with_history(denoise, x, sigmas, max_order, _record_denoised, advance)


@register("dpmpp_2m")
def dpmpp_2m(denoise, x, sigmas, key=None, *, solver_type="midpoint", lower_order_final=False,
             euler_at_final=False):
    """DPM-Solver++(2M), Lu et al. 2022b, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
    Probabilistic Models", Algorithm 2: the second-order multistep exponential integrator on the data prediction
    D in log sigma, as k-diffusion's `sample_dpmpp_2m`. solver_type, lower_order_final and euler_at_final serve
    diffusers' DPMSolverMultistepScheduler (see `_dpmpp_multistep`)."""
    return _dpmpp_multistep("dpmpp_2m", denoise, x, sigmas, key, max_order=2, eta=0.0, s_noise=0.0,
                            solver_type=solver_type, lower_order_final=lower_order_final,
                            euler_at_final=euler_at_final)


@register("dpmpp_2m_sde")
def dpmpp_2m_sde(denoise, x, sigmas, key=None, *, eta=1.0, s_noise=1.0, solver_type="midpoint",
                 lower_order_final=False, euler_at_final=False):
    """DPM-Solver++(2M) SDE (Lu et al. 2022b, the SDE-DPM-Solver++ of its appendix, with k-diffusion's eta
    between the ODE, eta = 0, and the reverse SDE, eta = 1), as k-diffusion's `sample_dpmpp_2m_sde`, with fresh
    Gaussian noise per step from `key` (k-diffusion's default is a Brownian tree; both give independent
    increments). solver_type, lower_order_final, euler_at_final: see `_dpmpp_multistep`."""
    return _dpmpp_multistep("dpmpp_2m_sde", denoise, x, sigmas, key, max_order=2, eta=eta, s_noise=s_noise,
                            solver_type=solver_type, lower_order_final=lower_order_final,
                            euler_at_final=euler_at_final)


@register("dpmpp_3m_sde")
def dpmpp_3m_sde(denoise, x, sigmas, key=None, *, eta=1.0, s_noise=1.0, solver_type="heun",
                 lower_order_final=False, euler_at_final=False, taylor_third_order=False):
    """DPM-Solver++(3M) SDE: the third-order multistep DPM-Solver++ (Lu et al. 2022b, with the SDE noise of its
    appendix and k-diffusion's eta), as k-diffusion's `sample_dpmpp_3m_sde`; eta = 0 is the deterministic
    DPM-Solver++(3M). Its second step is second order with the "heun" term by default, as in k-diffusion
    (diffusers' order-3 dpmsolver++ uses its configured solver_type). Options: see `_dpmpp_multistep`.

    taylor_third_order: k-diffusion, diffusers and the DPM-Solver reference weight the second divided
    difference of D by half its Taylor coefficient, which leaves the method second order (measured in
    experiments/sampler_bench); True uses the full weight and is third order. The default keeps parity."""
    return _dpmpp_multistep("dpmpp_3m_sde", denoise, x, sigmas, key, max_order=3, eta=eta, s_noise=s_noise,
                            solver_type=solver_type, lower_order_final=lower_order_final,
                            euler_at_final=euler_at_final, taylor_third_order=taylor_third_order)


@register("res_multistep")
def res_multistep(denoise, x, sigmas, key=None):
    """RES multistep, ComfyUI's `sample_res_multistep`: the second-order exponential multistep method on the data
    prediction D from Zhang, Song & Chen 2023, "Improved Order Analysis and Design of Exponential Integrator for
    Diffusion Models Sampling" (the Refined Exponential Solver). Its order conditions weight the divided
    difference of D by phi_2, so it is DPM-Solver++(2M) with the "heun" term; the first step and the step into
    sigma = 0 are first order. Deterministic (ComfyUI's eta = 0; its ancestral variant is not here)."""
    return _dpmpp_multistep("res_multistep", denoise, x, sigmas, key, max_order=2, eta=0.0, s_noise=0.0,
                            solver_type="heun", lower_order_final=False, euler_at_final=False)


# ---- DEIS ---------------------------------------------------------------------------------------------------

def _exp_moment(n, log_ratio):
    """integral_0^V v^n e^v dv for V = log_ratio <= 0, via e^V * exp_remainder(-V, n) * (-1)^(n+1) n!.
    V = -inf (the step into sigma = 0) is clamped to where e^V is already 0 to float64."""
    log_ratio = jnp.maximum(log_ratio, _LOG_RATIO_FLOOR)
    return (-1.0) ** (n + 1) * math.factorial(n) * jnp.exp(log_ratio) * exp_remainder(-log_ratio, n)


def _deis_weights(sigmas, i, order):
    """DEIS weights: integral over rho in [sigma_i, sigma_{i+1}] of each Lagrange basis polynomial in log rho on
    the nodes log sigma_i, log sigma_{i-1}, ... (rho = sigma in VE scaling). With v = log(rho / sigma_i),
    d rho = sigma_i e^v dv, so the moments are sigma_i * integral_0^V v^n e^v dv."""
    sigma = sigmas[i]
    log_ratio = jnp.log(sigmas[i + 1]) - jnp.log(sigma)
    moments = [sigma * _exp_moment(n, log_ratio) for n in range(order)]
    candidates = []
    for m in range(1, order + 1):
        nodes = [jnp.log(earlier_sigma(sigmas, i - j)) - jnp.log(sigma) for j in range(m)]
        candidates.append(_lagrange_weights(nodes, moments[:m]))
    return candidates


@register("deis")
def deis(denoise, x, sigmas, key=None, *, order=2, lower_order_final=False):
    """DEIS, Zhang & Chen 2022, "Fast Sampling of Diffusion Models with Exponential Integrator": the
    rho-AB-DEIS multistep with the log-rho interpolation of diffusers' DEISMultistepScheduler: the
    noise prediction eps = (x - D) / sigma is extrapolated by a polynomial in log sigma through the last
    `order` steps and integrated exactly in rho = sigma. lower_order_final caps step i at order steps - i
    (diffusers applies its lower_order_final only below 15 steps). The step into sigma = 0 keeps its order."""
    require_order("deis", order, 3)
    x, sigmas = working_arrays(x, sigmas)
    num_steps = sigmas.shape[0] - 1

    def advance(i, x, denoised, slopes):
        step_order = warmup_order(i, num_steps, order, lower_order_final)
        return x + combine_history(pick_order(step_order, _deis_weights(sigmas, i, order), order), slopes)
    return _scan_with_history(denoise, x, sigmas, order, _record_slope, advance)


