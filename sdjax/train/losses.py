"""Training losses: the latent diffusion loss of the U-Net and the autoencoder loss of the VAE.

The forward process, the network's target per diffusers' `prediction_type` and the Min-SNR weights are the
model's parameterisation (parameterization.py), which the samplers' denoiser reads too. Every configuration
choice is made when a loss is built: the returned functions hold no branches on config, only the arithmetic
of the chosen variant.

A loss function has the signature `loss_fn(params, frozen, batch, key) -> (loss, metrics)`: `params` are the
trained components ({"unet": ...} and maybe the text encoders), `frozen` the others it needs.

The diffusion loss reads the model's text conditioning through `encode(weights, ids) -> the U-Net's keyword
arguments`, so SD 1.x / 2.x (one text encoder: encoder_hidden_states) and SDXL (two text encoders, the pooled
embedding and the time ids: sdjax.train.task.text_conditioning) share every line of it; token ids are an array or
{text encoder name: array}.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from sdjax.models.configs import VAEConfig
from sdjax.models.vae import DiagonalGaussian, scale_latents
from sdjax.parameterization import add_noise, parameterization
from sdjax.train.config import DiffusionConfig, VAELossConfig

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def sample_noise(key, shape, offset_noise: float):
    """Gaussian noise plus `offset_noise` times a per-(sample, channel) constant (Guttenberg 2023): the extra
    low-frequency component lets the model learn to move an image's mean, which plain noise hides."""
    noise_key, offset_key = jax.random.split(key)
    offset = jax.random.normal(offset_key, (shape[0], 1, 1, shape[-1]))
    return jax.random.normal(noise_key, shape) + offset_noise * offset


def sample_timesteps(key, count: int, timesteps: int, config: DiffusionConfig):
    """`count` training timesteps in [0, timesteps): uniform, or logit-normal (t / T = sigmoid(N(logit_mean,
    logit_std)), the density SD3 trains with), which puts most draws at mid noise and few at either end."""
    if config.timestep_sampling == "logit_normal":
        u = jax.nn.sigmoid(config.logit_mean + config.logit_std * jax.random.normal(key, (count,)))
        return jnp.minimum((u * timesteps).astype(jnp.int32), timesteps - 1)
    return jax.random.randint(key, (count,), 0, timesteps)


def drop_captions(key, input_ids, empty_ids, probability: float):
    """Replace each row of token ids by the empty prompt's with `probability` (classifier-free guidance).
    `input_ids` (B, L) or {text encoder name: (B, L)} with `empty_ids` (L,) of the same structure: a dropped
    caption is dropped for every text encoder (SDXL: the empty prompt for both, as diffusers'
    train_text_to_image_sdxl.py --proportion_empty_prompts)."""
    rows = jax.tree.leaves(input_ids)[0].shape[0]
    drop = jax.random.bernoulli(key, probability, (rows, 1))
    return jax.tree.map(lambda ids, empty: jnp.where(drop, empty[None, :], ids), input_ids, empty_ids)


def weighted_mse(prediction, target, weight, pixel_weight=None, *, normalize_pixel_weight: bool = False):
    """mean over the batch of weight * (mean squared error of each sample), each element's error weighted by
    `pixel_weight` (B, h, w) when given. `normalize_pixel_weight`: each sample's error is divided by its total
    pixel weight instead of its pixel count (a weighted mean, so a sample counts the same whatever its mask)."""
    error = jnp.square(prediction.astype(jnp.float32) - target)
    axes = tuple(range(1, target.ndim))
    if pixel_weight is None:
        return jnp.mean(weight * jnp.mean(error, axis=axes))
    weighted = jnp.sum(error * pixel_weight[..., None], axis=axes)
    total = jnp.sum(pixel_weight, axis=axes[:-1]) if normalize_pixel_weight else pixel_weight[0].size
    return jnp.mean(weight * weighted / (jnp.maximum(total, 1e-8) * target.shape[-1]))


def pool_mask(mask, size: tuple[int, int]):
    """A pixel mask (B, H, W) averaged over the blocks each of `size` = (h, w) latent pixels covers."""
    batch, height, width = mask.shape
    blocks = mask.reshape(batch, size[0], height // size[0], size[1], width // size[1])
    return blocks.mean(axis=(2, 4))


TextConditioning = Callable[[dict, Any], dict]
"""`encode(weights, ids) -> {"encoder_hidden_states": (B, L, D), ...}`: the U-Net's text keyword arguments from
every component's weights and the token ids (SDXL adds text_embeds and time_ids)."""


def text_encoder_conditioning(text_encoder) -> TextConditioning:
    """SD 1.x / 2.x: the last hidden state of the one text encoder."""
    def encode(weights, ids):
        return {"encoder_hidden_states": text_encoder.apply({"params": weights["text_encoder"]}, ids).prompt_embeds}
    return encode


def make_denoising_loss(unet, encode: TextConditioning, *, alphas_cumprod, prediction_type: str,
                        config: DiffusionConfig):
    """`denoising_loss(weights, x0, t, noise, ids, loss_mask=None) -> loss`: the diffusion loss at given scaled
    latents x0 (B, h, w, C), timesteps t (B,), noise and token ids (captions already dropped), with no randomness
    of its own: what `make_diffusion_loss` computes after its draws. `weights`: every component's params by name."""
    alpha_bars = jnp.asarray(alphas_cumprod, jnp.float32)
    model = parameterization(prediction_type)

    def denoising_loss(weights, x0, t, noise, ids, loss_mask=None):
        alpha_bar = alpha_bars[t]
        conditioning = dict(encode(weights, ids))
        context = conditioning.pop("encoder_hidden_states")
        prediction = unet.apply({"params": weights["unet"]}, add_noise(x0, noise, alpha_bar), t, context,
                                **conditioning)
        pixel_weight = None if loss_mask is None else pool_mask(loss_mask, x0.shape[1:3])
        return weighted_mse(prediction, model.target(x0, noise, alpha_bar),
                            model.loss_weight(alpha_bar, config.min_snr_gamma), pixel_weight,
                            normalize_pixel_weight=config.normalize_loss_mask)

    return denoising_loss


def make_diffusion_loss(unet, encode: TextConditioning, *, alphas_cumprod, prediction_type: str,
                        config: DiffusionConfig, vae_config: VAEConfig, empty_ids) -> LossFn:
    """The latent diffusion loss on batches {"moments": (B, h, w, 2C), "input_ids": (B, L) or {text encoder name:
    (B, L)}} and optionally "loss_mask": (B, H, W) pixel weights (`data.loss_mask`).

    Draws latents from the VAE posterior, timesteps uniformly from the training schedule, noise, and which
    captions drop to the empty prompt's ids `empty_ids` (the structure of one row of input_ids); then
    `make_denoising_loss`: predicts with the U-Net conditioned by `encode`, MSE to the configured target with
    optional Min-SNR weighting. `alphas_cumprod` (num_train_timesteps,) already includes any zero-terminal-SNR
    rescale.
    """
    denoising_loss = make_denoising_loss(unet, encode, alphas_cumprod=alphas_cumprod,
                                         prediction_type=prediction_type, config=config)
    timesteps = len(alphas_cumprod)
    empty_ids = jax.tree.map(lambda ids: jnp.asarray(ids, jnp.int32), empty_ids)

    def loss_fn(params, frozen, batch, key):
        latent_key, time_key, noise_key, caption_key = jax.random.split(key, 4)
        posterior = DiagonalGaussian.from_moments(batch["moments"])
        x0 = scale_latents(posterior.sample(latent_key), vae_config)
        t = sample_timesteps(time_key, x0.shape[0], timesteps, config)
        noise = sample_noise(noise_key, x0.shape, config.offset_noise)
        ids = drop_captions(caption_key, batch["input_ids"], empty_ids, config.caption_dropout)
        loss = denoising_loss({**frozen, **params}, x0, t, noise, ids, batch.get("loss_mask"))
        return loss, {"loss": loss}

    return loss_fn


def make_vae_loss(vae, config: VAELossConfig) -> LossFn:
    """The first-stage loss on batches {"pixels": (B, H, W, 3) in [-1, 1]}: reconstruction of a posterior
    sample, summed over each image and averaged over the batch, plus kl_weight * KL(q(z|x) || N(0, I)) on the
    same scale (the latent diffusion paper's convention, where kl_weight = 1e-6)."""
    distance = {"l1": jnp.abs, "l2": jnp.square}[config.reconstruction]

    def loss_fn(params, frozen, batch, key):
        pixels = batch["pixels"]
        weights = {**frozen.get("vae", {}), **params["vae"]}  # frozen: the encoder, when only the decoder trains
        posterior = vae.apply({"params": weights}, pixels, method=vae.encode)
        decoded = vae.apply({"params": weights}, posterior.sample(key), method=vae.decode)
        per_pixel = distance(decoded.astype(jnp.float32) - pixels)
        reconstruction = jnp.mean(jnp.sum(per_pixel, axis=(1, 2, 3)))
        kl = jnp.mean(posterior.kl().astype(jnp.float32))
        loss = reconstruction + config.kl_weight * kl
        return loss, {"loss": loss, "reconstruction_per_pixel": jnp.mean(per_pixel), "kl": kl}

    return loss_fn
