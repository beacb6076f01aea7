"""Read a scene back from an image by plain image analysis, to check a generated image against its prompt.

Each pixel is assigned the nearest palette colour. The background is the most common colour of the border; the
shape is the most common other colour, and the largest connected region of it is the shape's mask. From the
mask: position from the centre of its bounding box, size from the box's longer side, kind from the shape that,
drawn to fill the same box, overlaps the mask best (intersection over union). Overlap rather than the fraction
of the box filled (square 1, circle pi/4, triangle 1/2): a square with softened corners or a triangle whose tips
blur away still overlaps its own kind best, where its fill drifts towards a circle's. Thresholds sit halfway
between what `scenes.render` draws for neighbouring categories, so an image reads right when it is drawn right
and wrong when it is not.
"""
from __future__ import annotations

import collections
import dataclasses
import functools

import numpy as np
from PIL import Image, ImageDraw

from experiments.shapes.scenes import COLOURS, PALETTE, SHAPES, SIZE_RANGE

_RGB = np.asarray([PALETTE[name] for name in COLOURS], np.float32)
_BORDER = 2  # pixels of the edge that vote for the background
_MIN_PIXELS = 20  # fewer shape pixels than this reads as "no shape"
SIZE_THRESHOLD = (SIZE_RANGE["small"][1] + SIZE_RANGE["large"][0]) / 2  # bounding-box side, pixels
POSITION_MARGIN = 7.0  # pixels from the image centre (CENTRES are 14 away, jitter 3)
_SUPERSAMPLE = 4


@dataclasses.dataclass(frozen=True)
class Reading:
    """What the image shows; `None` where it could not be read (no shape found)."""
    background: str
    colour: str | None = None
    shape: str | None = None
    size: str | None = None
    position: str | None = None

    def matches(self, scene, attributes=("shape", "colour", "background", "size", "position")) -> dict[str, bool]:
        return {name: getattr(self, name) == getattr(scene, name) for name in attributes}


def palette_labels(image: np.ndarray) -> np.ndarray:
    """(H, W) index of the nearest palette colour of each pixel."""
    distances = np.sum((image[..., None, :].astype(np.float32) - _RGB) ** 2, axis=-1)
    return np.argmin(distances, axis=-1)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (stray pixels elsewhere are dropped)."""
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        region, frontier = [start], collections.deque([start])
        while frontier:
            y, x = frontier.popleft()
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    region.append((ny, nx))
                    frontier.append((ny, nx))
        if len(region) > len(best):
            best = region
    component = np.zeros_like(mask)
    component[tuple(np.asarray(best).T)] = True
    return component


@functools.lru_cache(maxsize=4096)
def template(kind: str, width: int, height: int) -> np.ndarray:
    """Boolean (height, width) mask of `kind` drawn to fill the box, as `scenes.render` draws it (pixels at least
    half covered)."""
    w, h = width * _SUPERSAMPLE, height * _SUPERSAMPLE
    image = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(image)
    if kind == "triangle":  # apex up
        draw.polygon([(w / 2, 0), (w, h), (0, h)], fill=255)
    else:
        (draw.ellipse if kind == "circle" else draw.rectangle)([(0, 0), (w, h)], fill=255)
    return np.asarray(image.resize((width, height), Image.Resampling.BOX)) >= 128


def shape_kind(mask: np.ndarray) -> str:
    """The kind whose template, fitted to the mask's bounding box, has the highest intersection over union."""
    box = mask[np.ix_(mask.any(axis=1), mask.any(axis=0))]
    overlap = {kind: np.sum(box & template(kind, box.shape[1], box.shape[0])) /
               np.sum(box | template(kind, box.shape[1], box.shape[0])) for kind in SHAPES}
    return max(overlap, key=overlap.get)


def _position(cx: float, cy: float, centre: float) -> str:
    dx, dy = cx - centre, cy - centre
    if max(abs(dx), abs(dy)) < POSITION_MARGIN:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def read_scene(image: np.ndarray) -> Reading:
    """The scene attributes of a uint8 (H, W, 3) image."""
    labels = palette_labels(image)
    border = np.concatenate([labels[:_BORDER].ravel(), labels[-_BORDER:].ravel(),
                             labels[:, :_BORDER].ravel(), labels[:, -_BORDER:].ravel()])
    background = int(np.bincount(border, minlength=len(COLOURS)).argmax())
    counts = np.bincount(labels.ravel(), minlength=len(COLOURS))
    counts[background] = 0
    colour = int(counts.argmax())
    if counts[colour] < _MIN_PIXELS:
        return Reading(COLOURS[background])
    mask = largest_component(labels == colour)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    top, bottom, left, right = rows[0], rows[-1], cols[0], cols[-1]
    width, height = right - left + 1, bottom - top + 1
    centre = (image.shape[1] - 1) / 2
    return Reading(background=COLOURS[background], colour=COLOURS[colour], shape=shape_kind(mask),
                   size="large" if max(width, height) >= SIZE_THRESHOLD else "small",
                   position=_position((left + right) / 2, (top + bottom) / 2, centre))
