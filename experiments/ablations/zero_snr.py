"""Zero terminal SNR (Lin et al., WACV 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed"):
SD's noise schedule never shows the model pure noise, so it cannot make very dark or very bright images;
rescaling the betas to zero terminal SNR, with v-prediction and sampling from the last timestep ("trailing"),
fixes it. On the shapes model: how far black and white backgrounds come out from true black and white, and
adherence, along training, 3 training seeds per arm.

    python -m experiments.ablate experiments/ablations/zero_snr.py
    python -m experiments.ablations.zero_snr_cue          # the mechanism, on the runs' final weights

Needs the shapes recipe's first stages (`python -m experiments.shapes.recipe --until base`). Both arms train the
shapes U-Net and text encoder from scratch on SD's own schedule (scaled_linear betas 0.00085-0.012: at its last
timestep the latent keeps sqrt(alpha_bar) = 0.068 of its signal) with v-prediction for 1000 steps of batch 32,
and sample with DDIM, 20 steps, guidance 3: the standard arm from SD's "leading" timesteps (the first is 950),
the zero-terminal-SNR arm from "trailing" ones (the paper's recipe). `zero_snr_finetune.py` runs the same arms
as fine-tunes of the embedded model, as the paper fine-tuned SD 2.1. Brightness errors are in 0-255 levels of the
background (the image border).
"""
import functools
from pathlib import Path

import numpy as np

from experiments.ablate import Study, training_runs
from experiments.shapes.dataset import held_out_prompts
from experiments.shapes.evaluate import Setting, adherence, generate
from experiments.shapes.scenes import PALETTE

SHAPES = Path("runs/shapes")
SD_SCHEDULE = ("diffusion.beta_schedule=scaled_linear", "diffusion.beta_start=0.00085", "diffusion.beta_end=0.012")
COMMON = ("batch_size=32", "num_steps=1000", "eval_every=250", "checkpoint_every=250", "log_every=50",
          "optimizer.warmup_steps=100", f"model.pretrained={SHAPES / 'base'}", f"data.folder={SHAPES / 'data'}",
          f"data.cache_dir={SHAPES / 'latent_cache'}", "diffusion.prediction_type=v_prediction", *SD_SCHEDULE)
PROMPTS, BORDER = 96, 4


@functools.cache
def extreme_prompts():
    """Held-out prompts whose background is black or white."""
    pairs = [(p, s) for p, s in held_out_prompts(8 * PROMPTS, seed=77) if s.background in ("black", "white")]
    return pairs[:PROMPTS]


def border_level(image: np.ndarray) -> float:
    """Mean grey level of the image's border, where only the background is."""
    edge = np.concatenate([image[:BORDER].ravel(), image[-BORDER:].ravel(), image[:, :BORDER].ravel(),
                           image[:, -BORDER:].ravel()])
    return float(edge.astype(np.float64).mean())


def evaluate(pipeline) -> dict[str, float]:
    schedule = "trailing" if pipeline.scheduler_config.get("rescale_betas_zero_snr") else "leading"
    pairs = extreme_prompts()
    images = generate(pipeline, [p for p, _ in pairs], Setting("ddim", 20, 3.0, schedule), seed=0, batch=PROMPTS)
    errors = {"black": [], "white": []}
    for image, (_, scene) in zip(images, pairs):
        target = float(np.mean(PALETTE[scene.background]))
        errors[scene.background].append(abs(border_level(image) - target))
    scores = adherence(images, [s for _, s in pairs])
    return {"black_error": float(np.mean(errors["black"])), "white_error": float(np.mean(errors["white"])),
            "adherence": scores["all"], "background": scores["background"]}


def schedule_study(name: str, common: tuple[str, ...], description: str) -> Study:
    """The standard schedule against its zero-terminal-SNR rescale, both trained with the `common` overrides."""
    return Study(
        name=name, seeds=(0, 1, 2), x="step",
        arms={"standard": common, "zero-snr": (*common, "diffusion.zero_terminal_snr=true")},
        run=training_runs(Path(__file__).parents[1] / "shapes" / "train_unet.py", evaluate),
        metrics=("black_error", "white_error", "adherence", "background"), description=description)


def get_study() -> Study:
    return schedule_study("zero_snr", COMMON, __doc__.split("\n\n")[0])
