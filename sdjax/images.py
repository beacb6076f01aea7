"""Image I/O: PNGs carrying their generation settings (a "parameters" text chunk, see a1111.py), grids, loading."""
from __future__ import annotations

import math
import os
from pathlib import Path
import numpy as np
from PIL import Image, PngImagePlugin

from sdjax.errors import InvalidArgumentError


def save_png(path: str | os.PathLike, image: np.ndarray, parameters: str | None = None) -> Path:
    """Write one uint8 (H, W, 3) image; the file appears complete or not at all."""
    path = Path(path)
    if not path.parent.is_dir():
        raise InvalidArgumentError(f"output folder {path.parent} does not exist; create it or choose another path")
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    temporary = path.with_name(f".{path.name}.partial")
    try:
        Image.fromarray(np.asarray(image, np.uint8)).save(temporary, format="PNG", pnginfo=info)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)  # a full disk leaves no half file behind
        raise
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


def as_array(image, *, mode: str = "RGB") -> np.ndarray:
    """What users have as an array: a path or a PIL image becomes uint8 (in `mode`), an array stays as it is."""
    if isinstance(image, (str, os.PathLike)):
        return load_image(image, mode=mode)
    if isinstance(image, Image.Image):
        return np.asarray(image.convert(mode))
    return np.asarray(image)


def image_batch(images, name: str = "image") -> np.ndarray:
    """(N, H, W, 3) from one image or a batch: a path, a PIL image, (H, W, 3), grayscale (H, W) or (H, W, 1), or
    (N, H, W, 3) / (N, H, W, 1). Grayscale is repeated into the three channels."""
    array = as_array(images)
    given = array.shape
    if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] == 1):
        array = array.reshape(array.shape[:2] + (1,))
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise InvalidArgumentError(f"{name} must be an image (H, W, 3), (H, W) grayscale, a batch (N, H, W, 3), a "
                                   f"PIL image or a path; got an array of shape {given}")
    return np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array


def _checked_float(array: np.ndarray, low: float, name: str) -> np.ndarray:
    values = array.astype(np.float32)
    if values.size and not (np.all(np.isfinite(values)) and low <= values.min() and values.max() <= 1.0):
        raise InvalidArgumentError(
            f"{name}: float values must lie in [{low:g}, 1] (found {np.nanmin(values):g} to {np.nanmax(values):g}"
            f"{', with NaN or inf' if not np.all(np.isfinite(values)) else ''}); pass uint8 for 0-255 images")
    return values


def to_unit_interval(array, name: str = "image") -> np.ndarray:
    """float32 in [0, 1]: uint8 rescaled, floats checked to be in range (masks, control images)."""
    array = np.asarray(array)
    return array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else _checked_float(array, 0.0, name)


def image_to_model_range(images, name: str = "image") -> np.ndarray:
    """Images as users pass them to img2img and inpaint (any `image_batch` input: uint8, or float in [0, 1] like
    masks and control images) as float32 (N, H, W, 3) in the VAE's [-1, 1]."""
    array = image_batch(images, name)
    if array.dtype == np.uint8:
        return to_unit_range(array, name)
    return _checked_float(array, 0.0, name) * np.float32(2) - np.float32(1)


def to_unit_range(images, name: str = "image") -> np.ndarray:
    """Images as float32 (N, H, W, 3) in [-1, 1]: any `image_batch` input; uint8 is rescaled, floats must already
    be in [-1, 1] (the VAE's range)."""
    array = image_batch(images, name)
    if array.dtype == np.uint8:
        return array.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1)  # as XLA computes x / 127.5 - 1
    return _checked_float(array, -1.0, name)
