"""The `sdjax` command: generate, img2img, inpaint, controlnet, train, convert.

Every argument is checked before the model loads, so a bad size, sampler, strength or output path fails in
a second with a clear message and leaves no file behind.
"""
from __future__ import annotations

import argparse
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
    parser.add_argument("--negative-prompt", "--negative", dest="negative_prompt", default="",
                        help="what to avoid")
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
"""


def build_parser() -> argparse.ArgumentParser:
    from sdjax import __version__

    parser = argparse.ArgumentParser(prog="sdjax", description="Stable Diffusion in JAX", formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"sdjax {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    command = functools.partial(commands.add_parser, formatter_class=_HelpFormatter)
    generate = command("generate", help="text to image", epilog=GENERATE_EXAMPLES)
    _sampling_arguments(generate)
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
    args.prompt, args.negative_prompt, args.seed = prompt, negative, [found["seed"]]
    args.steps, args.sampler, args.schedule = found["steps"], found.get("sampler"), found.get("schedule")
    args.guidance_scale = found.get("guidance_scale", args.guidance_scale)
    args.guidance_rescale = found.get("guidance_rescale", 0.0)
    args.clip_skip = found.get("clip_skip")
    args.prompt_syntax = found["prompt_syntax"]
    if "width" in found:
        args.size = (found["width"], found["height"])
    if hasattr(args, "strength") and "strength" in found:
        args.strength = found["strength"]


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
    mask, ControlNets) before the model loads; every command is then one `Pipeline.generate` call."""
    import jax.numpy as jnp

    from sdjax.pipeline import check_image_size, load_pipeline, model_folder
    from sdjax.weights import diffusers_folder

    check_output(args.out)
    if args.from_png:
        apply_png_settings(args)
    if args.prompt is None:
        raise SdjaxError("give a prompt, or --from-png with a PNG that carries one")
    check_sampling_names(args)
    join_processes(args)  # before the inputs: a ControlNet's params go to a device
    inputs = args.inputs(args)
    edit = inputs.get("edit")
    height, width = edit.image.shape[1:3] if edit is not None else (inputs["height"], inputs["width"])
    folder = model_folder(args.model)
    if (height or width) and folder.is_dir():  # fail before the (slow) load; the model's default size needs no check
        factor = diffusers_folder.read_config(folder / "vae", "vae")[0].downscale_factor
        check_image_size(height or factor, width or factor, factor)
    if not args.no_compile_cache:
        compile_cache.enable(args.cache_dir)

    status(f"loading {args.model or 'the embedded shapes model'}")
    pipeline = load_pipeline(folder, dtype=getattr(jnp, args.dtype), attention=args.attention, check_finite=True,
                             config=args.config, prediction_type=args.prediction_type, mesh=generation_mesh(args))
    show_compile_status("" if args.no_compile_cache else " (slow the first time only: later runs read it from "
                                                         "the compilation cache)")
    result = pipeline.generate(
        args.prompt, args.negative_prompt, steps=args.steps, guidance_scale=args.guidance_scale,
        guidance_rescale=args.guidance_rescale, sampler=args.sampler, schedule=args.schedule, **seed_arguments(args),
        clip_skip=args.clip_skip, batch_invariant=args.batch_invariant, prompt_syntax=args.prompt_syntax,
        show_progress=sys.stderr.isatty() if args.progress is None else args.progress, **inputs)
    hits = compile_cache.hits()
    cached = f" ({hits} program(s) read from the persistent compilation cache)" if hits else ""
    print(f"compiled in {result.compile_seconds:.1f} s{cached}, sampled and decoded in {result.seconds:.1f} s",
          file=sys.stderr)
    from sdjax import distributed
    if distributed.is_primary():  # every process of a multi-process run holds the images; one writes them
        write_images(args, result)
    return 0


def generation_mesh(args) -> str | None:
    """--mesh; with several processes and no --mesh, data parallelism over all of their devices."""
    import jax

    if args.mesh or jax.process_count() == 1:
        return args.mesh
    return f"data={jax.device_count()}"


def png_parameters(args, result, seed: int, image) -> str:
    """A1111's parameters text for one image: the settings as asked (img2img's Steps is the full schedule, as
    A1111 records it), with A1111's sampler and schedule names."""
    from sdjax import a1111

    settings = result.settings
    automatic = args.sampler is None and args.schedule is None  # the model's scheduler config chose
    return a1111.format_parameters(args.prompt, args.negative_prompt, {
        "Steps": args.steps, "Sampler": a1111.SAMPLER_NAMES.get(settings["sampler"], settings["sampler"]),
        "Schedule type": a1111.AUTOMATIC if automatic else a1111.SCHEDULE_NAMES.get(settings["schedule"],
                                                                                     settings["schedule"]),
        "CFG scale": f"{settings['guidance_scale']:g}", "Seed": seed, "Size": f"{image.shape[1]}x{image.shape[0]}",
        "Model": Path(args.model).name if args.model else "sdjax-shapes",
        "Denoising strength": getattr(args, "strength", None), "Clip skip": args.clip_skip,
        "Guidance rescale": args.guidance_rescale or None, "Prompt syntax": args.prompt_syntax,
        "ControlNet": ", ".join(Path(p).name for p in getattr(args, "controlnet", None) or []) or None})


def write_images(args, result) -> None:
    from sdjax import images as image_io

    paths = output_paths(args.out, result.seeds)
    for path, image, seed in zip(paths, result.images, result.seeds):
        image_io.save_png(path, image, png_parameters(args, result, seed, image))
        print(path)
    if args.grid:
        out = Path(args.out)
        grid_path = out.with_name(f"{out.stem}-grid.png") if out.suffix.lower() == ".png" else out / "grid.png"
        image_io.save_png(grid_path, image_io.grid(result.images), png_parameters(args, result, result.seeds[0],
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
