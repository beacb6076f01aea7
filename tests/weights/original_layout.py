"""Diffusers state dicts -> the original CompVis/Stability single-file layout, written for the tests from the key
tables of diffusers' reference scripts (scripts/convert_diffusers_to_original_stable_diffusion.py and
convert_diffusers_to_original_sdxl.py): string replacements over diffusers names, generalised from their fixed
four-level SD U-Net to any block count and layers per block. It shares no code with sdjax.weights.single_file, so
a file it writes is an independent reference; diffusers' `from_single_file` loading it checks it in turn.
"""
from __future__ import annotations

import re

import numpy as np

RESNET = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"), ("out_layers.3", "conv2"),
          ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut")]
UNET_TOP = [("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
            ("label_emb.0.0.", "add_embedding.linear_1."), ("label_emb.0.2.", "add_embedding.linear_2."),
            ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out.")]


class Shape(tuple):
    """A tensor known by its shape alone, for files of full-size models that are never allocated."""
    shape = property(tuple)
    T = property(lambda self: Shape(self[::-1]))

    def reshape(self, *shape):
        return Shape(shape)


def concatenate(parts):
    if isinstance(parts[0], Shape):
        return Shape((sum(p[0] for p in parts), *parts[0][1:]))
    return np.concatenate(parts)


def unet_layer_map(blocks: int, layers: int, up_types) -> list[tuple[str, str]]:
    """(original, diffusers) prefixes for a U-Net with `blocks` levels of `layers` resnets each."""
    pairs = []
    stride = layers + 1
    for i in range(blocks):
        for j in range(layers):
            pairs.append((f"input_blocks.{stride * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            pairs.append((f"input_blocks.{stride * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(layers + 1):
            pairs.append((f"output_blocks.{stride * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            pairs.append((f"output_blocks.{stride * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < blocks - 1:
            pairs.append((f"input_blocks.{stride * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
            slot = 2 if up_types[i].startswith("CrossAttn") else 1
            pairs.append((f"output_blocks.{stride * i + layers}.{slot}.", f"up_blocks.{i}.upsamplers.0."))
    pairs += [("middle_block.1.", "mid_block.attentions.0.")]
    pairs += [(f"middle_block.{2 * j}.", f"mid_block.resnets.{j}.") for j in range(2)]
    return pairs


def unet(state: dict, config) -> dict:
    layers = config["layers_per_block"]
    table = unet_layer_map(len(config["block_out_channels"]), layers, config["up_block_types"])
    out = {}
    for key, value in state.items():
        name = key
        for original, diffusers in UNET_TOP:
            if name.startswith(diffusers):
                name = original + name[len(diffusers):]
        if "resnets" in name:
            for original, diffusers in RESNET:
                name = name.replace(diffusers, original)
        for original, diffusers in table:
            name = name.replace(diffusers, original)
        out["model.diffusion_model." + name] = value
    return out


def vae(state: dict, config) -> dict:
    blocks, layers = len(config["block_out_channels"]), config["layers_per_block"]
    table = [("nin_shortcut", "conv_shortcut"), ("norm_out", "conv_norm_out"), ("mid.attn_1.", "mid_block.attentions.0.")]
    for i in range(blocks):
        table += [(f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.") for j in range(layers)]
        table += [(f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."),
                  (f"up.{blocks - 1 - i}.upsample.", f"up_blocks.{i}.upsamplers.0.")]
        table += [(f"decoder.up.{blocks - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.")
                  for j in range(layers + 1)]
    table += [(f"mid.block_{i + 1}.", f"mid_block.resnets.{i}.") for i in range(2)]
    attention = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")]
    out = {}
    for key, value in state.items():
        name = key
        for original, diffusers in table:
            name = name.replace(diffusers, original)
        if "attentions" in key:
            for original, diffusers in attention:
                name = name.replace(diffusers, original)
            if name.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
                value = value.reshape(*value.shape, 1, 1)  # the original VAE's attention is made of 1x1 convs
        out["first_stage_model." + name] = value
    return out


def with_text_model(state: dict) -> dict:
    """transformers >= 5.6 saves CLIPTextModel without its `text_model.` level; SD files keep it."""
    return {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v for k, v in state.items()}


def clip(state: dict, prefix: str) -> dict:
    return {prefix + key: value for key, value in with_text_model(state).items()}


OPENCLIP = [("transformer.resblocks.", "text_model.encoder.layers."), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
            (".c_fc.", ".fc1."), (".c_proj.", ".fc2."), (".attn", ".self_attn"),
            ("ln_final.", "text_model.final_layer_norm."),
            ("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
            ("positional_embedding", "text_model.embeddings.position_embedding.weight")]
QKV = re.compile(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")


def openclip(state: dict, prefix: str) -> dict:
    out, qkv = {}, {}
    for key, value in with_text_model(state).items():
        match = QKV.fullmatch(key)
        if match:
            qkv.setdefault((match[1], match[3]), {})[match[2]] = value
            continue
        if key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T  # OpenCLIP multiplies x @ text_projection
            continue
        name = key
        for original, diffusers in OPENCLIP:
            name = name.replace(diffusers, original)
        out[prefix + name] = value
    for (layer, leaf), parts in qkv.items():
        out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{leaf}"] = concatenate([parts[p] for p in "qkv"])
    return out


def single_file(components: dict, configs: dict, layout: str) -> dict:
    """The whole file: components {name: diffusers state dict}, configs {name: diffusers config dict};
    layout "sd1", "sd2", "sdxl" or "sdxl_refiner"."""
    out = {**unet(components["unet"], configs["unet"]), **vae(components["vae"], configs["vae"])}
    if layout == "sd1":
        out.update(clip(components["text_encoder"], "cond_stage_model.transformer."))
    elif layout == "sd2":
        out.update(openclip(components["text_encoder"], "cond_stage_model.model."))
    elif layout == "sdxl":
        out.update(clip(components["text_encoder"], "conditioner.embedders.0.transformer."))
        out.update(openclip(components["text_encoder_2"], "conditioner.embedders.1.model."))
    else:
        out.update(openclip(components["text_encoder_2"], "conditioner.embedders.0.model."))
    return {key: value if isinstance(value, Shape) else np.ascontiguousarray(value) for key, value in out.items()}
