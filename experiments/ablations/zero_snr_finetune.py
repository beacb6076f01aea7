"""zero_snr.py's two arms as the paper ran them: fine-tuning a trained model (theirs SD 2.1, here the embedded
shapes model, trained on linear betas with v-prediction) on SD's scaled_linear schedule, standard or rescaled to
zero terminal SNR, for 1000 steps of batch 32 at learning rate 1e-4; black/white background error and adherence
along the fine-tune, 3 seeds per arm.

    python -m experiments.ablate experiments/ablations/zero_snr_finetune.py
    python -m experiments.ablations.zero_snr_cue --grid runs/ablations/zero_snr_finetune

Needs the shapes dataset (`python -m experiments.shapes.recipe --until data`); the first run caches the embedded
VAE's latents of it. Sampling as in zero_snr.py (DDIM, 20 steps, guidance 3, leading or trailing timesteps).
"""
from experiments.ablate import Study
from experiments.ablations.zero_snr import COMMON, SHAPES, schedule_study
from sdjax.embedded import EMBEDDED_MODEL

FROM_SCRATCH = (f"model.pretrained={SHAPES / 'base'}", f"data.cache_dir={SHAPES / 'latent_cache'}")
FINE_TUNE = ("optimizer.learning_rate=1e-4", f"model.pretrained={EMBEDDED_MODEL}",
             f"data.cache_dir={SHAPES / 'latent_cache_shipped'}")


def get_study() -> Study:
    common = (*(item for item in COMMON if item not in FROM_SCRATCH), *FINE_TUNE)
    return schedule_study("zero_snr_finetune", common, __doc__.split("\n\n")[0])
