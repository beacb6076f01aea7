"""A probe, not a study: can two cosine cycles of the shapes U-Net replace the recipe's three (unet, refine,
balance: 12,000 steps, 87% adherence on 200 held-out prompts) in less time?

1. one cycle of 5,000 steps of batch 64 from the recipe's base, the U-Net at learning rate 1e-3 and the text
   encoder at 3e-4 (the best arm of one_cycle.py), each image's masked loss normalised from the start;
2. a second cycle of 2,500 steps from 1's EMA weights, both networks at 3e-4, another data order.

Each is read back on 64 held-out prompts (dpmpp_2m, 20 steps, guidance 3, EMA) every 1000 / 500 steps into
<workdir>/<cycle>/eval.jsonl. One seed. On 200 prompts, each cycle's export was packaged with the recipe's decoder
(`recipe.package`, as the recipe's package stage does) and read by `python -m experiments.shapes.evaluate --model
<package> --samplers dpmpp_2m --steps 20 --guidance 3 --guidance-samplers dpmpp_2m`.

Session 14, 2-core Xeon (results/two_cycle/): the first cycle 78% at step 5000 and 77.0% on 200 prompts; the
second 81% at step 2500 and 82.0% on 200; the shipped three cycles 87.0%.

    python -m experiments.ablations.two_cycle        # needs `python -m experiments.shapes.recipe --until base`
"""
import argparse
import logging
import sys
from pathlib import Path

SHAPES = Path("runs/shapes")
DATA = (f"data.folder={SHAPES / 'data'}", f"data.cache_dir={SHAPES / 'latent_cache'}")
FIRST = ("num_steps=5000", "optimizer.learning_rate=1e-3", "optimizer.text_encoder_learning_rate=3e-4",
         "diffusion.normalize_loss_mask=true", f"model.pretrained={SHAPES / 'base'}", *DATA)
SECOND = ("num_steps=2500", "eval_every=500", "seed=1", "optimizer.learning_rate=3e-4",
          "optimizer.text_encoder_learning_rate=3e-4", "diffusion.normalize_loss_mask=true", *DATA)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/probes/two_cycle", help="where the two cycles train (resumable)")
    args = parser.parse_args(argv)
    from sdjax import compile_cache
    from experiments.shapes.evaluate import DEFAULT_GUIDANCE, Setting, adherence_evaluator
    from experiments.shapes.recipe import HERE, train_stage

    compile_cache.enable()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    logging.getLogger("sdjax").setLevel(logging.INFO)
    evaluator = adherence_evaluator(64, Setting("dpmpp_2m", 20, DEFAULT_GUIDANCE))
    workdir, config = Path(args.workdir), HERE / "train_unet.py"
    first = train_stage(config, workdir / "first", list(FIRST), evaluate=evaluator)
    train_stage(config, workdir / "second", [*SECOND, f"model.pretrained={first}"], evaluate=evaluator)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
