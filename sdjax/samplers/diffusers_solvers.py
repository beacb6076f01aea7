"""Samplers that reproduce diffusers schedulers the k-diffusion-style samplers cannot express.

Same contract as singlestep.py / multistep.py: `fn(denoise, x, sigmas, key=None, **options) -> x`, `denoise(x,
sigma) -> x0` in variance-exploding scaling, `sigmas` descending and ending in 0 or in a small positive sigma,
one `lax.scan` over the steps, `fn.nfe(steps)` denoiser evaluations. They register as internal samplers: only
the plans of `sdjax.scheduler_config` name them, and the public zoo (`SAMPLERS`) does not list them.

  * dpmpp_singlestep: DPMSolverSinglestepScheduler, whose steps come in groups of up to `order` grid steps:
    each group restarts from the sample at its first grid point and re-solves to the next grid point with all
    evaluations made inside the group so far (a singlestep DPM-Solver++ whose intermediate points are grid
    points).
  * ddim_fixed_stride: DDIMScheduler when its timesteps are not num_train_timesteps // steps apart
    (timestep_spacing "linspace", or "trailing" at step counts that do not divide the schedule): diffusers
    then steps each sample to t - num_train_timesteps // steps, and the next step reads that sample as if
    it were at the next timestep.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from sdjax.errors import InvalidArgumentError
from sdjax.samplers import stepping
from sdjax.samplers.common import (
    ancestral_step, combine_history, earlier_sigma, euler_move, evaluate, is_concrete_zero, pick_order,
    push_history, require_choice, require_key, require_nonnegative, require_order, scan_steps, step_noise,
    working_arrays)
from sdjax.samplers.exponential import dpmpp_coefficients, dpmpp_data_terms, log_step, sde_noise_std
from sdjax.samplers.registry import register

MAX_SINGLESTEP_ORDER = 3


# ---- DPM-Solver++ singlestep ----------------------------------------------------------------------------------

def singlestep_orders(num_steps: int, order: int, lower_order_final: bool) -> list[int]:
    """The order of each step of DPMSolverSinglestepScheduler: groups 1, 2, ..., order, repeated.

    A group of order k ends k grid steps after it starts. With lower_order_final the tail that does not fill
    a group becomes a shorter group, and when it would be empty the last full group gives its final step to
    a first-order group of its own. Without it the steps must fill whole groups (diffusers switches
    lower_order_final on otherwise), so the same rule applies then too.
    """
    full_groups, tail = divmod(num_steps, order)
    if not lower_order_final and tail == 0:
        return list(range(1, order + 1)) * full_groups
    if tail:
        return list(range(1, order + 1)) * full_groups + list(range(1, tail + 1))
    return list(range(1, order + 1)) * (full_groups - 1) + list(range(1, order)) + [1]


def _group_weights(sigma_start, sigma_mid, sigma_last, sigma_to, eta, solver_type):
    """The decay e^-H and the weights w of the group update x_to = e^-H x_start + sum_j w_j D_j (D_0 the newest
    evaluation), for groups of order 1, 2 and 3 (DPM-Solver++, Lu et al. 2022b, singlestep form; eta > 0 is its
    SDE variant). A group of order k evaluated at sigma_start, then (k = 3) sigma_mid, then sigma_last; only
    the candidate of the order whose group starts at sigma_start means anything.

    The step has length h = lambda_to - lambda_start and is expanded at its start, so the group's later
    evaluations lie ahead of it (negative ratios, see `exponential.dpmpp_data_terms`). "midpoint" at order 3
    keeps only the difference to the newest point, with the Taylor weight; "heun" keeps both Taylor terms.
    """
    h = log_step(sigma_start, sigma_to)
    coefficients = dpmpp_coefficients(h, eta)
    ahead = lambda sigma: -log_step(sigma_start, sigma) / h
    newest, middle, oldest = jnp.eye(3, dtype=coefficients.phi_1.dtype)   # slots of (D_0, D_1, D_2)
    terms = lambda values, ratios, kind=solver_type: dpmpp_data_terms(coefficients, values, ratios, kind, 2.0)

    order_1 = terms([newest], [])
    order_2 = terms([middle, newest], [ahead(sigma_last)])       # D at the start is slot 1
    if solver_type == "midpoint":
        order_3 = terms([oldest, newest], [ahead(sigma_last)], "heun")
    else:
        order_3 = terms([oldest, middle, newest], [ahead(sigma_mid), ahead(sigma_last) - ahead(sigma_mid)])
    return coefficients.decay, [order_1, order_2, order_3]


@register("dpmpp_singlestep", internal=True)
def dpmpp_singlestep(denoise, x, sigmas, key=None, *, order=2, solver_type="midpoint", lower_order_final=True,
                     eta=0.0, s_noise=1.0, steps_before=0):
    """Singlestep DPM-Solver++ (Lu et al. 2022b, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
    Probabilistic Models", its singlestep solvers with the intermediate points on the grid), as diffusers'
    DPMSolverSinglestepScheduler: step i belongs to a group of order k = singlestep_orders(...)[i]; a group's
    first step is a first-order step from x, its k-th step re-solves from the group's starting sample to
    sigma_{i+1} with the k evaluations of the group. Every step costs one evaluation.

    solver_type "midpoint" or "heun" picks the higher-order terms; lower_order_final shortens the final group
    (see `singlestep_orders`); the step into sigma = 0 is first order. eta > 0 gives the SDE variant
    (algorithm_type "sde-dpmsolver++" is eta = 1), with fresh noise each step from `key`.

    steps_before: steps of the full schedule cut off before `sigmas` (img2img's strength). The group pattern is
    the full schedule's, as diffusers keeps it, and a group cut by the start runs at the order its evaluations
    so far allow.
    """
    require_order("dpmpp_singlestep", order, MAX_SINGLESTEP_ORDER)
    require_choice("dpmpp_singlestep", "solver_type", solver_type, ("midpoint", "heun"))
    require_nonnegative("dpmpp_singlestep", eta=eta, s_noise=s_noise)
    noisy = not (is_concrete_zero(eta) or is_concrete_zero(s_noise))
    if noisy:
        require_key(key, "dpmpp_singlestep", "eta > 0")
    x, sigmas = working_arrays(x, sigmas)
    num_steps = sigmas.shape[0] - 1
    pattern = singlestep_orders(steps_before + num_steps, order, lower_order_final)[steps_before:]
    orders = jnp.asarray([min(k, j + 1) for j, k in enumerate(pattern)])

    def body(carry, step):
        x, x_start, history = carry
        i, step_order = step
        history = push_history(history, evaluate(denoise, x, sigmas[i]))
        sigma_to = sigmas[i + 1]
        # Extrapolating into sigma = 0 is meaningless (h = inf): that step is x = D, a group of its own.
        step_order = jnp.where(sigma_to > 0, step_order, 1)
        x_start = jnp.where(step_order == 1, x, x_start)
        sigma_start = earlier_sigma(sigmas, i - step_order + 1)
        decay, candidates = _group_weights(sigma_start, earlier_sigma(sigmas, i - 1), sigmas[i], sigma_to, eta,
                                           solver_type)
        weights = pick_order(step_order, candidates, MAX_SINGLESTEP_ORDER)[:order]
        x_next = decay * x_start + combine_history(weights, history)
        if noisy:   # the noise of the whole group's step
            x_next = x_next + step_noise(key, i, x) * (sde_noise_std(sigma_start, sigma_to, eta) * s_noise)
        return (x_next, x_start, history), None

    history = jnp.zeros((order,) + x.shape, x.dtype)
    x, _, _ = stepping.scan(body, (x, x, history), (jnp.arange(num_steps), orders))
    return x


# ---- DDIM with diffusers' fixed stride --------------------------------------------------------------------------

@register("ddim_fixed_stride", internal=True)
def ddim_fixed_stride(denoise, x, sigmas, key=None, *, targets=(), eta=0.0):
    """DDIM (Song et al. 2021) as diffusers' DDIMScheduler steps when its timesteps are unevenly spaced.

    Step i evaluates at sigmas[i] and takes the DDIM step (an Euler step to sigma_down plus noise sigma_up,
    see singlestep.ddim) to targets[i], the noise level of t_i - num_train_timesteps // steps. The next step
    then reads that variance-preserving sample as if it were at sigmas[i + 1]; in VE scaling that is the
    factor sqrt((1 + sigmas[i+1]^2) / (1 + targets[i]^2)). With targets = sigmas[1:] this is ddim.
    `targets` has one noise level per step (a tuple, so that it can be a static option); the last one must
    be sigmas[-1].
    """
    require_nonnegative("ddim_fixed_stride", eta=eta)
    deterministic = is_concrete_zero(eta)
    if not deterministic:
        require_key(key, "ddim_fixed_stride", "eta > 0")
    x, sigmas = working_arrays(x, sigmas)
    targets = jnp.asarray(np.asarray(targets, np.float64), x.dtype)
    if targets.shape != (sigmas.shape[0] - 1,):
        raise InvalidArgumentError(f"ddim_fixed_stride: targets must hold one sigma per step "
                                   f"({sigmas.shape[0] - 1}), got shape {targets.shape}")

    def step(x, i, sigma, sigma_next):
        target = targets[i]
        sigma_down, sigma_up = ancestral_step(sigma, target, eta)
        x = euler_move(x, sigma, denoise(x, sigma), sigma_down)
        if not deterministic:
            x = x + step_noise(key, i, x) * sigma_up
        return x * jnp.sqrt((1 + sigma_next**2) / (1 + target**2))
    return scan_steps(step, x, sigmas)

