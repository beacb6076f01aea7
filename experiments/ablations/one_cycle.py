"""A screening probe, not a study: what lets one cosine cycle of the shapes U-Net learn fastest, so the recipe
reaches the issue's adherence in its ~90-minute budget. One seed, 2000 steps of batch 64 per arm (each image's
masked loss normalised, as the recipe trains), read back on 64 held-out prompts every 1000 steps (EMA and raw).

    python -m experiments.ablate experiments/ablations/one_cycle.py

Needs `python -m experiments.shapes.recipe --until base`. Arms: the recipe's settings; logit-normal timesteps
(most draws at mid noise, where img2img showed the shape kind is decided: correct images kept 98% at strength 0.2,
76% at 0.4); the U-Net at learning rate 1e-3 with the text encoder kept at 3e-4 (1e-3 for both once collapsed
the position words, train_unet.py); a 16x16 level twice as wide (corners of small shapes are drawn there).
"""
from pathlib import Path

from experiments.ablate import Study, training_runs
from experiments.shapes.evaluate import adherence_evaluator

SHAPES = Path("runs/shapes")
COMMON = ("num_steps=2000", "eval_every=1000", "eval_raw_weights=true", "checkpoint_every=250", "log_every=50",
          f"model.pretrained={SHAPES / 'base'}", f"data.folder={SHAPES / 'data'}",
          f"data.cache_dir={SHAPES / 'latent_cache'}", "diffusion.normalize_loss_mask=true")


def get_study() -> Study:
    return Study(
        name="one_cycle", seeds=(0,), x="step",
        arms={"recipe": COMMON,
              "logit-normal": (*COMMON, "diffusion.timestep_sampling=logit_normal"),
              "lr1e-3-te3e-4": (*COMMON, "optimizer.learning_rate=1e-3", "optimizer.text_encoder_learning_rate=3e-4"),
              "wide-16x16": (*COMMON, "model.unet_config=experiments/ablations/one_cycle_unet_wide.json")},
        run=training_runs(Path(__file__).parents[1] / "shapes" / "train_unet.py", adherence_evaluator(prompts=64)),
        metrics=("adherence", "background", "colour", "position", "shape", "size", "adherence_raw"),
        description=__doc__.split("\n\n")[0])
