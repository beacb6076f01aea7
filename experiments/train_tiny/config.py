"""A tiny U-Net trained from scratch on a synthetic image folder: a smoke run of the whole training stack
(and the configuration the training tests resume, kill and compare). Paths are relative to the repository
root; make_inputs.py writes the base model and the data they point at."""
from pathlib import Path

from sdjax.train.config import DataConfig, ModelConfig, OptimizerConfig, TrainConfig

HERE = Path(__file__).resolve().parent


def get_config() -> TrainConfig:
    return TrainConfig(
        stage="unet", seed=0, batch_size=4, num_steps=200, log_every=10, checkpoint_every=50, keep_checkpoints=2,
        model=ModelConfig(pretrained="runs/train_tiny_inputs/model", unet_config=str(HERE / "unet.json")),
        optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=10, ema_decay=0.99),
        data=DataConfig(folder="runs/train_tiny_inputs/data", resolution=16),
    )
