"""LoRA training (TrainConfig.lora): which layers get adapters (the U-Net's, `lora.targets`, and optionally the text
encoder's, `lora.text_encoder_targets`, as diffusers' --train_text_encoder; SDXL's two text encoders both, as
diffusers' train_text_to_image_lora_sdxl.py adapts them), their first factors, the loss that adds
them to the frozen base weights through `sdjax.lora.apply` (the path LoRA inference takes, so what is trained is
what loads), and the LoRA files a run exports, in diffusers/PEFT and kohya format.

The trained tree is {component: {<the kernel's path, as nested keys>: {"down", "up"}}}, the factors in sdjax.lora's
Flax layout; nested like params rather than keyed "path/of/kernel" as sdjax.lora keeps them, because orbax turns keys
into checkpoint entry names and "/" has a meaning there.
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

# The components LoRA training can adapt, in the order their factors are initialised: the LoRAConfig field naming
# each one's target layers (SDXL's two text encoders share theirs), how messages call it, and its prefix in kohya's
# files: lora_te_ for SD 1.x / 2.x's one text encoder, lora_te1_ / lora_te2_ for SDXL's two (as sd-scripts writes
# them and sdjax.lora and diffusers read them). The U-Net's kohya names are its diffusers module names (SD 1.x / 2.x's
# kohya names; for SDXL diffusers and sdjax read them too, sd-scripts' own SDXL files say input_blocks_* instead).
TARGETS = {"unet": "targets", "text_encoder": "text_encoder_targets", "text_encoder_2": "text_encoder_targets"}
NAMES = {"unet": "U-Net", "text_encoder": "text encoder", "text_encoder_2": "second text encoder (text_encoder_2)"}
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
SDXL_KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
FILES = {"peft": lora.DIFFUSERS_FILE, "kohya": "kohya_lora.safetensors"}


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """The adapters of a run: their rank and alpha, and the layers they adapt ({component: {module name: kernel
    path}})."""
    rank: int
    alpha: float
    layers: dict[str, dict[str, str]]
    export_formats: tuple[str, ...] = ("peft",)
    two_text_encoders: bool = False  # SDXL: kohya files name the text encoders lora_te1_ / lora_te2_

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def init(self, params, key) -> dict:
        """The first factors, as PEFT makes them (init_lora_weights=True): down kaiming-uniform with a = sqrt(5),
        torch's default for Linear and Conv2d (uniform in +-1/sqrt(fan_in)), and up zeros, so the adapted model
        starts out exactly as the base one. `params` by component; one key per layer, numbered across components."""
        layers = [(component, path) for component, modules in self.layers.items() for path in sorted(modules.values())]
        shapes = {component: lora.kernel_shapes(params[component]) for component in self.layers}
        factors = {}
        for index, (component, path) in enumerate(layers):
            *fan_in, out = shapes[component][path]
            bound = 1.0 / math.sqrt(math.prod(fan_in))
            where = (component, *path.split("/"))
            factors[(*where, "down")] = jax.random.uniform(jax.random.fold_in(key, index), (*fan_in, self.rank),
                                                           jnp.float32, -bound, bound)
            factors[(*where, "up")] = jnp.zeros((self.rank, out), jnp.float32)
        return traverse_util.unflatten_dict(factors)

    def merged(self, params: dict, trained: dict) -> dict:
        """`params` (by component) with the trained adapters added to their layers at scale 1 (alpha / rank inside)."""
        layers = {component: {path: {**pair, "scaling": jnp.float32(self.scaling)} for path, pair in paths.items()}
                  for component, paths in by_path(trained).items()}
        return lora.apply({**params, "loras": {"trained": {"scale": jnp.float32(1.0), "layers": layers}}})

    def loss(self, loss_fn: LossFn) -> LossFn:
        """`loss_fn` of the adapted model as a function of the factors; the base weights come in as `frozen`."""
        def adapted(trained, frozen, batch, key):
            return loss_fn({}, self.merged(frozen, trained), batch, key)
        return adapted

    def peft_file(self, trained: dict) -> tuple[dict, dict]:
        """(tensors, header metadata) of diffusers' pytorch_lora_weights.safetensors: <component>.<module>.lora_A /
        lora_B.weight. diffusers builds the PEFT LoraConfig of each component from the file's lora_adapter_metadata
        entry when there is one, and otherwise takes alpha to be the rank, so the entry is always written."""
        tensors, config = {}, {}
        for component, module, (down, up) in self._torch_factors(trained):
            tensors[f"{component}.{module}.lora_A.weight"], tensors[f"{component}.{module}.lora_B.weight"] = down, up
        for component, modules in self.layers.items():
            # PEFT finds target_modules as suffixes of module names; CLIPTextModel lost its `text_model.` level in
            # transformers 5 (diffusers drops it from the keys then), so the names without it match either layout.
            targets = sorted(module.removeprefix("text_model.") for module in modules)
            config.update({f"{component}.r": self.rank, f"{component}.lora_alpha": self.alpha,
                           f"{component}.target_modules": targets})
        return tensors, {"format": "pt", "lora_adapter_metadata": json.dumps(config, sort_keys=True)}

    def kohya_file(self, trained: dict) -> tuple[dict, dict]:
        """(tensors, metadata) in kohya sd-scripts' layout: lora_unet_ / lora_te_ (SDXL: lora_te1_ / lora_te2_)
        <module, dots as underscores>.lora_down / .lora_up.weight and an .alpha scalar per layer."""
        tensors = {}
        prefixes = SDXL_KOHYA_PREFIXES if self.two_text_encoders else KOHYA_PREFIXES
        for component, module, (down, up) in self._torch_factors(trained):
            name = prefixes[component] + module.replace(".", "_")
            tensors.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                            f"{name}.alpha": np.asarray(self.alpha, np.float32)})
        return tensors, {"format": "pt"}

    def write(self, trained: dict, folder: Path) -> None:
        """The export_formats' files in `folder` (each written atomically)."""
        folder.mkdir(parents=True, exist_ok=True)
        makers = {"peft": self.peft_file, "kohya": self.kohya_file}
        for name in self.export_formats:
            tensor_files.write_safetensors(folder / FILES[name], *makers[name](trained))

    def _torch_factors(self, trained: dict) -> list[tuple[str, str, tuple[Any, Any]]]:
        """(component, module name, (down, up) in PyTorch layout) of every trained layer."""
        return [(component, lora.module_name(path), lora.torch_factors(pair))
                for component, paths in by_path(trained).items() for path, pair in paths.items()]


def by_path(trained: dict) -> dict[str, dict[str, dict]]:
    """{component: {"path/of/kernel": {"down", "up"}}} of the trained tree (sdjax.lora's keys)."""
    layers: dict[str, dict[str, dict]] = {}
    for (component, *path, role), value in traverse_util.flatten_dict(trained).items():
        layers.setdefault(component, {}).setdefault("/".join(path), {})[role] = value
    return layers


def lora_spec(config: LoRAConfig, params) -> LoRASpec:
    """The adapters `config` asks for on the components whose params are given (by component; text_encoder_targets
    adapt every text encoder there is); ConfigError when a target pattern matches no layer (with a sample of the
    layers there are)."""
    layers = {}
    for component, field in TARGETS.items():
        if getattr(config, field) and component in params:
            layers[component] = matched_layers(getattr(config, field), params[component], f"lora.{field}",
                                               NAMES[component])
    return LoRASpec(config.rank, config.alpha or float(config.rank), layers, config.export_formats,
                    two_text_encoders="text_encoder_2" in params)


def matched_layers(patterns, params, key: str, name: str) -> dict[str, str]:
    """{module name: kernel path} of the layers of one component (`params`) that `patterns` match."""
    modules = {lora.module_name(path): path for path in lora.kernel_shapes(params)}
    matched = {pattern: [m for m in modules if lora.matches_module(pattern, m)] for pattern in patterns}
    unmatched = [pattern for pattern, found in matched.items() if not found]
    if unmatched:
        raise ConfigError(f"{key} {', '.join(map(repr, unmatched))} match no linear or conv layer of the {name} (a "
                          f"pattern must match the end of a module name, after a dot); its {len(modules)} layers "
                          f"end in {layer_kinds(modules)}")
    return {module: modules[module] for found in matched.values() for module in found}


def layer_kinds(modules) -> str:
    """The kinds of layer among `modules`, each as its name after the last numbered block ("attn1.to_q", "proj",
    "conv1"): what a target pattern is usually written as."""
    return ", ".join(sorted({re.sub(r"^.*\.\d+\.", "", module) for module in modules}))
