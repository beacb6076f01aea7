"""ControlNetModel against diffusers' PyTorch ControlNet: names, folder loading, residuals (SD 1.x / 2.x and SDXL's,
which also read the pooled text embedding and the time ids) and the U-Net they drive.

Every torch model is perturbed (no zero conv stays zero), saved with `save_pretrained` and read back with
sdjax's loader, so the tests cover the files users download, not only the module.
"""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel as TorchControlNet
from diffusers import UNet2DConditionModel as TorchUNet
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel as TorchMultiControlNet
from flax import traverse_util

from sdjax.errors import ConfigError, InvalidArgumentError, WeightsError
from sdjax.models import configs
from sdjax.models.controlnet import (SD15_CONTROLNET, SD21_CONTROLNET, SDXL_CONTROLNET, ControlNetConfig,
                                     ControlNetModel, config_for_unet, sum_residuals)
from sdjax.models.components import COMPONENTS
from sdjax.models.unet import UNet2DConditionModel
from sdjax.weights import keymap, tensors
from sdjax.weights.controlnet_folder import load_controlnet
from tests.models import errors, nchw, nhwc, perturb_, torch_state_dict

TOL = 1e-5
# Drives configs.TINY_UNET; control images at 2x the latent size.
SD1_LIKE = config_for_unet(configs.TINY_UNET, conditioning_embedding_out_channels=(16, 32))
SD2_LIKE = ControlNetConfig(  # per-block heads, linear projections, upcast, BGR control images at 4x
    block_out_channels=(32, 64), layers_per_block=1, transformer_layers_per_block=(2, 1), norm_num_groups=16,
    cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    conditioning_embedding_out_channels=(8, 16, 32), controlnet_conditioning_channel_order="bgr")
SDXL_LIKE = ControlNetConfig(  # SDXL's layout (a plain first block, a list of transformer layers), its text_time
    # added embedding of a pooled embedding of 16 and 6 time ids of 8 each
    block_out_channels=(32, 64), layers_per_block=1, transformer_layers_per_block=(1, 2), norm_num_groups=16,
    cross_attention_dim=40, attention_head_dim=(2, 4), use_linear_projection=True,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), addition_embed_type="text_time",
    addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8,
    conditioning_embedding_out_channels=(16, 32))
CONFIGS = {"sd1_like": SD1_LIKE, "sd2_like": SD2_LIKE, "sdxl_like": SDXL_LIKE}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """saved(name, seed) -> (perturbed torch ControlNet, folder written by its save_pretrained)."""
    cache = {}

    def get(name, seed=0):
        if (name, seed) not in cache:
            torch.manual_seed(0)
            model = perturb_(TorchControlNet(**CONFIGS[name].to_dict()), seed=seed)
            folder = tmp_path_factory.mktemp(f"controlnet_{name}_{seed}")
            model.save_pretrained(folder, safe_serialization=True)
            cache[name, seed] = model, folder
        return cache[name, seed]
    return get


def _inputs(config, batch, hw, seed=0):
    """(latents, text embeddings, control image in [0, 1]) as NHWC numpy."""
    rng = np.random.RandomState(seed)
    side = config.conditioning_downscale_factor
    sample = rng.randn(batch, *hw, config.in_channels).astype(np.float32)
    context = rng.randn(batch, 7, config.cross_attention_dim).astype(np.float32)
    cond = rng.rand(batch, hw[0] * side, hw[1] * side, config.conditioning_channels).astype(np.float32)
    return sample, context, cond


def _added_inputs(config, batch) -> dict:
    """An SDXL ControlNet's text_embeds (B, P) and time_ids (B, 6) (sizes and crop corners); {} for SD 1.x / 2.x."""
    if config.addition_embed_type is None:
        return {}
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    rng = np.random.RandomState(100)
    return {"text_embeds": rng.randn(batch, pooled).astype(np.float32),
            "time_ids": rng.choice([0.0, 8.0, 32.0, 512.0, 768.0, 1024.0], (batch, 6)).astype(np.float32)}


def _torch_residuals(torch_model, sample, t, context, cond, scale, guess_mode=False, added=None):
    """diffusers' residuals as NHWC numpy; `torch_model` may be a MultiControlNetModel (then cond, scale: lists);
    added: SDXL's text_embeds and time_ids."""
    tensor = lambda x: torch.from_numpy(nchw(x))  # noqa: E731
    cond = [tensor(c) for c in cond] if isinstance(cond, list) else tensor(cond)
    with torch.no_grad():
        down, mid = torch_model(tensor(sample), torch.as_tensor(t), torch.from_numpy(context), cond,
                                conditioning_scale=scale, guess_mode=guess_mode, return_dict=False,
                                added_cond_kwargs={k: torch.from_numpy(v) for k, v in (added or {}).items()})
    return [nhwc(r) for r in down], nhwc(mid)


# `model.apply`, compiled once per (module, shapes, guess_mode): equal modules share a compilation across tests.
_apply = jax.jit(lambda model, params, *args, **kwargs: model.apply({"params": params}, *args, **kwargs),
                 static_argnums=0, static_argnames=("guess_mode",))


def _worst_error(actual, expected):
    """(largest relative L2 error, largest max-abs error) over all residuals."""
    (down, mid), (ref_down, ref_mid) = actual, expected
    assert len(down) == len(ref_down)
    pairs = [errors(a, e) for a, e in zip([*down, mid], [*ref_down, ref_mid])]
    return max(p[0] for p in pairs), max(p[1] for p in pairs)


def _keys(shapes):
    return {keymap.torch_key(path) for path in traverse_util.flatten_dict(shapes)}


@pytest.mark.parametrize("config", [SD1_LIKE, SD2_LIKE, SDXL_LIKE, SD15_CONTROLNET, SD21_CONTROLNET, SDXL_CONTROLNET],
                         ids=["sd1_like", "sd2_like", "sdxl_like", "sd15", "sd21", "sdxl"])
def test_parameter_names_and_count_match_diffusers(config):
    with torch.device("meta"):
        torch_model = TorchControlNet(**config.to_dict())
    shapes = COMPONENTS["controlnet"].param_shapes(config)
    assert _keys(shapes) == set(torch_model.state_dict())
    assert sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes)) == sum(
        p.numel() for p in torch_model.parameters())


@pytest.mark.parametrize("name,batch,hw,timesteps", [
    ("sd1_like", 2, (8, 12), np.array([999.0, 17.0], np.float32)),
    ("sd2_like", 3, (12, 8), np.array([1, 500, 980], np.int64)),
    ("sdxl_like", 2, (8, 8), np.array([981, 3], np.int64)),
])
def test_residuals_match_diffusers(saved, name, batch, hw, timesteps):
    torch_model, folder = saved(name)
    config, params = load_controlnet(folder)
    assert config == CONFIGS[name]
    sample, context, cond = _inputs(config, batch, hw)
    added = _added_inputs(config, batch)  # SDXL's pooled embedding and time ids
    out = _apply(ControlNetModel(config), params, sample, timesteps, context, cond, jnp.float32(0.5), **added)
    ref = _torch_residuals(torch_model, sample, timesteps, context, cond, 0.5, added=added)
    rel, max_abs = _worst_error(out, ref)
    print(f"\nControlNet {name} {batch}x{hw} scale 0.5: worst relative L2 {rel:.3g}, max abs {max_abs:.3g}")
    assert rel <= TOL


def test_guess_mode_and_global_pooling_match_diffusers(saved):
    torch_model, folder = saved("sd1_like")
    config, params = load_controlnet(folder)
    sample, context, cond = _inputs(config, 2, (8, 8), seed=1)
    pooled_torch = TorchControlNet.from_config({**torch_model.config, "global_pool_conditions": True}).eval()
    pooled_torch.load_state_dict(torch_model.state_dict())
    pooled_config = dataclasses.replace(config, global_pool_conditions=True)
    for model, reference, guess_mode in ((torch_model, config, True), (pooled_torch, pooled_config, False)):
        out = _apply(ControlNetModel(reference), params, sample, np.float32(321.0), context, cond,
                     jnp.float32(0.7), guess_mode=guess_mode)
        ref = _torch_residuals(model, sample, np.float32(321.0), context, cond, 0.7, guess_mode=guess_mode)
        rel, max_abs = _worst_error(out, ref)
        print(f"\nguess_mode={guess_mode} global_pool={reference.global_pool_conditions}: "
              f"worst relative L2 {rel:.3g}, max abs {max_abs:.3g}")
        assert rel <= TOL


@pytest.mark.parametrize("seeds,scales", [((0,), (0.5,)), ((0, 1), (0.8, 0.4))], ids=["single", "multi"])
def test_unet_driven_by_controlnets_matches_diffusers(saved, seeds, scales):
    torch.manual_seed(0)
    torch_unet = perturb_(TorchUNet(**configs.TINY_UNET.to_dict()), seed=5)
    unet = UNet2DConditionModel(configs.TINY_UNET)
    unet_params = keymap.params_from_state_dict(torch_state_dict(torch_unet), jax.eval_shape(
        unet.init, jax.random.key(0), np.zeros((1, 8, 8, 4), np.float32), np.zeros((1,), np.float32),
        np.zeros((1, 7, 32), np.float32))["params"], source="test")
    nets = [saved("sd1_like", seed) for seed in seeds]
    sample, context, _ = _inputs(SD1_LIKE, 2, (8, 12))
    conds = [_inputs(SD1_LIKE, 2, (8, 12), seed=10 + seed)[2] for seed in seeds]
    t = np.array([700.0, 40.0], np.float32)

    outputs = []
    for (_, folder), cond, scale in zip(nets, conds, scales):
        config, params = load_controlnet(folder)
        outputs.append(_apply(ControlNetModel(config), params, sample, t, context, cond, jnp.float32(scale)))
    down, mid = sum_residuals(outputs)
    out = _apply(unet, unet_params, sample, t, context, down, mid)

    torch_nets = [model for model, _ in nets]
    if len(torch_nets) == 1:
        ref_down, ref_mid = _torch_residuals(torch_nets[0], sample, t, context, conds[0], scales[0])
    else:
        ref_down, ref_mid = _torch_residuals(TorchMultiControlNet(torch_nets), sample, t, context, conds,
                                             list(scales))
    with torch.no_grad():
        ref = nhwc(torch_unet(torch.from_numpy(nchw(sample)), torch.from_numpy(t), torch.from_numpy(context),
                              down_block_additional_residuals=[torch.from_numpy(nchw(r)) for r in ref_down],
                              mid_block_additional_residual=torch.from_numpy(nchw(ref_mid))).sample)
    rel, max_abs = errors(out, ref)
    print(f"\nU-Net + {len(seeds)} ControlNet(s): relative L2 {rel:.3g}, max abs {max_abs:.3g}")
    assert rel <= TOL


def test_control_image_of_wrong_size_names_the_expected_size():
    model = ControlNetModel(SD2_LIKE)  # factor 4: latents 8x12 need a 32x48 control image
    sample, context, cond = _inputs(SD2_LIKE, 1, (8, 12))
    with pytest.raises(InvalidArgumentError, match="32x48"):
        jax.eval_shape(model.init, jax.random.key(0), sample, np.zeros(1), context, cond[:, :, :40])


def test_missing_weight_key_names_the_file_and_key(saved, tmp_path):
    _, folder = saved("sd1_like")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    weights = tensors.read_safetensors(folder / "diffusion_pytorch_model.safetensors")
    del weights["controlnet_mid_block.weight"]
    tensors.write_safetensors(tmp_path / "diffusion_pytorch_model.safetensors", weights)
    with pytest.raises(WeightsError, match=r"diffusion_pytorch_model\.safetensors.*controlnet_mid_block\.weight"):
        load_controlnet(tmp_path)


def test_config_for_other_weights_is_a_weights_error(saved, tmp_path):
    _, folder = saved("sd1_like")
    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "conditioning_embedding_out_channels": [8, 32]}))
    (tmp_path / "diffusion_pytorch_model.safetensors").symlink_to(folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(WeightsError, match=r"safetensors .*wrong shapes: .*controlnet_cond_embedding\.conv_in\.weight"):
        load_controlnet(tmp_path)


@pytest.mark.parametrize("key,value,message", [
    ("conditioning_embeding_out_channels", [16, 32], "unknown key.*Did you mean 'conditioning_embedding_out"),
    ("up_block_types", ["UpBlock2D"] * 4, "up_block_types"),
    ("mid_block_type", None, "always has a mid block"),
    ("controlnet_conditioning_channel_order", "rbg", "'rgb' or 'bgr'"),
    ("addition_embed_type", "text", "addition_embed_type 'text' is not supported"),
])
def test_unsupported_config_is_a_config_error(key, value, message):
    with pytest.raises(ConfigError, match=message):
        ControlNetConfig.from_dict({**SD15_CONTROLNET.to_dict(), key: value})
