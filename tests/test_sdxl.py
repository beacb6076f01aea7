"""SDXL base and refiner against diffusers' StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline and
StableDiffusionXLInpaintPipeline (and StableDiffusionXLControlNetPipeline) in torch, float32, on tiny random-weight
folders of SDXL's architecture (tests/fixtures.py): the prompt encoding, the U-Net's added conditioning, whole
generations from the same starting noise (inpainting also with a 9-channel U-Net, and with a ControlNet), the VAE's
force_upcast under float16, the folder round trip, and the errors."""
import copy
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline
from diffusers.pipelines.stable_diffusion_xl import (pipeline_stable_diffusion_xl_img2img,
                                                     pipeline_stable_diffusion_xl_inpaint)
from PIL import Image

import sdjax
from sdjax.errors import ConfigError, InvalidArgumentError
from sdjax.models.controlnet import SD15_CONTROLNET
from sdjax.sdxl import SDXLSettings, vae_dtype
from tests import fixtures
from tests.fixtures import assert_images_match, nchw
from tests.models import errors, nhwc, perturb_, torch_state_dict

PROMPTS = ["a photo of a cat", "an astronaut riding a horse on the moon, detailed oil painting"]
NEGATIVE = ["blurry", "ugly"]
SIZE = 32  # pixels; latents are 16x16 with the tiny VAE
LATENT_TOLERANCE = 1e-4  # relative L2 of the final latents after a few sampler steps (measured ~3e-6)


def assert_close(ours, reference, rel=1e-5):
    error, max_abs = errors(ours, reference)
    print(f"relative L2 {error:.2e}, max-abs {max_abs:.2e}")
    assert error <= rel, f"relative L2 {error:.2e} (max-abs {max_abs:.2e}) exceeds {rel:.0e}"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{"base": (folder, torch StableDiffusionXLPipeline),
    "refiner": (folder, torch StableDiffusionXLImg2ImgPipeline)}."""
    root = tmp_path_factory.mktemp("sdxl")
    base, refiner = fixtures.save_sdxl_folders(root / "base", root / "refiner")
    return {"base": (root / "base", base), "refiner": (root / "refiner", refiner)}


@pytest.fixture(scope="module")
def base(folders):
    """(sdjax Pipeline, torch StableDiffusionXLPipeline) of the tiny SDXL base model."""
    folder, reference = folders["base"]
    return sdjax.load_pipeline(folder), reference


@pytest.fixture(scope="module")
def refiner(folders):
    folder, reference = folders["refiner"]
    return sdjax.load_pipeline(folder), reference


@pytest.fixture
def encode_with_posterior_mean(monkeypatch):
    """diffusers samples the VAE posterior for img2img and inpainting; sdjax uses its mean. Make diffusers use the
    mean too."""
    def mean_latents(encoder_output, generator=None, sample_mode="sample"):
        return encoder_output.latent_dist.mode()
    for module in (pipeline_stable_diffusion_xl_img2img, pipeline_stable_diffusion_xl_inpaint):
        monkeypatch.setattr(module, "retrieve_latents", mean_latents)


def torch_noise(shape_nhwc, seed):
    n, h, w, c = shape_nhwc
    return torch.randn((n, c, h, w), generator=torch.Generator().manual_seed(seed)).numpy().transpose(0, 2, 3, 1)


def test_folders_load_as_their_family(base, refiner):
    assert base[0].text_encoders == ("text_encoder", "text_encoder_2")
    assert base[0].sdxl_settings == SDXLSettings("StableDiffusionXLPipeline", True, False)
    assert refiner[0].text_encoders == ("text_encoder_2",)
    assert refiner[0].sdxl_settings == SDXLSettings("StableDiffusionXLImg2ImgPipeline", False, True)
    assert base[0].tokenizers["text_encoder_2"].pad_token == "!"  # the tokenizers pad differently


@pytest.mark.parametrize("model", ["base", "refiner"])
def test_encode_prompt_matches_diffusers(model, request):
    pipeline, reference = request.getfixturevalue(model)
    prompts = PROMPTS + [""]
    for clip_skip in (None, 1):
        embeds, pooled = pipeline.encode_prompt(prompts, clip_skip=clip_skip)
        with torch.no_grad():
            expected, _, expected_pooled, _ = reference.encode_prompt(prompts, do_classifier_free_guidance=False,
                                                                      clip_skip=clip_skip)
        assert embeds.shape == expected.shape and pooled.shape == expected_pooled.shape
        assert_close(embeds, expected.numpy())
        assert_close(pooled, expected_pooled.numpy())


def test_unet_with_added_conditioning_matches_diffusers(base):
    pipeline, reference = base
    rng = np.random.default_rng(1)
    latents = rng.normal(size=(2, 8, 12, 4)).astype(np.float32)
    timesteps = np.array([999, 17], np.int32)
    embeddings = rng.normal(size=(2, 77, 80)).astype(np.float32)
    text_embeds = rng.normal(size=(2, fixtures.SDXL_POOLED_WIDTH)).astype(np.float32)
    time_ids = np.array([[1024, 768, 0, 0, 1024, 1024], [512, 640, 32, 16, 768, 768]], np.float32)
    with torch.no_grad():
        expected = reference.unet(nchw(latents), torch.from_numpy(timesteps), torch.from_numpy(embeddings),
                                  added_cond_kwargs={"text_embeds": torch.from_numpy(text_embeds),
                                                     "time_ids": torch.from_numpy(time_ids)}).sample
    assert_close(pipeline.unet_output(latents, timesteps, embeddings, text_embeds=text_embeds, time_ids=time_ids),
                 nhwc(expected))


def run_both(pipeline, reference, *, latents, negative=None, **settings):
    """(sdjax result, diffusers images in [0, 1], diffusers final latents) of a txt2img call of PROMPTS with the same
    noise. sdjax runs them as one batch, diffusers one prompt at a time: with several, its StableDiffusionXLPipeline
    gives negative time ids that differ from the positive ones to half of its batch only (it repeats the pair
    [negative; positive] instead of each)."""
    ours = pipeline.generate(PROMPTS, negative, steps=3, latents=latents, **settings)
    negatives = negative if isinstance(negative, list) else [negative] * len(PROMPTS)
    theirs = {"np": [], "latent": []}
    for i, (prompt, negative_prompt) in enumerate(zip(PROMPTS, negatives)):
        for kind, outputs in theirs.items():
            outputs.append(reference(prompt, negative_prompt=negative_prompt, num_inference_steps=3,
                                     latents=nchw(latents[i:i + 1]), height=SIZE, width=SIZE, output_type=kind,
                                     **settings).images)
    return ours, np.concatenate(theirs["np"]), nhwc(torch.cat(theirs["latent"]))


def test_txt2img_matches_diffusers(folders):
    """The folder's scheduler (SDXL's Euler, leading spacing), negative prompts, guidance, every size and crop
    setting; then the force_zeros_for_empty_prompt rule, from the same compiled program. The batch is split over
    two devices (conftest gives 8 CPU devices)."""
    import jax
    folder, reference = folders["base"]
    pipeline = sdjax.load_pipeline(folder, devices=jax.devices()[:2])
    noise = np.random.default_rng(0).normal(size=(2, 16, 16, 4)).astype(np.float32)
    micro = dict(original_size=(64, 48), crops_coords_top_left=(4, 8), target_size=(40, 32),
                 negative_original_size=(24, 32), negative_crops_coords_top_left=(2, 0), negative_target_size=(32, 32))
    ours, images, latents = run_both(pipeline, reference, latents=noise, negative=NEGATIVE, guidance_scale=5.0,
                                     **micro)
    assert ours.settings["schedule"] == "EulerDiscreteScheduler"
    check_images(ours.images, images)
    assert_close(ours.latents, latents, LATENT_TOLERANCE)

    by_rule = {}
    for negative in (None, ""):  # None: zeros (force_zeros_for_empty_prompt); "": the empty prompt encoded
        ours, images, latents = run_both(pipeline, reference, latents=noise, negative=negative, guidance_scale=5.0,
                                         original_size=(64, 48))
        assert ours.compile_seconds == 0
        check_images(ours.images, images)
        assert_close(ours.latents, latents, LATENT_TOLERANCE)
        by_rule[negative] = ours.latents
    assert errors(by_rule[None], by_rule[""])[0] > 1e-3  # the rule changes the images


@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "UniPCMultistepScheduler"])
def test_txt2img_follows_other_scheduler_configs_like_diffusers(folders, scheduler, tmp_path):
    """Two more scheduler configs made from SDXL's (Euler and, through the refiner, DPM-Solver++ are above)."""
    import shutil

    import diffusers
    folder, reference = folders["base"]
    # clip_sample is DDIM's default but off in SD's own DDIM configs; sdjax refuses it (tests/test_scheduler_config.py)
    config = getattr(diffusers, scheduler).from_config(reference.scheduler.config, clip_sample=False)
    shutil.copytree(folder, tmp_path / "model")
    config.save_config(tmp_path / "model" / "scheduler")
    pipeline = sdjax.load_pipeline(tmp_path / "model")
    swapped = StableDiffusionXLPipeline(**{**reference.components, "scheduler": config})
    noise = np.random.default_rng(2).normal(size=(2, 16, 16, 4)).astype(np.float32)
    ours, images, latents = run_both(pipeline, swapped, latents=noise, negative=NEGATIVE, guidance_scale=5.0)
    assert ours.settings["schedule"] == scheduler
    check_images(ours.images, images)
    assert_close(ours.latents, latents, LATENT_TOLERANCE)


def check_images(ours, reference_unit):
    difference = np.abs(ours.astype(np.float64) - np.round(np.asarray(reference_unit) * 255.0))
    print(f"images: max {difference.max():.0f}/255, mean {difference.mean():.3f}/255")
    assert_images_match(ours, reference_unit)


def edit_both(pipeline, reference, image, *, negative, seed, mask=None, strength=0.6, **settings):
    """(sdjax result, diffusers images in [0, 1], diffusers final latents) of one img2img call, or inpainting with
    a mask: the same image, mask and starting noise. diffusers draws the noise from its generator, since noise
    given as latents= replaces its noised image below strength 1."""
    edit = {} if mask is None else {"mask_image": Image.fromarray(mask[0])}
    ours = (pipeline.img2img(image, PROMPTS[1], negative, strength=strength, steps=5, guidance_scale=5.0,
                             noise=torch_noise((1, 16, 16, 4), seed), **settings) if mask is None else
            pipeline.inpaint(image, mask, PROMPTS[1], negative, strength=strength, steps=5, guidance_scale=5.0,
                             noise=torch_noise((1, 16, 16, 4), seed), **settings))
    theirs = {kind: reference(PROMPTS[1], image=Image.fromarray(image[0]), negative_prompt=negative, strength=strength,
                              num_inference_steps=5, guidance_scale=5.0, generator=torch.Generator().manual_seed(seed),
                              output_type=kind, **edit, **settings).images for kind in ("np", "latent")}
    return ours, theirs["np"], nhwc(theirs["latent"])


def test_img2img_matches_diffusers(base, encode_with_posterior_mean):
    pipeline, reference = base
    image = np.random.default_rng(1).integers(0, 256, (1, SIZE, SIZE, 3), dtype=np.uint8)
    reference = StableDiffusionXLImg2ImgPipeline(**reference.components, add_watermarker=False)
    ours, images, latents = edit_both(pipeline, reference, image, negative=NEGATIVE[0], seed=3,
                                      original_size=(96, 64), crops_coords_top_left=(2, 6))
    check_images(ours.images, images)
    assert_close(ours.latents, latents, LATENT_TOLERANCE)


def test_refiner_img2img_matches_diffusers(refiner, encode_with_posterior_mean):
    """Aesthetic scores in the time ids, text_encoder_2 alone, and no negative prompt: the refiner's folder says
    force_zeros_for_empty_prompt false, so the empty prompt is encoded. Its scheduler config is DPM-Solver++'s."""
    pipeline, reference = refiner
    assert pipeline.sampling_plan(5).schedule == "DPMSolverMultistepScheduler"
    image = np.random.default_rng(2).integers(0, 256, (1, SIZE, SIZE, 3), dtype=np.uint8)
    ours, images, latents = edit_both(pipeline, reference, image, negative=None, seed=4, aesthetic_score=7.0,
                                      negative_aesthetic_score=2.0, original_size=(48, 48))
    check_images(ours.images, images)
    assert_close(ours.latents, latents, LATENT_TOLERANCE)


def inpaint_reference(reference, **components):
    """diffusers' StableDiffusionXLInpaintPipeline with `reference`'s components (or `components`) and settings."""
    return StableDiffusionXLInpaintPipeline(
        **{**reference.components, **components}, add_watermarker=False,
        force_zeros_for_empty_prompt=reference.config.force_zeros_for_empty_prompt,
        requires_aesthetics_score=reference.config.get("requires_aesthetics_score", False))


def inpaint_case(seed):
    """(image (1, SIZE, SIZE, 3), mask (1, SIZE, SIZE): white in a rectangle to repaint), uint8."""
    image = np.random.default_rng(seed).integers(0, 256, (1, SIZE, SIZE, 3), dtype=np.uint8)
    mask = np.zeros((1, SIZE, SIZE), np.uint8)
    mask[:, 8:24, 4:20] = 255
    return image, mask


@pytest.mark.parametrize("model, strength, settings", [
    ("base", 0.9999, dict(negative=NEGATIVE[0], original_size=(96, 64), crops_coords_top_left=(2, 6))),
    ("base", 1.0, dict(negative=None)),
    ("refiner", 0.6, dict(negative=None, aesthetic_score=7.0, negative_aesthetic_score=2.0)),
], ids=["base-diffusers-default-strength", "base-strength-1", "refiner"])
def test_inpaint_matches_diffusers(model, strength, settings, request, encode_with_posterior_mean):
    """An ordinary (4-channel) U-Net: the latents outside the mask follow the image's noised trajectory. diffusers'
    default strength 0.9999 runs one step fewer than 1, from the noised image rather than pure noise; both agree
    with sdjax given the same strength. The refiner adds aesthetic scores and its own scheduler (DPM-Solver++)."""
    pipeline, reference = request.getfixturevalue(model)
    image, mask = inpaint_case(seed=6)
    ours, images, latents = edit_both(pipeline, inpaint_reference(reference), image, mask=mask, strength=strength,
                                      seed=7, **settings)
    check_images(ours.images, images)
    assert_close(ours.latents, latents, LATENT_TOLERANCE)
    # the unmasked region ends as the image's own latents
    keep = mask[:, ::2, ::2] < 128
    np.testing.assert_allclose(ours.latents[keep], np.asarray(pipeline.encode_image(image))[keep], rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def inpainting_model(folders, tmp_path_factory):
    """(sdjax Pipeline, torch StableDiffusionXLInpaintPipeline) of the tiny base with a 9-channel inpainting U-Net
    (latents + mask + masked-image latents), as stable-diffusion-xl-1.0-inpainting-0.1."""
    source, reference = folders["base"]
    target = tmp_path_factory.mktemp("sdxl_inpainting")
    for path in source.iterdir():
        if path.name not in ("model_index.json", "unet"):
            (target / path.name).symlink_to(path)
    unet = fixtures.build_sdxl_unet(("text_encoder", "text_encoder_2"), 6, in_channels=9)
    unet.save_pretrained(target / "unet", safe_serialization=True)
    index = json.loads((source / "model_index.json").read_text())
    (target / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLInpaintPipeline"}))
    return sdjax.load_pipeline(target), inpaint_reference(reference, unet=unet)


def test_inpainting_unet_matches_diffusers(inpainting_model, encode_with_posterior_mean):
    pipeline, reference = inpainting_model
    assert pipeline.is_inpainting_model
    image, mask = inpaint_case(seed=8)
    ours, images, latents = edit_both(pipeline, reference, image, mask=mask, strength=1.0, seed=9,
                                      negative=NEGATIVE[1])
    check_images(ours.images, images)
    assert_close(ours.latents, latents, LATENT_TOLERANCE)


@pytest.fixture(scope="module")
def controlnet(folders, tmp_path_factory):
    """(folder, torch ControlNetModel): an SDXL ControlNet made from the tiny base U-Net by diffusers' from_unet (its
    own add_embedding included), perturbed so that no zero conv stays zero, for control images at the output size."""
    from diffusers import ControlNetModel
    model = perturb_(ControlNetModel.from_unet(folders["base"][1].unet, conditioning_embedding_out_channels=(16, 32)),
                     seed=11)
    folder = tmp_path_factory.mktemp("sdxl_controlnet")
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model


def test_controlnet_matches_diffusers(base, controlnet):
    """StableDiffusionXLControlNetPipeline: the ControlNet reads the same pooled embedding and time ids as the U-Net
    (sizes and crop corner off their defaults) in both halves of guidance, at a conditioning scale, and stops before
    the last of 4 steps (control_guidance_end)."""
    from diffusers import StableDiffusionXLControlNetPipeline
    pipeline, reference = base
    folder, torch_controlnet = controlnet
    rng = np.random.default_rng(9)
    hint = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    noise = rng.normal(size=(1, 16, 16, 4)).astype(np.float32)
    settings = dict(guidance_scale=5.0, original_size=(64, 48), crops_coords_top_left=(4, 8))
    ours = pipeline.generate(PROMPTS[1], NEGATIVE[0], steps=4, latents=noise, **settings,
                             control=sdjax.Control(sdjax.load_controlnet(folder), hint, scale=0.8, end=0.75))
    theirs = StableDiffusionXLControlNetPipeline(**reference.components, controlnet=torch_controlnet,
                                                 add_watermarker=False)
    images, latents = (theirs(PROMPTS[1], image=Image.fromarray(hint), negative_prompt=NEGATIVE[0],
                              num_inference_steps=4, latents=nchw(noise), height=SIZE, width=SIZE,
                              controlnet_conditioning_scale=0.8, control_guidance_end=0.75, output_type=kind,
                              **settings).images for kind in ("np", "latent"))
    check_images(ours.images, images)
    assert_close(ours.latents, nhwc(latents), LATENT_TOLERANCE)


def float16_vae_decode(folder, latents) -> tuple[set, np.ndarray]:
    """(the dtypes of the VAE's params, its decoding of `latents`) in a float16 pipeline of `folder`."""
    pipeline = sdjax.load_pipeline(folder, dtype=jnp.float16)
    assert {leaf.dtype for leaf in jax.tree.leaves(pipeline.params["unet"])} == {np.dtype(np.float16)}
    vae = pipeline.modules["vae"]
    pixels = jax.jit(functools.partial(vae.apply, method=vae.decode))({"params": pipeline.params["vae"]}, latents)
    return {leaf.dtype for leaf in jax.tree.leaves(pipeline.params["vae"])}, np.asarray(pixels)


def test_force_upcast_runs_the_vae_in_float32_under_float16(folders, tmp_path):
    """SDXL's vae/config.json says force_upcast: in a float16 pipeline the VAE computes in float32 from its float16
    weights upcast, while the U-Net stays in float16, as diffusers' SDXL pipelines run them. Latents whose decoding
    overflows float16 then decode as diffusers' upcast VAE decodes them; with force_upcast false the VAE stays in
    float16 and overflows."""
    folder, reference = folders["base"]
    config = json.loads((folder / "vae" / "config.json").read_text())
    assert config["force_upcast"] is True
    plain = tmp_path / "plain"  # the same model, its VAE config saying force_upcast false
    (plain / "vae").mkdir(parents=True)
    for path in folder.iterdir():
        if path.name != "vae":
            (plain / path.name).symlink_to(path)
    (plain / "vae" / "config.json").write_text(json.dumps({**config, "force_upcast": False}))
    weights = "vae/diffusion_pytorch_model.safetensors"
    (plain / weights).symlink_to(folder / weights)

    # +-6e4 fits float16 (its largest number is 65504), yet the tiny VAE's first convolutions overflow it (from
    # about +-4e4 on), as SDXL's VAE does deeper inside with ordinary latents
    latents = 6e4 * np.sign(np.random.default_rng(3).normal(size=(1, 16, 16, 4))).astype(np.float32)
    with torch.no_grad():  # diffusers' float16 weights, upcast
        expected = nhwc(copy.deepcopy(reference.vae).half().float().decode(nchw(latents)).sample)
    assert np.isfinite(expected).all()
    params, pixels = float16_vae_decode(folder, latents)
    assert params == {np.dtype(np.float32)} and pixels.dtype == np.float32
    assert_close(pixels, expected)
    params, pixels = float16_vae_decode(plain, latents)
    assert params == {np.dtype(np.float16)} and pixels.dtype == np.float16
    assert not np.isfinite(pixels).all()
    # the rule: float32 under float16 and bfloat16, force_upcast true when absent (diffusers' default)
    assert vae_dtype(jnp.bfloat16, {}) == jnp.float32 and vae_dtype(jnp.float32, config) == jnp.float32
    with pytest.raises(ConfigError, match="'force_upcast' = 'yes' should be true or false"):
        vae_dtype(jnp.float16, {"force_upcast": "yes"})


@pytest.mark.parametrize("model, pipeline_class", [("base", StableDiffusionXLPipeline),
                                                    ("refiner", StableDiffusionXLImg2ImgPipeline)])
def test_save_pretrained_round_trips_through_diffusers(model, pipeline_class, request, folders, tmp_path):
    pipeline, reference = request.getfixturevalue(model)
    pipeline.save_pretrained(tmp_path / "saved")
    loaded = pipeline_class.from_pretrained(tmp_path / "saved")
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(loaded, name), getattr(reference, name)
        if theirs is None:
            assert ours is None
            continue
        expected = torch_state_dict(theirs)
        assert {key: value.tobytes() for key, value in torch_state_dict(ours).items()} == {
            key: value.tobytes() for key, value in expected.items()}, name
    for key in ("force_zeros_for_empty_prompt", "requires_aesthetics_score"):
        assert loaded.config.get(key) == reference.config.get(key), key
    assert loaded.tokenizer_2.pad_token == "!"
    again = sdjax.load_pipeline(tmp_path / "saved")
    assert again.sdxl_settings == pipeline.sdxl_settings and again.text_encoders == pipeline.text_encoders


def test_sdxl_arguments_are_refused_on_sd1(sd1_folder):
    pipeline = sdjax.load_pipeline(sd1_folder[0])
    for name, value in [("original_size", (64, 64)), ("negative_crops_coords_top_left", (0, 0)),
                        ("aesthetic_score", 6.0)]:
        with pytest.raises(InvalidArgumentError, match=f"{name} cannot be used here: this is an SD 1.x / 2.x"):
            pipeline.generate("a cat", sampler="euler", **{name: value})
    with pytest.raises(InvalidArgumentError, match="text_embeds, time_ids: only an SDXL U-Net takes them"):
        pipeline.unet_output(np.zeros((1, 8, 8, 4)), [1], np.zeros((1, 77, 32)), text_embeds=np.zeros((1, 16)),
                             time_ids=np.zeros((1, 6)))
    assert pipeline._executables == {}


def test_what_sdxl_does_not_support_is_refused_before_anything_runs(base, refiner):
    pipeline, _ = base
    compiled = len(pipeline._executables), len(refiner[0]._executables)
    image = np.zeros((1, SIZE, SIZE, 3), np.uint8)
    sd15_control = sdjax.Control(sdjax.ControlNet(SD15_CONTROLNET, params=None, name="control_v11p_sd15_canny"), image)
    cases = [
        (lambda: pipeline.generate("a cat", control=sd15_control),
         r"ControlNet 'control_v11p_sd15_canny' was not made for this pipeline's U-Net: its config has "
         r"block_out_channels \(320, 640, 1280, 1280\) \(the U-Net's: \(32, 64\)\); .*cross_attention_dim 768 \(the "
         r"U-Net's: 80\); addition_embed_type None \(the U-Net's: 'text_time'\).* Use a ControlNet trained for this "
         r"base model"),
        (lambda: pipeline.generate("a cat", prompt_syntax="a1111"), "prompt_syntax='a1111'"),
        (lambda: pipeline.encode_prompt(["a cat"], prompt_syntax="a1111"), "prompt_syntax='a1111'"),
        (lambda: pipeline.generate("a cat", aesthetic_score=6.0),
         "aesthetic_score cannot be used here: only an SDXL model with requires_aesthetics_score"),
        (lambda: refiner[0].img2img(image, "a cat", target_size=(32, 32)),
         "target_size cannot be used here: this SDXL model .* takes an aesthetic score, not a target size"),
        (lambda: pipeline.generate("a cat", original_size=(0, 64)),
         r"original_size must be a pair \(height, width\) of positive numbers, got \(0, 64\)"),
        (lambda: pipeline.generate("a cat", negative_crops_coords_top_left=(-1, 0)),
         r"negative_crops_coords_top_left must be a pair \(top, left\) of numbers >= 0"),
        (lambda: refiner[0].img2img(image, "a cat", negative_aesthetic_score=float("nan")),
         "negative_aesthetic_score must be a finite number"),
        (lambda: pipeline.generate("a cat", clip_skip=3), "clip_skip=3: .* an int from 0 to 2"),
        (lambda: pipeline.unet_output(np.zeros((1, 8, 8, 4)), [1], np.zeros((1, 77, 80))),
         "an SDXL U-Net needs text_embeds"),
    ]
    for call, message in cases:
        with pytest.raises(InvalidArgumentError, match=message):
            call()
    assert (len(pipeline._executables), len(refiner[0]._executables)) == compiled


def test_a_model_index_that_contradicts_the_unet_is_refused(folders, tmp_path):
    source = folders["base"][0]
    target = tmp_path / "model"
    target.mkdir()
    for path in source.iterdir():
        if path.name != "model_index.json":
            (target / path.name).symlink_to(path)
    index = json.loads((source / "model_index.json").read_text())
    (target / "model_index.json").write_text(json.dumps({**index, "requires_aesthetics_score": True}))
    with pytest.raises(ConfigError, match="projection_class_embeddings_input_dim is 64, .* 5 time ids of 8 "
                                          r"\(requires_aesthetics_score true\) make 56; 6 time ids would fit: set "
                                          "requires_aesthetics_score to false"):
        sdjax.load_pipeline(target)


def test_training_takes_the_sdxl_base_and_refuses_the_refiner_with_what_works_instead(base, refiner, folders):
    """The base trains at stage unet (tests/train/test_sdxl_training.py); the refiner's aesthetic-score conditioning
    is refused, naming what works."""
    from sdjax.errors import ConfigError
    from sdjax.train import load_config
    from sdjax.train.task import architectures
    from tests.train.conftest import EXPERIMENT

    settings = ["model.unet_config=", "data.resolution=16"]
    config = load_config(EXPERIMENT, [f"model.pretrained={folders['base'][0]}", *settings])
    assert sorted(architectures(config, base[0])) == ["text_encoder", "text_encoder_2", "unet", "vae"]
    config = load_config(EXPERIMENT, [f"model.pretrained={folders['refiner'][0]}", *settings])
    with pytest.raises(ConfigError, match="is an SDXL refiner .*SDXL base U-Nets.*stage=vae"):
        architectures(config, refiner[0])
    architectures(load_config(EXPERIMENT, [f"model.pretrained={folders['refiner'][0]}", *settings, "stage=vae"]),
                  refiner[0])


def test_prompt_2_matches_diffusers(base):
    """A second prompt and negative prompt for text_encoder_2 give diffusers' images; from the same compiled
    program, prompt_2=None, "" and the prompts themselves all give today's default (both encoders read prompt)."""
    pipeline, reference = base
    noise = np.random.default_rng(5).normal(size=(2, 16, 16, 4)).astype(np.float32)
    second = dict(prompt_2="a watercolour of a lighthouse", negative_prompt_2="low quality")
    ours, images, latents = run_both(pipeline, reference, latents=noise, negative=NEGATIVE, guidance_scale=5.0,
                                     **second)
    assert ours.settings["prompts_2"] == [second["prompt_2"]] * 2
    check_images(ours.images, images)
    assert_close(ours.latents, latents, LATENT_TOLERANCE)
    default = pipeline.generate(PROMPTS, NEGATIVE, steps=3, latents=noise, guidance_scale=5.0)
    assert default.compile_seconds == 0 and errors(default.latents, ours.latents)[0] > 1e-3
    for same in (dict(prompt_2="", negative_prompt_2=""), dict(prompt_2=PROMPTS, negative_prompt_2=NEGATIVE)):
        again = pipeline.generate(PROMPTS, NEGATIVE, steps=3, latents=noise, guidance_scale=5.0, **same)
        assert again.compile_seconds == 0
        np.testing.assert_array_equal(again.latents, default.latents)


def test_denoising_cut_matches_diffusers_timesteps():
    """denoising_end and denoising_start keep the steps diffusers' SDXL pipelines keep, for each class sdjax cuts,
    several spacings, step counts and fractions (no model needed: the plans' timesteps against the schedulers')."""
    from types import SimpleNamespace

    import diffusers
    from sdjax import schedules
    from sdjax.scheduler_config import HANDOFF_CLASSES, plan_from_scheduler_config, resolve_config

    for name in HANDOFF_CLASSES:
        for spacing in ("leading", "linspace", "trailing"):
            clip = {"clip_sample": False} if name == "DDIMScheduler" else {}  # sdjax refuses DDIM's clipping
            settings = {**fixtures.SDXL_SCHEDULER, **clip, "timestep_spacing": spacing}
            scheduler = getattr(diffusers, name)(**settings)
            config = dict(scheduler.config, _class_name=name)
            alphas_cumprod = schedules.alphas_cumprod_from_config(resolve_config(config))
            for steps in (4, 5, 10, 25):
                plan = plan_from_scheduler_config(config, steps, alphas_cumprod)
                scheduler.set_timesteps(steps)
                full = scheduler.timesteps.numpy()
                for fraction in (0.2, 0.5, 0.6, 0.8, 0.95):
                    cutoff = round(1000 - fraction * 1000)  # diffusers' denoising_end rule, as in its pipeline
                    expected = {"end": full[full >= cutoff]}
                    expected["start"] = pipeline_stable_diffusion_xl_img2img.StableDiffusionXLImg2ImgPipeline \
                        .get_timesteps(SimpleNamespace(scheduler=scheduler), steps, 1.0, "cpu", fraction)[0].numpy()
                    for side, kept in expected.items():
                        cut = {"start": None, "end": None, side: fraction}
                        if kept.size == 0:
                            with pytest.raises(InvalidArgumentError, match="leaves no step to run"):
                                plan.for_denoising(cut["start"], cut["end"], 1000)
                            continue
                        ours = plan.for_denoising(cut["start"], cut["end"], 1000)
                        where = f"{name} {spacing} steps={steps} {side}={fraction}"
                        np.testing.assert_allclose(ours.timesteps, kept, atol=1e-3, err_msg=where)
                        assert ours.steps == kept.size, where


def scheduler_copy(folder, scheduler, tmp_path, name):
    """A copy of an SDXL folder with a diffusers scheduler config of another class, and that scheduler."""
    import shutil

    import diffusers
    config = getattr(diffusers, scheduler).from_config(json.loads((folder / "scheduler" /
                                                                   "scheduler_config.json").read_text()))
    shutil.copytree(folder, tmp_path / name)
    config.save_config(tmp_path / name / "scheduler")
    return tmp_path / name, config


@pytest.mark.parametrize("scheduler", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_base_then_refiner_with_denoising_end_and_start_matches_diffusers(folders, base, refiner, scheduler,
                                                                          tmp_path):
    """The ensemble of expert denoisers: the base runs the first 60% of the schedule (denoising_end) and hands its
    latents, in the scheduler's own scaling (VE for Euler, VP for DPM-Solver++), to the refiner, which runs the rest
    without new noise (denoising_start). Both stages share a scheduler class, as in diffusers' example; the fixture
    base has Euler and the refiner DPM-Solver++, so one of them is a copy with the other's."""
    (base_folder, base_reference), (refiner_folder, refiner_reference) = folders["base"], folders["refiner"]
    first, second = base[0], refiner[0]
    if scheduler == "EulerDiscreteScheduler":
        folder, config = scheduler_copy(refiner_folder, scheduler, tmp_path, "refiner")
        second = sdjax.load_pipeline(folder)
        refiner_reference = StableDiffusionXLImg2ImgPipeline(
            **{**refiner_reference.components, "scheduler": config}, requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False, add_watermarker=False)
    else:
        folder, config = scheduler_copy(base_folder, scheduler, tmp_path, "base")
        first = sdjax.load_pipeline(folder)
        base_reference = StableDiffusionXLPipeline(**{**base_reference.components, "scheduler": config},
                                                   add_watermarker=False)
    prompt, steps, split = PROMPTS[1], 5, 0.6
    noise = torch_noise((1, 16, 16, 4), 6)
    stage_1 = first.generate(prompt, NEGATIVE[0], steps=steps, guidance_scale=5.0, latents=noise,
                             denoising_end=split)
    handed, decoded = (base_reference(prompt, negative_prompt=NEGATIVE[0], num_inference_steps=steps,
                                      guidance_scale=5.0, latents=nchw(noise), denoising_end=split,
                                      output_type=kind).images for kind in ("latent", "np"))
    # 5 leading timesteps, Euler's 801 ... 1 and DPM-Solver's 831 ... 167, both put 3 at or above 400
    assert stage_1.settings["steps"] == 3
    assert_close(stage_1.latents, nhwc(handed), LATENT_TOLERANCE)
    check_images(stage_1.images, decoded)  # the partly denoised latents decoded as they are, as diffusers does

    final = second.img2img(stage_1, prompt, steps=steps, guidance_scale=5.0, denoising_start=split)
    assert final.settings["steps"] == 2
    theirs = {kind: refiner_reference(prompt, image=handed, num_inference_steps=steps, guidance_scale=5.0,
                                      denoising_start=split, output_type=kind).images for kind in ("latent", "np")}
    assert_close(final.latents, nhwc(theirs["latent"]), LATENT_TOLERANCE)
    check_images(final.images, theirs["np"])


def test_bad_prompt_2_and_denoising_values_are_refused_before_compiling(base, refiner, sd1_folder):
    pipeline, _ = base
    compiled = len(pipeline._executables), len(refiner[0]._executables)
    latents = np.zeros((1, 16, 16, 4), np.float32)
    cases = [
        (lambda: refiner[0].img2img(np.zeros((1, SIZE, SIZE, 3), np.uint8), "a cat", prompt_2="a dog"),
         "prompt_2 / negative_prompt_2 cannot be used with this SDXL model: it has one text encoder"),
        (lambda: pipeline.generate(["a cat", "a dog"], prompt_2=["x", "y", "z"]), "prompt_2 has 3 entries for 2"),
        (lambda: pipeline.generate("a cat", negative_prompt_2=[1]), "negative_prompt_2 must be a string or a list"),
        (lambda: pipeline.generate("a cat", denoising_end=1.0), "denoising_end must be a number strictly between"),
        (lambda: pipeline.generate("a cat", denoising_end=0), "denoising_end must be a number strictly between"),
        (lambda: pipeline.generate("a cat", denoising_end=True), "denoising_end must be a number strictly between"),
        (lambda: pipeline.img2img(latents, "a cat", denoising_start=-0.2),
         "denoising_start must be a number strictly between"),
        (lambda: pipeline.generate("a cat", latents=latents, denoising_start=0.8, denoising_end=0.5),
         "denoising_start=0.8 must be below denoising_end=0.5"),
        (lambda: pipeline.generate("a cat", denoising_start=0.5), "denoising_start continues partly denoised latents"),
        (lambda: pipeline.img2img(latents, "a cat", denoising_start=0.5, noise=latents),
         "noise cannot be used with denoising_start"),
        (lambda: pipeline.generate("a cat", steps=5, denoising_end=0.1),
         r"denoising_end=0.1 with steps=5 leaves no step to run \(timesteps \[801.0, 601.0"),
        (lambda: pipeline.inpaint(np.zeros((1, SIZE, SIZE, 3), np.uint8), np.ones((1, SIZE, SIZE), np.uint8),
                                  "a cat", denoising_end=0.8),
         r"denoising_end with inpainting \(a mask\) is not supported"),
        (lambda: pipeline.generate("a cat", sampler="euler", denoising_end=0.8),
         "denoising_start / denoising_end cut the schedule at diffusers' timesteps, .* EulerDiscreteScheduler"),
        (lambda: pipeline.img2img(np.zeros((1, SIZE, SIZE, 3), np.uint8), "a cat", denoising_start=0.5),
         r"with denoising_start, image must be the partly denoised latents \(N, h, w, 4\)"),
    ]
    for call, message in cases:
        with pytest.raises(InvalidArgumentError, match=message):
            call()
    assert (len(pipeline._executables), len(refiner[0]._executables)) == compiled
    with pytest.raises(InvalidArgumentError, match="prompt_2 / negative_prompt_2 are for SDXL's second"):
        sdjax.load_pipeline(sd1_folder[0]).generate("a cat", sampler="euler", prompt_2="a dog")
