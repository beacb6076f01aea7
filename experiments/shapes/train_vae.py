"""Stage 1 of the shapes model: the autoencoder, from the freshly initialised folder that recipe.py writes.
`sdjax train experiments/shapes/train_vae.py --workdir runs/shapes/vae` runs it on its own (after
`python -m experiments.shapes.recipe --until init`)."""
from sdjax.train.config import DataConfig, ModelConfig, OptimizerConfig, TrainConfig, VAELossConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        stage="vae", seed=0, batch_size=8, num_steps=7000, log_every=50, checkpoint_every=500, keep_checkpoints=2,
        model=ModelConfig(pretrained="runs/shapes/init"),
        # L2 reconstruction with the latent diffusion paper's small KL weight. L2 rather than the paper's L1: the shape
        # is a few percent of the pixels, and L1's gradient weighs every nearly-right background pixel as much as a
        # wrong shape pixel (after 800 steps L2 read back 21% of the scenes right, L1 13%).
        vae_loss=VAELossConfig(reconstruction="l2", kl_weight=1e-6),
        # Small batches, many updates: per image seen, batch 8 at 1e-3 learned faster than 16 at 5e-4 (2e-3 diverged).
        optimizer=OptimizerConfig(learning_rate=1e-3, schedule="cosine", warmup_steps=100,
                                  final_learning_rate_fraction=0.05, weight_decay=0.0, ema_decay=0.999),
        # No flips: "on the left" must stay on the left.
        data=DataConfig(folder="runs/shapes/data", resolution=64, random_flip=False),
    )
