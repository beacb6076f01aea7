"""Training losses: the latent diffusion loss of the U-Net and the autoencoder loss of the VAE.

Notation (DDPM, variance-preserving): x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps,
SNR_t = alpha_bar_t / (1 - alpha_bar_t). The network predicts, per diffusers' `prediction_type`,
eps ("epsilon"), v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 ("v_prediction", Salimans & Ho 2022) or
x0 ("sample"). Every configuration choice is made when a loss is built: the returned functions hold no
branches on config, only the arithmetic of the chosen variant.

A loss function has the signature `loss_fn(params, frozen, batch, key) -> (loss, metrics)`: `params` are the
trained components ({"unet": ...} and maybe "text_encoder"), `frozen` the others it needs.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from sdjax.models.configs import VAEConfig
from sdjax.models.vae import DiagonalGaussian, scale_latents
from sdjax.train.config import DiffusionConfig, VAELossConfig

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def _per_sample(value, like):
    """(batch,) -> (batch, 1, 1, 1) to broadcast against NHWC."""
    return value.reshape(value.shape + (1,) * (like.ndim - 1))


def add_noise(x0, noise, alpha_bar):
    """x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps (the forward process at per-sample alpha_bar)."""
    alpha_bar = _per_sample(alpha_bar, x0)
    return jnp.sqrt(alpha_bar) * x0 + jnp.sqrt(1.0 - alpha_bar) * noise


def epsilon_target(x0, noise, alpha_bar):
    return noise


def v_target(x0, noise, alpha_bar):
    alpha_bar = _per_sample(alpha_bar, x0)
    return jnp.sqrt(alpha_bar) * noise - jnp.sqrt(1.0 - alpha_bar) * x0


def sample_target(x0, noise, alpha_bar):
    return x0


TARGETS = {"epsilon": epsilon_target, "v_prediction": v_target, "sample": sample_target}


def snr(alpha_bar):
    return alpha_bar / (1.0 - alpha_bar)


def min_snr_weighting(prediction_type: str, gamma: float) -> Callable[[jax.Array], jax.Array]:
    """Per-sample loss weight as a function of alpha_bar: Min-SNR-gamma (Hang et al. 2023) expressed for each
    target, i.e. min(SNR, gamma) divided by the SNR-weight the target already carries (eps: SNR, v: SNR + 1,
    x0: 1). Written without 0/0 so a zero-terminal-SNR timestep gets weight 1 (eps), 0 (v, x0). gamma <= 0
    gives uniform weights."""
    if gamma <= 0:
        return lambda alpha_bar: jnp.ones_like(alpha_bar)
    rules = {
        "epsilon": lambda s: jnp.minimum(1.0, gamma / s),  # min(s, g) / s
        "v_prediction": lambda s: jnp.minimum(s, gamma) / (s + 1.0),
        "sample": lambda s: jnp.minimum(s, gamma),
    }
    rule = rules[prediction_type]
    return lambda alpha_bar: rule(snr(alpha_bar))


def sample_noise(key, shape, offset_noise: float):
    """Gaussian noise plus `offset_noise` times a per-(sample, channel) constant (Guttenberg 2023): the extra
    low-frequency component lets the model learn to move an image's mean, which plain noise hides."""
    noise_key, offset_key = jax.random.split(key)
    offset = jax.random.normal(offset_key, (shape[0], 1, 1, shape[-1]))
    return jax.random.normal(noise_key, shape) + offset_noise * offset


def drop_captions(key, input_ids, empty_ids, probability: float):
    """Replace each row of token ids by the empty prompt's with `probability` (classifier-free guidance)."""
    drop = jax.random.bernoulli(key, probability, (input_ids.shape[0], 1))
    return jnp.where(drop, empty_ids[None, :], input_ids)


def weighted_mse(prediction, target, weight):
    """mean over the batch of weight * (mean squared error of each sample)."""
    per_sample = jnp.mean(jnp.square(prediction.astype(jnp.float32) - target), axis=tuple(range(1, target.ndim)))
    return jnp.mean(weight * per_sample)


def make_diffusion_loss(unet, text_encoder, *, alphas_cumprod, prediction_type: str, config: DiffusionConfig,
                        vae_config: VAEConfig, empty_ids) -> LossFn:
    """The latent diffusion loss on batches {"moments": (B, h, w, 2C), "input_ids": (B, L)}.

    Draws latents from the VAE posterior, timesteps uniformly from the training schedule, and noise; predicts
    with the U-Net conditioned on the text encoder's embeddings; MSE to the configured target with optional
    Min-SNR weighting. `alphas_cumprod` (num_train_timesteps,) already includes any zero-terminal-SNR rescale.
    """
    alpha_bars = jnp.asarray(alphas_cumprod, jnp.float32)
    target_fn, weight_fn = TARGETS[prediction_type], min_snr_weighting(prediction_type, config.min_snr_gamma)
    empty_ids = jnp.asarray(empty_ids, jnp.int32)

    def loss_fn(params, frozen, batch, key):
        weights = {**frozen, **params}
        latent_key, time_key, noise_key, caption_key = jax.random.split(key, 4)
        posterior = DiagonalGaussian.from_moments(batch["moments"])
        x0 = scale_latents(posterior.sample(latent_key), vae_config)
        t = jax.random.randint(time_key, (x0.shape[0],), 0, alpha_bars.shape[0])
        noise = sample_noise(noise_key, x0.shape, config.offset_noise)
        alpha_bar = alpha_bars[t]
        ids = drop_captions(caption_key, batch["input_ids"], empty_ids, config.caption_dropout)
        context = text_encoder.apply({"params": weights["text_encoder"]}, ids).prompt_embeds
        prediction = unet.apply({"params": weights["unet"]}, add_noise(x0, noise, alpha_bar), t, context)
        loss = weighted_mse(prediction, target_fn(x0, noise, alpha_bar), weight_fn(alpha_bar))
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
