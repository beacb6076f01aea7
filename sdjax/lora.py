"""LoRA adapters: low-rank updates of a model's linear and conv layers, read from the files people share and
added to sdjax params, either merged into them once or inside the compiled generation program.

Per layer a LoRA holds factors down (r, in) or (r, in, kh, kw) and up (out, r) or (out, r, 1, 1), and maybe an
alpha; the layer's weight becomes W + scale * (alpha / r) * up @ down. alpha / r comes with the file (alpha = r
when the file has none, the convention of PEFT, diffusers and kohya); `scale` is the user's knob, one per adapter.

File layouts (the keys say which; one file may hold several components):
    diffusers / PEFT  unet.<module>.lora_A.weight and .lora_B.weight, text_encoder.<module>..., text_encoder_2...;
                      older: <module>.lora.down.weight / .lora.up.weight, .lora_linear_layer.down / up.weight.
                      alpha: diffusers' `lora_adapter_metadata` header entry (the PEFT LoraConfig of each component:
                      lora_alpha, alpha_pattern, use_rslora), or a <module>.alpha tensor
    kohya sd-scripts  lora_unet_<module, dots as underscores>.lora_down.weight, .lora_up.weight, .alpha; lora_te_
                      (SDXL: lora_te1_, lora_te2_) for the text encoders; conv layers' down is a conv kernel (LoCon)
Module names are looked up in the model's own list of layers (`keymap.torch_key` of every kernel), so kohya's
underscored names decode exactly, with no rename rules to go stale. (kohya's SDXL files name U-Net layers after the
original sgm U-Net, input_blocks_4_1_...: they would need a block map to diffusers' names, not written yet.)

In a param tree an adapter is {"scale": (), "layers": {component: {"path/of/kernel": {"down", "up", "scaling"}}}}:
the factors in Flax layout, down as the kernel with `out` replaced by r and up (r, out), so that
tensordot(down, up, 1) has the kernel's shape; scaling is alpha / r. `apply` adds the adapters under a param
tree's "loras" entry; scales are traced values there, so changing one never recompiles a program.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import re
import warnings
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sdjax.errors import InvalidArgumentError, WeightsError
from sdjax.weights import keymap, tensors as tensor_files

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")  # what LoRA files adapt (diffusers' names and prefixes)
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
FACTOR_SUFFIXES = {".lora_A.weight": "down", ".lora_B.weight": "up",               # PEFT
                   ".lora.down.weight": "down", ".lora.up.weight": "up",           # diffusers before PEFT
                   ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",
                   ".lora_down.weight": "down", ".lora_up.weight": "up",           # kohya
                   ".alpha": "alpha"}
# Adapters that are not plain LoRA: loading their low-rank part alone would give wrong images, so they are refused.
UNSUPPORTED = {"dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", ".lora_B.bias": "a LoRA bias (lora_bias)",
               ".hada_w": "LoHa (LyCORIS)", ".lokr_w": "LoKr (LyCORIS)"}
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes into a folder


@dataclasses.dataclass(frozen=True, eq=False)  # eq: identity (comparing the arrays would be ambiguous)
class Adapter:
    """One loaded LoRA: its factors per layer (`layers`, as in the module docstring), its scale, and whether it is
    merged into the pipeline's params."""
    name: str
    source: str
    layers: dict = dataclasses.field(repr=False)
    scale: float = 1.0
    merged: bool = False

    def entry(self, scale: float | None = None) -> dict:
        """The adapter as `apply` reads it from params["loras"], at its own scale or `scale`."""
        return {"scale": jnp.float32(self.scale if scale is None else scale), "layers": self.layers}


def apply(params: dict) -> dict:
    """`params` with each adapter of params["loras"] added to its layers, W + scale * scaling * down @ up, and the
    "loras" entry gone. The generation program calls it first; merging calls it once on the host."""
    adapters = params.get("loras") or {}
    params = {name: tree for name, tree in params.items() if name != "loras"}
    for adapter in adapters.values():
        for component, layers in adapter["layers"].items():
            flat = traverse_util.flatten_dict(params[component], sep="/")
            for path, factors in layers.items():
                flat[path] = _updated(flat[path], factors, adapter["scale"])
            params[component] = traverse_util.unflatten_dict(flat, sep="/")
    return params


def _updated(kernel, factors, scale):
    # HIGHEST: TPUs and GPUs otherwise multiply float32 in bfloat16 or tf32, far from diffusers' float32 merge.
    delta = jnp.tensordot(factors["down"], factors["up"], axes=1, precision=jax.lax.Precision.HIGHEST)
    return (kernel.astype(jnp.float32) + (scale * factors["scaling"]) * delta).astype(kernel.dtype)


def check_scale(scale, name: str) -> float:
    """`scale` as a float, when it is a finite real number (bool and strings are refused)."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise InvalidArgumentError(f"the scale of LoRA {name!r} must be a finite number, got {scale!r}")
    return float(scale)


def load_adapter(source, params: dict, *, name: str, scale: float = 1.0, merged: bool = False, strict: bool = True,
                 sharding=None) -> Adapter:
    """The LoRA in `source` (a file, a folder holding diffusers' pytorch_lora_weights.safetensors, or a state dict
    of arrays) checked against `params`, the pipeline's params by component, with its factors placed on `sharding`."""
    scale = check_scale(scale, name)
    state, configs, described = read_lora(source)
    layers = lora_layers(state, configs, params, source=described, strict=strict)
    return Adapter(name, described, jax.device_put(layers, sharding), scale, bool(merged))


def read_lora(source) -> tuple[dict[str, np.ndarray], dict[str, dict], str]:
    """(tensors, {component: its PEFT LoraConfig fields}, a description for messages) of a LoRA source."""
    if isinstance(source, Mapping):
        return {str(key): tensor_files.to_numpy(value) for key, value in source.items()}, {}, "the LoRA state dict"
    if not isinstance(source, (str, os.PathLike)):
        raise InvalidArgumentError(f"a LoRA is a path (.safetensors, .bin, .pt, or a folder with {DIFFUSERS_FILE}) or "
                                   f"a state dict, got {type(source).__name__}")
    path = Path(source)
    if path.is_dir():
        if not (path / DIFFUSERS_FILE).is_file():
            found = sorted(p.name for p in path.glob("*.safetensors"))
            raise WeightsError(f"{path}: a LoRA folder holds {DIFFUSERS_FILE} (diffusers' save_lora_weights); found "
                               f"{found or 'no .safetensors file'}: pass the file itself")
        path = path / DIFFUSERS_FILE
    if not path.is_file():
        raise WeightsError(f"{path}: no such LoRA file")
    if path.suffix != ".safetensors":
        return tensor_files.read_torch_pickle(path), {}, str(path)
    metadata = tensor_files.read_safetensors_metadata(path)
    return tensor_files.read_safetensors(path), adapter_configs(metadata, path), str(path)


def adapter_configs(metadata: Mapping[str, str], source) -> dict[str, dict]:
    """{component: LoraConfig fields} from diffusers' `lora_adapter_metadata` header entry, a JSON object with
    keys "unet.lora_alpha", "text_encoder.alpha_pattern", ..."""
    text = metadata.get("lora_adapter_metadata")
    if not text:
        return {}
    try:
        packed = json.loads(text)
    except json.JSONDecodeError as err:
        raise WeightsError(f"{source}: the lora_adapter_metadata entry of its header is not JSON ({err})") from err
    configs: dict[str, dict] = {}
    for key, value in packed.items():
        component, _, field = key.partition(".")
        configs.setdefault(component, {})[field] = value
    return configs


def lora_layers(state: Mapping[str, np.ndarray], configs: Mapping[str, dict], params: Mapping[str, Any], *,
                source: str, strict: bool = True) -> dict:
    """{component: {"path/of/kernel": {"down", "up", "scaling"}}} (numpy, Flax layout) from a LoRA state dict.

    Keys that name no layer of `params` raise WeightsError listing the first of them and what each was looked up
    as; with strict=False they are skipped with a warning. Unpaired, misranked or misshaped factors always raise."""
    for key in state:
        for marker, kind in UNSUPPORTED.items():
            if marker in key:
                raise WeightsError(f"{source}: key {key} belongs to {kind}, which sdjax does not load (only plain "
                                   f"LoRA: down/up factors and alpha)")
    layers = {name: _Layers(params[name]) for name in COMPONENTS if name in params}
    groups: dict[str, dict[str, tuple[str, np.ndarray]]] = {}
    unmatched = []
    for key, value in state.items():
        suffix = next((s for s in FACTOR_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            unmatched.append(f"{key} (not a LoRA factor: lora_A/lora_B, lora_down/lora_up, lora.down/lora.up or "
                             f"alpha)")
            continue
        groups.setdefault(key[:-len(suffix)], {})[FACTOR_SUFFIXES[suffix]] = (key, value)
    found: dict[str, dict] = {}
    for module_key, factors in groups.items():
        component, module, path = _locate(module_key, layers)
        if path is None:
            unmatched += [f"{key} (looked up as {module})" for key, _ in factors.values()]
            continue
        if path in found.setdefault(component, {}):
            raise WeightsError(f"{source}: two LoRAs for {component} layer {module} (the second: {module_key})")
        found[component][path] = _factors(factors, layers[component].shapes[path], configs.get(component, {}),
                                          module, source)
    if unmatched:
        message = (f"{source}: {len(unmatched)} of {len(state)} LoRA keys match no layer of this pipeline's "
                   f"{', '.join(layers)} (a LoRA for another architecture?): {keymap.listing(unmatched, 5)}")
        if strict or not found:
            raise WeightsError(message + ("; pass strict=False to load the keys that match and skip these"
                                          if found else ""))
        warnings.warn(message + "; skipped (strict=False)", stacklevel=4)
    if not found:
        raise WeightsError(f"{source}: holds no LoRA factors")
    return found


def kernel_shapes(params) -> dict[str, tuple[int, ...]]:
    """{"path/of/kernel": shape} of every linear and conv layer in a component's params: what a LoRA can adapt."""
    return {"/".join(path): np.shape(leaf) for path, leaf in traverse_util.flatten_dict(params).items()
            if path[-1] == "kernel"}


def module_name(kernel_path: str) -> str:
    """The PyTorch module name of the layer whose Flax kernel is at `kernel_path` (".../attn1/to_q/kernel" ->
    "...attn1.to_q"): how LoRA files name layers."""
    return keymap.torch_key(tuple(kernel_path.split("/"))).removesuffix(".weight")


def matches_module(pattern: str, module: str) -> bool:
    """Whether the regular expression `pattern` matches the end of `module` at a dot boundary, as PEFT matches
    target_modules, rank_pattern and alpha_pattern ("to_q" matches "...attn1.to_q" but not "...attn1.to_qkv")."""
    return re.match(rf"(.*\.)?({pattern})$", module) is not None


def torch_factors(factors: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(down, up) of one layer in PyTorch layout, (r, in) or (r, in, kh, kw) and (out, r) or (out, r, 1, 1), from
    the Flax layout of the module docstring: the inverse of what loading does, for writing LoRA files."""
    down = keymap.flax_to_torch("kernel", np.asarray(factors["down"], np.float32))
    up = np.asarray(factors["up"], np.float32).T
    return down, (up[:, :, None, None] if down.ndim == 4 else up)


class _Layers:
    """The linear and conv layers of one component: their PyTorch module names (and kohya's spelling of them, dots
    as underscores) to the Flax paths of their kernels, and each kernel's shape."""

    def __init__(self, params):
        self.shapes = kernel_shapes(params)
        self.by_name = {}
        for path in self.shapes:
            module = module_name(path)
            self.by_name[module] = path
            # transformers 5 names CLIPTextModel's modules without `text_model.`, and so do LoRAs made on it
            self.by_name.setdefault(module.removeprefix("text_model."), path)
        self.by_kohya_name = {module.replace(".", "_"): path for module, path in self.by_name.items()}


def _locate(module_key: str, layers: Mapping[str, _Layers]) -> tuple[str | None, str, str | None]:
    """(component, module name, kernel path) of the layer a LoRA key's module part names; the path is None when
    nothing matches, and the module name then says what was looked up."""
    for prefix, component in KOHYA_PREFIXES.items():
        if module_key.startswith(prefix):
            name = module_key[len(prefix):]
            if component not in layers:
                return component, f"kohya {prefix}: this pipeline has no {component}", None
            path = layers[component].by_kohya_name.get(name)
            return component, name if path else f"the kohya name of a {component} layer {name!r}: none", path
    component, _, name = module_key.partition(".")
    if component not in COMPONENTS:
        return None, (f"component {component!r}: a LoRA names its layers unet.*, text_encoder.*, text_encoder_2.* "
                      f"or {'*, '.join(KOHYA_PREFIXES)}*"), None
    if component not in layers:
        return component, f"a {component} layer: this pipeline has no {component}", None
    path = layers[component].by_name.get(name)
    return component, name if path else f"{component} layer {name!r}: no linear or conv layer of that name", path


def _factors(factors: dict, kernel_shape: tuple, config: Mapping, module: str, source: str) -> dict:
    """One layer's factors in Flax layout (module docstring), checked against its kernel's shape."""
    roles = {role: key for role, (key, _) in factors.items()}
    for role, other in (("down", "up"), ("up", "down")):
        if role not in factors:
            raise WeightsError(f"{source}: {roles.get(other) or roles['alpha']} has no {role} factor beside it")
    (down_key, down), (up_key, up) = factors["down"], factors["up"]
    down, up = np.asarray(down, np.float32), np.asarray(up, np.float32)
    if down.ndim not in (2, 4) or up.ndim not in (2, 4) or (up.ndim == 4 and up.shape[2:] != (1, 1)):
        raise WeightsError(f"{source}: {down_key} {down.shape} and {up_key} {up.shape} are not LoRA factors: down is "
                           f"(r, in) or (r, in, kh, kw), up (out, r) or (out, r, 1, 1)")
    rank = down.shape[0]
    if up.shape[1] != rank:
        raise WeightsError(f"{source}: rank mismatch: {down_key} has shape {down.shape} (rank {rank}) but {up_key} "
                           f"has shape {up.shape} (rank {up.shape[1]})")
    flax_down = keymap.torch_to_flax("kernel", down, len(kernel_shape))
    flax_up = up.reshape(up.shape[0], rank).T
    if flax_down.shape[:-1] != kernel_shape[:-1] or flax_up.shape[1] != kernel_shape[-1]:
        weight = keymap.flax_to_torch("kernel", np.broadcast_to(np.int8(0), kernel_shape)).shape
        raise WeightsError(f"{source}: {down_key} {down.shape} and {up_key} {up.shape} make an update of shape "
                           f"{(up.shape[0], *down.shape[1:])}, but the layer {module} has a weight of shape {weight}")
    scaling = _alpha(factors, config, module, rank) / (math.sqrt(rank) if config.get("use_rslora") else rank)
    return {"down": flax_down, "up": flax_up, "scaling": np.float32(scaling)}


def _alpha(factors: dict, config: Mapping, module: str, rank: int) -> float:
    """The layer's alpha: its own alpha tensor, else its PEFT config's (alpha_pattern entries are regular
    expressions matched against the end of the module name, as PEFT does), else the rank."""
    if "alpha" in factors:
        return float(np.asarray(factors["alpha"][1], np.float64).reshape(()))
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if matches_module(pattern, module):
            return float(alpha)
    return float(config.get("lora_alpha", rank))


class LoRAs:
    """The adapters loaded into one pipeline, in load order, and the params they were loaded onto. Merged adapters
    are folded into the params, recomputed from the originals on every change, so that unloading them gives the
    originals back bitwise; unmerged ones go to the generation program beside the params (`unmerged`)."""

    def __init__(self):
        self.adapters: dict[str, Adapter] = {}
        self._original = None  # the pipeline's params before any adapter
        self._current = None   # the params this set made last, to notice params replaced from outside

    def original(self, params: dict) -> dict:
        """The params without any adapter, given the pipeline's current ones."""
        if not self.adapters:
            return params
        if params is not self._current:
            raise InvalidArgumentError(f"the pipeline's params were replaced while LoRA adapters "
                                       f"({', '.join(self.adapters)}) were loaded; unload_lora() before replacing them")
        return self._original

    def new_name(self, name: str | None, source) -> str:
        """`name`, or one made from the file name; refused when an adapter has it already."""
        if name is None:
            name = Path(source).stem if isinstance(source, (str, os.PathLike)) else f"lora_{len(self.adapters)}"
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(f"a LoRA's name must be a non-empty string, got {name!r}")
        if name in self.adapters:
            raise InvalidArgumentError(f"a LoRA named {name!r} is loaded already: pass another name= or "
                                       f"unload_lora({name!r}) first")
        return name

    def names(self, name: str | None) -> list[str]:
        """[name] when it is loaded, every adapter's name for None."""
        if name is None:
            return list(self.adapters)
        if name not in self.adapters:
            raise InvalidArgumentError(f"no LoRA named {name!r} is loaded; loaded: {list(self.adapters) or 'none'}")
        return [name]

    def replace(self, params: dict, adapters: dict[str, Adapter]) -> dict:
        """The pipeline's params with `adapters` in place of the current ones."""
        original = self.original(params)
        self.adapters = dict(adapters)
        merged = {name: adapter.entry() for name, adapter in self.adapters.items() if adapter.merged}
        self._original = original if self.adapters else None
        self._current = apply({**original, "loras": merged}) if merged else original
        return self._current

    def update(self, params: dict, name: str | None, **changes) -> dict:
        """The params after changing the scale or merged flag of adapter `name` (all for None)."""
        changed = {n: dataclasses.replace(self.adapters[n], **changes) for n in self.names(name)}
        return self.replace(params, {**self.adapters, **changed})

    def unmerged(self, scales: Mapping[str, float] | None = None) -> dict:
        """{"loras": {name: entry}} of the unmerged adapters ({} when there are none), at their own scales or at
        those `scales` gives by name (a call's own scales: traced values, no recompilation)."""
        scales = dict(scales or {})
        for name, scale in scales.items():
            adapter = self.adapters.get(self.names(name)[0])
            if adapter.merged:
                raise InvalidArgumentError(f"LoRA {name!r} is merged into the weights, so a call cannot set its "
                                           f"scale: use set_lora_scale (which merges again), or unfuse_lora({name!r})")
            scales[name] = check_scale(scale, name)
        entries = {name: adapter.entry(scales.get(name)) for name, adapter in self.adapters.items()
                   if not adapter.merged}
        return {"loras": entries} if entries else {}
