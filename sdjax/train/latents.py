"""VAE posteriors of the training images: encoded each step, or once into an on-disk cache.

The diffusion step consumes "moments" (the posterior's mean and log-variance, concatenated on channels) and
draws the latent sample itself, so the cached and the on-the-fly paths feed one compiled train step and
sample latents the same way. The cache holds both orientations of each image when random flips are on.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.images import to_unit_range
from sdjax.train.data import ImageSource, SkippedImageWarning

MANIFEST = "manifest.json"


def make_moments_encoder(vae) -> Callable[[Any, np.ndarray], jax.Array]:
    """`encode(vae_params, uint8 pixels (B, H, W, 3)) -> moments (B, h, w, 2 * latent_channels)` (float32)."""

    @jax.jit
    def encode(vae_params, pixels):
        posterior = vae.apply({"params": vae_params}, pixels, method=vae.encode)
        return jnp.concatenate([posterior.mean, posterior.logvar], axis=-1).astype(jnp.float32)

    return lambda vae_params, pixels: encode(vae_params, to_unit_range(pixels))


def params_digest(params) -> str:
    """sha256 over every leaf's path, dtype, shape and bytes: identifies the weights a cache was built with."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]:
        leaf = np.asarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}:{leaf.dtype}:{leaf.shape}".encode())
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return digest.hexdigest()


def cache_fingerprint(source: ImageSource, random_flip: bool, vae_digest: str) -> str:
    """Changes whenever an image file, the crop size, the flips or the VAE weights change."""
    files = [(str(r.path), r.path.stat().st_size, r.path.stat().st_mtime_ns) for r in source.records]
    text = json.dumps({"files": files, "resolution": source.resolution, "random_flip": random_flip,
                       "vae": vae_digest})
    return hashlib.sha256(text.encode()).hexdigest()


class CachedLatentSource:
    """Examples {"moments": float32 (h, w, 2C), "caption": str} read from a cache built by `load_or_build`; loss
    masks, when on, are decoded from their files each time (they are not part of the cache)."""

    def __init__(self, source: ImageSource, moments: np.ndarray, valid: np.ndarray):
        self.source, self.records, self.moments, self.valid = source, source.records, moments, valid
        self.skipped = source.skipped  # one set: images the cache could not encode and masks that fail to decode
        self.skipped.update(r.path for r, ok in zip(source.records, valid) if not ok)

    def __len__(self) -> int:
        return len(self.records)

    def example(self, index: int, flip: bool) -> dict[str, Any] | None:
        if not self.valid[index]:
            return None
        example = {"moments": np.asarray(self.moments[index, int(flip)]),
                   "caption": self.records[index].caption or ""}
        return self.source.with_loss_mask(example, index, flip)


def _encode_all(source: ImageSource, encode, vae_params, batch_size: int, out: np.ndarray, valid: np.ndarray) -> None:
    """Fill out[i, 0] (and out[i, 1], mirrored) for every readable image; valid[i] marks which were."""
    blank = np.zeros((source.resolution, source.resolution, 3), np.uint8)
    for start in range(0, len(source), batch_size):
        indices = range(start, min(start + batch_size, len(source)))
        images = [source.pixels(i) for i in indices]
        valid[start:start + len(images)] = [image is not None for image in images]
        # A fixed batch size (blank padding) compiles the encoder once.
        batch = np.stack([blank if image is None else image for image in images]
                         + [blank] * (batch_size - len(images)))
        for orientation in range(out.shape[1]):
            pixels = batch[:, :, ::-1] if orientation else batch
            out[start:start + len(images), orientation] = np.asarray(encode(vae_params, pixels))[:len(images)]


def load_or_build(source: ImageSource, encode, vae_params, directory: str | Path, *, random_flip: bool,
                  batch_size: int = 8) -> CachedLatentSource:
    """The latent cache in `directory`, (re)built when missing or made from other images or weights."""
    directory = Path(directory)
    fingerprint = cache_fingerprint(source, random_flip, params_digest(vae_params))
    manifest_path = directory / MANIFEST
    if manifest_path.is_file() and json.loads(manifest_path.read_text()).get("fingerprint") == fingerprint:
        valid = np.load(directory / "valid.npy")
        if not valid.all():
            warnings.warn(f"{int((~valid).sum())} image(s) were unreadable when the latent cache {directory} was "
                          "built; they are skipped", SkippedImageWarning, stacklevel=2)
        return CachedLatentSource(source, np.load(directory / "moments.npy", mmap_mode="r"), valid)

    directory.mkdir(parents=True, exist_ok=True)
    manifest_path.unlink(missing_ok=True)  # a cache without its manifest is never trusted
    probe = np.asarray(encode(vae_params, np.zeros((1, source.resolution, source.resolution, 3), np.uint8)))
    shape = (len(source), 2 if random_flip else 1) + probe.shape[1:]
    partial = directory / "moments.npy.partial"
    moments = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=shape)
    valid = np.zeros(len(source), bool)
    _encode_all(source, encode, vae_params, batch_size, moments, valid)
    moments.flush()
    del moments
    os.replace(partial, directory / "moments.npy")
    np.save(directory / "valid.npy", valid)
    temporary = directory / (MANIFEST + ".partial")
    temporary.write_text(json.dumps({"fingerprint": fingerprint, "shape": list(shape)}))
    os.replace(temporary, manifest_path)
    return CachedLatentSource(source, np.load(directory / "moments.npy", mmap_mode="r"), valid)
