"""Model configs: frozen dataclasses whose field names are the keys of diffusers'/transformers' config.json.

`from_dict` accepts a parsed config.json: bookkeeping keys (`_class_name`, `_diffusers_version`, ...) and
keys sdjax does not model are dropped only while they hold their "feature off" value; a key that turns on
a feature sdjax lacks is an error naming it, so a checkpoint never loads into the wrong architecture.
Presets for the real SD 1.5 / SD 2.1 architectures and tiny variants for tests live at the bottom.
"""
from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any

from sdjax.errors import ConfigError, did_you_mean

# Keys of diffusers/transformers configs that sdjax ignores because they do not change the forward pass
# (training-only dropout/init settings, token ids, bookkeeping).
_INERT_KEYS = frozenset({
    "sample_size", "dropout", "attention_dropout", "initializer_range", "initializer_factor", "force_upcast",
    "pad_token_id", "bos_token_id", "torch_dtype", "dtype", "transformers_version", "architectures",
    "model_type", "projection_dim", "latents_mean", "latents_std", "output_attentions", "output_hidden_states",
    "use_return_dict", "return_dict", "_name_or_path", "hidden_dropout_prob",
})
# Keys whose listed values mean "feature off": any other value is unsupported.
_OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "center_input_sample": (False,),
    "dual_cross_attention": (False,),
    "only_cross_attention": (False,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0, 1),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "reverse_transformer_layers_per_block": (None,),
    "mid_block_scale_factor": (1, 1.0),
    "downsample_padding": (1,),
    "addition_embed_type_num_heads": (64,),
    "act_fn": ("silu",),
}


def _check_groups(config) -> None:
    """GroupNorm splits every block's channels into norm_num_groups groups."""
    uneven = [c for c in config.block_out_channels if c % config.norm_num_groups]
    if uneven:
        raise ValueError(f"block_out_channels {uneven} are not multiples of norm_num_groups "
                         f"({config.norm_num_groups}), which GroupNorm needs")


def _freeze(value: Any) -> Any:
    return tuple(_freeze(v) for v in value) if isinstance(value, list) else value


def _is_a(value: Any, hint) -> bool:
    """Whether a JSON value (lists frozen to tuples) fits a field's type: int, float (ints too), bool, str, None,
    tuple[X, ...] and unions of these."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_is_a(value, option) for option in typing.get_args(hint))
    if origin is tuple:
        return isinstance(value, tuple) and all(_is_a(v, typing.get_args(hint)[0]) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(option) for option in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        return "a list of " + {int: "integers", float: "numbers", bool: "booleans", str: "strings"}.get(item, str(item))
    return "null" if hint is type(None) else {int: "an integer", float: "a number", bool: "true or false",
                                                str: "a string"}.get(hint, str(hint))


@functools.cache
def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@dataclasses.dataclass(frozen=True)
class _Config:
    """Shared `from_dict`/`to_dict` for configs whose fields are config.json keys."""

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, source: str = "config.json"):
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in raw.items():
            if key in fields:
                kwargs[key] = _freeze(value)
                if not _is_a(kwargs[key], _field_types(cls)[key]):
                    raise ConfigError(f"{source}: key {key!r} = {value!r} should be "
                                      f"{_describe(_field_types(cls)[key])}")
            elif key.startswith("_") or key in _INERT_KEYS:
                continue
            elif key in _OFF_VALUES:
                if value not in _OFF_VALUES[key]:
                    raise ConfigError(
                        f"{source}: key {key!r} = {value!r} turns on a feature sdjax's {cls.__name__} does not "
                        f"implement (supported: {_OFF_VALUES[key]!r}).")
            else:
                raise ConfigError(f"{source}: unknown key {key!r} for {cls.__name__}.{did_you_mean(key, fields)}")
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{source}: invalid {cls.__name__}: {err}") from err

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclasses.dataclass(frozen=True)
class UNetConfig(_Config):
    """diffusers `UNet2DConditionModel` (SD 1.x / 2.x subset)."""
    in_channels: int = 4
    out_channels: int = 4
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = (
        "UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    # diffusers' historical naming: in SD configs `attention_head_dim` holds the number of heads.
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    # SDXL's micro-conditioning: "text_time" adds an embedding of the pooled text embedding and the size/crop
    # time ids (each sinusoidally embedded in addition_time_embed_dim) to the time embedding.
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

    def __post_init__(self):
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(f"addition_embed_type {self.addition_embed_type!r} is not supported (use null or "
                             f"'text_time', SDXL's)")
        if self.addition_embed_type and not (self.addition_time_embed_dim and
                                             self.projection_class_embeddings_input_dim):
            raise ValueError("addition_embed_type 'text_time' needs addition_time_embed_dim and "
                             "projection_class_embeddings_input_dim")
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                f"down_block_types ({len(self.down_block_types)}) and up_block_types ({len(self.up_block_types)}) "
                f"must have one entry per block_out_channels ({n})")
        for name in ("attention_head_dim", "num_attention_heads", "layers_per_block", "transformer_layers_per_block"):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != n:
                raise ValueError(f"{name} has {len(value)} entries, expected one per block ({n})")
        _check_groups(self)

    def per_block(self, name: str) -> tuple:
        """A per-block tuple for a key that config.json may give as one int or a list."""
        value = getattr(self, name)
        return tuple(value) if isinstance(value, tuple) else (value,) * len(self.block_out_channels)

    @property
    def heads_per_block(self) -> tuple[int, ...]:
        return self.per_block("num_attention_heads" if self.num_attention_heads is not None else "attention_head_dim")


@dataclasses.dataclass(frozen=True)
class VAEConfig(_Config):
    """diffusers `AutoencoderKL`."""
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        _check_groups(self)

    @property
    def downscale_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig(_Config):
    """transformers `CLIPTextConfig` (the text tower only)."""
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # Picks the pooled (end-of-text) position. 2 is the legacy value in SD's configs, which transformers reads
    # as "pool at the argmax of the ids"; any other value pools at that token's first occurrence.
    eos_token_id: int = 49407
    projection_dim: int = 512  # CLIPTextModelWithProjection's text_projection width (SDXL's pooled embedding)

    def __post_init__(self):
        if self.hidden_act not in ("quick_gelu", "gelu"):
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (use 'quick_gelu' or 'gelu')")


# --- presets ---------------------------------------------------------------------------------------------

SD15_UNET = UNetConfig(cross_attention_dim=768, attention_head_dim=8)
SD21_UNET = UNetConfig(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                       use_linear_projection=True, upcast_attention=True)
SDXL_UNET = UNetConfig(  # stabilityai/stable-diffusion-xl-base-1.0
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(320, 640, 1280),
    cross_attention_dim=2048, transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816)
SDXL_REFINER_UNET = UNetConfig(  # stabilityai/stable-diffusion-xl-refiner-1.0
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(384, 768, 1536, 1536), cross_attention_dim=1280, transformer_layers_per_block=4,
    attention_head_dim=(6, 12, 24, 24), use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2560)
SD_VAE = VAEConfig()
SDXL_VAE = VAEConfig(scaling_factor=0.13025)
SD15_TEXT = CLIPTextConfig()  # openai/clip-vit-large-patch14
SD21_TEXT = CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                           num_attention_heads=16, hidden_act="gelu")  # OpenCLIP ViT-H/14, last layer dropped
SDXL_TEXT_2 = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                             hidden_act="gelu", projection_dim=1280)  # OpenCLIP ViT-bigG/14 with its projection

TINY_UNET = UNetConfig(block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=32, cross_attention_dim=32,
                       attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
TINY_VAE = VAEConfig(block_out_channels=(32, 64), layers_per_block=1,
                     down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
TINY_TEXT = CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=5,
                           num_attention_heads=4)

