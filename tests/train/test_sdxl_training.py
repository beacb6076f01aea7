"""SDXL in `sdjax train` (stage unet) on the tiny SDXL base folder of tests/fixtures.py: the loss equals the one
diffusers' examples/text_to_image/train_text_to_image_sdxl.py computes with diffusers' modules in torch; a few steps
of full fine-tuning (both text encoders too) export a folder that loads and generates; a LoRA of the U-Net and both
text encoders exports PEFT and kohya files (lora_te1_ / lora_te2_) that diffusers' StableDiffusionXLPipeline loads
with sdjax's outputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import sdjax
from sdjax.errors import ConfigError
from sdjax.train import load_config
from sdjax.train.adapters import FILES, by_path
from sdjax.train.losses import drop_captions
from sdjax.train.task import build_task
from sdjax.weights.tensors import read_safetensors
from tests import fixtures
from tests.models import errors, nchw, nhwc
from tests.train.conftest import EXPERIMENT, read_losses, run_training

RESOLUTION = 16  # pixels; 8x8 latents with the tiny VAE
CAPTIONS = ["a photo of a cat", ""]
LOSS_TOLERANCE = 1e-5  # relative error of the loss, float32 on both sides
OUTPUT_TOLERANCE = 1e-5  # relative L2 of U-Net outputs and text embeddings with a LoRA


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl_train")
    fixtures.save_sdxl_folders(root / "base", root / "refiner")
    return root / "base"


@pytest.fixture(scope="module")
def base(sdxl_folder):
    return sdjax.load_pipeline(sdxl_folder)


@pytest.fixture(scope="module")
def overrides(sdxl_folder, dataset):
    """The tiny experiment pointed at the SDXL folder's own U-Net (model.unet_config= fine-tunes it)."""
    return [f"model.pretrained={sdxl_folder}", "model.unet_config=", f"data.folder={dataset}",
            f"data.resolution={RESOLUTION}", "log_every=1", "optimizer.warmup_steps=0", "batch_size=2"]


def diffusers_training_loss(folder, x0, noise, timesteps, captions):
    """train_text_to_image_sdxl.py's loss, its code inlined: encode_prompt (both tokenizers padded to max_length,
    penultimate hidden states concatenated, text_encoder_2's pooled projection), compute_time_ids for an image of the
    training size not cropped, DDPMScheduler.add_noise, the U-Net with added_cond_kwargs, MSE to the epsilon target.
    Returns (loss, {tokenizer subfolder: ids})."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    tokenizers = [CLIPTokenizer.from_pretrained(folder, subfolder=name) for name in ("tokenizer", "tokenizer_2")]
    text_encoders = [CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
                     CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2")]
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    noise_scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    ids = {}
    with torch.no_grad():
        prompt_embeds_list = []
        for name, tokenizer, text_encoder in zip(("text_encoder", "text_encoder_2"), tokenizers, text_encoders):
            text_input_ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                                       truncation=True, return_tensors="pt").input_ids
            ids[name] = text_input_ids.numpy()
            prompt_embeds = text_encoder(text_input_ids, output_hidden_states=True, return_dict=False)
            pooled_prompt_embeds = prompt_embeds[0]
            prompt_embeds = prompt_embeds[-1][-2]
            prompt_embeds_list.append(prompt_embeds)
        prompt_embeds = torch.concat(prompt_embeds_list, dim=-1)
        pooled_prompt_embeds = pooled_prompt_embeds.view(len(captions), -1)

        original_size, crops_coords_top_left = (RESOLUTION, RESOLUTION), (0, 0)
        target_size = (RESOLUTION, RESOLUTION)
        add_time_ids = torch.tensor([list(original_size + crops_coords_top_left + target_size)] * len(captions),
                                    dtype=torch.float32)
        model_input, noise = torch.from_numpy(nchw(x0)), torch.from_numpy(nchw(noise))
        timesteps = torch.from_numpy(np.asarray(timesteps))
        noisy_model_input = noise_scheduler.add_noise(model_input, noise, timesteps)
        model_pred = unet(noisy_model_input, timesteps, prompt_embeds,
                          added_cond_kwargs={"time_ids": add_time_ids, "text_embeds": pooled_prompt_embeds},
                          return_dict=False)[0]
        assert noise_scheduler.config.prediction_type == "epsilon"
        loss = torch.nn.functional.mse_loss(model_pred.float(), noise.float(), reduction="mean")
    return float(loss), ids


def test_loss_matches_diffusers_sdxl_training_script(base, sdxl_folder, overrides):
    task = build_task(load_config(EXPERIMENT, overrides), base, jax.random.key(0))
    assert sorted(task.frozen) == ["text_encoder", "text_encoder_2"] and list(task.trainable) == ["unet"]
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    timesteps = np.array([10, 700])
    ids = base.text_ids(CAPTIONS)
    ours = float(task.denoising_loss({**task.frozen, **task.trainable}, jnp.asarray(x0), jnp.asarray(timesteps),
                                     jnp.asarray(noise), ids))
    theirs, their_ids = diffusers_training_loss(sdxl_folder, x0, noise, timesteps, CAPTIONS)
    for name, values in their_ids.items():
        np.testing.assert_array_equal(np.asarray(ids[name]), values)
    print(f"loss {ours:.6f} sdjax, {theirs:.6f} diffusers: relative error {abs(ours - theirs) / theirs:.1e}")
    assert abs(ours - theirs) <= LOSS_TOLERANCE * abs(theirs)
    # A dropped caption is the empty prompt for both text encoders (the second row of CAPTIONS), in the same rows.
    empty = jax.tree.map(lambda row: row[0], base.text_ids([""]))
    dropped = drop_captions(jax.random.key(0), base.text_ids(CAPTIONS[:1] * 64), empty, 0.5)
    rows = {name: np.all(np.asarray(value) == np.asarray(empty[name]), axis=1) for name, value in dropped.items()}
    np.testing.assert_array_equal(rows["text_encoder"], rows["text_encoder_2"])
    assert 0 < rows["text_encoder"].sum() < 64
    np.testing.assert_array_equal(empty["text_encoder_2"], np.asarray(ids["text_encoder_2"])[1])


def test_full_fine_tuning_lowers_the_loss_and_exports_a_folder_that_generates(base, overrides, compilation_cache,
                                                                               tmp_path):
    """Two images, a batch of both, no flips: every step trains on the same batch, and its loss (each step's own
    draws of latents, timesteps and noise) goes down over the run; the U-Net changes, and the export loads and
    generates."""
    from tests.train.synthetic import write_synthetic_dataset
    folder = write_synthetic_dataset(tmp_path / "images", count=2)
    steps, window = 20, 5
    workdir = tmp_path / "run"
    result = run_training(overrides, workdir, f"data.folder={folder}", "data.random_flip=false",
                          f"num_steps={steps}", f"checkpoint_every={steps}", "optimizer.learning_rate=3e-3",
                          "export_ema=false")
    losses = read_losses(workdir)
    assert sorted(losses) == list(range(1, steps + 1)) and all(np.isfinite(list(losses.values())))
    first, last = (np.mean([losses[step] for step in steps_]) for steps_ in (range(1, window + 1),
                                                                            range(steps - window + 1, steps + 1)))
    print(f"mean loss of the first {window} steps {first:.4f}, of the last {window} {last:.4f}")
    assert last < 0.8 * first
    trained = result.state.params
    assert list(trained) == ["unet"]
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), trained["unet"],
                                           base.params["unet"]))
    assert all(changed)

    exported = sdjax.load_pipeline(result.export_dir)
    assert exported.sdxl_settings == base.sdxl_settings and exported.text_encoders == base.text_encoders
    jax.tree.map(np.testing.assert_array_equal, exported.params["unet"], jax.device_get(trained["unet"]))
    jax.tree.map(np.testing.assert_array_equal, exported.params["text_encoder_2"], base.params["text_encoder_2"])
    images = exported.generate(["a photo of a cat"], steps=2, height=RESOLUTION, width=RESOLUTION, seed=0).images
    assert images.shape == (1, RESOLUTION, RESOLUTION, 3) and images.std() > 0


def test_train_text_encoder_trains_both_text_encoders(base, overrides):
    task = build_task(load_config(EXPERIMENT, [*overrides, "model.train_text_encoder=true"]), base,
                      jax.random.key(0))
    assert sorted(task.trainable) == ["text_encoder", "text_encoder_2", "unet"] and task.frozen == {}
    assert task.fingerprint["trained"] == ["unet", "text_encoder", "text_encoder_2"]


@pytest.fixture(scope="module")
def lora_run(overrides, compilation_cache, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sdxl_lora") / "run"
    return run_training(overrides, workdir, "num_steps=2", "checkpoint_every=2", "lora.rank=4", "lora.alpha=8",
                        "lora.export_formats=peft|kohya", "optimizer.learning_rate=0.02",
                        "lora.text_encoder_targets=q_proj|k_proj|v_proj|out_proj")


def test_lora_export_names_both_text_encoders(lora_run, base):
    trained = by_path(lora_run.state.ema_params)
    assert sorted(trained) == ["text_encoder", "text_encoder_2", "unet"]
    kohya = read_safetensors(lora_run.export_dir / FILES["kohya"])
    peft = read_safetensors(lora_run.export_dir / FILES["peft"])
    prefixes = {key.split("text_model")[0] for key in kohya if "text_model" in key}
    assert prefixes == {"lora_te1_", "lora_te2_"}
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in kohya
    assert "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in peft
    assert len(kohya) == 3 * sum(map(len, trained.values())) and len(peft) == 2 * sum(map(len, trained.values()))


def outputs(unet, encode_prompt):
    """(U-Net output NHWC, prompt embeddings, pooled embeddings) on fixed inputs of either library."""
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    embeddings = rng.standard_normal((2, 77, sum(fixtures.SDXL_TEXT_WIDTHS.values()))).astype(np.float32)
    text_embeds = rng.standard_normal((2, fixtures.SDXL_POOLED_WIDTH)).astype(np.float32)
    time_ids = np.array([[16, 16, 0, 0, 16, 16], [32, 24, 4, 0, 16, 16]], np.float32)
    prompt_embeds, pooled = encode_prompt(["a photo of a cat", "an astronaut"])
    return (np.asarray(unet(latents, np.array([10, 700]), embeddings, text_embeds, time_ids)), np.asarray(prompt_embeds),
            np.asarray(pooled))


@pytest.mark.usefixtures("transformers_peft_gate")  # diffusers loads the text encoders' adapters through PEFT
@pytest.mark.parametrize("kind", ["peft", "kohya"])
def test_lora_export_loads_in_diffusers_with_sdjax_outputs(kind, lora_run, base, sdxl_folder):
    from diffusers import StableDiffusionXLPipeline
    pytest.importorskip("peft")
    export, scale = lora_run.export_dir, 0.7
    reference = StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    reference.load_lora_weights(export, weight_name=FILES[kind], adapter_name="trained")
    reference.set_adapters(["trained"], [scale])

    def their_unet(latents, timesteps, embeddings, text_embeds, time_ids):
        added = {"text_embeds": torch.from_numpy(text_embeds), "time_ids": torch.from_numpy(time_ids)}
        return nhwc(reference.unet(torch.from_numpy(nchw(latents)), torch.from_numpy(timesteps), torch.from_numpy(embeddings),
                                   added_cond_kwargs=added).sample)

    def their_prompts(prompts):
        embeds, _, pooled, _ = reference.encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                                       do_classifier_free_guidance=False)
        return embeds, pooled

    def our_unet(latents, timesteps, embeddings, text_embeds, time_ids):
        return base.unet_output(latents, timesteps, embeddings, text_embeds=text_embeds, time_ids=time_ids)

    with torch.no_grad():
        theirs = outputs(their_unet, their_prompts)
    plain = outputs(our_unet, base.encode_prompt)
    name = base.load_lora(export / FILES[kind], scale=scale)
    try:
        ours = outputs(our_unet, base.encode_prompt)
        assert sorted(base.loras[name].layers) == ["text_encoder", "text_encoder_2", "unet"]
    finally:
        base.unload_lora()
    for what, mine, their, before in zip(("U-Net", "text states", "pooled"), ours, theirs, plain):
        relative, max_abs = errors(mine, their)
        effect = errors(before, their)[0]
        print(f"{kind} {what}: relative L2 {relative:.2e}, max-abs {max_abs:.2e}, LoRA effect {effect:.2e}")
        assert relative <= OUTPUT_TOLERANCE
        assert effect > 100 * OUTPUT_TOLERANCE  # the adapter acts


def test_what_sdxl_training_does_not_do_is_refused(base, sdxl_folder, overrides):
    refiner = sdjax.load_pipeline(sdxl_folder.with_name("refiner"))
    config = load_config(EXPERIMENT, [*overrides, f"model.pretrained={sdxl_folder.with_name('refiner')}"])
    with pytest.raises(ConfigError, match="is an SDXL refiner .*stage=vae"):
        build_task(config, refiner, jax.random.key(0))
