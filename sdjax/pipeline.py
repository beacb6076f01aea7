"""`Pipeline`: a loaded Stable Diffusion model (modules, params, tokenizer, scheduler config) and its
contract methods, each jit-compiled once per input shape. `load_pipeline` builds one from a folder or hub id.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import numbers
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sdjax import (distributed, embedded, generation, lora, parallel, progress, prompt_syntax as syntax, schedules,
                   sdxl, textual_inversion)
from sdjax.control import Control, control_images, control_model
from sdjax.errors import InvalidArgumentError, MissingComponentError, NonFiniteOutputError
from sdjax.images import as_array, image_to_model_range, to_unit_interval, to_unit_range
from sdjax.models.attention import DEFAULT as DEFAULT_ATTENTION
from sdjax.models.components import COMPONENTS, STABLE_DIFFUSION, TEXT_ENCODERS
from sdjax.models.controlnet import check_fits_unet
from sdjax.models.vae import scale_latents, unscale_latents
from sdjax.sampling_plan import SamplingPlan, check_denoising_fractions, plan_from_names
from sdjax.tokenizer import clip_tokenizer_class, save_tokenizer
from sdjax.scheduler_config import CLASS_DEFAULTS, HANDOFF_CLASSES, plan_from_scheduler_config, resolve_config
from sdjax.weights import diffusers_folder, hub, single_file

log = logging.getLogger(__name__)
_PARAM_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class Pipeline:
    """Stable Diffusion components with pure, jit-compiled entry points.

    `configs` and `params` map each component of the family (`components.STABLE_DIFFUSION`, `SDXL` or
    `SDXL_REFINER`) to its config and its Flax param tree; the modules hold no state. `tokenizer` and
    `tokenizer_2` belong to text_encoder and text_encoder_2 (the SDXL refiner has only the second);
    `sdxl_settings` are an SDXL folder's model_index.json settings (defaults when omitted).
    With a `mesh` (`sdjax.parallel`: axes data and fsdp), generation splits the batch over all its devices and
    the params are placed by the sharding rules: replicated, or with fsdp > 1 each large array split over fsdp.
    """

    def __init__(self, configs: Mapping[str, Any], params: dict, tokenizer, scheduler_config: dict, *,
                 dtype=jnp.float32, attention: str = DEFAULT_ATTENTION, raw_configs: dict | None = None,
                 mesh: jax.sharding.Mesh | None = None, is_embedded: bool = False, tokenizer_2=None,
                 sdxl_settings: sdxl.SDXLSettings | None = None):
        self.configs = dict(configs)
        self.raw_configs = raw_configs or {}
        self.text_encoders = tuple(name for name in TEXT_ENCODERS if name in self.configs)
        self.tokenizers = {name: tok for name, tok in zip(TEXT_ENCODERS, (tokenizer, tokenizer_2)) if name in configs}
        missing = [TEXT_ENCODERS[name] for name, tok in self.tokenizers.items() if tok is None]
        if missing:
            raise InvalidArgumentError(f"{' and '.join(missing)} missing: each text encoder needs its tokenizer")
        self.tokenizer = self.tokenizers[self.text_encoders[0]] if self.text_encoders else tokenizer
        # SDXL (a text_encoder_2): a pooled embedding and time ids beside the text states (sdjax.sdxl)
        self.sdxl_settings = (sdxl_settings or sdxl.SDXLSettings()) if "text_encoder_2" in self.configs else None
        if self.sdxl_settings is not None:
            sdxl.check_models(self.configs, self.raw_configs, self.sdxl_settings)
        # SDXL's VAE overflows in float16: under float16 or bfloat16 it computes in float32, its params upcast, when
        # its config says force_upcast (`sdxl.vae_dtype`), as in diffusers' SDXL pipelines.
        self.vae_dtype = (dtype if self.sdxl_settings is None
                          else sdxl.vae_dtype(dtype, self.raw_configs.get("vae") or {}))
        if self.vae_dtype != dtype:
            params = {**params, "vae": jax.tree.map(lambda leaf: leaf.astype(self.vae_dtype), params["vae"])}
        # The embedded shapes model warns about prompt words it never learned (sdjax.embedded).
        self.is_embedded = is_embedded
        self.mesh = mesh
        self.params = self._placed(params)
        self.scheduler_config = scheduler_config
        self.dtype = dtype
        self.attention = attention
        self.modules = {name: COMPONENTS[name].build(config, self.vae_dtype if name == "vae" else dtype, attention)
                        for name, config in self.configs.items()}
        self._text_fn = jax.jit(self._encode_tokens, static_argnames="clip_skip")
        self._encode_fn = jax.jit(self._encode_pixels)
        self._decode_fn = jax.jit(self._decode_scaled)
        self._unet_fn = jax.jit(self._unet_apply)
        self.alphas_cumprod = schedules.alphas_cumprod_from_config(
            resolve_config(scheduler_config) if scheduler_config.get("_class_name") in CLASS_DEFAULTS
            else scheduler_config)
        self._models = generation.Models(self._encode_tokens, self._unet_apply, self._decode_scaled)
        # On a mesh every output keeps the batch split over the devices, as the inputs are: a windowed run's carry
        # goes back in as it came out.
        self._program = jax.jit(self._run_program, static_argnames="spec",
                                out_shardings=None if mesh is None else parallel.batch_sharding(mesh))
        self._executables: dict = {}  # (spec, param and input shapes) -> compiled generation program
        self._carry_shapes: dict = {}  # the same keys -> the sampler carry of a windowed program
        self._loras = lora.LoRAs()  # LoRA adapters: merged into self.params, or added inside the programs
        self._apply_loras = jax.jit(lora.apply)

    # --- contract methods --------------------------------------------------------------------------------

    def encode_prompt(self, prompts: Sequence[str], *, clip_skip: int | None = None,
                      prompt_syntax: str = "diffusers",
                      prompts_2: Sequence[str] | None = None) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Text embeddings (N, 77, D) for a list of prompts; `clip_skip=1` uses the penultimate layer.
        With prompt_syntax="a1111" (`sdjax.prompt_syntax`): emphasis weights applied, (N, 77 * K, D) for prompts
        of up to K chunks of 75 tokens.
        SDXL: (prompt_embeds (N, 77, D), pooled_prompt_embeds (N, P)) as diffusers' StableDiffusionXLPipeline
        encodes them (`sdxl.encode_text`; clip_skip counts from the penultimate layer); `prompts_2` for the second
        text encoder (diffusers' prompt_2; default: `prompts`)."""
        for name, value in (("prompts", prompts), ("prompts_2", prompts_2)):
            if isinstance(value, str):
                raise InvalidArgumentError(f"{name} must be a list of strings, got a single string; wrap it in [...]")
        self._check_prompt_2(prompts_2)
        params = self._params_with_loras()
        if self.sdxl_settings is not None:
            self._check_sdxl_call(prompt_syntax)
            if prompts_2 is not None and len(prompts_2) != len(prompts):
                raise InvalidArgumentError(f"prompts_2 has {len(prompts_2)} entries for {len(prompts)} prompts")
            ids = self._sdxl_ids(prompts, prompts if prompts_2 is None else prompts_2)
            conditioning = self._text_fn(params, ids, clip_skip=clip_skip)
            return conditioning["encoder_hidden_states"], conditioning["text_embeds"]
        if syntax.check_syntax(prompt_syntax) == "diffusers":
            return self._text_fn(params, self.tokenize(prompts), clip_skip=clip_skip)["encoder_hidden_states"]
        [(ids, weights)] = syntax.a1111_inputs(self.tokenizer, [self._expand_prompts(prompts)])
        embeddings = self._text_fn(params, jnp.asarray(ids), clip_skip=clip_skip)["encoder_hidden_states"]
        return syntax.emphasize(embeddings, jnp.asarray(weights))

    def tokenize(self, prompts: Sequence[str], tokenizer=None) -> jax.Array:
        """Token ids (N, max_length) from `tokenizer` (default: the first text encoder's), padded and truncated as
        diffusers' Stable Diffusion pipelines do; a warning says how many tokens a too-long prompt lost."""
        tokenizer = self.tokenizer if tokenizer is None else tokenizer
        limit, pad = tokenizer.model_max_length, tokenizer.pad_token_id
        rows = []
        for i, ids in enumerate(tokenizer(self._expand_prompts(prompts, tokenizer))["input_ids"]):
            if len(ids) > limit:
                warnings.warn(f"prompt {i} has {len(ids)} tokens; the text encoder reads {limit}, so the last "
                              f"{len(ids) - limit} are dropped", stacklevel=3)
                ids = ids[:limit - 1] + ids[-1:]  # the tokenizer's truncation: keep the end-of-text token
            rows.append(ids + [pad] * (limit - len(ids)))
        return jnp.asarray(rows, jnp.int32)

    def text_ids(self, prompts: Sequence[str]) -> jax.Array | dict:
        """The token ids the text encoder(s) read for `prompts`, as a diffusers-syntax generation gives them: (N, 77)
        for SD 1.x / 2.x; for SDXL {text encoder name: (N, 77)}, each from its own tokenizer, every encoder reading
        `prompts` (what training feeds the loss, and "" gives the unconditional ids of a generation with a negative
        prompt "")."""
        if self.sdxl_settings is not None:
            return self._sdxl_ids(prompts, prompts)
        return self.tokenize(prompts)

    def encode_image(self, images, key: jax.Array | None = None) -> jax.Array:
        """Scaled latents (N, h, w, C) of images (see `images.image_batch`: uint8, or float in [-1, 1]): the
        posterior mean, or a sample of the posterior when `key` is given."""
        return self._encode_checked(to_unit_range(images), key)

    def _encode_checked(self, pixels, key=None) -> jax.Array:
        """encode_image of pixels already in [-1, 1], (N, H, W, 3)."""
        factor = self.configs["vae"].downscale_factor
        if pixels.shape[1] % factor or pixels.shape[2] % factor:
            raise InvalidArgumentError(f"image size {pixels.shape[2]}x{pixels.shape[1]} must be a multiple of "
                                       f"the VAE factor {factor}")
        return self._encode_fn(self.params["vae"], pixels, key)

    def decode_latents(self, latents) -> np.ndarray:
        """uint8 images (N, H, W, 3) from scaled latents (N, h, w, C)."""
        pixels = self._decode_fn(self.params["vae"], jnp.asarray(latents))
        return np.asarray(generation.to_uint8(pixels))

    def unet_output(self, latents, timesteps, embeddings, *, text_embeds=None, time_ids=None) -> jax.Array:
        """The U-Net's raw prediction (eps, v or x0 as the model was trained) for NHWC latents. An SDXL U-Net also
        takes text_embeds (N, P), the pooled prompt embedding, and time_ids (N, 6 or 5) (`sdjax.sdxl`)."""
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        given = [name for name, value in added.items() if value is not None]
        if self.sdxl_settings is None and given:
            raise InvalidArgumentError(f"{', '.join(given)}: only an SDXL U-Net takes them")
        if self.sdxl_settings is not None and len(given) != len(added):
            raise InvalidArgumentError("an SDXL U-Net needs text_embeds (N, P), the pooled prompt embedding, and "
                                       "time_ids (N, 6 or 5): sizes and crop corner, or the refiner's score")
        return self._unet_fn(self._params_with_loras()["unet"], jnp.asarray(latents), jnp.asarray(timesteps),
                             jnp.asarray(embeddings), **{name: jnp.asarray(added[name]) for name in given})

    # --- LoRA adapters (sdjax.lora) --------------------------------------------------------------------------

    def load_lora(self, source, scale: float = 1.0, *, name: str | None = None, merge: bool = False,
                  strict: bool = True) -> str:
        """Load a LoRA for the U-Net and text encoder(s) and return its name (default: the file's stem).

        source: a diffusers/PEFT or kohya .safetensors file (.bin/.pt with torch), a folder holding diffusers'
        pytorch_lora_weights.safetensors, or a state dict. Each layer becomes W + scale * (alpha / r) * up @ down.
        Unmerged (the default), the factors and the scale go into the generation program, which adds the update
        before sampling: `set_lora_scale` or a call's `lora_scales=` never recompile, and several adapters stack.
        merge=True adds it to the stored params once (`unfuse_lora` / `unload_lora` restore them exactly).
        Keys that match no layer are an error naming them (strict=False: a warning, and the rest is loaded)."""
        adapter = lora.load_adapter(source, self._loras.original(self.params), name=self._loras.new_name(name, source),
                                    scale=scale, merged=merge, strict=strict,
                                    sharding=None if self.mesh is None else parallel.replicated(self.mesh))
        self.params = self._loras.replace(self.params, {**self._loras.adapters, adapter.name: adapter})
        return adapter.name

    def set_lora_scale(self, name: str, scale: float) -> None:
        """Change a loaded LoRA's scale (a merged one is merged again from the original weights)."""
        self.params = self._loras.update(self.params, name, scale=lora.check_scale(scale, name))

    def fuse_lora(self, name: str | None = None) -> None:
        """Merge LoRA `name` (all for None) into the stored params at its scale."""
        self.params = self._loras.update(self.params, name, merged=True)

    def unfuse_lora(self, name: str | None = None) -> None:
        """Take LoRA `name` (all for None) out of the stored params; it stays loaded, unmerged."""
        self.params = self._loras.update(self.params, name, merged=False)

    def unload_lora(self, name: str | None = None) -> None:
        """Remove LoRA `name` (all for None); with none left, the params are the originals, bitwise."""
        names = self._loras.names(name)
        self.params = self._loras.replace(self.params, {n: a for n, a in self._loras.adapters.items()
                                                        if n not in names})

    @property
    def loras(self) -> dict[str, lora.Adapter]:
        """The loaded LoRAs by name, in load order: source, scale, merged, layers."""
        return dict(self._loras.adapters)

    def _params_with_loras(self) -> dict:
        """The params with the unmerged LoRAs added, as the generation program adds them (for the component
        methods)."""
        unmerged = self._loras.unmerged()
        return self._apply_loras({**self.params, **unmerged}) if unmerged else self.params

    # --- textual inversion (sdjax.textual_inversion) --------------------------------------------------------

    def load_textual_inversion(self, source, token: str | None = None) -> str:
        """Add a textual-inversion embedding as a new prompt token and return the token, as diffusers'
        `load_textual_inversion`. source: a diffusers learned_embeds.safetensors/.bin (or its folder), an A1111
        .pt (needs torch) or .safetensors (`string_to_param` / `emb_params`), an SDXL file (`clip_l`, `clip_g`), or
        a state dict. token: default the file's own (its key or `name`, else the file's stem). The token goes
        into the tokenizer(s) and the text encoder's token embedding grows by the vectors; an embedding of n
        vectors adds tok, tok_1, ..., tok_{n-1}, and a prompt's `tok` stands for all of them."""
        if self._loras.adapters:
            raise InvalidArgumentError(f"load_textual_inversion changes the text encoder's params; unload_lora() "
                                       f"({', '.join(self._loras.adapters)}) first and load the LoRAs again after")
        embedding = textual_inversion.read_embedding(source, token)
        widths = {name: self.configs[name].hidden_size for name in self.text_encoders}
        assigned = textual_inversion.assign(embedding, widths)
        for name in assigned:  # every check before any change
            textual_inversion.check_new_token(self.tokenizers[name], embedding.token, TEXT_ENCODERS[name])
        for name, rows in assigned.items():
            self._add_tokens(name, textual_inversion.token_names(embedding.token, len(rows)), rows)
        return embedding.token

    def _add_tokens(self, name: str, tokens: list[str], rows: np.ndarray) -> None:
        """Add `tokens` to text encoder `name`'s tokenizer and their vectors `rows` to its token embedding (sized,
        as diffusers sizes it, to the tokenizer's length plus the new tokens)."""
        tokenizer = self.tokenizers[name]
        size = len(tokenizer) + len(tokens)
        tokenizer.add_tokens(tokens)
        ids = tokenizer.convert_tokens_to_ids(tokens)
        *path, leaf = textual_inversion.TOKEN_EMBEDDING
        params = jax.tree.map(lambda x: x, self.params[name])  # new containers, the same arrays
        holder = functools.reduce(lambda tree, key: tree[key], path, params)
        holder[leaf] = textual_inversion.grown_table(holder[leaf], rows, ids, size)
        self.params = self._placed({**self.params, name: params})
        self.configs[name] = dataclasses.replace(self.configs[name], vocab_size=size)
        if name in self.raw_configs:
            self.raw_configs[name] = {**self.raw_configs[name], "vocab_size": size}
        self.modules[name] = COMPONENTS[name].build(self.configs[name], self.dtype, self.attention)

    def _expand_prompts(self, prompts: Sequence[str], tokenizer=None) -> list[str]:
        """The prompts with multi-vector textual-inversion tokens written out (`textual_inversion.expand_prompts`)."""
        return textual_inversion.expand_prompts(prompts, self.tokenizer if tokenizer is None else tokenizer)

    # --- generation ----------------------------------------------------------------------------------------

    def sampling_plan(self, steps: int, sampler: str | None = None, schedule: str | None = None,
                      sampler_options: Mapping[str, Any] | None = None) -> SamplingPlan:
        """The sampler, options and sigma grid a call with these settings runs. With neither sampler nor
        schedule, the folder's scheduler_config.json decides, as in diffusers."""
        if sampler is None and schedule is None:
            plan = plan_from_scheduler_config(self.scheduler_config, steps, self.alphas_cumprod)
            return dataclasses.replace(plan, schedule=plan.schedule or self.scheduler_config["_class_name"])
        return plan_from_names(sampler, schedule, steps, self.alphas_cumprod, sampler_options)

    def generate(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
                 show_progress: bool = False, **settings) -> "GenerationResult":
        """Text to image: the call `prepare(prompt, negative_prompt, **settings)` describes (its docstring lists
        every setting: steps, guidance_scale, sampler, schedule, seed/seeds, height/width, control, ...), run.
        show_progress: a progress bar on stderr (the program then runs one sampler step per call)."""
        return self.prepare(prompt, negative_prompt, **settings).run(show_progress)

    def prepare(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
                prompt_2: str | Sequence[str] | None = None, negative_prompt_2: str | Sequence[str] | None = None,
                denoising_start: float | None = None, denoising_end: float | None = None, steps: int = 30,
                guidance_scale: float | None = None, guidance_rescale: float = 0.0,
                sampler: str | None = None, schedule: str | None = None, sampler_options: Mapping | None = None,
                seed: int = 0, seeds: Sequence[int] | None = None, latents=None, height: int | None = None,
                width: int | None = None, num_images: int = 1, clip_skip: int | None = None,
                control: "Control | Sequence[Control] | None" = None, guess_mode: bool = False,
                batch_invariant: bool = False, prompt_syntax: str = "diffusers",
                edit: "Edit | None" = None, original_size=None, crops_coords_top_left=None, target_size=None,
                negative_original_size=None, negative_crops_coords_top_left=None, negative_target_size=None,
                aesthetic_score=None, negative_aesthetic_score=None,
                lora_scales: Mapping[str, float] | None = None) -> "Generation":
        """A text-to-image call, checked and ready to run (`Generation.run`), or to hand to your own `jax.pmap` /
        `jax.jit` as a pure function (`Generation.function`). Image i's noise comes from seeds[i] (default
        seed + i) alone (one prompt with several seeds gives one image per seed); `latents` (N, h, w, c) replaces
        that noise, unscaled, as diffusers' `latents` argument does.

        guidance_scale: classifier-free guidance; default 7.5 (3 for the embedded shapes model).
        control: ControlNet conditioning (`sdjax.Control`, or a list of them, whose residuals add up);
        guess_mode: the ControlNets act only on the conditional half of classifier-free guidance.
        prompt_syntax: "diffusers" (plain text cut at 77 tokens, as diffusers) or "a1111" (`(word:1.3)` emphasis,
        BREAK, prompts of any length in chunks of 75 tokens, as A1111 and ComfyUI; `sdjax.prompt_syntax`).
        batch_invariant: run images one after another, so that an image is bitwise the same in any batch
        (batched kernels may round differently at another batch size: up to ~1e-6, rarely one uint8 level).
        edit: start from an image, and repaint only inside a mask (`Edit`; `img2img` and `inpaint` say more).
        SDXL only (diffusers' names; `sdjax.sdxl`): original_size, crops_coords_top_left, target_size as (height,
        width) / (top, left), defaulting to the output size and (0, 0); the refiner's aesthetic_score (6.0) in place
        of target_size; negative_* for the unconditional half of guidance, each defaulting to its positive value.
        prompt_2, negative_prompt_2 (SDXL base): what the second text encoder reads, defaulting (when None or "")
        to prompt and negative_prompt, as in diffusers.
        With no negative prompt (neither negative_prompt nor negative_prompt_2) and the folder's
        force_zeros_for_empty_prompt, the unconditional text embeddings are zeros.
        denoising_end (0 < d < 1): stop where diffusers' denoising_end stops (the steps whose timestep is at
        least round((1 - d) * num_train_timesteps)) and return the partly denoised latents in the scheduler's own
        scaling, for a second model to finish with denoising_start (an "ensemble of expert denoisers"); the images
        are those latents decoded, as diffusers' output_type="np" gives them.
        denoising_start (0 < d < 1): `latents` are such partly denoised latents; run only the steps whose timestep
        is below round((1 - d) * num_train_timesteps), adding no noise (`img2img(latents, ..., denoising_start=)`
        says the same). Both need the folder's scheduler config (`sampling_plan.SamplingPlan.for_denoising`).
        lora_scales: {name: scale} for this call, for unmerged LoRAs (`load_lora`); the others keep their own scales.
        """
        micro = dict(original_size=original_size, crops_coords_top_left=crops_coords_top_left,
                     target_size=target_size, negative_original_size=negative_original_size,
                     negative_crops_coords_top_left=negative_crops_coords_top_left,
                     negative_target_size=negative_target_size, aesthetic_score=aesthetic_score,
                     negative_aesthetic_score=negative_aesthetic_score)
        sdxl.check_arguments(self.sdxl_settings, micro)
        self._check_prompt_2(prompt_2, negative_prompt_2)
        if self.sdxl_settings is not None:
            self._check_sdxl_call(prompt_syntax)
        if guidance_scale is None:
            guidance_scale = embedded.GUIDANCE_SCALE if self.is_embedded else 7.5
        plan = self.sampling_plan(steps, sampler, schedule, sampler_options)
        if edit is not None:
            pixels = image_to_model_range(edit.image)
            height, width = pixels.shape[1:3]
            plan = plan if edit.strength == 1.0 else plan.for_strength(edit.strength)
        if denoising_start is not None or denoising_end is not None:
            plan = self._handoff_plan(plan, denoising_start, denoising_end, latents, edit)
        if latents is not None and height is None and width is None:  # the size the latents are for
            if np.ndim(latents) != 4:
                raise InvalidArgumentError(f"latents must be (N, h, w, c), got shape {np.shape(latents)}")
            factor = self.configs["vae"].downscale_factor
            height, width = (factor * side for side in np.shape(latents)[1:3])
        request = self._request(prompt, negative_prompt, num_images, seed, seeds, height, width, prompt_2,
                                negative_prompt_2)
        if self.is_embedded:
            embedded.warn_unknown_words(self.tokenizer.get_vocab(), request.prompts)
        inputs = self._inputs(request, plan, guidance_scale, guidance_rescale, latents, prompt_syntax)
        if self.sdxl_settings is not None:
            has_negative = negative_prompt is not None or negative_prompt_2 is not None
            inputs.update(sdxl.conditioning_inputs(self.sdxl_settings, request.count, request.height, request.width,
                                                   has_negative, **micro))
        spec = dict(batch_invariant=batch_invariant, guess_mode=guess_mode)
        if edit is not None:
            images = broadcast_batch(pixels, request.count, "image")
            inputs["image_latents"] = self._encode_checked(images)
            if edit.mask is not None:
                inputs.update(self._mask_inputs(edit.mask, images, request.count))
                spec["inpaint"] = "channels" if self.is_inpainting_model else "blend"
            spec["start_from_image"] = edit.strength < 1.0
        control_inputs, controlnets, control_params = self._control_inputs(control, request)
        inputs = {**inputs, **control_inputs}
        if plan.model_timesteps is not None:
            inputs["model_timesteps"] = jnp.asarray(plan.model_timesteps, jnp.float32)
        program = generation.ProgramSpec(
            sampler=plan.sampler, latent_shape=self._latent_shape(request), options=plan.options,
            batch_shards=1 if self.mesh is None else self.mesh.size,
            prediction_type=self.scheduler_config.get("prediction_type", "epsilon"),
            quantize_timesteps=plan.quantize_timesteps, clip_skip=clip_skip, controlnets=controlnets,
            pinned_timesteps=plan.model_timesteps is not None, ve_latents=plan.ve_latents, **spec)
        # self.params are placed already; only this call's unmerged LoRAs and ControlNets need placing
        params = {**self.params, **self._placed({**self._loras.unmerged(lora_scales), **control_params})}
        return Generation(self, request, plan, params, inputs, program)

    def img2img(self, image, prompt: str | Sequence[str], negative_prompt=None, *, strength: float = 0.8,
                noise=None, denoising_start: float | None = None, **settings) -> "GenerationResult":
        """Image to image: the image's latents are noised to the `strength` point of the schedule and denoised
        from there (strength 1 ignores the image). `image`: a path, a PIL image or an array
        (H, W, 3) or (N or 1, H, W, 3), uint8 or float in [0, 1] (as masks and control images); the VAE posterior mean
        is used, so the result depends only on the image and the seeds. `noise` replaces the seeded noise;
        `settings` are generate's.

        With denoising_start, `image` is instead the partly denoised latents (N, h, w, c) of a
        `generate(..., denoising_end=)` call (or its GenerationResult), continued from that point of the schedule
        without new noise; strength is then ignored, as in diffusers' StableDiffusionXLImg2ImgPipeline."""
        if denoising_start is None:
            return self.generate(prompt, negative_prompt, latents=noise, edit=Edit(image, None, strength),
                                 **settings)
        if noise is not None:
            raise InvalidArgumentError("noise cannot be used with denoising_start: the latents are continued "
                                       "without new noise")
        latents = image.latents if isinstance(image, GenerationResult) else image
        channels = self.configs["vae"].latent_channels
        if np.ndim(latents) != 4 or np.shape(latents)[-1] != channels:
            raise InvalidArgumentError(f"with denoising_start, image must be the partly denoised latents (N, h, w, "
                                       f"{channels}) of a generate(..., denoising_end=) call, got an image or "
                                       f"array of shape {np.shape(latents)}")
        return self.generate(prompt, negative_prompt, latents=latents, denoising_start=denoising_start,
                             **settings)

    def inpaint(self, image, mask, prompt: str | Sequence[str], negative_prompt=None, *, strength: float = 1.0,
                noise=None, **settings) -> "GenerationResult":
        """Repaint where `mask` (N or 1, H, W) is white (>= 0.5 after scaling to [0, 1]) and keep the rest.

        With an inpainting U-Net (9 input channels) the mask and the masked image's latents are extra U-Net
        inputs; with an ordinary U-Net the known region is held on the image's noised trajectory each step.
        `settings` are generate's. SDXL models inpaint as diffusers' StableDiffusionXLInpaintPipeline, whose
        default strength is 0.9999 rather than 1: that drops the first step (int(steps * 0.9999) steps run) and
        starts from the noised image instead of pure noise; pass strength=0.9999 for its default result."""
        return self.generate(prompt, negative_prompt, latents=noise, edit=Edit(image, mask, strength), **settings)

    @property
    def is_inpainting_model(self) -> bool:
        """True for inpainting U-Nets (SD or SDXL): latents + mask + masked-image latents as input channels."""
        return self.configs["unet"].in_channels == 2 * self.configs["vae"].latent_channels + 1

    def _mask_inputs(self, mask, images, count: int) -> dict:
        mask = as_array(mask, mode="L")
        mask = mask[None] if mask.ndim == 2 else mask
        if mask.ndim == 4 and mask.shape[-1] == 1:
            mask = mask[..., 0]
        if mask.ndim != 3 or mask.shape[1:] != images.shape[1:3]:
            raise InvalidArgumentError(f"mask must be (N, H, W) with the image's size {images.shape[2]}x"
                                       f"{images.shape[1]}, got shape {mask.shape}")
        binary = broadcast_batch((to_unit_interval(mask, "mask") >= 0.5).astype(np.float32), count, "mask")
        factor = self.configs["vae"].downscale_factor
        # diffusers resizes the binarised mask to latent size with nearest-neighbour sampling
        latent_mask = binary[:, ::factor, ::factor, None]
        inputs = {"mask": jnp.asarray(latent_mask)}
        if self.is_inpainting_model:
            masked = np.asarray(images) * (binary[..., None] < 0.5)
            inputs["masked_image_latents"] = self._encode_checked(masked)
        return inputs

    def _request(self, prompt, negative_prompt, num_images, seed, seeds, height, width, prompt_2=None,
                 negative_prompt_2=None) -> "Request":
        prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else []
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise InvalidArgumentError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
        negatives = per_prompt(negative_prompt or "", "negative_prompt", len(prompts))
        # diffusers' rule: an empty or missing second prompt is the first one
        prompts_2 = per_prompt(prompt_2 or prompts, "prompt_2", len(prompts))
        negatives_2 = per_prompt(negative_prompt_2 or negatives, "negative_prompt_2", len(prompts))
        if not isinstance(num_images, int) or num_images < 1:
            raise InvalidArgumentError(f"num_images must be a positive integer, got {num_images!r}")
        if seeds is not None and len(prompts) == 1 and num_images == 1:
            num_images = len(seeds)  # one prompt, several seeds: one image per seed
        repeat = lambda texts: [text for text in texts for _ in range(num_images)]
        prompts, negatives, prompts_2, negatives_2 = map(repeat, (prompts, negatives, prompts_2, negatives_2))
        if seeds is None:
            seeds = [check_seed(seed) + i for i in range(len(prompts))]
        elif len(seeds) != len(prompts):
            raise InvalidArgumentError(f"seeds has {len(seeds)} entries for {len(prompts)} images")
        height, width = self._image_size(height, width)
        return Request(prompts, negatives, [check_seed(s) for s in seeds], height, width, prompts_2, negatives_2)

    def _image_size(self, height, width) -> tuple[int, int]:
        factor = self.configs["vae"].downscale_factor
        # diffusers' UNet2DConditionModel writes sample_size null unless given one; SD's is 64
        default = (self.raw_configs.get("unet", {}).get("sample_size") or 64) * factor
        return check_image_size(height or default, width or default, factor)

    def _check_sdxl_call(self, prompt_syntax: str) -> None:
        """Refuse what sdjax's SDXL pipelines do not do yet, before anything runs."""
        if syntax.check_syntax(prompt_syntax) != "diffusers":
            raise InvalidArgumentError(f"prompt_syntax={prompt_syntax!r} (with two tokenizers) is not supported with "
                                       f"SDXL pipelines yet; txt2img, img2img, inpainting and ControlNet are, with "
                                       f"plain prompts (prompt_syntax='diffusers')")

    def _handoff_plan(self, plan: SamplingPlan, start, end, latents, edit: "Edit | None") -> SamplingPlan:
        """The plan cut by denoising_start / denoising_end, after checking the call can take them."""
        check_denoising_fractions(start, end)
        if start is not None and (latents is None or edit is not None):
            raise InvalidArgumentError("denoising_start continues partly denoised latents: pass them as latents= "
                                       "(or to img2img(latents, ..., denoising_start=)), without an image to edit")
        if edit is not None and edit.mask is not None:
            raise InvalidArgumentError("denoising_end with inpainting (a mask) is not supported")
        if plan.timesteps is None:
            raise InvalidArgumentError(
                f"denoising_start / denoising_end cut the schedule at diffusers' timesteps, which sdjax reproduces "
                f"for the folder's own scheduler config of class {', '.join(HANDOFF_CLASSES)}; this call runs "
                f"sampler {plan.sampler!r}, schedule {plan.schedule!r}: leave sampler= and schedule= unset, with "
                f"one of those classes in scheduler/scheduler_config.json")
        return plan.for_denoising(start, end, len(self.alphas_cumprod))

    def _check_prompt_2(self, *given) -> None:
        """Refuse second prompts where there is no second text encoder to read them."""
        if all(value is None for value in given):
            return
        if self.sdxl_settings is None:
            raise InvalidArgumentError("prompt_2 / negative_prompt_2 are for SDXL's second text encoder; this SD "
                                       "1.x / 2.x pipeline has one text encoder")
        if "text_encoder" not in self.text_encoders:
            raise InvalidArgumentError("prompt_2 / negative_prompt_2 cannot be used with this SDXL model: it has one "
                                       "text encoder (text_encoder_2, the refiner's), which reads prompt and "
                                       "negative_prompt (diffusers ignores prompt_2 here)")

    def _sdxl_ids(self, prompts: Sequence[str], prompts_2: Sequence[str]) -> dict:
        """{text encoder name: ids (N, 77) from its own tokenizer} (SDXL's tokenizer_2 pads differently); the
        base's text_encoder_2 reads `prompts_2` (the refiner's, its only encoder, `prompts`)."""
        second = prompts_2 if "text_encoder" in self.text_encoders else prompts
        return {name: self.tokenize(second if name == "text_encoder_2" else prompts, self.tokenizers[name])
                for name in self.text_encoders}

    def _text_inputs(self, request: "Request", prompt_syntax: str) -> dict:
        """cond_ids, uncond_ids (N, 77 * K), and with the a1111 syntax cond_weights, uncond_weights (N, K, 77);
        for SDXL, cond_ids and uncond_ids are {text encoder name: (N, 77)}."""
        if self.sdxl_settings is not None:
            return {"cond_ids": self._sdxl_ids(request.prompts, request.prompts_2),
                    "uncond_ids": self._sdxl_ids(request.negatives, request.negatives_2)}
        if syntax.check_syntax(prompt_syntax) == "diffusers":
            return {"cond_ids": self.tokenize(request.prompts), "uncond_ids": self.tokenize(request.negatives)}
        (cond, cond_weights), (uncond, uncond_weights) = syntax.a1111_inputs(
            self.tokenizer, [self._expand_prompts(request.prompts), self._expand_prompts(request.negatives)])
        return {"cond_ids": jnp.asarray(cond), "uncond_ids": jnp.asarray(uncond),
                "cond_weights": jnp.asarray(cond_weights), "uncond_weights": jnp.asarray(uncond_weights)}

    def _inputs(self, request: "Request", plan: SamplingPlan, guidance_scale, guidance_rescale, noise,
                prompt_syntax: str = "diffusers") -> dict:
        count = request.count
        for name, value in (("guidance_scale", guidance_scale), ("guidance_rescale", guidance_rescale)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value):
                raise InvalidArgumentError(f"{name} must be a finite number, got {value!r}")
        inputs = {
            **self._text_inputs(request, prompt_syntax),
            "seeds": jnp.asarray(np.asarray(request.seeds, np.int64), jnp.uint32),
            "guidance_scale": jnp.full((count,), guidance_scale, jnp.float32),
            "guidance_rescale": jnp.full((count,), guidance_rescale, jnp.float32),
            "sigmas": jnp.asarray(plan.sigmas, jnp.float32),
            "init_noise_sigma": jnp.asarray(plan.start_noise_sigma, jnp.float32),
        }
        if noise is not None:
            expected = (count, *self._latent_shape(request))
            noise = jnp.asarray(noise, jnp.float32)
            if noise.shape != expected:
                raise InvalidArgumentError(f"latents/noise must have shape {expected} (N, h, w, c), got {noise.shape}")
            if not np.all(np.isfinite(noise)):
                raise InvalidArgumentError("latents/noise hold NaN or inf")
            inputs["noise"] = noise
        return inputs

    def _latent_shape(self, request: "Request") -> tuple[int, int, int]:
        factor = self.configs["vae"].downscale_factor
        return request.height // factor, request.width // factor, self.configs["vae"].latent_channels

    def _control_inputs(self, controls, request: "Request") -> tuple[dict, tuple, dict]:
        """(inputs, ControlNet modules, params) for the Control list of a call."""
        controls = [] if controls is None else [controls] if isinstance(controls, Control) else list(controls)
        if not controls:
            return {}, (), {}
        for control in controls:
            check_fits_unet(control.controlnet.config, self.configs["unet"], control.controlnet.name)
        inputs = {"control_images": control_images(controls, request.count, request.height, request.width),
                  "control_scales": jnp.asarray([c.scale for c in controls], jnp.float32),
                  "control_starts": jnp.asarray([c.start for c in controls], jnp.float32),
                  "control_ends": jnp.asarray([c.end for c in controls], jnp.float32)}
        modules = tuple(control_model(c, self.dtype, self.attention) for c in controls)
        return inputs, modules, {"controlnets": tuple(c.controlnet.params for c in controls)}

    def _run(self, call: "Generation", show_progress: bool) -> "GenerationResult":
        request, plan, params, inputs, spec = call.request, call.plan, call.params, call.inputs, call.spec
        if self.mesh is not None:
            inputs = self._shard(pad_batch(inputs, request.count, self.mesh.size))
        if show_progress and plan.nfe is not None:
            images, latents, compile_seconds, started = self._run_windows(params, inputs, spec, plan)
        else:
            images, latents, compile_seconds, started = self._run_whole(params, inputs, spec)
        # Every process gets the whole batch (a collective with several processes), without a mesh's padding.
        (images, finite), latents = jax.tree.map(lambda a: np.asarray(a)[:request.count],
                                                 distributed.to_host((images, latents)))
        result = GenerationResult(images=images, latents=latents, seeds=request.seeds,
                                  settings=dict(prompts=request.prompts, negative_prompts=request.negatives,
                                                sampler=plan.sampler, schedule=plan.schedule, steps=plan.steps,
                                                guidance_scale=float(call.inputs["guidance_scale"][0]),
                                                height=request.height, width=request.width,
                                                **({"prompts_2": request.prompts_2,
                                                    "negative_prompts_2": request.negatives_2}
                                                   if self.sdxl_settings is not None else {})),
                                  seconds=time.perf_counter() - started, compile_seconds=compile_seconds)
        if not finite.all():
            raise self._non_finite_error(result, finite, params)
        return result

    @staticmethod
    def _non_finite_error(result: "GenerationResult", finite, params) -> NonFiniteOutputError:
        """Which images came out NaN/inf, and which weights hold NaN/inf if any (the usual cause)."""
        broken = [i for i, ok in enumerate(finite) if not ok]
        # Checked where the weights are (sharded ones too, over several processes): only the flags reach the host.
        all_finite = jax.jit(lambda tree: jax.tree.map(lambda leaf: jnp.isfinite(leaf).all(), tree))
        finite_leaves = jax.device_get(all_finite(params))
        bad_weights = [jax.tree_util.keystr(path) for path, ok in jax.tree_util.tree_leaves_with_path(finite_leaves)
                       if not ok]
        cause = (f"these weights hold NaN or inf: {', '.join(bad_weights[:5])}"
                 f"{f' and {len(bad_weights) - 5} more' if len(bad_weights) > 5 else ''}; the checkpoint is damaged"
                 if bad_weights else "the weights are finite, so the computation overflowed (float16 overflows "
                 "easily: try dtype float32 or bfloat16)")
        return NonFiniteOutputError(
            f"{len(broken)} of {len(finite)} images came out NaN/inf (images {broken[:10]}, seeds "
            f"{[result.seeds[i] for i in broken[:10]]}) and would have been black: {cause}. The error's `result` "
            f"holds the generation.", result)

    def _run_whole(self, params, inputs, spec):
        """All steps in one call. Adaptive samplers (no fixed count of evaluations) show no progress bar."""
        executable, compile_seconds = self._compiled(params, inputs, spec)
        started = time.perf_counter()
        images, latents = executable(params, inputs)
        return images, latents, compile_seconds, started

    def _run_windows(self, params, inputs, spec, plan):
        """One call of the same compiled program per sampler step, the sampler's carry passed from call to call
        (sdjax.samplers.stepping): the progress bar needs no host callback, so the program is cached on disk."""
        spec = dataclasses.replace(spec, windowed=True)
        place = (lambda values: values) if self.mesh is None else self._shard
        step = lambda k: place({"window_start": jnp.int32(k), "window_stop": jnp.int32(k + 1),
                                "window_resume": jnp.bool_(k > 0)})
        inputs = {**inputs, **step(0)}
        key = self._program_key(params, inputs, spec)
        if key not in self._carry_shapes:  # the sampler's carry, found by tracing without compiling
            self._carry_shapes[key] = jax.eval_shape(functools.partial(self._run_program, spec=spec),
                                                     params, inputs)[2]
        carry = place({"carry": jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype),
                                             self._carry_shapes[key])})["carry"]
        executable, compile_seconds = self._compiled(params, {**inputs, "carry": carry}, spec)
        bar = progress.ProgressBar(plan.steps, label=plan.sampler)
        started = time.perf_counter()
        for k in range(plan.steps):
            images, latents, carry = executable(params, {**inputs, **step(k), "carry": carry})
            jax.block_until_ready(carry)
            bar.advance()
        return images, latents, compile_seconds, started

    def _shard(self, inputs: dict) -> dict:
        """Per-image inputs (a multiple of the device count: `pad_batch`) split over the mesh's devices along the
        batch, shared inputs replicated; with several processes, each holds the same inputs and gives its devices
        their rows."""
        def sharding(key):
            return parallel.replicated(self.mesh) if key in generation.SHARED_INPUTS else parallel.batch_sharding(
                self.mesh)
        shardings = {key: jax.tree.map(lambda _: sharding(key), value) for key, value in inputs.items()}
        return distributed.to_global(inputs, shardings)

    def _placed(self, params: dict) -> dict:
        """Params on the pipeline's devices: on a mesh each array by the sharding rules (`parallel.param_shardings`),
        every device given only its slice, so a model split over fsdp is never whole on one device; arrays already
        placed so stay as they are."""
        if self.mesh is None:
            return jax.device_put(params)
        return distributed.to_global(params, parallel.param_shardings(params, self.mesh))

    def _compiled(self, params: dict, inputs: dict, spec):
        """The compiled program for these input shapes and spec, and the seconds spent compiling it now (0 when
        it was compiled before). Values never enter the key: new prompts, seeds, guidance or LoRA scales reuse it."""
        key = self._program_key(params, inputs, spec)
        if key in self._executables:
            return self._executables[key], 0.0
        log.info("compiling the %s program for %d image(s)", spec.sampler, len(inputs["seeds"]))
        started = time.perf_counter()
        executable = self._lower(params, inputs, spec).compile()
        self._executables[key] = executable
        return executable, time.perf_counter() - started

    def _lower(self, params: dict, inputs: dict, spec):
        """The generation program traced for these inputs, on the pipeline's mesh (`jax.set_mesh`), where
        `parallel.per_layer` has each FSDP-split param gathered where its layer runs, inside the loops."""
        with contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh):
            return self._program.lower(params, inputs, spec=spec)

    @staticmethod
    def _program_key(params: dict, inputs: dict, spec) -> tuple:
        leaves, treedef = jax.tree_util.tree_flatten((params, inputs))  # params: unmerged LoRAs change their tree
        return (spec, treedef, tuple((leaf.shape, leaf.dtype) for leaf in leaves))

    def _run_program(self, params, inputs, spec):
        return generation.generate_program(self._models, spec, self.alphas_cumprod, params, inputs)

    def save_pretrained(self, folder: str | os.PathLike, *, dtype=np.float32) -> None:
        """Write a diffusers-layout folder that diffusers (torch) and `load_pipeline` both load."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, config in self.configs.items():
            diffusers_folder.write_component(folder, name, config, self.raw_configs.get(name), self.params[name],
                                             dtype=dtype)
        for name, tokenizer in self.tokenizers.items():
            save_tokenizer(tokenizer, folder / TEXT_ENCODERS[name])
        scheduler_dir = folder / "scheduler"
        scheduler_dir.mkdir(exist_ok=True)
        diffusers_folder.write_json(scheduler_dir / "scheduler_config.json", self.scheduler_config)
        scheduler_class = self.scheduler_config.get("_class_name", "PNDMScheduler")
        if self.sdxl_settings is None:
            diffusers_folder.write_model_index(folder, scheduler_class)
            return
        family = tuple(self.configs)
        diffusers_folder.write_model_index(folder, scheduler_class, self.sdxl_settings.pipeline_class, family=family,
                                           settings=self.sdxl_settings.model_index_entries(family))

    def save_single_file(self, path: str | os.PathLike, *, dtype=np.float32) -> None:
        """Write every network as one .safetensors in the original CompVis/Stability layout (what A1111, ComfyUI
        and diffusers' `from_single_file` load), atomically. A single file holds no tokenizer or scheduler; a
        v-prediction model is marked with ComfyUI's `v_pred` key (`sdjax.weights.single_file`)."""
        single_file.write(path, self.configs, self.params, dtype=dtype,
                          prediction_type=self.scheduler_config.get("prediction_type", "epsilon"))

    # --- pure functions behind the jit ---------------------------------------------------------------------

    def _encode_tokens(self, params, ids, clip_skip) -> dict:
        """The U-Net's text keywords (`generation.Models.encode_text`). SD: (N, 77 * K) ids -> encoder_hidden_states
        (N, 77 * K, D), each chunk of 77 encoded on its own (K = 1 for plain prompts); SDXL: `sdxl.encode_text`."""
        if self.sdxl_settings is not None:
            return sdxl.encode_text(self.modules, params, ids, clip_skip)
        rows, positions = ids.shape
        chunks = ids.reshape(-1, self.tokenizer.model_max_length)
        embeds = self.modules["text_encoder"].apply({"params": params["text_encoder"]}, chunks,
                                                    clip_skip=clip_skip).prompt_embeds
        return {"encoder_hidden_states": embeds.reshape(rows, positions, embeds.shape[-1])}

    def _encode_pixels(self, params, pixels, key):
        vae = self.modules["vae"]
        posterior = vae.apply({"params": params}, pixels.astype(vae.dtype), method=vae.encode)
        latents = posterior.mean if key is None else posterior.sample(key)
        return scale_latents(latents, self.configs["vae"])

    def _decode_scaled(self, params, latents):
        vae = self.modules["vae"]
        return vae.apply({"params": params}, unscale_latents(latents, self.configs["vae"]), method=vae.decode)

    def _unet_apply(self, params, latents, timesteps, embeddings, down_residuals=None, mid_residual=None, **added):
        """added: SDXL's text_embeds and time_ids."""
        return self.modules["unet"].apply({"params": params}, latents.astype(self.dtype), timesteps,
                                          embeddings.astype(self.dtype), down_residuals, mid_residual, **added)


@dataclasses.dataclass(frozen=True)
class Edit:
    """What img2img and inpaint add to a generation: the starting image (anything `images.image_batch` takes,
    uint8 or float in [0, 1]), an optional mask (repaint where white) and the strength (the fraction of the
    schedule run)."""
    image: Any
    mask: Any = None
    strength: float = 1.0  # checked by SamplingPlan.for_strength


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation call's per-image host inputs, after defaults and broadcasting."""
    prompts: list[str]
    negatives: list[str]
    seeds: list[int]
    height: int
    width: int
    prompts_2: list[str]  # SDXL's second text encoder's (the prompts unless prompt_2 was given)
    negatives_2: list[str]

    @property
    def count(self) -> int:
        return len(self.prompts)


@dataclasses.dataclass(frozen=True)
class Generation:
    """One generation call, prepared (`Pipeline.prepare`): the inputs checked and built, the program chosen."""
    pipeline: Pipeline
    request: Request
    plan: SamplingPlan
    params: dict  # the pipeline's params, the call's ControlNets' under "controlnets", unmerged LoRAs under "loras"
    inputs: dict  # per-image arrays (leading batch axis) and the shared ones (generation.SHARED_INPUTS)
    spec: generation.ProgramSpec

    def run(self, show_progress: bool = False) -> "GenerationResult":
        """What `Pipeline.generate` returns: compiled once per spec and input shapes, NaN/inf images refused."""
        return self.pipeline._run(self, show_progress)

    @property
    def per_image_inputs(self) -> dict:
        """The inputs with a leading batch axis: what `function` takes besides the params."""
        return {k: v for k, v in self.inputs.items() if k not in generation.SHARED_INPUTS}

    def function(self) -> Callable:
        """`images, finite = fn(params, per_image_inputs)`: this call as a pure function of the params and the
        per-image inputs (everything else bound), for your own `jax.jit` shardings or `jax.pmap` over a leading
        device axis. images: uint8 (N, H, W, 3); finite (N,): whether an image decoded to numbers (NaN and inf
        become black at the uint8 conversion: check it). The function holds no sharding: a pipeline on a mesh jits the
        same program with its own shardings (jit it under `jax.set_mesh(mesh)`, with axes (data, fsdp), for its
        FSDP-split params to be gathered layer by layer: `parallel.per_layer`)."""
        pipeline, spec = self.pipeline, dataclasses.replace(self.spec, batch_shards=1)
        shared = {k: v for k, v in self.inputs.items() if k in generation.SHARED_INPUTS}

        def fn(params, per_image_inputs):
            return pipeline._run_program(params, {**shared, **per_image_inputs}, spec)[0]

        return fn


@dataclasses.dataclass
class GenerationResult:
    """uint8 images (N, H, W, 3), the final latents (N, h, w, c), the seeds and the settings used."""
    images: np.ndarray
    latents: np.ndarray
    seeds: list[int]
    settings: dict
    seconds: float  # sampling and decoding, compilation excluded
    compile_seconds: float = 0.0


def per_prompt(value, name: str, count: int) -> list[str]:
    """A string, or a list of one or `count` strings, as `count` strings."""
    texts = list(value) if isinstance(value, (list, tuple)) else [value]
    if not texts or not all(isinstance(text, str) for text in texts):
        raise InvalidArgumentError(f"{name} must be a string or a list of strings, got {value!r}")
    if len(texts) not in (1, count):
        raise InvalidArgumentError(f"{name} has {len(texts)} entries for {count} prompts")
    return texts * count if len(texts) == 1 else texts


def broadcast_batch(array, count: int, name: str):
    """`array` with a leading batch of `count`: a batch of 1 is repeated, any other size must match."""
    if array.shape[0] == count:
        return array
    if array.shape[0] == 1:
        return jnp.repeat(jnp.asarray(array), count, axis=0)
    raise InvalidArgumentError(f"{name} has a batch of {array.shape[0]}; expected 1 or {count}")


SEED_RANGE = 2**32  # seeds are 0 <= seed < 2**32; image i's noise comes from jax.random.key(seeds[i])


def check_seed(seed) -> int:
    """`seed` as an int, when it is an integer in [0, 2**32) (so no two seeds give the same noise)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < SEED_RANGE:
        raise InvalidArgumentError(f"seed {seed!r} is outside sdjax's seed range: an integer 0 <= seed < 2**32 "
                                   f"(= {SEED_RANGE}); with several images, seed + i must stay below it too")
    return int(seed)


def check_image_size(height, width, factor: int) -> tuple[int, int]:
    """(height, width) when both are positive multiples of the VAE's downscale `factor`; else a clear error. The
    CLI calls it before loading a model, so a wrong --size fails at once."""
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value <= 0 or value % factor:
            raise InvalidArgumentError(f"{name}={value!r} must be a positive multiple of the VAE factor {factor}")
    return height, width


def pad_batch(inputs: dict, count: int, devices: int) -> dict:
    """Per-image inputs of `count` images padded, by repeating the last image, to a multiple of `devices`: every
    device runs the same number of images; the extra ones are dropped from the results."""
    extra = -count % devices
    if not extra:
        return inputs
    pad = lambda value: jnp.concatenate([value, jnp.repeat(value[-1:], extra, axis=0)])
    return {key: value if key in generation.SHARED_INPUTS else jax.tree.map(pad, value)
            for key, value in inputs.items()}


def load_pipeline(path_or_hub_id: str | os.PathLike | None = None, *, dtype=jnp.float32, devices=None, mesh=None,
                  variant: str | None = None, attention: str = DEFAULT_ATTENTION, check_finite: bool = False,
                  config: str | os.PathLike | None = None, prediction_type: str | None = None) -> Pipeline:
    """Load a Stable Diffusion pipeline from a diffusers folder, a hub id, or a single-file checkpoint
    (.safetensors or a PyTorch .ckpt/.pt in the original CompVis/Stability layout); with no argument, the small
    shapes model that ships inside sdjax (`sdjax.embedded`). SD 1.x / 2.x, SDXL base and SDXL refiner folders are
    told apart by the text encoders their model_index.json lists, single files by their keys
    (`sdjax.weights.single_file`).

    dtype: param and compute dtype (float32, bfloat16 or float16). variant: weight file variant ("fp16").
    devices: a list of devices to generate on in parallel: params are replicated on each and a batch of images
    is split between them (padded to a multiple of their count; default: the first local device only).
    mesh: "data=N,fsdp=M" over `devices` (default: every device of every process; N * M = their count), or a
    `jax.sharding.Mesh` with axes (data, fsdp) (`sdjax.parallel.make_mesh`): the batch is split over all the
    devices, and with fsdp > 1 each large param is stored split over fsdp devices, placed slice by slice from the
    host (never whole on one device); generation gathers each layer's params where the layer runs, inside the
    sampler loop (`parallel.per_layer`), so a call's peak memory per device falls with fsdp
    (experiments/scaling/generation_memory.py measures it). The same images as on one device.
    check_finite: refuse weights that hold NaN or inf, naming the file and tensors (a pass over every weight; the
    CLI does it). Without it, a damaged weight shows as NonFiniteOutputError when it spoils an image.
    Single files only: config, a diffusers folder or hub id whose configs, tokenizers and scheduler go with the
    file's weights (needed for small or unusual architectures; else full-size configs are built in and the
    tokenizers come from the Hugging Face cache); prediction_type ("epsilon", "v_prediction"), which a file
    cannot always say (default: v-prediction for SD 2.x as diffusers, else epsilon, or the config's).
    """
    try:
        dtype_name = np.dtype(dtype).name
    except TypeError:
        dtype_name = str(dtype)
    if dtype_name not in _PARAM_DTYPES:
        raise InvalidArgumentError(f"dtype={dtype_name!r} is not supported; use one of {', '.join(_PARAM_DTYPES)}")
    mesh = parallel.resolve_mesh(mesh, devices)  # before the (slow) load: a bad mesh fails at once
    source = model_folder(path_or_hub_id, variant)
    if source.is_file():
        loaded = single_file.read_pipeline(source, config=config, prediction_type=prediction_type, dtype=dtype,
                                           check_finite=check_finite)
    elif config is not None or prediction_type is not None:
        raise InvalidArgumentError(f"config= and prediction_type= are for single-file checkpoints; {source} is a "
                                   f"diffusers folder, which has its own configs and scheduler")
    else:
        loaded = _read_folder(source, dtype, variant, check_finite)
    tokenizers = {name: load_tokenizer(folder) for name, folder in loaded.tokenizer_folders.items()}
    return Pipeline(loaded.configs, loaded.params, tokenizers.get("text_encoder"), loaded.scheduler_config,
                    dtype=dtype, attention=attention, raw_configs=loaded.raw_configs, mesh=mesh,
                    is_embedded=source == embedded.EMBEDDED_MODEL, tokenizer_2=tokenizers.get("text_encoder_2"),
                    sdxl_settings=loaded.settings)


def _read_folder(folder: Path, dtype, variant: str | None, check_finite: bool) -> diffusers_folder.Loaded:
    """Everything `load_pipeline` reads from a diffusers folder."""
    index = diffusers_folder.read_model_index(folder)
    family = diffusers_folder.model_family(index)  # SD 1.x / 2.x, SDXL base or SDXL refiner
    loaded, raw, params = {}, {}, {}
    for name in family:
        loaded[name], raw[name] = diffusers_folder.read_config(folder / name, name)
    settings = None
    if family != STABLE_DIFFUSION:
        settings = sdxl.SDXLSettings.from_model_index(index, str(folder / "model_index.json"))
        sdxl.check_models(loaded, raw, settings)  # before reading gigabytes of weights
    for name in family:
        params[name] = diffusers_folder.load_params(folder / name, name, loaded[name], dtype=dtype, variant=variant,
                                                    check_finite=check_finite)
    scheduler_config = diffusers_folder.read_json(folder / "scheduler" / "scheduler_config.json")
    tokenizers = {name: folder / TEXT_ENCODERS[name] for name in family if name in TEXT_ENCODERS}
    return diffusers_folder.Loaded(loaded, raw, params, tokenizers, scheduler_config, settings)


def load_tokenizer(folder: Path):
    """The CLIP tokenizer saved in `folder` (a pipeline's tokenizer/ or tokenizer_2/)."""
    files = {path.name for path in folder.iterdir()}
    if "tokenizer.json" not in files and not {"vocab.json", "merges.txt"} <= files:
        raise MissingComponentError(f"{folder} has neither tokenizer.json nor vocab.json with merges.txt: a CLIP "
                                    f"tokenizer needs one of them (copy the model's {folder.name}/ folder again)")
    return clip_tokenizer_class().from_pretrained(folder)


def model_folder(path_or_hub_id: str | os.PathLike | None, variant: str | None = None) -> Path:
    """The local folder of a model: the embedded one for None, else a folder, a (downloaded) hub id, or the path of
    a single-file checkpoint."""
    if path_or_hub_id is not None:
        return hub.resolve(path_or_hub_id, variant)
    if not (embedded.EMBEDDED_MODEL / "model_index.json").is_file():
        raise InvalidArgumentError(f"the embedded model is missing from this installation ({embedded.EMBEDDED_MODEL}"
                                   f"); reinstall sdjax, or pass a diffusers folder or hub id")
    return embedded.EMBEDDED_MODEL
