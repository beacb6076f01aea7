"""Stage 5b of the shapes model: the U-Net and text encoder of stage 5 fine-tuned to v-prediction with uniform
weighting. Stage 5's epsilon loss with Min-SNR-5 weighs an error in the predicted image by min(SNR, 5), which is
nearly 0 at high noise, exactly where this world's content (which colour, which shape, where) is decided: the
model denoised well but drew the wrong scene. The v loss weighs that error by SNR + 1 >= 1."""
from sdjax.train.config import DataConfig, DiffusionConfig, ModelConfig, OptimizerConfig, TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        stage="unet", seed=0, batch_size=64, num_steps=700, log_every=25, checkpoint_every=350, keep_checkpoints=2,
        model=ModelConfig(pretrained="runs/shapes/unet/export", train_text_encoder=True),
        diffusion=DiffusionConfig(prediction_type="v_prediction", min_snr_gamma=0.0, caption_dropout=0.1),
        optimizer=OptimizerConfig(learning_rate=2e-4, schedule="constant", warmup_steps=50, ema_decay=0.999),
        data=DataConfig(folder="runs/shapes/data", resolution=64, random_flip=False, cache_latents=True),
    )
