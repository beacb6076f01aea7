"""Single-step samplers: each step uses only the current x (no history), k-diffusion/ComfyUI names.

Every sampler is `fn(denoise, x, sigmas, key=None, **options) -> x` with `denoise(x, sigma) -> x0 estimate` in
variance-exploding scaling (x = x0 + sigma * eps), `sigmas` descending and normally ending in 0. The loop over
steps is one `lax.scan` (dpm_adaptive: one `lax.while_loop`), so `sigmas` may be traced and tracing calls
`denoise` a fixed number of times whatever the step count. `fn.nfe(steps)` gives the denoiser evaluations
at run time for a grid ending in 0 (second-order samplers do one more when the grid ends above 0, because
their final step then is second order too).

Families, by how a step leaves sigma:
  * churned ODE steps (euler, heun, dpm_2): Karras et al.'s optional noise injection ("churn") raises sigma to
    sigma_hat, then one ODE step goes from sigma_hat to sigma_next;
  * ancestral steps (euler_ancestral, dpm_2_ancestral, dpmpp_2s_ancestral, ddim, ddpm): an ODE step to
    sigma_down, then fresh noise of scale sigma_up, with sigma_down^2 + sigma_up^2 = sigma_next^2;
  * dpmpp_sde and lcm, with their own noise schedules; dpm_adaptive, with step-size control.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sdjax.errors import InvalidArgumentError
from sdjax.samplers.common import (
    ancestral_step, euler_move, is_concrete_zero, log_interp, require_key, require_nonnegative, scan_steps,
    step_noise, substep_noise, to_d, unless_final, working_arrays)
from sdjax.samplers.registry import register
from sdjax.samplers.stepping import varying_carry

# Two evaluations per step, except the step into sigma = 0, which is an Euler step.
_TWO_PER_STEP_BUT_LAST = lambda steps: 2 * steps - 1


# ---- moves: move(x, sigma, denoised, sigma_to) -> x at sigma_to, built from the denoiser for extra stages ---

def _euler_move(denoise):
    """Euler: first order, no extra evaluation."""
    return euler_move


def _heun_move(denoise):
    """Heun's 2nd-order method (Karras et al. 2022, Algorithm 1): average the slopes at both ends."""
    def move(x, sigma, denoised, sigma_to):
        d = to_d(x, sigma, denoised)
        x_euler = x + d * (sigma_to - sigma)

        def heun():
            d_end = to_d(x_euler, sigma_to, denoise(x_euler, sigma_to))
            return x + (d + d_end) / 2 * (sigma_to - sigma)
        return unless_final(sigma_to, heun, lambda: x_euler)
    return move


def _dpm_2_move(denoise):
    """Midpoint method in log sigma, the VE form of DPM-Solver-2 (Lu et al. 2022) used by k-diffusion."""
    def move(x, sigma, denoised, sigma_to):
        def midpoint():
            sigma_mid = log_interp(sigma, sigma_to, 0.5)
            x_mid = euler_move(x, sigma, denoised, sigma_mid)
            d_mid = to_d(x_mid, sigma_mid, denoise(x_mid, sigma_mid))
            return x + d_mid * (sigma_to - sigma)
        return unless_final(sigma_to, midpoint, lambda: euler_move(x, sigma, denoised, sigma_to))
    return move


def _dpmpp_2s_move(denoise):
    """DPM-Solver++(2S) (Lu et al. 2022b, Algorithm 1, r = 1/2): a data-prediction step from x with x0 taken at
    the log-sigma midpoint. (Euler in VE scaling is exactly DPM-Solver++'s first-order update.)"""
    def move(x, sigma, denoised, sigma_to):
        def two_stage():
            sigma_mid = log_interp(sigma, sigma_to, 0.5)
            x_mid = euler_move(x, sigma, denoised, sigma_mid)
            return euler_move(x, sigma, denoise(x_mid, sigma_mid), sigma_to)
        return unless_final(sigma_to, two_stage, lambda: euler_move(x, sigma, denoised, sigma_to))
    return move


# ---- the two step families ---------------------------------------------------------------------------------

def _karras_churn(key, num_steps, s_churn, s_tmin, s_tmax, s_noise, name):
    """Karras et al. 2022, Algorithm 2, lines 5-6: for sigma in [s_tmin, s_tmax] raise the noise level to
    sigma_hat = sigma (1 + gamma), gamma = min(s_churn / steps, sqrt(2) - 1), by adding fresh noise.
    Returns churn(x, step, sigma) -> (x_hat, sigma_hat)."""
    if is_concrete_zero(s_churn):
        return lambda x, step, sigma: (x, sigma)
    noisy = not is_concrete_zero(s_noise)
    if noisy:
        require_key(key, name, "s_churn > 0")
    gamma = jnp.minimum(s_churn / num_steps, math.sqrt(2) - 1)

    def churn(x, step, sigma):
        in_range = (s_tmin <= sigma) & (sigma <= s_tmax)
        step_gamma = jnp.where(in_range, gamma, 0.0)
        # sqrt(sigma_hat^2 - sigma^2) written so that it is exactly 0 outside [s_tmin, s_tmax] (no branch
        # needed): the difference of squares can round (FMA) to a tiny negative number and give NaN.
        added_std = sigma * jnp.sqrt(step_gamma * (2 + step_gamma))
        if noisy:
            x = x + step_noise(key, step, x) * s_noise * added_std
        return x, sigma * (1 + step_gamma)
    return churn


def _churned_sampler(name, make_move, denoise, x, sigmas, key, s_churn, s_tmin, s_tmax, s_noise):
    require_nonnegative(name, s_churn=s_churn, s_noise=s_noise)
    x, sigmas = working_arrays(x, sigmas)
    churn = _karras_churn(key, sigmas.shape[0] - 1, s_churn, s_tmin, s_tmax, s_noise, name)
    move = make_move(denoise)

    def step(x, i, sigma, sigma_next):
        x, sigma_hat = churn(x, i, sigma)
        return move(x, sigma_hat, denoise(x, sigma_hat), sigma_next)
    return scan_steps(step, x, sigmas)


def _ancestral_sampler(name, make_move, denoise, x, sigmas, key, eta, s_noise):
    require_nonnegative(name, eta=eta, s_noise=s_noise)
    x, sigmas = working_arrays(x, sigmas)
    deterministic = is_concrete_zero(eta) or is_concrete_zero(s_noise)
    if not deterministic:
        require_key(key, name, "eta > 0")
    move = make_move(denoise)

    def step(x, i, sigma, sigma_next):
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = move(x, sigma, denoise(x, sigma), sigma_down)
        # sigma_up is 0 on the step into sigma = 0, so the final step adds nothing.
        return x if deterministic else x + step_noise(key, i, x) * s_noise * sigma_up
    return scan_steps(step, x, sigmas)


# ---- churned ODE samplers -----------------------------------------------------------------------------------

@register("euler")
def euler(denoise, x, sigmas, key=None, *, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0):
    """Euler steps of the probability-flow ODE: Karras et al. 2022, "Elucidating the Design Space of
    Diffusion-Based Generative Models", Algorithm 2 with first-order steps. s_churn > 0 adds the stochastic
    churn (needs `key`)."""
    return _churned_sampler("euler", _euler_move, denoise, x, sigmas, key, s_churn, s_tmin, s_tmax, s_noise)


@register("heun", nfe=_TWO_PER_STEP_BUT_LAST)
def heun(denoise, x, sigmas, key=None, *, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0):
    """Heun steps: Karras et al. 2022, Algorithm 2 (the stochastic sampler; deterministic Algorithm 1 when
    s_churn = 0). The step into sigma = 0 is Euler."""
    return _churned_sampler("heun", _heun_move, denoise, x, sigmas, key, s_churn, s_tmin, s_tmax, s_noise)


@register("dpm_2", nfe=_TWO_PER_STEP_BUT_LAST)
def dpm_2(denoise, x, sigmas, key=None, *, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0):
    """DPM-Solver-2 (Lu et al. 2022, "DPM-Solver", Algorithm 1 as a log-sigma midpoint rule) inside Karras et
    al.'s Algorithm 2, as k-diffusion's sample_dpm_2. The step into sigma = 0 is Euler."""
    return _churned_sampler("dpm_2", _dpm_2_move, denoise, x, sigmas, key, s_churn, s_tmin, s_tmax, s_noise)


# ---- ancestral samplers -------------------------------------------------------------------------------------

@register("euler_ancestral")
def euler_ancestral(denoise, x, sigmas, key=None, *, eta=1.0, s_noise=1.0):
    """Ancestral sampling with Euler steps (k-diffusion): an ODE step to sigma_down, then noise sigma_up.
    eta = 1 samples the exact DDPM posterior (Ho et al. 2020); eta = 0 is Euler."""
    return _ancestral_sampler("euler_ancestral", _euler_move, denoise, x, sigmas, key, eta, s_noise)


@register("dpm_2_ancestral", nfe=_TWO_PER_STEP_BUT_LAST)
def dpm_2_ancestral(denoise, x, sigmas, key=None, *, eta=1.0, s_noise=1.0):
    """Ancestral sampling with DPM-Solver-2 steps (Lu et al. 2022) to sigma_down, as k-diffusion.
    NFE formula assumes eta <= 1 (larger eta can make more steps reach sigma_down = 0 and fall back to Euler)."""
    return _ancestral_sampler("dpm_2_ancestral", _dpm_2_move, denoise, x, sigmas, key, eta, s_noise)


@register("dpmpp_2s_ancestral", nfe=_TWO_PER_STEP_BUT_LAST)
def dpmpp_2s_ancestral(denoise, x, sigmas, key=None, *, eta=1.0, s_noise=1.0):
    """Ancestral sampling with DPM-Solver++(2S) steps (Lu et al. 2022b, "DPM-Solver++", Algorithm 1) to
    sigma_down, as k-diffusion. NFE formula assumes eta <= 1, as for dpm_2_ancestral."""
    return _ancestral_sampler("dpmpp_2s_ancestral", _dpmpp_2s_move, denoise, x, sigmas, key, eta, s_noise)


@register("ddim")
def ddim(denoise, x, sigmas, key=None, *, eta=0.0):
    """DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12) in sigma space.

    With x_VE = x_VP / sqrt(alpha_bar) and sigma^2 = (1 - alpha_bar) / alpha_bar, DDIM's update
        x_prev = sqrt(a') x0 + sqrt(1 - a' - s_t^2) eps + s_t z,
        s_t^2 = eta^2 (1 - a') / (1 - a) (1 - a / a')
    divided by sqrt(a') becomes x'_VE = x0 + sigma_down eps + sigma_up z with
        sigma_up^2 = s_t^2 / a' = eta^2 sigma'^2 (sigma^2 - sigma'^2) / sigma^2,  sigma_down^2 = sigma'^2 - sigma_up^2,
    which is an Euler step to sigma_down plus noise sigma_up: k-diffusion's ancestral split. So eta = 0 is Euler
    and eta = 1 is DDPM's posterior. eta > 1 is clamped to sigma_up <= sigma' (where DDIM has no real s_t).
    """
    return _ancestral_sampler("ddim", _euler_move, denoise, x, sigmas, key, eta, 1.0)


@register("ddpm")
def ddpm(denoise, x, sigmas, key):
    """Ancestral DDPM sampling (Ho et al. 2020, Algorithm 2) between arbitrary grid points, as ComfyUI's
    sample_ddpm: draw x' from the posterior q(x' | x, x0 = denoised) with the "fixed small" variance.

    In VE scaling the forward process is x = x' + sqrt(sigma^2 - sigma'^2) z, whose posterior is
        N(x0 + (sigma'/sigma)^2 (x - x0),  sigma'^2 (sigma^2 - sigma'^2) / sigma^2),
    exactly an Euler step to sigma_down = sigma'^2 / sigma plus noise sigma_up: the ancestral split, eta = 1.
    """
    return _ancestral_sampler("ddpm", _euler_move, denoise, x, sigmas, key, 1.0, 1.0)


# ---- samplers with their own noise --------------------------------------------------------------------------

def _brownian_pair(key, step, x, sigma, sigma_mid, sigma_next):
    """Unit-variance noises for the intervals sigma -> sigma_mid and sigma -> sigma_next, correlated as
    increments of one Brownian motion in sigma (what k-diffusion's Brownian tree gives dpmpp_sde)."""
    first = substep_noise(key, step, 0, x)
    rest = substep_noise(key, step, 1, x)
    # Clamped: with r = 1, sigma_mid may round just below sigma_next.
    increment = (jnp.sqrt(jnp.maximum(sigma - sigma_mid, 0.0)) * first
                 + jnp.sqrt(jnp.maximum(sigma_mid - sigma_next, 0.0)) * rest)
    return first, increment / jnp.sqrt(sigma - sigma_next)


@register("dpmpp_sde", nfe=_TWO_PER_STEP_BUT_LAST)
def dpmpp_sde(denoise, x, sigmas, key=None, *, eta=1.0, s_noise=1.0, r=0.5):
    """Stochastic DPM-Solver++ (Lu et al. 2022b) with an SDE-DPM-Solver-2-style intermediate point at the
    fraction r of the step in log sigma, as k-diffusion's sample_dpmpp_sde. Both stages are ancestral
    (eta, s_noise). k-diffusion draws the two noises from a Brownian tree; here they are keyed normals with
    the same joint law within a step and independent across steps. The step into sigma = 0 is Euler."""
    require_nonnegative("dpmpp_sde", eta=eta, s_noise=s_noise)
    if not isinstance(r, jax.core.Tracer) and not 0 < float(r) <= 1:
        raise InvalidArgumentError(f"dpmpp_sde: r must be in (0, 1], got {float(r)}")
    deterministic = is_concrete_zero(eta) or is_concrete_zero(s_noise)
    if not deterministic:
        require_key(key, "dpmpp_sde", "eta > 0")
    x, sigmas = working_arrays(x, sigmas)

    def step(x, i, sigma, sigma_next):
        denoised = denoise(x, sigma)

        def two_stage():
            sigma_mid = log_interp(sigma, sigma_next, r)
            if deterministic:
                noise_mid = noise_next = jnp.zeros_like(x)
            else:
                noise_mid, noise_next = _brownian_pair(key, i, x, sigma, sigma_mid, sigma_next)
            sigma_down, sigma_up = ancestral_step(sigma, sigma_mid, eta)
            x_mid = euler_move(x, sigma, denoised, sigma_down) + noise_mid * s_noise * sigma_up
            # Blend the two x0 estimates so the update is second order for any r (fac = 1 / (2r)).
            blended = denoised + (denoise(x_mid, sigma_mid) - denoised) / (2 * r)
            sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
            return euler_move(x, sigma, blended, sigma_down) + noise_next * s_noise * sigma_up
        return unless_final(sigma_next, two_stage, lambda: euler_move(x, sigma, denoised, sigma_next))
    return scan_steps(step, x, sigmas)


@register("lcm")
def lcm(denoise, x, sigmas, key):
    """Latent Consistency Model multistep sampling (Luo et al. 2023, "Latent Consistency Models", Algorithm 1),
    as ComfyUI's sample_lcm: jump to the x0 estimate, then re-noise it to sigma_next with fresh noise.
    (The consistency model's c_skip/c_out boundary scalings belong to `denoise`, not to the sampler.)"""
    require_key(key, "lcm", "it re-noises every step")
    x, sigmas = working_arrays(x, sigmas)

    def step(x, i, sigma, sigma_next):
        return denoise(x, sigma) + sigma_next * step_noise(key, i, x)
    return scan_steps(step, x, sigmas)


# ---- DPM-Solver-12 / 23 with adaptive step size ------------------------------------------------------------

def _dpm_solver_pair(eps, x, s, t, order):
    """Embedded DPM-Solver pair from log-SNR time s to t (t = -log sigma; Lu et al. 2022, Algorithms 4-5):
    order 2 returns (DPM-Solver-1, DPM-Solver-2); order 3 returns (DPM-Solver-2 with r1 = 1/3, DPM-Solver-3).
    The lower-order estimate reuses the higher one's model evaluations, so a step costs `order` evaluations."""
    h = t - s
    sigma = lambda time: jnp.exp(-time)
    eps_s = eps(x, s)
    first_order = lambda time, dt: x - sigma(time) * jnp.expm1(dt) * eps_s
    x_1 = first_order(t, h)
    r1 = 1 / 2 if order == 2 else 1 / 3
    s1 = s + r1 * h
    eps_diff_1 = eps(first_order(s1, r1 * h), s1) - eps_s
    x_2 = x_1 - sigma(t) / (2 * r1) * jnp.expm1(h) * eps_diff_1
    if order == 2:
        return x_1, x_2
    r2 = 2 / 3
    s2 = s + r2 * h
    phi_2 = lambda dt: jnp.expm1(dt) / dt - 1
    u2 = first_order(s2, r2 * h) - sigma(s2) * (r2 / r1) * phi_2(r2 * h) * eps_diff_1
    x_3 = x_1 - sigma(t) / r2 * phi_2(h) * (eps(u2, s2) - eps_s)
    return x_2, x_3


def _pid_factor(errors, pcoeff, icoeff, dcoeff, order):
    """Step-size factor of a PID controller on the last three inverse errors (Söderlind 2003), passed through
    the limiter 1 + atan(f - 1) so that one step never grows or shrinks h by much."""
    b = jnp.array([pcoeff + icoeff + dcoeff, -(pcoeff + 2 * dcoeff), dcoeff], errors.dtype) / order
    factor = jnp.prod(errors**b)
    return 1 + jnp.arctan(factor - 1)


class _AdaptiveState(NamedTuple):
    x: jax.Array
    x_prev_low: jax.Array       # last accepted low-order estimate: the error tolerance's reference scale
    s: jax.Array                # current time, -log sigma
    h: jax.Array                # proposed step in -log sigma
    inverse_errors: jax.Array   # the PID controller's memory: (current, previous, one before)
    iteration: jax.Array


@register("dpm_adaptive", nfe=None)
def dpm_adaptive(denoise, x, sigmas, key=None, *, order=3, rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0.0,
                 icoeff=1.0, dcoeff=0.0, accept_safety=0.81, eta=0.0, s_noise=1.0, max_iterations=1000):
    """DPM-Solver-12 (order=2) or -23 (order=3) with adaptive step size (Lu et al. 2022, "DPM-Solver",
    Section 4.2 / Algorithm 5), with k-diffusion's PID step-size controller.

    Integrates from sigmas[0] to the smallest positive sigma of the grid (the grid's interior is ignored:
    the controller picks the steps), in one `lax.while_loop` of at most `max_iterations` trials (accepted or
    rejected; each costs `order` evaluations); when the grid ends in 0 a final denoiser call jumps to 0 (k-diffusion
    stops at sigma_min). The error norm runs over the whole batch, as in k-diffusion, so the step sizes are
    shared by the batch. eta > 0 adds ancestral noise after each accepted step (needs `key`).
    """
    if order not in (2, 3):
        raise InvalidArgumentError(f"dpm_adaptive: order must be 2 or 3, got {order!r}")
    require_nonnegative("dpm_adaptive", rtol=rtol, atol=atol, eta=eta, s_noise=s_noise)
    if not isinstance(h_init, jax.core.Tracer) and float(h_init) <= 0:
        raise InvalidArgumentError(f"dpm_adaptive: h_init must be > 0, got {float(h_init)}")
    if not isinstance(max_iterations, int) or max_iterations < 1:
        raise InvalidArgumentError(f"dpm_adaptive: max_iterations must be a positive int, got {max_iterations!r}")
    ancestral = not is_concrete_zero(eta)
    noisy = ancestral and not is_concrete_zero(s_noise)
    if noisy:
        require_key(key, "dpm_adaptive", "eta > 0")
    x, sigmas = working_arrays(x, sigmas)
    ends_in_zero = sigmas[-1] == 0
    t_end = -jnp.log(jnp.where(ends_in_zero, sigmas[-2], sigmas[-1]))
    # Ancestral steps are only order 1.5 accurate (k-diffusion's choice), so the controller assumes that order.
    controller_order = 1.5 if ancestral else order

    def eps(x, t):
        sigma = jnp.exp(-t)
        return (x - denoise(x, sigma)) / sigma

    def trial(state):
        t = jnp.minimum(t_end, state.s + state.h)
        if ancestral:
            sigma_down, _ = ancestral_step(jnp.exp(-state.s), jnp.exp(-t), eta)
            t_to = jnp.minimum(t_end, -jnp.log(sigma_down))
            noise_scale = jnp.sqrt(jnp.maximum(jnp.exp(-2 * t) - jnp.exp(-2 * t_to), 0.0)) * s_noise
        else:
            t_to = t
        x_low, x_high = _dpm_solver_pair(eps, state.x, state.s, t_to, order)

        tolerance = jnp.maximum(atol, rtol * jnp.maximum(jnp.abs(x_low), jnp.abs(state.x_prev_low)))
        error = jnp.sqrt(jnp.mean(((x_low - x_high) / tolerance) ** 2))
        inverse_error = 1 / (error + 1e-8)
        errors = jnp.where(state.iteration == 0, inverse_error, state.inverse_errors).at[0].set(inverse_error)
        factor = _pid_factor(errors, pcoeff, icoeff, dcoeff, controller_order)
        accept = factor >= accept_safety

        if noisy:
            x_high = x_high + noise_scale * step_noise(key, state.iteration, x_high)
        return _AdaptiveState(
            x=jnp.where(accept, x_high, state.x),
            x_prev_low=jnp.where(accept, x_low, state.x_prev_low),
            s=jnp.where(accept, t, state.s),
            h=state.h * factor,
            inverse_errors=jnp.where(accept, errors[jnp.array([0, 0, 1])], errors),
            iteration=state.iteration + 1)

    def unfinished(state):
        return (state.s < t_end - 1e-5) & (state.iteration < max_iterations)

    start = _AdaptiveState(x=x, x_prev_low=x, s=-jnp.log(sigmas[0]), h=jnp.asarray(h_init, x.dtype),
                           inverse_errors=jnp.ones(3, x.dtype), iteration=jnp.asarray(0))
    state = jax.lax.while_loop(unfinished, trial, varying_carry(trial, start))
    return jax.lax.cond(ends_in_zero, lambda: denoise(state.x, jnp.exp(-state.s)), lambda: state.x)

