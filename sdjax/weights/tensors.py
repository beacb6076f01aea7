"""Tensor files: safetensors (read and written here, bfloat16 included) and PyTorch pickles (read via torch).

A component folder holds its weights as one of (diffusers and transformers names, optional variant such as
"fp16" before the extension):
    diffusion_pytorch_model[.variant].safetensors | model[.variant].safetensors
    ...safetensors.index.json + shards               (sharded checkpoints)
    diffusion_pytorch_model[.variant].bin | pytorch_model[.variant].bin   (needs torch)
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from sdjax.errors import WeightsError

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_CODES = {dtype: code for code, dtype in _DTYPES.items()}
_WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")


ALIGNMENT = 64
"""Bytes. On CPU `jax.device_put` takes a C-contiguous host array whose data starts on such a boundary as it is,
without a copy; so weights read into aligned arrays are in memory once, not twice, while a pipeline loads."""


def aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an ALIGNMENT-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a .safetensors file as aligned numpy arrays (`aligned_empty`), read one by one: a memory
    map would add the file's pages to the process's resident memory beside the copies."""
    path = Path(path)
    with open(path, "rb") as f:
        header, size = _header(f, path)
        header.pop("__metadata__", None)
        data_start = f.tell()
        return {name: _tensor(path, name, info, f, data_start, size) for name, info in header.items()}


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string-to-string `__metadata__` of a .safetensors file's header ({} when it has none)."""
    path = Path(path)
    with open(path, "rb") as f:
        return dict(_header(f, path)[0].get("__metadata__") or {})


def safetensors_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of a .safetensors file, read from its header alone (no tensor data)."""
    path = Path(path)
    with open(path, "rb") as f:
        header = _header(f, path)[0]
    header.pop("__metadata__", None)
    try:
        return {name: tuple(info["shape"]) for name, info in header.items()}
    except (KeyError, TypeError) as err:
        raise WeightsError(f"{path}: malformed safetensors header ({err!r})") from err


def _header(f, path: Path) -> tuple[dict, int]:
    """(the JSON header, the file size) of an open safetensors file, left positioned at the first tensor byte."""
    size = os.fstat(f.fileno()).st_size
    if size < 8:
        raise WeightsError(f"{path}: not a safetensors file ({size} bytes; the file is truncated or empty)")
    (header_len,) = struct.unpack("<Q", f.read(8))
    if 8 + header_len > size:
        raise WeightsError(f"{path}: truncated safetensors file (header says {header_len} bytes, "
                           f"the file has {size}); download or copy it again")
    try:
        header = json.loads(f.read(header_len))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WeightsError(f"{path}: corrupt safetensors header ({err})") from err
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: corrupt safetensors header (not a JSON object)")
    return header, size


def _tensor(path, name, info, f, data_start, size) -> np.ndarray:
    try:
        dtype = _DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
    except (KeyError, TypeError, ValueError) as err:
        raise WeightsError(f"{path}: malformed header entry for tensor {name!r}: {info!r}") from err
    if data_start + end > size:
        raise WeightsError(f"{path}: tensor {name!r} ends at byte {data_start + end} but the file has {size} "
                           f"bytes; the file is truncated, download or copy it again")
    count = int(np.prod(shape, dtype=np.int64))
    if end - begin != count * dtype.itemsize:
        raise WeightsError(f"{path}: tensor {name!r} has {end - begin} bytes, shape {shape} needs "
                           f"{count * dtype.itemsize}")
    tensor = aligned_empty(shape, dtype)
    f.seek(data_start + begin)
    if f.readinto(tensor.reshape(-1).view(np.uint8)) != end - begin:
        raise WeightsError(f"{path}: tensor {name!r} could not be read whole; the file is truncated or changed "
                           f"while being read")
    return tensor


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict | None = None):
    """Write tensors as .safetensors, atomically: a crash never leaves a half-written file at `path`."""
    header, offset = {}, 0
    # reshaped: ascontiguousarray makes a 0-d array 1-d, and scalars (kohya's alphas) must keep their shape ()
    arrays = {name: np.ascontiguousarray(value).reshape(np.shape(value)) for name, value in sorted(tensors.items())}
    for name, value in arrays.items():
        if value.dtype not in _CODES:
            raise WeightsError(f"cannot write tensor {name!r} of dtype {value.dtype} to safetensors")
        header[name] = {"dtype": _CODES[value.dtype], "shape": list(value.shape),
                        "data_offsets": [offset, offset + value.nbytes]}
        offset += value.nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format pads the header to 8-byte alignment
    temporary = Path(f"{path}.partial")
    try:
        with open(temporary, "wb") as f:
            f.write(struct.pack("<Q", len(encoded)))
            f.write(encoded)
            for value in arrays.values():
                f.write(value.tobytes())
        os.replace(temporary, path)
    except BaseException:  # a full disk, an interrupt: no half-written file stays behind, at `path` or beside it
        temporary.unlink(missing_ok=True)
        raise


def load_torch_pickle(path: str | os.PathLike, what: str = "checkpoint"):
    """The object in a PyTorch pickle (.bin/.pt/.ckpt), loaded safely (`weights_only=True`); needs torch."""
    try:
        import torch
    except ImportError:
        raise WeightsError(f"{path} is a PyTorch pickle and torch is not installed; install torch or convert "
                           f"the {what} to .safetensors") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for corrupt or unsafe pickles
        raise WeightsError(f"{path}: cannot read PyTorch {what} ({type(err).__name__}: {err})") from err


def read_torch_pickle(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A PyTorch .bin/.pt/.ckpt state dict, loaded safely (`weights_only=True`); needs torch."""
    state = load_torch_pickle(path)
    state = state.get("state_dict", state)
    return {k: to_numpy(v) for k, v in state.items() if is_torch_tensor(v)}


def is_torch_tensor(value) -> bool:
    return hasattr(value, "detach") and hasattr(value, "numpy")


def to_numpy(value) -> np.ndarray:
    """A torch, jax or numpy array as numpy, in its own dtype but for torch's bfloat16 (numpy has none: float32)."""
    if is_torch_tensor(value):
        value = value.detach().cpu()
        return (value.float() if str(value.dtype) == "torch.bfloat16" else value).numpy()
    return np.asarray(value)


def find_weight_files(folder: Path, variant: str | None = None) -> list[Path]:
    """The weight file(s) of a component folder, safetensors preferred, honouring a variant like "fp16"."""
    suffix = f".{variant}" if variant else ""
    for extension in (".safetensors", ".bin"):
        for stem in _WEIGHT_STEMS:
            single = folder / f"{stem}{suffix}{extension}"
            if single.is_file():
                return [single]
            index = folder / f"{stem}{suffix}{extension}.index.json"
            if index.is_file():
                return _shards(index)
    found = sorted(p.name for p in folder.glob("*") if p.suffix in (".safetensors", ".bin"))
    wanted = f" for variant {variant!r}" if variant else ""
    raise WeightsError(f"{folder}: no weight file{wanted} (looked for "
                       f"{{{', '.join(_WEIGHT_STEMS)}}}{suffix}.safetensors or .bin); found: {found or 'nothing'}")


def _shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as err:
        raise WeightsError(f"{index}: not a valid shard index (needs a 'weight_map')") from err
    shards = [index.parent / name for name in sorted(set(weight_map.values()))]
    for shard in shards:
        if not shard.is_file():
            raise WeightsError(f"{index}: shard {shard.name} is listed but missing from {index.parent}")
    return shards


def read_weights(files: list[Path]) -> dict[str, np.ndarray]:
    """Merge the state dicts of one component's weight files."""
    state: dict[str, np.ndarray] = {}
    for file in files:
        state.update(read_safetensors(file) if file.suffix == ".safetensors" else read_torch_pickle(file))
    return state


def check_finite(state: dict, source: str, names: dict[str, str] | None = None) -> None:
    """WeightsError naming the tensors of `state` that hold NaN or inf (by `names[key]` where given: the file's
    own key names), as read from `source`."""
    floating = lambda value: np.issubdtype(value.dtype, np.inexact) or value.dtype == ml_dtypes.bfloat16  # noqa: E731
    broken = sorted({(names or {}).get(key, key) for key, value in state.items()
                     if floating(np.asarray(value)) and not np.isfinite(value).all()})
    if broken:
        raise WeightsError(f"{source}: {len(broken)} tensor(s) hold NaN or inf, e.g. {', '.join(broken[:5])}; the "
                           f"file is damaged: copy or download it again")
