"""UniPC (Zhao et al. 2023): a multistep predictor with a corrector that reuses the next step's evaluation.

Written in variance-exploding scaling on the data prediction D (diffusers' predict_x0=True), in
lambda = -log sigma. Conventions as in multistep.py: one lax.scan, a fixed-size history ring, update weights
computed from the (possibly traced) grid.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from sdjax.errors import InvalidArgumentError
from sdjax.samplers import stepping
from sdjax.samplers.common import (
    combine_history, earlier_sigma, evaluate, pick_order, push_history, require_choice, require_order,
    warmup_order, working_arrays)
from sdjax.samplers.exponential import exp_remainder, log_step
from sdjax.samplers.registry import register

MAX_ORDER = 3


def _update_weights(sigma_from, sigma_to, earlier_sigmas, include_target, variant):
    """Weights of one UniPC update of x from sigma_from to sigma_to: UniP-p (the predictor) or, with
    include_target, UniC-p (the corrector), in their multistep data-prediction form (Zhao et al. 2023, as
    diffusers' UniPCMultistepScheduler computes them):

        x_to = (sigma_to / sigma_from) x - expm1(-h) D_from - B(h) sum_k rho_k (D_k - D_from) / r_k

    over the evaluations at `earlier_sigmas` (newest first) and, for the corrector, the one at sigma_to
    itself (node r = 1). Here h = log(sigma_from / sigma_to), r_k = log(sigma_from / sigma_k) / h < 0,
    B(h) = -h ("bh1") or expm1(-h) ("bh2"), and rho solves sum_k r_k^(j-1) rho_k = j! R_j(-h) / ((-h)^j B(h)),
    j = 1..q, with R_j(z) = e^z - (Taylor polynomial of degree j); with a single difference the reference
    fixes rho = 1/2 instead.

    Returns (weight of D_from, weights of the earlier D's, weight of D_to or None).
    """
    h = log_step(sigma_from, sigma_to)
    hh = -h
    b_of_h = hh if variant == "bh1" else jnp.expm1(hh)
    nodes = [log_step(sigma_from, s) / h for s in earlier_sigmas]
    if include_target:
        nodes.append(jnp.ones_like(h))
    weight_from = -jnp.expm1(hh)
    if not nodes:
        return weight_from, [], None
    if len(nodes) == 1:
        rhos = [0.5 * jnp.ones_like(h)]
    else:
        b = jnp.stack([math.factorial(j) * exp_remainder(hh, j) / hh ** j / b_of_h
                       for j in range(1, len(nodes) + 1)])
        vandermonde = jnp.stack([jnp.stack([r ** j for r in nodes]) for j in range(len(nodes))])
        solution = jnp.linalg.solve(vandermonde, b)
        rhos = [solution[k] for k in range(len(nodes))]
    differences = [-b_of_h * rho / r for rho, r in zip(rhos, nodes)]   # weights of (D_k - D_from)
    weight_from = weight_from - sum(differences)
    if include_target:
        return weight_from, differences[:-1], differences[-1]
    return weight_from, differences, None


def _past_sigmas(sigmas, i, count):
    """sigmas[i - 1], ..., sigmas[i - count] (clamped at sigmas[0], see `earlier_sigma`)."""
    return [earlier_sigma(sigmas, i - k) for k in range(1, count + 1)]


def _predictor_weights(sigmas, i, order, variant):
    """Candidate p - 1: UniP-p from sigma_i to sigma_{i+1}, over the history [D_i, D_{i-1}, ...]."""
    candidates = []
    for p in range(1, order + 1):
        earlier = _past_sigmas(sigmas, i, p - 1)
        weight_from, weights_earlier, _ = _update_weights(sigmas[i], sigmas[i + 1], earlier, False, variant)
        candidates.append([weight_from] + weights_earlier)
    return candidates


def _corrector_weights(sigmas, i, order, variant):
    """Candidate p - 1: UniC-p redoing the step sigma_{i-1} -> sigma_i with D_i, over [D_i, D_{i-1}, ...]."""
    sigma_from = earlier_sigma(sigmas, i - 1)   # step 0 has nothing to correct: its weights go unused
    candidates = []
    for p in range(1, order + 1):
        earlier = _past_sigmas(sigmas, i - 1, p - 1)
        weight_from, weights_earlier, weight_to = _update_weights(sigma_from, sigmas[i], earlier, True, variant)
        candidates.append([weight_to, weight_from] + weights_earlier)
    return candidates


def _corrector_mask(num_steps, disable_corrector):
    """corrected[i]: whether x at step i (i >= 1) is corrected, i.e. step i - 1 is not in disable_corrector."""
    disabled = set(int(step) for step in disable_corrector)
    return np.array([i > 0 and (i - 1) not in disabled for i in range(num_steps)])


@register("unipc")
def unipc(denoise, x, sigmas, key=None, *, order=2, variant="bh2", lower_order_final=True, disable_corrector=()):
    """UniPC, Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
    Models": multistep UniP-p predictor plus the UniC corrector, which redoes the previous step with the
    evaluation at its end, so correction costs no extra evaluation. Data prediction, as diffusers'
    UniPCMultistepScheduler (predict_x0=True) with its defaults: order 2, variant "bh2" (the paper's
    B(h) = e^h - 1; "bh1" is B(h) = h), lower_order_final (step i has order at most steps - i).
    disable_corrector lists steps whose result is not corrected. The step into sigma = 0 is always first order
    (x = D): higher orders divide by r = 0 there (diffusers' bh1 even returns NaN)."""
    require_order("unipc", order, MAX_ORDER)
    require_choice("unipc", "variant", variant, ("bh1", "bh2"))
    x, sigmas = working_arrays(x, sigmas)
    num_steps = sigmas.shape[0] - 1
    try:
        corrected_at = jnp.asarray(_corrector_mask(num_steps, disable_corrector))
    except (TypeError, ValueError):
        raise InvalidArgumentError(
            f"unipc: disable_corrector must be a sequence of step indices, got {disable_corrector!r}") from None

    def body(carry, i):
        x, x_before, history, order_before = carry
        denoised = evaluate(denoise, x, sigmas[i])
        history = push_history(history, denoised)
        # UniC: redo the previous step with D_i; D_i itself stays the evaluation at the uncorrected x.
        corrector = pick_order(order_before, _corrector_weights(sigmas, i, order, variant), order + 1)
        x_corrected = sigmas[i] / earlier_sigma(sigmas, i - 1) * x_before + combine_history(corrector, history)
        x = jnp.where(corrected_at[i], x_corrected, x)
        step_order = warmup_order(i, num_steps, order, lower_order_final)
        step_order = jnp.where(sigmas[i + 1] > 0, step_order, 1).astype(jnp.int32)
        predictor = pick_order(step_order, _predictor_weights(sigmas, i, order, variant), order + 1)
        x_next = sigmas[i + 1] / sigmas[i] * x + combine_history(predictor, history)
        return (x_next, x, history, step_order), None

    history = jnp.zeros((order + 1,) + x.shape, x.dtype)
    carry = (x, x, history, jnp.ones((), jnp.int32))
    x, *_ = stepping.scan(body, carry, jnp.arange(num_steps))
    return x
