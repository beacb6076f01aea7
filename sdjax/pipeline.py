"""`Pipeline`: a loaded Stable Diffusion model (modules, params, tokenizer, scheduler config) and its
contract methods, each jit-compiled once per input shape. `load_pipeline` builds one from a folder or hub id.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.errors import InvalidArgumentError
from sdjax.models.clip import CLIPTextModel
from sdjax.models.unet import UNet2DConditionModel
from sdjax.models.vae import AutoencoderKL, scale_latents, unscale_latents
from sdjax.weights import diffusers_folder, hub

_MODULES = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}
_PARAM_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfigs:
    unet: Any
    vae: Any
    text_encoder: Any


class Pipeline:
    """Stable Diffusion components with pure, jit-compiled entry points.

    `params` is a dict {"unet", "vae", "text_encoder"} of Flax param trees; the modules hold no state.
    """

    def __init__(self, configs: ModelConfigs, params: dict, tokenizer, scheduler_config: dict, *,
                 dtype=jnp.float32, attention: str = "einsum", raw_configs: dict | None = None):
        self.configs = configs
        self.params = params
        self.tokenizer = tokenizer
        self.scheduler_config = scheduler_config
        self.dtype = dtype
        self.raw_configs = raw_configs or {}
        self.modules = {name: build_module(name, getattr(configs, name), dtype, attention) for name in _MODULES}
        self._text_fn = jax.jit(self._encode_tokens, static_argnames="clip_skip")
        self._encode_fn = jax.jit(self._encode_pixels)
        self._decode_fn = jax.jit(self._decode_scaled)
        self._unet_fn = jax.jit(self._unet_apply)

    # --- contract methods --------------------------------------------------------------------------------

    def encode_prompt(self, prompts: Sequence[str], *, clip_skip: int | None = None) -> jax.Array:
        """Text embeddings (N, 77, D) for a list of prompts; `clip_skip=1` uses the penultimate layer."""
        if isinstance(prompts, str):
            raise InvalidArgumentError("prompts must be a list of strings, got a single string; wrap it in [...]")
        ids = self.tokenize(prompts)
        return self._text_fn(self.params["text_encoder"], ids, clip_skip=clip_skip)

    def tokenize(self, prompts: Sequence[str]) -> jax.Array:
        """Token ids (N, max_length), padded and truncated as diffusers' Stable Diffusion pipelines do."""
        tokens = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="np")
        return jnp.asarray(tokens["input_ids"], jnp.int32)

    def encode_image(self, images, key: jax.Array | None = None) -> jax.Array:
        """Scaled latents (N, h, w, C) of images (uint8 N,H,W,3 or float in [-1, 1]): the posterior mean, or a
        sample of the posterior when `key` is given."""
        pixels = to_unit_range(images)
        factor = self.configs.vae.downscale_factor
        if pixels.shape[1] % factor or pixels.shape[2] % factor:
            raise InvalidArgumentError(f"image size {pixels.shape[2]}x{pixels.shape[1]} must be a multiple of "
                                       f"the VAE factor {factor}")
        return self._encode_fn(self.params["vae"], pixels, key)

    def decode_latents(self, latents) -> np.ndarray:
        """uint8 images (N, H, W, 3) from scaled latents (N, h, w, C)."""
        pixels = self._decode_fn(self.params["vae"], jnp.asarray(latents))
        return to_uint8(pixels)

    def unet_output(self, latents, timesteps, embeddings) -> jax.Array:
        """The U-Net's raw prediction (eps, v or x0 as the model was trained) for NHWC latents."""
        return self._unet_fn(self.params["unet"], jnp.asarray(latents), jnp.asarray(timesteps),
                             jnp.asarray(embeddings))

    def save_pretrained(self, folder: str | os.PathLike, *, dtype=np.float32) -> None:
        """Write a diffusers-layout folder that diffusers (torch) and `load_pipeline` both load."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in _MODULES:
            diffusers_folder.write_component(folder, name, getattr(self.configs, name), self.raw_configs.get(name),
                                             self.params[name], dtype=dtype)
        self.tokenizer.save_pretrained(folder / "tokenizer")
        scheduler_dir = folder / "scheduler"
        scheduler_dir.mkdir(exist_ok=True)
        diffusers_folder._write_json(scheduler_dir / "scheduler_config.json", self.scheduler_config)
        diffusers_folder.write_model_index(folder, self.scheduler_config.get("_class_name", "PNDMScheduler"))

    # --- pure functions behind the jit ---------------------------------------------------------------------

    def _encode_tokens(self, params, ids, clip_skip):
        return self.modules["text_encoder"].apply({"params": params}, ids, clip_skip=clip_skip).prompt_embeds

    def _encode_pixels(self, params, pixels, key):
        vae = self.modules["vae"]
        posterior = vae.apply({"params": params}, pixels.astype(self.dtype), method=vae.encode)
        latents = posterior.mean if key is None else posterior.sample(key)
        return scale_latents(latents, self.configs.vae)

    def _decode_scaled(self, params, latents):
        vae = self.modules["vae"]
        return vae.apply({"params": params}, unscale_latents(latents, self.configs.vae), method=vae.decode)

    def _unet_apply(self, params, latents, timesteps, embeddings):
        return self.modules["unet"].apply({"params": params}, latents.astype(self.dtype), timesteps,
                                          embeddings.astype(self.dtype))


def build_module(name: str, config, dtype, attention: str):
    """The Flax module of component `name` for `config`, computing in `dtype`."""
    return _MODULES[name](config=config, dtype=dtype, param_dtype=dtype, attention_implementation=attention)


def expected_params(name: str, config) -> Any:
    """Shapes of the params of component `name` (no memory allocated)."""
    module = build_module(name, config, jnp.float32, "einsum")
    return jax.eval_shape(module.init, jax.random.key(0), *_example_inputs(name, config))["params"]


def _example_inputs(name: str, config) -> tuple:
    """The smallest inputs that trace component `name` (only their shapes matter, for init)."""
    if name == "text_encoder":
        return (jax.ShapeDtypeStruct((1, config.max_position_embeddings), jnp.int32),)
    if name == "vae":
        side = config.downscale_factor
        return (jax.ShapeDtypeStruct((1, side, side, config.in_channels), jnp.float32),)
    side = 2 ** (len(config.block_out_channels) - 1)
    return (jax.ShapeDtypeStruct((1, side, side, config.in_channels), jnp.float32),
            jax.ShapeDtypeStruct((1,), jnp.int32),
            jax.ShapeDtypeStruct((1, 1, config.cross_attention_dim), jnp.float32))


def to_unit_range(images) -> jax.Array:
    """Images as float32 in [-1, 1]: uint8 inputs are rescaled, float inputs are taken as already in range."""
    array = np.asarray(images)
    if array.ndim != 4 or array.shape[-1] != 3:
        raise InvalidArgumentError(f"images must be (N, H, W, 3), got shape {array.shape}")
    if array.dtype == np.uint8:
        return jnp.asarray(array, jnp.float32) / 127.5 - 1.0
    return jnp.asarray(array, jnp.float32)


def to_uint8(pixels) -> np.ndarray:
    """uint8 images from decoder output in [-1, 1], rounded as diffusers' image processor does."""
    unit = np.clip((np.asarray(pixels, np.float32) + 1.0) / 2.0, 0.0, 1.0)
    return (unit * 255.0).round().astype(np.uint8)


def load_pipeline(path_or_hub_id: str | os.PathLike | None = None, *, dtype=jnp.float32, devices=None,
                  variant: str | None = None, attention: str = "einsum") -> Pipeline:
    """Load a Stable Diffusion pipeline from a diffusers folder or a hub id.

    dtype: param and compute dtype (float32, bfloat16 or float16). variant: weight file variant ("fp16").
    devices: params are replicated over these devices (default: the first local device).
    """
    if path_or_hub_id is None:
        raise InvalidArgumentError("load_pipeline needs a diffusers folder or hub id: no model ships inside "
                                   "sdjax yet")
    dtype_name = np.dtype(dtype).name
    if dtype_name not in _PARAM_DTYPES:
        raise InvalidArgumentError(f"dtype={dtype_name!r} is not supported; use one of {', '.join(_PARAM_DTYPES)}")
    folder = hub.resolve(path_or_hub_id, variant)
    diffusers_folder.read_model_index(folder)
    from transformers import CLIPTokenizer

    loaded, raw, params = {}, {}, {}
    for name in _MODULES:
        loaded[name], raw[name] = diffusers_folder.read_config(folder, name)
        params[name] = diffusers_folder.load_params(folder, name, expected_params(name, loaded[name]),
                                                    dtype=dtype, variant=variant)
    scheduler_config = diffusers_folder.read_json(folder / "scheduler" / "scheduler_config.json")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    params = _place(params, devices)
    return Pipeline(ModelConfigs(**loaded), params, tokenizer, scheduler_config, dtype=dtype,
                    attention=attention, raw_configs=raw)


def _place(params, devices):
    """Params on the given devices (replicated), or on the default device."""
    if devices is None:
        return jax.device_put(params)
    mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
    return jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
