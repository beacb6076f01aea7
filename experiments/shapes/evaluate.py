"""Prompt adherence of a shapes model per sampler, step count and guidance scale, and its VAE's reconstruction.

    python -m experiments.shapes.evaluate                     # the embedded model, the full table
    python -m experiments.shapes.evaluate --model runs/shapes/package --prompts 240 --out results/

Each held-out prompt (dataset.held_out_prompts: phrasings no training caption uses) is generated once per
setting with a fixed seed, and `reader.read_scene` reads the image back: an image adheres when all five
attributes (shape, colour, background, size, position) are right. Before trusting the reader on generated
images, the same report checks it on freshly drawn dataset images (`reader_accuracy`, which must be ~100%).
Writes results.md (tables), results.json and adherence.png into --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from experiments.shapes.dataset import held_out_prompts
from experiments.shapes.reader import read_scene
from experiments.shapes.scenes import render

ATTRIBUTES = ("shape", "colour", "background", "size", "position")
SAMPLERS = ("dpmpp_2m", "euler", "euler_ancestral", "heun", "ddim", "unipc", "lms")
STEPS = (5, 10, 20, 50)
GUIDANCE = (1.0, 3.0, 5.0, 7.5)
GUIDANCE_SAMPLERS = ("dpmpp_2m", "euler", "euler_ancestral")
DEFAULT_GUIDANCE = 3.0  # the scale this model does best at (results/results.md)


@dataclasses.dataclass(frozen=True)
class Setting:
    sampler: str
    steps: int
    guidance_scale: float
    schedule: str = "karras"

    def label(self) -> str:
        return f"{self.sampler} ({self.schedule}) {self.steps} steps, guidance {self.guidance_scale:g}"


def settings_grid(samplers=SAMPLERS, steps=STEPS, guidance=GUIDANCE, default_guidance=DEFAULT_GUIDANCE,
                  guidance_samplers=GUIDANCE_SAMPLERS):
    """Every sampler at every step count at the default guidance, and the guidance samplers at 20 steps at every
    guidance scale."""
    grid = [Setting(s, n, default_guidance) for s in samplers for n in steps]
    grid += [Setting(s, 20, g) for s in guidance_samplers for g in guidance if g != default_guidance]
    return grid


def adherence(images: np.ndarray, scenes) -> dict[str, float]:
    """Fraction of images with every attribute right ("all") and with each attribute right."""
    matches = [read_scene(image).matches(scene) for image, scene in zip(images, scenes)]
    result = {"all": float(np.mean([all(m.values()) for m in matches]))}
    result.update({name: float(np.mean([m[name] for m in matches])) for name in ATTRIBUTES})
    return result


def adherence_evaluator(prompts: int = 128, setting: Setting = Setting("dpmpp_2m", 20, DEFAULT_GUIDANCE),
                        seed: int = 0):
    """`evaluate(pipeline) -> {"adherence": ..., "shape": ..., ...}` on a fixed held-out prompt set and fixed
    seeds: the measure of a training run's progress (`sdjax.train.train(..., evaluate=)`)."""
    pairs = held_out_prompts(prompts)

    def evaluate(pipeline) -> dict[str, float]:
        scores = adherence(generate(pipeline, [p for p, _ in pairs], setting, seed=seed, batch=prompts),
                           [scene for _, scene in pairs])
        return {"adherence": scores.pop("all"), **scores}

    return evaluate


def generate(pipeline, prompts, setting: Setting, *, seed: int, batch: int = 128) -> np.ndarray:
    """Images of `prompts` (image i from seed + i) under one setting, in fixed-size batches (one compile)."""
    images = []
    for start in range(0, len(prompts), batch):
        chunk = list(prompts[start:start + batch])
        padded = chunk + [chunk[-1]] * (batch - len(chunk))
        result = pipeline.generate(padded, steps=setting.steps, guidance_scale=setting.guidance_scale,
                                   sampler=setting.sampler, schedule=setting.schedule,
                                   seeds=[seed + start + i for i in range(batch)])
        images.append(result.images[:len(chunk)])
    return np.concatenate(images)


def reader_accuracy(count: int, seed: int = 99) -> float:
    """How often the reader reads freshly drawn scenes right (the check of the evaluator itself)."""
    rng = np.random.default_rng(seed)
    pairs = held_out_prompts(count, seed)
    return adherence(np.stack([render(scene, rng) for _, scene in pairs]), [s for _, s in pairs])["all"]


def reconstruction_psnr(pipeline, count: int, seed: int = 77) -> float:
    """Mean PSNR (dB, over images) of VAE encode -> decode on freshly drawn (never trained on) images."""
    rng = np.random.default_rng(seed)
    images = np.stack([render(scene, rng) for _, scene in held_out_prompts(count, seed)])
    decoded = np.concatenate([pipeline.decode_latents(pipeline.encode_image(images[i:i + 64]))
                              for i in range(0, count, 64)])
    mse = np.mean((decoded.astype(np.float64) - images) ** 2, axis=(1, 2, 3))
    return float(np.mean(10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))))


def standard_error(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 1e-12) / n)


def markdown(report: dict) -> str:
    n = report["prompts"]
    lines = ["# Shapes model: prompt adherence\n",
             f"Model `{report['model']}`; {n} held-out prompts, one image each (seed {report['seed']} + i); "
             f"reader accuracy on drawn images {report['reader_accuracy']:.1%}; VAE reconstruction PSNR "
             f"{report['vae_psnr']:.2f} dB on {report['psnr_images']} drawn images. Adherence = all five "
             f"attributes right (± one standard error).\n",
             "## Sampler x steps (guidance %g)\n" % report["default_guidance"]]
    rows = {(r["sampler"], r["steps"], r["guidance_scale"]): r for r in report["results"]}
    steps = sorted({r["steps"] for r in report["results"]})
    samplers = list(dict.fromkeys(r["sampler"] for r in report["results"]))
    cell = lambda r: f"{r['all']:.1%} ± {standard_error(r['all'], n):.1%}" if r else "–"
    lines.append("| sampler | " + " | ".join(f"{s} steps" for s in steps) + " |")
    lines.append("|---" * (len(steps) + 1) + "|")
    for sampler in samplers:
        lines.append(f"| {sampler} | " + " | ".join(cell(rows.get((sampler, s, report["default_guidance"])))
                                                  for s in steps) + " |")
    guidance = sorted({r["guidance_scale"] for r in report["results"]})
    lines += ["\n## Guidance scale (20 steps)\n", "| sampler | " + " | ".join(f"{g:g}" for g in guidance) + " |",
              "|---" * (len(guidance) + 1) + "|"]
    for sampler in samplers:
        lines.append(f"| {sampler} | " + " | ".join(cell(rows.get((sampler, 20, g))) for g in guidance) + " |")
    lines += ["\n## Per attribute\n", "| setting | " + " | ".join(ATTRIBUTES) + " | seconds |",
              "|---" * (len(ATTRIBUTES) + 2) + "|"]
    for r in report["results"]:
        lines.append(f"| {Setting(r['sampler'], r['steps'], r['guidance_scale']).label()} | "
                     + " | ".join(f"{r[a]:.1%}" for a in ATTRIBUTES) + f" | {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_steps, by_guidance) = plt.subplots(1, 2, figsize=(11, 4.2))
    results, n = report["results"], report["prompts"]
    for sampler in dict.fromkeys(r["sampler"] for r in results):
        for axis, key, fixed in ((by_steps, "steps", ("guidance_scale", report["default_guidance"])),
                                 (by_guidance, "guidance_scale", ("steps", 20))):
            points = sorted((r[key], r["all"]) for r in results if r["sampler"] == sampler and r[fixed[0]] == fixed[1])
            if points:
                x, y = map(np.asarray, zip(*points))
                error = [standard_error(p, n) for p in y]
                axis.errorbar(x, 100 * y, yerr=100 * np.asarray(error), marker="o", capsize=2, label=sampler)
    by_steps.set(xscale="log", xlabel="steps", ylabel="adherence (%)",
                 title=f"guidance {report['default_guidance']:g}")
    by_steps.set_xticks(STEPS, [str(s) for s in STEPS])
    by_guidance.set(xlabel="guidance scale", ylabel="adherence (%)", title="20 steps")
    by_steps.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="diffusers folder (default: the embedded shapes model)")
    parser.add_argument("--prompts", type=int, default=200, help="held-out prompts per setting")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    parser.add_argument("--samplers", default=",".join(SAMPLERS))
    parser.add_argument("--steps", default=",".join(map(str, STEPS)))
    parser.add_argument("--guidance", default=",".join(map(str, GUIDANCE)))
    parser.add_argument("--guidance-samplers", default=",".join(GUIDANCE_SAMPLERS),
                        help="the samplers also run at every --guidance scale (20 steps)")
    parser.add_argument("--default-guidance", type=float, default=DEFAULT_GUIDANCE)
    parser.add_argument("--out", default="experiments/shapes/results")
    args = parser.parse_args(argv)

    import sdjax

    pipeline = sdjax.load_pipeline(args.model)
    pairs = held_out_prompts(args.prompts)
    prompts, scenes = [p for p, _ in pairs], [s for _, s in pairs]
    report = {"model": args.model or "embedded", "prompts": len(prompts), "seed": args.seed,
              "default_guidance": args.default_guidance, "reader_accuracy": reader_accuracy(1000),
              "psnr_images": 512, "vae_psnr": reconstruction_psnr(pipeline, 512), "results": []}
    grid = settings_grid(args.samplers.split(","), [int(s) for s in args.steps.split(",")],
                         [float(g) for g in args.guidance.split(",")], args.default_guidance,
                         args.guidance_samplers.split(",") if args.guidance_samplers else [])
    for setting in grid:
        started = time.perf_counter()
        scores = adherence(generate(pipeline, prompts, setting, seed=args.seed), scenes)
        report["results"].append({**dataclasses.asdict(setting), **scores,
                                  "seconds": time.perf_counter() - started})
        print(f"{setting.label()}: {scores['all']:.1%}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "results.md").write_text(markdown(report))
    plot(report, out / "adherence.png")
    print(f"wrote {out / 'results.md'}, results.json, adherence.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
