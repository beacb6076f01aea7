"""UNet2DConditionModel for SD 1.x / 2.x and SDXL (diffusers' architecture and parameter names, NHWC).

`down_block_kwargs` / `mid_block_kwargs` describe the down path from a config, so ControlNet can build the
same blocks under the same names.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from sdjax.errors import ConfigError, InvalidArgumentError
from sdjax.models.attention import DEFAULT as DEFAULT_ATTENTION
from sdjax.models.configs import UNetConfig
from sdjax.models.layers import (DownBlock2D, MidBlock2D, TimestepEmbedding, UpBlock2D, make_conv, make_group_norm,
                                 timestep_embedding)

_DOWN_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}  # value: has cross-attention
_UP_TYPES = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
_MID_TYPES = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None)


def check_config(config: UNetConfig) -> None:
    """Raise ConfigError if `config` names a block type sdjax's U-Net does not build."""
    for kind, types, allowed in (("down_block_types", config.down_block_types, _DOWN_TYPES),
                                 ("up_block_types", config.up_block_types, _UP_TYPES)):
        for name in types:
            if name not in allowed:
                raise ConfigError(f"UNetConfig.{kind}: {name!r} is not supported (use one of {sorted(allowed)})")
    if config.mid_block_type not in _MID_TYPES:
        raise ConfigError(f"UNetConfig.mid_block_type: {config.mid_block_type!r} is not supported "
                          f"(use one of {_MID_TYPES})")


def _attention_kwargs(config: UNetConfig, heads: int, transformer_layers: int) -> dict[str, Any]:
    return dict(heads=heads, transformer_layers=transformer_layers,
                use_linear_projection=config.use_linear_projection, upcast_attention=config.upcast_attention)


def down_block_kwargs(config: UNetConfig, i: int) -> dict[str, Any]:
    """Keyword arguments of `DownBlock2D` for down block `i` (without dtype / attention implementation)."""
    channels = config.block_out_channels[i]
    kwargs = dict(out_channels=channels, num_layers=config.per_block("layers_per_block")[i],
                  groups=config.norm_num_groups, eps=config.norm_eps,
                  add_downsample=i < len(config.block_out_channels) - 1, downsample_padding=1)
    if _DOWN_TYPES[config.down_block_types[i]]:
        kwargs.update(_attention_kwargs(config, config.heads_per_block[i],
                                        config.per_block("transformer_layers_per_block")[i]))
    return kwargs


def mid_block_kwargs(config: UNetConfig) -> dict[str, Any] | None:
    """Keyword arguments of `MidBlock2D` (None when the config has no mid block)."""
    if config.mid_block_type is None:
        return None
    kwargs = dict(out_channels=config.block_out_channels[-1], groups=config.norm_num_groups, eps=config.norm_eps)
    if config.mid_block_type == "UNetMidBlock2D":
        return dict(kwargs, num_layers=0)  # diffusers builds it with a single resnet and no attention
    return dict(kwargs, num_layers=1, attention="transformer",
                **_attention_kwargs(config, config.heads_per_block[-1],
                                    config.per_block("transformer_layers_per_block")[-1]))


def up_block_kwargs(config: UNetConfig, i: int) -> dict[str, Any]:
    """Keyword arguments of `UpBlock2D` for up block `i` (counted from the lowest resolution)."""
    rev = lambda name: tuple(reversed(config.per_block(name)))  # noqa: E731
    kwargs = dict(out_channels=rev("block_out_channels")[i], num_layers=rev("layers_per_block")[i] + 1,
                  groups=config.norm_num_groups, eps=config.norm_eps,
                  add_upsample=i < len(config.block_out_channels) - 1)
    if _UP_TYPES[config.up_block_types[i]]:
        kwargs.update(_attention_kwargs(config, tuple(reversed(config.heads_per_block))[i],
                                        rev("transformer_layers_per_block")[i]))
    return kwargs


def _maybe_remat(module: nn.Module, block: type, static_argnums: tuple[int, ...] = ()) -> type:
    """`block`, rematerialised (activations recomputed in the backward pass) when `module.remat` is set: peak
    training memory then holds one block's activations instead of the whole U-Net's."""
    if getattr(module, "remat", False):
        return nn.remat(block, static_argnums=static_argnums)
    return block


def embed_timesteps(module: nn.Module, config: UNetConfig, timesteps, batch: int):
    """The time embedding (B, 4 * block_out_channels[0]); creates `time_embedding` as a child of `module`
    (call from a compact method). Shared by the U-Net and the ControlNet, whose weights use the same names."""
    channels = config.block_out_channels[0]
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (batch,))
    t_emb = timestep_embedding(timesteps, channels, flip_sin_to_cos=config.flip_sin_to_cos,
                               freq_shift=config.freq_shift).astype(module.dtype)
    return TimestepEmbedding(4 * channels, dtype=module.dtype, param_dtype=module.param_dtype,
                             name="time_embedding")(t_emb)


def embed_additions(module: nn.Module, config: UNetConfig, text_embeds, time_ids):
    """SDXL's added conditioning (B, 4 * block_out_channels[0]): `add_embedding` of the pooled text embedding
    `text_embeds` (B, P) beside the sinusoidal embedding of each of the `time_ids` (B, K) (original size, crop
    corner, target size; with the refiner an aesthetic score). Creates `add_embedding` as a child of `module`."""
    if text_embeds is None or time_ids is None:
        raise InvalidArgumentError("this U-Net (addition_embed_type 'text_time', SDXL's) needs text_embeds (the "
                                   "pooled prompt embedding) and time_ids (sizes and crop corner)")
    batch = text_embeds.shape[0]
    time_embeds = timestep_embedding(jnp.asarray(time_ids, jnp.float32).reshape(-1), config.addition_time_embed_dim,
                                     flip_sin_to_cos=config.flip_sin_to_cos, freq_shift=config.freq_shift)
    added = jnp.concatenate([text_embeds.astype(jnp.float32), time_embeds.reshape(batch, -1)], axis=-1)
    return TimestepEmbedding(4 * config.block_out_channels[0], dtype=module.dtype, param_dtype=module.param_dtype,
                             name="add_embedding")(added.astype(module.dtype))


def down_path(module: nn.Module, config: UNetConfig, x, temb, context):
    """The down blocks (children `down_blocks.i` of `module`): the features and every skip connection,
    starting with the conv_in output `x`. Shared by the U-Net and the ControlNet."""
    skips = [x]
    for i in range(len(config.down_block_types)):
        x, block_skips = _maybe_remat(module, DownBlock2D)(**down_block_kwargs(config, i), dtype=module.dtype,
                                     param_dtype=module.param_dtype,
                                     attention_implementation=module.attention_implementation,
                                     name=f"down_blocks.{i}")(x, temb, context)
        skips.extend(block_skips)
    return x, skips


class UNet2DConditionModel(nn.Module):
    """Conditional U-Net: `(sample (B, H, W, C), timesteps (scalar or (B,)), encoder_hidden_states (B, L, D))`
    -> (B, H, W, out_channels).

    The optional ControlNet residuals (NHWC, one per skip connection, and one for the mid block) are added
    where diffusers adds them. An SDXL U-Net also takes `text_embeds` (B, P) and `time_ids` (B, K), diffusers'
    `added_cond_kwargs`.
    """
    config: UNetConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_implementation: str = DEFAULT_ATTENTION
    remat: bool = False  # recompute each block's activations in the backward pass (training memory)

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states,
                 down_block_additional_residuals: Sequence[Any] | None = None,
                 mid_block_additional_residual=None, *, text_embeds=None, time_ids=None):
        config = self.config
        check_config(config)
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = dict(common, attention_implementation=self.attention_implementation)
        batch = sample.shape[0]
        channels0 = config.block_out_channels[0]

        temb = embed_timesteps(self, config, timesteps, batch)
        if config.addition_embed_type == "text_time":
            temb = temb + embed_additions(self, config, text_embeds, time_ids)
        context = encoder_hidden_states.astype(self.dtype)

        x = make_conv(self, channels0, 3, "conv_in")(sample.astype(self.dtype))
        x, skips = down_path(self, config, x, temb, context)

        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise InvalidArgumentError(
                    f"down_block_additional_residuals has {len(down_block_additional_residuals)} entries; "
                    f"this U-Net has {len(skips)} skip connections")
            skips = [s + r.astype(s.dtype) for s, r in zip(skips, down_block_additional_residuals)]

        mid = mid_block_kwargs(config)
        if mid is not None:
            x = _maybe_remat(self, MidBlock2D)(**mid, **attn, name="mid_block")(x, temb, context)
        if mid_block_additional_residual is not None:
            x = x + mid_block_additional_residual.astype(x.dtype)

        for i in range(len(config.up_block_types)):
            kwargs = up_block_kwargs(config, i)
            block_skips, skips = skips[-kwargs["num_layers"]:], skips[:-kwargs["num_layers"]]
            # The next skip's size undoes the down path's rounding up of odd sizes (e.g. 13 -> 7 -> 13, not 14).
            output_size = skips[-1].shape[1:3] if kwargs["add_upsample"] else None
            x = _maybe_remat(self, UpBlock2D, static_argnums=(5,))(**kwargs, **attn, name=f"up_blocks.{i}")(
                x, block_skips, temb, context, output_size)

        x = nn.silu(make_group_norm(self, config.norm_num_groups, config.norm_eps, "conv_norm_out")(x))
        return make_conv(self, config.out_channels, 3, "conv_out")(x)
