"""SDXL's conditioning beyond SD's (Podell et al. 2023): two text encoders and a pooled prompt embedding, and the
micro-conditioning time ids (sec. 2.2: the size of the training image before it was resized, the top-left corner
of its crop and the target size; the refiner has an aesthetic score in place of the target size).

They are what diffusers' StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline and
StableDiffusionXLInpaintPipeline give the U-Net as `added_cond_kwargs` (text_embeds, time_ids); inpainting needs
nothing SDXL-specific beyond them (`Pipeline.inpaint`). `Pipeline` builds the time ids here on the host and the
generation program encodes the prompts with `encode_text`; both halves of classifier-free guidance get their own.

Negative time ids: sdjax has one rule, each negative_* value defaults to its positive counterpart and is used when
given. diffusers' pipelines each have their own: txt2img uses the negative values only when both
negative_original_size and negative_target_size are given, its negative crop corner then defaulting to (0, 0), and
with several images it gives them to half of the batch only (it repeats [negative; positive] rather than each);
img2img and inpainting ignore negative_crops_coords_top_left unless the model takes an aesthetic score, and the
refiner's negative crop corner defaults to (0, 0). sdjax agrees with diffusers wherever diffusers uses what it is
given and the crop corner is left at (0, 0) or given for both halves.

clip_skip likewise applies to both halves of guidance here; diffusers applies it to the prompt only (its negative
prompts always use the penultimate layer), so the two differ with clip_skip and a negative prompt.

prompt_2 / negative_prompt_2 (diffusers' names) give the base's text_encoder_2 its own prompts, each defaulting,
when None or "", to prompt / negative_prompt, as in diffusers. The refiner refuses them: its one encoder is
text_encoder_2, which reads prompt (diffusers ignores prompt_2 there). force_zeros_for_empty_prompt applies when
neither negative prompt is given; diffusers' rule looks at negative_prompt alone, so a negative_prompt_2 given
without a negative_prompt is ignored there and used here (with "" for the first encoder, as diffusers does when
the rule is off).

The ensemble of expert denoisers (diffusers' denoising_end on the base, denoising_start on the refiner) is a cut
of the sampling plan (`sampling_plan.SamplingPlan.for_denoising`), not SDXL-specific.

An SDXL ControlNet reads the same text_embeds and time_ids as the U-Net, both halves of guidance
(StableDiffusionXLControlNetPipeline; `generation.control_residuals`).

SDXL's VAE overflows in float16; its config says force_upcast, and diffusers' SDXL pipelines then run it in float32
(`vae_dtype`). The rule is SDXL's: diffusers' SD 1.x / 2.x pipelines ignore the key (its default is true), and so
does sdjax.
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from sdjax.errors import ConfigError, InvalidArgumentError
from sdjax.models.components import TEXT_ENCODERS

MICRO_CONDITIONING = ("original_size", "crops_coords_top_left", "target_size", "negative_original_size",
                      "negative_crops_coords_top_left", "negative_target_size", "aesthetic_score",
                      "negative_aesthetic_score")
"""The keyword arguments of an SDXL generation that set its time ids (diffusers' names)."""
AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5  # diffusers' defaults for the refiner


@dataclasses.dataclass(frozen=True)
class SDXLSettings:
    """What an SDXL folder's model_index.json says besides its components."""
    pipeline_class: str = "StableDiffusionXLPipeline"
    # With no negative prompt, the unconditional text embeddings and pooled embedding are zeros, not "" encoded.
    force_zeros_for_empty_prompt: bool = True
    # The refiner's time ids: original size, crop corner, aesthetic score (5 values) instead of the target size (6).
    requires_aesthetics_score: bool = False

    @classmethod
    def from_model_index(cls, index: Mapping[str, Any], source: str = "model_index.json") -> "SDXLSettings":
        values = {"pipeline_class": index.get("_class_name", cls.pipeline_class)}
        for field in ("force_zeros_for_empty_prompt", "requires_aesthetics_score"):
            value = index.get(field, getattr(cls, field))
            if not isinstance(value, bool):
                raise ConfigError(f"{source}: {field!r} = {value!r} should be true or false")
            values[field] = value
        return cls(**values)

    @property
    def time_ids_count(self) -> int:
        return 5 if self.requires_aesthetics_score else 6

    def model_index_entries(self, family: tuple[str, ...]) -> dict[str, Any]:
        """The entries of model_index.json besides the components sdjax writes, as diffusers writes them."""
        entries = {"force_zeros_for_empty_prompt": self.force_zeros_for_empty_prompt,
                   "image_encoder": [None, None], "feature_extractor": [None, None]}
        if "text_encoder" not in family:  # the refiner
            entries.update(text_encoder=[None, None], tokenizer=[None, None])
        if self.requires_aesthetics_score or self.pipeline_class != "StableDiffusionXLPipeline":
            entries["requires_aesthetics_score"] = self.requires_aesthetics_score  # txt2img's class has no such key
        return entries


def check_models(configs: Mapping[str, Any], raw_configs: Mapping[str, Any], settings: SDXLSettings) -> None:
    """ConfigError unless the U-Net takes what the text encoders and time ids give it, and the VAE needs nothing
    diffusers' SDXL pipelines would add (latents_mean / latents_std, Playground's normalisation)."""
    unet = configs["unet"]
    if unet.addition_embed_type != "text_time":
        raise ConfigError("unet/config.json: an SDXL folder (model_index.json lists text_encoder_2) needs a U-Net "
                          f"with addition_embed_type 'text_time', got {unet.addition_embed_type!r}")
    encoders = [name for name in TEXT_ENCODERS if name in configs]
    width = sum(configs[name].hidden_size for name in encoders)
    if unet.cross_attention_dim != width:
        raise ConfigError(f"unet/config.json: cross_attention_dim {unet.cross_attention_dim} differs from the width "
                          f"of the concatenated text states of {' + '.join(encoders)} ({width})")
    pooled, per_id, actual = (configs["text_encoder_2"].projection_dim, unet.addition_time_embed_dim,
                              unet.projection_class_embeddings_input_dim)
    count = settings.time_ids_count
    if actual != pooled + count * per_id:
        other = 11 - count  # 5 <-> 6
        hint = (f"; {other} time ids would fit: set requires_aesthetics_score to "
                f"{str(other == 5).lower()} in model_index.json" if actual == pooled + other * per_id else "")
        raise ConfigError(
            f"unet/config.json: projection_class_embeddings_input_dim is {actual}, but the pooled embedding "
            f"(text_encoder_2's projection_dim {pooled}) and {count} time ids of {per_id} "
            f"(requires_aesthetics_score {str(settings.requires_aesthetics_score).lower()}) make "
            f"{pooled + count * per_id}{hint}")
    vae = raw_configs.get("vae") or {}
    normalised = [key for key in ("latents_mean", "latents_std") if vae.get(key) is not None]
    if normalised:
        raise ConfigError(f"vae/config.json: {' and '.join(normalised)} are set; sdjax's SDXL pipelines do not "
                          f"normalise latents with them yet (diffusers does), so this model would give wrong images")


def vae_dtype(dtype, raw_vae_config: Mapping[str, Any]):
    """The dtype an SDXL pipeline of `dtype` computes and keeps its VAE in: float32 when `dtype` is float16 or bfloat16
    and vae/config.json says force_upcast (absent: true, diffusers' default), else `dtype`.

    diffusers upcasts the encoder under any dtype and the decoder under float16 only (bfloat16 has float32's range,
    so it does not overflow there); sdjax keeps one VAE dtype, float32 under both. A VAE fine-tuned not to overflow
    (madebyollin/sdxl-vae-fp16-fix) says force_upcast false and runs in `dtype`."""
    force_upcast = raw_vae_config.get("force_upcast", True)
    if not isinstance(force_upcast, bool):
        raise ConfigError(f"vae/config.json: 'force_upcast' = {force_upcast!r} should be true or false")
    low_precision = np.dtype(dtype) in (np.dtype(jnp.float16), np.dtype(jnp.bfloat16))
    return jnp.float32 if force_upcast and low_precision else dtype


def encode_text(modules: Mapping[str, Any], params: Mapping[str, Any], ids: Mapping[str, Any], clip_skip) -> dict:
    """The U-Net's text conditioning for token ids {text encoder name: (N, 77)}: encoder_hidden_states
    (N, 77, sum of widths), each encoder's hidden state `clip_skip` layers before its penultimate one (SDXL was
    trained on the penultimate layer without the final LayerNorm), concatenated in TEXT_ENCODERS order; and
    text_embeds (N, projection_dim), text_encoder_2's projected pooled state."""
    skip = check_clip_skip(clip_skip, [modules[name].config.num_hidden_layers for name in ids])
    states = {}
    for name in TEXT_ENCODERS:
        if name in ids:
            outputs = modules[name].apply({"params": params[name]}, ids[name], output_hidden_states=True)
            states[name] = outputs.hidden_states[-2 - skip]
    return {"encoder_hidden_states": jnp.concatenate(list(states.values()), axis=-1),
            "text_embeds": outputs.text_embeds}  # the loop ends with text_encoder_2, the one with a projection


def check_clip_skip(clip_skip, layers: list[int]) -> int:
    """clip_skip as an int counted from SDXL's penultimate layer (None: 0), when every encoder has that layer."""
    clip_skip = 0 if clip_skip is None else clip_skip
    deepest = min(layers) - 1
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 0 <= clip_skip <= deepest:
        raise InvalidArgumentError(f"clip_skip={clip_skip!r}: SDXL counts it from the penultimate layer, so it must "
                                   f"be an int from 0 to {deepest} for these text encoders")
    return clip_skip


def check_arguments(settings: SDXLSettings | None, given: Mapping[str, Any]) -> None:
    """Refuse micro-conditioning that the model would not use: any on SD 1.x / 2.x, an aesthetic score on a model
    without one, a target size on the refiner (whose time ids have none)."""
    names = [name for name in MICRO_CONDITIONING if given.get(name) is not None]
    if settings is None:
        unused, why = names, "this is an SD 1.x / 2.x pipeline, whose U-Net takes no size, crop or score conditioning"
    elif settings.requires_aesthetics_score:
        unused = [name for name in names if name.endswith("target_size")]
        why = "this SDXL model (requires_aesthetics_score: the refiner) takes an aesthetic score, not a target size"
    else:
        unused = [name for name in names if name.endswith("aesthetic_score")]
        why = "only an SDXL model with requires_aesthetics_score (the refiner) takes an aesthetic score"
    if unused:
        raise InvalidArgumentError(f"{', '.join(unused)} cannot be used here: {why}")


def time_ids(settings: SDXLSettings, height: int, width: int, **given) -> tuple[np.ndarray, np.ndarray]:
    """(conditional, unconditional) time ids, float32 (6,): original size, crop corner, target size, each
    (height, width) / (top, left); the refiner's (5,) end with an aesthetic score instead of the target size.
    Sizes default to the output's, the corner to (0, 0); every negative_* value to its positive counterpart."""
    check_arguments(settings, given)
    original = _pair(given, "original_size", (height, width))
    corner = _pair(given, "crops_coords_top_left", (0, 0), size=False)
    negative_original = _pair(given, "negative_original_size", original)
    negative_corner = _pair(given, "negative_crops_coords_top_left", corner, size=False)
    if settings.requires_aesthetics_score:
        last = (_number(given, "aesthetic_score", AESTHETIC_SCORE),)
        negative_last = (_number(given, "negative_aesthetic_score", NEGATIVE_AESTHETIC_SCORE),)
    else:
        last = _pair(given, "target_size", (height, width))
        negative_last = _pair(given, "negative_target_size", last)
    return (np.asarray(original + corner + last, np.float32),
            np.asarray(negative_original + negative_corner + negative_last, np.float32))


def conditioning_inputs(settings: SDXLSettings, count: int, height: int, width: int, has_negative_prompt: bool,
                        **given) -> dict:
    """The generation program's per-image SDXL inputs: cond_time_ids, uncond_time_ids (count, 6 or 5), and
    zero_uncond (count,): force_zeros_for_empty_prompt applies (no negative prompt was given)."""
    cond, uncond = time_ids(settings, height, width, **given)
    zero = settings.force_zeros_for_empty_prompt and not has_negative_prompt
    return {"cond_time_ids": jnp.asarray(np.broadcast_to(cond, (count, cond.size))),
            "uncond_time_ids": jnp.asarray(np.broadcast_to(uncond, (count, uncond.size))),
            "zero_uncond": jnp.full((count,), zero)}


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and bool(np.isfinite(value))


def _number(given: Mapping[str, Any], name: str, default: float) -> float:
    value = given.get(name)
    if value is None:
        return default
    if not _is_number(value):
        raise InvalidArgumentError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _pair(given: Mapping[str, Any], name: str, default: tuple, *, size: bool = True) -> tuple:
    """given[name] (or `default`) as two floats: a (height, width) size > 0, or a (top, left) corner >= 0."""
    value = given.get(name)
    if value is None:
        return tuple(float(v) for v in default)
    valid = (lambda v: v > 0) if size else (lambda v: v >= 0)
    if (isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2
            or not all(_is_number(v) and valid(v) for v in value)):
        what = "(height, width) of positive numbers" if size else "(top, left) of numbers >= 0"
        raise InvalidArgumentError(f"{name} must be a pair {what}, got {value!r}")
    return tuple(float(v) for v in value)
