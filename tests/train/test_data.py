"""The image-caption folder: caption sources, crops, bad input, and the deterministic, restorable iterator."""
import json

import numpy as np
import pytest
from PIL import Image

from sdjax.train.data import (
    BatchIterator,
    DatasetError,
    ImageSource,
    SkippedImageWarning,
    scan_folder,
    square_crop,
)
from tests.train.synthetic import write_synthetic_dataset


def test_captions_from_metadata_and_sidecars(tmp_path):
    folder = write_synthetic_dataset(tmp_path / "a", count=3, captions="sidecar")
    (folder / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(folder / "sub" / "extra.png")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "sub/extra.png", "text": "from metadata"})
                                           + "\n" + json.dumps({"file_name": "image_000.png", "text": "wins"}) + "\n")
    records = scan_folder(folder)
    assert [r.path.relative_to(folder).as_posix() for r in records] == [
        "image_000.png", "image_001.png", "image_002.png", "sub/extra.png"]
    assert [r.caption for r in records] == ["wins", "a photo of green", "a photo of blue", "from metadata"]


def test_square_crop_resizes_the_short_side_and_centers():
    image = np.zeros((10, 30, 3), np.uint8)
    image[:, 10:20] = 255  # a white centre band
    cropped = square_crop(Image.fromarray(image), 8)
    assert cropped.shape == (8, 8, 3) and cropped.dtype == np.uint8
    assert cropped.mean() > 200


def test_missing_empty_and_unreadable_folders(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        scan_folder(tmp_path / "nowhere")
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="is not a folder"):
        scan_folder(tmp_path / "file.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetError, match="holds no images"):
        scan_folder(tmp_path / "empty")
    folder = write_synthetic_dataset(tmp_path / "bad_metadata", count=2)
    (folder / "metadata.jsonl").write_text('{"file_name": "image_000.png", "text": "ok"}\nnot json\n')
    with pytest.raises(DatasetError, match=r"metadata\.jsonl:2"):
        scan_folder(folder)


def test_images_without_captions_are_named(tmp_path):
    folder = write_synthetic_dataset(tmp_path / "d", count=3, captions="sidecar")
    (folder / "image_001.txt").unlink()
    with pytest.raises(DatasetError, match="1 image.*image_001.png"):
        scan_folder(folder)
    assert len(scan_folder(folder, require_captions=False)) == 3  # the VAE stage needs no captions


def test_corrupt_images_are_skipped_with_a_warning_and_counted(tmp_path):
    folder = write_synthetic_dataset(tmp_path / "d", count=4, captions="sidecar")
    (folder / "image_002.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (folder / "image_003.png").write_bytes(b"not an image at all")
    source = ImageSource(scan_folder(folder), resolution=8)
    batches = BatchIterator(source, batch_size=4, seed=0)
    with pytest.warns(SkippedImageWarning, match="image_00[23].png"):
        batch = next(batches)
    assert batch["pixels"].shape == (4, 8, 8, 3) and len(batch["caption"]) == 4
    assert {p.name for p in source.skipped} == {"image_002.png", "image_003.png"}


def test_all_images_corrupt_is_an_error(tmp_path):
    folder = write_synthetic_dataset(tmp_path / "d", count=2, captions="sidecar")
    for png in folder.glob("*.png"):
        png.write_bytes(b"junk")
    with pytest.warns(SkippedImageWarning), pytest.raises(DatasetError, match="could be read"):
        next(BatchIterator(ImageSource(scan_folder(folder), 8), batch_size=1, seed=0))


class Indices:
    """A Source whose examples are their own indices (and flips)."""

    def __init__(self, n):
        self.n, self.skipped = n, set()

    def __len__(self):
        return self.n

    def example(self, index, flip):
        return {"index": np.int64(index), "flip": np.bool_(flip)}


def take(iterator, count):
    return [tuple(b["index"]) + tuple(b["flip"]) for b in (next(iterator) for _ in range(count))]


def test_iterator_is_deterministic_and_restores_exactly_across_epochs():
    seen = take(BatchIterator(Indices(5), batch_size=3, seed=1), 6)  # 18 examples: crosses 3 epoch boundaries
    assert seen == take(BatchIterator(Indices(5), batch_size=3, seed=1), 6)
    assert seen != take(BatchIterator(Indices(5), batch_size=3, seed=2), 6)
    epoch_0 = [index for batch in seen[:2] for index in batch[:3]][:5]
    assert sorted(epoch_0) == [0, 1, 2, 3, 4]  # each epoch is a permutation

    first = BatchIterator(Indices(5), batch_size=3, seed=1)
    take(first, 2)
    resumed = BatchIterator(Indices(5), batch_size=3, seed=1)
    resumed.restore(json.loads(json.dumps(first.state())))
    assert take(resumed, 4) == seen[2:]


def test_streams_read_by_two_processes_resume_on_one():
    """Each process reads its own stream; the merged position (what a checkpoint records) resumes the run on one
    process reading both, with the batches an uninterrupted run would have seen."""
    whole = take(BatchIterator(Indices(7), batch_size=4, seed=3, streams=2), 6)
    halves = [BatchIterator(Indices(7), batch_size=4, seed=3, streams=2, owned=[s]) for s in (0, 1)]
    parts = [[list(b["index"]) for b in (next(h) for _ in range(2))] for h in halves]
    assert [p0 + p1 for p0, p1 in zip(*parts)] == [list(batch[:4]) for batch in whole[:2]]
    merged = {"streams": [row for h in halves for row in h.state()["streams"]], "num_examples": 7}
    resumed = BatchIterator(Indices(7), batch_size=4, seed=3, streams=2)
    resumed.restore(json.loads(json.dumps(merged)))
    assert take(resumed, 4) == whole[2:]
