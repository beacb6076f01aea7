"""A diffusers ControlNet folder (config.json + diffusion_pytorch_model[.variant].safetensors, as
`ControlNetModel.save_pretrained` writes it) -> ControlNetConfig + Flax params."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from sdjax.errors import MissingComponentError
from sdjax.models.controlnet import ControlNetConfig
from sdjax.weights import diffusers_folder


def read_controlnet_config(folder: str | os.PathLike) -> tuple[ControlNetConfig, dict[str, Any]]:
    """The ControlNetConfig of `folder` and the raw config.json it came from."""
    return diffusers_folder.read_config(Path(folder), "controlnet", hint="; pass the ControlNet's own folder")


def load_controlnet(folder: str | os.PathLike, *, dtype=jnp.float32,
                    variant: str | None = None) -> tuple[ControlNetConfig, dict]:
    """(config, params in `dtype`) of the ControlNet saved in `folder`; variant picks e.g. the ".fp16" weights.

    Use as `ControlNetModel(config, dtype=...).apply({"params": params}, ...)`.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise MissingComponentError(f"{folder}: no such ControlNet folder (expected config.json and "
                                    f"diffusion_pytorch_model.safetensors inside)")
    config, _ = read_controlnet_config(folder)
    return config, diffusers_folder.load_params(folder, "controlnet", config, dtype=dtype, variant=variant)
