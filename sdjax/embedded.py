"""The model that ships inside sdjax: `load_pipeline()` and `sdjax generate` without a model use it.

It is a small latent diffusion model trained by sdjax itself on procedural images of shapes (see
experiments/shapes/): it works on a fresh machine with no download, and it only knows its own small world.
A prompt with words it never learned still gives an image, with one warning line that says so and how to
load a real checkpoint.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Sequence

EMBEDDED_MODEL = Path(__file__).resolve().parent / "assets" / "shapes"
DOMAIN = "one circle, square or triangle in red, green, blue, yellow, purple, orange, white or black on a plain " \
         "background"
GUIDANCE_SCALE = 3.0  # its best guidance scale (experiments/shapes/results); SD checkpoints' usual 7.5 oversaturates it
_WORD = re.compile(r"[a-z]+")


class OutOfDomainPromptWarning(UserWarning):
    """The prompt uses words the embedded shapes model never saw in training."""


def unknown_words(vocab: dict[str, int], prompt: str) -> list[str]:
    """The words of `prompt` that the tokenizer did not learn as whole words (CLIP marks word ends "</w>")."""
    return list(dict.fromkeys(w for w in _WORD.findall(prompt.lower()) if f"{w}</w>" not in vocab))


def warn_unknown_words(vocab: dict[str, int], prompts: Sequence[str]) -> None:
    """One warning line naming the words of `prompts` the embedded model does not know, if any."""
    unknown = list(dict.fromkeys(w for prompt in prompts for w in unknown_words(vocab, prompt)))
    if unknown:
        warnings.warn(
            f"the embedded model only knows shapes ({DOMAIN}); it never saw: {', '.join(unknown[:8])}. For other "
            f"subjects load a real checkpoint: `sdjax generate ... --model path/to/stable-diffusion-v1-5` or "
            f"`sdjax.load_pipeline(path_or_hub_id)`.", OutOfDomainPromptWarning, stacklevel=3)
