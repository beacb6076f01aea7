"""A probe, not a study: the mechanism behind zero_snr.py, on each of its runs' final weights. Lin et al.'s flaw
is that a model trained where the last timestep keeps some signal learns to read the image's overall brightness
from its noisy input, and at sampling time pure noise tells it "medium grey". So: start the sampler from the same
noise with and without a faint white-minus-black cue in it (the latents of a plain white image minus those of a
plain black one, halved, times 0.068: what SD's last timestep leaves of an image), and measure how much brighter
the backgrounds of black-background prompts come out. A model that ignores the cue (trained at zero terminal
SNR, or near it) shifts by ~0 levels; one that reads brightness from the noise shifts by more.

    python -m experiments.ablations.zero_snr_cue      # after `python -m experiments.ablate .../zero_snr.py`

Writes cue.md and cue.json into the grid's folder (runs/ablations/zero_snr); the embedded model is the
reference row.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from experiments.ablations.zero_snr import extreme_prompts, border_level
from experiments.shapes.evaluate import DEFAULT_GUIDANCE
from experiments.shapes.scenes import SIDE

CUE_STRENGTH = 0.068  # sqrt(alpha_bar) at SD's last timestep (scaled_linear 0.00085-0.012)
PROMPTS = 48


def white_cue(pipeline) -> np.ndarray:
    """Half the difference between the latents of a plain white and a plain black image, (h, w, c)."""
    plain = np.stack([np.full((SIDE, SIDE, 3), level, np.uint8) for level in (255, 0)])
    white, black = np.asarray(pipeline.encode_image(plain), np.float64)
    return (white - black) / 2


def brightness_shift(pipeline, schedule: str, strength: float = CUE_STRENGTH) -> dict[str, float]:
    """Mean background level (0-255) of black-background prompts from plain noise and from noise + the cue."""
    prompts = [p for p, scene in extreme_prompts() if scene.background == "black"][:PROMPTS]
    cue = white_cue(pipeline)
    noise = np.random.default_rng(0).standard_normal((len(prompts), *cue.shape))
    levels = {}
    for name, start in (("plain", noise), ("cued", noise + strength * cue)):
        images = pipeline.generate(prompts, steps=20, guidance_scale=DEFAULT_GUIDANCE, sampler="ddim",
                                   schedule=schedule, latents=start.astype(np.float32)).images
        levels[name] = float(np.mean([border_level(image) for image in images]))
    return {**levels, "shift": levels["cued"] - levels["plain"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", default="runs/ablations/zero_snr", help="the zero_snr grid's folder")
    args = parser.parse_args(argv)
    import sdjax

    grid = Path(args.grid)
    models = {"embedded model (linear betas)": None}
    models.update({f"{run.parent.name} seed {run.name.removeprefix('seed_')}": run / "export"
                   for run in sorted(grid.glob("*/seed_*")) if (run / "result.json").is_file()})
    rows = []
    for name, folder in models.items():
        pipeline = sdjax.load_pipeline(folder)
        schedule = "trailing" if pipeline.scheduler_config.get("rescale_betas_zero_snr") else "leading"
        rows.append({"model": name, "schedule": schedule, **brightness_shift(pipeline, schedule)})
        print(f"{name}: {rows[-1]['shift']:+.1f} levels", flush=True)
    (grid / "cue.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [f"# Does the model read brightness from its starting noise? ({PROMPTS} black-background prompts, DDIM "
             f"20 steps, guidance {DEFAULT_GUIDANCE:g}, cue {CUE_STRENGTH} x (white - black) / 2)\n",
             "| model | timesteps | background level, plain noise | with the cue | shift |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['schedule']} | {r['plain']:.1f} | {r['cued']:.1f} | {r['shift']:+.1f} |"
              for r in rows]
    (grid / "cue.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {grid / 'cue.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
