"""The shapes training set on disk (PNG files + metadata.jsonl, the layout `sdjax train` reads), its loss masks,
and the held-out evaluation prompts. All are pure functions of their seed."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from experiments.shapes.scenes import (HELD_OUT_TEMPLATES, PALETTE, Scene, caption, random_scene, render,
                                       training_caption)

_PER_FOLDER = 1000  # files per sub-folder, so no folder gets huge


def write_dataset(folder: str | Path, count: int, seed: int) -> Path:
    """Write `count` captioned images; an existing complete dataset of the same count and seed is kept."""
    folder = Path(folder)
    manifest = folder / "dataset.json"
    wanted = {"count": count, "seed": seed}
    if manifest.is_file() and json.loads(manifest.read_text()) == wanted:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 0])
    lines = []
    for index in range(count):
        scene = random_scene(rng)
        name = f"{index // _PER_FOLDER:03d}/{index:06d}.png"
        (folder / name).parent.mkdir(exist_ok=True)
        Image.fromarray(render(scene, rng)).save(folder / name, compress_level=1)
        lines.append(json.dumps({"file_name": name, "text": training_caption(scene, rng),
                                 **dataclasses.asdict(scene)}))
    partial = folder / "metadata.jsonl.partial"
    partial.write_text("\n".join(lines) + "\n")
    os.replace(partial, folder / "metadata.jsonl")
    manifest.write_text(json.dumps(wanted))  # last: marks the dataset complete
    return folder


# The shape's box (grown by a margin, so the corners that tell a circle from a square are inside) weighs 1 in
# the loss, the plain background BACKGROUND_WEIGHT: the shape is 1-20% of the pixels, yet which shape it is
# is what the model learns last.
MASK_MARGIN = 2  # pixels
BACKGROUND_WEIGHT = 0.1


def loss_mask(pixels: np.ndarray, background: str) -> np.ndarray:
    """uint8 (H, W) loss weights of one image: 255 on the shape's grown bounding box, the rest
    BACKGROUND_WEIGHT * 255."""
    differs = np.abs(pixels.astype(np.int16) - np.asarray(PALETTE[background])).max(axis=-1) > 8
    mask = np.full(differs.shape, round(BACKGROUND_WEIGHT * 255), np.uint8)
    rows, cols = np.flatnonzero(differs.any(axis=1)), np.flatnonzero(differs.any(axis=0))
    if rows.size:
        top, left = max(rows[0] - MASK_MARGIN, 0), max(cols[0] - MASK_MARGIN, 0)
        mask[top:rows[-1] + MASK_MARGIN + 1, left:cols[-1] + MASK_MARGIN + 1] = 255
    return mask


def write_loss_masks(folder: str | Path) -> Path:
    """Add a loss mask (masks/<same name>) to every image of a dataset and name it in metadata.jsonl's
    loss_mask field (what `data.loss_mask` reads); done once, the images are not touched."""
    folder = Path(folder)
    metadata = folder / "metadata.jsonl"
    entries = [json.loads(line) for line in metadata.read_text().splitlines() if line]
    if all("loss_mask" in entry for entry in entries):
        return folder
    for entry in entries:
        entry["loss_mask"] = f"masks/{entry['file_name']}"
        target = folder / entry["loss_mask"]
        target.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.asarray(Image.open(folder / entry["file_name"]).convert("RGB"))
        Image.fromarray(loss_mask(pixels, entry["background"])).save(target, compress_level=1)
    partial = folder / "metadata.jsonl.partial"
    partial.write_text("".join(json.dumps(entry) + "\n" for entry in entries))
    os.replace(partial, metadata)  # last: the masks are all written before any line names one
    return folder


def held_out_prompts(count: int, seed: int = 1234) -> list[tuple[str, Scene]]:
    """`count` (prompt, scene) pairs: random fully specified scenes in the held-out phrasings."""
    rng = np.random.default_rng([seed, 1])
    pairs = []
    for _ in range(count):
        scene = random_scene(rng)
        pairs.append((caption(scene, rng, templates=HELD_OUT_TEMPLATES), scene))
    return pairs
