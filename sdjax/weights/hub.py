"""Resolve what the user passed to `load_pipeline` into a local diffusers folder."""
from __future__ import annotations

import os
from pathlib import Path

from sdjax.errors import MissingComponentError, OfflineError

# Only what sdjax reads: configs, tokenizer files and safetensors weights (no pickles, no other variants).
_HUB_PATTERNS = ["model_index.json", "*/config.json", "scheduler/*.json", "tokenizer/*", "tokenizer_2/*",
                 "unet/diffusion_pytorch_model{v}.safetensors*", "vae/diffusion_pytorch_model{v}.safetensors*",
                 "text_encoder/model{v}.safetensors*", "text_encoder_2/model{v}.safetensors*"]  # _2: SDXL's


def resolve(path_or_hub_id: str | os.PathLike, variant: str | None = None) -> Path:
    """A local folder for a path, or the hub snapshot for an id like `stable-diffusion-v1-5/stable-diffusion-v1-5`."""
    path = Path(path_or_hub_id).expanduser()
    if path.exists():
        if path.is_file():
            raise MissingComponentError(
                f"{path} is a single file; sdjax loads diffusers-layout folders (model_index.json, unet/, vae/, "
                f"text_encoder/, tokenizer/, scheduler/). Convert single-file checkpoints with diffusers' "
                f"`StableDiffusionPipeline.from_single_file(...).save_pretrained(folder)`.")
        return path
    text = str(path_or_hub_id)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise MissingComponentError(f"{text}: no such folder, and not a hub id of the form 'owner/name'")
    return _download(text, variant)


def _download(repo_id: str, variant: str | None) -> Path:
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    suffix = f".{variant}" if variant else ""
    patterns = [p.format(v=suffix) for p in _HUB_PATTERNS]
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
        raise OfflineError(
            f"hub id {repo_id!r} is not in the local cache and the hub cannot be reached "
            f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}). Download it once while online, or "
            f"pass a local diffusers folder.") from err
