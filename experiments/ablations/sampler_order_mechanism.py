"""Why DPM-Solver++(2M) fails at 5 NFE on the shapes model (sampler_order.py): the same 5-step Karras grid with and
without classifier-free guidance, and with sigma_max cut from the model's ~157 (linear betas) to SD's 14.6 or to
40, against Euler. Adherence on 64 held-out prompts, one seed of sampling noise (a standard error of about 5
points): a probe of the mechanism, not a study.

    python -m experiments.ablations.sampler_order_mechanism
"""
from __future__ import annotations

import dataclasses

import numpy as np

from experiments.shapes.dataset import held_out_prompts
from experiments.shapes.evaluate import adherence

PROMPTS, STEPS = 64, 5
CASES = [(sampler, guidance, None) for sampler in ("dpmpp_2m", "euler") for guidance in (1.0, 3.0)]
CASES += [(sampler, 3.0, sigma_max) for sigma_max in (14.6, 40.0) for sampler in ("dpmpp_2m", "euler")]


def with_sigma_max(plan, sigma_max: float | None):
    """The plan's Karras grid rebuilt from `sigma_max` down to its own sigma_min (the starting noise scaled to it)."""
    if sigma_max is None:
        return plan
    from sdjax import schedules
    sigmas = schedules.karras(plan.steps, float(plan.sigmas[-2]), sigma_max)
    return dataclasses.replace(plan, sigmas=np.asarray(sigmas), init_noise_sigma=None)


def main() -> None:
    import sdjax

    pipeline = sdjax.load_pipeline()
    pairs = held_out_prompts(PROMPTS)
    prompts, scenes = [p for p, _ in pairs], [s for _, s in pairs]
    plan_of = pipeline.sampling_plan
    print("| sampler | guidance | sigma_max | sigmas | adherence |\n|---|---|---|---|---|")
    for sampler, guidance, sigma_max in CASES:
        pipeline.sampling_plan = lambda *args, **kwargs: with_sigma_max(plan_of(*args, **kwargs), sigma_max)
        result = pipeline.generate(prompts, steps=STEPS, guidance_scale=guidance, sampler=sampler, schedule="karras",
                                   seeds=list(range(PROMPTS)))
        sigmas = pipeline.sampling_plan(STEPS, sampler, "karras").sigmas
        print(f"| {sampler} | {guidance:g} | {sigma_max or 'model'} | {', '.join(f'{s:.3g}' for s in sigmas)} | "
              f"{adherence(result.images, scenes)['all']:.0%} |", flush=True)


if __name__ == "__main__":
    main()
