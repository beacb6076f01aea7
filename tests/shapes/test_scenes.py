"""The shapes dataset and its evaluator: the reader must read drawn scenes right (and wrong ones wrong) before
its verdict on generated images means anything; evaluation captions must be ones training never produces."""
import dataclasses

import numpy as np
import pytest

from experiments.shapes import scenes
from experiments.shapes.dataset import held_out_prompts, write_dataset
from experiments.shapes.reader import read_scene


def test_the_reader_reads_every_drawn_scene_right():
    rng = np.random.default_rng(3)
    drawn = [scenes.random_scene(rng) for _ in range(600)]
    wrong = [s for s in drawn if not all(read_scene(scenes.render(s, rng)).matches(s).values())]
    assert wrong == []


def test_the_reader_reads_the_kind_of_softened_shapes():
    """A decoder blurs edges and tips: blurred renders still read as their kind (by template overlap; the fraction
    of the bounding box filled read 9% of these triangles as circles)."""
    from PIL import Image, ImageFilter
    rng = np.random.default_rng(5)
    drawn = [scenes.random_scene(rng) for _ in range(300)]
    blurred = [np.asarray(Image.fromarray(scenes.render(s, rng)).filter(ImageFilter.GaussianBlur(1.0))) for s in drawn]
    assert [read_scene(image).shape for image in blurred] == [s.shape for s in drawn]


@pytest.mark.parametrize("attribute", ["shape", "colour", "background", "size", "position"])
def test_the_reader_notices_a_wrong_attribute(attribute):
    rng = np.random.default_rng(4)
    values = {"shape": scenes.SHAPES, "colour": scenes.COLOURS, "background": scenes.COLOURS,
              "size": scenes.SIZES, "position": scenes.POSITIONS}[attribute]
    for _ in range(40):
        scene = scenes.random_scene(rng)
        other = next(v for v in values if v not in (getattr(scene, attribute), scene.colour, scene.background))
        asked = dataclasses.replace(scene, **{attribute: other})
        assert read_scene(scenes.render(scene, rng)).matches(asked)[attribute] is False


def test_a_blank_image_has_no_shape():
    blank = np.full((64, 64, 3), scenes.PALETTE["green"], np.uint8)
    reading = read_scene(blank)
    assert reading.background == "green" and reading.shape is None


def test_held_out_prompts_are_phrasings_training_never_produces():
    rng = np.random.default_rng(0)
    training = {scenes.training_caption(scenes.random_scene(rng), rng) for _ in range(50_000)}
    held_out = [prompt for prompt, _ in held_out_prompts(240)]
    assert len(set(held_out)) > 200
    assert not training & set(held_out)
    assert not set(scenes.TRAIN_TEMPLATES) & set(scenes.HELD_OUT_TEMPLATES)
    assert "purple background, a small green square at the top" in {
        scenes.caption(scenes.Scene("square", "green", "purple", "small", "top"), np.random.default_rng(s),
                       templates=scenes.HELD_OUT_TEMPLATES) for s in range(200)}


def test_captions_name_each_attribute_they_keep():
    rng = np.random.default_rng(1)
    for _ in range(200):
        scene = scenes.random_scene(rng)
        text = scenes.training_caption(scene, rng)
        assert f"{scene.colour} {scene.shape}" in text and f"{scene.background} background" in text
    assert scenes.with_articles("a orange circle on a orange background") == "an orange circle on an orange background"


def test_the_dataset_is_a_pure_function_of_its_seed(tmp_path):
    first, second = write_dataset(tmp_path / "a", 12, seed=5), write_dataset(tmp_path / "b", 12, seed=5)
    assert (first / "metadata.jsonl").read_text() == (second / "metadata.jsonl").read_text()
    for path in sorted(first.rglob("*.png")):
        assert path.read_bytes() == (second / path.relative_to(first)).read_bytes()
