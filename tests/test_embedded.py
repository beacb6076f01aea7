"""The shapes model that ships inside sdjax: `load_pipeline()` with no argument, `sdjax generate` without --model,
its files, diffusers parity, and that it draws what it is asked to (read back by the shapes evaluator)."""
import json
import shutil
import warnings

import numpy as np
import pytest
from PIL import Image
from transformers import CLIPTokenizer

import sdjax
from experiments.shapes import evaluate
from experiments.shapes.dataset import held_out_prompts
from sdjax.embedded import EMBEDDED_MODEL, OutOfDomainPromptWarning, unknown_words
from tests.fixtures import assert_images_match, nchw
from tests.test_cli import sdjax_command


@pytest.fixture(scope="module")
def pipeline():
    return sdjax.load_pipeline()


def test_load_pipeline_without_a_model_loads_the_embedded_one(pipeline):
    assert pipeline.is_embedded and pipeline.configs["vae"].latent_channels == 4
    result = pipeline.generate("a red circle on a blue background", steps=2)  # the program img2img's test reuses
    assert result.images.shape == (1, 64, 64, 3) and result.images.dtype == np.uint8
    assert result.settings["sampler"] == "dpmpp_2m"  # the folder's DPMSolverMultistep (Karras) config
    assert result.settings["guidance_scale"] == 3.0  # its own best scale, not SD's 7.5
    assert pipeline.generate("a red circle", steps=2, seeds=[3, 4, 5]).images.shape == (3, 64, 64, 3)


@pytest.mark.slow
def test_img2img_takes_one_image_as_a_path_a_pil_image_or_an_array(pipeline, tmp_path):
    start = pipeline.generate("a red circle on a blue background", steps=2).images[0]
    Image.fromarray(start).save(tmp_path / "start.png")
    settings = dict(strength=0.5, steps=2, seed=1)
    batch = pipeline.img2img(start[None], "a green square", **settings).images
    for image in (start, Image.fromarray(start), tmp_path / "start.png"):
        np.testing.assert_array_equal(pipeline.img2img(image, "a green square", **settings).images, batch)
    # float images mean [0, 1], as masks and control images do
    as_float = pipeline.img2img(start / np.float32(255), "a green square", **settings).images
    assert np.abs(as_float.astype(int) - batch).max() <= 1


@pytest.mark.slow
def test_latents_alone_decide_the_image_size(pipeline):
    latents = np.random.default_rng(0).normal(size=(1, 8, 4, 4)).astype(np.float32)
    factor = pipeline.configs["vae"].downscale_factor
    assert pipeline.generate("a red circle", steps=2, latents=latents).images.shape == (1, 8 * factor, 4 * factor, 3)


@pytest.mark.slow
def test_the_progress_bar_changes_nothing_but_the_output_on_stderr(pipeline, capsys):
    settings = dict(steps=2, seeds=[3, 4, 5])  # the whole program of the first test
    quiet = pipeline.generate("a red circle", **settings)
    shown = pipeline.generate("a red circle", show_progress=True, **settings)
    np.testing.assert_array_equal(shown.images, quiet.images)
    assert "dpmpp_2m 2/2 [" in capsys.readouterr().err  # the folder's scheduler, DPM-Solver++(2M)


def test_the_shipped_folder_is_small_half_precision_and_has_clip_tokenizer_files(pipeline, tmp_path):
    files = [p for p in EMBEDDED_MODEL.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 25 * 2**20
    for component in ("unet", "vae", "text_encoder"):
        data = next((EMBEDDED_MODEL / component).glob("*.safetensors")).read_bytes()
        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
        assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F16"}
    # Loaded from vocab.json + merges.txt alone, as CLIP's original tokenizer files are.
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"):
        shutil.copy(EMBEDDED_MODEL / "tokenizer" / name, tmp_path / name)
    prompt = "purple background, small green square at the top"
    assert (CLIPTokenizer.from_pretrained(tmp_path)(prompt)["input_ids"]
            == pipeline.tokenizer(prompt)["input_ids"])
    # Every word of the held-out phrasings was learned as a whole word.
    assert {w for p, _ in held_out_prompts(240) for w in unknown_words(pipeline.tokenizer.get_vocab(), p)} == set()


@pytest.mark.slow
def test_diffusers_draws_the_same_image_from_the_same_latents(pipeline):
    import torch
    from diffusers import StableDiffusionPipeline

    reference = StableDiffusionPipeline.from_pretrained(EMBEDDED_MODEL, torch_dtype=torch.float32,
                                                        safety_checker=None, requires_safety_checker=False)
    prompts = ["a small red circle on the left on a blue background", "yellow background, big black triangle"]
    noise = np.random.default_rng(0).normal(size=(2, 8, 8, 4)).astype(np.float32)
    ours = pipeline.generate(prompts, steps=20, guidance_scale=7.5, latents=noise)
    theirs = reference(prompts, num_inference_steps=20, guidance_scale=7.5, latents=nchw(noise),
                       output_type="np").images
    assert_images_match(ours.images, theirs)


@pytest.mark.slow
def test_it_draws_what_held_out_prompts_ask_for(pipeline):
    # A floor under today's model (87% of 200 held-out prompts have all five attributes right at guidance 3, the
    # shape kind 87%; on these 48 prompts 85% and 92%; the target is 90%), about 3.5 standard errors of 48
    # prompts below it, and far above chance (1/3) for the shape kind, the hardest attribute.
    pairs = held_out_prompts(48, seed=2024)
    setting = evaluate.Setting("dpmpp_2m", 20, 3.0)
    images = evaluate.generate(pipeline, [p for p, _ in pairs], setting, seed=0, batch=48)
    scores = evaluate.adherence(images, [s for _, s in pairs])
    assert scores["all"] >= 0.7 and scores["shape"] >= 0.75, scores
    assert scores["background"] >= 0.85 and scores["position"] >= 0.8, scores


def test_a_prompt_outside_its_world_still_gives_an_image_and_one_warning(pipeline):
    with pytest.warns(OutOfDomainPromptWarning, match="never saw: astronaut, riding, horse") as caught:
        result = pipeline.generate("an astronaut riding a horse", steps=2)
    assert len(caught) == 1 and "--model" in str(caught[0].message)
    assert result.images.shape == (1, 64, 64, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OutOfDomainPromptWarning)
        pipeline.generate("A large white square, black background!", steps=2)


@pytest.mark.slow
def test_the_command_without_a_model_uses_the_embedded_one(tmp_path):
    out, cache = tmp_path / "circle.png", ["--cache-dir", str(tmp_path / "cache")]  # the second run reads it
    result = sdjax_command("generate", "a red circle on a blue background", "--steps", "2", "--out", str(out),
                           *cache)
    assert result.returncode == 0, result.stderr
    assert "Model: sdjax-shapes" in sdjax.images.read_parameters(out)
    result = sdjax_command("generate", "an astronaut riding a horse", "--steps", "2", "--out", str(out), *cache)
    assert result.returncode == 0, result.stderr
    warning_lines = [line for line in result.stderr.splitlines() if "only knows shapes" in line]
    assert len(warning_lines) == 1 and warning_lines[0].startswith("sdjax: warning:")
