"""data.loss_mask: grayscale masks named in metadata.jsonl weigh the diffusion loss per pixel (kohya's masked
loss). The masks are not training images, follow the image's crop and flip, and weigh each latent pixel by the
mean of the pixels it covers."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from sdjax.errors import ConfigError
from sdjax.train import losses
from sdjax.train.config import DataConfig, DiffusionConfig, TrainConfig
from sdjax.train.data import BatchIterator, DatasetError, ImageSource, scan_folder
from tests.train.synthetic import write_synthetic_dataset
from tests.train.test_losses import stub_diffusion_loss


def add_masks(folder, width=20, height=16):
    """A mask per image: white on the left quarter, black elsewhere."""
    (folder / "masks").mkdir()
    lines = []
    for line in (folder / "metadata.jsonl").read_text().splitlines():
        entry = json.loads(line)
        mask = np.zeros((height, width), np.uint8)
        mask[:, : width // 4] = 255
        entry["loss_mask"] = f"masks/{entry['file_name']}"
        Image.fromarray(mask).save(folder / entry["loss_mask"])
        lines.append(json.dumps(entry))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_masks_are_not_training_images_and_follow_crop_and_flip(tmp_path):
    folder = add_masks(write_synthetic_dataset(tmp_path / "d", count=4))
    records = scan_folder(folder, require_masks=True)
    assert [r.path.name for r in records] == [f"image_{i:03d}.png" for i in range(4)]
    assert all(r.loss_mask == folder / "masks" / r.path.name for r in records)
    source = ImageSource(records, resolution=8, loss_masks=True)
    plain, flipped = source.example(0, flip=False), source.example(0, flip=True)
    assert plain["loss_mask"].shape == (8, 8) and plain["loss_mask"].dtype == np.float32
    # 20x16 resized to 10x8 then center-cropped to 8x8: the white quarter keeps ~1.5 of the 8 columns.
    assert plain["loss_mask"][:, 0].min() == 1.0 and plain["loss_mask"][:, 4:].max() == 0.0
    np.testing.assert_array_equal(flipped["loss_mask"], plain["loss_mask"][:, ::-1])
    assert "loss_mask" not in ImageSource(records, resolution=8).example(0, flip=False)


def test_missing_masks_are_named(tmp_path):
    folder = write_synthetic_dataset(tmp_path / "d", count=2)
    with pytest.raises(DatasetError, match="2 image.*no loss mask.*image_000.png.*loss_mask"):
        scan_folder(folder, require_masks=True)
    add_masks(folder)
    (folder / "masks" / "image_001.png").unlink()
    with pytest.raises(DatasetError, match="do not exist.*masks/image_001.png"):
        scan_folder(folder)
    with pytest.raises(ConfigError, match="stage vae does not use it"):
        TrainConfig(stage="vae", data=DataConfig(loss_mask=True))


def test_an_unreadable_mask_skips_its_example(tmp_path):
    folder = add_masks(write_synthetic_dataset(tmp_path / "d", count=3))
    (folder / "masks" / "image_001.png").write_bytes(b"junk")
    source = ImageSource(scan_folder(folder), resolution=8, loss_masks=True)
    with pytest.warns(UserWarning, match="image_001.png"):
        batch = next(BatchIterator(source, batch_size=3, seed=0))
    assert batch["loss_mask"].shape == (3, 8, 8) and len(source.skipped) == 1


def test_pool_mask_averages_the_pixels_each_latent_covers():
    mask = np.arange(2 * 4 * 6, dtype=np.float32).reshape(2, 4, 6)
    expected = mask.reshape(2, 2, 2, 3, 2).mean(axis=(2, 4))
    np.testing.assert_allclose(losses.pool_mask(jnp.asarray(mask), (2, 3)), expected)


def test_pixel_weights_scale_each_squared_error():
    rng = np.random.default_rng(0)
    prediction, target = rng.normal(size=(2, 3, 3, 4)), rng.normal(size=(2, 3, 3, 4))
    pixel_weight, weight = rng.uniform(size=(2, 3, 3)), np.array([1.0, 2.0])
    expected = np.mean(weight * np.mean((prediction - target) ** 2 * pixel_weight[..., None], axis=(1, 2, 3)))
    actual = losses.weighted_mse(jnp.asarray(prediction), jnp.asarray(target), jnp.asarray(weight),
                                 jnp.asarray(pixel_weight))
    np.testing.assert_allclose(float(actual), expected, rtol=1e-5)


def test_normalized_pixel_weights_give_each_sample_its_weighted_mean_error():
    rng = np.random.default_rng(1)
    prediction, target = rng.normal(size=(2, 3, 3, 4)), rng.normal(size=(2, 3, 3, 4))
    pixel_weight, weight = rng.uniform(size=(2, 3, 3)), np.array([1.0, 2.0])
    per_sample = [np.average(np.mean((prediction[i] - target[i]) ** 2, axis=-1), weights=pixel_weight[i])
                  for i in range(2)]
    actual = losses.weighted_mse(jnp.asarray(prediction), jnp.asarray(target), jnp.asarray(weight),
                                 jnp.asarray(pixel_weight), normalize_pixel_weight=True)
    np.testing.assert_allclose(float(actual), np.mean(weight * per_sample), rtol=1e-5)
    # a sample's loss no longer depends on how much of it the mask covers, only on where
    scaled = losses.weighted_mse(jnp.asarray(prediction), jnp.asarray(target), jnp.asarray(weight),
                                 jnp.asarray(pixel_weight * np.array([0.1, 3.0])[:, None, None]),
                                 normalize_pixel_weight=True)
    assert float(scaled) == pytest.approx(float(actual), rel=1e-5)


def test_normalize_loss_mask_needs_loss_masks():
    with pytest.raises(ConfigError, match="normalize_loss_mask.*data.loss_mask"):
        TrainConfig(diffusion=DiffusionConfig(normalize_loss_mask=True))
    TrainConfig(diffusion=DiffusionConfig(normalize_loss_mask=True), data=DataConfig(loss_mask=True))


def test_complementary_masks_split_the_diffusion_loss():
    loss_fn = stub_diffusion_loss(jnp.linspace(0.99, 0.01, 10))  # the U-Net: params["scale"] * x
    batch = {"moments": jnp.concatenate([jnp.ones((2, 4, 4, 4)), jnp.full((2, 4, 4, 4), -5.0)], -1),
             "input_ids": jnp.ones((2, 4), jnp.int32)}
    left = jnp.zeros((2, 8, 8)).at[:, :, :4].set(1.0)  # pixels at twice the latent resolution

    def loss(mask=None):
        masked = batch if mask is None else {**batch, "loss_mask": mask}
        return float(loss_fn({"unet": {"scale": 0.5}}, {"text_encoder": {}}, masked, jax.random.key(3))[0])

    assert loss(left) + loss(1.0 - left) == pytest.approx(loss(), rel=1e-5)
    assert loss(jnp.ones((2, 8, 8))) == pytest.approx(loss(), rel=1e-6)
    assert loss(left) != pytest.approx(loss(1.0 - left), rel=1e-3)
