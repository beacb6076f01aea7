"""Noise schedules: training betas and alphas, inference timesteps, and sigma grids for the samplers.

Everything here is host-side numpy in float64: a schedule is computed once per (name, steps) and handed to
a jitted sampler as an ordinary array argument, where it is traced like any other input (a new grid of the
same length never recompiles).

Notation. A discrete-time model is trained on N timesteps t = 0..N-1 with cumulative signal fraction
alphas_cumprod[t] (alpha-bar). Its noise level in variance-exploding scaling is
sigma[t] = sqrt((1 - alpha_bar[t]) / alpha_bar[t]); `sigma_table` gives that table, ascending in t.

Sigma grids (what samplers consume) are 1-D arrays, descending, ending in 0. Two kinds of builder:

- continuous, by range: `karras`, `exponential`, `polyexponential` take `(steps, sigma_min, sigma_max, ...)`;
  `vp` takes the continuous VP-SDE's own parameters (k-diffusion's `get_sigmas_*`).
- on the model's sigma table: `normal`, `simple`, `sgm_uniform`, `ddim_uniform`, `beta` (ComfyUI's
  schedulers) and `spaced` (diffusers' `timestep_spacing`) take `(steps, model_sigmas, ...)`.

The registry `SCHEDULES[name](steps, model_sigmas, **options)` gives every name one call signature: range
builders take their sigma_min/sigma_max from the ends of `model_sigmas` unless passed as options (as
ComfyUI does), table builders read the table, and `vp` ignores it. `model_sigmas` may be None for the
range builders when both ends are given and for `vp`.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import numpy as np

from sdjax.errors import ConfigError, InvalidArgumentError, did_you_mean

# diffusers' EulerDiscreteScheduler floors a zero terminal alpha-bar to this (the smallest positive fp16
# subnormal) so that the largest sigma stays finite (about 4096) under zero-terminal-SNR rescaling.
ZERO_SNR_ALPHA_BAR = 2.0**-24

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


# --------------------------------------------------------------------------------------- argument checks

def _check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps <= 0:
        raise InvalidArgumentError(f"steps must be a positive integer, got {steps!r}")
    return int(steps)


def _check_positive(name: str, value) -> float:
    if not np.isfinite(value) or value <= 0:
        raise InvalidArgumentError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_range(sigma_min, sigma_max) -> tuple[float, float]:
    sigma_min = _check_positive("sigma_min", sigma_min)
    sigma_max = _check_positive("sigma_max", sigma_max)
    if sigma_min >= sigma_max:
        raise InvalidArgumentError(f"sigma_min ({sigma_min}) must be < sigma_max ({sigma_max})")
    return sigma_min, sigma_max


def _check_table(model_sigmas) -> np.ndarray:
    if model_sigmas is None:
        raise InvalidArgumentError("model_sigmas is required: pass the model's sigma table "
                                   "(sdjax.schedules.sigma_table(alphas_cumprod))")
    table = np.asarray(model_sigmas, np.float64)
    if table.ndim != 1 or table.size < 2:
        raise InvalidArgumentError(f"model_sigmas must be a 1-D table of at least 2 sigmas, got shape {table.shape}")
    if not (np.all(table > 0) and np.all(np.isfinite(table)) and np.all(np.diff(table) > 0)):
        raise InvalidArgumentError("model_sigmas must be finite, > 0 and strictly ascending in the timestep "
                                   "(sigma_table(alphas_cumprod) gives that order)")
    return table


def _append_zero(sigmas) -> np.ndarray:
    return np.append(np.asarray(sigmas, np.float64), 0.0)


# ---------------------------------------------------------------------------- training-time noise schedule

def _cosine_alpha_bar(t):
    """Nichol & Dhariwal 2021, eq. 17 with s = 0.008, normalised so that alpha_bar(0) = 1 in the ratio below."""
    return np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2


def betas(beta_schedule: str = "linear", num_train_timesteps: int = 1000, beta_start: float = 0.0001,
          beta_end: float = 0.02, max_beta: float = 0.999) -> np.ndarray:
    """Per-timestep betas as diffusers' schedulers build them (argument names and defaults are its config keys).

    linear: beta_start..beta_end evenly; scaled_linear: evenly in sqrt(beta), squared (Stable Diffusion's);
    squaredcos_cap_v2: beta_t = min(1 - alpha_bar((t+1)/N) / alpha_bar(t/N), max_beta) with the cosine
    alpha_bar of improved DDPM (beta_start/beta_end unused). diffusers rounds these to float32; here float64.
    """
    n = _check_steps(num_train_timesteps)
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, n, dtype=np.float64)
    if beta_schedule == "scaled_linear":
        return np.linspace(math.sqrt(beta_start), math.sqrt(beta_end), n, dtype=np.float64) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        t = np.arange(n + 1, dtype=np.float64) / n
        alpha_bar = _cosine_alpha_bar(t)
        return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], max_beta)
    raise InvalidArgumentError(f"unknown beta_schedule {beta_schedule!r}; valid: {', '.join(BETA_SCHEDULES)}")


def rescale_zero_terminal_snr(betas_: np.ndarray) -> np.ndarray:
    """Betas whose last timestep has zero SNR (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample
    Steps are Flawed", Algorithm 1): shift sqrt(alpha_bar) so its last value is 0, scale it so its first value
    is unchanged, and convert back to betas."""
    sqrt_alpha_bar = np.sqrt(np.cumprod(1.0 - np.asarray(betas_, np.float64)))
    first, last = sqrt_alpha_bar[0], sqrt_alpha_bar[-1]
    alpha_bar = ((sqrt_alpha_bar - last) * (first / (first - last))) ** 2
    return 1.0 - np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])


def alphas_cumprod(betas_: np.ndarray) -> np.ndarray:
    """alpha_bar_t = prod_{s <= t} (1 - beta_s)."""
    return np.cumprod(1.0 - np.asarray(betas_, np.float64))


def alphas_cumprod_from_config(config: Mapping) -> np.ndarray:
    """alpha_bar from a diffusers scheduler config (scheduler_config.json as a dict), diffusers' defaults
    filling missing keys: trained_betas, beta_schedule, beta_start, beta_end, num_train_timesteps,
    rescale_betas_zero_snr."""
    if config.get("trained_betas") is not None:
        betas_ = np.asarray(config["trained_betas"], np.float64)
    else:
        try:
            betas_ = betas(config.get("beta_schedule", "linear"), config.get("num_train_timesteps", 1000),
                           config.get("beta_start", 0.0001), config.get("beta_end", 0.02))
        except InvalidArgumentError as error:
            raise ConfigError(f"scheduler config: {error}") from None
    if config.get("rescale_betas_zero_snr", False):
        betas_ = rescale_zero_terminal_snr(betas_)
    return alphas_cumprod(betas_)


def sigma_table(alphas_cumprod_: np.ndarray) -> np.ndarray:
    """The model's noise levels sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), ascending in t.

    A zero alpha_bar (zero terminal SNR) is floored to ZERO_SNR_ALPHA_BAR as diffusers' Euler-family
    schedulers do, so the table stays finite.
    """
    alpha_bar = np.maximum(np.asarray(alphas_cumprod_, np.float64), ZERO_SNR_ALPHA_BAR)
    return np.sqrt((1.0 - alpha_bar) / alpha_bar)


# ------------------------------------------------------------------------ diffusers' inference timesteps

def timesteps(steps: int, timestep_spacing: str = "leading", num_train_timesteps: int = 1000,
              steps_offset: int = 0, *, integer: bool = True, drop_final_point: bool = False) -> np.ndarray:
    """Descending inference timesteps (float64) as diffusers' `set_timesteps` lays them out (Lin et al. 2023,
    Table 2).

    linspace: `steps` points evenly over [0, N-1]; leading: multiples of N // steps, plus `steps_offset`;
    trailing: N - 1 downward in strides of N / steps, rounded.
    `integer=False` keeps linspace's fractional points (Euler, Heun, LMS); DDIM, DDPM, PNDM and the multistep
    solvers round them. `drop_final_point=True` reproduces DPM-Solver, UniPC and DEIS, which lay steps + 1
    points for linspace/leading and drop the smallest (the solver's end point).
    """
    steps = _check_steps(steps)
    n = _check_steps(num_train_timesteps)
    if steps > n:
        raise InvalidArgumentError(f"steps ({steps}) must be <= num_train_timesteps ({n}): a grid of distinct "
                                   "training timesteps cannot be longer than the schedule")
    points = steps + 1 if drop_final_point else steps
    if timestep_spacing == "linspace":
        t = np.linspace(0, n - 1, points)
        t = np.round(t) if integer else t
        return t[::-1][:steps].copy()
    if timestep_spacing == "leading":
        return (np.arange(points) * (n // points))[::-1][:steps] + float(steps_offset)
    if timestep_spacing == "trailing":
        # np.arange with a float stride, exactly as diffusers, so the rounding agrees at every step count.
        return np.round(np.arange(n, 0, -n / steps)) - 1.0
    raise InvalidArgumentError(
        f"unknown timestep_spacing {timestep_spacing!r}; valid: {', '.join(TIMESTEP_SPACINGS)}")


def sigmas_at_timesteps(timesteps_, model_sigmas) -> np.ndarray:
    """sigma at (possibly fractional) timesteps, linear in sigma between table entries, as diffusers does."""
    table = _check_table(model_sigmas)
    return np.interp(np.asarray(timesteps_, np.float64), np.arange(table.size), table)


def spaced(steps: int, model_sigmas, timestep_spacing: str = "leading", steps_offset: int = 0, *,
           integer: bool = False, drop_final_point: bool = False) -> np.ndarray:
    """The sigma grid of a diffusers discrete scheduler: sigma at `timesteps(...)`, then 0.

    Defaults match EulerDiscreteScheduler (fractional linspace); see `timesteps` for the options.
    """
    t = timesteps(steps, timestep_spacing, len(_check_table(model_sigmas)), steps_offset,
                  integer=integer, drop_final_point=drop_final_point)
    return _append_zero(sigmas_at_timesteps(t, model_sigmas))


# ------------------------------------------------------------------------------- continuous sigma grids

def karras(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 (EDM), eq. 5: evenly spaced in sigma^(1/rho) from sigma_max to sigma_min."""
    steps = _check_steps(steps)
    sigma_min, sigma_max = _check_range(sigma_min, sigma_max)
    rho = _check_positive("rho", rho)
    ramp = np.linspace(0.0, 1.0, steps)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def exponential(steps: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    """Evenly spaced in log sigma from sigma_max to sigma_min."""
    return polyexponential(steps, sigma_min, sigma_max, rho=1.0)


def polyexponential(steps: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> np.ndarray:
    """log sigma = log sigma_min + r^rho (log sigma_max - log sigma_min), r from 1 to 0 evenly (rho = 1:
    exponential; rho > 1 spends more steps at low noise)."""
    steps = _check_steps(steps)
    sigma_min, sigma_max = _check_range(sigma_min, sigma_max)
    rho = _check_positive("rho", rho)
    ramp = np.linspace(1.0, 0.0, steps) ** rho
    log_min, log_max = math.log(sigma_min), math.log(sigma_max)
    return _append_zero(np.exp(log_min + ramp * (log_max - log_min)))


def vp(steps: int, beta_d: float = 19.9, beta_min: float = 0.1, eps_s: float = 1e-3) -> np.ndarray:
    """The continuous VP-SDE (Song et al. 2021) at t evenly from 1 to eps_s:
    sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
    steps = _check_steps(steps)
    beta_d = _check_positive("beta_d", beta_d)
    if not beta_min >= 0:
        raise InvalidArgumentError(f"beta_min must be >= 0, got {beta_min!r}")
    if not 0 < eps_s < 1:
        raise InvalidArgumentError(f"eps_s must be in (0, 1), got {eps_s!r}")
    t = np.linspace(1.0, eps_s, steps)
    return _append_zero(np.sqrt(np.expm1(beta_d * t**2 / 2 + beta_min * t)))


# ----------------------------------------------------------------- ComfyUI's schedulers on the sigma table

def _near_zero(sigma: float) -> bool:
    # ComfyUI's test for tables whose lowest sigma already acts as the end point (it then appends no 0).
    return math.isclose(sigma, 0.0, abs_tol=1e-5)


def _log_interp_sigma(t, table) -> np.ndarray:
    """sigma at fractional timesteps t, linear in log sigma between table entries (k-diffusion/ComfyUI)."""
    return np.exp(np.interp(t, np.arange(table.size), np.log(table)))


def normal(steps: int, model_sigmas, *, sgm: bool = False) -> np.ndarray:
    """Timesteps evenly from N-1 to 0, sigma by log-linear interpolation of the table, then 0.

    This is k-diffusion's `DiscreteSchedule.get_sigmas` and A1111's default. `sgm=True` (sgm_uniform) lays
    steps + 1 timesteps and drops t = 0, as Stability's sgm code samples.
    """
    steps = _check_steps(steps)
    table = _check_table(model_sigmas)
    t_max = table.size - 1
    if sgm:
        return _append_zero(_log_interp_sigma(np.linspace(t_max, 0, steps + 1)[:-1], table))
    if _near_zero(table[0]):
        return _log_interp_sigma(np.linspace(t_max, 0, steps + 1), table)
    return _append_zero(_log_interp_sigma(np.linspace(t_max, 0, steps), table))


def sgm_uniform(steps: int, model_sigmas) -> np.ndarray:
    """`normal` with sgm=True."""
    return normal(steps, model_sigmas, sgm=True)


def simple(steps: int, model_sigmas) -> np.ndarray:
    """Table entries counted down from the top in strides of N / steps (truncated to an index), then 0."""
    steps = _check_steps(steps)
    table = _check_table(model_sigmas)
    offsets = (np.arange(steps) * (table.size / steps)).astype(np.int64)
    return _append_zero(table[table.size - 1 - offsets])


def ddim_uniform(steps: int, model_sigmas) -> np.ndarray:
    """Table entries at t = 1, 1 + k, 1 + 2k, ... below N with stride k = N // steps, descending, then 0.

    As in ComfyUI, the grid can hold more than `steps` steps when the stride does not divide N - 1 evenly
    (e.g. 1000 timesteps, 30 steps: 31). A table whose t = 1 sigma is ~0 uses that entry as the end instead.
    """
    steps = _check_steps(steps)
    table = _check_table(model_sigmas)
    ends_in_table = _near_zero(table[1])
    stride = max(table.size // (steps + 1 if ends_in_table else steps), 1)
    picked = table[1::stride][::-1]
    return picked.copy() if ends_in_table else _append_zero(picked)


def beta(steps: int, model_sigmas, alpha: float = 0.6, beta: float = 0.6) -> np.ndarray:
    """Lee et al. 2024, "Beta Sampling is All You Need": timesteps at Beta(alpha, beta) quantiles of
    1 - i/steps (i = 0..steps-1), rounded to the nearest table index, repeats dropped, then 0. With the
    default alpha = beta = 0.6 steps cluster at both ends of the noise range."""
    steps = _check_steps(steps)
    table = _check_table(model_sigmas)
    quantiles = 1.0 - np.arange(steps) / steps
    t = beta_ppf(quantiles, alpha, beta) * (table.size - 1)
    # Snap away the inverse's last-bit error first, so that exact ties (the median of a symmetric Beta lands
    # on 499.5) round half-to-even as the exact value does.
    t = np.rint(np.round(t, 6)).astype(np.int64)
    keep = np.concatenate([[True], t[1:] != t[:-1]])
    return _append_zero(table[t[keep]])


# ------------------------------------------------------------------- Beta distribution's inverse CDF

def _log_beta_function(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def _betainc_continued_fraction(a, b, x, log_beta: float, iterations: int = 300) -> np.ndarray:
    """I_x(a, b) by its continued fraction (DLMF 8.17.22), evaluated with the modified Lentz method.

    Elementwise in (a, b, x); log_beta = log B(a, b), symmetric in a and b. It converges fast for
    x < (a + 1) / (a + b + 2), which `beta_cdf` ensures.
    """
    tiny = 1e-300

    def guard(v):  # Lentz's guard against a zero denominator
        return np.where(np.abs(v) < tiny, tiny, v)

    c = np.ones_like(x)
    d = 1.0 / guard(1.0 - (a + b) * x / (a + 1.0))
    fraction = d
    for m in range(1, iterations + 1):
        even = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        for numerator in (even, odd):
            d = 1.0 / guard(1.0 + numerator * d)
            c = guard(1.0 + numerator / c)
            fraction = fraction * c * d
        if np.all(np.abs(c * d - 1.0) < 1e-15):
            break
    log_front = a * np.log(x) + b * np.log1p(-x) - log_beta - np.log(a)
    return np.exp(log_front) * fraction


def beta_cdf(x, a: float, b: float) -> np.ndarray:
    """The regularized incomplete beta function I_x(a, b): the Beta(a, b) distribution's CDF."""
    x = np.asarray(x, np.float64)
    inner = np.clip(x, 1e-300, np.nextafter(1.0, 0.0))  # keeps the logs finite; the ends are set below
    # I_x(a, b) = 1 - I_{1-x}(b, a): evaluate each point on the side where the fraction converges fast.
    lower = inner < (a + 1.0) / (a + b + 2.0)
    fraction = _betainc_continued_fraction(np.where(lower, a, b), np.where(lower, b, a),
                                           np.where(lower, inner, 1.0 - inner), _log_beta_function(a, b))
    value = np.where(lower, fraction, 1.0 - fraction)
    return np.where(x <= 0.0, 0.0, np.where(x >= 1.0, 1.0, value))


def _beta_pdf(x, a: float, b: float) -> np.ndarray:
    x = np.clip(x, 1e-300, np.nextafter(1.0, 0.0))
    return np.exp((a - 1) * np.log(x) + (b - 1) * np.log1p(-x) - _log_beta_function(a, b))


def beta_ppf(q, a: float, b: float) -> np.ndarray:
    """The Beta(a, b) distribution's inverse CDF at probabilities q (what scipy.stats.beta.ppf computes;
    sdjax does not depend on scipy at run time).

    Newton's method on `beta_cdf`, kept inside a shrinking bisection bracket: the bracket makes it converge
    for any (a, b), Newton makes it take a handful of steps instead of ~55 halvings.
    """
    a = _check_positive("alpha", a)
    b = _check_positive("beta", b)
    q = np.asarray(q, np.float64)
    if np.any(~((q >= 0) & (q <= 1))):
        raise InvalidArgumentError(f"beta_ppf: probabilities must be in [0, 1], got {q.tolist()}")
    ends = (q <= 0.0) | (q >= 1.0)
    target = np.where(ends, 0.5, q)  # the ends are exact below; iterating on them would reach log(0)
    lo, hi = np.zeros_like(q), np.ones_like(q)
    x = np.full_like(q, 0.5)
    for _ in range(100):
        residual = beta_cdf(x, a, b) - target
        lo, hi = np.where(residual < 0, x, lo), np.where(residual < 0, hi, x)
        newton = x - residual / _beta_pdf(x, a, b)
        inside = (newton > lo) & (newton < hi)
        x_next = np.where(inside, newton, 0.5 * (lo + hi))
        done = np.all(np.abs(x_next - x) <= 1e-13 * x)  # Newton's next error is ~ this squared
        x = x_next
        if done:
            break
    return np.where(ends, np.round(q), x)


# -------------------------------------------------------------------------------------------- registry

def _on_table_range(build):
    """Adapt a range builder `build(steps, sigma_min, sigma_max, **opts)` to the registry signature: the
    range defaults to the ends of the model's sigma table (ComfyUI: model_sampling.sigma_min/sigma_max)."""

    @functools.wraps(build)
    def schedule(steps, model_sigmas=None, *, sigma_min=None, sigma_max=None, **options):
        if sigma_min is None or sigma_max is None:
            table = _check_table(model_sigmas)
            sigma_min = table[0] if sigma_min is None else sigma_min
            sigma_max = table[-1] if sigma_max is None else sigma_max
        return build(steps, sigma_min, sigma_max, **options)

    return schedule


def _without_table(build):
    """Adapt a builder that needs no model table to the registry signature."""

    @functools.wraps(build)
    def schedule(steps, model_sigmas=None, **options):
        del model_sigmas  # the VP-SDE's parameters define the whole grid
        return build(steps, **options)

    return schedule


def _spacing(name: str):
    builder = functools.partial(spaced, timestep_spacing=name)
    builder.__doc__ = f"The training timesteps diffusers' schedulers pick with timestep_spacing={name!r}."
    return builder


SCHEDULES = {
    "normal": normal,
    "karras": _on_table_range(karras),
    "exponential": _on_table_range(exponential),
    "polyexponential": _on_table_range(polyexponential),
    "sgm_uniform": sgm_uniform,
    "simple": simple,
    "ddim_uniform": ddim_uniform,
    "beta": beta,
    "vp": _without_table(vp),
    **{spacing: _spacing(spacing) for spacing in TIMESTEP_SPACINGS},
}
"""name -> builder `(steps, model_sigmas, **options) -> sigmas` (descending, ending in 0)."""


def get_schedule(name: str):
    """The schedule builder called `name`, or an error listing the valid names."""
    try:
        return SCHEDULES[name]
    except (KeyError, TypeError):
        raise InvalidArgumentError(f"unknown schedule {name!r}.{did_you_mean(name, SCHEDULES)} Valid names: "
                                   f"{', '.join(sorted(SCHEDULES))}") from None
