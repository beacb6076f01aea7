"""Stage 3 of the shapes model: the VAE's decoder fine-tuned with the encoder frozen, as SD's ft-MSE decoder was.
The latents (and so the U-Net trained on them) stay exactly as they are; the decoder draws sharper corners
(after stage 1 alone, 14% of reconstructed scenes read back with the wrong shape, rounded squares mostly)."""
from sdjax.train.config import DataConfig, ModelConfig, OptimizerConfig, TrainConfig, VAELossConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        stage="vae", seed=1, batch_size=8, num_steps=5000, log_every=50, checkpoint_every=500, keep_checkpoints=2,
        model=ModelConfig(pretrained="runs/shapes/base"),
        vae_loss=VAELossConfig(reconstruction="l2", kl_weight=1e-6, decoder_only=True),
        optimizer=OptimizerConfig(learning_rate=5e-4, schedule="cosine", warmup_steps=100,
                                  final_learning_rate_fraction=0.05, weight_decay=0.0, ema_decay=0.999),
        data=DataConfig(folder="runs/shapes/data", resolution=64, random_flip=False),
    )
