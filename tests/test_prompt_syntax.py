"""The a1111 prompt syntax (sdjax.prompt_syntax): the parse follows A1111's documented examples; the embeddings and
images follow A1111's rules computed here independently, in torch, with the reference text encoder and diffusers'
pipeline fed those embeddings."""
import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

import sdjax
from sdjax.errors import InvalidArgumentError
from sdjax.prompt_syntax import chunk_tokens, parse_emphasis
from tests.fixtures import assert_images_match, nchw

SIZE = 32


@pytest.mark.parametrize("prompt, expected", [  # the examples of A1111's parse_prompt_attention docstring
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.1 * 1.1 * 1.3), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.1 ** 4), (".", 1.1)]),
    ("a [[cat]] and a dog:2) here", [("a ", 1.0), ("cat", 1 / 1.1 ** 2), (" and a dog:2) here", 1.0)]),
    ("red cat BREAK blue dog", [("red cat", 1.0), ("BREAK", None), ("blue dog", 1.0)]),
    ("", [("", 1.0)]),
])
def test_emphasis_parses_as_in_a1111(prompt, expected):
    parsed = parse_emphasis(prompt)
    assert [t for t, _ in parsed] == [t for t, _ in expected]
    assert [w for _, w in parsed] == pytest.approx([w for _, w in expected])


def test_a_full_chunk_moves_the_words_after_its_last_comma_on():
    comma = 0
    # groups of five words and a comma: the 76th token finds the chunk full, 4 tokens after its last comma
    pieces = [([1, 2, 3, 4, 5, comma] * 13, 1.0)]
    (first, first_weights), (second, _) = chunk_tokens(pieces, comma)
    assert len(first) == 72 and first[-1] == comma and first_weights == [1.0] * 72
    assert second == [1, 2, 3, 4, 5, comma] * 1
    # no comma within 20 tokens of the end: a plain cut at 75
    plain = chunk_tokens([(list(range(1, 101)), 2.0)], comma)
    assert [len(t) for t, _ in plain] == [75, 25] and plain[1][1] == [2.0] * 25
    # BREAK ends a chunk early
    assert chunk_tokens([([1, 2], 1.0), ([], None), ([3], 1.5)], comma) == [([1, 2], [1.0, 1.0]), ([3], [1.5])]


@pytest.fixture(scope="module")
def sd1(sd1_folder):
    folder, reference = sd1_folder
    return sdjax.load_pipeline(folder), reference


def reference_embeddings(reference, chunks):
    """A1111's rule in torch: each (text, weights over its tokens) chunk encoded alone as BOS + tokens + EOS +
    padding, the weights applied, the chunk rescaled to its unweighted mean; the chunks concatenated."""
    out = []
    for text, weights in chunks:
        ids = reference.tokenizer(text, padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            z = reference.text_encoder(ids)[0]
        multipliers = torch.ones(77)
        multipliers[1:1 + len(weights)] = torch.tensor(weights)
        weighted = z * multipliers[None, :, None]
        out.append(weighted * (z.mean() / weighted.mean()))
    return torch.cat(out, dim=1)


def test_weighted_long_prompt_embeddings_follow_a1111(sd1):
    pipeline, reference = sd1
    group = "red cat dog moon city"
    prompt = "a (red cat:1.3) on the [moon], " + ", ".join([group] * 13)
    tokens = 7 + 6 * 13 - 1  # a red cat on the moon , + 13 groups of 5 words and 12 commas
    assert tokens > 75
    # the first chunk fills at token 76 with its last comma 4 tokens back: the group it cut moves on whole
    first = "a red cat on the moon, " + ", ".join([group] * 11) + ","
    second = group + ", " + group
    expected = reference_embeddings(reference, [(first, [1, 1.3, 1.3, 1, 1, 1 / 1.1]), (second, [])])
    ours = np.asarray(pipeline.encode_prompt([prompt], prompt_syntax="a1111"))
    assert ours.shape == (1, 154, 32)
    theirs = expected.numpy()
    assert np.linalg.norm(ours - theirs) / np.linalg.norm(theirs) < 1e-5 and np.abs(ours - theirs).max() < 1e-4
    # without emphasis or length, the a1111 syntax gives diffusers' ids exactly
    plain = ["a photo of a cat"]
    np.testing.assert_array_equal(pipeline.encode_prompt(plain, prompt_syntax="a1111"), pipeline.encode_prompt(plain))


@pytest.mark.slow
def test_images_from_a1111_prompts_match_diffusers_fed_the_same_embeddings(sd1):
    pipeline, reference = sd1
    prompt, negative = "a (beautiful:2.5) castle BREAK [blurry] (forest:0.3)", "ugly"
    noise = np.random.default_rng(1).normal(size=(1, 16, 16, 4)).astype(np.float32)
    ours = pipeline.generate(prompt, negative, steps=4, sampler="euler", schedule="linspace", guidance_scale=6.0,
                             latents=noise, prompt_syntax="a1111")
    # the negative prompt is padded with an empty chunk to the prompt's two chunks, as A1111 pads
    uncond = reference_embeddings(reference, [("ugly", []), ("", [])])
    scheduler = EulerDiscreteScheduler.from_config(reference.scheduler.config, timestep_spacing="linspace")
    diffusers_pipeline = StableDiffusionPipeline(**{**reference.components, "scheduler": scheduler})

    def theirs(weights):
        cond = reference_embeddings(reference, [("a beautiful castle", weights[0]), ("blurry forest", weights[1])])
        return diffusers_pipeline(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=4,
                                  guidance_scale=6.0, latents=nchw(noise), height=SIZE, width=SIZE,
                                  output_type="np").images

    assert_images_match(ours.images, theirs([[1, 2.5, 1], [1 / 1.1, 0.3]]))
    with pytest.raises(AssertionError):  # the weights matter: the same prompt unweighted is another image
        assert_images_match(ours.images, theirs([[], []]))


def test_bad_syntax_names_and_weights_are_refused(sd1):
    pipeline, _ = sd1
    with pytest.raises(InvalidArgumentError, match="prompt_syntax must be one of diffusers, a1111, got 'compel'"):
        pipeline.generate("a cat", steps=2, prompt_syntax="compel")
    with pytest.raises(InvalidArgumentError, match="weight '1.2.3' in the prompt 'a \\(cat:1.2.3\\)'"):
        pipeline.encode_prompt(["a (cat:1.2.3)"], prompt_syntax="a1111")
