"""A1111's "parameters" text: written with A1111's names, parsed by A1111's rules, and turned back into
generate() settings."""
import pytest

from sdjax import a1111
from sdjax.errors import InvalidArgumentError
from sdjax.samplers import SAMPLERS
from sdjax.schedules import SCHEDULES

# As A1111 1.10 writes them (a multi-line prompt, quoted values, keys sdjax does not use).
A1111_TEXT = """masterpiece, a cat
on a sofa
Negative prompt: blurry, lowres
ugly
Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234, Size: 512x768, \
Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.55, Clip skip: 2, \
Lora hashes: "add_detail: 7c6bad76eb54, more: 1", Version: v1.10.1"""


def test_an_a1111_text_parses_to_its_settings():  # its prompt is in A1111's syntax: (emphasis), long prompts
    prompt, negative, settings = a1111.parse_parameters(A1111_TEXT)
    assert prompt == "masterpiece, a cat\non a sofa" and negative == "blurry, lowres\nugly"
    assert settings["Lora hashes"] == "add_detail: 7c6bad76eb54, more: 1" and settings["Version"] == "v1.10.1"
    assert a1111.generation_settings(settings) == {
        "steps": 28, "seed": 1234, "sampler": "dpmpp_2m", "schedule": "karras", "guidance_scale": 6.5,
        "clip_skip": 2, "width": 512, "height": 768, "strength": 0.55, "prompt_syntax": "a1111"}


def test_a_text_without_settings_is_all_prompt():
    assert a1111.parse_parameters("just a prompt, with: a colon") == ("just a prompt, with: a colon", "", {})


def test_what_sdjax_writes_reads_back_the_same():
    settings = {"Steps": 20, "Sampler": "Euler a", "Schedule type": "Automatic", "CFG scale": "3", "Seed": 7,
                "Size": "64x64", "Model": "my, model: v2", "Prompt syntax": "diffusers"}
    text = a1111.format_parameters("a red circle", "", settings)
    prompt, negative, parsed = a1111.parse_parameters(text)
    assert (prompt, negative) == ("a red circle", "") and parsed == {k: str(v) for k, v in settings.items()}
    # Automatic: the model's scheduler config chooses, so neither a sampler nor a schedule is forced.
    assert a1111.generation_settings(parsed) == {"steps": 20, "seed": 7, "guidance_scale": 3.0, "width": 64,
                                                 "height": 64, "prompt_syntax": "diffusers"}


def test_every_named_sampler_and_schedule_exists_and_names_are_unique():
    assert set(a1111.SAMPLER_NAMES) <= set(SAMPLERS) and set(a1111.SCHEDULE_NAMES) <= set(SCHEDULES)
    for table in (a1111.SAMPLER_NAMES, a1111.SCHEDULE_NAMES):
        assert len(set(table.values())) == len(table)


def test_unknown_names_and_incomplete_texts_are_refused():
    with pytest.raises(InvalidArgumentError, match="Sampler 'Restart' has no sdjax equivalent"):
        a1111.generation_settings({"Steps": "20", "Seed": "1", "Sampler": "Restart", "Schedule type": "Karras"})
    with pytest.raises(InvalidArgumentError, match="no 'Seed'"):
        a1111.generation_settings({"Steps": "20", "Sampler": "Euler", "CFG scale": "7"})
