"""A screening probe, not a study: which learning rates let one cosine cycle of the shapes U-Net (normalised
masked loss from the start) learn fastest, so the recipe fits its ~90-minute budget. One seed, 1000 steps of
batch 64 per arm, read back on 64 held-out prompts every 500 steps (EMA and raw weights).

    python -m experiments.ablate experiments/ablations/one_cycle.py

Needs `python -m experiments.shapes.recipe --until base`. The shipped model took three 4000-step cycles (the last
with the normalised loss, which took it from 75.5% to 87%); batch 32 at learning rate 1e-3 for both networks once
collapsed the text encoder's position words (train_unet.py), hence an arm that keeps the text encoder at 3e-4.
"""
from pathlib import Path

from experiments.ablate import Study, training_runs
from experiments.shapes.evaluate import adherence_evaluator

SHAPES = Path("runs/shapes")
COMMON = ("num_steps=1000", "eval_every=500", "eval_raw_weights=true", "checkpoint_every=250", "log_every=50",
          "optimizer.warmup_steps=100", "diffusion.normalize_loss_mask=true", f"model.pretrained={SHAPES / 'base'}",
          f"data.folder={SHAPES / 'data'}", f"data.cache_dir={SHAPES / 'latent_cache'}")


def get_study() -> Study:
    return Study(
        name="one_cycle", seeds=(0,), x="step",
        arms={"lr3e-4": (*COMMON, "optimizer.learning_rate=3e-4"),
              "lr1e-3-te3e-4": (*COMMON, "optimizer.learning_rate=1e-3", "optimizer.text_encoder_learning_rate=3e-4"),
              "lr1e-3": (*COMMON, "optimizer.learning_rate=1e-3")},
        run=training_runs(Path(__file__).parents[1] / "shapes" / "train_unet.py", adherence_evaluator(prompts=64)),
        metrics=("adherence", "background", "colour", "position", "shape", "size", "adherence_raw"),
        description=__doc__.split("\n\n")[0])
