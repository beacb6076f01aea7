"""Stage 2c of the shapes model: a third cosine cycle from stage 2b's EMA weights, with each image's loss the
mask-weighted mean of its errors (`diffusion.normalize_loss_mask`).

Why: after stage 2b, small shapes were drawn right far less often than large ones (small squares 29%, large
87%), and img2img from a correct image at strength 0.4 already broke them: the mid-noise denoiser had not learned
small corners. With the plain masked loss an image's weight grows with its shape's box (a small box, grown by
2 px, is about a third of a large one), so small shapes weighed a third as much; normalised, every image's box
and background count the same whatever the shape's size."""
import dataclasses
from pathlib import Path

from sdjax.train.config import TrainConfig, load_config


def get_config() -> TrainConfig:
    config = load_config(Path(__file__).with_name("train_refine.py"))
    return dataclasses.replace(
        config, seed=2,  # another pass order over the data than stages 2 and 2b
        model=dataclasses.replace(config.model, pretrained="runs/shapes/refine/export"),
        diffusion=dataclasses.replace(config.diffusion, normalize_loss_mask=True),
    )
