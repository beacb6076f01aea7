"""Tiny Stable Diffusion folders built with diffusers/transformers in torch, the references of the tests.

Weights are random and then perturbed, so no layer keeps diffusers' zero or identity initialisation (a zero
output conv would hide a wrong U-Net). Folders are written with `save_pretrained(safe_serialization=True)`,
exactly the layout users download.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from tests.models import perturb_
from tests.tokenizer_fixture import make_clip_tokenizer

BLOCKS = (32, 64)


@dataclasses.dataclass(frozen=True)
class Variant:
    """What distinguishes an SD1-like from an SD2-like tiny model."""
    attention_head_dim: int | tuple[int, ...]
    use_linear_projection: bool
    upcast_attention: bool
    hidden_act: str
    prediction_type: str


SD1 = Variant(attention_head_dim=8, use_linear_projection=False, upcast_attention=False,
              hidden_act="quick_gelu", prediction_type="epsilon")
SD2 = Variant(attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True,
              hidden_act="gelu", prediction_type="v_prediction")


def build_unet(variant: Variant, in_channels: int = 4) -> UNet2DConditionModel:
    # One layer per block (two on the way up): every generation program compiles this U-Net, and a second layer
    # per block costs ~15% more compile time. Several layers per block are checked against diffusers in
    # tests/models/test_unet.py.
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=in_channels, out_channels=4, block_out_channels=BLOCKS, layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=16, attention_head_dim=variant.attention_head_dim,
        use_linear_projection=variant.use_linear_projection, upcast_attention=variant.upcast_attention)
    return perturb_(unet, seed=1)


def build_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=BLOCKS, latent_channels=4,
                        layers_per_block=1, norm_num_groups=16,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    return perturb_(vae, seed=2)


def build_text_encoder(variant: Variant, tokenizer) -> CLIPTextModel:
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                            num_attention_heads=4, hidden_act=variant.hidden_act, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return perturb_(CLIPTextModel(config), seed=3)


def build_scheduler(variant: Variant):
    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                  prediction_type=variant.prediction_type)
    if variant.prediction_type == "v_prediction":
        return DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **common)
    return PNDMScheduler(skip_prk_steps=True, **common)


def build_pipeline(variant: Variant, tokenizer_folder, unet_in_channels: int = 4) -> StableDiffusionPipeline:
    tokenizer = make_clip_tokenizer(tokenizer_folder)
    return StableDiffusionPipeline(
        vae=build_vae(), text_encoder=build_text_encoder(variant, tokenizer), tokenizer=tokenizer,
        unet=build_unet(variant, unet_in_channels), scheduler=build_scheduler(variant), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)


def save_pipeline_folder(variant: Variant, folder, unet_in_channels: int = 4) -> StableDiffusionPipeline:
    """Write a tiny SD folder to `folder` and return the torch pipeline it holds (a 9-channel U-Net makes an
    inpainting model: latents + mask + masked-image latents)."""
    pipeline = build_pipeline(variant, folder.with_name(folder.name + "_tokenizer"), unet_in_channels)
    pipeline.save_pretrained(folder, safe_serialization=True)
    return pipeline


def assert_images_match(ours, reference_unit):
    """Per-pixel agreement with diffusers' float output in [0, 1]: at most 2/255, on average under 0.5/255."""
    reference = np.round(np.asarray(reference_unit) * 255.0)
    difference = np.abs(ours.astype(np.float64) - reference)
    assert ours.shape == reference.shape
    assert difference.max() <= 2 and difference.mean() <= 0.5, (difference.max(), difference.mean())


def nchw(array):
    """NHWC numpy -> NCHW float32 torch tensor."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(array, np.float32).transpose(0, 3, 1, 2)))


# --- SDXL: base (two text encoders) and refiner (text_encoder_2 only, aesthetic score) ---------------------------

# stabilityai/stable-diffusion-xl-base-1.0's scheduler (the refiner's is the same).
SDXL_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                      timestep_spacing="leading", prediction_type="epsilon")
SDXL_TEXT_WIDTHS = {"text_encoder": 32, "text_encoder_2": 48}  # unequal, so a swapped concatenation shows
SDXL_POOLED_WIDTH = 16  # text_encoder_2's projection_dim
SDXL_TIME_EMBED = 8     # addition_time_embed_dim


def build_sdxl_unet(encoders: tuple[str, ...], time_ids: int, in_channels: int = 4) -> UNet2DConditionModel:
    """SDXL's U-Net layout, tiny: a plain first block, then cross-attention with two transformer layers; linear
    projections; the text_time added embedding of the pooled prompt and `time_ids` micro-conditioning values
    (6 for the base model, 5 for the refiner). 9 input channels make an inpainting U-Net."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=in_channels, out_channels=4, block_out_channels=BLOCKS, layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
        norm_num_groups=16, cross_attention_dim=sum(SDXL_TEXT_WIDTHS[name] for name in encoders),
        addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_EMBED,
        projection_class_embeddings_input_dim=SDXL_POOLED_WIDTH + time_ids * SDXL_TIME_EMBED)
    return perturb_(unet, seed=7 + time_ids)


def build_text_encoder_2(tokenizer, seed: int = 4):
    """OpenCLIP bigG's role, tiny: exact gelu, a projection head, and the legacy eos_token_id 2 of SDXL's
    config (pooling at the largest token id)."""
    from transformers import CLIPTextModelWithProjection
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=SDXL_TEXT_WIDTHS["text_encoder_2"],
                            intermediate_size=53, num_hidden_layers=3, num_attention_heads=4, hidden_act="gelu",
                            projection_dim=SDXL_POOLED_WIDTH, bos_token_id=tokenizer.bos_token_id, eos_token_id=2,
                            pad_token_id=tokenizer.pad_token_id)
    return perturb_(CLIPTextModelWithProjection(config), seed=seed)


def build_sdxl_vae() -> AutoencoderKL:
    vae = build_vae()
    vae.register_to_config(scaling_factor=0.13025, force_upcast=True)  # SDXL's VAE config
    return vae


def sdxl_tokenizers(folder):
    """(tokenizer, tokenizer_2): the same vocabulary; the second pads with "!" as SDXL's tokenizer_2 does."""
    from transformers import CLIPTokenizer
    tokenizer = make_clip_tokenizer(folder)
    return tokenizer, CLIPTokenizer.from_pretrained(folder, pad_token="!")


def save_sdxl_folders(base_folder, refiner_folder):
    """Write a tiny SDXL base folder (StableDiffusionXLPipeline) and a refiner folder (StableDiffusionXLImg2ImgPipeline:
    text_encoder_2 only, requires_aesthetics_score, force_zeros_for_empty_prompt false, as the real refiner) and
    return the two torch pipelines. The base keeps SDXL's Euler scheduler; the refiner has DPM-Solver++ made from
    that config, as users swap schedulers, so that the tests cover a multistep scheduler without another model."""
    from diffusers import (DPMSolverMultistepScheduler, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline,
                           StableDiffusionXLPipeline)
    tokenizer, tokenizer_2 = sdxl_tokenizers(base_folder.with_name(base_folder.name + "_tokenizer"))
    text_encoder_2 = build_text_encoder_2(tokenizer_2)
    base = StableDiffusionXLPipeline(
        vae=build_sdxl_vae(), text_encoder=build_text_encoder(SD1, tokenizer), text_encoder_2=text_encoder_2,
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=build_sdxl_unet(("text_encoder", "text_encoder_2"), 6),
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER), force_zeros_for_empty_prompt=True, add_watermarker=False)
    base.save_pretrained(base_folder, safe_serialization=True)
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=base.vae, text_encoder=None, text_encoder_2=build_text_encoder_2(tokenizer_2, seed=5), tokenizer=None,
        tokenizer_2=tokenizer_2, unet=build_sdxl_unet(("text_encoder_2",), 5),
        scheduler=DPMSolverMultistepScheduler.from_config(base.scheduler.config), requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False, add_watermarker=False)
    refiner.save_pretrained(refiner_folder, safe_serialization=True)
    return base, refiner
