"""What a run trains, assembled from its config and the base model: modules in the compute dtype, the trained
and frozen params, the noise schedule, the loss, and the conversion of host batches into step inputs.

SDXL (a base model with text_encoder_2) trains as SD 1.x / 2.x does, with SDXL's conditioning as data
(`text_conditioning`), as diffusers' examples/text_to_image/train_text_to_image_sdxl.py and
train_text_to_image_lora_sdxl.py condition it: the penultimate hidden states of both text encoders concatenated,
text_encoder_2's pooled projection, and the time ids (original size, crop corner, target size). Training images are
resized and center-cropped to data.resolution squares, and the time ids say (resolution, resolution), (0, 0),
(resolution, resolution) for every image: what those scripts compute for an image that already has the training
size (they record the size before resizing and the crop corner, which sdjax's data pipeline does not keep yet), and
what sdjax's SDXL generation gives by default at that size. A dropped caption (diffusion.caption_dropout) is the
empty prompt for both text encoders, as their --proportion_empty_prompts. The refiner (aesthetic-score time ids)
is not trained.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from sdjax import schedules, sdxl
from sdjax.errors import ConfigError
from sdjax.images import to_unit_range
from sdjax.models.components import COMPONENTS, TEXT_ENCODERS
from sdjax.train.adapters import TARGETS as LORA_TARGETS, LoRASpec, lora_spec
from sdjax.train.config import TrainConfig
from sdjax.train.latents import make_moments_encoder
from sdjax.train.losses import (
    LossFn,
    TextConditioning,
    make_denoising_loss,
    make_diffusion_loss,
    make_vae_loss,
    text_encoder_conditioning,
)
from sdjax.weights.diffusers_folder import read_json

if TYPE_CHECKING:  # the base model is a loaded Pipeline; training sits below it and only reads its fields
    from sdjax.pipeline import Pipeline
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DECODER_PARTS = ("post_quant_conv", "decoder")  # the VAE params vae_loss.decoder_only trains


@dataclasses.dataclass(frozen=True)
class Task:
    """configs / raw_configs / scheduler_config / initial_params describe the whole model as it is exported;
    `trainable` and `frozen` are the parts the loss trains and reads; `fingerprint` identifies the architecture
    of what is trained, so a checkpoint of another model is never resumed. `adapter`: a LoRA run's adapters, which
    are then what is trained, the base components all frozen. `denoising_loss` (stage unet): the loss at given
    latents, timesteps, noise and token ids (`losses.make_denoising_loss`), of every component's weights (a LoRA
    run's: `adapter.merged`), for checks against other implementations."""
    stage: str
    configs: dict[str, Any]
    raw_configs: dict[str, dict | None]
    scheduler_config: dict[str, Any]
    initial_params: dict[str, Any]
    trainable: dict[str, Any]
    frozen: dict[str, Any]
    loss_fn: LossFn
    prepare_batch: Callable[[dict[str, Any]], dict[str, Any]]
    encode_moments: Callable | None
    fingerprint: dict[str, Any]
    adapter: LoRASpec | None = None
    denoising_loss: Callable | None = None


def component_config(name: str, choice: str, base_config):
    """The architecture of component `name`: the base model's ("") or a preset / config.json for a new one."""
    component = COMPONENTS[name]
    if not choice:
        return base_config
    if choice in component.presets:
        return component.presets[choice]
    path = Path(choice)
    if not path.is_file():
        raise ConfigError(f"model.{name}_config = {choice!r} is neither a preset ({', '.join(component.presets)}) "
                          f"nor an existing config.json")
    return component.config_class.from_dict(read_json(path), source=str(path))


def training_scheduler_config(base: dict[str, Any], config: TrainConfig) -> dict[str, Any]:
    """The base model's scheduler config with the run's prediction type, noise schedule and zero-terminal-SNR
    rescale, so the exported folder samples the way the model was trained."""
    scheduler = dict(base)
    if config.diffusion.prediction_type:
        scheduler["prediction_type"] = config.diffusion.prediction_type
    schedule = {key: value for key, value in (("beta_schedule", config.diffusion.beta_schedule),
                                              ("beta_start", config.diffusion.beta_start),
                                              ("beta_end", config.diffusion.beta_end)) if value}
    if schedule:
        scheduler.pop("trained_betas", None)  # an explicit beta table would override the chosen schedule
    scheduler.update(schedule)
    if config.diffusion.zero_terminal_snr:
        # Lin et al. 2023 also sample from the last timestep: "trailing" spacing.
        scheduler.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return scheduler


def _check_compatible(unet, vae, text) -> None:
    """`text`: the one text encoder's config (SDXL's are checked by `sdxl.check_models`)."""
    if text is not None and unet.cross_attention_dim != text.hidden_size:
        raise ConfigError(f"the U-Net's cross_attention_dim ({unet.cross_attention_dim}) must equal the text "
                          f"encoder's hidden_size ({text.hidden_size})")
    if unet.in_channels != vae.latent_channels or unet.out_channels != vae.latent_channels:
        raise ConfigError(f"the U-Net's in/out_channels ({unet.in_channels}/{unet.out_channels}) must equal the "
                          f"VAE's latent_channels ({vae.latent_channels})")


def _new_architectures(config: TrainConfig, base: "Pipeline") -> dict[str, str]:
    """Per component, the preset / config.json of a from-scratch architecture, or "" to keep the base model's
    (always, for the text encoders: one, or SDXL's two)."""
    return {"unet": config.model.unet_config, "vae": config.model.vae_config,
            **{name: "" for name in text_encoders(base)}}


def text_encoders(base: "Pipeline") -> tuple[str, ...]:
    """The base model's text encoders: ("text_encoder",), or SDXL's ("text_encoder", "text_encoder_2")."""
    return tuple(name for name in TEXT_ENCODERS if name in base.configs)


def architectures(config: TrainConfig, base: "Pipeline") -> dict[str, Any]:
    """The config of each component: the base model's, or the new architecture the run trains from scratch."""
    _check_trainable(config, base)
    arch = {name: component_config(name, choice, base.configs[name])
            for name, choice in _new_architectures(config, base).items()}
    if base.sdxl_settings is not None:
        sdxl.check_models(arch, base.raw_configs, base.sdxl_settings)
        _check_compatible(arch["unet"], arch["vae"], None)
    else:
        _check_compatible(arch["unet"], arch["vae"], arch["text_encoder"])
    factor = arch["vae"].downscale_factor
    if config.data.resolution % factor:
        raise ConfigError(f"data.resolution = {config.data.resolution} must be a multiple of the VAE's downscale "
                          f"factor ({factor})")
    return arch


def trained_components(config: TrainConfig, encoders: tuple[str, ...] = ("text_encoder",)) -> tuple[str, ...]:
    """The components a run trains whole; model.train_text_encoder trains all the model's text `encoders`."""
    if config.stage == "vae":
        return ("vae",)
    return ("unet", *encoders) if config.model.train_text_encoder else ("unet",)


def _check_trainable(config: TrainConfig, base: "Pipeline") -> None:
    """Refuse what stage unet cannot train on this base model yet (anything goes with stage vae)."""
    settings = base.sdxl_settings
    if settings is None or config.stage == "vae":
        return
    if settings.requires_aesthetics_score or "text_encoder" not in base.configs:
        raise ConfigError(f"model.pretrained={config.model.pretrained!r} is an SDXL refiner (text_encoder_2 only, "
                          f"aesthetic-score time ids): `sdjax train` trains SD 1.x / 2.x and SDXL base U-Nets, not "
                          f"the refiner's conditioning yet; its VAE can be trained with stage=vae")


def fingerprint(config: TrainConfig, arch: dict[str, Any]) -> dict[str, Any]:
    """What identifies the model in a checkpoint: the stage, the trained components, and every component's
    architecture (the frozen ones define the latent space and the conditioning the trained ones learn)."""
    trained = list(trained_components(config, tuple(name for name in TEXT_ENCODERS if name in arch)))
    if config.stage == "vae" and config.vae_loss.decoder_only:
        trained = [f"vae.{part}" for part in DECODER_PARTS]
    found = {"stage": config.stage, "trained": trained,
             "architecture": {name: value.to_dict() for name, value in arch.items()}}
    if config.lora.rank:  # what shapes the trained tree (alpha only scales it: a setting, checked as the others)
        # Empty target lists are left out: a U-Net-only run keeps the fingerprint it had before text encoder targets.
        targets = {field: list(getattr(config.lora, field)) for field in LORA_TARGETS.values()}
        found["lora"] = {"rank": config.lora.rank, **{field: value for field, value in targets.items() if value}}
    return found


def text_conditioning(base: "Pipeline", modules: dict[str, Any], resolution: int) -> TextConditioning:
    """The U-Net's text conditioning from token ids (`Pipeline.text_ids`), computed by `modules`: SD's one text
    encoder, or SDXL's (`sdxl.encode_text`, as generation encodes prompts) plus the time ids of a
    `resolution`-square training image (the module docstring says why they are the same for every image)."""
    if base.sdxl_settings is None:
        return text_encoder_conditioning(modules["text_encoder"])
    time_ids = jnp.asarray(sdxl.time_ids(base.sdxl_settings, resolution, resolution)[0])
    encoders = {name: modules[name] for name in text_encoders(base)}

    def encode(weights, ids):
        conditioning = sdxl.encode_text(encoders, weights, ids, clip_skip=None)
        rows = conditioning["text_embeds"].shape[0]
        return {**conditioning, "time_ids": jnp.broadcast_to(time_ids, (rows, time_ids.size))}

    return encode


def build_task(config: TrainConfig, base: "Pipeline", key) -> Task:
    """Assemble the run's Task; components given a new architecture are initialised from `key`."""
    model = config.model
    arch, new = architectures(config, base), _new_architectures(config, base)
    encoders = text_encoders(base)
    params = {name: COMPONENTS[name].init(arch[name], jax.random.fold_in(key, i)) if new[name] else base.params[name]
              for i, name in enumerate(new)}
    dtype = _DTYPES[model.compute_dtype]
    modules = {name: COMPONENTS[name].build(arch[name], dtype, model.attention).clone(param_dtype=jnp.float32)
               for name in new}
    modules["unet"] = modules["unet"].clone(remat=model.remat)
    scheduler = training_scheduler_config(base.scheduler_config, config)
    trained = trained_components(config, encoders)
    common = {"stage": config.stage, "configs": arch, "scheduler_config": scheduler,
              "raw_configs": {name: None if new[name] else base.raw_configs.get(name) for name in new},
              "initial_params": params, "trainable": {name: params[name] for name in trained},
              "fingerprint": fingerprint(config, arch)}

    if config.stage == "vae":
        frozen = {}
        if config.vae_loss.decoder_only:
            vae = params["vae"]
            common["trainable"] = {"vae": {k: v for k, v in vae.items() if k in DECODER_PARTS}}
            frozen = {"vae": {k: v for k, v in vae.items() if k not in DECODER_PARTS}}
        return Task(**common, frozen=frozen, loss_fn=make_vae_loss(modules["vae"], config.vae_loss),
                    prepare_batch=lambda host: {"pixels": to_unit_range(host["pixels"])}, encode_moments=None)

    encode_text = text_conditioning(base, modules, config.data.resolution)
    diffusion = dict(alphas_cumprod=schedules.alphas_cumprod_from_config(scheduler),
                     prediction_type=scheduler.get("prediction_type", "epsilon"), config=config.diffusion)
    loss_fn = make_diffusion_loss(modules["unet"], encode_text, **diffusion, vae_config=arch["vae"],
                                  empty_ids=jax.tree.map(lambda ids: ids[0], base.text_ids([""])))
    common["denoising_loss"] = make_denoising_loss(modules["unet"], encode_text, **diffusion)
    # Latents are encoded by the frozen VAE outside the differentiated step, in float32.
    encode = make_moments_encoder(COMPONENTS["vae"].build(arch["vae"], jnp.float32, model.attention))
    to_moments = ((lambda host: jnp.asarray(host["moments"])) if config.data.cache_latents
                  else (lambda host: encode(params["vae"], host["pixels"])))

    def prepare_batch(host):
        batch = {"moments": to_moments(host), "input_ids": base.text_ids(host["caption"])}
        return {**batch, "loss_mask": jnp.asarray(host["loss_mask"])} if "loss_mask" in host else batch

    if config.lora.rank:  # the adapters are trained; the U-Net and text encoder are read as they are
        adapter = lora_spec(config.lora, params)
        return Task(**{**common, "trainable": adapter.init(params, jax.random.fold_in(key, len(new)))},
                    frozen={name: params[name] for name in ("unet", *encoders)}, loss_fn=adapter.loss(loss_fn),
                    prepare_batch=prepare_batch, encode_moments=encode, adapter=adapter)
    return Task(**common, frozen={name: params[name] for name in encoders if name not in trained},
                loss_fn=loss_fn, prepare_batch=prepare_batch, encode_moments=encode)
