"""ControlNet for SD 1.x / 2.x and SDXL (diffusers' `ControlNetModel`: architecture, parameter names; NHWC).

A ControlNet is a trainable copy of the U-Net's down path and mid block whose input is the noisy latent plus
an embedding of a control image (edges, depth, pose, ...). Every skip connection and the mid-block output
pass through a 1x1 "zero conv" (zero-initialised in training) and come out as residuals that the U-Net adds
to its own (`UNet2DConditionModel(..., down_block_additional_residuals, mid_block_additional_residual)`).
The down path reuses the U-Net's blocks and their kwargs, so both build identical, identically named layers.
An SDXL ControlNet (addition_embed_type "text_time") also reads the U-Net's added conditioning, the pooled prompt
embedding and the time ids, through its own copy of `add_embedding`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from sdjax.errors import InvalidArgumentError
from sdjax.models.attention import DEFAULT as DEFAULT_ATTENTION
from sdjax.models.configs import SD15_UNET, SD21_UNET, SDXL_UNET, UNetConfig
from sdjax.models.layers import MidBlock2D, make_conv
from sdjax.models.unet import check_config, down_path, embed_additions, embed_timesteps, mid_block_kwargs

Residuals = tuple[list[Any], Any]  # (one residual per U-Net skip connection, the mid-block residual)

_UP_TYPE_OF = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}


@dataclasses.dataclass(frozen=True)
class ControlNetConfig(UNetConfig):
    """diffusers `ControlNetModel`: the U-Net's down-path keys plus the control-image embedding's.

    A ControlNet has no up path and no output conv, so `up_block_types` and `out_channels` are not config
    keys here: `up_block_types` mirrors the down blocks only so that UNetConfig's checks apply unchanged.
    """
    up_block_types: tuple[str, ...] = dataclasses.field(default=(), init=False, repr=False)
    out_channels: int = dataclasses.field(default=0, init=False, repr=False)
    conditioning_channels: int = 3
    # Channels of the control-image embedding's stages; each stage after the first halves the resolution.
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    controlnet_conditioning_channel_order: str = "rgb"
    # Residuals averaged over the image (diffusers' "shuffle" ControlNets): global content, no layout.
    global_pool_conditions: bool = False

    def __post_init__(self):
        object.__setattr__(self, "up_block_types",
                           tuple(_UP_TYPE_OF.get(t, t) for t in reversed(self.down_block_types)))
        super().__post_init__()
        if self.mid_block_type is None:
            raise ValueError("mid_block_type must be set: a ControlNet always has a mid block")
        if self.controlnet_conditioning_channel_order not in ("rgb", "bgr"):
            raise ValueError(f"controlnet_conditioning_channel_order must be 'rgb' or 'bgr', "
                             f"got {self.controlnet_conditioning_channel_order!r}")
        if not self.conditioning_embedding_out_channels:
            raise ValueError("conditioning_embedding_out_channels must list at least one channel count")

    @property
    def conditioning_downscale_factor(self) -> int:
        """Control image size / latent size: the VAE's factor that this embedding was trained to undo."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    def to_dict(self) -> dict[str, Any]:
        derived = {f.name for f in dataclasses.fields(self) if not f.init}
        return {k: v for k, v in super().to_dict().items() if k not in derived}


def config_for_unet(unet: UNetConfig, **controlnet_keys) -> ControlNetConfig:
    """The ControlNet config whose residuals fit `unet` (the config half of diffusers' `from_unet`)."""
    own = {f.name for f in dataclasses.fields(ControlNetConfig) if f.init}
    shared = {f.name: getattr(unet, f.name) for f in dataclasses.fields(UNetConfig) if f.name in own}
    return ControlNetConfig(**shared, **controlnet_keys)


SD15_CONTROLNET = config_for_unet(SD15_UNET)  # e.g. lllyasviel/control_v11p_sd15_canny
SD21_CONTROLNET = config_for_unet(SD21_UNET)
SDXL_CONTROLNET = config_for_unet(SDXL_UNET)  # e.g. diffusers/controlnet-canny-sdxl-1.0

# The keys on which a ControlNet's residuals (their count and widths) and the conditioning it reads depend.
_KEYS_SHARED_WITH_UNET = ("block_out_channels", "layers_per_block", "cross_attention_dim", "addition_embed_type",
                          "addition_time_embed_dim", "projection_class_embeddings_input_dim")


def _shared_value(config: UNetConfig, key: str):
    """`key` of `config`, per block where config.json may give one int or a list (so 2 and [2, 2] are equal)."""
    return config.per_block(key) if key == "layers_per_block" else getattr(config, key)


def check_fits_unet(controlnet: ControlNetConfig, unet: UNetConfig, name: str = "controlnet") -> None:
    """InvalidArgumentError naming the keys in which `controlnet` differs from `unet` so that its residuals or
    conditioning would not fit (an SD 1.5 ControlNet on an SDXL U-Net, say)."""
    differ = [f"{key} {_shared_value(controlnet, key)!r} (the U-Net's: {_shared_value(unet, key)!r})"
              for key in _KEYS_SHARED_WITH_UNET if _shared_value(controlnet, key) != _shared_value(unet, key)]
    if differ:
        raise InvalidArgumentError(f"ControlNet {name!r} was not made for this pipeline's U-Net: its config has "
                                   f"{'; '.join(differ)}. Use a ControlNet trained for this base model (an SDXL "
                                   f"ControlNet for SDXL base, an SD 1.5 one for SD 1.5, ...)")


class ControlNetConditioningEmbedding(nn.Module):
    """Control image (B, H, W, C) -> (B, H/f, W/f, out_channels) features at latent resolution.

    conv_in, then per stage a same-size conv and a stride-2 conv (`blocks.2i`, `blocks.2i+1`), SiLU after
    each, and `conv_out` (zero-initialised in training) to the U-Net's first block width.
    """
    out_channels: int
    block_out_channels: tuple[int, ...]
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        channels = self.block_out_channels
        x = nn.silu(make_conv(self, channels[0], 3, "conv_in")(x))
        for i, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:])):
            x = nn.silu(make_conv(self, c_in, 3, f"blocks.{2 * i}")(x))
            x = nn.silu(make_conv(self, c_out, 3, f"blocks.{2 * i + 1}", stride=2)(x))
        return make_conv(self, self.out_channels, 3, "conv_out")(x)


def check_control_image(config: ControlNetConfig, sample_shape: Sequence[int], cond_shape: Sequence[int]) -> None:
    """Raise InvalidArgumentError unless a control image of `cond_shape` fits latents of `sample_shape`."""
    factor = config.conditioning_downscale_factor
    batch, height, width = sample_shape[:3]
    expected = (height * factor, width * factor, config.conditioning_channels)
    if len(cond_shape) != 4 or tuple(cond_shape[1:]) != expected or cond_shape[0] not in (1, batch):
        raise InvalidArgumentError(
            f"controlnet_cond has shape {tuple(cond_shape)}; for latents of shape {tuple(sample_shape)} it must be "
            f"({batch} or 1, {expected[0]}, {expected[1]}, {expected[2]}): the latent size times {factor}, the "
            f"downscale factor of this ControlNet's conditioning embedding. Resize the control image to "
            f"{expected[0]}x{expected[1]} (height x width).")


def guess_mode_scales(count: int):
    """Residual weights of guess mode: log-spaced from 0.1 (first skip) to 1 (mid block), `count` values.

    Shallow, high-resolution residuals carry layout detail that overrides the prompt; damping them lets the
    ControlNet "guess" the content when the prompt is empty.
    """
    return np.logspace(-1.0, 0.0, count).astype(np.float32)


def scale_residuals(down: Sequence[Any], mid, conditioning_scale, *, guess_mode: bool = False,
                    global_pool: bool = False) -> Residuals:
    """Multiply residuals by `conditioning_scale` (traced), log-spaced in guess mode; optionally average them
    over the image to (B, 1, 1, C), which the U-Net broadcasts."""
    count = len(down) + 1
    weights = guess_mode_scales(count) if guess_mode and not global_pool else np.ones(count, np.float32)
    scaled = [(r * (w * conditioning_scale)).astype(r.dtype) for r, w in zip([*down, mid], weights)]
    if global_pool:
        scaled = [r.mean(axis=(1, 2), keepdims=True) for r in scaled]
    return scaled[:-1], scaled[-1]


def sum_residuals(outputs: Sequence[Residuals]) -> Residuals:
    """Residuals of several ControlNets added (diffusers' MultiControlNetModel), ready for one U-Net call."""
    if not outputs:
        raise InvalidArgumentError("sum_residuals needs the output of at least one ControlNet")
    counts = {len(down) for down, _ in outputs}
    if len(counts) != 1:
        raise InvalidArgumentError(f"ControlNets give different numbers of down residuals {sorted(counts)}; "
                                   f"all must be built for the same U-Net")
    add = lambda a, b: a + b  # noqa: E731
    down = [functools.reduce(add, rs) for rs in zip(*(d for d, _ in outputs))]
    return down, functools.reduce(add, [m for _, m in outputs])


class ControlNetModel(nn.Module):
    """`(sample (B, h, w, C), timesteps, encoder_hidden_states (B, L, D), controlnet_cond (B, h*f, w*f, 3) in
    [0, 1], conditioning_scale)` -> (down residuals, mid residual), NHWC, for the U-Net of the same config.

    f is `config.conditioning_downscale_factor` (8 for SD). `guess_mode` (static) weights residuals
    log-spaced (see `guess_mode_scales`), as diffusers does. An SDXL ControlNet also takes the U-Net's
    `text_embeds` (B, P) and `time_ids` (B, K), diffusers' `added_cond_kwargs`.
    """
    config: ControlNetConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_implementation: str = DEFAULT_ATTENTION

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0,
                 guess_mode: bool = False, *, text_embeds=None, time_ids=None) -> Residuals:
        config = self.config
        check_config(config)
        check_control_image(config, sample.shape, controlnet_cond.shape)
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = dict(common, attention_implementation=self.attention_implementation)
        temb = embed_timesteps(self, config, timesteps, sample.shape[0])
        if config.addition_embed_type == "text_time":  # SDXL: the U-Net's added conditioning, as the U-Net adds it
            temb = temb + embed_additions(self, config, text_embeds, time_ids)
        context = encoder_hidden_states.astype(self.dtype)

        if config.controlnet_conditioning_channel_order == "bgr":
            controlnet_cond = controlnet_cond[..., ::-1]
        control = ControlNetConditioningEmbedding(config.block_out_channels[0],
                                                  config.conditioning_embedding_out_channels, **common,
                                                  name="controlnet_cond_embedding")(controlnet_cond.astype(self.dtype))
        x = make_conv(self, config.block_out_channels[0], 3, "conv_in")(sample.astype(self.dtype)) + control

        x, skips = down_path(self, config, x, temb, context)
        x = MidBlock2D(**mid_block_kwargs(config), **attn, name="mid_block")(x, temb, context)

        down = [make_conv(self, s.shape[-1], 1, f"controlnet_down_blocks.{j}")(s) for j, s in enumerate(skips)]
        mid = make_conv(self, x.shape[-1], 1, "controlnet_mid_block")(x)
        return scale_residuals(down, mid, conditioning_scale, guess_mode=guess_mode,
                               global_pool=config.global_pool_conditions)
