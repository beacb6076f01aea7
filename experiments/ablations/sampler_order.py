"""Which sampler is best at few steps? DPM-Solver++ and UniPC ahead of DDIM at <= 10 NFE (cf. DPM-Solver-v3,
Table 7, on SD 1.4), measured on the embedded shapes model: prompt adherence and the mean squared distance of
the final latents to a 200-step reference (DPM-Solver++(2M)), against NFE, over 3 seeds of sampling noise.

    python -m experiments.ablate experiments/ablations/sampler_order.py

128 held-out prompts per seed, classifier-free guidance 3 (one NFE counts both halves, as in the papers) unless
an arm names another scale (its reference is then the 200-step sample at that scale), Karras sigmas unless an arm
names another schedule ("normal": timesteps evenly spaced, as DPM-Solver's time-uniform grid); dpmpp_3m_sde with
eta 0 is the deterministic DPM-Solver++(3M). The "guidance 1" arms (no guidance) separate the solvers' own error
from their interplay with classifier-free guidance.
"""
import functools
import json
from pathlib import Path

import numpy as np

from experiments.ablate import Study
from experiments.shapes.dataset import held_out_prompts
from experiments.shapes.evaluate import adherence

NFES = (5, 6, 8, 10, 12, 15, 20)
REFERENCE = ("dpmpp_2m", 200)
PROMPTS, GUIDANCE, SCHEDULE = 128, 3.0, "karras"
SAMPLERS = {"ddim": ("sampler=ddim",), "euler": ("sampler=euler",), "dpmpp_2m": ("sampler=dpmpp_2m",),
            "unipc": ("sampler=unipc",), "dpmpp_3m_sde eta 0": ("sampler=dpmpp_3m_sde", "eta=0"),
            "ddim, guidance 1": ("sampler=ddim", "guidance=1"),
            "dpmpp_2m, guidance 1": ("sampler=dpmpp_2m", "guidance=1"),
            "unipc, guidance 1": ("sampler=unipc", "guidance=1")}


@functools.cache
def pipeline():
    import sdjax
    return sdjax.load_pipeline()


@functools.cache
def prompts_and_scenes():
    pairs = held_out_prompts(PROMPTS)
    return [p for p, _ in pairs], [s for _, s in pairs]


def parse_arm(overrides) -> tuple[str, str, float, dict[str, float]]:
    """("sampler=NAME", ["schedule=NAME"], ["guidance=G"], "option=value", ...) -> (sampler, schedule, guidance,
    {option: value})."""
    settings = dict(item.split("=", 1) for item in overrides)
    sampler, schedule = settings.pop("sampler"), settings.pop("schedule", SCHEDULE)
    guidance = float(settings.pop("guidance", GUIDANCE))
    return sampler, schedule, guidance, {key: float(value) for key, value in settings.items()}


def sample(sampler: str, steps: int, seed: int, guidance: float, options=None, schedule: str = SCHEDULE):
    prompts, _ = prompts_and_scenes()
    return pipeline().generate(prompts, steps=steps, guidance_scale=guidance, sampler=sampler, schedule=schedule,
                               sampler_options=options, seeds=[seed * 100_000 + i for i in range(PROMPTS)])


def reference_latents(out: Path, seed: int, guidance: float) -> np.ndarray:
    """The 200-step reference of a seed and guidance scale, computed once and kept beside the runs (written
    whole or not at all)."""
    path = out / "reference" / f"guidance_{guidance:g}_seed_{seed}.npy"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial.npy")
        np.save(partial, sample(*REFERENCE, seed, guidance).latents)
        partial.replace(path)
    return np.load(path)


def measure(run) -> list[dict]:
    from sdjax.samplers.registry import SAMPLERS as REGISTRY

    sampler, schedule, guidance, options = parse_arm(run.overrides)
    reference = reference_latents(run.directory.parents[1], run.seed, guidance)
    _, scenes = prompts_and_scenes()
    rows = []
    for nfe in NFES:
        steps = nfe  # every sampler here evaluates the model once per step
        assert REGISTRY[sampler].nfe(steps) == nfe, sampler
        result = sample(sampler, steps, run.seed, guidance, options, schedule)
        rows.append({"nfe": nfe, "adherence": adherence(result.images, scenes)["all"],
                     "latent_mse": float(np.mean((result.latents.astype(np.float64) - reference) ** 2)),
                     "seconds": result.seconds})
        print(json.dumps({"arm": run.arm, "seed": run.seed, **rows[-1]}), flush=True)
    return rows


def get_study() -> Study:
    return Study(name="sampler_order", arms=SAMPLERS, seeds=(0, 1, 2), run=measure, x="nfe",
                 metrics=("adherence", "latent_mse"), log_scale=("latent_mse",), description=__doc__.split("\n\n")[0])
