"""The generation program: prompts + noise -> sampler `lax.scan` -> VAE decode, as one pure function.

`Pipeline` jit-compiles `generate_program` once per (shapes, `ProgramSpec`); everything that varies between
calls of the same shape (prompts, seeds, guidance, sigmas, init images, masks) is a traced argument.
Each image is sampled under `jax.vmap` with its own key, so image i depends only on its own seed, never on
the batch it is part of; the batch stays the leading axis of every input, ready to be sharded.

The program holds no sharding: on a device mesh (`sdjax.parallel`) the Pipeline jits it with the batch split
over every device and the params placed by the sharding rules (replicated, or split over `fsdp`), and the
compiler (GSPMD) partitions it. Traced on a mesh whose fsdp axis splits params (`jax.set_mesh`, as the Pipeline
compiles), every layer gathers its params where it is used (`parallel.per_layer`), so a device never holds the
whole model; elsewhere that is a no-op and the program is what it always was. One program thus serves one device, data
parallelism and FSDP, and is the pure function users wrap in their own `jax.jit` or `jax.pmap`.

Sampling runs in variance-exploding scaling (x = x0 + sigma eps). Diffusers' latents are variance-preserving;
`x_vp = x / sqrt(1 + sigma^2)`, which is the identity at the usual final sigma of 0.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from sdjax import control, denoisers, lora
from sdjax.parameterization import to_vp
from sdjax.errors import InvalidArgumentError
from sdjax.parallel import per_layer
from sdjax.prompt_syntax import emphasize
from sdjax.models.controlnet import sum_residuals
from sdjax.samplers import get_sampler, stepping


@dataclasses.dataclass(frozen=True)
class ProgramSpec:
    """The static part of a generation program: changing any field recompiles."""
    sampler: str
    latent_shape: tuple[int, int, int]  # (h, w, channels) of one image's latents
    options: tuple[tuple[str, Any], ...] = ()
    prediction_type: str = "epsilon"
    quantize_timesteps: bool = False
    clip_skip: int | None = None
    start_from_image: bool = False    # img2img / inpaint with strength < 1: x = image latents + sigma_0 noise
    # Inpainting: "blend" holds the known region on the image's trajectory (an ordinary 4-channel U-Net);
    # "channels" gives an inpainting U-Net the mask and the masked image's latents as extra input channels.
    inpaint: str | None = None
    # Images one after another (lax.map) instead of as one batch (vmap): bitwise the same result for an image
    # whatever batch it is in, since XLA's kernels may round differently at different batch sizes.
    batch_invariant: bool = False
    pinned_timesteps: bool = False  # inputs["model_timesteps"] fixes the U-Net's timestep per sigma
    ve_latents: bool = False  # the final x goes to the VAE unconverted (diffusers' Euler-family schedulers)
    controlnets: tuple = ()   # ControlNetModel modules; their params are params["controlnets"]
    # The batch is split into this many equal contiguous shards (the devices of a mesh): batch_invariant runs each
    # shard's images one after another and the shards side by side (a plain lax.map over a batch split over
    # devices would run every image on every device).
    batch_shards: int = 1
    guess_mode: bool = False  # ControlNets see only the conditional half of classifier-free guidance
    # Run only the sampler steps [window_start, window_stop) from a carried state (sdjax.samplers.stepping); the
    # host calls the program once per window, which drives a progress bar without host callbacks.
    windowed: bool = False


@dataclasses.dataclass(frozen=True)
class Models:
    """The pure apply functions the program calls; hashable so that jit can treat them as static."""
    # (params, one side's ids, clip_skip) -> the U-Net's text keywords: encoder_hidden_states (N, 77 * K, D) from
    # ids (N, 77 * K); for SDXL, from ids {text encoder name: (N, 77)}, also text_embeds (N, P) (sdjax.sdxl)
    encode_text: Callable
    # (params, x_vp, t, encoder_hidden_states, down_residuals, mid_residual, **added) -> raw output; added: SDXL's
    # text_embeds and time_ids
    unet: Callable
    decode: Callable       # (params, scaled latents) -> pixels in [-1, 1]


def generate_program(models: Models, spec: ProgramSpec, alphas_cumprod, params: dict, inputs: dict):
    """(uint8 images (N, H, W, 3), finite (N,): whether every decoded pixel was a number) and the final (VP)
    latents. The flag exists because the uint8 conversion turns NaN into black without a trace.

    inputs: cond_ids, uncond_ids (N, 77 * K), with cond_weights, uncond_weights (N, K, 77) for emphasis
    (`sdjax.prompt_syntax`); for SDXL instead cond_ids, uncond_ids {text encoder name: (N, 77)}, cond_time_ids,
    uncond_time_ids (N, 6 or 5) and zero_uncond (N,) (`sdjax.sdxl`); seeds (N,) uint32; guidance_scale,
    guidance_rescale (N,);
    sigmas (steps + 1,) and init_noise_sigma (), shared by all images; optionally noise (N, h, w, c) instead
    of noise drawn from each seed, and image_latents, mask (N, h, w, 1), masked_image_latents when the spec
    needs them; for ControlNets control_images (a tuple of (N, H, W, 3) in [0, 1]) and control_scales,
    control_starts, control_ends (K,); model_timesteps (rows of (sigma, t)) when the spec pins them.
    A windowed spec also takes window_start, window_stop (int32) and window_resume (bool), and per image the
    sampler's `carry` to resume from (omitted: only its structure is traced); it returns that carry third, and
    decodes images only in the window that reaches the last step (zeros before).
    params["loras"], when present, holds unmerged LoRA adapters (`sdjax.lora`), added to their layers first: once
    per call, outside the sampler loop, with their scales as traced values.
    """
    params = lora.apply(params)
    sigmas = inputs["sigmas"]
    sampler = get_sampler(spec.sampler)

    @per_layer  # each layer's FSDP-split params gathered at its use, inside the sampler loop
    def unet_fn(x_vp, t, encoder_hidden_states, mask=None, masked_image_latents=None, control_images=(),
                control_scales=None, **added):
        down, mid = (control_residuals(spec, params["controlnets"], x_vp, t, encoder_hidden_states, control_images,
                                       control_scales, added) if spec.controlnets else (None, None))
        if spec.inpaint == "channels":
            x_vp = jnp.concatenate([x_vp, mask, masked_image_latents], axis=-1)
        return models.unet(params["unet"], x_vp, t, encoder_hidden_states, down, mid, **added)

    model_fn = (denoisers.pin_timesteps(unet_fn, alphas_cumprod, inputs["model_timesteps"], spec.quantize_timesteps)
                if spec.pinned_timesteps else unet_fn)

    def one_image(per_image):
        """Everything for one image, each array with a batch axis of 1 for the models."""
        image = jax.tree.map(lambda v: v[None], per_image)
        noise_key, sampler_key = jax.random.split(jax.random.key(per_image["seeds"]))
        noise = image["noise"] if "noise" in image else jax.random.normal(noise_key, (1, *spec.latent_shape))
        def text(side):  # "cond" or "uncond": the U-Net's text keywords for that half of guidance
            conditioning = dict(per_layer(models.encode_text)(params, image[f"{side}_ids"], spec.clip_skip))
            weights = image.get(f"{side}_weights")
            if weights is not None:  # the a1111 syntax's emphasis
                conditioning["encoder_hidden_states"] = emphasize(conditioning["encoder_hidden_states"], weights)
            if side == "uncond" and "zero_uncond" in per_image:  # SDXL's force_zeros_for_empty_prompt
                conditioning = jax.tree.map(lambda v: jnp.where(per_image["zero_uncond"], jnp.zeros_like(v), v),
                                            conditioning)
            if f"{side}_time_ids" in image:  # SDXL's sizes and crop corner (or aesthetic score)
                conditioning["time_ids"] = image[f"{side}_time_ids"]
            return conditioning

        cond, uncond = text("cond"), text("uncond")
        if spec.inpaint == "channels":
            for side in (cond, uncond):
                side.update(mask=image["mask"], masked_image_latents=image["masked_image_latents"])

        def denoise(x, sigma):
            cond_now, uncond_now = cond, uncond
            if spec.controlnets:  # scales depend on the step, so the conditioning is built per call
                scales = control_scales(inputs, sigma)[None]
                cond_now = {**cond, "control_images": image["control_images"], "control_scales": scales}
                uncond_now = {**uncond, "control_images": image["control_images"],
                              "control_scales": jnp.zeros_like(scales) if spec.guess_mode else scales}
            return denoisers.cfg_denoiser(
                model_fn, alphas_cumprod, cond_now, uncond_now, per_image["guidance_scale"],
                guidance_rescale=per_image["guidance_rescale"], prediction_type=spec.prediction_type,
                quantize=spec.quantize_timesteps)(x, sigma)

        if spec.inpaint == "blend":
            denoise = keep_known_region(denoise, image["image_latents"], image["mask"], noise, sigmas[0])
        if spec.start_from_image:
            x = image["image_latents"] + sigmas[0] * noise  # diffusers' add_noise, in VE scaling
        else:
            x = noise * inputs["init_noise_sigma"]
        run_sampler = lambda x: sampler(denoise, x, sigmas, sampler_key, **dict(spec.options))
        if spec.windowed:
            window = stepping.Window(inputs["window_start"], inputs["window_stop"], inputs["window_resume"],
                                     per_image.get("carry"))
            with stepping.window(window):
                x = run_sampler(x)
        else:
            x = run_sampler(x)
        if spec.inpaint == "blend":
            x = blend(x, image["image_latents"], image["mask"], noise, sigmas[-1])
        latents = x if spec.ve_latents else to_vp(x, sigmas[-1])
        if not spec.windowed:
            return latents[0]
        if window.scans != 1:
            raise InvalidArgumentError(f"sampler {spec.sampler!r} does not loop over a fixed grid of steps, so it "
                                       f"cannot run a window of steps at a time")
        return latents[0], window.final_carry

    def decode(latents):  # one image's (h, w, c) latents -> its uint8 pixels and whether all were numbers
        pixels = per_layer(models.decode)(params["vae"], latents[None])
        return to_uint8(pixels)[0], jnp.all(jnp.isfinite(pixels))

    def each_image(fn, batch, together: bool):
        """fn on every image of the batch: side by side (vmap) when `together`, else one after another on each
        device's block of the batch (the blocks side by side: a plain lax.map over a batch split over devices
        would run every image on every device)."""
        if together:
            return jax.vmap(fn)(batch)
        if spec.batch_shards == 1:
            return jax.lax.map(fn, batch)
        shards = jax.tree.map(lambda v: v.reshape(spec.batch_shards, -1, *v.shape[1:]), batch)
        outputs = jax.vmap(lambda shard: jax.lax.map(fn, shard))(shards)
        return jax.tree.map(lambda v: v.reshape(-1, *v.shape[2:]), outputs)

    per_image = {k: v for k, v in inputs.items() if k not in SHARED_INPUTS}
    sampled = each_image(one_image, per_image, together=not spec.batch_invariant)
    # The VAE decodes one image at a time whatever the mode: decoding a batch of 512x512 images at once holds
    # several GB of activations (SD 1.5, batch 4: the generation's peak memory), one at a time a quarter of it.
    decode_all = lambda latents: each_image(decode, latents, together=False)  # noqa: E731
    if not spec.windowed:
        return decode_all(sampled), sampled
    latents, carry = sampled
    blank = lambda latents: jax.tree.map(lambda v: jnp.zeros(v.shape, v.dtype),  # noqa: E731
                                         jax.eval_shape(decode_all, latents))
    images = jax.lax.cond(inputs["window_stop"] >= sigmas.shape[0] - 1, decode_all, blank, latents)
    return images, latents, carry


SHARED_INPUTS = ("sigmas", "init_noise_sigma", "model_timesteps", "control_scales", "control_starts",
                 "control_ends", "window_start", "window_stop", "window_resume")
"""Inputs that all images share; every other input has the batch as its leading axis."""


def control_scales(inputs, sigma):
    """Each ControlNet's conditioning scale at noise level sigma: its scale inside its [start, end) window of
    steps, else 0. The step of an evaluation is the number of grid points after the first at or above sigma, so
    the intermediate evaluations of multi-stage samplers count with their step."""
    sigmas = inputs["sigmas"]
    step = jnp.sum(sigmas[1:-1] >= sigma)
    active = control.active_fraction(step, sigmas.shape[0] - 1, inputs["control_starts"], inputs["control_ends"])
    return inputs["control_scales"] * active


def control_residuals(spec: ProgramSpec, controlnet_params, x_vp, t, encoder_hidden_states, control_images, scales,
                      added: dict):
    """The summed residuals of the ControlNets for one U-Net call; `scales` (batch, K) are their scales. added:
    SDXL's text_embeds and time_ids, which an SDXL ControlNet reads as its U-Net does (empty for SD 1.x / 2.x)."""
    outputs = [module.apply({"params": p}, x_vp, t, encoder_hidden_states, image, scales[:, k, None, None, None],
                            guess_mode=spec.guess_mode, **added)
               for k, (module, p, image) in enumerate(zip(spec.controlnets, controlnet_params, control_images))]
    return sum_residuals(outputs)


def blend(x, image_latents, mask, noise, sigma):
    """Keep the unmasked region (mask = 0) on the image's own noised trajectory: image + sigma * noise."""
    return mask * x + (1.0 - mask) * (image_latents + sigma * noise)


def keep_known_region(denoise, image_latents, mask, noise, first_sigma):
    """A denoiser that sees the known region as the image noised to the current sigma.

    Diffusers blends the latents after every step; blending the denoiser's input instead gives the same
    masked-region trajectory for binary masks (every sampler update is elementwise in x) and needs no hook
    inside the samplers. Like diffusers, the first evaluation sees the starting latents unblended (pure noise
    at strength 1); the final blend happens after sampling.
    """
    def blended(x, sigma):
        return denoise(jnp.where(sigma < first_sigma, blend(x, image_latents, mask, noise, sigma), x), sigma)
    return blended


def to_uint8(pixels):
    """Decoder output in [-1, 1] -> uint8, rounded as diffusers' image processor does."""
    return jnp.round(jnp.clip((pixels + 1.0) / 2.0, 0.0, 1.0) * 255.0).astype(jnp.uint8)
