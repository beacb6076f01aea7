"""Parity of sdjax.models.layers with the diffusers (PyTorch) modules they mirror, in float32."""
import functools

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention import BasicTransformerBlock as TorchBasicTransformerBlock
from diffusers.models.attention import FeedForward as TorchFeedForward
from diffusers.models.attention_processor import Attention as TorchAttention
from diffusers.models.downsampling import Downsample2D as TorchDownsample2D
from diffusers.models.embeddings import TimestepEmbedding as TorchTimestepEmbedding
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.resnet import ResnetBlock2D as TorchResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel as TorchTransformer2DModel
from diffusers.models.upsampling import Upsample2D as TorchUpsample2D

from sdjax.models import layers
from sdjax.weights import keymap
from tests.models import errors, nchw, nhwc, perturb_, torch_state_dict

TOL = 1e-5
# diffusers warns about its own deprecated output class when Transformer2DModel runs.
pytestmark = pytest.mark.filterwarnings("ignore:.*Transformer2DModelOutput:FutureWarning")


def _port(flax_module, torch_module, *inputs, **static):
    """Flax params for `flax_module` taken from the perturbed `torch_module` (key sets must match exactly)."""
    perturb_(torch_module)
    shapes = jax.eval_shape(functools.partial(flax_module.init, **static), jax.random.key(0), *inputs)["params"]
    return keymap.params_from_state_dict(torch_state_dict(torch_module), shapes, source="test")


def _check(actual, expected, tol=TOL):
    rel, max_abs = errors(actual, expected)
    assert rel <= tol, f"relative L2 {rel:.3g} (max abs {max_abs:.3g})"


def _images(shape, seed=0):
    return np.random.RandomState(seed).randn(*shape).astype(np.float32)


@pytest.mark.parametrize("dim,flip,shift", [(32, True, 0), (320, True, 0), (33, False, 1), (16, False, 1)])
def test_timestep_embedding(dim, flip, shift):
    t = np.array([0.0, 1.0, 17.0, 250.5, 999.0], np.float32)
    ours = layers.timestep_embedding(t, dim, flip_sin_to_cos=flip, freq_shift=shift)
    ref = get_timestep_embedding(torch.from_numpy(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    assert ours.shape == ref.shape and ours.dtype == np.float32
    # sdjax's frequency table is correctly rounded; PyTorch's float32 exp is off by one ulp on a couple of the
    # 160 frequencies of SD's 320-dim embedding, which t = 999 turns into ~6e-5 on those entries.
    rel, max_abs = errors(ours, ref.numpy())
    assert rel <= TOL and max_abs <= 1e-4, (rel, max_abs)
    np.testing.assert_allclose(np.asarray(ours)[:3], ref.numpy()[:3], rtol=0, atol=1e-6)  # small t: ulp-level


def test_timestep_mlp():
    torch_mod = TorchTimestepEmbedding(32, 128)
    x = _images((3, 32))
    mod = layers.TimestepEmbedding(128)
    params = _port(mod, torch_mod, x)
    with torch.no_grad():
        ref = torch_mod(torch.from_numpy(x)).numpy()
    _check(mod.apply({"params": params}, x), ref)


@pytest.mark.parametrize("in_ch,out_ch,with_temb,eps,scale", [(32, 64, True, 1e-5, 1.0), (32, 32, False, 1e-6, 2.0)])
def test_resnet_block(in_ch, out_ch, with_temb, eps, scale):
    torch_mod = TorchResnetBlock2D(in_channels=in_ch, out_channels=out_ch, temb_channels=48 if with_temb else None,
                                   groups=16, eps=eps, output_scale_factor=scale)
    x = _images((2, 6, 10, in_ch))
    temb = _images((2, 48), seed=1) if with_temb else None
    mod = layers.ResnetBlock2D(out_ch, groups=16, eps=eps, output_scale_factor=scale)
    params = _port(mod, torch_mod, x, temb)
    with torch.no_grad():
        ref = torch_mod(torch.from_numpy(nchw(x)), None if temb is None else torch.from_numpy(temb))
    _check(mod.apply({"params": params}, x, temb), nhwc(ref))


@pytest.mark.parametrize("padding,size", [(0, (8, 12)), (0, (7, 9)), (1, (8, 12)), (1, (7, 9))])
def test_downsample(padding, size):
    torch_mod = TorchDownsample2D(16, use_conv=True, out_channels=16, padding=padding, name="op")
    x = _images((2, *size, 16))
    mod = layers.Downsample2D(16, padding=padding)
    params = _port(mod, torch_mod, x)
    with torch.no_grad():
        ref = torch_mod(torch.from_numpy(nchw(x)))
    _check(mod.apply({"params": params}, x), nhwc(ref))


@pytest.mark.parametrize("in_size,out_size", [((4, 6), None), ((4, 6), (8, 12)), ((4, 5), (7, 9)),
                                              ((7, 3), (13, 5)), ((3, 4), (5, 11))])
def test_upsample_nearest_index_rule(in_size, out_size):
    x = _images((1, *in_size, 2))
    ours = layers.upsample_nearest(x, out_size)
    t = torch.from_numpy(nchw(x))
    ref = F.interpolate(t, scale_factor=2.0, mode="nearest") if out_size is None else \
        F.interpolate(t, size=out_size, mode="nearest")
    np.testing.assert_array_equal(np.asarray(ours), nhwc(ref))


@pytest.mark.parametrize("out_size", [None, (9, 11)])
def test_upsample(out_size):
    torch_mod = TorchUpsample2D(16, use_conv=True, out_channels=16)
    x = _images((2, 5, 6, 16))
    mod = layers.Upsample2D(16)
    params = _port(mod, torch_mod, x, output_size=out_size)
    with torch.no_grad():
        ref = torch_mod(torch.from_numpy(nchw(x)), out_size)
    _check(mod.apply({"params": params}, x, out_size), nhwc(ref))


def test_feed_forward_geglu():
    torch_mod = TorchFeedForward(24, activation_fn="geglu")
    x = _images((2, 10, 24)) * 3  # wide range so a tanh-approximate GELU would show
    mod = layers.FeedForward()
    params = _port(mod, torch_mod, x)
    with torch.no_grad():
        ref = torch_mod(torch.from_numpy(x)).numpy()
    _check(mod.apply({"params": params}, x), ref, tol=1e-6)


def test_cross_attention():
    torch_mod = TorchAttention(query_dim=32, cross_attention_dim=24, heads=4, dim_head=8)
    x, ctx = _images((2, 12, 32)), _images((2, 7, 24), seed=1)
    mod = layers.Attention(4, 8)
    params = _port(mod, torch_mod, x, ctx)
    with torch.no_grad():
        ref = torch_mod(torch.from_numpy(x), torch.from_numpy(ctx)).numpy()
    _check(mod.apply({"params": params}, x, ctx), ref)


def test_vae_spatial_attention():
    # diffusers' VAE mid-block attention: one head over all pixels, GroupNorm first, residual added.
    torch_mod = TorchAttention(32, heads=1, dim_head=32, eps=1e-6, norm_num_groups=8, residual_connection=True,
                               bias=True, upcast_softmax=True, _from_deprecated_attn_block=True)
    x = _images((2, 5, 7, 32))
    mod = layers.Attention(1, 32, qkv_bias=True, upcast=True, norm_groups=8, norm_eps=1e-6, residual=True)
    params = _port(mod, torch_mod, x)
    with torch.no_grad():
        ref = torch_mod(torch.from_numpy(nchw(x)))
    _check(mod.apply({"params": params}, x), nhwc(ref))


def test_basic_transformer_block():
    torch_mod = TorchBasicTransformerBlock(32, 4, 8, cross_attention_dim=24)
    x, ctx = _images((2, 12, 32)), _images((2, 7, 24), seed=1)
    mod = layers.BasicTransformerBlock(4, 8)
    params = _port(mod, torch_mod, x, ctx)
    with torch.no_grad():
        ref = torch_mod(torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(ctx)).numpy()
    _check(mod.apply({"params": params}, x, ctx), ref)


@pytest.mark.parametrize("linear,layers_n", [(False, 1), (True, 2)])
def test_transformer_2d(linear, layers_n):
    torch_mod = TorchTransformer2DModel(num_attention_heads=4, attention_head_dim=8, in_channels=32,
                                        num_layers=layers_n, cross_attention_dim=24, norm_num_groups=8,
                                        use_linear_projection=linear, upcast_attention=linear)
    x, ctx = _images((2, 5, 6, 32)), _images((2, 7, 24), seed=1)
    mod = layers.Transformer2DModel(4, 8, num_layers=layers_n, groups=8, use_linear_projection=linear,
                                    upcast_attention=linear)
    params = _port(mod, torch_mod, x, ctx)
    with torch.no_grad():
        ref = torch_mod(torch.from_numpy(nchw(x)), encoder_hidden_states=torch.from_numpy(ctx)).sample
    _check(mod.apply({"params": params}, x, ctx), nhwc(ref))
