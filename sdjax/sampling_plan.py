"""What a generation call samples with: a sampler, its options, the sigma grid and how noise enters.

`SamplingPlan` is plain host data. `plan_from_names` builds one from sdjax's sampler and schedule names
(k-diffusion/ComfyUI conventions); `sdjax.scheduler_config.plan_from_scheduler_config` builds the plan that
reproduces a diffusers scheduler config.
"""
from __future__ import annotations

import dataclasses
import inspect
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
    """
    sampler: str
    sigmas: np.ndarray
    options: tuple[tuple[str, Any], ...] = ()
    init_noise_sigma: float | None = None
    quantize_timesteps: bool = False
    schedule: str | None = None
    model_timesteps: np.ndarray | None = None
    ve_latents: bool = False

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
        start = self.steps - kept
        options = dict(self.options)
        if "targets" in options:  # ddim_fixed_stride: one target noise level per step
            options["targets"] = tuple(options["targets"])[start:]
        if "steps_before" in inspect.signature(get_sampler(self.sampler)).parameters:
            options["steps_before"] = start  # a per-step pattern fixed by the full schedule (dpmpp_singlestep)
        return dataclasses.replace(self, sigmas=self.sigmas[start:], options=tuple(sorted(options.items())))


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

