"""A whole Stable Diffusion pipeline, sdjax beside diffusers-torch on the same random weights and the same CPU:
text encoder, U-Net call, VAE decode and a whole generation at N steps (interleaved in one process), the sampler
loop's overhead over its U-Net calls, the cold compile of the generation program and the start of a new process
with the persistent compilation cache, and the peak host memory of a batch-4 generation (each side in a process
of its own).

    python -m experiments.perf.pipeline [--arch sd15|sd21|tiny] [--steps 4] [--reps 3] [--workdir DIR] [--out FILE]

Random weights in the architecture's full size (SD 1.5: 1.07 G params), fp32, 64x64 latents (512x512 pixels),
classifier-free guidance (so a U-Net call is on a batch of 2), Euler on SD's betas on both sides. The tokenizer is
the embedded shapes model's (any CLIP tokenizer gives the same shapes: 77 tokens). The weights are written once
to --workdir as a diffusers folder (about 4.3 GB for SD 1.5) for the processes that load them.
"""
from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from experiments.perf.kernels import cpu_model, publish

LATENT, PROMPT, MEMORY_BATCH, MEMORY_STEPS = 64, "a photo of an astronaut riding a horse on the moon", 4, 2
SCHEDULER = dict(_class_name="EulerDiscreteScheduler", beta_start=0.00085, beta_end=0.012,
                 beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1, prediction_type="epsilon",
                 timestep_spacing="linspace")


def architectures() -> dict:
    """{name: (U-Net, text encoder, VAE config)}; "tiny" (the test models' sizes) tries the script in a minute."""
    from sdjax.models import configs
    return {"sd15": (configs.SD15_UNET, configs.SD15_TEXT, configs.SD_VAE),
            "sd21": (configs.SD21_UNET, configs.SD21_TEXT, configs.SD_VAE),
            "tiny": (configs.TINY_UNET, configs.TINY_TEXT, configs.TINY_VAE)}


def write_folder(arch: str, folder: Path) -> Path:
    """A diffusers folder of the architecture with random weights (kept when already there)."""
    if (folder / "model_index.json").is_file():
        return folder
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sdjax.embedded import EMBEDDED_MODEL

    unet_config, text_config, vae_config = architectures()[arch]
    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(EMBEDDED_MODEL / "tokenizer", model_max_length=77)
    text = text_config.to_dict()
    text_encoder = CLIPTextModel(CLIPTextConfig(**{**text, "max_position_embeddings": 77}))
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**vae_config.to_dict()), text_encoder=text_encoder, tokenizer=tokenizer,
        unet=UNet2DConditionModel(**{**unet_config.to_dict(), "sample_size": LATENT}), scheduler=EulerDiscreteScheduler.from_config(SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    partial = folder.with_name(folder.name + ".partial")
    pipe.save_pretrained(partial, safe_serialization=True)
    partial.replace(folder)
    return folder


def timed(call, reps: int, *others) -> list[list[float]]:
    """Seconds of `reps` calls of each of (call, *others), interleaved; each warmed up once first."""
    calls = (call, *others)
    for fn in calls:
        fn()
    times = [[] for _ in calls]
    for _ in range(reps):
        for fn, seconds in zip(calls, times):
            started = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - started)
    return times


def in_process(folder: Path, steps: int, reps: int) -> dict:
    """Median seconds of each part, {part: (sdjax, torch)}, and sdjax's compile seconds of the generation."""
    import jax
    import jax.numpy as jnp
    import torch
    from diffusers import StableDiffusionPipeline

    import sdjax

    ours = sdjax.load_pipeline(folder)
    theirs = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    rng = np.random.default_rng(0)
    ids = np.asarray(ours.tokenizer([PROMPT, ""], padding="max_length", max_length=77)["input_ids"], np.int32)
    latents = rng.standard_normal((2, LATENT, LATENT, 4)).astype(np.float32)
    timestep = np.full((2,), 500, np.int32)
    width = ours.configs["text_encoder"].hidden_size
    states = rng.standard_normal((2, 77, width)).astype(np.float32)
    p, m = ours.params, ours.modules  # params are arguments: closed over, XLA would take them as constants
    text = functools.partial(jax.jit(lambda p, ids: m["text_encoder"].apply({"params": p}, ids).prompt_embeds),
                             p["text_encoder"])
    unet = functools.partial(jax.jit(lambda p, x, t, c: m["unet"].apply({"params": p}, x, t, c)), p["unet"])
    decode = functools.partial(jax.jit(lambda p, z: m["vae"].apply({"params": p}, z, method=m["vae"].decode)),
                               p["vae"])
    nchw = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))  # noqa: E731
    t_ids, t_latents, t_states = torch.from_numpy(ids.astype(np.int64)), nchw(latents), torch.from_numpy(states)
    pairs = {
        "text encoder (2 x 77 tokens)": (lambda: jax.block_until_ready(text(ids)),
                                         lambda: theirs.text_encoder(t_ids)),
        "U-Net call (batch 2)": (lambda: jax.block_until_ready(unet(latents, timestep, states)),
                                 lambda: theirs.unet(t_latents, torch.from_numpy(timestep), t_states)),
        "VAE decode (1 image)": (lambda: jax.block_until_ready(decode(jnp.asarray(latents[:1]))),
                                 lambda: theirs.vae.decode(t_latents[:1])),
        f"generation, {steps} steps (1 image)": (
            lambda: ours.generate(PROMPT, steps=steps, seed=0),
            lambda: theirs(PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                           output_type="np")),
    }
    medians = {}
    with torch.no_grad():
        for name, (sdjax_call, torch_call) in pairs.items():
            medians[name] = tuple(float(np.median(t)) for t in timed(sdjax_call, reps, torch_call))
            print(f"{name:34s} sdjax {medians[name][0]:7.2f} s   torch {medians[name][1]:7.2f} s", flush=True)
    return medians


CHILD = {
    "sdjax": """
import json, resource, sys, time
import sdjax
from sdjax import compile_cache
compile_cache.enable(sys.argv[2])
started = time.perf_counter()
pipe = sdjax.load_pipeline(sys.argv[1])
loaded = time.perf_counter()
result = pipe.generate([{prompt!r}] * {batch}, steps={steps}, seeds=list(range({batch})))
print(json.dumps({{"load": loaded - started, "compile": result.compile_seconds, "sample": result.seconds,
                  "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "cache_hits": compile_cache.hits()}}))
""",
    "torch": """
import json, resource, sys, time
import torch
from diffusers import StableDiffusionPipeline
started = time.perf_counter()
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1], safety_checker=None, requires_safety_checker=False)
loaded = time.perf_counter()
with torch.no_grad():
    pipe([{prompt!r}] * {batch}, num_inference_steps={steps}, output_type="np")
print(json.dumps({{"load": loaded - started, "sample": time.perf_counter() - loaded,
                  "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}}))
""",
}


def child(side: str, folder: Path, cache: Path, batch: int, steps: int) -> dict:
    code = CHILD[side].format(prompt=PROMPT, batch=batch, steps=steps)
    done = subprocess.run([sys.executable, "-c", code, str(folder), str(cache)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{side} process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def image_side(folder: Path) -> int:
    levels = len(json.loads((folder / "vae" / "config.json").read_text())["block_out_channels"])
    return LATENT * 2 ** (levels - 1)


def report(arch: str, side: int, steps: int, reps: int, medians: dict, cold: dict, warm: dict, memory: dict) -> str:
    import jax
    import torch

    unet = medians["U-Net call (batch 2)"][0]
    generation = medians[f"generation, {steps} steps (1 image)"][0]
    parts = medians["text encoder (2 x 77 tokens)"][0] + steps * unet + medians["VAE decode (1 image)"][0]
    lines = [f"CPU: {cpu_model()}; jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} "
             f"threads); {arch}, random weights, fp32, {side}x{side}, CFG; median of {reps}, interleaved.", "",
             "| part | sdjax (s) | diffusers-torch (s) | sdjax / torch |", "|---|---|---|---|"]
    lines += [f"| {name} | {ours:.2f} | {theirs:.2f} | {ours / theirs:.2f}x |" for name, (ours, theirs) in medians.items()]
    lines += ["", f"- Sampler loop overhead: the {steps}-step generation takes {generation:.2f} s against "
              f"{parts:.2f} s for its parts (text encoder + {steps} U-Net calls + VAE decode): "
              f"{100 * (generation - parts) / parts:+.1f}%.",
              f"- Generation program ({steps} steps, 1 image), new process: cold compile {cold['compile']:.1f} s; "
              f"with the persistent cache {warm['compile']:.1f} s from loaded weights to the compiled program "
              f"({warm['cache_hits']} program(s) read from the cache); weights loaded in {warm['load']:.1f} s.",
              f"- Peak host memory, batch {MEMORY_BATCH}, {MEMORY_STEPS} steps, from process start (weights "
              f"included): sdjax {memory['sdjax']['peak_gb']:.2f} GB, diffusers-torch "
              f"{memory['torch']['peak_gb']:.2f} GB ({memory['sdjax']['peak_gb'] / memory['torch']['peak_gb']:.2f}x)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="sd15", choices=("sd15", "sd21", "tiny"))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "sdjax-perf",
                        help="where the random-weight folder and the compilation cache are kept")
    parser.add_argument("--out", help="markdown file to write the table to")
    args = parser.parse_args(argv)

    folder = write_folder(args.arch, args.workdir / args.arch)
    cache = Path(tempfile.mkdtemp(dir=args.workdir, prefix="cache-"))
    cold = child("sdjax", folder, cache, 1, args.steps)
    warm = child("sdjax", folder, cache, 1, args.steps)
    memory = {side: child(side, folder, Path(tempfile.mkdtemp(dir=args.workdir, prefix="cache-")), MEMORY_BATCH,
                          MEMORY_STEPS) for side in ("sdjax", "torch")}
    medians = in_process(folder, args.steps, args.reps)
    text = report(args.arch, image_side(folder), args.steps, args.reps, medians, cold, warm, memory)
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
