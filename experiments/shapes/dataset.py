"""The shapes training set on disk (PNG files + metadata.jsonl, the layout `sdjax train` reads) and the held-out
evaluation prompts. Both are pure functions of their seed."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from experiments.shapes.scenes import HELD_OUT_TEMPLATES, Scene, caption, random_scene, render, training_caption

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


def held_out_prompts(count: int, seed: int = 1234) -> list[tuple[str, Scene]]:
    """`count` (prompt, scene) pairs: random fully specified scenes in the held-out phrasings."""
    rng = np.random.default_rng([seed, 1])
    pairs = []
    for _ in range(count):
        scene = random_scene(rng)
        pairs.append((caption(scene, rng, templates=HELD_OUT_TEMPLATES), scene))
    return pairs
