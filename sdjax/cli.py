"""The `sdjax` command: generate, img2img, inpaint, controlnet, train, convert.

Every argument is checked before the model loads, so a bad size, sampler, strength or output path fails in
a second with a clear message and leaves no file behind.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import glob
import logging
import os
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

from sdjax import compile_cache
from sdjax.errors import SdjaxError

# --- argument parsing ---------------------------------------------------------------------------------------

def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like WIDTHxHEIGHT (e.g. 512x768), got {text!r}") from None
    return width, height


def _unit_interval(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be within [0, 1], got {value}")
    return value


def seed_list(text: str) -> list[int]:
    """"7" (the first image's seed), "1,5,9" (one image per seed) or "10-13" (a range, inclusive), combinable."""
    seeds = []
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        try:
            low = int(first)
            seeds += list(range(low, int(last) + 1)) if dash else [low]
        except ValueError:
            raise argparse.ArgumentTypeError(f"seed must be an integer, a list (1,5,9) or a range (10-13), got "
                                             f"{text!r}") from None
        if dash and int(last) < low:
            raise argparse.ArgumentTypeError(f"seed range {part!r} runs backwards; write {last}-{first}")
    return seeds


def _single_file_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FOLDER_OR_HUB_ID",
                        help="for a single-file checkpoint: a diffusers folder or hub id whose configs, tokenizers "
                             "and scheduler go with its weights (needed for small or unusual architectures; "
                             "full-size SD 1.x/2.x/SDXL are recognised)")
    parser.add_argument("--prediction-type", choices=("epsilon", "v_prediction"),
                        help="for a single-file checkpoint: what the model predicts, which a file cannot always "
                             "say (default: v_prediction for SD 2.x as diffusers, else epsilon or --config's)")


ATTENTION_IMPLEMENTATIONS = ("auto", "blocked", "einsum", "chunked", "xla", "pallas")
"""sdjax.models.attention.IMPLEMENTATIONS, named here so that `--help` does not import jax (tests/test_cli.py
checks that the two agree)."""


def _sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", help="what to draw (or take it from --from-png)")
    parser.add_argument("--from-png", metavar="PNG",
                        help="re-run the settings an A1111-style PNG carries (prompt, negative prompt, seed, steps, "
                             "sampler, schedule, guidance, size, strength); model, output and the like still come "
                             "from this command line")
    parser.add_argument("--negative-prompt", "--negative", dest="negative_prompt",
                        help="what to avoid (none by default: an SDXL model whose config says "
                             "force_zeros_for_empty_prompt then guides from zeros, as diffusers does)")
    parser.add_argument("--model", help="diffusers-layout folder, hub id, or single-file checkpoint (.safetensors, "
                                        ".ckpt; default: the small shapes model that ships inside sdjax)")
    _single_file_arguments(parser)
    parser.add_argument("--steps", type=int, default=30, help="sampling steps")
    parser.add_argument("--sampler", help="sampler name (`sdjax samplers` lists them); default: the model's "
                                          "scheduler config, as diffusers would run it")
    parser.add_argument("--schedule", help="sigma schedule (karras, normal, exponential, ...; `sdjax samplers` "
                                           "lists them); default: 'normal' with --sampler, else the scheduler config's")
    parser.add_argument("--guidance-scale", "--cfg-scale", "--cfg", dest="guidance_scale", type=float, default=None,
                        metavar="SCALE",
                        help="classifier-free guidance scale (default 7.5; 3 for the embedded shapes model)")
    parser.add_argument("--guidance-rescale", "--rescale", dest="guidance_rescale", type=float, default=0.0,
                        metavar="PHI",
                        help="guidance rescale phi (Lin et al. 2023)")
    parser.add_argument("--seed", type=seed_list, default="0", metavar="SEEDS",
                        help="seed of the first image (image i uses seed + i), or one seed per image: 1,5,9 or "
                             "10-13")
    parser.add_argument("-n", "--num-images", "--count", dest="num_images", type=int, default=None, metavar="N",
                        help="number of images (default: one per --seed given, else 1)")
    parser.add_argument("--size", type=_size, help="WIDTHxHEIGHT, multiples of the VAE factor (default: the "
                                                  "model's native size)")
    parser.add_argument("--clip-skip", type=int, default=None, help="use the text encoder's n-th last layer")
    parser.add_argument("--prompt-syntax", default="diffusers", choices=("diffusers", "a1111"),
                        help="diffusers: plain text cut at 77 tokens; a1111: (word:1.3) and [word] emphasis, BREAK, "
                             "prompts of any length in chunks of 75 tokens, as in A1111 and ComfyUI")
    parser.add_argument("--out", default=".", help="PNG file, or an existing folder for numbered PNGs")
    parser.add_argument("--grid", action="store_true", help="also write all images as one grid PNG")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="param and compute dtype")
    parser.add_argument("--attention", default="auto", choices=ATTENTION_IMPLEMENTATIONS,
                        help="attention implementation (auto: blocked on CPU, xla on GPU/TPU)")
    parser.add_argument("--batch-invariant", action="store_true",
                        help="bitwise the same image for a seed whatever the batch (runs images one by one)")
    parser.add_argument("--no-compile-cache", action="store_true",
                        help="do not use the persistent compilation cache")
    parser.add_argument("--cache-dir",
                        help=f"compilation cache folder (default $SDJAX_CACHE_DIR or {compile_cache.DEFAULT_CACHE})")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="show a progress bar over sampler steps (default: when stderr is a terminal); "
                             "adaptive samplers (dpm_adaptive) show none")
    parser.add_argument("--mesh", metavar="data=N,fsdp=M",
                        help="generate on every device (N * M of them): the images split over all, each large "
                             "param stored split over fsdp; default: one device, or data=<all devices> with "
                             "--coordinator")
    add_process_arguments(parser)


def add_process_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that make a command one process of a multi-process run (`sdjax generate`, `sdjax train`)."""
    multi = parser.add_argument_group("several processes (hosts): start one per host with the same arguments")
    multi.add_argument("--coordinator", metavar="HOST:PORT",
                       help="process 0's address; with --num-processes and --process-id, joins a multi-process run "
                            "(jax.distributed, gloo on CPU); 'auto': detect the cluster (Cloud TPU, SLURM)")
    multi.add_argument("--num-processes", type=int, help="processes in the run")
    multi.add_argument("--process-id", type=int, help="this process's index, 0 to --num-processes - 1")
    multi.add_argument("--join-timeout", type=int, default=300, metavar="SECONDS",
                       help="how long to wait for the other processes before giving up")


def join_processes(args) -> None:
    """Join the multi-process run that `add_process_arguments`' options describe (nothing without --coordinator).
    Call it before anything touches a device."""
    if not args.coordinator:
        given = [flag for flag, value in (("--num-processes", args.num_processes), ("--process-id", args.process_id))
                 if value is not None]
        if given:
            raise SdjaxError(f"{' and '.join(given)} without --coordinator: give process 0's HOST:PORT (or auto)")
        return
    from sdjax import distributed
    auto = args.coordinator == "auto"
    distributed.initialize(None if auto else args.coordinator, args.num_processes, args.process_id,
                           timeout=args.join_timeout)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends "(default: X)" to an option's help unless the help already says its default or there is none."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, "", argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


GENERATE_EXAMPLES = """examples:
  sdjax generate "a red circle on a blue background" --out circle.png
  sdjax generate "a cat" --model path/to/stable-diffusion-v1-5 --sampler dpmpp_2m --schedule karras --steps 20
  sdjax generate "a small green square at the top" --seed 1-4 --out shapes/ --grid
  sdjax generate "a lion at dawn" --model stabilityai/stable-diffusion-xl-base-1.0 \\
      --refiner stabilityai/stable-diffusion-xl-refiner-1.0 --high-noise-fraction 0.8 --steps 40
"""

DEFAULT_HIGH_NOISE_FRACTION = 0.8  # diffusers' SDXL docs (the ensemble of expert denoisers)


def _refiner_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--refiner", metavar="FOLDER_OR_HUB_ID",
                        help="an SDXL refiner (or base) that finishes --model's images, as diffusers' ensemble of "
                             "expert denoisers: --model (an SDXL base) runs the high-noise part of the schedule "
                             "(denoising_end), the refiner the rest from its latents (denoising_start), with the "
                             "same prompts, seeds, steps and guidance; the PNGs are the refined images. Each model "
                             "samples with its own scheduler config (no --sampler / --schedule)")
    parser.add_argument("--high-noise-fraction", type=float, metavar="FRACTION",
                        help=f"with --refiner: the share of the schedule, from pure noise, that --model runs before "
                             f"the refiner takes over, strictly between 0 and 1 (default "
                             f"{DEFAULT_HIGH_NOISE_FRACTION}, as in diffusers' docs)")


def build_parser() -> argparse.ArgumentParser:
    from sdjax import __version__

    parser = argparse.ArgumentParser(prog="sdjax", description="Stable Diffusion in JAX", formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"sdjax {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    command = functools.partial(commands.add_parser, formatter_class=_HelpFormatter)
    generate = command("generate", help="text to image", epilog=GENERATE_EXAMPLES)
    _sampling_arguments(generate)
    _refiner_arguments(generate)
    generate.set_defaults(func=run_sampling_command, inputs=text_inputs)
    img2img = command("img2img", help="image to image")
    _sampling_arguments(img2img)
    img2img.set_defaults(func=run_sampling_command, inputs=img2img_inputs)
    img2img.add_argument("--image", required=True, help="starting image (PNG/JPEG)")
    img2img.add_argument("--strength", type=_unit_interval, default=0.8,
                         help="how much of the schedule to run from the noised image, in [0, 1] (default 0.8)")
    inpaint = command("inpaint", help="repaint the white part of a mask")
    _sampling_arguments(inpaint)
    inpaint.set_defaults(func=run_sampling_command, inputs=inpaint_inputs)
    inpaint.add_argument("--image", required=True, help="image to repaint")
    inpaint.add_argument("--mask", required=True, help="mask image, white = repaint, same size as the image")
    inpaint.add_argument("--strength", type=_unit_interval, default=1.0, help="in [0, 1] (default 1)")
    controlnet = command("controlnet", help="text to image steered by ControlNet(s)")
    _sampling_arguments(controlnet)
    controlnet.set_defaults(func=run_sampling_command, inputs=controlnet_inputs)
    controlnet.add_argument("--controlnet", action="append", required=True,
                            help="diffusers ControlNet folder; repeat for several ControlNets")
    controlnet.add_argument("--control-image", action="append", required=True,
                            help="control image at the output size, one per --controlnet, in the same order")
    controlnet.add_argument("--control-scale", type=float, action="append",
                            help="conditioning scale per ControlNet (default 1; one value applies to all)")
    controlnet.add_argument("--control-start", type=_unit_interval, action="append",
                            help="fraction of the steps where each ControlNet starts acting (default 0)")
    controlnet.add_argument("--control-end", type=_unit_interval, action="append",
                            help="fraction of the steps where each ControlNet stops acting (default 1)")
    controlnet.add_argument("--guess-mode", action="store_true",
                            help="ControlNets act on the conditional half of guidance only")
    convert = command("convert", help="single-file checkpoint <-> diffusers folder, or re-save a folder "
                                      "(.bin -> safetensors, dtype)")
    convert.add_argument("source", help="diffusers folder, hub id, or single-file checkpoint (.safetensors, .ckpt)")
    convert.add_argument("target", help="new folder, or a new .safetensors file for a single file")
    convert.add_argument("--to", choices=("diffusers", "single-file"),
                         help="what to write: a diffusers folder, or one .safetensors in the original "
                              "CompVis/Stability layout (A1111, ComfyUI); default: single-file when the target "
                              "ends in .safetensors")
    convert.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                         help="dtype of the saved weights")
    _single_file_arguments(convert)
    convert.set_defaults(func=run_convert)
    samplers = command("samplers", help="list the samplers and sigma schedules, one line each")
    samplers.set_defaults(func=run_list_samplers)
    commands.add_parser("train", help="train or fine-tune (see `sdjax train --help`)", add_help=False)
    return parser


# --- commands -----------------------------------------------------------------------------------------------

def output_paths(out: str, seeds: list[int]) -> list[Path]:
    """One PNG path per image: `out` itself for a single image to a .png name, else numbered files
    (NNNNN-SEED.png, or STEM-NNNNN-SEED.png beside a .png name) that continue after the numbers already there,
    so a second run never overwrites the first."""
    target = Path(out)
    if target.suffix.lower() == ".png" and len(seeds) == 1:
        return [target]
    folder, prefix = (target.parent, f"{target.stem}-") if target.suffix.lower() == ".png" else (target, "")
    taken = [int(match.group(1)) for path in folder.glob(f"{glob.escape(prefix)}*.png")
             if (match := re.fullmatch(re.escape(prefix) + r"(\d{5})-\d+\.png", path.name))]
    start = max(taken, default=-1) + 1
    return [folder / f"{prefix}{start + i:05d}-{seed}.png" for i, seed in enumerate(seeds)]


def check_output(out: str) -> None:
    """The output folder exists and takes files (checked before the model loads, not after sampling)."""
    target = Path(out)
    folder = target.parent if target.suffix.lower() == ".png" else target
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist; create it first"
        raise SdjaxError(f"--out {out}: {folder} {what}")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".sdjax-write-check-"):
            pass
    except OSError as err:
        raise SdjaxError(f"--out {out}: cannot write into {folder} ({err.strerror}); choose another folder") from None


def apply_png_settings(args) -> None:
    """Fill `args` from the parameters text of args.from_png (A1111's format and names)."""
    from sdjax import a1111
    from sdjax.images import read_parameters

    path = Path(args.from_png)
    if not path.is_file():
        raise SdjaxError(f"--from-png {path}: no such file")
    text = read_parameters(path)
    if not text:
        raise SdjaxError(f"--from-png {path}: the PNG carries no generation parameters")
    prompt, negative, settings = a1111.parse_parameters(text)
    found = a1111.generation_settings(settings)
    args.prompt, args.negative_prompt, args.seed = prompt, negative or None, [found["seed"]]
    args.steps, args.sampler, args.schedule = found["steps"], found.get("sampler"), found.get("schedule")
    args.guidance_scale = found.get("guidance_scale", args.guidance_scale)
    args.guidance_rescale = found.get("guidance_rescale", 0.0)
    args.clip_skip = found.get("clip_skip")
    args.prompt_syntax = found["prompt_syntax"]
    if "width" in found:
        args.size = (found["width"], found["height"])
    if hasattr(args, "strength") and "strength" in found:
        args.strength = found["strength"]
    if "Refiner switch at" in settings and hasattr(args, "refiner"):  # generate: --refiner comes from the command
        if args.refiner is None:
            warnings.warn(f"--from-png {path}: the image was finished by a refiner ({settings.get('Refiner', '?')}, "
                          f"switch at {settings['Refiner switch at']}); give --refiner to do the same")
        elif args.high_noise_fraction is None:
            try:
                args.high_noise_fraction = float(settings["Refiner switch at"])
            except ValueError:
                raise SdjaxError(f"--from-png {path}: 'Refiner switch at' should be a number, got "
                                 f"{settings['Refiner switch at']!r}") from None


def check_sampling_names(args) -> None:
    from sdjax import schedules
    from sdjax.samplers import get_sampler

    if args.sampler is not None:
        get_sampler(args.sampler, public_only=True)
    if args.schedule is not None:
        schedules.get_schedule(args.schedule)
    if args.steps < 1:
        raise SdjaxError(f"--steps must be at least 1, got {args.steps}")
    if args.num_images is not None and args.num_images < 1:
        raise SdjaxError(f"-n/--num-images must be at least 1, got {args.num_images}")
    if args.num_images not in (None, 1) and len(args.seed) > 1 and args.num_images != len(args.seed):
        raise SdjaxError(f"--seed gives {len(args.seed)} seeds but -n/--num-images asks for {args.num_images} "
                         f"images; give one of them")


def check_refiner_flags(args) -> None:
    """--refiner and --high-noise-fraction on their own (no folder read): the fraction's range, and no sampler or
    schedule name, since the hand-over cuts each folder's own scheduler config. Sets the default fraction."""
    refiner, fraction = getattr(args, "refiner", None), getattr(args, "high_noise_fraction", None)
    if refiner is None:
        if fraction is not None:
            raise SdjaxError("--high-noise-fraction is the share of the schedule --model runs before --refiner "
                             "takes over; give --refiner too (an SDXL refiner folder or hub id), or drop it")
        return
    if fraction is None:
        args.high_noise_fraction = fraction = DEFAULT_HIGH_NOISE_FRACTION
    if not 0.0 < fraction < 1.0:
        raise SdjaxError(f"--high-noise-fraction must be strictly between 0 and 1 (the share of the schedule "
                         f"--model runs before --refiner takes over), got {fraction:g}")
    given = [flag for flag, value in (("--sampler", args.sampler), ("--schedule", args.schedule)) if value is not None]
    if given:
        origin = f" (here from --from-png {args.from_png})" if args.from_png else ""
        raise SdjaxError(f"{' and '.join(given)}{origin} cannot be used with --refiner: the base hands its latents "
                         f"to the refiner at diffusers' timesteps, which sdjax reproduces for each folder's own "
                         f"scheduler config only; leave {'them' if len(given) > 1 else 'it'} unset")


@dataclasses.dataclass(frozen=True)
class HandoffModel:
    """What the base -> refiner hand-over needs to know of one model, read from its folder before it loads (or
    from the loaded pipeline, for a single file)."""
    flag: str             # --model or --refiner
    name: str
    kind: str             # "sd", "base" or "refiner"
    latent_channels: int
    factor: int           # the VAE's downscale factor
    scheduler_config: dict

    @classmethod
    def from_folder(cls, flag: str, name: str, folder: Path) -> "HandoffModel":
        from sdjax.weights import diffusers_folder

        try:
            index = diffusers_folder.read_model_index(folder)
            family = diffusers_folder.model_family(index)
            vae = diffusers_folder.read_config(folder / "vae", "vae")[0]
            scheduler = diffusers_folder.read_json(folder / "scheduler" / "scheduler_config.json")
        except SdjaxError as err:
            raise SdjaxError(f"{flag} {name}: {err}") from None
        return cls(flag, name, cls._kind(family), vae.latent_channels, vae.downscale_factor, scheduler)

    @classmethod
    def from_pipeline(cls, flag: str, name: str, pipeline) -> "HandoffModel":
        vae = pipeline.configs["vae"]
        return cls(flag, name, cls._kind(tuple(pipeline.configs)), vae.latent_channels, vae.downscale_factor,
                   pipeline.scheduler_config)

    @staticmethod
    def _kind(components) -> str:
        if "text_encoder_2" not in components:
            return "sd"
        return "base" if "text_encoder" in components else "refiner"

    def plan(self, steps: int, start, end):
        """The sampling plan of this model's part of the hand-over; SdjaxError naming the model if it has none."""
        from sdjax import schedules
        from sdjax.scheduler_config import CLASS_DEFAULTS, HANDOFF_CLASSES, plan_from_scheduler_config, resolve_config

        config, role = self.scheduler_config, "denoising_end" if end is not None else "denoising_start"
        try:
            alphas = schedules.alphas_cumprod_from_config(
                resolve_config(config) if config.get("_class_name") in CLASS_DEFAULTS else config)
            plan = plan_from_scheduler_config(config, steps, alphas)
        except SdjaxError as err:
            raise SdjaxError(f"{self.flag} {self.name}: {err}") from None
        if plan.timesteps is None:
            raise SdjaxError(f"{self.flag} {self.name}: scheduler/scheduler_config.json is of class "
                             f"{config.get('_class_name')!r}, but the hand-over cuts the schedule at diffusers' "
                             f"timesteps, which sdjax reproduces for {', '.join(HANDOFF_CLASSES)}; use a copy of the "
                             f"folder whose scheduler config has one of those classes")
        try:
            return plan.for_denoising(start, end, len(alphas))
        except SdjaxError as err:
            fraction = start if end is None else end
            raise SdjaxError(f"{self.flag} {self.name} (--high-noise-fraction {fraction:g} is its {role}): "
                             f"{err}") from None


def check_handoff(args, base: HandoffModel | None, refiner: HandoffModel | None) -> None:
    """The base -> refiner hand-over of `sdjax generate --refiner`, checked for the models known so far (both are
    read from their folders before anything loads; a single file is known once loaded)."""
    fraction = args.high_noise_fraction
    if base is not None:
        if base.kind != "base":
            what = ("an SDXL refiner (text_encoder_2 only); the base starts the image: give the SDXL base as "
                    "--model and this model as --refiner" if base.kind == "refiner" else
                    "a Stable Diffusion 1.x / 2.x model, not SDXL; --refiner continues an SDXL base's latents: give "
                    "an SDXL base as --model (e.g. stabilityai/stable-diffusion-xl-base-1.0)")
            raise SdjaxError(f"--model {base.name} is {what}")
        base_plan = base.plan(args.steps, None, fraction)
    if refiner is not None:
        if refiner.kind == "sd":
            raise SdjaxError(f"--refiner {refiner.name} is a Stable Diffusion 1.x / 2.x model, not SDXL (no "
                             f"text_encoder_2); give an SDXL refiner (e.g. stabilityai/stable-diffusion-xl-refiner-1.0) "
                             f"or base")
        refiner_plan = refiner.plan(args.steps, fraction, None)
    if base is None or refiner is None:
        return
    if (base.latent_channels, base.factor) != (refiner.latent_channels, refiner.factor):
        raise SdjaxError(f"--refiner {refiner.name} has latents of {refiner.latent_channels} channels at 1/"
                         f"{refiner.factor} of the image size, --model {base.name} {base.latent_channels} at 1/"
                         f"{base.factor}: the refiner continues the base's latents, so the two need the same VAE "
                         f"(SDXL's base and refiner share one)")
    if base_plan.ve_handoff != refiner_plan.ve_handoff:
        scaling = lambda model, plan: (f"{model.scheduler_config.get('_class_name')}: "
                                       f"{'x0 + sigma * noise' if plan.ve_handoff else 'the noise schedule'}")
        warnings.warn(f"--model hands over its latents scaled as its scheduler config keeps them "
                      f"({scaling(base, base_plan)}), and --refiner reads them in another scaling "
                      f"({scaling(refiner, refiner_plan)}); diffusers does the same, and the refined images may "
                      f"come out wrong: give both folders the same scheduler class", stacklevel=2)


def control_arguments(args) -> list[tuple]:
    """(folder, image, scale, start, end) per ControlNet, read and checked before any model loads."""
    from sdjax import images as image_io

    count = len(args.controlnet)

    def per_controlnet(values, default, name):
        values = values or [default]
        if len(values) not in (1, count):
            raise SdjaxError(f"{name} is given {len(values)} times for {count} --controlnet; give it once or "
                             f"once per --controlnet")
        return values * count if len(values) == 1 else values

    if len(args.control_image) != count:
        raise SdjaxError(f"{count} --controlnet but {len(args.control_image)} --control-image; give one image each")
    images = [image_io.load_image(path) for path in args.control_image]
    if len({image.shape for image in images}) != 1:
        raise SdjaxError(f"control images differ in size: {[f'{i.shape[1]}x{i.shape[0]}' for i in images]}")
    for folder in args.controlnet:
        if not (Path(folder) / "config.json").is_file():
            raise SdjaxError(f"--controlnet {folder}: not a diffusers ControlNet folder (no config.json)")
    starts = per_controlnet(args.control_start, 0.0, "--control-start")
    ends = per_controlnet(args.control_end, 1.0, "--control-end")
    if any(start >= end for start, end in zip(starts, ends)):
        raise SdjaxError(f"each --control-start must be below its --control-end, got {starts} and {ends}")
    return list(zip(args.controlnet, images, per_controlnet(args.control_scale, 1.0, "--control-scale"), starts,
                    ends))


def text_inputs(args) -> dict:
    width, height = args.size or (None, None)
    return {"height": height, "width": width}


def img2img_inputs(args) -> dict:
    from sdjax.images import load_image
    from sdjax.pipeline import Edit

    return {"edit": Edit(load_image(args.image)[None], strength=args.strength)}


def inpaint_inputs(args) -> dict:
    from sdjax.images import load_image
    from sdjax.pipeline import Edit

    image, mask = load_image(args.image)[None], load_image(args.mask, mode="L")[None]
    if mask.shape[1:] != image.shape[1:3]:
        raise SdjaxError(f"--mask {args.mask} is {mask.shape[2]}x{mask.shape[1]} but --image {args.image} is "
                         f"{image.shape[2]}x{image.shape[1]}; they must be the same size")
    return {"edit": Edit(image, mask, args.strength)}


def controlnet_inputs(args) -> dict:
    import jax.numpy as jnp

    from sdjax.control import Control, load_controlnet

    controls = [Control(load_controlnet(path, dtype=getattr(jnp, args.dtype)), image, scale, start, end)
                for path, image, scale, start, end in control_arguments(args)]
    height, width = controls[0].image.shape[:2]
    return {"height": height, "width": width, "control": controls, "guess_mode": args.guess_mode}


def status(text: str) -> None:
    """One line on stderr per phase, so a long load or compile is never silent."""
    print(f"sdjax: {text}", file=sys.stderr, flush=True)


class _StatusLines(logging.Handler):
    """Shows the pipeline's "compiling ..." log record as a status line, with a note after it."""

    def __init__(self, note: str):
        super().__init__()
        self.note = note

    def emit(self, record):
        status(record.getMessage() + self.note)


def show_compile_status(note: str) -> None:
    logger = logging.getLogger("sdjax.pipeline")
    for handler in [h for h in logger.handlers if isinstance(h, _StatusLines)]:  # one per process, not per call
        logger.removeHandler(handler)
    logger.addHandler(_StatusLines(note))
    logger.setLevel(logging.INFO)
    logger.propagate = False


def seed_arguments(args) -> dict:
    """generate()'s seed arguments: a list of seeds gives one image each, one seed numbers -n images from it."""
    if len(args.seed) > 1:
        return {"seeds": args.seed}
    return {"seed": args.seed[0], "num_images": args.num_images or 1}


def run_list_samplers(args) -> int:
    from sdjax import schedules
    from sdjax.samplers import SAMPLERS

    def summary(fn, width: int = 96) -> str:
        """The docstring's first sentence, on one line."""
        paragraph = " ".join((fn.__doc__ or "").split("\n\n")[0].split())
        sentence = re.split(r"(?<!et al)(?<!eq)(?<!\.)\.\s", paragraph)[0].rstrip(".:")
        return sentence if len(sentence) <= width else sentence[:width - 3].rsplit(" ", 1)[0] + " ..."

    for title, table in (("samplers (--sampler)", SAMPLERS), ("schedules (--schedule)", schedules.SCHEDULES)):
        print(f"{title}:")
        for name, fn in sorted(table.items()):
            print(f"  {name:<19} {summary(fn)}")
    return 0


def run_sampling_command(args) -> int:
    """generate / img2img / inpaint / controlnet: `args.inputs(args)` reads the command's own inputs (images,
    mask, ControlNets) before the model loads; every command is then one `Pipeline.generate` call (generate
    --refiner: with denoising_end, then the refiner's `img2img` of its latents with denoising_start)."""
    import jax.numpy as jnp

    from sdjax.pipeline import check_image_size, load_pipeline, model_folder
    from sdjax.weights import diffusers_folder

    check_output(args.out)
    if args.from_png:
        apply_png_settings(args)
    if args.prompt is None:
        raise SdjaxError("give a prompt, or --from-png with a PNG that carries one")
    check_sampling_names(args)
    check_refiner_flags(args)
    join_processes(args)  # before the inputs: a ControlNet's params go to a device
    inputs = args.inputs(args)
    edit = inputs.get("edit")
    height, width = edit.image.shape[1:3] if edit is not None else (inputs["height"], inputs["width"])
    folder = model_folder(args.model)
    refiner = getattr(args, "refiner", None)
    if refiner is not None:  # both read from their folders, before either loads
        try:
            refiner_folder = model_folder(refiner)
        except SdjaxError as err:
            raise SdjaxError(f"--refiner: {err}") from None
        handoff = [HandoffModel.from_folder(flag, name, path) if path.is_dir() else None
                   for flag, name, path in (("--model", args.model or "(the embedded shapes model)", folder),
                                            ("--refiner", refiner, refiner_folder))]
        check_handoff(args, *handoff)
    if (height or width) and folder.is_dir():  # fail before the (slow) load; the model's default size needs no check
        factor = diffusers_folder.read_config(folder / "vae", "vae")[0].downscale_factor
        check_image_size(height or factor, width or factor, factor)
    if not args.no_compile_cache:
        compile_cache.enable(args.cache_dir)

    load = functools.partial(load_pipeline, dtype=getattr(jnp, args.dtype), attention=args.attention,
                             check_finite=True, mesh=generation_mesh(args))
    status(f"loading {args.model or 'the embedded shapes model'}")
    pipeline = load(folder, config=args.config, prediction_type=args.prediction_type)
    if refiner is not None and handoff[0] is None:  # a single file, known now
        handoff[0] = HandoffModel.from_pipeline("--model", args.model, pipeline)
        check_handoff(args, handoff[0], None)
    show_compile_status("" if args.no_compile_cache else " (slow the first time only: later runs read it from "
                                                         "the compilation cache)")
    settings = dict(steps=args.steps, guidance_scale=args.guidance_scale, guidance_rescale=args.guidance_rescale,
                    sampler=args.sampler, schedule=args.schedule, clip_skip=args.clip_skip,
                    batch_invariant=args.batch_invariant, prompt_syntax=args.prompt_syntax,
                    show_progress=sys.stderr.isatty() if args.progress is None else args.progress)
    cut = {} if refiner is None else {"denoising_end": args.high_noise_fraction}
    result = pipeline.generate(args.prompt, args.negative_prompt, **settings, **seed_arguments(args), **inputs, **cut)
    report_times(result, "the base model" if refiner is not None else "")
    recorded = result.settings  # what the PNGs say: the settings of the run the command line describes
    if refiner is not None:
        del pipeline  # its device memory is free before the refiner loads
        status(f"loading refiner {refiner}")
        second = load(refiner_folder)
        if handoff[1] is None:  # a single file, known now
            handoff[1] = HandoffModel.from_pipeline("--refiner", refiner, second)
            check_handoff(args, *handoff)
        status(f"refining from {args.high_noise_fraction:g} of the schedule")
        result = second.img2img(result, args.prompt, args.negative_prompt, denoising_start=args.high_noise_fraction,
                                **settings, seeds=result.seeds)
        report_times(result, "the refiner")
    from sdjax import distributed
    if distributed.is_primary():  # every process of a multi-process run holds the images; one writes them
        write_images(args, result, recorded)
    return 0


def report_times(result, what: str) -> None:
    hits = compile_cache.hits()
    cached = f" ({hits} program(s) read from the persistent compilation cache)" if hits else ""
    prefix = f"{what}: " if what else ""
    print(f"{prefix}compiled in {result.compile_seconds:.1f} s{cached}, sampled and decoded in {result.seconds:.1f} s",
          file=sys.stderr)


def generation_mesh(args) -> str | None:
    """--mesh; with several processes and no --mesh, data parallelism over all of their devices."""
    import jax

    if args.mesh or jax.process_count() == 1:
        return args.mesh
    return f"data={jax.device_count()}"


def png_parameters(args, settings: dict, seed: int, image) -> str:
    """A1111's parameters text for one image: the settings as asked (img2img's Steps is the full schedule, as
    A1111 records it; with --refiner, the base's sampler, and A1111's Refiner and Refiner switch at), with A1111's
    sampler and schedule names. `settings`: the GenerationResult's."""
    from sdjax import a1111

    refiner = getattr(args, "refiner", None)
    automatic = args.sampler is None and args.schedule is None  # the model's scheduler config chose
    return a1111.format_parameters(args.prompt, args.negative_prompt, {
        "Steps": args.steps, "Sampler": a1111.SAMPLER_NAMES.get(settings["sampler"], settings["sampler"]),
        "Schedule type": a1111.AUTOMATIC if automatic else a1111.SCHEDULE_NAMES.get(settings["schedule"],
                                                                                     settings["schedule"]),
        "CFG scale": f"{settings['guidance_scale']:g}", "Seed": seed, "Size": f"{image.shape[1]}x{image.shape[0]}",
        "Model": Path(args.model).name if args.model else "sdjax-shapes",
        "Denoising strength": getattr(args, "strength", None), "Clip skip": args.clip_skip,
        "Guidance rescale": args.guidance_rescale or None, "Prompt syntax": args.prompt_syntax,
        "ControlNet": ", ".join(Path(p).name for p in getattr(args, "controlnet", None) or []) or None,
        "Refiner": Path(refiner).name if refiner else None,
        "Refiner switch at": f"{args.high_noise_fraction:g}" if refiner else None})


def write_images(args, result, settings: dict | None = None) -> None:
    """The images as PNGs carrying `settings` (default: the result's own)."""
    from sdjax import images as image_io

    settings = result.settings if settings is None else settings
    paths = output_paths(args.out, result.seeds)
    for path, image, seed in zip(paths, result.images, result.seeds):
        image_io.save_png(path, image, png_parameters(args, settings, seed, image))
        print(path)
    if args.grid:
        out = Path(args.out)
        grid_path = out.with_name(f"{out.stem}-grid.png") if out.suffix.lower() == ".png" else out / "grid.png"
        image_io.save_png(grid_path, image_io.grid(result.images), png_parameters(args, settings, result.seeds[0],
                                                                                      result.images[0]))
        print(grid_path)


def run_convert(args) -> int:
    import ml_dtypes
    import numpy as np

    from sdjax.pipeline import load_pipeline

    target = Path(args.target)
    to_file = args.to == "single-file" or (args.to is None and target.suffix.lower() == ".safetensors")
    if to_file and target.suffix.lower() != ".safetensors":
        raise SdjaxError(f"{target}: a single file is written as .safetensors; name it "
                         f"{target.with_suffix('.safetensors').name}")
    if to_file and target.exists():
        raise SdjaxError(f"{target} exists; choose a new file name")
    if not to_file and target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise SdjaxError(f"{target} exists and is not an empty folder; choose a new folder")
    dtype = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[args.dtype]
    pipeline = load_pipeline(args.source, config=args.config, prediction_type=args.prediction_type)
    if to_file:
        try:
            pipeline.save_single_file(target, dtype=dtype)  # atomic: a failure leaves no file behind
        except OSError as err:
            raise SdjaxError(f"convert: writing {target} failed ({err}); nothing was left behind") from None
        print(target)
        return 0
    # Written beside the target and moved into place: a failure (a full disk) leaves nothing behind.
    partial = target.with_name(f".{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        pipeline.save_pretrained(partial, dtype=dtype)
        os.replace(partial, target)
    except OSError as err:
        shutil.rmtree(partial, ignore_errors=True)
        raise SdjaxError(f"convert: writing {target} failed ({err}); nothing was left behind") from None
    print(target)
    return 0


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"sdjax: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    warnings.formatwarning = one_line_warning
    # sdjax uses transformers for tokenizers only, so its advice that PyTorch is missing is noise here.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if argv[:1] == ["train"]:
        from sdjax.train.cli import main as train_main
        return train_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except SdjaxError as err:
        print(f"sdjax {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
