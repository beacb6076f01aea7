"""A diffusers ControlNet folder (config.json + diffusion_pytorch_model[.variant].safetensors, as
`ControlNetModel.save_pretrained` writes it) -> ControlNetConfig + Flax params."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from sdjax.errors import ConfigError, MissingComponentError
from sdjax.models import controlnet
from sdjax.weights import diffusers_folder, keymap, tensors

CLASS_NAME = "ControlNetModel"


def read_controlnet_config(folder: str | os.PathLike) -> tuple[controlnet.ControlNetConfig, dict[str, Any]]:
    """The ControlNetConfig of `folder` and the raw config.json it came from."""
    path = Path(folder) / "config.json"
    raw = diffusers_folder.read_json(path)
    declared = raw.get("_class_name")
    if declared is not None and declared != CLASS_NAME:
        raise ConfigError(f"{path}: this is a {declared}, not a {CLASS_NAME}; pass the ControlNet's own folder")
    return controlnet.ControlNetConfig.from_dict(raw, source=str(path)), raw


def load_controlnet(folder: str | os.PathLike, *, dtype=jnp.float32,
                    variant: str | None = None) -> tuple[controlnet.ControlNetConfig, dict]:
    """(config, params in `dtype`) of the ControlNet saved in `folder`; variant picks e.g. the ".fp16" weights.

    Use as `ControlNetModel(config, dtype=...).apply({"params": params}, ...)`.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise MissingComponentError(f"{folder}: no such ControlNet folder (expected config.json and "
                                    f"diffusion_pytorch_model.safetensors inside)")
    config, _ = read_controlnet_config(folder)
    files = tensors.find_weight_files(folder, variant)
    params = keymap.params_from_state_dict(tensors.read_weights(files), controlnet.param_shapes(config),
                                           source=", ".join(str(f) for f in files), dtype=np.dtype(dtype))
    return config, params
