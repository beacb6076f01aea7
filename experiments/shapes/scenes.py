"""The shapes world: one coloured shape on a plain background, drawn at 64x64, and the captions that describe it.

A scene is five attributes (shape, colour, background, size, position); everything the model is asked to get
right is one of them, so an image can be checked against its prompt by reading the attributes back
(`reader.py`). Sizes and positions are jittered inside their category, so the model learns categories, not
a handful of exact pictures.

Captions come from two disjoint families of templates. The training family describes each scene in many
phrasings and word orders and sometimes leaves out the size or the position. The held-out family puts the
same words in orders no training template produces ("purple background, small green square at the top");
evaluation prompts use only it, so every evaluation caption is one the model never saw.
"""
from __future__ import annotations

import dataclasses
import itertools
import re

import numpy as np
from PIL import Image, ImageDraw

SIDE = 64  # pixels
_SUPERSAMPLE = 4  # drawn at 4x and box-filtered down: anti-aliased edges, as a photo of a shape would have

PALETTE = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (250, 230, 40),
    "purple": (140, 50, 190),
    "orange": (255, 128, 0),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")

# Side of the shape's bounding box in pixels, and the centre of each position, before jitter.
SIZE_RANGE = {"small": (12.0, 16.0), "large": (24.0, 30.0)}
CENTRES = {"left": (18.0, 32.0), "right": (46.0, 32.0), "top": (32.0, 18.0), "bottom": (32.0, 46.0),
           "center": (32.0, 32.0)}
JITTER = 3.0  # pixels, each axis


@dataclasses.dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    size: str
    position: str

    def __post_init__(self):
        if self.colour == self.background:
            raise ValueError(f"a {self.colour} shape on a {self.background} background would be invisible")


def all_scenes() -> list[Scene]:
    """Every valid combination of attributes (3 * 8 * 7 * 2 * 5 = 1680)."""
    return [Scene(*combo) for combo in itertools.product(SHAPES, COLOURS, COLOURS, SIZES, POSITIONS)
            if combo[1] != combo[2]]


def random_scene(rng: np.random.Generator) -> Scene:
    colour, background = rng.choice(len(COLOURS), size=2, replace=False)
    return Scene(SHAPES[rng.integers(len(SHAPES))], COLOURS[colour], COLOURS[background],
                 SIZES[rng.integers(len(SIZES))], POSITIONS[rng.integers(len(POSITIONS))])


def _outline(shape: str, cx: float, cy: float, side: float) -> list[tuple[float, float]]:
    """Corner points (for the triangle and square) or the bounding box (circle), in pixels."""
    h = side / 2
    if shape == "triangle":  # apex up, base as wide as it is tall
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    return [(cx - h, cy - h), (cx + h, cy + h)]


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """uint8 (64, 64, 3) image of the scene, with size and position jittered by `rng`."""
    side = rng.uniform(*SIZE_RANGE[scene.size])
    cx, cy = np.asarray(CENTRES[scene.position]) + rng.uniform(-JITTER, JITTER, size=2)
    big = SIDE * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), PALETTE[scene.background])
    draw = ImageDraw.Draw(image)
    points = [(x * _SUPERSAMPLE, y * _SUPERSAMPLE) for x, y in _outline(scene.shape, cx, cy, side)]
    fill = PALETTE[scene.colour]
    {"circle": draw.ellipse, "square": draw.rectangle, "triangle": draw.polygon}[scene.shape](points, fill=fill)
    return np.asarray(image.resize((SIDE, SIDE), Image.Resampling.BOX))


# ----------------------------------------------------------------------------------------------- captions

SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
POSITION_WORDS = {
    "left": ("on the left", "at the left", "to the left", "on the left side"),
    "right": ("on the right", "at the right", "to the right", "on the right side"),
    "top": ("at the top", "on the top", "near the top", "at the top of the image"),
    "bottom": ("at the bottom", "on the bottom", "near the bottom", "at the bottom of the image"),
    "center": ("in the center", "in the middle", "at the center", "in the middle of the image"),
}

# {a} is the shape phrase ("a small red circle", or without the size), {p} the position phrase, {b} the
# background colour. A template without {p} is used when the position is left out.
TRAIN_TEMPLATES = (
    "{a} {p} on a {b} background",
    "{a} on a {b} background {p}",
    "a {b} background with {a} {p}",
    "on a {b} background, {a} {p}",
    "{p}, {a} on a {b} background",
    "{a} {p}, {b} background",
    "there is {a} {p} on a {b} background",
    "an image of {a} {p} and a {b} background",
    "{a} on a {b} background",
    "a {b} background with {a}",
    "an image of {a} on a {b} background",
)
HELD_OUT_TEMPLATES = (
    "{b} background, {a} {p}",
    "{p} there is {a} on a {b} background",
    "a {b} background and {a} {p}",
    "{a} {p} with a {b} background",
    "{p} on a {b} background, {a}",
    "an image with a {b} background and {a} {p}",
)


def shape_phrase(scene: Scene, size_word: str | None) -> str:
    words = [size_word, scene.colour, scene.shape] if size_word else [scene.colour, scene.shape]
    return " ".join(["a", *words])


def caption(scene: Scene, rng: np.random.Generator, *, templates=TRAIN_TEMPLATES, keep_size: bool = True,
            keep_position: bool = True) -> str:
    """One caption of `scene`, with synonyms and a template chosen by `rng`."""
    size_word = rng.choice(SIZE_WORDS[scene.size]) if keep_size else None
    usable = [t for t in templates if ("{p}" in t) == keep_position]
    template = usable[rng.integers(len(usable))]
    position = rng.choice(POSITION_WORDS[scene.position])
    return with_articles(template.format(a=shape_phrase(scene, size_word), p=position, b=scene.background))


def with_articles(text: str) -> str:
    """"a orange ..." -> "an orange ..."."""
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def training_caption(scene: Scene, rng: np.random.Generator, *, drop_probability: float = 0.2) -> str:
    """A training caption: the size and the position are each left out with `drop_probability`, so that short
    prompts ("a red circle on a blue background") are in the training distribution too."""
    keep_size, keep_position = rng.random(2) >= drop_probability
    return caption(scene, rng, keep_size=bool(keep_size), keep_position=bool(keep_position))
