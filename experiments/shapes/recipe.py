"""Re-create sdjax's embedded shapes model from nothing, with sdjax's own code:

    python -m experiments.shapes.recipe --workdir runs/shapes --out sdjax/assets/shapes

1. data      the procedural captioned dataset (scenes.py), PNG files + metadata.jsonl
2. init      a CLIP BPE tokenizer learned from the training captions; a diffusers folder of freshly
             initialised VAE, text encoder and U-Net (model/*.json) with the noise schedule
3. vae       `sdjax train` stage vae (train_vae.py)
4. base      the trained VAE with its latent scaling factor measured as SD's authors did (1 / std of the
             latents), plus the fresh U-Net and text encoder: the folder the diffusion stage starts from
5. unet      `sdjax train` stage unet with the text encoder trained jointly (train_unet.py, v-prediction)
6. refine    a second cosine cycle of the same training from stage 5's EMA weights (train_refine.py)
7. balance   a third cycle from stage 6's EMA weights with each image's masked loss normalised, so small shapes
             weigh as much as large ones (train_balance.py)
8. decoder   the VAE's decoder fine-tuned with the encoder frozen (train_decoder.py): same latents, sharper shapes
9. package   the U-Net and text encoder of 7 with the VAE of 8, EMA weights in float16, a model card, to --out

Every stage is a pure function of the seeds in its config, checkpoints as it goes and is skipped when its
output is complete, so rerunning the command after an interruption continues where it stopped.
`--smoke` runs the whole recipe at toy sizes (a few images and steps) to check the plumbing.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
STAGES = ("data", "init", "vae", "base", "unet", "refine", "balance", "decoder", "package")
DATASET_SIZE, DATASET_SEED, INIT_SEED = 30_000, 0, 0
SMOKE = {"dataset": 32, "train": ["num_steps=2", "batch_size=4", "log_every=1", "checkpoint_every=2",
                                  # One learning-rate schedule for every stage: its numbers are constants of the
                                  # compiled step, so the unet and refine stages then share one program (cache).
                                  "optimizer.learning_rate=1e-4", "optimizer.warmup_steps=1"],
         # ... and one loss for the three U-Net cycles (balance normalises it): they share one program.
         "unet": ["diffusion.normalize_loss_mask=true"],
         # Smaller networks of the same kinds: the plumbing is the same and they compile in half the time.
         "model": {"unet": {"block_out_channels": [16, 32], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 8},
                   "text_encoder": {"num_hidden_layers": 1}},
         # The end-of-stage adherence check runs, on 4 prompts at 2 steps: the full one costs more than the training.
         "evaluate": {"prompts": 4, "steps": 2}}

log = logging.getLogger("sdjax.shapes")


def _json(path: Path) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if k != "_comment"}


def _replace_dir(build, folder: Path) -> Path:
    """Run build(partial) and move the result to `folder`, so an interrupted stage never leaves a half folder."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    build(partial)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    return folder


def captions(data: Path) -> list[str]:
    return [json.loads(line)["text"] for line in (data / "metadata.jsonl").read_text().splitlines() if line]


def write_init_folder(folder: Path, data: Path, seed: int, changes: dict | None = None) -> None:
    """Tokenizer learned from the captions, and freshly initialised components, as a diffusers folder; `changes`
    ({component: {key: value}}) edits model/*.json."""
    import jax

    from sdjax.models.components import COMPONENTS, STABLE_DIFFUSION
    from sdjax.pipeline import Pipeline
    from sdjax.tokenizer import learn_bpe, write_clip_tokenizer

    changes = changes or {}
    text_raw = {**_json(HERE / "model" / "text_encoder.json"), **changes.get("text_encoder", {})}
    tokenizer = write_clip_tokenizer(folder / "tokenizer", learn_bpe(captions(data)),
                                     model_max_length=text_raw["max_position_embeddings"])
    text_raw["vocab_size"] = len(tokenizer)
    raw = {name: {**_json(HERE / "model" / f"{name}.json"), **changes.get(name, {})} for name in ("unet", "vae")}
    raw["text_encoder"] = text_raw
    configs = {name: COMPONENTS[name].config_class.from_dict(raw[name]) for name in STABLE_DIFFUSION}
    key = jax.random.key(seed)
    params = {name: COMPONENTS[name].init(configs[name], jax.random.fold_in(key, i))
              for i, name in enumerate(STABLE_DIFFUSION)}
    Pipeline(configs, params, tokenizer, _json(HERE / "model" / "scheduler_config.json"),
             raw_configs=raw).save_pretrained(folder)


def latent_std(pipeline, data: Path, count: int = 1024, batch: int = 64) -> float:
    """Standard deviation of posterior samples of the first `count` training images at scaling factor 1."""
    import jax

    from sdjax.train.data import ImageSource, scan_folder

    source = ImageSource(scan_folder(data)[:count], 64)
    vae = pipeline.modules["vae"]
    latents = []
    for start in range(0, len(source), batch):
        pixels = np.stack([source.pixels(i) for i in range(start, min(start + batch, len(source)))])
        posterior = vae.apply({"params": pipeline.params["vae"]}, pixels.astype(np.float32) / 127.5 - 1.0,
                              method=vae.encode)
        latents.append(np.asarray(posterior.sample(jax.random.key(start))))
    return float(np.std(np.concatenate(latents)))


def write_base_folder(folder: Path, vae_export: Path, data: Path) -> float:
    """The VAE stage's export with vae/config.json's scaling_factor set to 1 / std of the latents."""
    import sdjax

    scale = float(f"{1.0 / latent_std(sdjax.load_pipeline(vae_export), data):.5g}")
    shutil.copytree(vae_export, folder)
    config_path = folder / "vae" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "scaling_factor": scale}, indent=2))
    return scale


def train_stage(config_file: Path, workdir: Path, overrides: list[str], evaluate=None) -> Path:
    """`sdjax train config_file --workdir workdir --set ...` (with `evaluate` called every eval_every steps);
    returns the export folder."""
    from sdjax.train.config import load_config
    from sdjax.train.loop import train

    export = workdir / "export"
    if export.is_dir():
        return export
    result = train(load_config(config_file, overrides), workdir, evaluate=evaluate)
    if result.export_dir is None:
        raise SystemExit(f"training in {workdir} stopped early ({result.stopped_by_signal}); rerun to continue")
    return result.export_dir


MODEL_CARD = """# sdjax shapes-64

A small text-to-image latent diffusion model that sdjax trains itself and ships, so that `sdjax generate`
works without downloading anything. It draws one circle, square or triangle in one of eight colours
(red, green, blue, yellow, purple, orange, white, black), small or large, on the left, right, top, bottom or
center, on a plain background of another of those colours, at 64x64 pixels. It knows nothing else.

- Autoencoder: SD's AutoencoderKL architecture, 4 latent channels, factor 4 (64x64 -> 16x16x4); its decoder
  fine-tuned afterwards with the encoder frozen, as SD's ft-MSE decoder was.
- Text encoder: a 3-layer CLIP text transformer with a BPE tokenizer learned from the captions, trained
  jointly with the U-Net.
- U-Net: SD's UNet2DConditionModel architecture with cross-attention, linear betas, v-prediction; trained in
  three cosine cycles of 4,000 steps (stages unet, refine and balance).
- Weights: the EMA, float16. Default sampler: DPM-Solver++(2M) with Karras sigmas, right from about 15 steps;
  below that use `sampler="euler"` (64 held-out prompts, guidance 3, adherence at 5 / 8 / 10 steps:
  DPM-Solver++(2M) 2 / 47 / 72%, Euler 78 / 88 / 86%: the multistep extrapolation overshoots under guidance).

Re-create it: `python -m experiments.shapes.recipe --workdir runs/shapes --out sdjax/assets/shapes`
(see experiments/shapes/README.md).

Trained by: {revision}; scaling_factor {scale}; {seconds:.0f} s in all.
"""


def package(unet_export: Path, decoder_export: Path, out: Path, note: dict) -> Path:
    """The diffusion stage's pipeline with the fine-tuned decoder's VAE, in float16 with a model card, swapped into
    `out` in one move."""
    import sdjax

    pipeline = sdjax.load_pipeline(unet_export)
    pipeline.params = {**pipeline.params, "vae": sdjax.load_pipeline(decoder_export).params["vae"]}

    def build(folder: Path):
        pipeline.save_pretrained(folder, dtype=np.float16)
        (folder / "README.md").write_text(MODEL_CARD.format(**note))

    return _replace_dir(build, out)


class StageClock:
    """Seconds spent in each stage, summed over every invocation of the recipe (workdir/timing.json), so a run
    that was interrupted and continued still reports what the whole re-creation cost."""

    def __init__(self, path: Path):
        self.path = path
        self.seconds = json.loads(path.read_text()) if path.is_file() else {}

    @contextlib.contextmanager
    def stage(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.seconds, indent=2))

    def total(self) -> float:
        return sum(self.seconds.values())


def run(workdir: Path, out: Path, *, smoke: bool = False, until: str = "package") -> Path:
    from sdjax.train.loop import git_revision

    stages = STAGES[:STAGES.index(until) + 1]
    data_dir, init_dir, base_dir = workdir / "data", workdir / "init", workdir / "base"
    clock = StageClock(workdir / "timing.json")
    overrides = SMOKE["train"] if smoke else []
    with_data = lambda folder: [f"model.pretrained={folder}", f"data.folder={data_dir}"] + overrides

    log.info("data: %s", data_dir)
    from experiments.shapes.dataset import write_dataset, write_loss_masks
    with clock.stage("data"):
        write_loss_masks(write_dataset(data_dir, SMOKE["dataset"] if smoke else DATASET_SIZE, DATASET_SEED))
    if "init" in stages and not init_dir.is_dir():
        log.info("init: tokenizer and fresh weights in %s", init_dir)
        with clock.stage("init"):
            _replace_dir(lambda folder: write_init_folder(folder, data_dir, INIT_SEED,
                                                          SMOKE["model"] if smoke else None), init_dir)
    if "vae" in stages:
        log.info("vae: training in %s", workdir / "vae")
        with clock.stage("vae"):
            vae_export = train_stage(HERE / "train_vae.py", workdir / "vae", with_data(init_dir))
    if "base" in stages and not base_dir.is_dir():
        with clock.stage("base"):
            _replace_dir(lambda folder: write_base_folder(folder, vae_export, data_dir), base_dir)
    scale = _json(base_dir / "vae" / "config.json")["scaling_factor"] if base_dir.is_dir() else None
    log.info("base: %s (latent scaling_factor %s)", base_dir, scale)
    from experiments.shapes.evaluate import DEFAULT_GUIDANCE, Setting, adherence_evaluator
    size = SMOKE["evaluate"] if smoke else {"prompts": 64, "steps": 20}
    evaluator = adherence_evaluator(size["prompts"], Setting("dpmpp_2m", size["steps"], DEFAULT_GUIDANCE))
    cached = [f"data.cache_dir={workdir / 'latent_cache'}"] + (SMOKE["unet"] if smoke else [])
    unet_export = base_dir
    for stage in ("unet", "refine", "balance"):  # three cosine cycles, each from the previous one's EMA weights
        if stage in stages:
            log.info("%s: training in %s", stage, workdir / stage)
            with clock.stage(stage):
                unet_export = train_stage(HERE / f"train_{stage}.py", workdir / stage,
                                          with_data(unet_export) + cached, evaluate=evaluator)
    if "decoder" in stages:
        log.info("decoder: training in %s", workdir / "decoder")
        with clock.stage("decoder"):
            decoder_export = train_stage(HERE / "train_decoder.py", workdir / "decoder", with_data(base_dir))
    if "package" in stages:
        with clock.stage("package"):
            package(unet_export, decoder_export, out, {"revision": git_revision(), "scale": scale,
                                                       "seconds": clock.total()})
        log.info("package: %s (%s)", out, ", ".join(f"{k} {v:.0f} s" for k, v in clock.seconds.items()))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/shapes", help="where the stages write (resumable)")
    parser.add_argument("--out", default="runs/shapes/package", help="the packaged model folder")
    parser.add_argument("--smoke", action="store_true", help="toy sizes: checks the recipe in about a minute")
    parser.add_argument("--until", choices=STAGES, default="package", help="stop after this stage")
    parser.add_argument("--no-compile-cache", action="store_true",
                        help="do not read or write JAX's persistent compilation cache (see `sdjax train --help`)")
    args = parser.parse_args(argv)
    if not args.no_compile_cache:  # a resumed recipe, and the stages sharing one train step, compile once
        from sdjax import compile_cache
        compile_cache.enable()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    logging.getLogger("sdjax").setLevel(logging.INFO)
    started = time.perf_counter()
    run(Path(args.workdir), Path(args.out), smoke=args.smoke, until=args.until)
    log.info("done in %.0f s", time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
