"""LoRA training (TrainConfig.lora): which U-Net layers get adapters, their first factors, the loss that adds them
to the frozen U-Net through `sdjax.lora.apply` (the path LoRA inference takes, so what is trained is what loads),
and the LoRA files a run exports, in diffusers/PEFT and kohya format.

The trained tree is {"unet": {<the kernel's path, as nested keys>: {"down", "up"}}}, the factors in sdjax.lora's Flax
layout; nested like params rather than keyed "path/of/kernel" as sdjax.lora keeps them, because orbax turns keys into
checkpoint entry names and "/" has a meaning there.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sdjax import lora
from sdjax.errors import ConfigError
from sdjax.train.config import LoRAConfig
from sdjax.train.losses import LossFn
from sdjax.weights import tensors as tensor_files

COMPONENT = "unet"  # what LoRA training adapts
FILES = {"peft": lora.DIFFUSERS_FILE, "kohya": "kohya_lora.safetensors"}


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """The adapters of a run: their rank and alpha, and the layers they adapt ({module name: kernel path})."""
    rank: int
    alpha: float
    layers: dict[str, str]
    export_formats: tuple[str, ...] = ("peft",)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def init(self, unet_params, key) -> dict:
        """The first factors, as PEFT makes them (init_lora_weights=True): down kaiming-uniform with a = sqrt(5),
        torch's default for Linear and Conv2d (uniform in +-1/sqrt(fan_in)), and up zeros, so the adapted U-Net
        starts out exactly as the base one."""
        shapes = lora.kernel_shapes(unet_params)
        factors = {}
        for index, path in enumerate(sorted(self.layers.values())):
            *fan_in, out = shapes[path]
            bound = 1.0 / math.sqrt(math.prod(fan_in))
            factors[path] = {"down": jax.random.uniform(jax.random.fold_in(key, index), (*fan_in, self.rank),
                                                        jnp.float32, -bound, bound),
                             "up": jnp.zeros((self.rank, out), jnp.float32)}
        return {COMPONENT: traverse_util.unflatten_dict(
            {(*path.split("/"), role): value for path, pair in factors.items() for role, value in pair.items()})}

    def merged(self, params: dict, trained: dict) -> dict:
        """`params` (by component) with the trained adapter added to its layers at scale 1 (alpha / rank inside)."""
        layers = {path: {**pair, "scaling": jnp.float32(self.scaling)} for path, pair in by_path(trained).items()}
        return lora.apply({**params, "loras": {"trained": {"scale": jnp.float32(1.0), "layers": {COMPONENT: layers}}}})

    def loss(self, loss_fn: LossFn) -> LossFn:
        """`loss_fn` of the adapted model as a function of the factors; the base weights come in as `frozen`."""
        def adapted(trained, frozen, batch, key):
            return loss_fn({}, self.merged(frozen, trained), batch, key)
        return adapted

    def peft_file(self, trained: dict) -> tuple[dict, dict]:
        """(tensors, header metadata) of diffusers' pytorch_lora_weights.safetensors. diffusers builds the PEFT
        LoraConfig of a file from its lora_adapter_metadata entry when there is one, and otherwise takes alpha to
        be the rank, so the entry is always written."""
        tensors = {}
        for module, (down, up) in self._torch_factors(trained).items():
            tensors[f"{COMPONENT}.{module}.lora_A.weight"], tensors[f"{COMPONENT}.{module}.lora_B.weight"] = down, up
        config = {"r": self.rank, "lora_alpha": self.alpha, "target_modules": sorted(self.layers)}
        return tensors, {"format": "pt", "lora_adapter_metadata": json.dumps(
            {f"{COMPONENT}.{key}": value for key, value in config.items()}, sort_keys=True)}

    def kohya_file(self, trained: dict) -> tuple[dict, dict]:
        """(tensors, metadata) in kohya sd-scripts' layout: lora_unet_<module, dots as underscores>.lora_down /
        .lora_up.weight and an .alpha scalar per layer."""
        tensors = {}
        for module, (down, up) in self._torch_factors(trained).items():
            name = "lora_unet_" + module.replace(".", "_")
            tensors.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                            f"{name}.alpha": np.asarray(self.alpha, np.float32)})
        return tensors, {"format": "pt"}

    def write(self, trained: dict, folder: Path) -> None:
        """The export_formats' files in `folder` (each written atomically)."""
        folder.mkdir(parents=True, exist_ok=True)
        makers = {"peft": self.peft_file, "kohya": self.kohya_file}
        for name in self.export_formats:
            tensor_files.write_safetensors(folder / FILES[name], *makers[name](trained))

    def _torch_factors(self, trained: dict) -> dict[str, tuple[Any, Any]]:
        return {lora.module_name(path): lora.torch_factors(pair) for path, pair in by_path(trained).items()}


def by_path(trained: dict) -> dict[str, dict]:
    """{"path/of/kernel": {"down", "up"}} of the trained tree (sdjax.lora's keys)."""
    layers: dict[str, dict] = {}
    for (*path, role), value in traverse_util.flatten_dict(trained[COMPONENT]).items():
        layers.setdefault("/".join(path), {})[role] = value
    return layers


def lora_spec(config: LoRAConfig, unet_params) -> LoRASpec:
    """The adapters `config` asks for on the U-Net whose params are given; ConfigError when a target pattern matches
    no layer (with a sample of the layers there are)."""
    modules = {lora.module_name(path): path for path in lora.kernel_shapes(unet_params)}
    matched = {pattern: [m for m in modules if lora.matches_module(pattern, m)] for pattern in config.targets}
    unmatched = [pattern for pattern, found in matched.items() if not found]
    if unmatched:
        raise ConfigError(f"lora.targets {', '.join(map(repr, unmatched))} match no linear or conv layer of the "
                          f"U-Net (a pattern must match the end of a module name, after a dot); its {len(modules)} "
                          f"layers end in {layer_kinds(modules)}")
    layers = {module: modules[module] for found in matched.values() for module in found}
    return LoRASpec(config.rank, config.alpha or float(config.rank), layers, config.export_formats)


def layer_kinds(modules) -> str:
    """The kinds of layer among `modules`, each as its name after the last numbered block ("attn1.to_q", "proj",
    "conv1"): what a target pattern is usually written as."""
    return ", ".join(sorted({re.sub(r"^.*\.\d+\.", "", module) for module in modules}))
