"""Single-file checkpoints: a whole pipeline in one .safetensors (or PyTorch pickle .ckpt/.pt) in the original
CompVis / Stability key layout, as A1111, ComfyUI and model sites distribute them, read into and written from
sdjax's per-component state dicts (diffusers names, which `keymap` turns into Flax params).

Where each network lives in such a file (key prefixes):
    model.diffusion_model.                 U-Net (ldm names: input_blocks / middle_block / output_blocks)
    first_stage_model.                     VAE (ldm names; mid-block attention q/k/v/proj_out as 1x1 convs)
    cond_stage_model.transformer.          SD 1.x: CLIP ViT-L, transformers names
    cond_stage_model.model.                SD 2.x: OpenCLIP ViT-H (resblocks, q/k/v fused in in_proj)
    conditioner.embedders.0.transformer.   SDXL base: CLIP ViT-L, with
    conditioner.embedders.1.model.           OpenCLIP bigG and its text projection
    conditioner.embedders.0.model.         SDXL refiner: OpenCLIP bigG alone
Other keys (EMA copies `model_ema.*`, the schedule `alphas_cumprod`, ...) are not read: like diffusers, sdjax
takes the non-EMA weights.

Each network's original names come from its diffusers names by one table of module renames (`_unet_rules`,
`_vae_rules`, `_openclip_rules`), built from its config, so reading and writing are the same map run both ways.

Architecture: the text encoders' keys tell the layout apart (SD 1.x, SD 2.x, SDXL base, SDXL refiner) and the
U-Net's first conv its input channels (9: inpainting); the full-size configs of that family are then checked
against every shape in the file. What a file cannot say comes from defaults, as diffusers' `from_single_file`
chooses them (`default_prediction_type`): v-prediction when the file carries ComfyUI's `v_pred` marker key or is
SD 2.x (the 768-v models; pass prediction_type="epsilon" for the 512 base), else epsilon (SD 2 inpainting
included); each family's reference scheduler (DDIM for a v-prediction SD 1.x file: sdjax's PNDM runs noise
predictions only); and the tokenizers of the reference repository (`Architecture.repo`) from the local Hugging
Face cache. `config=` (a diffusers folder or hub id) replaces all of these: its configs, tokenizers and
scheduler go with the file's weights, for small or unusual architectures.

Writing: SD 1.x/2.x text encoders with exact gelu (OpenCLIP) are written in the OpenCLIP layout, others in CLIP
ViT-L's. SD 2.x files hold OpenCLIP's 24th layer and text projection, which SD never uses and diffusers drops:
sdjax reads without them and writes 23 layers, as diffusers keeps them.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

from sdjax.errors import ConfigError, InvalidArgumentError, OfflineError, WeightsError
from sdjax.models import configs as presets
from sdjax.models.components import COMPONENTS, STABLE_DIFFUSION, TEXT_ENCODERS
from sdjax.sdxl import SDXLSettings
from sdjax.weights import diffusers_folder, hub, keymap, tensors

log = logging.getLogger(__name__)

V_PRED_KEY = "v_pred"  # ComfyUI marks v-prediction checkpoints with this empty tensor
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# --- key maps ------------------------------------------------------------------------------------------------

Rules = dict[str, tuple[str, Mapping[str, str]]]
"""diffusers module path -> (original module path, renames of the sub-module path below it)."""

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}


def _unet_rules(config) -> Rules:
    """ldm's U-Net numbers its blocks flat: input_blocks.0 is conv_in, then every resnet (+ its attention at .1)
    and every downsampler of the down path in order; output_blocks likewise, upsamplers after the last layer's
    resnet and attention."""
    rules: Rules = {"conv_in": ("input_blocks.0.0", {}), "conv_norm_out": ("out.0", {}), "conv_out": ("out.2", {}),
                    "time_embedding.linear_1": ("time_embed.0", {}), "time_embedding.linear_2": ("time_embed.2", {}),
                    "add_embedding.linear_1": ("label_emb.0.0", {}), "add_embedding.linear_2": ("label_emb.0.2", {}),
                    "mid_block.resnets.0": ("middle_block.0", _RESNET), "mid_block.attentions.0": ("middle_block.1", {})}
    mid_attention = config.mid_block_type == "UNetMidBlock2DCrossAttn"
    rules["mid_block.resnets.1"] = ("middle_block.2" if mid_attention else "middle_block.1", _RESNET)
    layers, count, index = config.per_block("layers_per_block"), len(config.block_out_channels), 1
    for block in range(count):
        for layer in range(layers[block]):
            rules[f"down_blocks.{block}.resnets.{layer}"] = (f"input_blocks.{index}.0", _RESNET)
            rules[f"down_blocks.{block}.attentions.{layer}"] = (f"input_blocks.{index}.1", {})
            index += 1
        if block < count - 1:
            rules[f"down_blocks.{block}.downsamplers.0.conv"] = (f"input_blocks.{index}.0.op", {})
            index += 1
    index = 0
    for block, layer_count in enumerate(reversed(layers)):
        for layer in range(layer_count + 1):
            rules[f"up_blocks.{block}.resnets.{layer}"] = (f"output_blocks.{index}.0", _RESNET)
            rules[f"up_blocks.{block}.attentions.{layer}"] = (f"output_blocks.{index}.1", {})
            index += 1
        slot = 2 if config.up_block_types[block].startswith("CrossAttn") else 1
        rules[f"up_blocks.{block}.upsamplers.0.conv"] = (f"output_blocks.{index - 1}.{slot}.conv", {})
    return rules


def _vae_rules(config) -> Rules:
    """ldm's decoder numbers its levels from the bottom (up.0 is the last, full-resolution one)."""
    rules: Rules = {"encoder.conv_norm_out": ("encoder.norm_out", {}), "decoder.conv_norm_out": ("decoder.norm_out", {})}
    for part in ("encoder", "decoder"):
        rules[f"{part}.mid_block.resnets.0"] = (f"{part}.mid.block_1", _VAE_RESNET)
        rules[f"{part}.mid_block.resnets.1"] = (f"{part}.mid.block_2", _VAE_RESNET)
        rules[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", _VAE_ATTENTION)
    count = len(config.block_out_channels)
    for block in range(count):
        level = count - 1 - block
        for layer in range(config.layers_per_block + 1):
            rules[f"encoder.down_blocks.{block}.resnets.{layer}"] = (f"encoder.down.{block}.block.{layer}", _VAE_RESNET)
            rules[f"decoder.up_blocks.{block}.resnets.{layer}"] = (f"decoder.up.{level}.block.{layer}", _VAE_RESNET)
        rules[f"encoder.down_blocks.{block}.downsamplers.0.conv"] = (f"encoder.down.{block}.downsample.conv", {})
        rules[f"decoder.up_blocks.{block}.upsamplers.0.conv"] = (f"decoder.up.{level}.upsample.conv", {})
    return rules


def _openclip_rules(config) -> Rules:
    rules: Rules = {"text_model.embeddings.token_embedding": ("token_embedding", {}),
                    "text_model.final_layer_norm": ("ln_final", {})}
    for layer in range(config.num_hidden_layers):
        rules[f"text_model.encoder.layers.{layer}"] = (f"transformer.resblocks.{layer}", _OPENCLIP_LAYER)
    return rules


def original_name(key: str, rules: Rules) -> str:
    """The original name of diffusers key `key` under `rules` (the longest matching module path wins)."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:cut])
        if module in rules:
            target, renames = rules[module]
            inner = ".".join(parts[cut:-1])
            return ".".join(p for p in (target, renames.get(inner, inner), parts[-1]) if p)
    return key


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where one network's tensors live in a single file.

    names: diffusers key -> original key. fused: original key -> the diffusers keys it holds concatenated on the
    first axis (OpenCLIP's in_proj). stored: original key -> "transposed" (OpenCLIP's text_projection, used as
    x @ W) or "conv1x1" (the VAE attention's linear layers). prefix: every key of the network starts with it.
    layers: an OpenCLIP encoder's layer count (the file may hold more: SD 2.x's unused last layer).
    """
    prefix: str
    names: dict[str, str]
    fused: dict[str, tuple[str, ...]]
    stored: dict[str, str]
    layers: int | None = None


def make_layout(kind: str, prefix: str, config, diffusers_keys) -> Layout:
    """The layout of a network of `kind` ("unet", "vae", "clip" or "openclip") with `config` whose diffusers
    state dict has `diffusers_keys`, under `prefix` in the file."""
    fused, stored, layers = {}, {}, None
    if kind == "clip":
        names = {key: prefix + key for key in diffusers_keys}
    elif kind == "openclip":
        layers = config.num_hidden_layers
        exact = {"text_model.embeddings.position_embedding.weight": "positional_embedding",
                 "text_projection.weight": "text_projection"}
        for layer in range(layers):
            for leaf in ("weight", "bias"):
                fused[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{leaf}"] = tuple(
                    f"text_model.encoder.layers.{layer}.self_attn.{p}_proj.{leaf}" for p in "qkv")
        in_fused = {key for parts in fused.values() for key in parts}
        rules = _openclip_rules(config)
        names = {key: prefix + exact.get(key, original_name(key, rules)) for key in diffusers_keys
                 if key not in in_fused}
        stored[prefix + "text_projection"] = "transposed"
    else:
        rules = {"unet": _unet_rules, "vae": _vae_rules}[kind](config)
        names = {key: prefix + original_name(key, rules) for key in diffusers_keys}
        if kind == "vae":
            stored = {name: "conv1x1" for name in names.values() if ".mid.attn_1." in name and
                      name.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight"))}
    return Layout(prefix, names, fused, stored, layers)


def expected_shapes(layout: Layout, diffusers_shapes: Mapping[str, tuple]) -> dict[str, tuple[int, ...]]:
    """The shape of each original key the layout reads, from the shapes of the diffusers state dict."""
    shapes = {}
    for key, name in layout.names.items():
        shape = tuple(diffusers_shapes[key])
        how = layout.stored.get(name)
        shapes[name] = shape[::-1] if how == "transposed" else shape + (1, 1) if how == "conv1x1" else shape
    for name, parts in layout.fused.items():
        first = tuple(diffusers_shapes[parts[0]])
        shapes[name] = (first[0] * len(parts), *first[1:])
    return shapes


def to_original(state: Mapping[str, np.ndarray], layout: Layout) -> dict[str, np.ndarray]:
    """A network's diffusers state dict in the original layout."""
    out = {}
    for key, name in layout.names.items():
        how, value = layout.stored.get(name), state[key]
        out[name] = value.T if how == "transposed" else value[:, :, None, None] if how == "conv1x1" else value
    for name, parts in layout.fused.items():
        out[name] = np.concatenate([state[part] for part in parts])
    return out


def from_original(file_state: Mapping[str, np.ndarray], layout: Layout) -> dict[str, np.ndarray]:
    """A network's diffusers state dict from the tensors of a file (checked with `layout_problems` first)."""
    state = {}
    for key, name in layout.names.items():
        how, value = layout.stored.get(name), file_state[name]
        state[key] = value.T if how == "transposed" else value.reshape(value.shape[:2]) if how == "conv1x1" else value
    for name, parts in layout.fused.items():
        state.update(zip(parts, np.split(file_state[name], len(parts))))
    return state


def layout_problems(file_shapes: Mapping[str, tuple], layout: Layout, expected: Mapping[str, tuple]) -> list[str]:
    """What keeps the file's tensors under the layout's prefix from filling the network: missing, misshaped and
    unexpected keys, by original name."""
    missing, misshaped = [], []
    for name, shape in expected.items():
        if name not in file_shapes:
            missing.append(name)
            continue
        found = tuple(file_shapes[name])
        flat_ok = layout.stored.get(name) == "conv1x1" and found == shape[:2]  # newer files store these as linear
        if found != shape and not flat_ok:
            misshaped.append(f"{name} is {found}, expected {shape}")
    unexpected = [name for name in file_shapes if name.startswith(layout.prefix) and name not in expected
                  and not _unused(name[len(layout.prefix):], layout)]
    return [f"{what}: {keymap.listing(items, 5)}" for what, items in
            (("missing", missing), ("wrong shape", misshaped), ("unexpected", sorted(unexpected))) if items]


def _unused(key: str, layout: Layout) -> bool:
    """Keys that files carry but no sdjax network reads: buffers, CLIP's logit scale, and OpenCLIP's projection
    and layers beyond those the text encoder keeps (SD 2.x conditions on the penultimate layer)."""
    if key.endswith("position_ids") or key in ("logit_scale", "attn_mask"):
        return True
    if layout.layers is None:
        return False
    if key == "text_projection":
        return True  # only reached when the encoder has no projection (SD 2.x); else it is expected
    layer = re.match(r"transformer\.resblocks\.(\d+)\.", key)
    return layer is not None and int(layer[1]) >= layout.layers


# --- architectures -------------------------------------------------------------------------------------------

_SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 steps_offset=1, trained_betas=None)


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One single-file layout and the full-size model of its family.

    marker: the key whose presence identifies the layout. places: network -> (kind of key map, prefix).
    configs: the full-size configs. repo: the reference diffusers repository whose tokenizers are used (from the
    local cache) when no config= is given. scheduler: its scheduler config, less the prediction type
    (`default_prediction_type`). settings: an SDXL model_index's.
    """
    label: str
    marker: str
    places: dict[str, tuple[str, str]]
    configs: dict[str, Any]
    repo: str
    scheduler: dict[str, Any]
    settings: SDXLSettings | None = None

    @property
    def family(self) -> tuple[str, ...]:
        return tuple(self.places)


_UNET, _VAE = ("unet", "model.diffusion_model."), ("vae", "first_stage_model.")
SD1 = Architecture(
    "SD 1.x", "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
    {"unet": _UNET, "vae": _VAE, "text_encoder": ("clip", "cond_stage_model.transformer.")},
    {"unet": presets.SD15_UNET, "vae": presets.SD_VAE, "text_encoder": presets.SD15_TEXT},
    "stable-diffusion-v1-5/stable-diffusion-v1-5",
    dict(_SD_BETAS, _class_name="PNDMScheduler", skip_prk_steps=True, set_alpha_to_one=False, clip_sample=False))
SD2 = Architecture(
    "SD 2.x", "cond_stage_model.model.token_embedding.weight",
    {"unet": _UNET, "vae": _VAE, "text_encoder": ("openclip", "cond_stage_model.model.")},
    {"unet": presets.SD21_UNET, "vae": presets.SD_VAE, "text_encoder": presets.SD21_TEXT},
    "stabilityai/stable-diffusion-2-1",
    dict(_SD_BETAS, _class_name="DDIMScheduler", clip_sample=False, set_alpha_to_one=False))
_SDXL_SCHEDULER = dict(_SD_BETAS, _class_name="EulerDiscreteScheduler", timestep_spacing="leading",
                       interpolation_type="linear", use_karras_sigmas=False)
SDXL_BASE = Architecture(
    "SDXL base", "conditioner.embedders.1.model.positional_embedding",
    {"unet": _UNET, "vae": _VAE, "text_encoder": ("clip", "conditioner.embedders.0.transformer."),
     "text_encoder_2": ("openclip", "conditioner.embedders.1.model.")},
    {"unet": presets.SDXL_UNET, "vae": presets.SDXL_VAE, "text_encoder": presets.SD15_TEXT,
     "text_encoder_2": presets.SDXL_TEXT_2},
    "stabilityai/stable-diffusion-xl-base-1.0", _SDXL_SCHEDULER, SDXLSettings())
SDXL_REFINER_ARCH = Architecture(
    "SDXL refiner", "conditioner.embedders.0.model.positional_embedding",
    {"unet": _UNET, "vae": _VAE, "text_encoder_2": ("openclip", "conditioner.embedders.0.model.")},
    {"unet": presets.SDXL_REFINER_UNET, "vae": presets.SDXL_VAE, "text_encoder_2": presets.SDXL_TEXT_2},
    "stabilityai/stable-diffusion-xl-refiner-1.0", _SDXL_SCHEDULER,
    SDXLSettings("StableDiffusionXLImg2ImgPipeline", force_zeros_for_empty_prompt=False,
                 requires_aesthetics_score=True))
ARCHITECTURES = (SDXL_BASE, SDXL_REFINER_ARCH, SD2, SD1)
"""In the order they are tried: each marker is absent from the layouts before it."""

UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"  # (out, in_channels, 3, 3): 9 input channels inpaint


def detect(file_shapes: Mapping[str, tuple], source: str) -> Architecture:
    """The layout of a file from its keys alone; a ConfigError listing the keys looked for when none fits."""
    for architecture in ARCHITECTURES:
        if architecture.marker in file_shapes and UNET_IN in file_shapes:
            return architecture
    looked_for = "; ".join(f"{a.marker} ({a.label})" for a in ARCHITECTURES)
    sample = ", ".join(sorted(file_shapes)[:4]) or "no tensors"
    raise ConfigError(
        f"{source}: cannot tell which model this file holds. sdjax reads whole pipelines in the original layout "
        f"and looked for {UNET_IN} (the U-Net) and one of: {looked_for}; the file has {len(file_shapes)} tensors "
        f"({sample}, ...). A LoRA, an embedding or a lone U-Net/VAE is no pipeline: load it with its own "
        f"function. For another layout of these networks, pass config= a diffusers folder or hub id with "
        f"matching configs (CLI: --config); files in other formats need converting first.")


def architecture_of(configs: Mapping[str, Any]) -> Architecture:
    """The layout to write a pipeline of these configs in."""
    if "text_encoder_2" in configs:
        return SDXL_BASE if "text_encoder" in configs else SDXL_REFINER_ARCH
    return SD2 if configs["text_encoder"].hidden_act == "gelu" else SD1


def layouts(architecture: Architecture, configs: Mapping[str, Any]) -> dict[str, tuple[Layout, dict]]:
    """network -> (its layout, the original keys and shapes it reads) for `configs` in `architecture`'s file."""
    result = {}
    for name, (kind, prefix) in architecture.places.items():
        shapes = keymap.torch_shapes(param_shapes(name, configs[name]))
        layout = make_layout(kind, prefix, configs[name], shapes)
        result[name] = (layout, expected_shapes(layout, shapes))
    return result


@functools.lru_cache(maxsize=16)
def param_shapes(name: str, config) -> Any:
    """COMPONENTS[name].param_shapes, remembered: tracing a full-size U-Net takes seconds and a load needs its
    shapes twice (the file's check, then the params)."""
    return COMPONENTS[name].param_shapes(config)


def builtin_configs(architecture: Architecture, file_shapes: Mapping[str, tuple]) -> dict[str, Any]:
    """The full-size configs of the architecture, with the U-Net's input channels as the file has them."""
    unet = dataclasses.replace(architecture.configs["unet"], in_channels=int(file_shapes[UNET_IN][1]))
    return {**architecture.configs, "unet": unet}


# --- reading ------------------------------------------------------------------------------------------------

def read_shapes(path: Path) -> tuple[dict[str, tuple], Any]:
    """(shape of every tensor, a function returning all the tensors): a safetensors header is read first, so
    a file of the wrong model fails before gigabytes are read; a pickle needs torch and is read at once."""
    suffix = path.suffix.lower()
    if suffix in hub.SAFETENSORS_SUFFIXES:
        return tensors.safetensors_shapes(path), lambda: tensors.read_safetensors(path)
    if suffix in hub.PICKLE_SUFFIXES:
        state = tensors.read_torch_pickle(path)
        return {k: v.shape for k, v in state.items()}, lambda: state
    raise WeightsError(f"{path}: not a checkpoint file sdjax reads (.safetensors, or a PyTorch pickle "
                       f"{', '.join(hub.PICKLE_SUFFIXES)}); for a diffusers model pass its folder")


def read_pipeline(path: str | os.PathLike, *, config: str | os.PathLike | None = None,
                  prediction_type: str | None = None, dtype=np.float32,
                  check_finite: bool = False) -> diffusers_folder.Loaded:
    """A pipeline's configs, params, tokenizers and scheduler from a single file (see the module docstring)."""
    path = Path(path)
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise InvalidArgumentError(f"prediction_type={prediction_type!r}; use one of {', '.join(PREDICTION_TYPES)}")
    file_shapes, read_all = read_shapes(path)
    architecture = detect(file_shapes, str(path))
    loaded = (_builtin(architecture, file_shapes) if config is None
              else _from_config_folder(architecture, config, path))
    configured = None if config is None else loaded.scheduler_config.get("prediction_type", "epsilon")
    prediction = prediction_type or default_prediction_type(file_shapes, architecture, configured)
    if prediction_type is None and configured is None and architecture is SD2 and prediction == "v_prediction":
        log.info("%s: an SD 2.x file, taken as v-prediction (the 768-v models, as diffusers does); pass "
                 "prediction_type='epsilon' for the 512 base model", path)
    if config is None and prediction == "v_prediction" and loaded.scheduler_config["_class_name"] == "PNDMScheduler":
        loaded.scheduler_config = dict(SD2.scheduler)  # sdjax's PNDM runs noise predictions only: DDIM, as SD 2.x
    loaded.scheduler_config = {**loaded.scheduler_config, "prediction_type": prediction}
    plans = layouts(architecture, loaded.configs)
    problems = {name: layout_problems(file_shapes, layout, shapes) for name, (layout, shapes) in plans.items()}
    _raise_for(problems, path, architecture, config)
    if config is None:
        loaded.tokenizer_folders = builtin_tokenizers(architecture, path)
    file_state = read_all()
    for name, (layout, _) in plans.items():
        state = from_original(file_state, layout)
        if check_finite:
            tensors.check_finite(state, str(path), _file_names(layout))
        expected = param_shapes(name, loaded.configs[name])
        loaded.params[name] = keymap.params_from_state_dict(state, expected, source=str(path), dtype=np.dtype(dtype))
    return loaded


def default_prediction_type(file_shapes: Mapping[str, tuple], architecture: Architecture,
                            configured: str | None = None) -> str:
    """What a file is taken to predict without prediction_type=: v when it carries ComfyUI's `v_pred` marker, else
    the config= folder's scheduler's, else diffusers' default: v for SD 2.x (the 768-v models), epsilon for SD 2
    inpainting (stabilityai/stable-diffusion-2-inpainting) and every other family."""
    if V_PRED_KEY in file_shapes:
        return "v_prediction"
    if configured is not None:
        return configured
    inpainting = file_shapes[UNET_IN][1] != 4
    return "v_prediction" if architecture is SD2 and not inpainting else "epsilon"


def _raise_for(problems: dict[str, list[str]], path: Path, architecture: Architecture, config) -> None:
    if not any(problems.values()):
        return
    found = "; ".join(f"{name}: {', '.join(items)}" for name, items in problems.items() if items)
    if config is None:
        raise ConfigError(
            f"{path}: its keys follow the {architecture.label} layout (it has {architecture.marker}) but its "
            f"tensors do not fit the full-size {architecture.label} model sdjax builds for it ({found}). For a "
            f"small or unusual architecture pass config= a diffusers folder or hub id with its configs "
            f"(CLI: --config).")
    raise WeightsError(f"{path} does not fit the configs of {config} ({found}); pass the config= folder of the "
                       f"model the file was made from.")


def _file_names(layout: Layout) -> dict[str, str]:
    """diffusers key -> the file's key holding it (a fused one for OpenCLIP's q, k and v)."""
    return {**layout.names, **{part: name for name, parts in layout.fused.items() for part in parts}}


def _builtin(architecture: Architecture, file_shapes: Mapping[str, tuple]) -> diffusers_folder.Loaded:
    """The built-in configs, scheduler and settings of a full-size file (its tokenizers are looked up after its
    shapes are checked)."""
    configs = builtin_configs(architecture, file_shapes)
    raw = {name: {} for name in configs}
    if architecture.settings is not None:
        raw["vae"] = {"force_upcast": True}  # SDXL's VAE overflows in float16; diffusers' config says so
    return diffusers_folder.Loaded(configs, raw, {}, {}, dict(architecture.scheduler), architecture.settings)


def builtin_tokenizers(architecture: Architecture, path: Path | str) -> dict[str, Path]:
    """text encoder -> the folder of its tokenizer in the local Hugging Face cache of the reference repository
    (downloaded when online: a few hundred kilobytes)."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    folders = {name: TEXT_ENCODERS[name] for name in architecture.family if name in TEXT_ENCODERS}
    try:
        root = Path(huggingface_hub.snapshot_download(architecture.repo,
                                                      allow_patterns=[f"{f}/*" for f in folders.values()]))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, OSError) as err:
        raise OfflineError(
            f"{path}: a single file holds no tokenizer, and the {architecture.label} tokenizer "
            f"({architecture.repo}, {' and '.join(f + '/' for f in folders.values())}) is not in the local Hugging "
            f"Face cache and the hub cannot be reached (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}). "
            f"Run once online, or pass config= a diffusers folder of this model that has its tokenizer "
            f"(CLI: --config).") from err
    missing = [f for f in folders.values() if not (root / f).is_dir()]
    if missing:
        raise OfflineError(f"{path}: the cached {architecture.repo} has no {', '.join(missing)}/; pass config= a "
                           f"diffusers folder of this model with its tokenizer (CLI: --config)")
    return {name: root / folder for name, folder in folders.items()}


def _from_config_folder(architecture: Architecture, config, path: Path) -> diffusers_folder.Loaded:
    folder = hub.resolve(config, weights=False)
    index = diffusers_folder.read_model_index(folder)
    family = diffusers_folder.model_family(index)
    if family != architecture.family:
        raise ConfigError(f"{path} holds {architecture.label} ({', '.join(architecture.family)}; it has "
                          f"{architecture.marker}) but the config= folder {folder} is a pipeline of "
                          f"{', '.join(family)}; pass the folder of the model the file was made from")
    configs, raw = {}, {}
    for name in family:
        configs[name], raw[name] = diffusers_folder.read_config(folder / name, name)
    settings = None
    if family != STABLE_DIFFUSION:
        settings = SDXLSettings.from_model_index(index, str(folder / "model_index.json"))
    scheduler = diffusers_folder.read_json(folder / "scheduler" / "scheduler_config.json")
    tokenizers = {name: folder / TEXT_ENCODERS[name] for name in family if name in TEXT_ENCODERS}
    return diffusers_folder.Loaded(configs, raw, {}, tokenizers, scheduler, settings)


# --- writing ------------------------------------------------------------------------------------------------

def original_state(configs: Mapping[str, Any], params: Mapping[str, Any], *, prediction_type: str = "epsilon",
                   dtype=np.float32) -> dict[str, np.ndarray]:
    """Every tensor of the single file of a pipeline with these configs and Flax params, in `dtype`."""
    architecture = architecture_of(configs)
    out = {}
    for name, (layout, _) in layouts(architecture, configs).items():
        state = keymap.state_dict_from_params(jax.device_get(params[name]))
        out.update({key: np.ascontiguousarray(value.astype(dtype)) for key, value in to_original(state, layout).items()})
    if prediction_type == "v_prediction":
        out[V_PRED_KEY] = np.zeros((0,), np.float32)  # so the file says so (ComfyUI's marker; sdjax reads it)
    return out


def write(path: str | os.PathLike, configs: Mapping[str, Any], params: Mapping[str, Any], *,
          prediction_type: str = "epsilon", dtype=np.float32) -> None:
    """Write a pipeline as one .safetensors in the original layout, atomically (a .partial file renamed)."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise InvalidArgumentError(f"{path}: single files are written as .safetensors; name it "
                                   f"{path.with_suffix('.safetensors').name}")
    if not path.parent.is_dir():
        raise InvalidArgumentError(f"{path}: folder {path.parent} does not exist")
    state = original_state(configs, params, prediction_type=prediction_type, dtype=dtype)
    tensors.write_safetensors(path, state, metadata={"format": "pt"})
