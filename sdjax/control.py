"""ControlNet conditioning for generation: load a diffusers ControlNet folder, describe how it steers a call.

    canny = sdjax.load_controlnet("path/to/controlnet-canny")
    pipeline.generate("a house", control=[sdjax.Control(canny, edges, scale=0.8, end=0.6)])

Several `Control`s add their residuals (diffusers' MultiControlNetModel). `start`/`end` are fractions of the
sampling steps during which the ControlNet acts, as diffusers' control_guidance_start/_end.
SDXL ControlNets steer SDXL pipelines in the same way (they also read the pooled prompt embedding and time ids).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from sdjax.errors import InvalidArgumentError
from sdjax.images import image_batch, to_unit_interval
from sdjax.models.components import COMPONENTS
from sdjax.models.controlnet import ControlNetConfig, ControlNetModel
from sdjax.weights import controlnet_folder


@dataclasses.dataclass(eq=False)
class ControlNet:
    """A loaded ControlNet: its config and params (a Flax param tree)."""
    config: ControlNetConfig
    params: Any
    name: str = "controlnet"


@dataclasses.dataclass(eq=False)
class Control:
    """One ControlNet's part in a call: control image(s) uint8 (N or 1, H, W, 3) at the output size (or float in
    [0, 1]), conditioning scale, and the fractions of the steps [start, end) in which it is applied."""
    controlnet: ControlNet
    image: Any
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0

    def __post_init__(self):
        if not 0.0 <= self.start < self.end <= 1.0:
            raise InvalidArgumentError(f"Control start={self.start} and end={self.end} must satisfy "
                                       f"0 <= start < end <= 1")


def load_controlnet(path: str | os.PathLike, *, dtype=jnp.float32, variant: str | None = None) -> ControlNet:
    """A ControlNet from a diffusers ControlNetModel folder (config.json + diffusion_pytorch_model.safetensors)."""
    config, params = controlnet_folder.load_controlnet(path, dtype=dtype, variant=variant)
    return ControlNet(config, params, name=os.path.basename(os.path.normpath(path)))


def control_images(controls: list[Control], count: int, height: int, width: int) -> tuple:
    """Each Control's images as float32 (count, H, W, 3) in [0, 1], checked against the output size."""
    images = []
    for k, control in enumerate(controls):
        image = image_batch(control.image, f"control image {k}")
        if image.ndim != 4 or image.shape[1:] != (height, width, 3) or image.shape[0] not in (1, count):
            raise InvalidArgumentError(
                f"control image {k} has shape {image.shape}; expected ({'1' if count == 1 else f'1 or {count}'}, "
                f"{height}, {width}, 3), the output size {width}x{height}: resize the control image to it")
        unit = to_unit_interval(image, f"control image {k}")
        images.append(jnp.asarray(np.broadcast_to(unit, (count, height, width, 3))))
    return tuple(images)


def control_model(control: Control, dtype, attention: str) -> ControlNetModel:
    return COMPONENTS["controlnet"].build(control.controlnet.config, dtype, attention)


def active_fraction(step, steps, start, end):
    """1 where step `step` of `steps` lies inside [start, end) as diffusers counts it, else 0."""
    outside = (step / steps < start) | ((step + 1) / steps > end)
    return 1.0 - outside.astype(jnp.float32)
