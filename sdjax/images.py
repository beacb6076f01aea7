"""Image I/O: PNGs carrying their generation settings (A1111 "parameters" text chunk), grids, loading."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping

import numpy as np
from PIL import Image, PngImagePlugin

from sdjax.errors import InvalidArgumentError


def a1111_parameters(prompt: str, negative_prompt: str | None, settings: Mapping[str, object]) -> str:
    """The "parameters" text A1111, ComfyUI and image viewers read: prompt, negative prompt, then
    "Key: value" pairs on one line (e.g. Steps, Sampler, Schedule type, CFG scale, Seed, Size, Model)."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{key}: {value}" for key, value in settings.items() if value is not None))
    return "\n".join(lines)


def save_png(path: str | os.PathLike, image: np.ndarray, parameters: str | None = None) -> Path:
    """Write one uint8 (H, W, 3) image; the file appears complete or not at all."""
    path = Path(path)
    if not path.parent.is_dir():
        raise InvalidArgumentError(f"output folder {path.parent} does not exist; create it or choose another path")
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    temporary = path.with_name(f".{path.name}.partial")
    Image.fromarray(np.asarray(image, np.uint8)).save(temporary, format="PNG", pnginfo=info)
    os.replace(temporary, path)
    return path


def read_parameters(path: str | os.PathLike) -> str | None:
    """The "parameters" text chunk of a PNG written by `save_png` (or A1111)."""
    with Image.open(path) as image:
        return image.text.get("parameters")


def grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
    """Tile (N, H, W, C) images row by row into one image; unused cells stay black."""
    count, height, width, channels = images.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    canvas = np.zeros((rows * height, columns * width, channels), images.dtype)
    for i, image in enumerate(images):
        row, column = divmod(i, columns)
        canvas[row * height:(row + 1) * height, column * width:(column + 1) * width] = image
    return canvas


def load_image(path: str | os.PathLike, *, mode: str = "RGB") -> np.ndarray:
    """A uint8 (H, W, 3) array (or (H, W) for mode "L", e.g. masks) from an image file."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert(mode))
    except FileNotFoundError:
        raise InvalidArgumentError(f"image file {path} does not exist") from None
    except OSError as err:
        raise InvalidArgumentError(f"{path}: cannot read image ({err})") from err
