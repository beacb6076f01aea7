"""Building blocks shared by the U-Net and the VAE (NHWC, flax.linen).

Every submodule is named after the PyTorch attribute it mirrors in diffusers (list entries as "name.N"), so
a param path joined with "." is the diffusers state-dict key (see sdjax.weights.keymap).
Numerics follow diffusers exactly: normalisation statistics in float32 with the two-pass variance, exact
(erf) GELU, nearest upsampling with PyTorch's index rule, and the same epsilons.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sdjax.errors import InvalidArgumentError
from sdjax.models import products
from sdjax.models.attention import DEFAULT as DEFAULT_ATTENTION, attention

Dtype = Any


# --- parameterised primitives: `m` is the calling module, whose dtype/param_dtype they inherit --------------

def make_dense(m: nn.Module, features: int, name: str, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=m.dtype, param_dtype=m.param_dtype,
                    dot_general=products.dot_general, name=name)


def make_conv(m: nn.Module, features: int, kernel: int, name: str, *, stride: int = 1, padding=None) -> nn.Conv:
    if padding is None:
        padding = ((kernel // 2, kernel // 2),) * 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                   dtype=m.dtype, param_dtype=m.param_dtype, conv_general_dilated=products.conv_general_dilated,
                   name=name)


def make_group_norm(m: nn.Module, groups: int, eps: float, name: str) -> "GroupNorm":
    return GroupNorm(groups, eps, dtype=m.dtype, param_dtype=m.param_dtype, name=name)


def group_norm(x, scale, bias, groups: int, eps: float):
    """PyTorch's GroupNorm on channels-last `x`, statistics in float32 with the two-pass variance (the
    E[x^2] - E[x]^2 shortcut loses digits that PyTorch keeps). Each channel is summed over the pixels first and
    the group's channels after: XLA:CPU reduces along the pixels far faster than over pixels and channels at once
    (measured on a Zen 4 EPYC: 6x forward, 2-2.5x backward on the shapes U-Net's levels, 1.3x on SD's VAE)."""
    batch, channels = x.shape[0], x.shape[-1]
    width = channels // groups
    pixels = x.reshape(batch, -1, channels).astype(jnp.promote_types(x.dtype, jnp.float32))
    count = pixels.shape[1] * width

    def group_mean(per_channel_sums):  # (batch, channels) -> each channel's group mean, (batch, 1, channels)
        sums = per_channel_sums.reshape(batch, groups, width).sum(axis=-1)
        return jnp.repeat(sums / count, width, axis=1)[:, None, :]

    centred = pixels - group_mean(pixels.sum(axis=1))
    inverse_std = jax.lax.rsqrt(group_mean(jnp.square(centred).sum(axis=1)) + eps)
    return (centred * (inverse_std * scale) + bias).reshape(x.shape)


class GroupNorm(nn.Module):
    """flax's GroupNorm params ("scale", "bias") and result, computed by `group_norm`."""
    num_groups: int
    epsilon: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        if channels % self.num_groups:
            raise InvalidArgumentError(f"{channels} channels do not split into {self.num_groups} groups")
        scale = self.param("scale", nn.initializers.ones, (channels,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (channels,), self.param_dtype)
        return group_norm(x, scale, bias, self.num_groups, self.epsilon).astype(self.dtype)


def make_layer_norm(m: nn.Module, name: str, eps: float = 1e-5) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, use_fast_variance=False, dtype=m.dtype, param_dtype=m.param_dtype, name=name)


# --- timestep embedding --------------------------------------------------------------------------------------

def timestep_embedding(timesteps, dim: int, *, flip_sin_to_cos: bool = False, freq_shift: float = 1,
                       max_period: float = 10000.0):
    """Sinusoidal embedding of `timesteps` ((B,), may be fractional) -> (B, dim) float32, as in DDPM.

    Frequencies are exp(-ln(max_period) * i / (dim/2 - freq_shift)); output is [sin, cos], or [cos, sin] with
    flip_sin_to_cos; odd `dim` is zero-padded.
    """
    half = dim // 2
    # The frequency table is a trace-time constant. The exponent is rounded in float32 as PyTorch rounds it; exp
    # in float64 then rounding gives the correctly rounded frequencies. float32 exp implementations (XLA's,
    # PyTorch's) are off by an ulp here and there, which timesteps ~1000 amplify to ~1e-4 in sin/cos.
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
    exponent = exponent / np.float32(half - freq_shift)
    freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
    args = jnp.asarray(timesteps, jnp.float32)[:, None] * freqs[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """Two-layer SiLU MLP on the sinusoidal embedding (diffusers `TimestepEmbedding`)."""
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.silu(make_dense(self, self.features, "linear_1")(x))
        return make_dense(self, self.features, "linear_2")(x)


# --- convolutional blocks ------------------------------------------------------------------------------------

class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-Conv twice with a residual; the time embedding (if given) is added after the first conv."""
    out_channels: int
    groups: int = 32
    eps: float = 1e-6
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None):
        h = nn.silu(make_group_norm(self, self.groups, self.eps, "norm1")(x))
        h = make_conv(self, self.out_channels, 3, "conv1")(h)
        if temb is not None:
            h = h + make_dense(self, self.out_channels, "time_emb_proj")(nn.silu(temb))[:, None, None, :]
        h = nn.silu(make_group_norm(self, self.groups, self.eps, "norm2")(h))
        h = make_conv(self, self.out_channels, 3, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = make_conv(self, self.out_channels, 1, "conv_shortcut")(x)
        return (x + h) / self.output_scale_factor


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. padding=1 pads all sides (U-Net); padding=0 pads only bottom/right (VAE encoder)."""
    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.padding not in (0, 1):
            raise InvalidArgumentError(f"Downsample2D padding must be 0 or 1, got {self.padding}")
        pad = ((1, 1), (1, 1)) if self.padding == 1 else ((0, 1), (0, 1))
        return make_conv(self, self.out_channels, 3, "conv", stride=2, padding=pad)(x)


def upsample_nearest(x, output_size: Sequence[int] | None = None):
    """Nearest-neighbour resize of NHWC `x` to `output_size` (default 2x), with PyTorch's source-index rule."""
    height, width = x.shape[1:3]
    out_h, out_w = output_size if output_size is not None else (2 * height, 2 * width)
    if (out_h, out_w) == (2 * height, 2 * width):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return x[:, _nearest_index(height, out_h)][:, :, _nearest_index(width, out_w)]


def _nearest_index(in_size: int, out_size: int) -> np.ndarray:
    # PyTorch: src = min(floor(dst * (in / out)), in - 1), with the ratio and product in float32.
    scale = np.float32(in_size) / np.float32(out_size)
    idx = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, in_size - 1)


class Upsample2D(nn.Module):
    """Nearest 2x (or to `output_size`) upsampling followed by a 3x3 conv."""
    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, output_size: Sequence[int] | None = None):
        return make_conv(self, self.out_channels, 3, "conv")(upsample_nearest(x, output_size))


# --- attention -----------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head (cross-)attention with to_q/to_k/to_v/to_out.0 projections (diffusers `Attention`).

    On an NHWC input it attends over the pixels; `norm_groups` adds the pre-attention GroupNorm and
    `residual` the skip connection, which together make the VAE's single-head spatial attention block.
    """
    heads: int
    head_dim: int
    qkv_bias: bool = False
    upcast: bool = False
    norm_groups: int | None = None
    norm_eps: float = 1e-6
    residual: bool = False
    attention_implementation: str = DEFAULT_ATTENTION
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None):
        shape = x.shape
        residual = x
        if self.norm_groups is not None:
            x = make_group_norm(self, self.norm_groups, self.norm_eps, "group_norm")(x)
        x = x.reshape(shape[0], -1, shape[-1])
        context = x if context is None else context
        inner = self.heads * self.head_dim
        q = make_dense(self, inner, "to_q", self.qkv_bias)(x)
        k = make_dense(self, inner, "to_k", self.qkv_bias)(context)
        v = make_dense(self, inner, "to_v", self.qkv_bias)(context)
        heads = lambda t: t.reshape(*t.shape[:2], self.heads, self.head_dim)  # noqa: E731  (B, L, heads, dim)
        out = attention(heads(q), heads(k), heads(v), upcast=self.upcast,
                        implementation=self.attention_implementation)
        out = make_dense(self, shape[-1], "to_out.0")(out.reshape(*out.shape[:2], inner)).reshape(shape)
        return out + residual if self.residual else out


class GEGLU(nn.Module):
    """Dense to 2*features, then value * GELU(gate) with the exact (erf) GELU."""
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        value, gate = jnp.split(make_dense(self, 2 * self.features, "proj")(x), 2, axis=-1)
        return value * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """GEGLU feed-forward with 4x inner width; net.1 is PyTorch's (parameterless) dropout."""
    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dim = x.shape[-1]
        h = GEGLU(dim * self.mult, dtype=self.dtype, param_dtype=self.param_dtype, name="net.0")(x)
        return make_dense(self, dim, "net.2")(h)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention on `context`, and GEGLU feed-forward, each residual."""
    heads: int
    head_dim: int
    upcast_attention: bool = False
    attention_implementation: str = DEFAULT_ATTENTION
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        def attn(name):
            return Attention(self.heads, self.head_dim, upcast=self.upcast_attention,
                             attention_implementation=self.attention_implementation,
                             dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        x = x + attn("attn1")(make_layer_norm(self, "norm1")(x))
        x = x + attn("attn2")(make_layer_norm(self, "norm2")(x), context)
        ff = FeedForward(dtype=self.dtype, param_dtype=self.param_dtype, name="ff")
        return x + ff(make_layer_norm(self, "norm3")(x))


class Transformer2DModel(nn.Module):
    """GroupNorm, proj_in, transformer blocks over the H*W tokens, proj_out, plus the input (residual).

    use_linear_projection picks Dense projections on tokens (SD 2.x) instead of 1x1 convs (SD 1.x).
    """
    heads: int
    head_dim: int
    num_layers: int = 1
    groups: int = 32
    use_linear_projection: bool = False
    upcast_attention: bool = False
    attention_implementation: str = DEFAULT_ATTENTION
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        batch, height, width, channels = x.shape
        inner = self.heads * self.head_dim
        h = make_group_norm(self, self.groups, 1e-6, "norm")(x)
        if self.use_linear_projection:
            h = make_dense(self, inner, "proj_in")(h.reshape(batch, height * width, channels))
        else:
            h = make_conv(self, inner, 1, "proj_in")(h).reshape(batch, height * width, inner)
        for i in range(self.num_layers):
            h = BasicTransformerBlock(self.heads, self.head_dim, upcast_attention=self.upcast_attention,
                                      attention_implementation=self.attention_implementation, dtype=self.dtype,
                                      param_dtype=self.param_dtype, name=f"transformer_blocks.{i}")(h, context)
        if self.use_linear_projection:
            h = make_dense(self, channels, "proj_out")(h).reshape(batch, height, width, channels)
        else:
            h = make_conv(self, channels, 1, "proj_out")(h.reshape(batch, height, width, inner))
        return h + x


# --- resolution blocks shared by U-Net and VAE ---------------------------------------------------------------

class _Block(nn.Module):
    """Fields and sub-module factories common to the down, mid and up blocks.

    `heads=None` means no cross-attention transformers (DownBlock2D, UpBlock2D and the VAE's blocks).
    """
    out_channels: int
    num_layers: int = 1
    groups: int = 32
    eps: float = 1e-6
    heads: int | None = None
    transformer_layers: int = 1
    use_linear_projection: bool = False
    upcast_attention: bool = False
    attention_implementation: str = DEFAULT_ATTENTION
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _resnet(self, name: str) -> ResnetBlock2D:
        return ResnetBlock2D(self.out_channels, groups=self.groups, eps=self.eps, dtype=self.dtype,
                             param_dtype=self.param_dtype, name=name)

    def _transformer(self, name: str) -> Transformer2DModel:
        return Transformer2DModel(self.heads, self.out_channels // self.heads, num_layers=self.transformer_layers,
                                  groups=self.groups, use_linear_projection=self.use_linear_projection,
                                  upcast_attention=self.upcast_attention,
                                  attention_implementation=self.attention_implementation,
                                  dtype=self.dtype, param_dtype=self.param_dtype, name=name)


class DownBlock2D(_Block):
    """diffusers DownBlock2D / CrossAttnDownBlock2D (with `heads`) / DownEncoderBlock2D (no temb, padding 0).

    Returns (output, skips): the output of every layer and of the downsampler, for the U-Net's up path.
    """
    add_downsample: bool = True
    downsample_padding: int = 1

    @nn.compact
    def __call__(self, x, temb=None, context=None):
        skips = []
        for i in range(self.num_layers):
            x = self._resnet(f"resnets.{i}")(x, temb)
            if self.heads is not None:
                x = self._transformer(f"attentions.{i}")(x, context)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, padding=self.downsample_padding, dtype=self.dtype,
                             param_dtype=self.param_dtype, name="downsamplers.0")(x)
            skips.append(x)
        return x, skips


class UpBlock2D(_Block):
    """diffusers UpBlock2D / CrossAttnUpBlock2D (with `heads`) / UpDecoderBlock2D (no `skips`, no temb).

    `skips` are consumed last-first, each concatenated on channels before its resnet; `output_size` forces the
    upsampled size where the down path rounded odd sizes up.
    """
    add_upsample: bool = True

    @nn.compact
    def __call__(self, x, skips=None, temb=None, context=None, output_size=None):
        skips = list(skips) if skips is not None else None
        for i in range(self.num_layers):
            if skips is not None:
                x = jnp.concatenate([x, skips.pop()], axis=-1)
            x = self._resnet(f"resnets.{i}")(x, temb)
            if self.heads is not None:
                x = self._transformer(f"attentions.{i}")(x, context)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype,
                           name="upsamplers.0")(x, output_size)
        return x


class MidBlock2D(_Block):
    """resnets.0, then per layer an attention and another resnet.

    attention: "transformer" (UNetMidBlock2DCrossAttn), "spatial" (the VAE's single-head self-attention) or
    None; num_layers=0 gives the U-Net's attention-free UNetMidBlock2D.
    """
    attention: str | None = None

    @nn.compact
    def __call__(self, x, temb=None, context=None):
        x = self._resnet("resnets.0")(x, temb)
        for i in range(self.num_layers):
            if self.attention == "transformer":
                x = self._transformer(f"attentions.{i}")(x, context)
            elif self.attention == "spatial":
                x = Attention(1, x.shape[-1], qkv_bias=True, upcast=True, norm_groups=self.groups, norm_eps=self.eps,
                              residual=True, attention_implementation=self.attention_implementation,
                              dtype=self.dtype, param_dtype=self.param_dtype, name=f"attentions.{i}")(x)
            elif self.attention is not None:
                raise InvalidArgumentError(f"MidBlock2D attention must be 'transformer', 'spatial' or None, "
                                           f"got {self.attention!r}")
            x = self._resnet(f"resnets.{i + 1}")(x, temb)
        return x
