"""Generation images/s and training steps/s against the device count, data-parallel (mesh data=N) and FSDP
(fsdp=N: every large param split over the N devices), on the embedded shapes model: weak scaling, each device
given the same share of the batch at every count, so perfect scaling is a rate growing with N.

    python -m experiments.scaling.throughput [--devices 1,2,4,8] [--out experiments/scaling/throughput.png]
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m ...   # on CPU: 8 virtual devices

Meant for real accelerators. Virtual CPU devices split the same cores between them, so on CPU the rates show
sdjax's sharding overhead, not a speed-up. Generation is the Pipeline's own program (`load_pipeline(mesh=)`);
training is the shapes recipe's step (U-Net and text encoder, AdamW, EMA) on its state placed by the sharding
rules, as `sdjax train --mesh` places it, fed random cached-latent batches (experiments.perf.train_step).
"""
from __future__ import annotations

import argparse
import os
import textwrap
import time
from pathlib import Path

from experiments.perf.kernels import cpu_model, publish

PROMPT = "a small red circle at the top left"


def meshes(counts: list[int]) -> list[tuple[int, str]]:
    """(device count, mesh) pairs: data=N for every count, and fsdp=N where there is something to split."""
    return [(n, mesh) for n in counts for mesh in ([f"data={n}"] + ([f"fsdp={n}"] if n > 1 else []))]


def generation_rate(pipeline, images: int, steps: int, reps: int) -> float:
    """Images per second of one generate call of `images` seeds, the best of `reps` (compilation excluded)."""
    call = lambda: pipeline.generate(PROMPT, seeds=list(range(images)), steps=steps, sampler="dpmpp_2m")
    call()  # compiles
    return images / min(call().seconds for _ in range(reps))


def training_rate(mesh, batch_size: int, reps: int) -> float:
    """Train steps per second of the shapes recipe's step on `mesh`, the best of `reps` timed steps."""
    import jax

    from experiments.perf.train_step import RECIPE_CONFIG, host_batch
    from sdjax import distributed, parallel
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
    state = create_state(task.trainable, task.frozen, optimizer)
    state = distributed.to_global(state, parallel.param_shardings(state, mesh))
    latent = base.raw_configs["unet"]["sample_size"]
    batch = task.prepare_batch(host_batch(batch_size, latent, latent * base.configs["vae"].downscale_factor))
    batch = distributed.global_batch(batch, parallel.batch_sharding(mesh))
    step = make_train_step(task.loss_fn, optimizer, ema_decay=config.optimizer.ema_decay)
    key = jax.random.key(1)
    state = settled(step, state, batch, key)
    best = float("inf")
    for _ in range(reps):
        started = time.perf_counter()
        state, metrics = step(state, batch, key)
        jax.block_until_ready(metrics)
        best = min(best, time.perf_counter() - started)
    return 1.0 / best


def settled(step, state, batch, key, tries: int = 5):
    """The state after as many steps as it takes for the step to return the shardings it was given. The step pins
    no output shardings, and under FSDP the compiler returns others for the first steps (measured: 3 compiles of
    the step before it settles on 2 virtual devices); each new input sharding compiles the step again."""
    import jax

    for _ in range(tries):
        given = [leaf.sharding for leaf in jax.tree.leaves(state)]
        state, metrics = step(state, batch, key)
        jax.block_until_ready(metrics)
        if [leaf.sharding for leaf in jax.tree.leaves(state)] == given:
            return state
    raise RuntimeError(f"the train step's output shardings still change after {tries} steps")


def measure(counts: list[int], images_per_device: int, batch_per_device: int, steps: int, reps: int) -> list[dict]:
    import jax

    from sdjax import parallel
    from sdjax.pipeline import load_pipeline

    rows = []
    for n, text in meshes(counts):
        devices = jax.devices()[:n]
        started = time.perf_counter()
        row = {"devices": n, "mesh": text, "batch": batch_per_device * n}
        row["images/s"] = generation_rate(load_pipeline(devices=devices, mesh=text), images_per_device * n, steps,
                                          reps)
        row["train steps/s"] = training_rate(parallel.parse_mesh(text, devices), batch_per_device * n, reps)
        rows.append(row)
        print(f"{text}: {row['images/s']:.2f} images/s, {row['train steps/s']:.2f} steps/s "
              f"({time.perf_counter() - started:.0f} s with compiling)", flush=True)
    return rows


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| devices | mesh | images/s | train steps/s | train images/s |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['devices']} | {row['mesh']} | {row['images/s']:.2f} | {row['train steps/s']:.2f} | "
                     f"{row['train steps/s'] * row['batch']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("images/s", "train steps/s")):
        for kind in ("data", "fsdp"):
            points = [(r["devices"], r[key]) for r in rows if r["mesh"].startswith(kind) or r["devices"] == 1]
            ax.plot(*zip(*points), marker="o", label=f"{kind}=N")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("devices")
        ax.set_ylabel(key)
        ax.legend()
    figure.suptitle(textwrap.fill(title, 110), fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default="1,2,4,8", help="device counts, comma separated")
    parser.add_argument("--images-per-device", type=int, default=2, help="generation batch per device")
    parser.add_argument("--batch-per-device", type=int, default=2, help="training batch per device")
    parser.add_argument("--steps", type=int, default=4, help="sampler steps per image")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions (the best counts)")
    parser.add_argument("--out", default=str(Path(__file__).with_name("throughput.png")), help="the plot")
    parser.add_argument("--table", default=None, help="also write the markdown table here")
    args = parser.parse_args(argv)
    import jax

    counts = [int(n) for n in args.devices.split(",")]
    if max(counts) > jax.device_count():
        parser.error(f"--devices {args.devices}: only {jax.device_count()} devices; on CPU set "
                     f"XLA_FLAGS=--xla_force_host_platform_device_count={max(counts)}")
    rows = measure(counts, args.images_per_device, args.batch_per_device, args.steps, args.reps)
    device = jax.devices()[0]
    machine = f"{cpu_model()}, {os.cpu_count()} cores" if device.platform == "cpu" else device.device_kind
    header = (f"{device.platform} devices ({machine}), shapes model; per device: {args.images_per_device} "
              f"image(s), {args.batch_per_device} training example(s); {args.steps} dpmpp_2m steps")
    publish(markdown(rows, header), args.table)
    plot(rows, Path(args.out), header)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
