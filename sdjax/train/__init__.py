"""Training: the latent diffusion loss for the U-Net (and text encoder), the VAE's own loss, optax AdamW with
EMA, an image-caption folder with a checkpointable iterator, orbax checkpoints and export to diffusers.

    from sdjax.train import load_config, train
    train(load_config("experiments/train_tiny/config.py", ["num_steps=100"]), "runs/tiny")

Modules: config (TrainConfig, overrides), data (folder scanning, BatchIterator), latents (VAE posteriors,
latent cache), losses, state (TrainState, optimizer, EMA), step (train_step), task (what a run trains),
checkpoint (orbax), metrics, export, adapters (LoRA training), loop (`train`), cli (`sdjax train`).
"""
__all__ = ["TrainConfig", "load_config", "train"]


def __getattr__(name):
    # Lazy: `sdjax.train.config` must stay importable without building models (the CLI's --help).
    if name in ("TrainConfig", "load_config"):
        from sdjax.train import config
        return getattr(config, name)
    if name == "train":
        from sdjax.train.loop import train
        return train
    raise AttributeError(f"module 'sdjax.train' has no attribute {name!r}")
