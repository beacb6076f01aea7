"""The "parameters" text that AUTOMATIC1111's web UI writes into its PNGs, which A1111, ComfyUI, Civitai and image
viewers read back: written with A1111's names for samplers and schedules, and parsed by A1111's rules, so that
`sdjax generate --from-png` re-runs the settings a PNG carries.

The format: the prompt (one or more lines), optionally "Negative prompt: ..." (one or more lines), then one line
of "Key: value" pairs separated by ", " (Steps, Sampler, Schedule type, CFG scale, Seed, Size, ...). A value
holding a comma, colon or quote is written as a JSON string, as A1111 quotes it.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping

from sdjax.errors import InvalidArgumentError

# sdjax sampler -> A1111's name (A1111 1.10); samplers A1111 lacks keep their sdjax name.
SAMPLER_NAMES = {
    "euler": "Euler", "euler_ancestral": "Euler a", "heun": "Heun", "dpm_2": "DPM2", "dpm_2_ancestral": "DPM2 a",
    "lms": "LMS", "dpm_adaptive": "DPM adaptive", "dpmpp_2s_ancestral": "DPM++ 2S a", "dpmpp_sde": "DPM++ SDE",
    "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_sde": "DPM++ 2M SDE", "dpmpp_3m_sde": "DPM++ 3M SDE", "ddim": "DDIM",
    "plms": "PLMS", "unipc": "UniPC", "lcm": "LCM", "ddpm": "DDPM", "ipndm": "iPNDM", "deis": "DEIS",
    "res_multistep": "Res Multistep",
}
# sdjax schedule -> A1111's "Schedule type". "Automatic" is A1111's "the sampler's own": for sdjax, the model
# folder's scheduler config decides the sampler's grid.
SCHEDULE_NAMES = {
    "karras": "Karras", "exponential": "Exponential", "polyexponential": "Polyexponential",
    "sgm_uniform": "SGM Uniform", "simple": "Simple", "normal": "Normal", "ddim_uniform": "DDIM", "beta": "Beta",
    "leading": "Leading", "trailing": "Trailing", "linspace": "Linspace", "vp": "VP",
}
AUTOMATIC = "Automatic"

_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # A1111's key: value pattern


def _quoted(value) -> str:
    text = str(value)
    return json.dumps(text) if any(c in text for c in ',:"\n') else text


def format_parameters(prompt: str, negative_prompt: str | None, settings: Mapping[str, object]) -> str:
    """The parameters text: prompt, "Negative prompt: ...", then the settings (None values are left out)."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{key}: {_quoted(value)}" for key, value in settings.items() if value is not None))
    return "\n".join(lines)


def parse_parameters(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, {key: value}) by A1111's rules: the last line holds the settings when it has at
    least three "key: value" pairs; the lines before it are the prompt, then the negative prompt from the line
    starting with "Negative prompt:"."""
    *lines, last = text.strip().split("\n")
    pairs = _PAIR.findall(last)
    if len(pairs) < 3:
        lines.append(last)
        pairs = []
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.strip().startswith("Negative prompt:"):
            in_negative, line = True, line.strip()[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    settings = {key.strip(): json.loads(value) if value.startswith('"') else value.strip() for key, value in pairs}
    return "\n".join(prompt).strip(), "\n".join(negative).strip(), settings


def _sdjax_name(table: Mapping[str, str], name: str, what: str) -> str:
    by_a1111 = {a1111: ours for ours, a1111 in table.items()}
    if name in by_a1111:
        return by_a1111[name]
    if name in table:  # an sdjax name, as written for samplers A1111 lacks
        return name
    raise InvalidArgumentError(f"{what} {name!r} has no sdjax equivalent; known: {', '.join(sorted(by_a1111))}")


def generation_settings(settings: Mapping[str, str]) -> dict:
    """`Pipeline.generate` keyword arguments (and, under "strength", the denoising strength) from parsed
    settings. Unknown keys (Model hash, Version, ...) are ignored; a missing Seed or Steps is an error."""
    for key in ("Steps", "Seed"):
        if key not in settings:
            raise InvalidArgumentError(f"the parameters have no {key!r}: not a complete A1111 parameters text")
    result = {"steps": int(settings["Steps"]), "seed": int(settings["Seed"])}
    sampler, schedule = settings.get("Sampler"), settings.get("Schedule type", AUTOMATIC)
    if schedule != AUTOMATIC:
        result["schedule"] = _sdjax_name(SCHEDULE_NAMES, schedule, "Schedule type")
    if sampler is not None and schedule != AUTOMATIC:
        result["sampler"] = _sdjax_name(SAMPLER_NAMES, sampler, "Sampler")
    if "CFG scale" in settings:
        result["guidance_scale"] = float(settings["CFG scale"])
    if "Guidance rescale" in settings:
        result["guidance_rescale"] = float(settings["Guidance rescale"])
    if "Clip skip" in settings:
        result["clip_skip"] = int(settings["Clip skip"])
    # A1111's own PNGs do not say: their prompts are written in its syntax
    result["prompt_syntax"] = settings.get("Prompt syntax", "a1111")
    if "Size" in settings:
        result["width"], result["height"] = (int(v) for v in settings["Size"].lower().split("x"))
    if "Denoising strength" in settings:
        result["strength"] = float(settings["Denoising strength"])
    return result
