"""AutoencoderKL against diffusers' PyTorch model: parameter names, counts, posterior and decoder outputs."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from flax import traverse_util

from sdjax.models import configs
from sdjax.models.vae import AutoencoderKL, DiagonalGaussian, scale_latents, unscale_latents
from sdjax.weights import keymap
from tests.models import errors, nchw, nhwc, reference_pair

TOL = 1e-5
# Tiny VAE with two resnets per level and GroupNorm groups < channels; a second without mid attention/quant convs.
TINY = dataclasses.replace(configs.TINY_VAE, layers_per_block=2, norm_num_groups=16)
BARE = dataclasses.replace(configs.TINY_VAE, mid_block_add_attention=False, use_quant_conv=False,
                           use_post_quant_conv=False, latent_channels=3)
CONFIGS = {"tiny": TINY, "bare": BARE}


def _param_shapes(config):
    model = AutoencoderKL(config)
    return jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32))["params"]


def _keys(shapes):
    return {keymap.torch_key(path) for path in traverse_util.flatten_dict(shapes)}


@functools.lru_cache(maxsize=None)
def _models(name):
    """(torch model with perturbed weights, sdjax model, its params) for CONFIGS[name]."""
    return reference_pair(TorchVAE, AutoencoderKL, CONFIGS[name], _param_shapes(CONFIGS[name]))


def _images(batch, hw, seed=0):
    return np.random.RandomState(seed).uniform(-1, 1, (batch, *hw, 3)).astype(np.float32)


@pytest.mark.parametrize("name", CONFIGS)
def test_parameter_names_match_diffusers(name):
    with torch.device("meta"):
        expected = set(TorchVAE(**CONFIGS[name].to_dict()).state_dict())
    assert _keys(_param_shapes(CONFIGS[name])) == expected


def test_sd_vae_preset_matches_diffusers():
    shapes = _param_shapes(configs.SD_VAE)
    with torch.device("meta"):
        torch_model = TorchVAE(**configs.SD_VAE.to_dict())
    assert _keys(shapes) == set(torch_model.state_dict())
    count = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    assert count == sum(p.numel() for p in torch_model.parameters()) == 83_653_863


@pytest.mark.parametrize("name,batch,hw", [("tiny", 2, (32, 48)), ("bare", 1, (24, 40))])
def test_encode_decode_match_diffusers(name, batch, hw):
    torch_model, model, params = _models(name)
    images = _images(batch, hw)
    posterior = jax.jit(functools.partial(model.apply, method=AutoencoderKL.encode))({"params": params}, images)
    with torch.no_grad():
        torch_posterior = torch_model.encode(torch.from_numpy(nchw(images))).latent_dist
        latents = torch_posterior.mean * 1.5  # decode something other than the exact mean as well
        decoded = torch_model.decode(latents).sample
    mean_err = errors(posterior.mean, nhwc(torch_posterior.mean))
    logvar_err = errors(posterior.logvar, nhwc(torch_posterior.logvar))
    out = jax.jit(functools.partial(model.apply, method=AutoencoderKL.decode))({"params": params}, nhwc(latents))
    decode_err = errors(out, nhwc(decoded))
    print(f"\nVAE {name}: mean {mean_err}, logvar {logvar_err}, decode {decode_err} (relative L2, max abs)")
    factor = 2 ** (len(model.config.block_out_channels) - 1)
    assert posterior.mean.shape == (batch, hw[0] // factor, hw[1] // factor, model.config.latent_channels)
    assert out.shape == images.shape
    assert mean_err[0] <= TOL and logvar_err[0] <= TOL and decode_err[0] <= TOL


def test_forward_is_decode_of_posterior_mode():
    torch_model, model, params = _models("bare")
    images = _images(1, (16, 16), seed=1)
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(nchw(images))).sample  # diffusers' default: sample_posterior=False
    assert errors(jax.jit(model.apply)({"params": params}, images), nhwc(ref))[0] <= TOL


def test_bfloat16_compute_stays_close_to_float32_torch():
    torch_model, model, params = _models("bare")
    images = _images(1, (16, 16), seed=1)
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(nchw(images))).sample
    out = jax.jit(AutoencoderKL(model.config, dtype=jnp.bfloat16).apply)({"params": params}, images)
    assert out.dtype == jnp.bfloat16
    assert errors(out.astype(jnp.float32), nhwc(ref))[0] < 6e-2  # seen: 3.2e-2


def test_posterior_clips_logvar_and_samples_with_its_std():
    rng = np.random.RandomState(0)
    moments = rng.randn(2, 3, 5, 8).astype(np.float32) * 40  # many logvars outside [-30, 20]
    ours = DiagonalGaussian.from_moments(moments)
    ref = DiagonalGaussianDistribution(torch.from_numpy(nchw(moments)))
    np.testing.assert_array_equal(np.asarray(ours.mean), nhwc(ref.mean))
    np.testing.assert_array_equal(np.asarray(ours.logvar), nhwc(ref.logvar))
    np.testing.assert_allclose(np.asarray(ours.std), nhwc(ref.std), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ours.kl()), ref.kl().numpy(), rtol=1e-5)
    key = jax.random.key(7)
    eps = jax.random.normal(key, ours.mean.shape)
    np.testing.assert_allclose(np.asarray(ours.sample(key)), nhwc(ref.mean) + nhwc(ref.std) * np.asarray(eps),
                               rtol=1e-6)
    assert ours.mode() is ours.mean


@pytest.mark.parametrize("scale,shift", [(0.18215, None), (1.5305, 0.0609)])
def test_latent_scaling(scale, shift):
    config = dataclasses.replace(configs.SD_VAE, scaling_factor=scale, shift_factor=shift)
    z = np.random.RandomState(0).randn(2, 4, 4, 4).astype(np.float32)
    expected = (z - (shift or 0.0)) * scale  # what diffusers' pipelines feed the diffusion model
    np.testing.assert_allclose(np.asarray(scale_latents(z, config)), expected, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(unscale_latents(expected, config)), z, rtol=1e-5, atol=1e-6)
