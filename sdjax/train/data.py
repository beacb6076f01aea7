"""Training data: an image folder with captions, square crops, and a deterministic, checkpointable iterator.

Captions come from `metadata.jsonl` (one {"file_name": ..., "text": ...} per line, the Hugging Face ImageFolder
convention) or from a `.txt` file next to the image; metadata wins when both exist. A metadata line may also name
a grayscale `loss_mask` image that weighs the diffusion loss per pixel (`data.loss_mask`, as kohya's masked loss:
white counts fully, black not at all); mask files are not training images. Images that cannot be
decoded are skipped with a `SkippedImageWarning` and counted, so one bad file does not end a long run.

The iterator's whole state is (epoch, position): the order of each epoch is a permutation drawn from
(seed, epoch) and each example's flip from the same generator, so restoring those two integers replays the
exact batches an uninterrupted run would have seen. With several processes the order is dealt into a fixed
number of streams (`data.streams`), each process reads only its own, and a checkpoint records every stream's
position: a run saved on N processes resumes on any process count that divides the streams. Grain (the JAX
ecosystem's loader) gives determinism and checkpoints too, and adds worker processes; its checkpointed state
belongs to each process's shard, and decoding is cheap here (the U-Net stage trains from cached latents), so the
dependency stays out until a pixel pipeline needs parallel decoding.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from sdjax.errors import SdjaxError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
METADATA_FILE = "metadata.jsonl"


class DatasetError(SdjaxError, ValueError):
    """The image folder is missing, empty, unreadable, or lacks captions."""


class SkippedImageWarning(UserWarning):
    """An image file could not be decoded and was left out of training."""


@dataclasses.dataclass(frozen=True)
class Record:
    path: Path
    caption: str | None
    loss_mask: Path | None = None


# ------------------------------------------------------------------------------------- folder scanning

def _read_metadata(path: Path) -> dict[str, tuple[str, str | None]]:
    """file_name -> (text, loss_mask file name or None) from a metadata.jsonl, with errors naming the line."""
    entries = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            mask = entry.get("loss_mask")
            entries[Path(entry["file_name"]).as_posix()] = (str(entry["text"]),
                                                            None if mask is None else Path(mask).as_posix())
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise DatasetError(f"{path}:{number}: expected a JSON object with 'file_name' and 'text' "
                               f"({type(err).__name__}: {err})") from None
        outside = [name for name in (entry["file_name"], mask) if name is not None and _leaves_folder(name)]
        if outside:
            raise DatasetError(f"{path}:{number}: {outside[0]!r} is not a path inside the data folder; name files "
                               f"relative to it, without '..' or a leading '/'")
    return entries


def _leaves_folder(name: str) -> bool:
    path = Path(name)
    return path.is_absolute() or ".." in path.parts


def _sidecar_caption(image: Path) -> str | None:
    sidecar = image.with_suffix(".txt")
    return sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else None


def scan_folder(folder: str | Path, *, require_captions: bool = True, require_masks: bool = False) -> list[Record]:
    """Every image under `folder` (recursively, sorted by relative path, loss masks left out) with its caption
    and loss mask."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise DatasetError(f"data.folder {folder} {what}; point data.folder at a folder of images")
    try:
        paths = sorted((p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                        and not any(part.startswith(".") for part in p.relative_to(folder).parts)),
                       key=lambda p: p.relative_to(folder).as_posix())
    except OSError as err:
        raise DatasetError(f"data.folder {folder} cannot be read: {err}") from err
    if not paths:
        raise DatasetError(f"data.folder {folder} holds no images (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    metadata_path = folder / METADATA_FILE
    metadata = _read_metadata(metadata_path) if metadata_path.is_file() else {}
    masks = {mask for _, mask in metadata.values() if mask is not None}
    missing = [name for name in [*metadata, *sorted(masks)] if not (folder / name).is_file()]
    if missing:
        raise DatasetError(f"{metadata_path} names {len(missing)} file(s) that do not exist, e.g. {missing[0]!r}")
    records = []
    for path in paths:
        relative = path.relative_to(folder).as_posix()
        if relative in masks:
            continue
        caption, mask = metadata.get(relative, (_sidecar_caption(path), None))
        records.append(Record(path, caption, None if mask is None else folder / mask))
    uncaptioned = [r.path.relative_to(folder).as_posix() for r in records if r.caption is None]
    if require_captions and uncaptioned:
        raise DatasetError(
            f"{len(uncaptioned)} image(s) in {folder} have no caption, e.g. {', '.join(uncaptioned[:3])}. Add a "
            f"line {{\"file_name\": ..., \"text\": ...}} to {METADATA_FILE} or a .txt file next to each image.")
    unmasked = [r.path.relative_to(folder).as_posix() for r in records if r.loss_mask is None]
    if require_masks and unmasked:
        raise DatasetError(
            f"data.loss_mask is on but {len(unmasked)} image(s) in {folder} have no loss mask, e.g. "
            f"{', '.join(unmasked[:3])}. Name a grayscale image in each line's \"loss_mask\" field of "
            f"{metadata_path}, or turn data.loss_mask off.")
    return records


# --------------------------------------------------------------------------------------- image transform

def square_crop(image: Image.Image, resolution: int, mode: str = "RGB") -> np.ndarray:
    """uint8 (resolution, resolution, 3) (or without the channel axis for mode "L"): resize so the short side is
    `resolution`, then center-crop."""
    image = image.convert(mode)
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return np.asarray(image.crop((left, top, left + resolution, top + resolution)))


class Source(Protocol):
    """Indexed examples; `example` returns None for an example that must be skipped, and `skipped` holds the
    image files left out so far."""
    skipped: set[Path]

    def __len__(self) -> int: ...

    def example(self, index: int, flip: bool) -> dict[str, Any] | None: ...


class ImageSource:
    """Examples {"pixels": uint8 (H, W, 3), "caption": str} decoded from the image files, plus
    "loss_mask": float32 (H, W) in [0, 1] when `loss_masks` is on."""

    def __init__(self, records: list[Record], resolution: int, *, loss_masks: bool = False):
        self.records, self.resolution, self.loss_masks = records, resolution, loss_masks
        self.skipped: set[Path] = set()

    def __len__(self) -> int:
        return len(self.records)

    def _decode(self, path: Path, mode: str) -> np.ndarray | None:
        """The cropped image, or None (warned once per file) when the file cannot be decoded."""
        try:
            with Image.open(path) as image:
                return square_crop(image, self.resolution, mode)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            if path not in self.skipped:
                self.skipped.add(path)
                warnings.warn(f"skipping unreadable image {path}: {err}", SkippedImageWarning, stacklevel=2)
            return None

    def pixels(self, index: int) -> np.ndarray | None:
        return self._decode(self.records[index].path, "RGB")

    def with_loss_mask(self, example: dict[str, Any], index: int, flip: bool) -> dict[str, Any] | None:
        """`example` with its loss mask added when masks are on; None when the mask cannot be decoded."""
        if not self.loss_masks:
            return example
        mask = self._decode(self.records[index].loss_mask, "L")
        if mask is None:
            return None
        return {**example, "loss_mask": (mask[:, ::-1] if flip else mask).astype(np.float32) / 255.0}

    def example(self, index: int, flip: bool) -> dict[str, Any] | None:
        pixels = self.pixels(index)
        if pixels is None:
            return None
        example = {"pixels": pixels[:, ::-1] if flip else pixels, "caption": self.records[index].caption or ""}
        return self.with_loss_mask(example, index, flip)


# ------------------------------------------------------------------------------------------ the iterator

def _collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack arrays on a new leading (batch) axis; strings become lists."""
    return {key: (np.stack([e[key] for e in examples]) if isinstance(examples[0][key], np.ndarray)
                  else [e[key] for e in examples]) for key in examples[0]}


class BatchIterator:
    """Endless batches from a Source, reshuffled each epoch from (seed, epoch); restorable from `state()`.

    The epoch's order is dealt into `streams` interleaved streams (stream s: positions s, s + streams, ...), each
    contributing batch_size / streams examples to every batch, in stream order. A process reads only the streams
    it `owns` (its rows of the global batch), so several processes share the data without reading each other's;
    with one stream this is a plain walk through the epoch's order.
    """

    def __init__(self, source: Source, batch_size: int, seed: int, *, random_flip: bool = True, streams: int = 1,
                 owned: Sequence[int] | None = None):
        if batch_size % streams or len(source) < streams:
            raise DatasetError(f"batch_size {batch_size} and the {len(source)} examples must split into {streams} "
                               f"data streams (data.streams, one per process by default)")
        self.source, self.batch_size, self.seed, self.random_flip = source, batch_size, seed, random_flip
        self.streams, self.owned = streams, tuple(range(streams) if owned is None else owned)
        self.cursors = {stream: (0, 0) for stream in self.owned}  # stream -> (epoch, position within the stream)
        self._plans: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(order, flips) of an epoch: a permutation of the indices and one coin per position. The last two epochs
        are kept: streams of unequal length cross into the next epoch at different batches."""
        if epoch not in self._plans:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(len(self.source))
            flips = rng.random(len(self.source)) < 0.5 if self.random_flip else np.zeros(len(self.source), bool)
            self._plans = {e: plan for e, plan in self._plans.items() if e == epoch - 1}
            self._plans[epoch] = (order, flips)
        return self._plans[epoch]

    def state(self) -> dict[str, Any]:
        """This process's position: (epoch, position) with one stream, else [stream, epoch, position] rows of the
        streams it owns."""
        if self.streams == 1:
            epoch, position = self.cursors[0]
            return {"epoch": epoch, "position": position, "num_examples": len(self.source)}
        return {"streams": [[s, *self.cursors[s]] for s in self.owned], "num_examples": len(self.source)}

    def restore(self, state: dict[str, Any]) -> None:
        if state.get("num_examples") != len(self.source):
            warnings.warn(f"the dataset had {state.get('num_examples')} examples when the checkpoint was written "
                          f"and has {len(self.source)} now; the resumed run sees a different order", stacklevel=2)
        rows = state.get("streams", [[0, state.get("epoch"), state.get("position")]])
        saved = {int(s): (int(epoch), int(position)) for s, epoch, position in rows}
        if len(saved) != self.streams:
            raise DatasetError(f"the checkpoint's data position has {len(saved)} stream(s), the run {self.streams}; "
                               f"set data.streams={len(saved)} to resume it")
        self.cursors = {stream: saved[stream] for stream in self.owned}

    def _advance(self, stream: int) -> tuple[int, bool]:
        epoch, position = self.cursors[stream]
        order, flips = (part[stream::self.streams] for part in self.epoch_plan(epoch))
        index, flip = int(order[position]), bool(flips[position])
        self.cursors[stream] = (epoch + 1, 0) if position + 1 == len(order) else (epoch, position + 1)
        return index, flip

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        examples = []
        for stream in self.owned:
            taken, misses = 0, 0
            while taken < self.batch_size // self.streams:
                example = self.source.example(*self._advance(stream))
                if example is not None:
                    examples.append(example)
                    taken, misses = taken + 1, 0
                elif (misses := misses + 1) >= len(self.source):
                    raise DatasetError("no example in the dataset could be read (every image was skipped)")
        return _collate(examples)
