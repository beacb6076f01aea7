"""PyTorch state dict <-> Flax params, written once as naming and layout rules.

Naming: sdjax's Flax modules are named after the PyTorch attributes they mirror, list entries included
(`down_blocks.0`), so a Flax param path joined with "." is the PyTorch key with only the leaf renamed:
    ('down_blocks.0', 'resnets.1', 'conv1', 'kernel')  <->  'down_blocks.0.resnets.1.conv1.weight'
Layout, by Flax leaf name:
    kernel, 4-D   conv, HWIO  <->  OIHW
    kernel, 2-D   dense, (in, out)  <->  Linear (out, in)   (a 1x1 conv weight is accepted for it too)
    scale         norm scale  <->  weight
    embedding     table       <->  weight
    bias          bias        <->  bias
Import is driven by the model's expected param tree (shapes from `jax.eval_shape`), so every missing,
unexpected or misshaped key is reported by name before any array is built.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from sdjax.errors import WeightsError
from sdjax.weights import tensors

_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}

# Older diffusers checkpoints name the VAE mid-block attention differently; diffusers renames on load.
_LEGACY_RENAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

# Buffers that PyTorch checkpoints may carry but that are not parameters.
_IGNORED_SUFFIXES = ("position_ids",)


def torch_key(flax_path: tuple[str, ...]) -> str:
    """The PyTorch state-dict key of the Flax param at `flax_path`."""
    *modules, leaf = flax_path
    if leaf not in _TORCH_LEAF:
        raise WeightsError(f"sdjax param {'/'.join(flax_path)} has leaf {leaf!r} with no PyTorch naming rule")
    return ".".join([*modules, _TORCH_LEAF[leaf]])


def _modernize(key: str) -> str:
    """Rename legacy attention keys (`mid_block.attentions.0.query.weight` -> `...to_q.weight`)."""
    *modules, leaf = key.split(".")
    if modules and modules[-1] in _LEGACY_RENAMES:
        modules[-1] = _LEGACY_RENAMES[modules[-1]]
    return ".".join([*modules, leaf])


def torch_to_flax(leaf: str, value: np.ndarray, expected_ndim: int) -> np.ndarray:
    """Change one PyTorch tensor to the layout of the Flax leaf named `leaf`."""
    if leaf != "kernel":
        return value
    if value.ndim == 4 and expected_ndim == 4:
        return value.transpose(2, 3, 1, 0)
    if value.ndim == 4 and expected_ndim == 2 and value.shape[2:] == (1, 1):
        value = value[:, :, 0, 0]
    if value.ndim == 2:
        return value.T
    return value


def flax_to_torch(leaf: str, value: np.ndarray) -> np.ndarray:
    """Change one Flax array to the PyTorch layout (inverse of `torch_to_flax`)."""
    if leaf == "kernel" and value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    if leaf == "kernel" and value.ndim == 2:
        return value.T
    return value


def _in_layout(value: np.ndarray, dtype) -> np.ndarray:
    """`value` as an aligned C-contiguous array of `dtype` (jax.device_put then takes it without a copy): itself
    when it already is one, else one copy."""
    if (value.dtype == dtype and value.flags.c_contiguous
            and value.ctypes.data % tensors.ALIGNMENT == 0):
        return value
    converted = tensors.aligned_empty(value.shape, dtype)
    np.copyto(converted, value, casting="unsafe")
    return converted


def params_from_state_dict(state_dict: Mapping[str, np.ndarray], expected: Any, *, source: str,
                           dtype=np.float32, consume: bool = False) -> dict:
    """Flax params shaped like `expected` (a tree of arrays or ShapeDtypeStructs) from a PyTorch state dict.

    `source` names the file(s) the state dict came from, for error messages. `consume`: each tensor is removed
    from `state_dict` (a dict the caller no longer needs) once converted, so a transposed or cast copy never
    coexists with the whole file's tensors: loading SD 1.5 then peaks at its size in memory, not twice it.
    """
    available = {_modernize(k): k for k in state_dict if not k.endswith(_IGNORED_SUFFIXES)}
    flat = traverse_util.flatten_dict(expected)
    missing, misshaped, params = [], [], {}
    for path, spec in flat.items():
        key = torch_key(path)
        if key not in available:
            missing.append(key)
            continue
        original = available.pop(key)
        value = torch_to_flax(path[-1], np.asarray(state_dict[original]), len(spec.shape))
        if consume:
            del state_dict[original]
        if value.shape != tuple(spec.shape):
            misshaped.append(f"{key}: file has {_torch_shape(path[-1], value)}, "
                             f"model expects {_torch_shape(path[-1], np.empty(spec.shape, np.int8))}")
            continue
        params[path] = _in_layout(value, dtype)
    problems = []
    if missing:
        problems.append(f"missing keys: {listing(missing)}")
    if available:
        problems.append(f"unexpected keys: {listing(sorted(available.values()))}")
    if misshaped:
        problems.append(f"wrong shapes: {listing(misshaped)}")
    if problems:
        raise WeightsError(f"{source} does not match the model config next to it; " + "; ".join(problems)
                           + ". Check that config.json and the weights come from the same model.")
    return traverse_util.unflatten_dict(params)


def state_dict_from_params(params: Any) -> dict[str, np.ndarray]:
    """The PyTorch state dict (numpy arrays, PyTorch layout and names) of Flax params."""
    return {torch_key(path): np.ascontiguousarray(flax_to_torch(path[-1], np.asarray(value)))
            for path, value in traverse_util.flatten_dict(params).items()}


def _torch_shape(leaf: str, flax_value: np.ndarray) -> tuple[int, ...]:
    return tuple(flax_to_torch(leaf, flax_value).shape)


def torch_shapes(expected: Any) -> dict[str, tuple[int, ...]]:
    """The PyTorch state-dict keys and shapes of a Flax param tree (arrays or ShapeDtypeStructs), nothing allocated."""
    shapes = {}
    for path, spec in traverse_util.flatten_dict(expected).items():
        shape = tuple(spec.shape)
        if path[-1] == "kernel" and len(shape) in (2, 4):
            shape = shape[::-1] if len(shape) == 2 else (shape[3], shape[2], shape[0], shape[1])
        shapes[torch_key(path)] = shape
    return shapes


def listing(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (and {len(items) - limit} more)" if len(items) > limit else "")
