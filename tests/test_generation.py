"""Generation end to end against diffusers' Stable Diffusion pipelines in torch (the same tiny folders, the same
starting noise), plus seeds, compilation counts and input errors."""
import numpy as np
import pytest
import torch
from PIL import Image
from diffusers import (EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline,
                       StableDiffusionPipeline)
from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img, pipeline_stable_diffusion_inpaint

import sdjax
from sdjax.errors import InvalidArgumentError, NonFiniteOutputError
from tests.fixtures import assert_images_match, nchw

PROMPTS = ["a photo of a cat", "an astronaut riding a horse"]
NEGATIVE = ["blurry", "ugly"]
SIZE = 32  # pixels; latents are 16x16 with the tiny VAE


def torch_noise(shape_nhwc, seed):
    """The noise diffusers draws from torch.Generator(seed), as NHWC numpy."""
    n, h, w, c = shape_nhwc
    return torch.randn((n, c, h, w), generator=torch.Generator().manual_seed(seed)).numpy().transpose(0, 2, 3, 1)


def euler_components(reference):
    """The reference pipeline's components with diffusers' Euler scheduler on linspace timesteps."""
    scheduler = EulerDiscreteScheduler.from_config(reference.scheduler.config, timestep_spacing="linspace")
    return {**reference.components, "scheduler": scheduler}


@pytest.fixture
def encode_with_posterior_mean(monkeypatch):
    """diffusers samples the VAE posterior for img2img/inpainting; sdjax uses its mean. Make diffusers use the
    mean too, so both start from the same latents."""
    def mean_latents(encoder_output, generator=None, sample_mode="sample"):
        return encoder_output.latent_dist.mode()
    for module in (pipeline_stable_diffusion_img2img, pipeline_stable_diffusion_inpaint):
        monkeypatch.setattr(module, "retrieve_latents", mean_latents)


@pytest.fixture(scope="module", params=["sd1", pytest.param("sd2", marks=pytest.mark.slow)])
def loaded(request):
    folder, reference = request.getfixturevalue(f"{request.param}_folder")
    return sdjax.load_pipeline(folder), reference


def test_txt2img_matches_diffusers(loaded):
    pipeline, reference = loaded
    noise = np.random.default_rng(0).normal(size=(2, 16, 16, 4)).astype(np.float32)
    ours = pipeline.generate(PROMPTS, NEGATIVE, steps=6, guidance_scale=7.0, sampler="euler", schedule="linspace",
                             latents=noise, height=SIZE, width=SIZE)
    theirs = StableDiffusionPipeline(**euler_components(reference))(
        PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=6, guidance_scale=7.0, latents=nchw(noise),
        height=SIZE, width=SIZE, output_type="np").images
    assert_images_match(ours.images, theirs)


@pytest.mark.parametrize("model, sampler", [("sd1", "euler"), pytest.param("sd2", None, marks=pytest.mark.slow)])
def test_img2img_matches_diffusers(model, sampler, request, encode_with_posterior_mean):
    folder, reference = request.getfixturevalue(f"{model}_folder")
    pipeline = sdjax.load_pipeline(folder)
    image = np.random.default_rng(1).integers(0, 256, (1, SIZE, SIZE, 3), dtype=np.uint8)
    noise = torch_noise((1, 16, 16, 4), seed=3)
    ours = pipeline.img2img(image, PROMPTS[0], NEGATIVE[0], strength=0.6, steps=5, guidance_scale=7.0,
                            sampler=sampler, schedule="linspace" if sampler else None, noise=noise)
    components = euler_components(reference) if sampler else reference.components  # else the folder's DDIM
    theirs = StableDiffusionImg2ImgPipeline(**components)(
        PROMPTS[0], image=Image.fromarray(image[0]), negative_prompt=NEGATIVE[0], strength=0.6, num_inference_steps=5,
        guidance_scale=7.0, generator=torch.Generator().manual_seed(3), output_type="np").images
    assert_images_match(ours.images, theirs)


@pytest.mark.parametrize("model", ["sd1_folder", "sd1_inpaint_folder"])
def test_inpaint_matches_diffusers(model, request, encode_with_posterior_mean):
    folder, reference = request.getfixturevalue(model)
    pipeline = sdjax.load_pipeline(folder)
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (1, SIZE, SIZE, 3), dtype=np.uint8)
    mask = np.zeros((1, SIZE, SIZE), np.uint8)
    mask[:, 8:24, 4:20] = 255
    noise = rng.normal(size=(1, 16, 16, 4)).astype(np.float32)
    ours = pipeline.inpaint(image, mask, PROMPTS[1], NEGATIVE[1], steps=5, guidance_scale=7.0, sampler="euler",
                            schedule="linspace", noise=noise)
    theirs = StableDiffusionInpaintPipeline(**euler_components(reference))(
        PROMPTS[1], image=Image.fromarray(image[0]), mask_image=Image.fromarray(mask[0]), negative_prompt=NEGATIVE[1], num_inference_steps=5,
        guidance_scale=7.0, latents=nchw(noise), height=SIZE, width=SIZE, output_type="np").images
    assert_images_match(ours.images, theirs)
    if pipeline.is_inpainting_model:
        return
    # An ordinary U-Net keeps the unmasked region: its final latents are the image's own latents there.
    image_latents = np.asarray(pipeline.encode_image(image))
    keep = np.asarray(mask[:, ::2, ::2] < 128)
    np.testing.assert_allclose(ours.latents[keep], image_latents[keep], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_an_image_depends_only_on_its_seed(sd1_folder):
    pipeline = sdjax.load_pipeline(sd1_folder[0])
    settings = dict(steps=3, sampler="euler_ancestral", schedule="karras", height=SIZE, width=SIZE)
    alone = pipeline.generate("a cat", seed=11, batch_invariant=True, **settings)
    batch = pipeline.generate(["a dog", "red", "a cat", "blue"], seeds=[5, 6, 11, 7], batch_invariant=True,
                              **settings)
    np.testing.assert_array_equal(batch.images[2], alone.images[0])
    np.testing.assert_array_equal(batch.latents[2], alone.latents[0])
    # Batched (vmap) kernels may round differently at another batch size, but the noise is the same.
    fast = pipeline.generate(["a dog", "red", "a cat", "blue"], seeds=[5, 6, 11, 7], **settings)
    assert np.abs(fast.images[2].astype(int) - alone.images[0]).max() <= 1
    other_seed = pipeline.generate("a cat", seed=12, batch_invariant=True, **settings)
    assert np.abs(other_seed.images[0].astype(int) - alone.images[0]).max() > 10


@pytest.mark.slow
def test_prompt_seed_and_guidance_changes_do_not_recompile(sd1_folder):
    pipeline = sdjax.load_pipeline(sd1_folder[0])
    settings = dict(steps=3, sampler="dpmpp_2m", schedule="karras", height=SIZE, width=SIZE)
    first = pipeline.generate("a cat", seed=1, guidance_scale=7.0, **settings)
    assert first.compile_seconds > 0
    for prompt, seed, guidance in [("a dog", 2, 3.0), ("red moon", 3, 9.5), ("", 4, 1.0)]:
        again = pipeline.generate(prompt, "blurry", seed=seed, guidance_scale=guidance, **settings)
        assert again.compile_seconds == 0
    assert len(pipeline._executables) == 1
    pipeline.generate("a cat", steps=4, sampler="dpmpp_2m", schedule="karras", height=SIZE, width=SIZE)
    assert len(pipeline._executables) == 2  # a new step count is a new program


def test_bad_inputs_fail_before_any_compilation(sd1_folder):
    pipeline = sdjax.load_pipeline(sd1_folder[0])
    image = np.zeros((1, SIZE, SIZE, 3), np.uint8)
    with pytest.raises(InvalidArgumentError, match="height=33 must be a positive multiple of the VAE factor 2"):
        pipeline.generate("a cat", height=33, width=SIZE, sampler="euler")
    with pytest.raises(InvalidArgumentError, match="unknown sampler 'eular'. Did you mean 'euler'"):
        pipeline.generate("a cat", sampler="eular")
    with pytest.raises(InvalidArgumentError, match=r"image: float values must lie in \[0, 1\] \(found -1 to 1\)"):
        pipeline.img2img(np.linspace(-1, 1, SIZE * SIZE * 3).reshape(SIZE, SIZE, 3), "a cat", sampler="euler")
    with pytest.raises(InvalidArgumentError, match=r"strength must be within \[0, 1\], got 1.5"):
        pipeline.img2img(image, "a cat", strength=1.5, sampler="euler")
    with pytest.raises(InvalidArgumentError, match="mask must be .* the image's size 32x32"):
        pipeline.inpaint(image, np.zeros((1, 16, 32), np.uint8), "a cat", sampler="euler")
    with pytest.raises(InvalidArgumentError, match=r"seeds has 1 entries for 2 images"):
        pipeline.generate(["a", "b"], seeds=[1], sampler="euler")
    for setting in ("guidance_scale", "guidance_rescale"):
        with pytest.raises(InvalidArgumentError, match=f"{setting} must be a finite number, got nan"):
            pipeline.generate("a cat", sampler="euler", **{setting: float("nan")})
    with pytest.raises(InvalidArgumentError, match="latents/noise hold NaN or inf"):
        pipeline.generate("a cat", latents=np.full((1, SIZE // 2, SIZE // 2, 4), np.inf), sampler="euler")
    assert pipeline._executables == {}


@pytest.mark.slow
def test_nan_weights_or_an_overflow_raise_instead_of_giving_black_images(sd1_folder):
    """With the progress bar: its windowed program decodes in one branch and returns blanks in the other."""
    pipeline = sdjax.load_pipeline(sd1_folder[0])
    settings = dict(steps=2, sampler="euler", schedule="karras", height=SIZE, width=SIZE, seeds=[3, 4],
                    show_progress=True)
    kernel = pipeline.params["vae"]["decoder"]["conv_out"]["kernel"]
    damaged = np.array(kernel)
    damaged[0, 0, 0, 0] = np.nan
    pipeline.params["vae"]["decoder"]["conv_out"]["kernel"] = damaged
    with pytest.raises(NonFiniteOutputError, match=r"2 of 2 images came out NaN/inf .*seeds \[3, 4\].*"
                                                   r"\['vae'\]\['decoder'\]\['conv_out'\]\['kernel'\]") as error:
        pipeline.generate("a cat", **settings)
    assert error.value.result.images.shape == (2, SIZE, SIZE, 3)
    pipeline.params["vae"]["decoder"]["conv_out"]["kernel"] = np.full_like(damaged, 1e38)  # finite; sums overflow
    with pytest.raises(NonFiniteOutputError, match="the weights are finite, so the computation overflowed"):
        pipeline.generate("a cat", **settings)


@pytest.fixture(scope="module")
def controlnet_folders(sd1_folder, tmp_path_factory):
    """Two perturbed diffusers ControlNets for the tiny SD1 U-Net, saved as diffusers folders."""
    from diffusers import ControlNetModel

    from tests.models import perturb_
    folders, models = [], []
    for seed in (5, 6):
        model = perturb_(ControlNetModel.from_unet(sd1_folder[1].unet, conditioning_embedding_out_channels=(16, 32)),
                        seed=seed)
        folder = tmp_path_factory.mktemp("controlnet") / f"controlnet-{seed}"
        model.save_pretrained(folder, safe_serialization=True)
        folders.append(folder)
        models.append(model)
    return folders, models


@pytest.mark.parametrize("guess_mode", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_controlnet_matches_diffusers(sd1_folder, controlnet_folders, guess_mode):
    from diffusers import MultiControlNetModel, StableDiffusionControlNetPipeline
    folder, reference = sd1_folder
    pipeline = sdjax.load_pipeline(folder)
    rng = np.random.default_rng(4)
    hints = [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(2)]
    noise = rng.normal(size=(1, 16, 16, 4)).astype(np.float32)
    windows = [(0.0, 0.6), (0.2, 1.0)]
    scales = [0.7, 1.3]
    controls = [sdjax.Control(sdjax.load_controlnet(f), hint, scale=scale, start=start, end=end)
                for f, hint, scale, (start, end) in zip(controlnet_folders[0], hints, scales, windows)]
    ours = pipeline.generate(PROMPTS[0], NEGATIVE[0], steps=5, guidance_scale=7.0, sampler="euler",
                             schedule="linspace", latents=noise, height=SIZE, width=SIZE, control=controls,
                             guess_mode=guess_mode)
    theirs = StableDiffusionControlNetPipeline(
        **euler_components(reference), controlnet=MultiControlNetModel(controlnet_folders[1]))(
        PROMPTS[0], image=[Image.fromarray(h) for h in hints], negative_prompt=NEGATIVE[0], num_inference_steps=5,
        guidance_scale=7.0, latents=nchw(noise), height=SIZE, width=SIZE, controlnet_conditioning_scale=scales,
        control_guidance_start=[w[0] for w in windows], control_guidance_end=[w[1] for w in windows],
        guess_mode=guess_mode, output_type="np").images
    assert_images_match(ours.images, theirs)


def test_control_image_of_the_wrong_size_is_refused(sd1_folder, controlnet_folders):
    pipeline = sdjax.load_pipeline(sd1_folder[0])
    control = sdjax.Control(sdjax.load_controlnet(controlnet_folders[0][0]), np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(InvalidArgumentError, match=r"control image 0 has shape \(1, 16, 16, 3\); expected .*32x32"):
        pipeline.generate("a cat", height=SIZE, width=SIZE, sampler="euler", control=control)
    assert pipeline._executables == {}


# Schedulers honoured from scheduler_config.json with sampler=None. Every diffusers class and option is checked
# against diffusers' step-by-step loop in tests/test_scheduler_config.py; here the real pipeline runs one case of
# each way a plan drives the U-Net, on both tiny models (SD1: epsilon, SD2: v-prediction; the folders' own
# schedulers are SD 1.5's PNDM and SD 2.1's DDIM configs): PNDM's repeated timestep, a multistep history, a
# singlestep order pattern, two evaluations a step (Heun), a sigma grid (Euler, leading spacing), Karras sigmas
# rounded to timesteps (KDPM2's pinned midpoints), uneven strides (trailing DDIM).
SCHEDULER_CASES = [
    ("sd1", "PNDMScheduler", {}),
    ("sd1", "DPMSolverMultistepScheduler", {}),
    ("sd2", "DPMSolverSinglestepScheduler", {}),
    ("sd2", "HeunDiscreteScheduler", {}),
    ("sd2", "EulerDiscreteScheduler", {"timestep_spacing": "leading"}),
    ("sd1", "KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
    ("sd1", "DDIMScheduler", {"timestep_spacing": "trailing", "clip_sample": False}),
]


def folder_with_scheduler(folder, scheduler, target):
    """A copy of a model folder (components linked, not copied) whose scheduler config is `scheduler`'s."""
    import json
    target.mkdir()
    for component in ("unet", "vae", "text_encoder", "tokenizer"):
        (target / component).symlink_to(folder / component)
    scheduler.save_config(target / "scheduler")
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", type(scheduler).__name__]
    (target / "model_index.json").write_text(json.dumps(index))
    return target


# The fast tier (-m "not slow") runs one multistep class on SD1 and one Euler-family class on SD2.
FAST_SCHEDULER_CASES = [("sd1", "DPMSolverMultistepScheduler", {}),
                        ("sd2", "EulerDiscreteScheduler", {"timestep_spacing": "leading"})]


@pytest.mark.parametrize("model, class_name, overrides", [
    pytest.param(m, c, o, id=f"{m}-{c}{'-' + '-'.join(o) if o else ''}",
                 marks=() if (m, c, o) in FAST_SCHEDULER_CASES else pytest.mark.slow) for m, c, o in SCHEDULER_CASES])
def test_scheduler_config_is_honoured_like_diffusers(model, class_name, overrides, request, tmp_path):
    import diffusers
    folder, reference = request.getfixturevalue(f"{model}_folder")
    scheduler = getattr(diffusers, class_name).from_config(reference.scheduler.config, **overrides)
    pipeline = sdjax.load_pipeline(folder_with_scheduler(folder, scheduler, tmp_path / "model"))
    noise = np.random.default_rng(5).normal(size=(1, 16, 16, 4)).astype(np.float32)
    ours = pipeline.generate(PROMPTS[1], NEGATIVE[1], steps=5, guidance_scale=7.0, latents=noise, height=SIZE,
                             width=SIZE)
    theirs = StableDiffusionPipeline(**{**reference.components, "scheduler": scheduler})(
        PROMPTS[1], negative_prompt=NEGATIVE[1], num_inference_steps=5, guidance_scale=7.0, latents=nchw(noise),
        height=SIZE, width=SIZE, output_type="np").images
    assert_images_match(ours.images, theirs)


def test_the_pure_function_under_pmap_and_jit_gives_the_images_of_generate(sd1_folder):
    """diffusers-Flax style: params replicated by pmap, per-image inputs split along a leading device axis."""
    import jax
    pipeline = sdjax.load_pipeline(sd1_folder[0])
    call = pipeline.prepare(["a cat", "a dog", "red", "blue"], steps=3, sampler="dpmpp_2m", height=SIZE,
                            width=SIZE, seeds=[3, 1, 4, 1], batch_invariant=True)
    expected = call.run().images
    fn, inputs = call.function(), call.per_image_inputs
    assert set(inputs) == {"cond_ids", "uncond_ids", "seeds", "guidance_scale", "guidance_rescale"}
    per_device = jax.tree.map(lambda v: v.reshape(4, 1, *v.shape[1:]), inputs)
    images, finite = jax.pmap(fn, in_axes=(None, 0), devices=jax.devices()[:4])(call.params, per_device)
    assert images.shape == (4, 1, SIZE, SIZE, 3) and bool(np.all(finite))
    assert np.abs(np.asarray(images).reshape(expected.shape).astype(int) - expected).max() <= 1
    jitted, _ = jax.jit(fn)(call.params, inputs)
    assert np.abs(np.asarray(jitted).astype(int) - expected).max() <= 1


# Classes whose steps follow a per-step pattern (orders, warm-up, a state carried between steps): img2img cuts the
# schedule at int(steps * strength) from the end, at an odd (10 steps, strength 0.5) and an even (0.6) index.
# Not here: PNDM and LMS, where diffusers' img2img is not a consistent solver after the cut and sdjax restarts the
# method instead. diffusers' PNDM runs its Heun start on the first two kept timesteps, then evaluates the U-Net
# one timestep below the sample's noise level (the full schedule's repeated second timestep is not in the tail);
# its LMS uses the full schedule's order (4) at the first kept step with one derivative in its history.
# UniPC, DEIS (the multistep warm-up, as DPMSolverMultistep) and KDPM2 (two evaluations a step, as Heun) were
# checked the same way and match; the suite keeps one class of each kind.
CUT_SCHEDULERS = [("DPMSolverSinglestepScheduler", {}), ("DPMSolverSinglestepScheduler", {"solver_order": 3}),
                  ("DPMSolverMultistepScheduler", {}), ("HeunDiscreteScheduler", {})]


@pytest.mark.parametrize("class_name, overrides", [
    pytest.param(c, o, id=c + "".join(f"-{k}={v}" for k, v in o.items()),
                 marks=() if c == "DPMSolverSinglestepScheduler" else pytest.mark.slow) for c, o in CUT_SCHEDULERS])
def test_img2img_cuts_a_scheduler_config_like_diffusers(class_name, overrides, sd1_folder, tmp_path,
                                                         encode_with_posterior_mean):
    import diffusers
    folder, reference = sd1_folder
    scheduler = getattr(diffusers, class_name).from_config(reference.scheduler.config, **overrides)
    pipeline = sdjax.load_pipeline(folder_with_scheduler(folder, scheduler, tmp_path / "model"))
    image = np.random.default_rng(6).integers(0, 256, (1, SIZE, SIZE, 3), dtype=np.uint8)
    noise = torch_noise((1, 16, 16, 4), seed=4)
    # Both cuts where the pattern is the schedule's (singlestep); the odd one, the harder, elsewhere.
    for strength in (0.5, 0.6) if class_name == "DPMSolverSinglestepScheduler" else (0.5,):
        ours = pipeline.img2img(image, PROMPTS[0], NEGATIVE[0], strength=strength, steps=10, guidance_scale=7.0,
                                noise=noise)
        theirs = StableDiffusionImg2ImgPipeline(**{**reference.components, "scheduler": scheduler})(
            PROMPTS[0], image=Image.fromarray(image[0]), negative_prompt=NEGATIVE[0], strength=strength,
            num_inference_steps=10, guidance_scale=7.0, generator=torch.Generator().manual_seed(4),
            output_type="np").images
        assert_images_match(ours.images, theirs)
