"""What a generation call samples with: a sampler, its options, the sigma grid and how noise enters.

`SamplingPlan` is plain host data. `plan_from_names` builds one from sdjax's sampler and schedule names
(k-diffusion/ComfyUI conventions); `sdjax.scheduler_config.plan_from_scheduler_config` builds the plan that
reproduces a diffusers scheduler config.
"""
from __future__ import annotations

import dataclasses
import inspect
import numbers
from typing import Any, Mapping

import numpy as np

from sdjax import schedules
from sdjax.errors import InvalidArgumentError
from sdjax.samplers import get_sampler

DEFAULT_SAMPLER = "euler"
DEFAULT_SCHEDULE = "normal"


@dataclasses.dataclass(frozen=True)
class SamplingPlan:
    """sampler: a registered sampler name (public, or internal where a scheduler-config plan needs one);
    options: its keyword options; sigmas: the grid, descending (usually to 0).

    init_noise_sigma: how much the unit-variance starting noise is scaled by (diffusers' `init_noise_sigma`
    in VE scaling; k-diffusion uses sigmas[0]). quantize_timesteps: the U-Net sees the nearest training
    timestep instead of the interpolated one (diffusers' solvers on Karras grids round their timesteps).
    model_timesteps: None, or rows (sigma, t) pinning the timestep t the U-Net is given at each noise level the
    sampler evaluates, where neither interpolation nor rounding gives diffusers' (its linear-in-sigma spacing,
    truncated timesteps); `sdjax.denoisers.pin_timesteps` applies them.
    ve_latents: the final x goes to the VAE as it is instead of as x / sqrt(1 + sigmas[-1]^2) (diffusers'
    Euler-family schedulers do this; it differs only for grids ending above 0).
    timesteps: diffusers' timestep of each step (scheduler.timesteps), on plans whose denoising_start /
    denoising_end cut sdjax reproduces (`for_denoising`); None elsewhere.
    ve_handoff: the scheduler keeps its latents in VE scaling (diffusers' Euler family), so the latents handed
    from a denoising_end stage to a denoising_start stage are VE; else VP.
    """
    sampler: str
    sigmas: np.ndarray
    options: tuple[tuple[str, Any], ...] = ()
    init_noise_sigma: float | None = None
    quantize_timesteps: bool = False
    schedule: str | None = None
    model_timesteps: np.ndarray | None = None
    ve_latents: bool = False
    timesteps: np.ndarray | None = None
    ve_handoff: bool = False

    def __post_init__(self):
        get_sampler(self.sampler)  # fail early on an unknown name (internal names are valid in a plan)

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def start_noise_sigma(self) -> float:
        return float(self.sigmas[0]) if self.init_noise_sigma is None else self.init_noise_sigma

    @property
    def nfe(self) -> int | None:
        count = get_sampler(self.sampler).nfe
        return None if count is None else count(self.steps)

    def for_strength(self, strength: float) -> "SamplingPlan":
        """The tail of the grid that img2img/inpainting runs: the last int(steps * strength) steps, as diffusers'
        `get_timesteps` keeps them."""
        if not 0.0 <= strength <= 1.0:
            raise InvalidArgumentError(f"strength must be within [0, 1], got {strength}")
        kept = min(int(self.steps * strength), self.steps)
        if kept == 0:
            raise InvalidArgumentError(f"strength={strength} with steps={self.steps} leaves no step to run; "
                                       f"raise strength or steps")
        return self._steps(self.steps - kept, self.steps)

    def for_denoising(self, start: float | None, end: float | None, num_train_timesteps: int) -> "SamplingPlan":
        """The steps diffusers' SDXL pipelines run with denoising_start and/or denoising_end (fractions checked by
        `check_denoising_fractions`): each becomes the timestep cutoff round((1 - d) * num_train_timesteps);
        denoising_start keeps the steps whose timestep lies below it, denoising_end those at or above it. The
        latents of a start are taken as they are (`init_noise_sigma` converts them to VE), and those of an end
        are returned in the scheduler's own scaling (`ve_handoff`)."""
        if self.timesteps is None:
            raise InvalidArgumentError("denoising_start / denoising_end need a plan with diffusers' timesteps (one "
                                       "from a supported scheduler config)")
        timesteps = np.asarray(self.timesteps, np.float32)  # diffusers compares its float32 timesteps
        cutoff = lambda fraction: int(round(num_train_timesteps - fraction * num_train_timesteps))
        first = 0 if start is None else self.steps - int(np.sum(timesteps < cutoff(start)))
        stop = self.steps if end is None else max(int(np.sum(timesteps >= cutoff(end))), first)
        if stop == first:
            given = ", ".join(f"{name}={value}" for name, value in (("denoising_start", start),
                                                                     ("denoising_end", end)) if value is not None)
            raise InvalidArgumentError(f"{given} with steps={self.steps} leaves no step to run (timesteps "
                                       f"{timesteps.tolist()}); move the cut or raise steps")
        plan = self._steps(first, stop)
        if start is not None:  # the handed-over latents, unscaled: VE already, or VP at the first sigma
            plan = dataclasses.replace(plan, init_noise_sigma=1.0 if self.ve_handoff
                                       else float(np.sqrt(1.0 + plan.sigmas[0] ** 2)))
        if end is not None:
            plan = dataclasses.replace(plan, ve_latents=self.ve_latents or self.ve_handoff)
        return plan

    def _steps(self, first: int, stop: int) -> "SamplingPlan":
        """Steps [first, stop) of the plan, run as diffusers runs them: a fresh start at `first` (multistep
        history empty), and, when `stop` cuts the grid short, none of the rules for the final steps."""
        options = dict(self.options)
        if "targets" in options:  # ddim_fixed_stride: one target noise level per step
            options["targets"] = tuple(options["targets"])[first:stop]
        if "steps_before" in inspect.signature(get_sampler(self.sampler)).parameters:
            # a per-step pattern fixed by the full schedule (dpmpp_singlestep)
            options["steps_before"] = options.get("steps_before", 0) + first
        if stop < self.steps:
            # diffusers lowers the order of its schedule's last steps (counted over the whole schedule), which a
            # cut-off stage never reaches; the sampler would lower the order of the cut grid's last steps instead.
            if options.get("lower_order_final") and self.sampler == "dpmpp_3m_sde" and stop == self.steps - 1:
                raise InvalidArgumentError("denoising_end one step before the end with solver_order=3 and "
                                           "lower_order_final (diffusers then lowers the order of the cut's last "
                                           "step to 2) is not supported; cut elsewhere")
            options.update({key: False for key in ("lower_order_final", "euler_at_final") if key in options})
        timesteps = None if self.timesteps is None else np.asarray(self.timesteps)[first:stop]
        return dataclasses.replace(self, sigmas=self.sigmas[first:stop + 1], options=tuple(sorted(options.items())),
                                   timesteps=timesteps)


def check_denoising_fractions(start, end) -> None:
    """InvalidArgumentError unless each given fraction is a number strictly between 0 and 1 and start < end."""
    for name, value in (("denoising_start", start), ("denoising_end", end)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                                  or not 0.0 < value < 1.0):
            raise InvalidArgumentError(f"{name} must be a number strictly between 0 and 1 (the fraction of the "
                                       f"schedule where the stage starts or ends), got {value!r}")
    if start is not None and end is not None and start >= end:
        raise InvalidArgumentError(f"denoising_start={start} must be below denoising_end={end}")


def plan_from_names(sampler: str | None, schedule: str | None, steps: int, alphas_cumprod: np.ndarray,
                    options: Mapping[str, Any] | None = None) -> SamplingPlan:
    """A plan from sdjax names: `schedule` builds the grid over the model's sigma table."""
    if not isinstance(steps, int) or steps < 1:
        raise InvalidArgumentError(f"steps must be a positive integer, got {steps!r}")
    sampler = sampler or DEFAULT_SAMPLER
    schedule = schedule or DEFAULT_SCHEDULE
    get_sampler(sampler, public_only=True)   # a user's name: the public zoo only
    build = schedules.get_schedule(schedule)
    sigmas = np.asarray(build(steps, schedules.sigma_table(alphas_cumprod)), np.float64)
    return SamplingPlan(sampler, sigmas, tuple(sorted((options or {}).items())), schedule=schedule)

