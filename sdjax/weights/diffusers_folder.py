"""Diffusers-layout folders: read one into configs + Flax params, and write sdjax params back out.

A folder holds model_index.json and one sub-folder per component (unet/, vae/, text_encoder/, tokenizer/,
scheduler/; SDXL adds text_encoder_2/ and tokenizer_2/, and its refiner lists only those two). Components other
than these (safety checker, feature extractor, image encoder) are not needed and are skipped.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.errors import ConfigError, MissingComponentError
from sdjax.models.components import COMPONENTS, SDXL, SDXL_REFINER, STABLE_DIFFUSION, TEXT_ENCODERS
from sdjax.sdxl import SDXLSettings
from sdjax.weights import keymap, tensors


@dataclasses.dataclass
class Loaded:
    """What `load_pipeline` reads from a model, a folder or a single file: configs and raw config dicts, params,
    the folder of each text encoder's tokenizer, the scheduler config, and SDXL settings (None for SD 1.x / 2.x)."""
    configs: dict[str, Any]
    raw_configs: dict[str, dict]
    params: dict[str, Any]
    tokenizer_folders: dict[str, Path]
    scheduler_config: dict[str, Any]
    settings: SDXLSettings | None


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, with errors that name the file."""
    if not path.is_file():
        raise MissingComponentError(f"{path} does not exist")
    try:
        value = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def read_model_index(folder: Path) -> dict[str, Any]:
    """model_index.json, checked to list every component of its family (`model_family`) that sdjax needs."""
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise MissingComponentError(
            f"{folder} is not a diffusers pipeline folder: {index_path.name} is missing. Pass the folder that "
            f"holds model_index.json, unet/, vae/, text_encoder/, tokenizer/ and scheduler/.")
    index = read_json(index_path)
    family = model_family(index)
    for name in (*family, *(TEXT_ENCODERS[n] for n in family if n in TEXT_ENCODERS), "scheduler"):
        if not is_listed(index, name):
            raise MissingComponentError(f"{index_path}: component {name!r} is not listed; sdjax needs it")
        if not (folder / name).is_dir():
            raise MissingComponentError(f"{folder}: component folder {name}/ is missing (listed in {index_path.name})")
    return index


def is_listed(index: dict[str, Any], name: str) -> bool:
    """Whether model_index.json names a class for component `name` (diffusers writes [null, null] for none)."""
    entry = index.get(name)
    return isinstance(entry, list) and bool(entry) and entry[0] is not None


def model_family(index: dict[str, Any]) -> tuple[str, ...]:
    """The networks a pipeline folder holds, from its model_index.json: a text_encoder_2 makes it SDXL, the base
    model with both text encoders or the refiner with the second alone; otherwise SD 1.x / 2.x."""
    if not is_listed(index, "text_encoder_2"):
        return STABLE_DIFFUSION
    return SDXL if is_listed(index, "text_encoder") else SDXL_REFINER


def read_config(folder: Path, name: str, *, hint: str = ""):
    """The frozen config dataclass of component `name` stored in `folder` (its config.json) and the raw dict it
    came from; `hint` ends the error for a config of another class."""
    component = COMPONENTS[name]
    path = folder / "config.json"
    raw = read_json(path)
    declared = raw.get("_class_name") or (raw.get("architectures") or [None])[0]
    if declared is not None and declared != component.class_name:
        raise ConfigError(f"{path}: component {name!r} is a {declared}; sdjax reads {component.class_name} here"
                          f"{hint}")
    return component.config_class.from_dict(raw, source=str(path)), raw


def load_params(folder: Path, name: str, config, *, dtype=jnp.float32, variant: str | None = None,
                check_finite: bool = False):
    """Flax params of component `name` with `config`, from the weight files in `folder`; with `check_finite`,
    tensors holding NaN or inf are refused by name."""
    component = COMPONENTS[name]
    files = tensors.find_weight_files(folder, variant)
    state = with_base_prefix(tensors.read_weights(files), component.base_model_prefix)
    source = ", ".join(str(f) for f in files)
    if check_finite:
        tensors.check_finite(state, source)
    return keymap.params_from_state_dict(state, component.param_shapes(config), source=source, dtype=np.dtype(dtype),
                                         consume=True)


def with_base_prefix(state: dict, prefix: str | None) -> dict:
    """`state` with every key under `prefix.`, when the file left the prefix out."""
    if prefix is None or any(key.startswith(prefix + ".") for key in state):
        return state
    return {f"{prefix}.{key}": value for key, value in state.items()}


def write_component(folder: Path, name: str, config, raw_config: dict | None, params: Any, *,
                    dtype=np.float32) -> None:
    """Write one component (config.json + weights) in the layout diffusers/transformers load."""
    component = COMPONENTS[name]
    target = folder / name
    target.mkdir(parents=True, exist_ok=True)
    meta = ({"_class_name": component.class_name} if component.library == "diffusers"
            else {"architectures": [component.class_name], "model_type": "clip_text_model"})
    config_json = {**(raw_config or {}), **meta, **config.to_dict()}
    write_json(target / "config.json", config_json)
    state = {k: v.astype(dtype) for k, v in keymap.state_dict_from_params(jax.device_get(params)).items()}
    tensors.write_safetensors(target / f"{component.weights_name}.safetensors", state, metadata={"format": "pt"})


SD_INDEX_SETTINGS = {"safety_checker": [None, None], "feature_extractor": [None, None],
                     "requires_safety_checker": False}
"""The entries of an SD 1.x / 2.x model_index.json besides its components: no safety checker."""


def write_model_index(folder: Path, scheduler_class: str, pipeline_class: str = "StableDiffusionPipeline", *,
                      family: tuple[str, ...] = STABLE_DIFFUSION, settings: dict[str, Any] | None = None):
    """model_index.json listing the networks of `family`, their tokenizers and the scheduler, then `settings` (the
    pipeline class's own keys and null components; SD_INDEX_SETTINGS by default)."""
    index = {"_class_name": pipeline_class,
             **{name: [COMPONENTS[name].library, COMPONENTS[name].class_name] for name in family},
             **{tokenizer: ["transformers", "CLIPTokenizer"] for name, tokenizer in TEXT_ENCODERS.items()
                if name in family},
             "scheduler": ["diffusers", scheduler_class],
             **(SD_INDEX_SETTINGS if settings is None else settings)}
    write_json(folder / "model_index.json", index)


def write_json(path: Path, value: dict) -> None:
    temporary = path.with_name(path.name + ".partial")
    temporary.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
    temporary.replace(path)

