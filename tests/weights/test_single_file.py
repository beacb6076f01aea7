"""Single-file checkpoints (sdjax.weights.single_file) against diffusers' `from_single_file`, on the tiny SD 1.x,
SD 2.x and SDXL folders of tests/fixtures.py. Reference files are written by tests/weights/original_layout.py (the
reference conversion scripts' key tables, no sdjax code) and checked by diffusers loading them; sdjax must read
them into the folder's exact params, write them back bit for bit, and write files diffusers loads. Full-size
architectures are detected from shapes alone (nothing allocated)."""
import re

import ml_dtypes
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from flax import traverse_util

import sdjax
from sdjax.errors import ConfigError, OfflineError, WeightsError
from sdjax.models import configs as presets
from sdjax.weights import keymap, single_file, tensors
from tests import fixtures
from tests.fixtures import assert_images_match, nchw
from tests.models import torch_state_dict
from tests.weights import original_layout

NETWORKS = ("unet", "vae", "text_encoder", "text_encoder_2")


def write_reference(pipeline, path, layout: str):
    """The single file of a torch pipeline, written by the test's own key tables; returns its tensors."""
    names = [name for name in NETWORKS if getattr(pipeline, name, None) is not None]
    state = original_layout.single_file({name: torch_state_dict(getattr(pipeline, name)) for name in names},
                                        {name: dict(getattr(pipeline, name).config) for name in ("unet", "vae")},
                                        layout)
    tensors.write_safetensors(path, state)
    return state


def assert_same_networks(loaded, reference):
    """Every network of two torch pipelines holds bitwise equal tensors under the same names."""
    for name in NETWORKS:
        if getattr(reference, name, None) is None:
            continue
        ours, theirs = torch_state_dict(getattr(loaded, name)), torch_state_dict(getattr(reference, name))
        theirs = {k: v for k, v in theirs.items() if not k.endswith("position_ids")}
        assert set(ours) >= set(theirs), (name, sorted(set(theirs) - set(ours))[:5])
        for key, value in theirs.items():
            np.testing.assert_array_equal(ours[key], value, err_msg=f"{name}: {key}")


def assert_same_params(ours, theirs):
    assert ours.keys() == theirs.keys()
    for name in ours:
        flat_ours, flat_theirs = (traverse_util.flatten_dict(p[name]) for p in (ours, theirs))
        assert flat_ours.keys() == flat_theirs.keys()
        for path, value in flat_theirs.items():
            np.testing.assert_array_equal(np.asarray(flat_ours[path]), np.asarray(value), err_msg=f"{name}: {path}")


def assert_same_file(path, expected):
    found = tensors.read_safetensors(path)
    assert sorted(found) == sorted(expected)
    for key, value in expected.items():
        assert found[key].dtype == value.dtype and np.array_equal(found[key], value), key


@pytest.fixture(scope="module")
def sd1(sd1_folder, tmp_path_factory):
    """(folder, torch pipeline, reference file, its tensors, sdjax pipeline from the file with config=folder)."""
    folder, reference = sd1_folder
    path = tmp_path_factory.mktemp("single") / "sd1.safetensors"
    state = write_reference(reference, path, "sd1")
    return folder, reference, path, state, sdjax.load_pipeline(path, config=folder)


@pytest.fixture(scope="module")
def sdxl_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl_single")
    base, refiner = fixtures.save_sdxl_folders(root / "base", root / "refiner")
    return {"sdxl": (root / "base", base), "sdxl_refiner": (root / "refiner", refiner)}


def test_reference_file_loads_in_diffusers(sd1):
    """Validates the test's key tables: diffusers reads their file into the original weights."""
    folder, reference, path, _, _ = sd1
    assert_same_networks(StableDiffusionPipeline.from_single_file(str(path), config=str(folder)), reference)


def test_file_loads_as_the_folder_and_generates_as_diffusers(sd1):
    """The folder's exact params, configs, scheduler and tokenizer, so the folder's images (not generated twice:
    a second compile); and diffusers' images from the same noise."""
    folder, reference, _, _, pipeline = sd1
    from_folder = sdjax.load_pipeline(folder)
    assert_same_params(pipeline.params, from_folder.params)
    assert pipeline.configs == from_folder.configs and pipeline.scheduler_config == from_folder.scheduler_config
    assert pipeline.tokenizer.get_vocab() == from_folder.tokenizer.get_vocab()
    noise = np.random.default_rng(0).normal(size=(1, 16, 16, 4)).astype(np.float32)
    settings = dict(steps=2, guidance_scale=7.0, latents=noise, height=32, width=32)
    ours = pipeline.generate(["a photo of a cat"], ["blurry"], **settings).images
    theirs = reference(["a photo of a cat"], negative_prompt=["blurry"], num_inference_steps=2, guidance_scale=7.0,
                       latents=nchw(noise), height=32, width=32, output_type="np").images
    assert_images_match(ours, theirs)  # at most 2/255 per pixel, under 0.5/255 on average


def test_export_loads_in_diffusers_and_round_trips_bitwise(sd1, tmp_path):
    folder, reference, _, state, pipeline = sd1
    path = tmp_path / "exported.safetensors"
    pipeline.save_single_file(path)
    assert_same_file(path, state)  # file -> sdjax -> file
    assert_same_networks(StableDiffusionPipeline.from_single_file(str(path), config=str(folder)), reference)
    assert [p.name for p in tmp_path.iterdir()] == ["exported.safetensors"]  # no .partial left


def test_half_precision_export_round_trips(sd1, tmp_path):
    _, _, _, state, pipeline = sd1
    path = tmp_path / "half.safetensors"
    pipeline.save_single_file(path, dtype=np.float16)
    again = tmp_path / "again.safetensors"
    sdjax.load_pipeline(path, config=sd1[0]).save_single_file(again, dtype=np.float16)
    assert_same_file(again, {k: v.astype(np.float16) for k, v in state.items()})


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_check_finite_names_the_damaged_tensor_by_its_file_key(sd1, tmp_path, dtype):
    folder, _, _, state, _ = sd1
    damaged = {key: value.astype(dtype) for key, value in state.items()}
    key = "first_stage_model.decoder.conv_out.bias"
    damaged[key] = damaged[key].copy()
    damaged[key][0] = np.nan
    path = tmp_path / "damaged.safetensors"
    tensors.write_safetensors(path, damaged)
    with pytest.raises(WeightsError, match=rf"1 tensor\(s\) hold NaN or inf, e\.g\. {re.escape(key)}"):
        sdjax.load_pipeline(path, config=folder, check_finite=True)


def test_v_pred_marker_and_prediction_type(sd1, tmp_path):
    folder, _, _, state, _ = sd1
    path = tmp_path / "vpred.safetensors"
    tensors.write_safetensors(path, {**state, "v_pred": np.zeros((0,), np.float32)})
    assert sdjax.load_pipeline(path, config=folder).scheduler_config["prediction_type"] == "v_prediction"
    chosen = sdjax.load_pipeline(path, config=folder, prediction_type="epsilon")
    assert chosen.scheduler_config["prediction_type"] == "epsilon"
    marked = tmp_path / "marked.safetensors"
    chosen.scheduler_config["prediction_type"] = "v_prediction"
    chosen.save_single_file(marked)
    assert tensors.read_safetensors(marked).keys() == {**state, "v_pred": None}.keys()


def test_sd2_openclip_layout(sd2_folder, tmp_path):
    """SD 2.x's OpenCLIP text encoder: fused in_proj q/k/v, resblocks, positional_embedding."""
    folder, reference = sd2_folder
    path = tmp_path / "sd2.safetensors"
    state = write_reference(reference, path, "sd2")
    assert any(key.endswith("attn.in_proj_weight") for key in state)
    assert_same_networks(StableDiffusionPipeline.from_single_file(str(path), config=str(folder)), reference)
    pipeline = sdjax.load_pipeline(path, config=folder)
    assert_same_params(pipeline.params, sdjax.load_pipeline(folder).params)
    exported = tmp_path / "exported.safetensors"
    pipeline.save_single_file(exported)
    assert_same_file(exported, {**state, "v_pred": np.zeros((0,), np.float32)})  # the folder's v-prediction


@pytest.mark.parametrize("model", ["sdxl", "sdxl_refiner"])
def test_sdxl_files(model, sdxl_folders, tmp_path):
    folder, reference = sdxl_folders[model]
    path = tmp_path / f"{model}.safetensors"
    state = write_reference(reference, path, model)
    diffusers_class = StableDiffusionXLPipeline if model == "sdxl" else StableDiffusionXLImg2ImgPipeline
    assert_same_networks(diffusers_class.from_single_file(str(path), config=str(folder)), reference)
    pipeline = sdjax.load_pipeline(path, config=folder)
    from_folder = sdjax.load_pipeline(folder)
    assert_same_params(pipeline.params, from_folder.params)
    assert pipeline.sdxl_settings == from_folder.sdxl_settings
    exported = tmp_path / "exported.safetensors"
    pipeline.save_single_file(exported)
    assert_same_file(exported, state)
    assert_same_networks(diffusers_class.from_single_file(str(exported), config=str(folder)), reference)


# --- detection and errors -------------------------------------------------------------------------------------

FULL_SIZE = {
    "sd1": {"unet": presets.SD15_UNET, "vae": presets.SD_VAE, "text_encoder": presets.SD15_TEXT},
    "sd2": {"unet": presets.SD21_UNET, "vae": presets.SD_VAE, "text_encoder": presets.SD21_TEXT},
    "sdxl": {"unet": presets.SDXL_UNET, "vae": presets.SDXL_VAE, "text_encoder": presets.SD15_TEXT,
             "text_encoder_2": presets.SDXL_TEXT_2},
    "sdxl_refiner": {"unet": presets.SDXL_REFINER_UNET, "vae": presets.SDXL_VAE,
                     "text_encoder_2": presets.SDXL_TEXT_2},
}


def full_size_shapes(layout: str) -> dict:
    """The keys and shapes of a full-size single file (no tensor allocated), by the test's own key tables."""
    configs = FULL_SIZE[layout]
    states = {name: {key: original_layout.Shape(shape) for key, shape in
                     keymap.torch_shapes(single_file.param_shapes(name, config)).items()}
              for name, config in configs.items()}
    shapes = original_layout.single_file(states, {name: c.to_dict() for name, c in configs.items()}, layout)
    if layout == "sd2":  # OpenCLIP ViT-H as released: a 24th layer and a projection, both unused by SD
        shapes.update({f"cond_stage_model.model.transformer.resblocks.23.{k}": shapes[
            f"cond_stage_model.model.transformer.resblocks.22.{k}"] for k in ("ln_1.weight", "attn.in_proj_weight")})
        shapes["cond_stage_model.model.text_projection"] = (1024, 1024)
    return {key: tuple(shape) for key, shape in shapes.items()}


@pytest.mark.parametrize("layout, expected", [
    ("sd1", single_file.SD1), ("sd2", single_file.SD2), ("sdxl", single_file.SDXL_BASE),
    ("sdxl_refiner", single_file.SDXL_REFINER_ARCH)])
def test_full_size_architectures_are_detected_from_shapes(layout, expected):
    """Each layout is told apart by its keys, and every shape fits the built-in full-size configs."""
    shapes = full_size_shapes(layout)
    architecture = single_file.detect(shapes, "model.safetensors")
    assert architecture is expected
    configs = single_file.builtin_configs(architecture, shapes)
    assert configs == FULL_SIZE[layout]
    for name, (layout_of, expected_shapes) in single_file.layouts(architecture, configs).items():
        assert single_file.layout_problems(shapes, layout_of, expected_shapes) == [], name
    inpainting = {**shapes, single_file.UNET_IN: (shapes[single_file.UNET_IN][0], 9, 3, 3)}  # + mask + masked image
    assert single_file.builtin_configs(architecture, inpainting)["unet"].in_channels == 9
    # diffusers' defaults: SD 2.x means the 768-v models, but its inpainting model predicts noise
    assert single_file.default_prediction_type(shapes, architecture) == ("v_prediction" if layout == "sd2"
                                                                         else "epsilon")
    assert single_file.default_prediction_type(inpainting, architecture) == "epsilon"
    assert single_file.default_prediction_type({**shapes, "v_pred": (0,)}, architecture) == "v_prediction"


def test_a_file_of_no_known_layout_says_what_was_looked_for(tmp_path):
    path = tmp_path / "lora.safetensors"
    tensors.write_safetensors(path, {"lora_unet_down_blocks_0.alpha": np.ones((), np.float32)})
    with pytest.raises(ConfigError) as error:
        sdjax.load_pipeline(path)
    message = str(error.value)
    assert str(path) in message and "cond_stage_model.transformer.text_model" in message
    assert "conditioner.embedders.1.model.positional_embedding (SDXL base)" in message and "config=" in message


def test_a_small_model_without_config_says_to_pass_one(sd1):
    with pytest.raises(ConfigError, match=r"SD 1.x layout .* do not fit the full-size SD 1.x model .*"
                                          r"model.diffusion_model.input_blocks.0.0.weight is \(32, 4, 3, 3\), "
                                          r"expected \(320, 4, 3, 3\).*pass config="):
        sdjax.load_pipeline(sd1[2])


def test_a_config_of_another_family_is_refused(sd1, sdxl_folders):
    with pytest.raises(ConfigError, match="holds SD 1.x .* is a pipeline of unet, vae, text_encoder, text_encoder_2"):
        sdjax.load_pipeline(sd1[2], config=sdxl_folders["sdxl"][0])


def test_missing_tokenizer_offline_is_a_clear_error(monkeypatch, tmp_path):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OfflineError, match=r"SD 1.x tokenizer \(stable-diffusion-v1-5/stable-diffusion-v1-5, "
                                           r"tokenizer/\) is not in the local .* pass config="):
        single_file.builtin_tokenizers(single_file.SD1, "model.safetensors")


def test_ckpt_without_torch(sd1, tmp_path, without_torch):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in list(sd1[3].items())[:3]}}, path)
    without_torch()
    with pytest.raises(WeightsError, match="model.ckpt is a PyTorch pickle and torch is not installed"):
        sdjax.load_pipeline(path, config=sd1[0])


def test_ckpt_loads_with_torch(sd1, tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in sd1[3].items()}}, path)
    assert_same_params(sdjax.load_pipeline(path, config=sd1[0]).params, sd1[4].params)


def test_bad_export_and_load_arguments(sd1, tmp_path):
    from sdjax.errors import InvalidArgumentError
    with pytest.raises(InvalidArgumentError, match="written as .safetensors; name it model.safetensors"):
        sd1[4].save_single_file(tmp_path / "model.ckpt")
    with pytest.raises(InvalidArgumentError, match="config= and prediction_type= are for single-file"):
        sdjax.load_pipeline(sd1[0], config=sd1[0])
    with pytest.raises(InvalidArgumentError, match="prediction_type='v'"):
        sdjax.load_pipeline(sd1[2], config=sd1[0], prediction_type="v")
    with pytest.raises(WeightsError, match="models/sd15.safetensors: no such file or folder"):  # not a hub id
        sdjax.load_pipeline("models/sd15.safetensors")


# --- sdjax convert -------------------------------------------------------------------------------------------

def test_convert_both_ways(sd1, tmp_path, capsys):
    from sdjax import cli
    folder, back = tmp_path / "folder", tmp_path / "back.safetensors"
    assert cli.main(["convert", str(sd1[2]), str(folder), "--config", str(sd1[0])]) == 0
    assert cli.main(["convert", str(folder), str(back)]) == 0  # a .safetensors target: a single file
    assert_same_file(back, sd1[3])  # file -> folder -> file, bitwise
    assert cli.main(["convert", str(folder), str(back)]) == 2
    assert cli.main(["convert", str(folder), str(tmp_path / "x.ckpt"), "--to", "single-file"]) == 2
    errors = capsys.readouterr().err
    assert "back.safetensors exists; choose a new file name" in errors and "name it x.safetensors" in errors


def test_a_failed_export_leaves_no_file(sd1, tmp_path, monkeypatch):
    from sdjax import cli
    real_open = open

    class FillsUp:  # a disk that fills up a few kilobytes into the file
        def __init__(self, path, mode):
            self.file, self.written = real_open(path, mode), 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            if self.written > 4096:
                raise OSError(28, "No space left on device")
            self.written += len(data)
            return self.file.write(data)

    monkeypatch.setattr(tensors, "open", lambda path, mode="r": (FillsUp if "w" in mode else real_open)(path, mode),
                        raising=False)
    target = tmp_path / "out.safetensors"
    assert cli.main(["convert", str(sd1[2]), str(target), "--config", str(sd1[0])]) == 2
    assert list(tmp_path.iterdir()) == []


def test_without_config_the_built_in_configs_and_cached_tokenizer_are_used(sd1, tmp_path, monkeypatch):
    """The no-config path end to end: SD 1.x's built-in configs (here the tiny folder's, standing in for the
    full-size ones) and its tokenizer from a Hugging Face cache laid out as huggingface_hub writes it."""
    import dataclasses
    import shutil

    import huggingface_hub

    from sdjax.weights import diffusers_folder
    folder = sd1[0]
    tiny = {name: diffusers_folder.read_config(folder / name, name)[0] for name in ("unet", "vae", "text_encoder")}
    stand_in = dataclasses.replace(single_file.SD1, configs=tiny)
    monkeypatch.setattr(single_file, "ARCHITECTURES", (*single_file.ARCHITECTURES[:-1], stand_in))
    repo = tmp_path / "models--stable-diffusion-v1-5--stable-diffusion-v1-5"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copytree(folder / "tokenizer", repo / "snapshots" / ("0" * 40) / "tokenizer")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    pipeline = sdjax.load_pipeline(sd1[2])
    assert_same_params(pipeline.params, sd1[4].params)
    assert pipeline.tokenizer.get_vocab() == sd1[4].tokenizer.get_vocab()
    assert pipeline.scheduler_config == {**single_file.SD1.scheduler, "prediction_type": "epsilon"}
    v_model = sdjax.load_pipeline(sd1[2], prediction_type="v_prediction")  # PNDM takes noise predictions only
    assert v_model.scheduler_config == {**single_file.SD2.scheduler, "prediction_type": "v_prediction"}
    v_model.sampling_plan(4)  # a plan sdjax runs
