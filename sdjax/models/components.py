"""The component registry: each kind of network sdjax runs, in one entry that loading, export, `Pipeline`,
training and ControlNet all read. A model family is a tuple of entry names (`STABLE_DIFFUSION`); adding a
component (an SDXL text_encoder_2, say) is one entry here plus its module.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from sdjax.models import configs
from sdjax.models.attention import DEFAULT as DEFAULT_ATTENTION
from sdjax.models.clip import CLIPTextModel, CLIPTextModelWithProjection
from sdjax.models.controlnet import ControlNetConfig, ControlNetModel
from sdjax.models.unet import UNet2DConditionModel
from sdjax.models.vae import AutoencoderKL

_spec = jax.ShapeDtypeStruct

# Every param's initialiser is its own unrolled threefry program, and LLVM's -O2 spends most of the compile on
# them. -O1 gives the same bits (the float ops are not reordered: checked against -O2 on SD 1.5's U-Net) and
# compiles faster: SD 1.5's U-Net 47 -> 38 s; small models from ~1.1x on a quiet machine to ~3x on a loaded one
# (experiments/perf/init_compile.py and its results).
_INIT_COMPILE_OPTIONS = {"xla_backend_optimization_level": "1"}


@dataclasses.dataclass(frozen=True)
class Component:
    """One kind of network.

    class_name / library: what diffusers or transformers write in config.json and model_index.json (and so the
    weights file name). base_model_prefix: the top-level module name transformers may leave out of its keys
    (transformers 5 saves CLIPTextModel without `text_model.`; SD checkpoints keep it). example_inputs /
    example_keywords: config -> the smallest input shapes that trace the module, positional and keyword (for init
    and param shapes). presets: named architectures that training can start from.
    """
    module: type
    config_class: type
    class_name: str
    library: str
    example_inputs: Callable[[Any], tuple]
    base_model_prefix: str | None = None
    presets: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    example_keywords: Callable[[Any], dict] = lambda config: {}

    @property
    def weights_name(self) -> str:
        return "diffusion_pytorch_model" if self.library == "diffusers" else "model"

    def build(self, config, dtype=jnp.float32, attention: str = DEFAULT_ATTENTION):
        """The Flax module for `config`, computing and storing params in `dtype`."""
        return self.module(config=config, dtype=dtype, param_dtype=dtype, attention_implementation=attention)

    def param_shapes(self, config) -> Any:
        """Shapes of the params (no memory allocated)."""
        return jax.eval_shape(self.build(config).init, jax.random.key(0), *self.example_inputs(config),
                              **self.example_keywords(config))["params"]

    def init(self, config, key) -> Any:
        """Freshly initialised float32 params."""
        zeros = lambda specs: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), specs)  # noqa: E731
        args, keywords = (key, *zeros(self.example_inputs(config))), zeros(self.example_keywords(config))
        lowered = jax.jit(self.build(config).init).lower(*args, **keywords)
        options = _INIT_COMPILE_OPTIONS if jax.default_backend() == "cpu" else {}
        return lowered.compile(compiler_options=options)(*args, **keywords)["params"]


def _smallest_latents(config) -> tuple[int, int]:
    """The smallest latent side a U-Net-shaped network of `config` traces at (one pixel at the bottom)."""
    return 2 ** (len(config.block_out_channels) - 1), config.in_channels


def _unet_inputs(config) -> tuple:
    side, channels = _smallest_latents(config)
    return (_spec((1, side, side, channels), jnp.float32), _spec((1,), jnp.int32),
            _spec((1, 1, config.cross_attention_dim), jnp.float32))


def _unet_keywords(config) -> dict:
    """SDXL's added conditioning: the pooled text embedding and the time ids, sized so that together they fill
    add_embedding's input (projection_class_embeddings_input_dim)."""
    if config.addition_embed_type != "text_time":
        return {}
    time_ids = 6  # original size, crop corner, target size (the refiner: 5, with an aesthetic score)
    pooled = config.projection_class_embeddings_input_dim - time_ids * config.addition_time_embed_dim
    return {"text_embeds": _spec((1, pooled), jnp.float32), "time_ids": _spec((1, time_ids), jnp.float32)}


def _controlnet_inputs(config: ControlNetConfig) -> tuple:
    cond_side = _smallest_latents(config)[0] * config.conditioning_downscale_factor
    return _unet_inputs(config) + (_spec((1, cond_side, cond_side, config.conditioning_channels), jnp.float32),)


def _vae_inputs(config) -> tuple:
    side = config.downscale_factor
    return (_spec((1, side, side, config.in_channels), jnp.float32),)


def _text_inputs(config) -> tuple:
    return (_spec((1, config.max_position_embeddings), jnp.int32),)


COMPONENTS: dict[str, Component] = {
    "unet": Component(UNet2DConditionModel, configs.UNetConfig, "UNet2DConditionModel", "diffusers", _unet_inputs,
                      presets={"tiny": configs.TINY_UNET, "sd15": configs.SD15_UNET, "sd21": configs.SD21_UNET},
                      example_keywords=_unet_keywords),
    "vae": Component(AutoencoderKL, configs.VAEConfig, "AutoencoderKL", "diffusers", _vae_inputs,
                     presets={"tiny": configs.TINY_VAE, "sd": configs.SD_VAE}),
    "text_encoder": Component(CLIPTextModel, configs.CLIPTextConfig, "CLIPTextModel", "transformers", _text_inputs,
                              base_model_prefix="text_model"),
    "text_encoder_2": Component(CLIPTextModelWithProjection, configs.CLIPTextConfig, "CLIPTextModelWithProjection",
                                "transformers", _text_inputs, presets={"sdxl": configs.SDXL_TEXT_2}),
    "controlnet": Component(ControlNetModel, ControlNetConfig, "ControlNetModel", "diffusers", _controlnet_inputs,
                            example_keywords=_unet_keywords),
}

STABLE_DIFFUSION = ("unet", "vae", "text_encoder")
"""The networks of an SD 1.x / 2.x pipeline folder, each in its own sub-folder of that name."""
SDXL = ("unet", "vae", "text_encoder", "text_encoder_2")
"""SDXL base (diffusers' StableDiffusionXLPipeline): two text encoders whose states are concatenated."""
SDXL_REFINER = ("unet", "vae", "text_encoder_2")
"""SDXL's refiner (StableDiffusionXLImg2ImgPipeline with text_encoder null): the second text encoder only."""
TEXT_ENCODERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
"""Each text encoder entry and the folder of its tokenizer, in the order their states are concatenated."""
