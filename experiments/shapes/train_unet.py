"""Stage 2 of the shapes model: the text-conditioned U-Net and its text encoder, trained jointly on the latents
of the stage-1 autoencoder (recipe.py writes runs/shapes/base: the trained VAE with its measured scaling
factor, a fresh U-Net and text encoder, the learned tokenizer)."""
from sdjax.train.config import DataConfig, DiffusionConfig, ModelConfig, OptimizerConfig, TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        # Batch 32 at 1e-3 lowered the loss faster per image but never learned the position words: after 4500
        # steps the text encoder had pulled "left"/"right"/... together (relative embedding spread 0.12, from 0.31
        # at init and 0.71 in this run) and adherence was 6% with position at chance.
        stage="unet", seed=0, batch_size=64, num_steps=4000, log_every=25, checkpoint_every=250,
        keep_checkpoints=2, eval_every=1000,  # the recipe reads back 64 held-out prompts: the adherence curve
        # No CLIP exists for this world, so the text encoder learns from the denoising loss alone, as the latent
        # diffusion paper's text-to-image model trained its transformer jointly with the U-Net.
        model=ModelConfig(pretrained="runs/shapes/base", train_text_encoder=True),
        # v-prediction with uniform weighting: it weighs an error in the predicted image by SNR + 1 >= 1, so the
        # high-noise steps, where this world's content (which shape, which colour, where) is decided, count.
        # Epsilon with Min-SNR-5 weighs that error by min(SNR, 5), nearly 0 there: trained so, the first model
        # denoised well but drew the wrong scene (5% adherence against 19.5% after a v-prediction fine-tune).
        # 10% empty captions for classifier-free guidance.
        diffusion=DiffusionConfig(prediction_type="v_prediction", min_snr_gamma=0.0, caption_dropout=0.1),
        optimizer=OptimizerConfig(learning_rate=3e-4, schedule="cosine", warmup_steps=200,
                                  final_learning_rate_fraction=0.1, ema_decay=0.999),
        # The loss weighs the shape's box 10x the plain background (dataset.py's masks): the shape is 1-20% of
        # the pixels, and without them the model learned the background, position and size words but drew
        # blobs whatever shape was asked for (shape right 39% of the time, chance 33%).
        data=DataConfig(folder="runs/shapes/data", resolution=64, random_flip=False, cache_latents=True,
                        loss_mask=True),
    )
