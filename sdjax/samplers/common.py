"""Pieces shared by the samplers: the ODE derivative, ancestral splitting, per-step noise, validation,
and the history ring of the multistep methods.

Conventions (k-diffusion): `denoise(x, sigma) -> x0 estimate`, x in variance-exploding scaling
(x = x0 + sigma * eps), `sigmas` descending and ending in 0. Arithmetic is float32/float64.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.errors import InvalidArgumentError
from sdjax.samplers import stepping


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


# ---- Sampler plumbing ---------------------------------------------------------------------------------------

def is_concrete_zero(value) -> bool:
    """True for a concrete 0 option: lets a sampler skip noise it would only multiply by zero."""
    return not isinstance(value, jax.core.Tracer) and float(value) == 0.0


def require_nonnegative(sampler_name: str, **values):
    """Raise an InvalidArgumentError naming the first concrete option below 0 (traced values pass unchecked)."""
    for name, value in values.items():
        if not isinstance(value, jax.core.Tracer) and float(value) < 0:
            raise InvalidArgumentError(f"{sampler_name}: {name} must be >= 0, got {float(value)}")


def require_key(key, sampler_name: str, reason: str):
    """Raise an InvalidArgumentError when a stochastic sampler was given no PRNG key."""
    if key is None:
        raise InvalidArgumentError(f"{sampler_name} draws noise ({reason}): pass key=jax.random.key(seed)")


def working_arrays(x, sigmas):
    """x in at least float32 and sigmas in x's dtype: sampler arithmetic never runs in half precision."""
    x = jnp.asarray(x)
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return x, jnp.asarray(sigmas, x.dtype)


def substep_noise(key, step, draw, x):
    """Standard normal noise for the `draw`-th draw within step `step`: still a pure function of the key."""
    return step_noise(jax.random.fold_in(key, step), draw, x)


def evaluate(denoise, x, sigma):
    """The denoiser's estimate in x's dtype (a model may compute in lower precision)."""
    return jnp.asarray(denoise(x, sigma), x.dtype)


def scan_steps(step, x, sigmas):
    """Run `x = step(x, i, sigma, sigma_next)` over consecutive pairs of the grid as one lax.scan."""
    def body(x, pair):
        return step(x, *pair), None

    indices = jnp.arange(sigmas.shape[0] - 1)
    return stepping.scan(body, x, (indices, sigmas[:-1], sigmas[1:]))


def euler_move(x, sigma, denoised, sigma_to):
    """One Euler step of the probability-flow ODE from sigma to sigma_to (also DDIM's update in VE scaling)."""
    return x + to_d(x, sigma, denoised) * (sigma_to - sigma)


def log_interp(sigma_from, sigma_to, fraction):
    """The sigma `fraction` of the way from sigma_from to sigma_to in log sigma (1/2: the geometric mean)."""
    return jnp.exp(jnp.log(sigma_from) + fraction * (jnp.log(sigma_to) - jnp.log(sigma_from)))


def unless_final(sigma_to, higher_order, first_order):
    """`higher_order()` while sigma_to > 0, else `first_order()`.

    Higher-order stages need a derivative at sigma_to or between, which is undefined at sigma = 0, so the step
    into 0 falls back to Euler. lax.cond runs only the taken branch: the skipped denoiser call costs nothing.
    """
    return jax.lax.cond(sigma_to > 0, higher_order, first_order)


# ---- Multistep plumbing: multistep.py, unipc.py, diffusers_solvers.py ----------------------------------------

def earlier_sigma(sigmas, index):
    """sigmas[index], or sigmas[0] while the (traced) index is negative, before the run has that much history.
    Weights computed from the clamped sigma may be non-finite; `pick_order` keeps them out of the result."""
    return sigmas[jnp.maximum(index, 0)]


def push_history(history, value):
    """Push onto a fixed-size ring of past records, newest first: history[j] is the record of j steps ago."""
    return jnp.concatenate([value[None].astype(history.dtype), history[:-1]])


def combine_history(weights, history):
    """sum_j weights[j] * history[j]: the linear combination every multistep update is made of."""
    return jnp.tensordot(jnp.asarray(weights, history.dtype), history, axes=1)


def warmup_order(step, num_steps, max_order, lower_order_final=False):
    """Order of a multistep method at (traced) `step`: min(step + 1, max_order) while its history fills up.

    With `lower_order_final` also at most num_steps - step, so the last steps drop to orders 2 and 1
    (diffusers' `lower_order_final`, which keeps the final steps of short schedules stable).
    """
    order = jnp.minimum(step + 1, max_order)
    if lower_order_final:
        order = jnp.minimum(order, num_steps - step)
    return order


def require_order(sampler_name: str, order, max_order: int, name: str = "order"):
    """Raise an InvalidArgumentError unless `order` is a Python int in 1..max_order (it sizes the history)."""
    if not isinstance(order, (int, np.integer)) or isinstance(order, bool) or not 1 <= order <= max_order:
        raise InvalidArgumentError(f"{sampler_name}: {name} must be an integer in 1..{max_order}, got {order!r}")


def require_choice(sampler_name: str, name: str, value, choices):
    """Raise an InvalidArgumentError naming the option unless `value` is one of `choices`."""
    if value not in choices:
        raise InvalidArgumentError(
            f"{sampler_name}: {name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def pick_order(order, candidates, width):
    """candidates[order - 1] as an array, each candidate a list of scalar weights zero-padded to `width`.

    `order` may be traced. Indexing, unlike masking with arithmetic, keeps the non-finite weights of orders the
    history cannot support yet (repeated nodes early in a run) out of the result.
    """
    rows = []
    for weights in candidates:
        weights = [jnp.asarray(w) for w in weights]
        rows.append(jnp.stack(weights + [jnp.zeros_like(weights[0])] * (width - len(weights))))
    return jnp.stack(rows)[order - 1]
