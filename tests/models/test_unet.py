"""UNet2DConditionModel against diffusers' PyTorch model: parameter names, counts and float32 outputs."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from flax import traverse_util

from sdjax.errors import ConfigError, InvalidArgumentError
from sdjax.models import configs
from sdjax.models.unet import UNet2DConditionModel
from sdjax.weights import keymap
from tests.models import errors, nchw, nhwc, reference_pair

TOL = 1e-5
SD1_LIKE = configs.TINY_UNET  # attention_head_dim int, conv projections
SD2_LIKE = configs.UNetConfig(  # per-block heads, linear projections, upcast, per-block layer counts
    block_out_channels=(32, 64), layers_per_block=(1, 2), transformer_layers_per_block=(2, 1), norm_num_groups=16,
    cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
# Three levels with odd latent sizes exercise the up path's forced output size; no mid block.
ODD_NO_MID = configs.UNetConfig(
    block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
    attention_head_dim=2, mid_block_type=None, freq_shift=1, flip_sin_to_cos=False,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"))
# One level, no downsampling: the smallest U-Net whose attention sees many tokens.
ONE_LEVEL = configs.UNetConfig(
    block_out_channels=(32,), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4,
    down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",))
# SDXL's layout: no attention at the top level, several transformer layers below, added text_time embedding
# (pooled text 20 + 6 time ids x 8 = 68 inputs to add_embedding).
SDXL_LIKE = configs.UNetConfig(
    block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8, cross_attention_dim=24,
    transformer_layers_per_block=(1, 2, 3), attention_head_dim=(1, 2, 4), use_linear_projection=True,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=68)
CONFIGS = {"sd1_like": SD1_LIKE, "sd2_like": SD2_LIKE, "odd_no_mid": ODD_NO_MID, "one_level": ONE_LEVEL,
           "sdxl_like": SDXL_LIKE}


def _spec(shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def _param_shapes(config, latent_hw=(16, 16)):
    model = UNet2DConditionModel(config)
    return jax.eval_shape(model.init, jax.random.key(0), _spec((1, *latent_hw, config.in_channels)), _spec((1,)),
                          _spec((1, 7, config.cross_attention_dim)), **_added_specs(config))["params"]


def _added_specs(config) -> dict:
    if config.addition_embed_type is None:
        return {}
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    return {"text_embeds": _spec((1, pooled)), "time_ids": _spec((1, 6))}


def _keys(shapes):
    return {keymap.torch_key(path) for path in traverse_util.flatten_dict(shapes)}


def _count(shapes):
    return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))


@functools.lru_cache(maxsize=None)
def _models(name):
    """(torch model with perturbed weights, sdjax model, its params) for CONFIGS[name]."""
    return reference_pair(TorchUNet, UNet2DConditionModel, CONFIGS[name], _param_shapes(CONFIGS[name]))


def _inputs(config, batch, hw, seed=0):
    rng = np.random.RandomState(seed)
    sample = rng.randn(batch, *hw, config.in_channels).astype(np.float32)
    context = rng.randn(batch, 7, config.cross_attention_dim).astype(np.float32)
    return sample, context


def _torch_unet(torch_model, sample, t, context, **kwargs):
    with torch.no_grad():
        return nhwc(torch_model(torch.from_numpy(nchw(sample)), torch.as_tensor(t), torch.from_numpy(context),
                                **kwargs).sample)


@pytest.mark.parametrize("name", CONFIGS)
def test_parameter_names_match_diffusers(name):
    config = CONFIGS[name]
    with torch.device("meta"):
        expected = set(TorchUNet(**config.to_dict()).state_dict())
    assert _keys(_param_shapes(config)) == expected


@pytest.mark.parametrize("config,count", [(configs.SD15_UNET, 859_520_964), (configs.SD21_UNET, None),
                                          (configs.SDXL_UNET, 2_567_463_684)], ids=["sd15", "sd21", "sdxl"])
def test_real_presets_match_diffusers(config, count):
    shapes = _param_shapes(config, (64, 64))
    with torch.device("meta"):
        torch_model = TorchUNet(**config.to_dict())
    assert _keys(shapes) == set(torch_model.state_dict())
    assert _count(shapes) == sum(p.numel() for p in torch_model.parameters())
    if count is not None:
        assert _count(shapes) == count


@pytest.mark.parametrize("name,batch,hw,timesteps", [
    ("sd1_like", 2, (16, 24), np.array([999.0, 17.0], np.float32)),  # (B,) timesteps, different values
    ("sd2_like", 3, (24, 16), np.array([1, 500, 980], np.int64)),     # integer timesteps
    ("odd_no_mid", 2, (13, 18), np.float32(640.0)),                   # scalar timestep, broadcast
])
def test_unet_matches_diffusers(name, batch, hw, timesteps):
    torch_model, model, params = _models(name)
    sample, context = _inputs(model.config, batch, hw)
    out = jax.jit(model.apply)({"params": params}, sample, timesteps, context)
    ref = _torch_unet(torch_model, sample, timesteps, context)
    rel, max_abs = errors(out, ref)
    print(f"\nU-Net {name} {batch}x{hw} t={timesteps}: relative L2 {rel:.3g}, max abs {max_abs:.3g}")
    assert out.shape == (batch, *hw, model.config.out_channels)
    assert rel <= TOL


def test_sdxl_added_conditioning_matches_diffusers():
    torch_model, model, params = _models("sdxl_like")
    sample, context = _inputs(model.config, 2, (16, 8))
    rng = np.random.RandomState(4)
    text_embeds = rng.randn(2, 20).astype(np.float32)
    time_ids = np.array([[64, 32, 0, 0, 64, 32], [96, 48, 8, 4, 64, 32]], np.float32)  # sizes and crop corner
    t = np.array([3.0, 700.0], np.float32)
    out = jax.jit(model.apply)({"params": params}, sample, t, context, text_embeds=text_embeds, time_ids=time_ids)
    added = {"text_embeds": torch.from_numpy(text_embeds), "time_ids": torch.from_numpy(time_ids)}
    rel, max_abs = errors(out, _torch_unet(torch_model, sample, t, context, added_cond_kwargs=added))
    print(f"\nU-Net sdxl_like: relative L2 {rel:.3g}, max abs {max_abs:.3g}")
    assert rel <= TOL
    other = jax.jit(model.apply)({"params": params}, sample, t, context, text_embeds=text_embeds,
                                 time_ids=time_ids[::-1])
    assert errors(other, out)[0] > 1e-3  # the time ids are really read
    with pytest.raises(InvalidArgumentError, match="needs text_embeds .* and time_ids"):
        model.apply({"params": params}, sample, t, context)


def test_controlnet_residuals_match_diffusers():
    torch_model, model, params = _models("one_level")
    sample, context = _inputs(model.config, 2, (8, 8), seed=1)
    rng = np.random.RandomState(2)
    down = [rng.randn(2, 8, 8, 32).astype(np.float32) for _ in range(2)]  # skips: conv_in and one resnet
    mid = rng.randn(2, 8, 8, 32).astype(np.float32)
    out = jax.jit(model.apply)({"params": params}, sample, np.float32(10.0), context, down, mid)
    ref = _torch_unet(torch_model, sample, np.float32(10.0), context,
                      down_block_additional_residuals=tuple(torch.from_numpy(nchw(r)) for r in down),
                      mid_block_additional_residual=torch.from_numpy(nchw(mid)))
    assert errors(out, ref)[0] <= TOL


def test_bfloat16_compute_stays_close_to_float32_torch():
    torch_model, model, params = _models("one_level")
    sample, context = _inputs(model.config, 2, (8, 8))
    t = np.array([10.0, 900.0], np.float32)
    out = jax.jit(UNet2DConditionModel(model.config, dtype=jnp.bfloat16).apply)({"params": params}, sample, t, context)
    assert out.dtype == jnp.bfloat16
    assert errors(out.astype(jnp.float32), _torch_unet(torch_model, sample, t, context))[0] < 3e-2  # seen: 1.2e-2


def test_attention_implementations_agree():
    # 32x64 latents: 2048 tokens, so "chunked" really splits the queries (chunks of 1024).
    _, model, params = _models("one_level")
    sample, context = _inputs(model.config, 1, (32, 64), seed=3)
    outputs = {}
    for impl in ("einsum", "chunked", "blocked", "xla"):
        variant = UNet2DConditionModel(model.config, attention_implementation=impl)
        outputs[impl] = jax.jit(variant.apply)({"params": params}, sample, np.float32(321.0), context)
    for impl in ("chunked", "blocked", "xla"):
        rel, max_abs = errors(outputs[impl], outputs["einsum"])
        assert rel <= TOL, (impl, rel, max_abs)


def test_unsupported_block_type_is_a_config_error():
    config = dataclasses.replace(SD1_LIKE, down_block_types=("SimpleCrossAttnDownBlock2D", "DownBlock2D"))
    with pytest.raises(ConfigError, match="SimpleCrossAttnDownBlock2D"):
        _param_shapes(config)


@pytest.mark.slow
def test_remat_recomputes_blocks_without_changing_params_or_outputs():
    config = CONFIGS["odd_no_mid"]  # odd sizes: the up blocks' static output size goes through remat too
    x, t = jnp.ones((1, 13, 10, 4)), jnp.array([3])
    context = jnp.ones((1, 5, config.cross_attention_dim))
    plain, remat = UNet2DConditionModel(config), UNet2DConditionModel(config, remat=True)
    # The same parameters (names, shapes, dtypes) with or without remat. Their values are drawn here rather than by
    # plain.init: compiling or running flax's initialisers op by op takes ~20 s, the model itself ~2 s.
    shapes = jax.eval_shape(plain.init, jax.random.key(0), x, t, context)
    assert jax.eval_shape(remat.init, jax.random.key(0), x, t, context) == shapes
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype), shapes)
    np.testing.assert_allclose(jax.jit(remat.apply)(params, x, t, context), jax.jit(plain.apply)(params, x, t, context),
                               rtol=1e-6, atol=1e-6)
    # jax.checkpoint shows up as the remat primitive in the traced program
    assert "remat" in str(jax.make_jaxpr(lambda p: remat.apply(p, x, t, context))(params))
    assert "remat" not in str(jax.make_jaxpr(lambda p: plain.apply(p, x, t, context))(params))


@pytest.mark.parametrize("key, value, message", [
    ("block_out_channels", "abc", "'block_out_channels' = 'abc' should be a list of integers"),
    ("layers_per_block", [1, "x"], "= \\[1, .x.\\] should be an integer"),
    ("norm_eps", "small", "'norm_eps' = 'small' should be a number"),
    ("upcast_attention", 1, "should be true or false"),
    ("norm_num_groups", 7, r"block_out_channels \[.*\] are not multiples of norm_num_groups \(7\)"),
])
def test_config_values_of_the_wrong_type_or_shape_name_the_file_and_key(key, value, message):
    from sdjax.models.configs import UNetConfig, VAEConfig
    for config_class in (UNetConfig, VAEConfig):
        defaults = config_class().to_dict()
        if key in defaults:
            with pytest.raises(ConfigError, match=f"unet/config.json: .*{message}"):
                config_class.from_dict({**defaults, key: value}, source="unet/config.json")
