"""CLIP text transformer: the prompt encoder (tau) of Stable Diffusion 1.x / 2.x, and with its projection head
SDXL's second text encoder.

Computes what transformers' `CLIPTextModel` computes: token + learned position embeddings, pre-LayerNorm
encoder layers with causal self-attention, a final LayerNorm, and the pooled state at the end-of-text token.
Module names are transformers' attribute names, so a param path joined with "." is the checkpoint key
(`text_model.encoder.layers.3.self_attn.q_proj.kernel` <-> `...q_proj.weight`; see sdjax.weights.keymap).

SD 1.x uses openai's CLIP ViT-L/14 text tower (quick_gelu); SD 2.x uses OpenCLIP ViT-H/14's with its last
layer removed (exact gelu). `clip_skip` selects an earlier layer's output the way diffusers'
StableDiffusionPipeline.encode_prompt does.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from sdjax.errors import InvalidArgumentError
from sdjax.models.attention import DEFAULT as DEFAULT_ATTENTION, attention
from sdjax.models.configs import CLIPTextConfig
from sdjax.models.layers import make_dense

# transformers' CLIP configs of that era stored eos_token_id = 2 and pooled at the largest id instead (the
# end-of-text token has the largest id in CLIP's vocab); transformers keeps that rule for those configs.
LEGACY_EOS_TOKEN_ID = 2


@struct.dataclass
class CLIPTextOutput:
    """What the text encoder returns; all arrays are (batch, length, hidden) unless noted.

    last_hidden_state: final_layer_norm(output of the last layer), as transformers returns it.
    pooler_output: (batch, hidden) last_hidden_state at each row's end-of-text token.
    prompt_embeds: final_layer_norm(output of the layer `clip_skip` before the last): the conditioning
        diffusers' encode_prompt hands the U-Net. The same array as last_hidden_state when clip_skip == 0.
    hidden_states: when asked for, the embeddings and every layer's output (num_hidden_layers + 1 arrays,
        no final LayerNorm), as transformers' `output_hidden_states=True`.
    text_embeds: (batch, projection_dim) the projected pooler_output (CLIPTextModelWithProjection only).
    """
    last_hidden_state: jax.Array
    pooler_output: jax.Array
    prompt_embeds: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None
    text_embeds: jax.Array | None = None


def quick_gelu(x):
    """x * sigmoid(1.702 x): the GELU approximation openai's CLIP was trained with."""
    return x * jax.nn.sigmoid(1.702 * x)


def exact_gelu(x):
    """The erf form of GELU (OpenCLIP, transformers' "gelu")."""
    return jax.nn.gelu(x, approximate=False)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": exact_gelu}


def causal_padding_mask(length: int, attention_mask=None):
    """Boolean mask broadcastable to (batch, heads, q, k): True where query q may attend to key k.

    Each token sees itself and earlier tokens; `attention_mask` (batch, length), 1 for real tokens and 0 for
    padding, additionally hides padded keys.
    """
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]
    if attention_mask is None:
        return causal
    return causal & attention_mask.astype(bool)[:, None, None, :]


def eos_positions(input_ids, eos_token_id: int):
    """Index of each row's end-of-text token, by transformers' rule for a config with this eos_token_id."""
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return jnp.argmax(input_ids, axis=-1)
    # First occurrence: the padding token may also be the end-of-text token.
    return jnp.argmax(input_ids == eos_token_id, axis=-1)


def pool_at(hidden, positions):
    """hidden[b, positions[b]] for every row b."""
    return jnp.take_along_axis(hidden, positions[:, None, None], axis=1)[:, 0]


def _check_clip_skip(clip_skip: int, num_layers: int) -> None:
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 0 <= clip_skip <= num_layers:
        raise InvalidArgumentError(
            f"clip_skip={clip_skip!r}: must be a Python int from 0 (last layer) to {num_layers} "
            f"(the embeddings); 1 selects the penultimate layer")


class CLIPTextEmbeddings(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        cfg = self.config
        length = input_ids.shape[-1]
        if length > cfg.max_position_embeddings:
            raise InvalidArgumentError(
                f"input_ids have {length} tokens but the text encoder has {cfg.max_position_embeddings} "
                f"positions; tokenize with max_length={cfg.max_position_embeddings} and truncation=True")
        embed = functools.partial(nn.Embed, features=cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                                  embedding_init=nn.initializers.normal(0.02))
        tokens = embed(cfg.vocab_size, name="token_embedding")(input_ids)
        positions = embed(cfg.max_position_embeddings, name="position_embedding")(jnp.arange(length))
        return tokens + positions[None]


class CLIPAttention(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_implementation: str = DEFAULT_ATTENTION

    @nn.compact
    def __call__(self, x, mask):
        cfg = self.config
        heads_shape = (*x.shape[:-1], cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads)
        q, k, v = (make_dense(self, cfg.hidden_size, name)(x).reshape(heads_shape)
                   for name in ("q_proj", "k_proj", "v_proj"))
        # Scores and softmax in float32, as transformers' eager path does: fp16 logits can overflow.
        out = attention(q, k, v, mask=mask, upcast=True, implementation=self.attention_implementation)
        return make_dense(self, cfg.hidden_size, "out_proj")(out.reshape(x.shape))


class CLIPMLP(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        x = ACTIVATIONS[cfg.hidden_act](make_dense(self, cfg.intermediate_size, "fc1")(x))
        return make_dense(self, cfg.hidden_size, "fc2")(x)


def _layer_norm(config: CLIPTextConfig, dtype, param_dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=dtype, param_dtype=param_dtype, name=name)


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""
    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_implementation: str = DEFAULT_ATTENTION

    @nn.compact
    def __call__(self, x, mask):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = CLIPAttention(self.config, attention_implementation=self.attention_implementation,
                             name="self_attn", **kw)
        x = x + attn(_layer_norm(self.config, name="layer_norm1", **kw)(x), mask)
        return x + CLIPMLP(self.config, name="mlp", **kw)(_layer_norm(self.config, name="layer_norm2", **kw)(x))


class CLIPEncoder(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_implementation: str = DEFAULT_ATTENTION

    @nn.compact
    def __call__(self, x, mask) -> tuple[jax.Array, ...]:
        """The input followed by every layer's output (num_hidden_layers + 1 arrays)."""
        states = [x]
        for i in range(self.config.num_hidden_layers):
            layer = CLIPEncoderLayer(self.config, dtype=self.dtype, param_dtype=self.param_dtype,
                                     attention_implementation=self.attention_implementation, name=f"layers.{i}")
            states.append(layer(states[-1], mask))
        return tuple(states)


class CLIPTextTransformer(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_implementation: str = DEFAULT_ATTENTION

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, *, clip_skip: int | None = 0,
                 output_hidden_states: bool = False) -> CLIPTextOutput:
        cfg = self.config
        clip_skip = clip_skip or 0  # None, as diffusers spells "no skip"
        _check_clip_skip(clip_skip, cfg.num_hidden_layers)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = CLIPTextEmbeddings(cfg, name="embeddings", **kw)(input_ids)
        mask = causal_padding_mask(input_ids.shape[-1], attention_mask)
        states = CLIPEncoder(cfg, attention_implementation=self.attention_implementation, name="encoder", **kw)(
            x, mask)
        final_layer_norm = _layer_norm(cfg, name="final_layer_norm", **kw)
        last = final_layer_norm(states[-1])
        # The skipped layers still run: the pooled output depends on them, and XLA drops them when unused.
        prompt_embeds = last if clip_skip == 0 else final_layer_norm(states[-1 - clip_skip])
        return CLIPTextOutput(
            last_hidden_state=last,
            pooler_output=pool_at(last, eos_positions(input_ids, cfg.eos_token_id)),
            prompt_embeds=prompt_embeds,
            hidden_states=states if output_hidden_states else None)


class CLIPTextModel(nn.Module):
    """transformers' `CLIPTextModel`: params live under `text_model`, as in SD's text_encoder checkpoints.

    Call with input_ids (batch, length <= max_position_embeddings), optionally attention_mask (batch, length;
    1 = real token). SD pipelines pass no attention_mask: padding tokens are attended to, causally.
    clip_skip (static int, or None for 0) picks the layer for `prompt_embeds`: 0 the last, 1 the penultimate...
    """
    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_implementation: str = DEFAULT_ATTENTION

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, *, clip_skip: int | None = 0,
                 output_hidden_states: bool = False) -> CLIPTextOutput:
        text_model = CLIPTextTransformer(self.config, dtype=self.dtype, param_dtype=self.param_dtype,
                                         attention_implementation=self.attention_implementation, name="text_model")
        return text_model(input_ids, attention_mask, clip_skip=clip_skip, output_hidden_states=output_hidden_states)


class CLIPTextModelWithProjection(CLIPTextModel):
    """transformers' `CLIPTextModelWithProjection`, SDXL's second text encoder: CLIPTextModel's outputs plus
    `text_embeds`, the pooled state through `text_projection` (no bias), which SDXL's U-Net takes as its pooled
    prompt embedding. Params: `text_model` as CLIPTextModel's, and `text_projection`."""

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, *, clip_skip: int | None = 0,
                 output_hidden_states: bool = False) -> CLIPTextOutput:
        out = super().__call__(input_ids, attention_mask, clip_skip=clip_skip,
                               output_hidden_states=output_hidden_states)
        projection = make_dense(self, self.config.projection_dim, "text_projection", use_bias=False)
        return out.replace(text_embeds=projection(out.pooler_output))
