"""What a run trains, assembled from its config and the base model: modules in the compute dtype, the trained
and frozen params, the noise schedule, the loss, and the conversion of host batches into step inputs.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from sdjax import schedules
from sdjax.errors import ConfigError
from sdjax.images import to_unit_range
from sdjax.models.components import COMPONENTS
from sdjax.train.adapters import TARGETS as LORA_TARGETS, LoRASpec, lora_spec
from sdjax.train.config import TrainConfig
from sdjax.train.latents import make_moments_encoder
from sdjax.train.losses import LossFn, make_diffusion_loss, make_vae_loss
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
    are then what is trained, the base components all frozen."""
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
    """The base model's scheduler config with the run's prediction type and zero-terminal-SNR rescale, so the
    exported folder samples the way the model was trained."""
    scheduler = dict(base)
    if config.diffusion.prediction_type:
        scheduler["prediction_type"] = config.diffusion.prediction_type
    if config.diffusion.zero_terminal_snr:
        # Lin et al. 2023 also sample from the last timestep: "trailing" spacing.
        scheduler.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return scheduler


def _check_compatible(unet, vae, text) -> None:
    if unet.cross_attention_dim != text.hidden_size:
        raise ConfigError(f"the U-Net's cross_attention_dim ({unet.cross_attention_dim}) must equal the text "
                          f"encoder's hidden_size ({text.hidden_size})")
    if unet.in_channels != vae.latent_channels or unet.out_channels != vae.latent_channels:
        raise ConfigError(f"the U-Net's in/out_channels ({unet.in_channels}/{unet.out_channels}) must equal the "
                          f"VAE's latent_channels ({vae.latent_channels})")


def _new_architectures(config: TrainConfig) -> dict[str, str]:
    """Per component, the preset / config.json of a from-scratch architecture, or "" to keep the base model's."""
    return {"unet": config.model.unet_config, "vae": config.model.vae_config, "text_encoder": ""}


def architectures(config: TrainConfig, base: "Pipeline") -> dict[str, Any]:
    """The config of each component: the base model's, or the new architecture the run trains from scratch."""
    arch = {name: component_config(name, choice, base.configs[name])
            for name, choice in _new_architectures(config).items()}
    _check_compatible(arch["unet"], arch["vae"], arch["text_encoder"])
    factor = arch["vae"].downscale_factor
    if config.data.resolution % factor:
        raise ConfigError(f"data.resolution = {config.data.resolution} must be a multiple of the VAE's downscale "
                          f"factor ({factor})")
    return arch


def trained_components(config: TrainConfig) -> tuple[str, ...]:
    if config.stage == "vae":
        return ("vae",)
    return ("unet", "text_encoder") if config.model.train_text_encoder else ("unet",)


def fingerprint(config: TrainConfig, arch: dict[str, Any]) -> dict[str, Any]:
    """What identifies the model in a checkpoint: the stage, the trained components, and every component's
    architecture (the frozen ones define the latent space and the conditioning the trained ones learn)."""
    trained = list(trained_components(config))
    if config.stage == "vae" and config.vae_loss.decoder_only:
        trained = [f"vae.{part}" for part in DECODER_PARTS]
    found = {"stage": config.stage, "trained": trained,
             "architecture": {name: value.to_dict() for name, value in arch.items()}}
    if config.lora.rank:  # what shapes the trained tree (alpha only scales it: a setting, checked as the others)
        # Empty target lists are left out: a U-Net-only run keeps the fingerprint it had before text encoder targets.
        targets = {field: list(getattr(config.lora, field)) for field in LORA_TARGETS.values()}
        found["lora"] = {"rank": config.lora.rank, **{field: value for field, value in targets.items() if value}}
    return found


def build_task(config: TrainConfig, base: "Pipeline", key) -> Task:
    """Assemble the run's Task; components given a new architecture are initialised from `key`."""
    model = config.model
    if base.sdxl_settings is not None and config.stage != "vae":
        raise ConfigError(f"model.pretrained={model.pretrained!r} is an SDXL model: `sdjax train` trains SD 1.x / 2.x "
                          f"U-Nets and text encoders so far (SDXL's second text encoder and time ids are not in the "
                          f"training loss yet); its VAE can be trained with stage=vae")
    arch, new = architectures(config, base), _new_architectures(config)
    params = {name: COMPONENTS[name].init(arch[name], jax.random.fold_in(key, i)) if new[name] else base.params[name]
              for i, name in enumerate(new)}
    dtype = _DTYPES[model.compute_dtype]
    modules = {name: COMPONENTS[name].build(arch[name], dtype, model.attention).clone(param_dtype=jnp.float32)
               for name in new}
    modules["unet"] = modules["unet"].clone(remat=model.remat)
    scheduler = training_scheduler_config(base.scheduler_config, config)
    trained = trained_components(config)
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

    loss_fn = make_diffusion_loss(
        modules["unet"], modules["text_encoder"], alphas_cumprod=schedules.alphas_cumprod_from_config(scheduler),
        prediction_type=scheduler.get("prediction_type", "epsilon"), config=config.diffusion,
        vae_config=arch["vae"], empty_ids=base.tokenize([""])[0])
    # Latents are encoded by the frozen VAE outside the differentiated step, in float32.
    encode = make_moments_encoder(COMPONENTS["vae"].build(arch["vae"], jnp.float32, model.attention))
    to_moments = ((lambda host: jnp.asarray(host["moments"])) if config.data.cache_latents
                  else (lambda host: encode(params["vae"], host["pixels"])))

    def prepare_batch(host):
        batch = {"moments": to_moments(host), "input_ids": base.tokenize(host["caption"])}
        return {**batch, "loss_mask": jnp.asarray(host["loss_mask"])} if "loss_mask" in host else batch

    if config.lora.rank:  # the adapters are trained; the U-Net and text encoder are read as they are
        adapter = lora_spec(config.lora, params)
        return Task(**{**common, "trainable": adapter.init(params, jax.random.fold_in(key, len(new)))},
                    frozen={name: params[name] for name in ("unet", "text_encoder")}, loss_fn=adapter.loss(loss_fn),
                    prepare_batch=prepare_batch, encode_moments=encode, adapter=adapter)
    return Task(**common, frozen={} if "text_encoder" in trained else {"text_encoder": params["text_encoder"]},
                loss_fn=loss_fn, prepare_batch=prepare_batch, encode_moments=encode)
