"""PNG metadata in the A1111 format (read back with PIL, as other tools do), grids, and output-path errors."""
import numpy as np
import pytest
from PIL import Image

from sdjax import a1111, images
from sdjax.errors import InvalidArgumentError


def test_png_carries_a1111_parameters(tmp_path):
    text = a1111.format_parameters("a cat", "blurry", {"Steps": 20, "Sampler": "euler", "CFG scale": 7.5,
                                                        "Seed": 42, "Size": "64x48", "Schedule type": None})
    assert text == "a cat\nNegative prompt: blurry\nSteps: 20, Sampler: euler, CFG scale: 7.5, Seed: 42, Size: 64x48"
    picture = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    path = images.save_png(tmp_path / "out.png", picture, text)
    with Image.open(path) as reopened:
        assert reopened.text["parameters"] == text
        np.testing.assert_array_equal(np.asarray(reopened), picture)
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_output_in_a_missing_folder_is_refused_without_leftovers(tmp_path):
    with pytest.raises(InvalidArgumentError, match="output folder .*missing.* does not exist"):
        images.save_png(tmp_path / "missing" / "out.png", np.zeros((8, 8, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_grid_places_images_row_by_row():
    tiles = np.stack([np.full((2, 3, 3), i, np.uint8) for i in range(5)])
    canvas = images.grid(tiles, columns=3)
    assert canvas.shape == (4, 9, 3)
    assert canvas[0, 3, 0] == 1 and canvas[2, 0, 0] == 3 and canvas[2, 3, 0] == 4 and canvas[2, 6, 0] == 0


def test_load_image_errors_name_the_file(tmp_path):
    with pytest.raises(InvalidArgumentError, match="nope.png does not exist"):
        images.load_image(tmp_path / "nope.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(InvalidArgumentError, match="bad.png: cannot read image"):
        images.load_image(tmp_path / "bad.png")


def test_an_image_is_taken_in_any_form_a_user_has(tmp_path):
    picture = np.random.default_rng(1).integers(0, 256, (8, 12, 3), dtype=np.uint8)
    Image.fromarray(picture).save(tmp_path / "picture.png")
    for given in (picture, picture[None], Image.fromarray(picture), tmp_path / "picture.png",
                  str(tmp_path / "picture.png"), images.load_image(tmp_path / "picture.png")):
        np.testing.assert_array_equal(images.image_batch(given), picture[None])
    gray = picture[..., 0]
    for given in (gray, gray[..., None], gray[None, ..., None]):
        np.testing.assert_array_equal(images.image_batch(given), np.repeat(gray[None, ..., None], 3, axis=-1))
    with pytest.raises(InvalidArgumentError, match=r"image must be an image \(H, W, 3\).*shape \(8, 12, 5\)"):
        images.image_batch(np.zeros((8, 12, 5)))


def test_float_images_out_of_range_are_refused_not_clipped():
    np.testing.assert_allclose(images.to_unit_range(np.full((4, 4, 3), 255, np.uint8)), 1.0)
    np.testing.assert_allclose(images.to_unit_range(np.full((4, 4, 3), -0.5, np.float32)), -0.5)
    with pytest.raises(InvalidArgumentError, match=r"image: float values must lie in \[-1, 1\] \(found 0 to 255\)"):
        images.to_unit_range(np.linspace(0, 255, 48).reshape(4, 4, 3))
    with pytest.raises(InvalidArgumentError, match=r"mask: float values must lie in \[0, 1\].*NaN"):
        images.to_unit_interval(np.array([0.0, np.nan]), "mask")


def test_user_images_are_uint8_or_floats_in_0_1_like_masks_and_control_images():
    ramp = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=-1)
    expected = images.to_unit_range(ramp)  # the VAE's [-1, 1]
    np.testing.assert_array_equal(images.image_to_model_range(ramp), expected)
    np.testing.assert_allclose(images.image_to_model_range(ramp / np.float32(255)), expected, rtol=0, atol=1e-6)
    with pytest.raises(InvalidArgumentError, match=r"photo: float values must lie in \[0, 1\] \(found -1 to 1\)"):
        images.image_to_model_range(np.linspace(-1, 1, 48).reshape(4, 4, 3), "photo")


def test_a_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    def disk_full(self, target, *args, **kwargs):
        open(target, "wb").write(b"half a png")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Image.Image, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        images.save_png(tmp_path / "out.png", np.zeros((8, 8, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []
