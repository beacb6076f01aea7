"""Trained weights as a `Pipeline`: exported to a diffusers folder (a LoRA run: to LoRA files), or sampled into a
grid during training."""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sdjax import images
from sdjax.pipeline import Pipeline
from sdjax.train.task import Task


def trained_pipeline(base: Pipeline, task: Task, params: dict[str, Any]) -> Pipeline:
    """The base pipeline with the trained components (architectures and weights) and the training schedule.
    A component trained in part (the VAE's decoder) keeps its other params from the start of the run."""
    start = Pipeline(task.configs, task.initial_params, base.tokenizer, task.scheduler_config, dtype=base.dtype,
                     raw_configs=task.raw_configs, tokenizer_2=base.tokenizers.get("text_encoder_2"),
                     sdxl_settings=base.sdxl_settings)
    return swap_weights(start, task, params)


def swap_weights(pipeline: Pipeline, task: Task, trained: dict[str, Any]) -> Pipeline:
    """`pipeline` with the trained weights in place of its own, compiled programs kept: whole or partial components,
    or a LoRA run's adapters merged into the base weights they adapt."""
    params = trained if task.adapter is None else task.adapter.merged(task.initial_params, trained)
    pipeline.params = {name: {**weights, **params.get(name, {})} for name, weights in pipeline.params.items()}
    return pipeline


def export_run(base: Pipeline, task: Task, trained: dict[str, Any], folder: str | Path) -> Path:
    """The end of a run: the trained model as a diffusers folder, or a LoRA run's adapter files."""
    if task.adapter is not None:
        return export_folder(lambda partial: task.adapter.write(trained, partial), folder)
    return export_folder(trained_pipeline(base, task, trained).save_pretrained, folder)


def export_folder(write: Callable[[Path], Any], folder: str | Path) -> Path:
    """Fill `folder` by `write(path)`. It is assembled next to `folder` and swapped in at the end, so an interrupted
    export never leaves a half-written model where a complete one was."""
    folder = Path(folder)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    write(partial)
    previous = folder.with_name(folder.name + ".previous")
    if folder.exists():
        os.replace(folder, previous)
    os.replace(partial, folder)
    shutil.rmtree(previous, ignore_errors=True)
    return folder


def save_sample_grid(pipeline: Pipeline, path: Path, prompts, *, size: int, steps: int, guidance_scale: float,
                     seed: int) -> Path:
    """One `size`-square image per prompt (seeds seed, seed + 1, ...) tiled into a PNG."""
    result = pipeline.generate(list(prompts), steps=steps, guidance_scale=guidance_scale, seed=seed, height=size,
                               width=size)
    path.parent.mkdir(parents=True, exist_ok=True)
    return images.save_png(path, images.grid(result.images))
