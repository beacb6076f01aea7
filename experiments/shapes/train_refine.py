"""Stage 2b of the shapes model: the U-Net and text encoder of stage 2 (its EMA weights) trained on for a second
cosine cycle. Stage 2's adherence was still rising when its learning rate had decayed (9% / 41% / 48% / 58% at
steps 1000-4000); a second cycle from its weights costs the same as a longer first one and keeps stage 2's
result reproducible on its own."""
import dataclasses
from pathlib import Path

from sdjax.train.config import TrainConfig, load_config


def get_config() -> TrainConfig:
    config = load_config(Path(__file__).with_name("train_unet.py"))
    return dataclasses.replace(
        config, seed=1,  # another pass order over the data than stage 2's
        model=dataclasses.replace(config.model, pretrained="runs/shapes/unet/export"),
        optimizer=dataclasses.replace(config.optimizer, learning_rate=2e-4, warmup_steps=100),
    )
