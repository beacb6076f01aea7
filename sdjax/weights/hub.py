"""Resolve what the user passed to `load_pipeline` into a local diffusers folder or single checkpoint file."""
from __future__ import annotations

import os
from pathlib import Path

from sdjax.errors import MissingComponentError, OfflineError

# Only what sdjax reads: configs, tokenizer files and safetensors weights (no pickles, no other variants).
_HUB_PATTERNS = ["model_index.json", "*/config.json", "scheduler/*.json", "tokenizer/*", "tokenizer_2/*",
                 "unet/diffusion_pytorch_model{v}.safetensors*", "vae/diffusion_pytorch_model{v}.safetensors*",
                 "text_encoder/model{v}.safetensors*", "text_encoder_2/model{v}.safetensors*"]  # _2: SDXL's
# Single-file checkpoints (sdjax.weights.single_file reads them); a missing file named like one is no hub id.
SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def resolve(path_or_hub_id: str | os.PathLike, variant: str | None = None, *, weights: bool = True) -> Path:
    """A local folder for a path, the hub snapshot for an id like `stable-diffusion-v1-5/stable-diffusion-v1-5`, or
    a local single-file checkpoint as it is (`sdjax.weights.single_file` reads those). weights=False fetches only
    the configs, tokenizers and scheduler of a hub id (what `config=` of a single file needs)."""
    path = Path(path_or_hub_id).expanduser()
    if path.exists():
        return path
    text = str(path_or_hub_id)
    looks_like_a_file = text.endswith(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)
    if text.count("/") != 1 or text.startswith((".", "/", "~")) or looks_like_a_file:
        raise MissingComponentError(f"{text}: no such file or folder, and not a hub id of the form 'owner/name'")
    return _download(text, variant, weights)


def _download(repo_id: str, variant: str | None, weights: bool = True) -> Path:
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    suffix = f".{variant}" if variant else ""
    patterns = [p.format(v=suffix) for p in _HUB_PATTERNS if weights or "safetensors" not in p]
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
        raise OfflineError(
            f"hub id {repo_id!r} is not in the local cache and the hub cannot be reached "
            f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}). Download it once while online, or "
            f"pass a local diffusers folder.") from err
