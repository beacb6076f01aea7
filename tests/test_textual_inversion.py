"""`Pipeline.load_textual_inversion` against diffusers' `load_textual_inversion` on the tiny models: the same
token embedding matrix, prompt embeddings and images for diffusers- and A1111-format files, single- and
multi-vector, SDXL's clip_l/clip_g files, and the errors bad embeddings give."""
import copy

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.numpy import save_file

import sdjax
from sdjax.errors import InvalidArgumentError, WeightsError
from sdjax.textual_inversion import TOKEN_EMBEDDING
from tests.fixtures import assert_images_match, nchw
from tests.test_generation import euler_components
from tests.test_pipeline import assert_close

TOKEN = "<tiny-cat>"
PROMPTS = [f"a photo of {TOKEN} on a table", f"{TOKEN}, oil painting"]


def vectors(count, width, seed=0):
    return np.random.default_rng(seed).normal(scale=0.02, size=(count, width)).astype(np.float32)


def token_table(pipeline, name="text_encoder"):
    tree = pipeline.params[name]
    for key in TOKEN_EMBEDDING:
        tree = tree[key]
    return np.asarray(tree)


def diffusers_prompt_embeds(reference, prompts):
    with torch.no_grad():
        return reference.encode_prompt(prompts, "cpu", 1, False)[0].numpy()


@pytest.fixture(scope="module")
def width(sd1_folder):
    return sd1_folder[1].text_encoder.config.hidden_size


@pytest.fixture(scope="module")
def files(tmp_path_factory, width):
    """{format: (path, the token diffusers needs to be given or None)} of embedding files, written here."""
    root = tmp_path_factory.mktemp("embeddings")
    single, multi = vectors(1, width, seed=1)[0], vectors(3, width, seed=2)
    (root / "diffusers").mkdir()
    save_file({TOKEN: single}, str(root / "diffusers" / "learned_embeds.safetensors"))
    torch.save({TOKEN: torch.from_numpy(multi)}, root / "learned_embeds.bin")
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.from_numpy(multi)}, "name": TOKEN,
                "step": 500}, root / "a1111.pt")
    save_file({"emb_params": multi}, str(root / f"{TOKEN}.safetensors"))
    return {"diffusers, 1 vector, folder": (root / "diffusers", None),
            "diffusers .bin, 3 vectors": (root / "learned_embeds.bin", None),
            "A1111 .pt, 3 vectors": (root / "a1111.pt", None),
            "A1111 .safetensors emb_params": (root / f"{TOKEN}.safetensors", TOKEN)}


@pytest.fixture
def pair(sd1_folder):
    """(sdjax pipeline, a fresh torch pipeline): both get embeddings loaded."""
    folder, reference = sd1_folder
    return sdjax.load_pipeline(folder), copy.deepcopy(reference)


@pytest.mark.parametrize("kind", ["diffusers, 1 vector, folder", "diffusers .bin, 3 vectors", "A1111 .pt, 3 vectors",
                                  "A1111 .safetensors emb_params"])
def test_embeddings_match_diffusers(pair, files, kind):
    ours, theirs = pair
    path, diffusers_token = files[kind]
    assert ours.load_textual_inversion(path) == TOKEN  # the file's own token: its key, name or stem
    theirs.load_textual_inversion(str(path), token=diffusers_token)
    np.testing.assert_array_equal(token_table(ours), theirs.text_encoder.get_input_embeddings().weight.detach().numpy())
    assert ours.tokenizer.get_vocab() == theirs.tokenizer.get_vocab()
    assert_close(ours.encode_prompt(PROMPTS), diffusers_prompt_embeds(theirs, PROMPTS))
    if kind == "A1111 .pt, 3 vectors":  # the a1111 prompt syntax expands the token too (no emphasis: the same)
        assert_close(ours.encode_prompt(PROMPTS, prompt_syntax="a1111"), diffusers_prompt_embeds(theirs, PROMPTS))


def test_generation_matches_diffusers(pair, files):
    ours, theirs = pair
    path, _ = files["A1111 .pt, 3 vectors"]
    ours.load_textual_inversion(path)
    theirs.load_textual_inversion(str(path))
    noise = np.random.default_rng(0).normal(size=(1, 16, 16, 4)).astype(np.float32)
    prompt, negative = PROMPTS[:1], [f"{TOKEN} blurry"]
    images = ours.generate(prompt, negative, steps=2, guidance_scale=7.0, sampler="euler", schedule="linspace",
                           latents=noise, height=32, width=32).images
    reference = StableDiffusionPipeline(**euler_components(theirs))(
        prompt, negative_prompt=negative, num_inference_steps=2, guidance_scale=7.0, latents=nchw(noise),
        height=32, width=32, output_type="np").images
    assert_images_match(images, reference)


def test_state_dict_token_override_and_saved_folder(pair, width, tmp_path):
    ours, theirs = pair
    state = {"ignored-name": torch.from_numpy(vectors(2, width, seed=3))}
    assert ours.load_textual_inversion(state, token="<dog>") == "<dog>"
    theirs.load_textual_inversion(state, token="<dog>")
    prompts = ["<dog> and <dog> again"]
    expected = diffusers_prompt_embeds(theirs, prompts)
    assert_close(ours.encode_prompt(prompts), expected)
    # save_pretrained keeps the tokens: the folder loads in diffusers and sdjax with the same embeddings
    ours.save_pretrained(tmp_path / "saved")
    reloaded = StableDiffusionPipeline.from_pretrained(tmp_path / "saved")
    assert_close(diffusers_prompt_embeds(reloaded, prompts), expected)
    assert_close(sdjax.load_pipeline(tmp_path / "saved").encode_prompt(prompts), expected)


def test_bad_embeddings_are_refused(sd1_folder, files, width, tmp_path, without_torch):
    pipeline = sdjax.load_pipeline(sd1_folder[0])
    with pytest.raises(InvalidArgumentError, match=rf"width {width + 1} fits no text encoder.*text_encoder {width}"):
        pipeline.load_textual_inversion({"<wide>": vectors(1, width + 1)})
    with pytest.raises(WeightsError, match="missing.safetensors: no such textual-inversion file"):
        pipeline.load_textual_inversion(tmp_path / "missing.safetensors")
    with pytest.raises(WeightsError, match=r"unknown textual-inversion layout; found keys \['a', 'b'\].*emb_params"):
        pipeline.load_textual_inversion({"a": vectors(1, width), "b": vectors(1, width)})
    with pytest.raises(WeightsError, match="learned_embeds.safetensors or learned_embeds.bin"):
        pipeline.load_textual_inversion(tmp_path)
    pipeline.load_textual_inversion(files["diffusers, 1 vector, folder"][0])
    table = token_table(pipeline)
    with pytest.raises(InvalidArgumentError, match=f"token '{TOKEN}' is already in the vocabulary"):
        pipeline.load_textual_inversion(files["A1111 .pt, 3 vectors"][0])
    assert token_table(pipeline).shape == table.shape  # nothing changed
    without_torch()
    with pytest.raises(WeightsError, match="install torch or convert the embedding to .safetensors"):
        pipeline.load_textual_inversion(files["A1111 .pt, 3 vectors"][0], token="<other>")


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    from tests import fixtures
    root = tmp_path_factory.mktemp("sdxl_ti")
    base, _ = fixtures.save_sdxl_folders(root / "base", root / "refiner")
    return root / "base", base


def test_sdxl_clip_l_and_clip_g_match_diffusers(sdxl, tmp_path):
    folder, reference = sdxl
    widths = {name: getattr(reference, name).config.hidden_size for name in ("text_encoder", "text_encoder_2")}
    path = tmp_path / "sdxl_embedding.safetensors"
    state = {"clip_l": vectors(2, widths["text_encoder"], seed=4), "clip_g": vectors(2, widths["text_encoder_2"],
                                                                                     seed=5)}
    save_file(state, str(path))
    ours, theirs = sdjax.load_pipeline(folder), copy.deepcopy(reference)
    assert ours.load_textual_inversion(path, token="<s0>") == "<s0>"
    for key, name in (("clip_l", ""), ("clip_g", "_2")):  # diffusers' way: one call per text encoder
        theirs.load_textual_inversion(torch.from_numpy(state[key]), token=["<s0>", "<s0>_1"],
                                      text_encoder=getattr(theirs, f"text_encoder{name}"),
                                      tokenizer=getattr(theirs, f"tokenizer{name}"))
    prompts = ["a photo of <s0> on a table"]
    with torch.no_grad():
        embeds, _, pooled, _ = theirs.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    ours_embeds, ours_pooled = ours.encode_prompt(prompts)
    assert_close(ours_embeds, embeds.numpy())
    assert_close(ours_pooled, pooled.numpy())
    with pytest.raises(InvalidArgumentError, match="width 7 fits no text encoder.*text_encoder 32 and text_encoder_2"):
        ours.load_textual_inversion({"<x>": vectors(1, 7)})
