"""A training step of the shapes model (the recipe's U-Net stage: U-Net and text encoder trained jointly,
v-prediction, masked loss, AdamW, EMA), sdjax beside the same step written in diffusers-torch, on the same
weights and the same CPU, interleaved in one run; sdjax's step is also split into its parts (forward, forward
and backward, the whole compiled step) to show where its time goes.

    python -m experiments.perf.train_step [--batch 64] [--reps 5] [--out FILE]

The weights are the embedded model's (float32 copies); the batch is random latent moments, captions drawn from
the shapes world and its loss masks, as the recipe's cached-latent batches are.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from experiments.perf.kernels import machine, publish

RECIPE_CONFIG = Path(__file__).parents[1] / "shapes" / "train_unet.py"


def host_batch(batch: int, latent: int, pixels: int, seed: int = 0) -> dict:
    """Cached-latent moments, token ids of shapes captions and box-weighted loss masks, as the recipe's batches."""
    from experiments.shapes.dataset import held_out_prompts

    rng = np.random.default_rng(seed)
    captions = [prompt for prompt, _ in held_out_prompts(batch, seed=seed)]
    masks = np.ones((batch, pixels, pixels), np.float32)
    for row in masks:
        top, left = rng.integers(0, pixels // 2, 2)
        row[top:top + pixels // 3, left:left + pixels // 3] = 10.0
    moments = np.concatenate([rng.standard_normal((batch, latent, latent, 4)),
                              np.full((batch, latent, latent, 4), -4.0)], -1).astype(np.float32)
    return {"moments": moments, "caption": captions, "loss_mask": masks}


def sdjax_step(batch: dict):
    """{part: call} for the compiled sdjax parts on the recipe's config, the embedded model as the base."""
    import jax

    from sdjax.embedded import EMBEDDED_MODEL
    from sdjax.pipeline import load_pipeline
    from sdjax.train.config import load_config
    from sdjax.train.state import create_state, make_optimizer
    from sdjax.train.step import make_train_step
    from sdjax.train.task import build_task

    config = load_config(RECIPE_CONFIG, [f"model.pretrained={EMBEDDED_MODEL}"])
    base = load_pipeline(EMBEDDED_MODEL)
    task = build_task(config, base, jax.random.key(0))
    optimizer = make_optimizer(config.optimizer, config.num_steps)
    state = jax.device_put(create_state(task.trainable, task.frozen, optimizer), jax.devices()[0])
    inputs = jax.device_put(task.prepare_batch(batch))
    key = jax.random.key(1)
    forward = jax.jit(lambda params: task.loss_fn(params, task.frozen, inputs, key)[0])
    backward = jax.jit(jax.grad(lambda params: task.loss_fn(params, task.frozen, inputs, key)[0]))
    step = make_train_step(task.loss_fn, optimizer, ema_decay=config.optimizer.ema_decay)
    holder = {"state": state}  # the step donates its input state: the parts read the latest one

    def whole_step():
        holder["state"], metrics = step(holder["state"], inputs, key)
        jax.block_until_ready(metrics)

    return {"forward (loss)": lambda: jax.block_until_ready(forward(holder["state"].params)),
            "forward + backward": lambda: jax.block_until_ready(backward(holder["state"].params)),
            "whole step (+ AdamW, EMA)": whole_step}, config


def torch_step(batch: dict, config, tokenize):
    """The same parts in diffusers-torch: the same loss, AdamW, and an EMA by lerp."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from sdjax import schedules
    from sdjax.embedded import EMBEDDED_MODEL
    from sdjax.weights.diffusers_folder import read_json

    unet = UNet2DConditionModel.from_pretrained(EMBEDDED_MODEL / "unet", torch_dtype=torch.float32).train()
    text = CLIPTextModel.from_pretrained(EMBEDDED_MODEL / "text_encoder", torch_dtype=torch.float32).train()
    vae_config = read_json(EMBEDDED_MODEL / "vae" / "config.json")
    params = [*unet.parameters(), *text.parameters()]
    opt = config.optimizer
    optimizer = torch.optim.AdamW(params, lr=opt.learning_rate, betas=(opt.b1, opt.b2), eps=opt.eps,
                                  weight_decay=opt.weight_decay, foreach=True)
    ema = [p.detach().clone() for p in params]
    alpha_bars = torch.from_numpy(np.asarray(schedules.alphas_cumprod_from_config(
        read_json(EMBEDDED_MODEL / "scheduler" / "scheduler_config.json")), np.float32))
    moments = torch.from_numpy(batch["moments"]).permute(0, 3, 1, 2)
    ids = torch.from_numpy(np.asarray(tokenize(batch["caption"]))).long()
    size = moments.shape[-1]
    mask = torch.from_numpy(batch["loss_mask"])
    weight = mask.reshape(mask.shape[0], size, mask.shape[1] // size, size, mask.shape[2] // size).mean((2, 4))
    generator = torch.Generator().manual_seed(0)

    def loss():
        mean, logvar = moments.chunk(2, dim=1)
        x0 = (mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator)) \
            * vae_config["scaling_factor"]
        t = torch.randint(0, alpha_bars.shape[0], (x0.shape[0],), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        a = alpha_bars[t].reshape(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = a.sqrt() * noise - (1 - a).sqrt() * x0
        prediction = unet(noisy, t, text(ids).last_hidden_state).sample
        error = ((prediction - target) ** 2 * weight[:, None]).sum((1, 2, 3))
        return (error / (weight.sum((1, 2)) * x0.shape[1])).mean()

    def forward():
        with torch.no_grad():
            loss()

    def backward():
        optimizer.zero_grad(set_to_none=True)
        loss().backward()

    def whole_step():
        backward()
        torch.nn.utils.clip_grad_norm_(params, float("inf"))  # sdjax's step computes the norm for its finite check
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - opt.ema_decay)

    return {"forward (loss)": forward, "forward + backward": backward, "whole step (+ AdamW, EMA)": whole_step}


def measure(batch_size: int, reps: int) -> tuple[list[dict], dict]:
    from sdjax.embedded import EMBEDDED_MODEL
    from sdjax.pipeline import load_pipeline

    base = load_pipeline(EMBEDDED_MODEL)
    latent = base.raw_configs["unet"]["sample_size"]
    batch = host_batch(batch_size, latent, latent * base.configs["vae"].downscale_factor)
    started = time.perf_counter()
    ours, config = sdjax_step(batch)
    for call in ours.values():
        call()  # compiles
    compile_seconds = time.perf_counter() - started
    theirs = torch_step(batch, config, base.tokenize)
    rows = []
    for part in ours:
        times = {"sdjax": [], "torch": []}
        for call in (ours[part], theirs[part]):
            call()
        for _ in range(reps):
            for side, call in (("sdjax", ours[part]), ("torch", theirs[part])):
                started = time.perf_counter()
                call()
                times[side].append(time.perf_counter() - started)
        medians = {side: float(np.median(values)) for side, values in times.items()}
        rows.append({"part": part, **medians})
        print(f"{part:28s} sdjax {medians['sdjax'] * 1e3:8.1f} ms   torch {medians['torch'] * 1e3:8.1f} ms", flush=True)
    return rows, {"batch": batch_size, "compile": compile_seconds}


def markdown(rows: list[dict], info: dict, reps: int) -> str:
    lines = [f"{machine()}. The shapes recipe's U-Net "
             f"stage, batch {info['batch']}, float32; median of {reps}, interleaved. sdjax compiled the three "
             f"programs in {info['compile']:.0f} s (with whatever the persistent cache held).\n",
             "| part | sdjax ms | torch ms | sdjax / torch time |", "|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['part']} | {row['sdjax'] * 1e3:.1f} | {row['torch'] * 1e3:.1f} | "
                     f"{row['sdjax'] / row['torch']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    args = parser.parse_args(argv)
    rows, info = measure(args.batch, args.reps)
    publish(markdown(rows, info, args.reps), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
