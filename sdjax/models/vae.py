"""AutoencoderKL: the latent-diffusion VAE (diffusers' architecture and parameter names, NHWC).

Images are NHWC in [-1, 1]; `encode` gives the diagonal Gaussian posterior over (unscaled) latents, `decode`
maps latents back to images. The diffusion model works on scaled latents: see `scale_latents`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from sdjax.errors import ConfigError
from sdjax.models import products
from sdjax.models.attention import DEFAULT as DEFAULT_ATTENTION
from sdjax.models.configs import VAEConfig
from sdjax.models.layers import DownBlock2D, MidBlock2D, UpBlock2D, make_conv, make_group_norm

_EPS = 1e-6  # diffusers' VAE uses this epsilon in every GroupNorm, whatever the config


def scale_latents(latents, config: VAEConfig):
    """VAE latents -> the diffusion model's latent space: (z - shift_factor) * scaling_factor."""
    return (latents - (config.shift_factor or 0.0)) * config.scaling_factor


def unscale_latents(latents, config: VAEConfig):
    """Inverse of `scale_latents`: z / scaling_factor + shift_factor."""
    return latents / config.scaling_factor + (config.shift_factor or 0.0)


@flax.struct.dataclass
class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)); logvar is already clipped to [-30, 20]."""
    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments) -> "DiagonalGaussian":
        """Split channels [mean | logvar] and clip logvar as diffusers does (keeps exp() finite)."""
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean, jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self):
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self):
        return jnp.exp(self.logvar)

    def sample(self, key):
        """mean + std * eps with eps ~ N(0, 1) drawn from `key`."""
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self):
        return self.mean

    def kl(self):
        """KL(self || N(0, 1)) summed over H, W, C; shape (B,)."""
        return 0.5 * jnp.sum(self.mean ** 2 + self.var - 1.0 - self.logvar, axis=(1, 2, 3))


def _check_config(config: VAEConfig) -> None:
    for kind, types, allowed in (("down_block_types", config.down_block_types, "DownEncoderBlock2D"),
                                 ("up_block_types", config.up_block_types, "UpDecoderBlock2D")):
        if len(types) != len(config.block_out_channels) or any(t != allowed for t in types):
            raise ConfigError(f"VAEConfig.{kind} must be {allowed!r} once per block_out_channels entry, got {types}")


class Encoder(nn.Module):
    """Image -> moments (2 * latent_channels: mean and logvar), before quant_conv."""
    config: VAEConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_implementation: str = DEFAULT_ATTENTION

    @nn.compact
    def __call__(self, x):
        config = self.config
        common = dict(groups=config.norm_num_groups, eps=_EPS, dtype=self.dtype, param_dtype=self.param_dtype,
                      attention_implementation=self.attention_implementation)
        x = make_conv(self, config.block_out_channels[0], 3, "conv_in")(x)
        for i, channels in enumerate(config.block_out_channels):
            x, _ = DownBlock2D(channels, num_layers=config.layers_per_block, downsample_padding=0,
                               add_downsample=i < len(config.block_out_channels) - 1, **common,
                               name=f"down_blocks.{i}")(x)
        x = _mid_block(config, common)(x)
        x = nn.silu(make_group_norm(self, config.norm_num_groups, _EPS, "conv_norm_out")(x))
        return make_conv(self, 2 * config.latent_channels, 3, "conv_out")(x)


class Decoder(nn.Module):
    """Latents (after post_quant_conv) -> image."""
    config: VAEConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_implementation: str = DEFAULT_ATTENTION

    @nn.compact
    def __call__(self, z):
        config = self.config
        common = dict(groups=config.norm_num_groups, eps=_EPS, dtype=self.dtype, param_dtype=self.param_dtype,
                      attention_implementation=self.attention_implementation)
        x = make_conv(self, config.block_out_channels[-1], 3, "conv_in")(z)
        x = _mid_block(config, common)(x)
        for i, channels in enumerate(reversed(config.block_out_channels)):
            x = UpBlock2D(channels, num_layers=config.layers_per_block + 1,
                          add_upsample=i < len(config.block_out_channels) - 1, **common, name=f"up_blocks.{i}")(x)
        x = nn.silu(make_group_norm(self, config.norm_num_groups, _EPS, "conv_norm_out")(x))
        return make_conv(self, config.out_channels, 3, "conv_out")(x)


def _mid_block(config: VAEConfig, common: dict) -> MidBlock2D:
    return MidBlock2D(config.block_out_channels[-1], num_layers=1,
                      attention="spatial" if config.mid_block_add_attention else None, **common, name="mid_block")


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder. `__call__(images)` encodes and decodes (posterior mode, or a sample with `key`).

    Use `apply(..., method=AutoencoderKL.encode)` / `method=AutoencoderKL.decode` for one half.
    """
    config: VAEConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_implementation: str = DEFAULT_ATTENTION

    # setup rather than nn.compact: encode and decode are separate entry points sharing one param tree.
    # Attribute names are the submodule names, which match diffusers'.
    def setup(self):
        _check_config(self.config)
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype,
                      attention_implementation=self.attention_implementation)
        latent = self.config.latent_channels
        self.encoder = Encoder(self.config, **kwargs)
        self.decoder = Decoder(self.config, **kwargs)
        conv = dict(kernel_size=(1, 1), dtype=self.dtype, param_dtype=self.param_dtype,
                    conv_general_dilated=products.conv_general_dilated)
        self.quant_conv = nn.Conv(2 * latent, **conv) if self.config.use_quant_conv else None
        self.post_quant_conv = nn.Conv(latent, **conv) if self.config.use_post_quant_conv else None

    def encode(self, images) -> DiagonalGaussian:
        """Images (B, H, W, C) in [-1, 1] -> posterior over latents (B, H/f, W/f, latent_channels)."""
        moments = self.encoder(images.astype(self.dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments)

    def decode(self, latents):
        """Unscaled latents (B, h, w, latent_channels) -> images (B, h*f, w*f, C), nominally in [-1, 1]."""
        latents = latents.astype(self.dtype)
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)

    def __call__(self, images, key=None):
        posterior = self.encode(images)
        return self.decode(posterior.mode() if key is None else posterior.sample(key))
