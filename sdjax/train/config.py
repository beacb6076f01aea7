"""Training configuration: frozen dataclasses, overrides by dotted key, experiment files with `get_config()`.

A run is described by one `TrainConfig`; an experiment file returns it from `get_config()`, and the command
line changes single fields with `--set section.field=value`. Unknown keys and invalid choices raise
ConfigError naming the key and the closest valid one, so a typo never silently trains the wrong thing.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sdjax.errors import ConfigError, did_you_mean
from sdjax.models.attention import DEFAULT as ATTENTION_DEFAULT, IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from sdjax.parameterization import PARAMETERIZATIONS
from sdjax.schedules import BETA_SCHEDULES
from sdjax.weights.diffusers_folder import read_json

STAGES = ("unet", "vae")
LORA_FORMATS = ("peft", "kohya")


def _check_choice(key: str, value: str, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{key} = {value!r} is not one of {', '.join(map(repr, choices))}."
                          f"{did_you_mean(value, choices)}")


def _check_positive(key: str, value, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key} = {value!r} must be {'>= 0' if allow_zero else '> 0'}")


def option(default, help: str):
    """A config field with its --help text."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Where the model comes from and how it computes."""
    pretrained: str = option("", "diffusers folder (or hub id) giving the VAE, text encoder, tokenizer, noise "
                                 "schedule and the weights to fine-tune")
    unet_config: str = option("", "'' fine-tunes the folder's U-Net; a preset (tiny, sd15, sd21) or a config.json "
                                  "path trains a new U-Net of that architecture from scratch")
    vae_config: str = option("", "as unet_config, for the VAE (presets: tiny, sd)")
    train_text_encoder: bool = option(False, "also train the text encoder (stage unet; SDXL: both text encoders)")
    compute_dtype: str = option("float32", "float32 or bfloat16 activations; params, gradients and optimizer "
                                           "state stay float32")
    attention: str = option(ATTENTION_DEFAULT, f"attention backend of the models "
                                               f"({', '.join(ATTENTION_IMPLEMENTATIONS)}; auto: blocked or einsum on "
                                               f"CPU, pallas on TPU, xla on GPU)")
    remat: bool = option(False, "recompute each U-Net block's activations in the backward pass: less memory, "
                                "about a third more compute")

    def __post_init__(self):
        _check_choice("model.compute_dtype", self.compute_dtype, ("float32", "bfloat16"))


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    """The latent diffusion loss (stage "unet")."""
    prediction_type: str = option("", "epsilon, v_prediction or sample; '' keeps the folder's scheduler setting")
    min_snr_gamma: float = option(0.0, "Min-SNR-gamma loss weighting (Hang et al. 2023; 5.0 in the paper); "
                                       "0 disables")
    offset_noise: float = option(0.0, "std of a per-channel constant added to the noise, so the model can change "
                                      "mean brightness (0.1 is common)")
    beta_schedule: str = option("", "the noise schedule trained on and exported: linear, scaled_linear (SD's, "
                                    "with beta_start 0.00085, beta_end 0.012) or squaredcos_cap_v2; '' keeps the "
                                    "folder's")
    beta_start: float = option(0.0, "with beta_schedule: the first beta; 0 keeps the folder's")
    beta_end: float = option(0.0, "with beta_schedule: the last beta; 0 keeps the folder's")
    zero_terminal_snr: bool = option(False, "rescale betas so the last timestep is pure noise (Lin et al. 2023; "
                                            "pair with v_prediction)")
    caption_dropout: float = option(0.0, "probability of training on the empty prompt (for classifier-free "
                                         "guidance)")
    timestep_sampling: str = option("uniform", "how training timesteps are drawn: uniform over the schedule, or "
                                               "logit_normal (t / T = sigmoid of a normal draw, SD3's density, "
                                               "Esser et al. 2024): most draws at mid noise")
    logit_mean: float = option(0.0, "logit_normal: mean of the normal draw (negative: less noise)")
    logit_std: float = option(1.0, "logit_normal: standard deviation of the normal draw")
    normalize_loss_mask: bool = option(False, "with data.loss_mask: each image's loss is its mask-weighted mean "
                                              "error, so an image counts the same whatever its mask's area (off: "
                                              "the weighted errors averaged over all pixels, kohya's rule, where a "
                                              "small masked area weighs little)")

    def __post_init__(self):
        _check_choice("diffusion.prediction_type", self.prediction_type, ("", *PARAMETERIZATIONS))
        _check_positive("diffusion.min_snr_gamma", self.min_snr_gamma, allow_zero=True)
        _check_positive("diffusion.offset_noise", self.offset_noise, allow_zero=True)
        _check_choice("diffusion.beta_schedule", self.beta_schedule, ("", *BETA_SCHEDULES))
        _check_positive("diffusion.beta_start", self.beta_start, allow_zero=True)
        _check_positive("diffusion.beta_end", self.beta_end, allow_zero=True)
        if self.beta_end and self.beta_start >= self.beta_end:
            raise ConfigError(f"diffusion.beta_start = {self.beta_start!r} must be below diffusion.beta_end = "
                              f"{self.beta_end!r}")
        _check_choice("diffusion.timestep_sampling", self.timestep_sampling, ("uniform", "logit_normal"))
        _check_positive("diffusion.logit_std", self.logit_std)
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ConfigError(f"diffusion.caption_dropout = {self.caption_dropout!r} must lie in [0, 1]")


@dataclasses.dataclass(frozen=True)
class VAELossConfig:
    """The autoencoder loss (stage "vae"), the latent diffusion paper's first stage without its perceptual and
    adversarial terms: reconstruction summed over each image plus kl_weight * KL, averaged over the batch."""
    reconstruction: str = option("l1", "reconstruction distance: l1 or l2")
    kl_weight: float = option(1e-6, "weight of KL(q(z|x) || N(0, I)) (1e-6 in the paper)")
    decoder_only: bool = option(False, "train only the decoder (post_quant_conv + decoder), the encoder frozen: the "
                                       "latent space a U-Net learned stays as it is (how SD's ft-MSE VAE decoders "
                                       "were made)")

    def __post_init__(self):
        _check_choice("vae_loss.reconstruction", self.reconstruction, ("l1", "l2"))
        _check_positive("vae_loss.kl_weight", self.kl_weight, allow_zero=True)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup then a constant or cosine learning rate, global-norm clipping, and an EMA."""
    learning_rate: float = option(1e-4, "peak learning rate")
    text_encoder_learning_rate: float = option(0.0, "peak learning rate of the text encoder(s) when they train "
                                               "beside the U-Net, on the same schedule (kohya's text_encoder_lr); 0 "
                                               "uses learning_rate")
    schedule: str = option("constant", "after warmup: constant or cosine (decays over num_steps)")
    warmup_steps: int = option(0, "steps of linear warmup from 0")
    final_learning_rate_fraction: float = option(0.0, "cosine: final learning rate as a fraction of the peak")
    b1: float = option(0.9, "AdamW beta1")
    b2: float = option(0.999, "AdamW beta2")
    eps: float = option(1e-8, "AdamW epsilon")
    weight_decay: float = option(1e-2, "AdamW decoupled weight decay")
    max_grad_norm: float = option(1.0, "clip gradients to this global norm; 0 disables")
    grad_accumulation: int = option(1, "micro-batches per update (batch_size must be a multiple)")
    ema_decay: float = option(0.9999, "EMA decay, capped early on by (1 + step) / (10 + step) as in diffusers")

    def __post_init__(self):
        _check_choice("optimizer.schedule", self.schedule, ("constant", "cosine"))
        _check_positive("optimizer.learning_rate", self.learning_rate)
        _check_positive("optimizer.text_encoder_learning_rate", self.text_encoder_learning_rate, allow_zero=True)
        _check_positive("optimizer.warmup_steps", self.warmup_steps, allow_zero=True)
        _check_positive("optimizer.max_grad_norm", self.max_grad_norm, allow_zero=True)
        _check_positive("optimizer.grad_accumulation", self.grad_accumulation)
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"optimizer.ema_decay = {self.ema_decay!r} must lie in [0, 1)")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """An image folder with captions; images are resized, center-cropped square and flipped at random."""
    folder: str = option("", "image folder; captions from metadata.jsonl (file_name, text) or .txt sidecars")
    resolution: int = option(512, "side of the square training images")
    random_flip: bool = option(True, "mirror each example with probability 1/2")
    cache_latents: bool = option(False, "encode every image (and its mirror) once and train from the stored "
                                        "VAE posteriors")
    cache_dir: str = option("", "where the latent cache lives ('' = <workdir>/latent_cache)")
    streams: int = option(0, "interleaved data streams that make each batch (0: one per process); each process "
                             "reads its own; set it to another run's process count to reproduce its data order")
    loss_mask: bool = option(False, "weigh the diffusion loss per pixel by the grayscale image each metadata.jsonl "
                                    "line names in its loss_mask field (white 1, black 0; averaged over the "
                                    "pixels each latent covers), as kohya's masked loss")

    def __post_init__(self):
        _check_positive("data.resolution", self.resolution)
        _check_positive("data.streams", self.streams, allow_zero=True)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """LoRA training (stage unet): low-rank adapters of chosen U-Net layers (and optionally text encoder layers)
    are trained, the models themselves stay frozen, and the adapters are exported as LoRA files instead of a model
    folder."""
    rank: int = option(0, "rank of the adapters; 0 (the default) trains the whole U-Net instead")
    alpha: float = option(0.0, "the adapters' update is scaled by alpha / rank, as in PEFT and kohya; 0 means "
                               "alpha = rank")
    # The attention projections, as diffusers' train_text_to_image_lora.py adapts them.
    targets: tuple[str, ...] = option(("to_q", "to_k", "to_v", "to_out.0"),
                                      "U-Net layers to adapt: regular expressions, each matched against the end of "
                                      "a layer's diffusers module name at a dot boundary, as PEFT's target_modules "
                                      "(to_q: every attn1.to_q and attn2.to_q; attn2\\.to_k: cross-attention "
                                      "keys only; up_blocks\\.1\\..*to_v: those of up_blocks.1); --set separates "
                                      "them with |, so give alternatives as separate items")
    # diffusers' --train_text_encoder adapts q_proj, k_proj, v_proj and out_proj.
    text_encoder_targets: tuple[str, ...] = option((), "text encoder layers to adapt as well, matched as "
                                                       "lora.targets (q_proj|k_proj|v_proj|out_proj: the attention "
                                                       "projections, as diffusers' --train_text_encoder; SDXL: in "
                                                       "both text encoders); empty (the default): the text encoder "
                                                       "is left as it is")
    export_formats: tuple[str, ...] = option(("peft",), "LoRA files written to <workdir>/export: peft "
                                                         "(pytorch_lora_weights.safetensors, what diffusers' "
                                                         "load_lora_weights(folder) reads) and/or kohya "
                                                         "(kohya_lora.safetensors: lora_unet_* and lora_te_* keys, "
                                                         "SDXL lora_te1_* / lora_te2_*, with alphas)")

    def __post_init__(self):
        _check_positive("lora.rank", self.rank, allow_zero=True)
        _check_positive("lora.alpha", self.alpha, allow_zero=True)
        if not self.targets:
            raise ConfigError("lora.targets is empty: name the U-Net layers to adapt, e.g. to_q|to_k|to_v|to_out.0")
        for key in ("targets", "text_encoder_targets"):
            for pattern in getattr(self, key):
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ConfigError(f"lora.{key}: {pattern!r} is not a regular expression ({err})") from None
        if not self.export_formats:
            raise ConfigError(f"lora.export_formats is empty: choose {' and/or '.join(LORA_FORMATS)}")
        for name in self.export_formats:
            _check_choice("lora.export_formats", name, LORA_FORMATS)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run."""
    stage: str = option("unet", "unet: the diffusion U-Net (optionally with the text encoder) on VAE latents; "
                                "vae: the autoencoder itself")
    seed: int = option(0, "seeds initialisation, noise, timesteps and data order")
    batch_size: int = option(1, "examples per optimizer update")
    num_steps: int = option(1000, "optimizer updates of the whole run")
    log_every: int = option(10, "steps per metrics.jsonl line (metrics are averaged over them)")
    checkpoint_every: int = option(500, "steps between checkpoints (one is also written at the end)")
    keep_checkpoints: int = option(3, "how many of the latest checkpoints to keep")
    sample_every: int = option(0, "steps between sample grids; 0 disables")
    sample_prompts: tuple[str, ...] = option(("a photo of a cat",), "prompts of the sample grid")
    sample_steps: int = option(20, "sampler steps of the sample grid")
    sample_guidance_scale: float = option(7.5, "classifier-free guidance scale of the sample grid")
    eval_every: int = option(0, "steps between calls of the evaluator passed to train() (one eval.jsonl line each "
                                "time); 0 disables")
    eval_raw_weights: bool = option(False, "evaluate the raw weights too, not only the EMA ones")
    export_ema: bool = option(True, "export the EMA weights (else the raw ones) to <workdir>/export")
    nonfinite: str = option("stop", "a step whose loss or gradients are NaN/inf never updates the weights; then "
                                    "'stop': the run saves its (finite) state and ends with an error at that log "
                                    "line, or 'skip': it goes on (metrics.jsonl's nonfinite: the fraction skipped)")
    mesh: str = option("", "devices to train on, as data=N,fsdp=M (N * M = the device count): the batch splits over "
                           "all of them, and with fsdp > 1 params, optimizer state and EMA split over fsdp; empty: "
                           "one device")
    model: ModelConfig = ModelConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    vae_loss: VAELossConfig = VAELossConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    data: DataConfig = DataConfig()
    lora: LoRAConfig = LoRAConfig()

    def __post_init__(self):
        _check_choice("stage", self.stage, STAGES)
        _check_choice("nonfinite", self.nonfinite, ("stop", "skip"))
        for key in ("batch_size", "num_steps", "log_every", "checkpoint_every", "keep_checkpoints", "sample_steps"):
            _check_positive(key, getattr(self, key))
        for key in ("sample_every", "eval_every"):
            _check_positive(key, getattr(self, key), allow_zero=True)
        if self.data.loss_mask and self.stage != "unet":
            raise ConfigError("data.loss_mask weighs the diffusion loss of stage unet; stage vae does not use it")
        if self.diffusion.normalize_loss_mask and not self.data.loss_mask:
            raise ConfigError("diffusion.normalize_loss_mask normalises the weights of data.loss_mask; turn "
                              "data.loss_mask on (and name a mask per image) or leave it off")
        if self.lora.rank:
            self._check_lora()
        elif self.lora.text_encoder_targets:
            raise ConfigError("lora.text_encoder_targets names text encoder layers to adapt, but lora.rank = 0 trains "
                              "no adapters: set lora.rank (e.g. 4), or leave lora.text_encoder_targets empty")
        if self.batch_size % self.optimizer.grad_accumulation:
            raise ConfigError(f"batch_size = {self.batch_size} must be a multiple of optimizer.grad_accumulation "
                              f"= {self.optimizer.grad_accumulation}")


    def _check_lora(self):
        rank = f"lora.rank = {self.lora.rank} trains adapters of a pretrained U-Net"
        if self.stage != "unet":
            raise ConfigError(f"{rank}, but stage = {self.stage!r} trains no U-Net: set stage=unet, or lora.rank=0")
        if self.model.unet_config:
            raise ConfigError(f"{rank}, but model.unet_config = {self.model.unet_config!r} makes a new U-Net from "
                              f"scratch: leave model.unet_config empty to adapt model.pretrained's U-Net")
        if self.model.train_text_encoder:
            raise ConfigError(f"{rank} and keeps the text encoder's weights frozen; model.train_text_encoder would "
                              f"train them whole beside the adapters: turn it off and adapt the text encoder with "
                              f"lora.text_encoder_targets (e.g. q_proj|k_proj|v_proj|out_proj), or lora.rank=0 for "
                              f"full fine-tuning")


# --------------------------------------------------------------------------------- dotted keys and overrides

def describe(config) -> list[tuple[str, Any, str]]:
    """(dotted key, current value, help text) for every leaf field of a (nested) config dataclass."""
    rows = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            rows += [(f"{field.name}.{key}", leaf, text) for key, leaf, text in describe(value)]
        else:
            rows.append((field.name, value, field.metadata.get("help", "")))
    return rows


def flatten(config) -> dict[str, Any]:
    """{"section.field": value} for every leaf field."""
    return {key: value for key, value, _ in describe(config)}


def to_dict(config) -> dict[str, Any]:
    """A JSON-ready nested dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _unknown_key(key: str, valid: Iterable[str]) -> ConfigError:
    return ConfigError(f"unknown config key {key!r}.{did_you_mean(key, valid, cutoff=0.5)}")


def _parse_value(key: str, text: str, default: Any) -> Any:
    """`text` (from the command line) as a value of the same type as the field's default."""
    try:
        if isinstance(default, bool):
            lowered = text.strip().lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError("expected true or false")
            return lowered in ("true", "1", "yes")
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, tuple):
            value = json.loads(text) if text.lstrip().startswith("[") else text.split("|")
            return tuple(str(item) for item in value)
    except (ValueError, json.JSONDecodeError) as err:
        raise ConfigError(f"{key}={text!r}: cannot read as {type(default).__name__} ({err})") from None
    return text


def _coerce(key: str, value: Any, default: Any) -> Any:
    """A value read from JSON as the field's type (lists become tuples; ints are accepted for floats)."""
    if isinstance(default, tuple) and isinstance(value, list):
        return tuple(value)
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not type(default):
        raise ConfigError(f"{key} = {value!r} should be a {type(default).__name__}")
    return value


def replace(config: TrainConfig, updates: dict[str, Any]) -> TrainConfig:
    """`config` with dotted keys replaced by already-typed values."""
    valid = flatten(config)
    sections: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for key, value in updates.items():
        if key not in valid:
            raise _unknown_key(key, valid)
        value = _coerce(key, value, valid[key])
        section, _, field = key.rpartition(".")
        (sections.setdefault(section, {}) if section else top)[field or key] = value
    for section, fields in sections.items():
        top[section] = dataclasses.replace(getattr(config, section), **fields)
    return dataclasses.replace(config, **top)


def apply_overrides(config: TrainConfig, overrides: Iterable[str]) -> TrainConfig:
    """Apply command-line overrides "section.field=value" (tuples: "a|b|c" or a JSON list)."""
    valid = flatten(config)
    updates = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. optimizer.learning_rate=3e-4)")
        if key not in valid:
            raise _unknown_key(key, valid)
        updates[key] = _parse_value(key, text, valid[key])
    return replace(config, updates)


def from_dict(raw: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from a nested dict such as a run directory's config.json."""
    flat = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{field}": leaf for field, leaf in value.items()})
        else:
            flat[key] = value
    return replace(TrainConfig(), flat)


def _line_in(path: Path, err: BaseException) -> str:
    """", line N" of the innermost frame of `err`'s traceback inside `path` (or of a SyntaxError in it)."""
    if isinstance(err, SyntaxError) and err.filename == str(path):
        return f", line {err.lineno}"
    lines = [frame.lineno for frame in traceback.extract_tb(err.__traceback__) if frame.filename == str(path)]
    return f", line {lines[-1]}" if lines else ""


def _run_get_config(path: Path) -> TrainConfig:
    """`get_config()` of an experiment file; anything that goes wrong names the file and line."""
    spec = importlib.util.spec_from_file_location(f"_sdjax_experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ConfigError(f"{path} has no get_config() function returning a sdjax.train.config.TrainConfig")
        config = module.get_config()
    except ConfigError as err:  # e.g. an invalid choice in TrainConfig(...): say which file made it
        message = str(err) if str(err).startswith(str(path)) else f"{path}{_line_in(path, err)}: {err}"
        raise ConfigError(message) from err
    except Exception as err:  # the user's code: say where it failed, keep the traceback chained
        raise ConfigError(f"{path}{_line_in(path, err)}: get_config() failed: {type(err).__name__}: {err}") from err
    if not isinstance(config, TrainConfig):
        raise ConfigError(f"{path}: get_config() returned {type(config).__name__}, expected TrainConfig")
    return config


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> TrainConfig:
    """Run `get_config()` of an experiment file (or read a run's config.json) and apply the overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.suffix == ".json":
        try:
            config = from_dict(read_json(path))
        except ConfigError as err:
            raise ConfigError(str(err) if str(err).startswith(str(path)) else f"{path}: {err}") from None
    else:
        config = _run_get_config(path)
    return apply_overrides(config, overrides)
