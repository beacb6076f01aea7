"""`load_pipeline` on tiny diffusers folders: float32 parity of every contract method with diffusers /
transformers in torch, export round trips, and the errors bad folders give."""
import copy
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import sdjax
from sdjax.errors import ConfigError, InvalidArgumentError, MissingComponentError, OfflineError, WeightsError
from tests.models import errors, nchw, nhwc

PROMPTS = ["a photo of a cat", "an astronaut riding a horse on the moon, detailed oil painting", ""]


def assert_close(ours, reference, rel=1e-5):
    error, max_abs = errors(ours, reference)
    assert error < rel, f"relative L2 {error:.2e} (max-abs {max_abs:.2e}) exceeds {rel:.0e}"


def torch_nchw(array):
    return torch.from_numpy(nchw(np.asarray(array, np.float32)))


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def loaded(request):
    """(sdjax Pipeline, torch StableDiffusionPipeline, folder) for each tiny model kind."""
    folder, reference = request.getfixturevalue(f"{request.param}_folder")
    return sdjax.load_pipeline(folder), reference, folder


def test_encode_prompt_matches_transformers(loaded):
    pipeline, reference, _ = loaded
    ids = reference.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True,
                              return_tensors="pt").input_ids
    with torch.no_grad():
        outputs = reference.text_encoder(ids, output_hidden_states=True)
        # transformers 5 flattened CLIPTextModel; older versions keep the layers under `text_model`
        text_model = getattr(reference.text_encoder, "text_model", reference.text_encoder)
        penultimate = text_model.final_layer_norm(outputs.hidden_states[-2])
    assert_close(pipeline.encode_prompt(PROMPTS), outputs.last_hidden_state.numpy())
    assert_close(pipeline.encode_prompt(PROMPTS, clip_skip=1), penultimate.numpy())


def test_vae_encode_and_decode_match_diffusers(loaded):
    pipeline, reference, _ = loaded
    images = np.random.default_rng(0).integers(0, 256, size=(2, 32, 48, 3), dtype=np.uint8)
    vae = reference.vae
    with torch.no_grad():
        posterior = vae.encode(torch_nchw(images / 127.5 - 1.0)).latent_dist
        expected_latents = nhwc(posterior.mean) * vae.config.scaling_factor
    latents = pipeline.encode_image(images)
    assert latents.shape == (2, 16, 24, 4)  # the tiny VAE downsamples by 2
    assert_close(latents, expected_latents)

    with torch.no_grad():
        decoded = vae.decode(torch_nchw(expected_latents) / vae.config.scaling_factor).sample
    expected_images = reference.image_processor.postprocess(decoded, output_type="np")
    ours = pipeline.decode_latents(expected_latents)
    assert ours.dtype == np.uint8 and ours.shape == (2, 32, 48, 3)
    assert np.abs(ours.astype(int) - np.round(expected_images * 255).astype(int)).max() <= 1
    assert_close(pipeline._decode_fn(pipeline.params["vae"], jnp.asarray(expected_latents)),
                 nhwc(decoded))


def test_unet_output_matches_diffusers(loaded):
    pipeline, reference, _ = loaded
    rng = np.random.default_rng(1)
    latents = rng.normal(size=(3, 8, 12, 4)).astype(np.float32)  # non-square, batch of 3
    timesteps = np.array([999, 500, 1], np.int32)
    embeddings = rng.normal(size=(3, 77, 32)).astype(np.float32)
    with torch.no_grad():
        expected = reference.unet(torch_nchw(latents), torch.from_numpy(timesteps),
                                  torch.from_numpy(embeddings)).sample
    assert_close(pipeline.unet_output(latents, timesteps, embeddings), nhwc(expected))


def test_each_entry_point_compiles_once_per_shape(loaded):
    pipeline = loaded[0]
    compiled_before = pipeline._unet_fn._cache_size(), pipeline._text_fn._cache_size()
    latents = np.zeros((1, 8, 8, 4), np.float32)
    embeddings = np.zeros((1, 77, 32), np.float32)
    for t in (10, 20, 30):
        pipeline.unet_output(latents, np.array([t]), embeddings)
    pipeline.encode_prompt(["a cat"])
    pipeline.encode_prompt(["a dog"])
    assert pipeline._unet_fn._cache_size() == compiled_before[0] + 1
    assert pipeline._text_fn._cache_size() == compiled_before[1] + 1


def test_export_round_trip_is_exact_and_loads_in_diffusers(loaded, tmp_path):
    pipeline, reference, _ = loaded
    exported = tmp_path / "exported"
    pipeline.save_pretrained(exported)
    again = sdjax.load_pipeline(exported)
    for name, params in pipeline.params.items():
        for path, value in jax.tree_util.tree_leaves_with_path(params):
            other = again.params[name]
            for key in path:
                other = other[key.key]
            np.testing.assert_array_equal(np.asarray(other), np.asarray(value), err_msg=f"{name}{path}")

    from diffusers import StableDiffusionPipeline
    torch_again = StableDiffusionPipeline.from_pretrained(exported, safety_checker=None)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    embeddings = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        original = reference.unet(latents, torch.tensor([3, 700]), embeddings).sample
        reloaded = torch_again.unet(latents, torch.tensor([3, 700]), embeddings).sample
        np.testing.assert_array_equal(reloaded.numpy(), original.numpy())
        ids = reference.tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
        np.testing.assert_array_equal(torch_again.text_encoder(ids)[0].numpy(), reference.text_encoder(ids)[0].numpy())
        np.testing.assert_array_equal(torch_again.vae.decode(latents).sample.numpy(),
                                      reference.vae.decode(latents).sample.numpy())
    assert torch_again.scheduler.config.prediction_type == reference.scheduler.config.prediction_type


def test_half_precision_variant_and_bfloat16_params(sd1_folder, tmp_path):
    folder, reference = sd1_folder
    variant_folder = tmp_path / "fp16"
    copy.deepcopy(reference).to(torch.float16).save_pretrained(variant_folder, variant="fp16",
                                                               safe_serialization=True)
    assert (variant_folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    half = sdjax.load_pipeline(variant_folder, variant="fp16")
    full = sdjax.load_pipeline(folder)
    kernel = half.params["unet"]["conv_in"]["kernel"]
    assert kernel.dtype == jnp.float32
    np.testing.assert_allclose(kernel, full.params["unet"]["conv_in"]["kernel"], rtol=1e-3, atol=1e-4)
    bf16 = sdjax.load_pipeline(folder, dtype=jnp.bfloat16)
    assert bf16.params["vae"]["encoder"]["conv_in"]["kernel"].dtype == jnp.bfloat16
    assert bf16.encode_prompt(["a cat"]).dtype == jnp.bfloat16


def test_pytorch_bin_weights_load_like_safetensors(sd1_folder, tmp_path):
    folder, reference = sd1_folder
    bin_folder = tmp_path / "bin"
    reference.save_pretrained(bin_folder, safe_serialization=False)
    assert (bin_folder / "unet" / "diffusion_pytorch_model.bin").is_file()
    from_bin, from_safetensors = sdjax.load_pipeline(bin_folder), sdjax.load_pipeline(folder)
    np.testing.assert_array_equal(from_bin.params["unet"]["conv_out"]["kernel"],
                                  from_safetensors.params["unet"]["conv_out"]["kernel"])


# --- bad input ---------------------------------------------------------------------------------------------

@pytest.fixture
def broken_copy(sd1_folder, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(sd1_folder[0], copy)
    return copy


def rewrite_unet_weights(folder, change):
    from sdjax.weights import tensors
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = tensors.read_safetensors(path)
    change(state)
    tensors.write_safetensors(path, state)
    return path


def test_missing_component_folder(broken_copy):
    shutil.rmtree(broken_copy / "vae")
    with pytest.raises(MissingComponentError, match=r"component folder vae/ is missing"):
        sdjax.load_pipeline(broken_copy)


def test_not_a_pipeline_folder(tmp_path):
    with pytest.raises(MissingComponentError, match="model_index.json is missing"):
        sdjax.load_pipeline(tmp_path)


def test_missing_weight_key_names_file_and_key(broken_copy):
    path = rewrite_unet_weights(broken_copy, lambda state: state.pop("conv_in.bias"))
    with pytest.raises(WeightsError, match=rf"{path}.*missing keys: conv_in.bias"):
        sdjax.load_pipeline(broken_copy)


def test_unexpected_weight_key(broken_copy):
    rewrite_unet_weights(broken_copy, lambda state: state.update({"surprise.weight": np.zeros(2, np.float32)}))
    with pytest.raises(WeightsError, match=r"unexpected keys: surprise.weight"):
        sdjax.load_pipeline(broken_copy)


def test_wrong_tensor_shape(broken_copy):
    rewrite_unet_weights(broken_copy, lambda state: state.update({"conv_in.bias": np.zeros(31, np.float32)}))
    with pytest.raises(WeightsError, match=r"conv_in.bias: file has \(31,\), model expects \(32,\)"):
        sdjax.load_pipeline(broken_copy)


def test_truncated_safetensors(broken_copy):
    path = broken_copy / "vae" / "diffusion_pytorch_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(WeightsError, match=rf"{path}: tensor .* truncated"):
        sdjax.load_pipeline(broken_copy)


def test_unsupported_config_feature(broken_copy):
    import json
    config_path = broken_copy / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["class_embed_type"] = "timestep"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=rf"{config_path}: key 'class_embed_type' = 'timestep'"):
        sdjax.load_pipeline(broken_copy)


def test_pickle_weights_without_torch(sd1_folder, tmp_path, without_torch):
    folder = tmp_path / "bin"
    sd1_folder[1].save_pretrained(folder, safe_serialization=False)
    without_torch()
    with pytest.raises(WeightsError, match=r"diffusion_pytorch_model.bin is a PyTorch pickle and torch is not"):
        sdjax.load_pipeline(folder)


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineError, match="not in the local cache"):
        sdjax.load_pipeline("nobody-here/no-such-model-sdjax")


def test_bad_arguments(sd1_folder, tmp_path):
    with pytest.raises(InvalidArgumentError, match="dtype='int32'"):
        sdjax.load_pipeline(sd1_folder[0], dtype=jnp.int32)
    single = tmp_path / "model.safetensors"
    single.write_bytes(b"")
    with pytest.raises(WeightsError, match="not a safetensors file"):  # a single file, read as one (tests/weights)
        sdjax.load_pipeline(single)
    pipeline = sdjax.load_pipeline(sd1_folder[0])
    with pytest.raises(InvalidArgumentError, match="list of strings"):
        pipeline.encode_prompt("a cat")
    with pytest.raises(InvalidArgumentError, match="multiple of the VAE factor 2"):
        pipeline.encode_image(np.zeros((1, 33, 32, 3), np.uint8))


def test_long_prompts_warn_how_many_tokens_are_dropped(sd1_folder):
    pipeline = sdjax.load_pipeline(sd1_folder[0])
    with pytest.warns(UserWarning, match=r"prompt 1 has 102 tokens; the text encoder reads 77, so the last 25"):
        embeddings = pipeline.encode_prompt(["a cat", "cat " * 100])
    assert embeddings.shape == (2, 77, 32)


def test_a_unet_config_without_sample_size_gets_sd_default_size(broken_copy):
    """diffusers writes "sample_size": null for a U-Net built without one; the default size is then SD's 64 latents."""
    config = json.loads((broken_copy / "unet" / "config.json").read_text())
    (broken_copy / "unet" / "config.json").write_text(json.dumps({**config, "sample_size": None}))
    call = sdjax.load_pipeline(broken_copy).prepare("a cat", sampler="euler")
    factor = 2  # the tiny VAE's
    assert (call.request.height, call.request.width) == (64 * factor, 64 * factor)
