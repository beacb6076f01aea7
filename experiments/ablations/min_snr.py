"""Min-SNR-gamma loss weighting against uniform epsilon weighting (Hang et al., ICCV 2023: gamma = 5 converges
markedly faster) on the shapes model: prompt adherence along training, 3 training seeds per arm.

    python -m experiments.ablate experiments/ablations/min_snr.py

Needs the shapes recipe's first stages (the trained VAE, its latents, the dataset):
`python -m experiments.shapes.recipe --until base`. Each run trains the shapes U-Net and text encoder from scratch
for 1500 steps of batch 32 (epsilon prediction, the only change between the arms is the weighting) and reads
back 64 held-out prompts every 500 steps with the EMA weights and with the raw ones (the fourth, cheap question:
does the EMA help at a short budget?).
"""
from pathlib import Path

from experiments.ablate import Study, training_runs
from experiments.shapes.evaluate import adherence_evaluator

SHAPES = Path("runs/shapes")
COMMON = ("batch_size=32", "num_steps=1500", "eval_every=500", "eval_raw_weights=true", "checkpoint_every=250",
          "log_every=50",
          "optimizer.warmup_steps=100", f"model.pretrained={SHAPES / 'base'}", f"data.folder={SHAPES / 'data'}",
          f"data.cache_dir={SHAPES / 'latent_cache'}", "diffusion.prediction_type=epsilon")


def get_study() -> Study:
    return Study(
        name="min_snr", seeds=(0, 1, 2), x="step",
        arms={"uniform": (*COMMON, "diffusion.min_snr_gamma=0"), "min-snr-5": (*COMMON, "diffusion.min_snr_gamma=5")},
        run=training_runs(Path(__file__).parents[1] / "shapes" / "train_unet.py", adherence_evaluator(prompts=64)),
        metrics=("adherence", "shape", "colour", "position", "adherence_raw"),
        description=__doc__.split("\n\n")[0])
