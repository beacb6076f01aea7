"""diffusers scheduler configs as sampling plans: `plan_from_scheduler_config(config, steps, alphas_cumprod)`.

The plan, run as `sdjax.generation` runs plans (x = noise * init_noise_sigma, the sampler over the grid, then
x / sqrt(1 + sigmas[-1]^2) to the VAE), reproduces StableDiffusionPipeline driving the scheduler that
`scheduler_config.json` describes (`_class_name`; missing keys take that class's defaults). Beyond the update
rule, four things must agree with diffusers, and each class differs in them:

  * the grid: sigma at diffusers' timesteps (interpolated linearly in sigma, or table entries), or a
    Karras/exponential/beta grid over a class-specific range, ending in 0 or in the table's smallest sigma;
  * the starting noise: VP schedulers (DDIM, DDPM, PNDM, DPM-Solver, UniPC, DEIS) start from unit noise in VP
    scaling, which is sqrt(1 + sigma_0^2) in VE scaling; the Euler family scales by sigma_max, or by
    sqrt(sigma_max^2 + 1) with timestep_spacing="leading";
  * the timestep the U-Net sees at each evaluated sigma: the log-sigma interpolation of the denoiser, the
    nearest table entry (`quantize_timesteps`) or, where diffusers uses neither, pinned values
    (`model_timesteps`, applied by `denoisers.pin_timesteps`);
  * the final latents: the Euler family hands its VE sample to the VAE unconverted (`ve_latents`).

Settings that no sdjax sampler reproduces (clipping, thresholding, flow-matching sigmas, ...) raise a
ConfigError naming the key, its value and what is supported. Known, deliberate differences:

  * a final step of zero length (Euler with final_sigmas_type="sigma_min" on a grid ending there, DEIS's and
    DPM-Solver's alternative grids ending on the final sigma) costs diffusers one evaluation and changes
    nothing; the plan leaves it out (plan.nfe is one less);
  * DDIM and DDPM with rescale_betas_zero_snr take alpha_bar = 0 (sigma = inf) at the last timestep; VE
    scaling needs the 2^-24 floor of `schedules.sigma_table` (sigma = 4096), a relative error ~1/4096;
  * diffusers computes its table in float32, sdjax in float64: where diffusers rounds a timestep that lies
    within ~1e-3 of a half-integer, the two can round apart.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import numpy as np

from sdjax import schedules
from sdjax.errors import ConfigError
from sdjax.parameterization import sigma_to_t
from sdjax.sampling_plan import SamplingPlan

# A diffusers timestep closer than this (in timesteps) to what the denoiser derives from sigma counts as the
# same: float32 resolves t near 1000 only to ~6e-5.
TIMESTEP_TOLERANCE = 1e-4
# Two timesteps diffusers gives at one noise level (KDPM2 a's midpoint coincides with the next grid point)
# further apart than this cannot both be honoured; closer ones (linear vs log interpolation, ~1e-3) keep the
# grid point's.
CONFLICTING_TIMESTEPS = 1e-2

_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                 trained_betas=None, prediction_type="epsilon", timestep_spacing="linspace", steps_offset=0)
_SD_BETAS = dict(beta_start=0.00085, beta_end=0.012)
_GRIDS = dict(use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False)
_SOLVER = dict(_SCHEDULE, **_GRIDS, solver_order=2, thresholding=False, use_flow_sigmas=False,
               use_dynamic_shifting=False)

CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "DDIMScheduler": dict(_SCHEDULE, timestep_spacing="leading", clip_sample=True, set_alpha_to_one=True,
                          thresholding=False, rescale_betas_zero_snr=False),
    "DDPMScheduler": dict(_SCHEDULE, timestep_spacing="leading", clip_sample=True, thresholding=False,
                          variance_type="fixed_small", rescale_betas_zero_snr=False),
    "PNDMScheduler": dict(_SCHEDULE, timestep_spacing="leading", skip_prk_steps=False, set_alpha_to_one=False),
    "LMSDiscreteScheduler": dict(_SCHEDULE, **_GRIDS),
    "EulerDiscreteScheduler": dict(_SCHEDULE, **_GRIDS, interpolation_type="linear", timestep_type="discrete",
                                   final_sigmas_type="zero", rescale_betas_zero_snr=False),
    "EulerAncestralDiscreteScheduler": dict(_SCHEDULE, rescale_betas_zero_snr=False),
    "HeunDiscreteScheduler": dict(_SCHEDULE, **_SD_BETAS, **_GRIDS, clip_sample=False),
    "KDPM2DiscreteScheduler": dict(_SCHEDULE, **_SD_BETAS, **_GRIDS),
    "KDPM2AncestralDiscreteScheduler": dict(_SCHEDULE, **_SD_BETAS, **_GRIDS),
    "DPMSolverMultistepScheduler": dict(_SOLVER, algorithm_type="dpmsolver++", solver_type="midpoint",
                                        final_sigmas_type="zero", lower_order_final=True, euler_at_final=False, use_lu_lambdas=False,
                                        lambda_min_clipped=-math.inf, variance_type=None,
                                        rescale_betas_zero_snr=False),
    "DPMSolverSinglestepScheduler": dict(_SOLVER, algorithm_type="dpmsolver++", solver_type="midpoint",
                                         final_sigmas_type="zero", lower_order_final=False, lambda_min_clipped=-math.inf,
                                         variance_type=None),
    "UniPCMultistepScheduler": dict(_SOLVER, solver_type="bh2", final_sigmas_type="zero", lower_order_final=True,
                                    disable_corrector=[], predict_x0=True, solver_p=None,
                                    rescale_betas_zero_snr=False),
    "DEISMultistepScheduler": dict(_SOLVER, algorithm_type="deis", solver_type="logrho", lower_order_final=True),
}
"""diffusers' constructor defaults for the keys that shape a plan, per supported class."""

# diffusers quietly renames these when a config written for a sibling class is loaded (its own __init__ does).
_RENAMED = {
    "DPMSolverMultistepScheduler": {"algorithm_type": {"deis": "dpmsolver++"},
                                    "solver_type": {"logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"}},
    "DPMSolverSinglestepScheduler": {"algorithm_type": {"deis": "dpmsolver++"},
                                     "solver_type": {"logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"}},
    "UniPCMultistepScheduler": {"solver_type": {"midpoint": "bh2", "heun": "bh2", "logrho": "bh2"}},
    "DEISMultistepScheduler": {"algorithm_type": {"dpmsolver": "deis", "dpmsolver++": "deis"},
                               "solver_type": {"midpoint": "logrho", "heun": "logrho", "bh1": "logrho",
                                               "bh2": "logrho"}},
}


# ------------------------------------------------------------------------------------------ config checks

def resolve_config(config: Mapping) -> dict:
    """The config with its class's defaults filled in (and diffusers' sibling-class renames applied); a
    ConfigError for an unknown or missing `_class_name`. Use it for alphas_cumprod too: the Heun and KDPM2
    classes default to Stable Diffusion's betas, unlike the rest."""
    name = config.get("_class_name")
    if name not in CLASS_DEFAULTS:
        raise ConfigError(f"scheduler config: _class_name={name!r} is not supported; supported: "
                          f"{', '.join(CLASS_DEFAULTS)}")
    resolved = {**CLASS_DEFAULTS[name], **config}
    for key, renames in _RENAMED.get(name, {}).items():
        resolved[key] = renames.get(resolved[key], resolved[key])
    return resolved


def _require(config: Mapping, key: str, supported) -> Any:
    """config[key], or a ConfigError naming the class, the key, its value and the supported values."""
    value = config[key]
    if value not in supported:
        raise ConfigError(f"{config['_class_name']}: {key}={value!r} is not supported; supported: "
                          f"{', '.join(map(repr, supported))}")
    return value


def _require_off(config: Mapping, *keys: str, why: str):
    """A ConfigError for the first of `keys` that the class has and the config switches on (diffusers keeps
    but ignores other classes' keys, and so does sdjax)."""
    for key in keys:
        if key in CLASS_DEFAULTS[config["_class_name"]] and config[key]:
            raise ConfigError(f"{config['_class_name']}: {key}={config[key]!r} is not supported ({why}); "
                              f"supported: False")


def _check_common(config: Mapping):
    name = config["_class_name"]
    _require(config, "prediction_type",
             ("epsilon", "v_prediction") if name == "PNDMScheduler" else ("epsilon", "v_prediction", "sample"))
    _require(config, "timestep_spacing", schedules.TIMESTEP_SPACINGS)
    _require_off(config, "clip_sample", "thresholding",
                 why="sdjax's samplers do not clip or threshold the x0 estimate")
    _require_off(config, "use_flow_sigmas", "use_dynamic_shifting", why="flow-matching sigmas")
    grids = [key for key in _GRIDS if key in CLASS_DEFAULTS[name] and config[key]]
    if len(grids) > 1:
        raise ConfigError(f"{name}: {' and '.join(grids)} are both set; at most one of {', '.join(_GRIDS)}")


# ------------------------------------------------------------------------------------------ grids

def _options(options: Mapping) -> tuple:
    """A plan's options: sorted (name, value) pairs, hashable."""
    return tuple(sorted(options.items()))


def _log_timesteps(sigmas, table) -> np.ndarray:
    """The fractional timestep of each sigma, linear in log sigma between table entries (diffusers'
    `_sigma_to_t`, and the denoiser's own mapping, evaluated on the host in float64)."""
    return sigma_to_t(np.asarray(sigmas, np.float64), np.log(table), xp=np)


def _spacing(config, steps, *, integer, drop_final_point=False) -> np.ndarray:
    t = schedules.timesteps(steps, config["timestep_spacing"], config["num_train_timesteps"],
                            config["steps_offset"], integer=integer,
                            drop_final_point=drop_final_point and config["timestep_spacing"] != "trailing")
    if t.max() > config["num_train_timesteps"] - 1:
        raise ConfigError(f"{config['_class_name']}: steps_offset={config['steps_offset']} puts the first "
                          f"timestep at {t.max():g}, past the schedule's last ({config['num_train_timesteps'] - 1})"
                          f" at steps={steps}; lower steps_offset or steps")
    return t


def _grid_kind(config) -> str | None:
    """Which of its class's alternative grids the config asks for, if any, in diffusers' order of precedence
    (keys of other classes, which diffusers keeps but ignores, are ignored)."""
    own = CLASS_DEFAULTS[config["_class_name"]]
    return next((key for key in ("use_karras_sigmas", "use_lu_lambdas", "use_exponential_sigmas", "use_beta_sigmas")
                 if key in own and config[key]), None)


def _alternative_grid(kind, steps, sigma_min, sigma_max) -> np.ndarray:
    """`steps` sigmas from sigma_max down to sigma_min, without a final 0: Karras et al.'s rho = 7 grid,
    evenly in log sigma (exponential, and DPM-Solver's uniform-lambda "lu"), or at Beta(0.6, 0.6) quantiles
    linearly in sigma (diffusers' use_beta_sigmas, which differs from sdjax's table-based `beta` schedule)."""
    if kind == "use_karras_sigmas":
        return schedules.karras(steps, sigma_min, sigma_max)[:-1]
    if kind in ("use_exponential_sigmas", "use_lu_lambdas"):
        return schedules.exponential(steps, sigma_min, sigma_max)[:-1]
    quantiles = schedules.beta_ppf(1.0 - np.linspace(0.0, 1.0, steps), 0.6, 0.6)
    return sigma_min + quantiles * (sigma_max - sigma_min)


def _alternative_range(config, kind, spaced_sigmas) -> tuple[float, float]:
    """The range diffusers converts over: the spaced grid's ends, unless the config sets sigma_min/sigma_max
    (which LMS's Karras conversion and the lu grid ignore)."""
    low, high = float(np.min(spaced_sigmas)), float(np.max(spaced_sigmas))
    if kind == "use_lu_lambdas" or (kind == "use_karras_sigmas" and config["_class_name"] == "LMSDiscreteScheduler"):
        return low, high
    pick = lambda key, default: default if config.get(key) is None else float(config[key])
    return pick("sigma_min", low), pick("sigma_max", high)


def _model_timestep_mapping(name, sigmas, timesteps, table) -> tuple[bool, np.ndarray | None]:
    """(quantize_timesteps, model_timesteps) under which the denoiser gives the model `timesteps` at
    `sigmas` (the noise levels the sampler evaluates): interpolation if that agrees, else rounding to the
    nearest entry if that does, else pinned (sigma, t) rows, ascending in sigma. A ConfigError if one noise
    level needs two timesteps (no mapping from sigma can say that)."""
    sigmas, timesteps = np.asarray(sigmas, np.float64), np.asarray(timesteps, np.float64)
    interpolated = _log_timesteps(sigmas, table)
    if np.all(np.abs(interpolated - timesteps) <= TIMESTEP_TOLERANCE):
        return False, None
    nearest = np.argmin(np.abs(np.log(sigmas)[:, None] - np.log(table)), axis=1)
    if np.all(np.abs(nearest - timesteps) <= TIMESTEP_TOLERANCE):
        return True, None
    order = np.argsort(sigmas, kind="stable")
    rows = np.stack([sigmas[order], timesteps[order]], axis=1)
    same_sigma = np.isclose(rows[1:, 0], rows[:-1, 0], rtol=1e-6, atol=0)
    if np.any(same_sigma & (np.abs(rows[1:, 1] - rows[:-1, 1]) > CONFLICTING_TIMESTEPS)):
        raise ConfigError(f"{name}: this grid gives the model two different timesteps at the same noise level "
                          f"(rounded at a grid point, interpolated at the midpoint that coincides with it), which "
                          f"sdjax's sigma -> timestep mapping cannot reproduce; supported: use_karras_sigmas=False,"
                          f" or sdjax's own sampler and schedule names (e.g. sampler='dpm_2_ancestral', "
                          f"schedule='karras')")
    return False, rows[np.append(True, ~same_sigma)]


# ------------------------------------------------------------------------------------------ the Euler family

def _euler_family_grid(config, steps, table):
    """(sigmas without the final one, the timesteps the model sees there, the final sigma) of
    LMS/Euler/Euler a/Heun/KDPM2 (a): sigma linear in sigma at the spaced (fractional) timesteps, or an
    alternative grid over that range with log-interpolated timesteps (rounded by the KDPM2 classes' Karras
    grids), ending in 0 (Euler: or the table's smallest sigma)."""
    timesteps = _spacing(config, steps, integer=False)
    final = float(table[0]) if config.get("final_sigmas_type") == "sigma_min" else 0.0
    if config.get("interpolation_type") == "log_linear":
        # steps + 1 sigmas evenly in log sigma over the whole table, of which the last ends the run (the final
        # sigma appended after it is never reached); the model still sees the spaced timesteps.
        spaced = np.exp(np.linspace(np.log(table[-1]), np.log(table[0]), steps + 1))
    else:
        spaced = schedules.sigmas_at_timesteps(timesteps, table)
    kind = _grid_kind(config)
    if kind is not None:
        sigmas = _alternative_grid(kind, steps, *_alternative_range(config, kind, spaced))
        timesteps = _log_timesteps(sigmas, table)
        if kind == "use_karras_sigmas" and config["_class_name"].startswith("KDPM2"):
            timesteps = np.round(timesteps)
        return sigmas, timesteps, final
    if config.get("interpolation_type") == "log_linear":
        return spaced[:-1], timesteps, spaced[-1]
    return spaced, timesteps, final


def _kdpm2_midpoints(sigmas, ancestral):
    """The noise levels KDPM2 (a) evaluates between grid points, on every step but the last (an Euler step
    into 0): the log-sigma midpoint of sigma_i and sigma_{i+1}, or for KDPM2 a of sigma_i and its ancestral
    step's sigma_down = sigma_{i+1}^2 / sigma_i, which is sigma_{i+1} itself."""
    return sigmas[1:].copy() if ancestral else np.sqrt(sigmas[:-1] * sigmas[1:])


def _euler_family_plan(config, steps, table, rule) -> SamplingPlan:
    name = config["_class_name"]
    sampler, options = rule(config, steps)
    if name == "EulerDiscreteScheduler":
        _require(config, "interpolation_type", ("linear", "log_linear"))
        _require(config, "final_sigmas_type", ("zero", "sigma_min"))
        if config["timestep_type"] == "continuous" and config["prediction_type"] == "v_prediction":
            raise ConfigError(f"{name}: timestep_type='continuous' with v_prediction (EDM-style timesteps "
                              f"0.25 log sigma) is not supported; supported: timestep_type='discrete'")
    sigmas, timesteps, final = _euler_family_grid(config, steps, table)
    if final > 0 and math.isclose(final, sigmas[-1], rel_tol=1e-9):
        # final_sigmas_type="sigma_min" on a grid already ending there: diffusers' last step has length 0 (an
        # evaluation and no change), which sdjax leaves out.
        sigmas, final, timesteps = sigmas[:-1], sigmas[-1], timesteps[:-1]
    evaluated, seen = sigmas, timesteps
    if name.startswith("KDPM2"):
        midpoints = _kdpm2_midpoints(sigmas, ancestral="Ancestral" in name)
        evaluated = np.concatenate([sigmas, midpoints])
        seen = np.concatenate([timesteps, _log_timesteps(midpoints, table)])
    quantize, pinned = _model_timestep_mapping(name, evaluated, seen, table)
    sigma_max = float(np.max(sigmas))
    leading = config["timestep_spacing"] == "leading"
    return SamplingPlan(sampler, np.append(sigmas, final), _options(options),
                        init_noise_sigma=math.sqrt(sigma_max**2 + 1) if leading else sigma_max,
                        quantize_timesteps=quantize, model_timesteps=pinned, ve_latents=final > 0,
                        timesteps=timesteps, ve_handoff=True)


# ------------------------------------------------------------------------------------------ DDIM, DDPM, PNDM

def _vp_start(sigmas) -> float:
    """Unit noise in VP scaling, in VE scaling at the grid's first sigma."""
    return math.sqrt(1.0 + float(sigmas[0]) ** 2)


def _fixed_stride_targets(config, timesteps, table, final) -> np.ndarray:
    """The sigma DDIM and PNDM step each timestep t to: that of t - num_train_timesteps // steps, or `final`
    (the final alpha's) below timestep 0, whatever the next timestep is."""
    previous = np.asarray(timesteps, np.int64) - config["num_train_timesteps"] // len(timesteps)
    return np.where(previous >= 0, table[np.maximum(previous, 0)], final)


def _final_alpha_sigma(config, table) -> float:
    return 0.0 if config["set_alpha_to_one"] else float(table[0])


def _ddim_plan(config, steps, table, rule) -> SamplingPlan:
    """The rule's sampler (ddim) where the timesteps are num_train_timesteps // steps apart, else
    ddim_fixed_stride: diffusers steps every t to t - num_train_timesteps // steps, whatever the next t is."""
    sampler, options = rule(config, steps)
    timesteps = _spacing(config, steps, integer=True)
    sigmas = table[timesteps.astype(np.int64)]
    targets = _fixed_stride_targets(config, timesteps, table, _final_alpha_sigma(config, table))
    grid = np.append(sigmas, targets[-1])
    if np.array_equal(targets, grid[1:]):
        return SamplingPlan(sampler, grid, _options(options), init_noise_sigma=_vp_start(grid), timesteps=timesteps)
    return SamplingPlan("ddim_fixed_stride", grid, _options(dict(options, targets=tuple(targets.tolist()))),
                        init_noise_sigma=_vp_start(grid), timesteps=timesteps)


def _ddpm_plan(config, steps, table, rule) -> SamplingPlan:
    # The step from the last timestep goes to alpha_bar = 1.
    sampler, options = rule(config, steps)
    timesteps = _spacing(config, steps, integer=True)
    grid = np.append(table[timesteps.astype(np.int64)], 0.0)
    return SamplingPlan(sampler, grid, _options(options), init_noise_sigma=_vp_start(grid))


def _pndm_plan(config, steps, table, rule) -> SamplingPlan:
    name = config["_class_name"]
    sampler, options = rule(config, steps)
    timesteps = _spacing(config, steps, integer=True)
    grid = np.append(table[timesteps.astype(np.int64)], _final_alpha_sigma(config, table))
    targets = _fixed_stride_targets(config, timesteps, table, grid[-1])
    if not np.array_equal(targets, grid[1:]):
        raise ConfigError(
            f"{name}: timestep_spacing={config['timestep_spacing']!r} at steps={steps} spaces the timesteps "
            f"unevenly while PNDM always steps by num_train_timesteps // steps; supported: timestep_spacing="
            f"'leading' with steps_offset < num_train_timesteps // steps, or a step count dividing "
            f"num_train_timesteps (trailing)")
    return SamplingPlan(sampler, grid, _options(options), init_noise_sigma=_vp_start(grid))


# ------------------------------------------------------------------------------------------ DPM-Solver, UniPC, DEIS

def _solver_grid(config, steps, table):
    """(sigmas without the final one, the integer timesteps the model sees there) of DPM-Solver (multistep and
    singlestep), UniPC and DEIS: table entries at steps + 1 spaced
    timesteps less the smallest, or an alternative grid over the whole table whose log-interpolated timesteps
    are rounded (Karras, lu; not for the cosine schedule) and then truncated to integers."""
    name = config["_class_name"]
    if name == "DPMSolverSinglestepScheduler":   # it has no timestep_spacing: always linspace
        config = dict(config, timestep_spacing="linspace")
    timesteps = _spacing(config, steps, integer=True, drop_final_point=True)
    sigmas = table[timesteps.astype(np.int64)]
    kind = _grid_kind(config)
    if kind is None:
        return sigmas, timesteps
    sigmas = _alternative_grid(kind, steps, *_alternative_range(config, kind, table))
    timesteps = _log_timesteps(sigmas, table)
    if kind in ("use_karras_sigmas", "use_lu_lambdas") and config["beta_schedule"] != "squaredcos_cap_v2":
        timesteps = np.round(timesteps)
    return sigmas, np.floor(timesteps)


def _solver_final(config, table) -> float | None:
    """The final sigma, or None where the alternative grids repeat their last sigma (DEIS always, UniPC with
    final_sigmas_type="sigma_min")."""
    name = config["_class_name"]
    if name == "DEISMultistepScheduler":
        return None if _grid_kind(config) else float(table[0])
    kind = _require(config, "final_sigmas_type", ("zero", "sigma_min"))
    if kind == "zero":
        return 0.0
    return None if name == "UniPCMultistepScheduler" and _grid_kind(config) else float(table[0])


def _lower_order_final_below_15(config, steps) -> bool:
    """DPM-Solver multistep and DEIS lower the order of their last steps only below 15 steps."""
    return bool(config["lower_order_final"]) and steps < 15


def _drop_repeated_final(config, steps, sampler, options):
    """diffusers ends some grids with a zero-length step (DEIS's alternative grids always; the others' when
    the final sigma equals the grid's last): for DPM-Solver multistep and DEIS one evaluation and no change.
    sdjax drops it, which leaves the run one step shorter, so the orders that diffusers' lower_order_final
    gives the real last step must be restated: below 15 steps it caps them at 2, which order 3 cannot say."""
    name = config["_class_name"]
    what = f"{_grid_kind(config) or 'timestep_spacing'} ending on the final sigma (a zero-length final step"
    if sampler in ("unipc", "dpmpp_singlestep"):
        raise ConfigError(f"{name}: {what}, which still acts there) is not supported; supported: "
                          f"final_sigmas_type='zero'")
    if config["solver_order"] == 3 and _lower_order_final_below_15(config, steps):
        raise ConfigError(f"{name}: solver_order=3, lower_order_final=True below 15 steps with {what}, whose "
                          f"order it lowers) is not supported; supported: solver_order <= 2, "
                          f"lower_order_final=False or steps >= 15")
    options = dict(options, lower_order_final=False)
    if "euler_at_final" in options:   # it applied to the dropped step
        options["euler_at_final"] = False
    return options


def _solver_plan(config, steps, table, rule) -> SamplingPlan:
    name = config["_class_name"]
    own = CLASS_DEFAULTS[name]
    if "lambda_min_clipped" in own and config["lambda_min_clipped"] != -math.inf:
        raise ConfigError(f"{name}: lambda_min_clipped={config['lambda_min_clipped']!r} is not supported; "
                          f"supported: -inf (no clipping)")
    if "variance_type" in own and config["variance_type"] is not None:
        raise ConfigError(f"{name}: variance_type={config['variance_type']!r} (learned variance) is not "
                          f"supported; supported: None")
    sampler, options = rule(config, steps)
    final = _solver_final(config, table)
    sigmas, timesteps = _solver_grid(config, steps, table)
    if final is None or (final > 0 and math.isclose(final, sigmas[-1], rel_tol=1e-9)):
        options = _drop_repeated_final(config, steps, sampler, options)
        grid, timesteps = sigmas, timesteps[:-1]
    else:
        grid = np.append(sigmas, final)
    quantize, pinned = _model_timestep_mapping(name, grid[:-1], timesteps, table)
    return SamplingPlan(sampler, grid, _options(options), init_noise_sigma=_vp_start(grid),
                        quantize_timesteps=quantize, model_timesteps=pinned, timesteps=timesteps)


# ------------------------------------------------------------------------------------------ class -> sampler
#
# Which sdjax sampler, with which options, reproduces each diffusers scheduler class: SCHEDULER_CLASSES below is
# the one statement of this mapping (docs/samplers.md tabulates it for users). Every sampler runs on the
# scheduler's own sigma grid in VE scaling; the prediction type is the denoiser's business, not the sampler's.
#   * LMS, Euler, Euler a, Heun, KDPM2, KDPM2 a: k-diffusion's sampler of the same method, with its defaults.
#   * DDIM: ddim (eta 0); where the timesteps are not num_train_timesteps // steps apart, the internal
#     ddim_fixed_stride (`_ddim_plan`). DDPM: ddpm. PNDM(skip_prk_steps=True): pndm, PLMS with a Heun first
#     step, exact only for evenly spaced timesteps (diffusers always steps by num_train_timesteps // steps).
#   * DPMSolverMultistep (dpmsolver++): order 1 euler, 2 dpmpp_2m, 3 dpmpp_3m_sde(eta=0); sde-dpmsolver++: order
#     1 euler_ancestral, 2 dpmpp_2m_sde(eta=1), with noise from the key, not torch's generator. solver_type and
#     euler_at_final pass through; lower_order_final applies below 15 steps only, as in diffusers. The step
#     into sigma = 0 is always first order, so final_sigmas_type="zero" needs no option.
#   * DPMSolverSinglestep: the internal dpmpp_singlestep (groups of 1, 2, 3 grid steps).
#   * UniPC (predict_x0, no solver_p): unipc, solver_type as its variant, lower_order_final without the 15-step
#     rule. DEIS: deis, lower_order_final below 15 steps.
#   * Grids that end on a repeated sigma (a zero-length final step) lose that step, with options restated by
#     `_drop_repeated_final`.

def _always(sampler: str) -> Callable:
    """The rule of a class that always runs `sampler` with its default options."""
    return lambda config, steps: (sampler, {})


def _ddpm_sampler(config, steps):
    # Posterior noise with the "fixed small" variance (its _log variant is the same number).
    _require(config, "variance_type", ("fixed_small", "fixed_small_log"))
    return "ddpm", {}


def _pndm_sampler(config, steps):
    name = config["_class_name"]
    if not config["skip_prk_steps"]:
        raise ConfigError(f"{name}: skip_prk_steps=False (the Runge-Kutta warm-up of the original PNDM) is not "
                          f"supported; supported: True (PLMS with a Heun first step, Stable Diffusion's setting)")
    if config["prediction_type"] == "v_prediction":
        raise ConfigError(f"{name}: prediction_type='v_prediction' is not supported: diffusers' PNDM combines "
                          f"the raw v outputs of past steps and converts the sum to a noise prediction at the "
                          f"current step, a different method from PLMS on the noise predictions that sdjax's "
                          f"pndm runs; supported: 'epsilon' (for v models use DDIMScheduler or another class)")
    return "pndm", {}


def _dpm_multistep_sampler(config, steps):
    name = config["_class_name"]
    algorithm = _require(config, "algorithm_type", ("dpmsolver++", "sde-dpmsolver++"))
    solver_type = _require(config, "solver_type", ("midpoint", "heun"))
    order = _require(config, "solver_order", (1, 2, 3))
    sde = algorithm == "sde-dpmsolver++"
    if order == 1:
        return ("euler_ancestral", {}) if sde else ("euler", {})
    if sde and order == 3:
        raise ConfigError(f"{name}: solver_order=3 with algorithm_type='sde-dpmsolver++' is not supported: "
                          f"diffusers' third-order SDE update weights the second difference by "
                          f"(1 - e^-2h - 2h) / (2h)^2 - 1/2, which does not vanish as h -> 0; supported: "
                          f"solver_order 1, 2 (sdjax's dpmpp_3m_sde is the consistent third-order SDE solver)")
    options = dict(solver_type=solver_type, lower_order_final=_lower_order_final_below_15(config, steps),
                   euler_at_final=bool(config["euler_at_final"]))
    if sde:
        return "dpmpp_2m_sde", dict(options, eta=1.0)
    return ("dpmpp_2m", options) if order == 2 else ("dpmpp_3m_sde", dict(options, eta=0.0))


def _dpm_singlestep_sampler(config, steps):
    name = config["_class_name"]
    algorithm = _require(config, "algorithm_type", ("dpmsolver++", "sde-dpmsolver++"))
    solver_type = _require(config, "solver_type", ("midpoint", "heun"))
    order = _require(config, "solver_order", (1, 2, 3))
    if algorithm == "sde-dpmsolver++" and order == 3 and solver_type == "heun":
        raise ConfigError(f"{name}: solver_order=3, solver_type='heun' with algorithm_type='sde-dpmsolver++' is "
                          f"not supported (diffusers' second-difference weight there does not vanish as h -> 0); "
                          f"supported: solver_type='midpoint', or solver_order 1, 2")
    eta = 1.0 if algorithm == "sde-dpmsolver++" else 0.0
    # diffusers switches lower_order_final on for a final step into 0 (and when the groups do not fill the
    # steps, which the sampler's group pattern covers).
    lower_order_final = bool(config["lower_order_final"]) or config["final_sigmas_type"] == "zero"
    return "dpmpp_singlestep", dict(order=order, solver_type=solver_type, lower_order_final=lower_order_final,
                                    eta=eta)


def _unipc_sampler(config, steps):
    name = config["_class_name"]
    if not config["predict_x0"] or config["solver_p"] is not None:
        raise ConfigError(f"{name}: predict_x0={config['predict_x0']!r}, solver_p={config['solver_p']!r} is not "
                          f"supported; supported: predict_x0=True without solver_p (the default)")
    return "unipc", dict(order=_require(config, "solver_order", (1, 2, 3)),
                         variant=_require(config, "solver_type", ("bh1", "bh2")),
                         lower_order_final=bool(config["lower_order_final"]),
                         disable_corrector=tuple(int(step) for step in config["disable_corrector"]))


def _deis_sampler(config, steps):
    _require(config, "algorithm_type", ("deis",))
    _require(config, "solver_type", ("logrho",))
    order = _require(config, "solver_order", (1, 2, 3))
    return "deis", dict(order=order, lower_order_final=_lower_order_final_below_15(config, steps))


SCHEDULER_CLASSES: dict[str, tuple[Callable, Callable]] = {
    # class: (planner(config, steps, table, rule) -> SamplingPlan, rule(config, steps) -> (sampler, options))
    "LMSDiscreteScheduler": (_euler_family_plan, _always("lms")),
    "EulerDiscreteScheduler": (_euler_family_plan, _always("euler")),
    "EulerAncestralDiscreteScheduler": (_euler_family_plan, _always("euler_ancestral")),
    "HeunDiscreteScheduler": (_euler_family_plan, _always("heun")),
    "KDPM2DiscreteScheduler": (_euler_family_plan, _always("dpm_2")),
    "KDPM2AncestralDiscreteScheduler": (_euler_family_plan, _always("dpm_2_ancestral")),
    "DDIMScheduler": (_ddim_plan, _always("ddim")),          # or ddim_fixed_stride: see _ddim_plan
    "DDPMScheduler": (_ddpm_plan, _ddpm_sampler),
    "PNDMScheduler": (_pndm_plan, _pndm_sampler),
    "DPMSolverMultistepScheduler": (_solver_plan, _dpm_multistep_sampler),
    "DPMSolverSinglestepScheduler": (_solver_plan, _dpm_singlestep_sampler),
    "UniPCMultistepScheduler": (_solver_plan, _unipc_sampler),
    "DEISMultistepScheduler": (_solver_plan, _deis_sampler),
}


# ------------------------------------------------------------------------------------------ entry points

HANDOFF_CLASSES = ("EulerDiscreteScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler")
"""The classes whose denoising_start / denoising_end cut sdjax reproduces (`SamplingPlan.for_denoising`): first
order in diffusers' sense (one timestep per step) and with no state that a cut stage would hand over. Heun and
KDPM2 repeat timesteps, UniPC's corrector and the singlestep groups span the cut; the rest are not checked."""


def plan_from_scheduler_config(config: Mapping, steps: int, alphas_cumprod: np.ndarray) -> SamplingPlan:
    """The SamplingPlan that reproduces the diffusers scheduler `config` (scheduler_config.json as a dict) at
    `steps` inference steps, for a model trained on `alphas_cumprod` (from
    `schedules.alphas_cumprod_from_config(resolve_config(config))`). Raises ConfigError for an unknown class
    or a setting no sdjax sampler reproduces."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ConfigError(f"steps must be a positive integer, got {steps!r}")
    resolved = resolve_config(config)
    _check_common(resolved)
    table = schedules.sigma_table(alphas_cumprod)
    if table.size != resolved["num_train_timesteps"]:
        raise ConfigError(f"{resolved['_class_name']}: num_train_timesteps={resolved['num_train_timesteps']} but "
                          f"alphas_cumprod has {table.size} entries; pass the config's own schedule")
    planner, rule = SCHEDULER_CLASSES[resolved["_class_name"]]
    plan = planner(resolved, int(steps), table, rule)
    if resolved["_class_name"] not in HANDOFF_CLASSES:  # no denoising_start / denoising_end cut
        plan = dataclasses.replace(plan, timesteps=None)
    return plan
