"""A synthetic captioned image folder: each image a flat colour named by its caption plus a little noise, so a
text-conditioned model has something to learn in a few steps."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}


def write_synthetic_dataset(folder: Path, *, count: int = 8, size: tuple[int, int] = (20, 16), seed: int = 0,
                            captions: str = "metadata") -> Path:
    """`count` PNGs of `size` (width, height) with captions in metadata.jsonl ("metadata") or .txt ("sidecar")."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    lines = []
    for i in range(count):
        name = names[i % len(names)]
        pixels = np.clip(np.array(COLOURS[name]) + rng.normal(0, 12, (size[1], size[0], 3)), 0, 255)
        file_name = f"image_{i:03d}.png"
        Image.fromarray(pixels.astype(np.uint8)).save(folder / file_name)
        caption = f"a photo of {name}"
        if captions == "sidecar":
            (folder / file_name).with_suffix(".txt").write_text(caption)
        else:
            lines.append(json.dumps({"file_name": file_name, "text": caption}))
    if lines:
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder
