"""The `sdjax` command, run as a user would (a subprocess), on the tiny SD1 folder."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sdjax import cli, images

BASE = ["--steps", "2", "--sampler", "euler", "--schedule", "karras", "--size", "16x16"]


def sdjax_command(*args, env=None):
    return subprocess.run([sys.executable, "-m", "sdjax.cli", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def test_help_documents_every_option():
    parser = cli.build_parser()
    generate = parser._subparsers._group_actions[0].choices["generate"]
    text = generate.format_help()
    for action in generate._actions:
        assert action.help, f"option {action.option_strings} has no help"
        for flag in action.option_strings:
            assert flag in text
    for required in ("--negative-prompt", "--model", "--steps", "--sampler", "--schedule", "--guidance-scale",
                     "--seed", "--num-images", "--size", "--out", "--grid", "--progress", "examples:"):
        assert required in text
    assert "(default: float32)" in text and "(default: 30)" in text


def test_attention_choices_are_the_backends():
    from sdjax.models import attention
    assert cli.ATTENTION_IMPLEMENTATIONS == attention.IMPLEMENTATIONS  # named twice so that --help needs no jax


@pytest.mark.parametrize("flags", [
    ["--cfg", "5", "--negative", "dark", "-n", "3", "--rescale", "0.7"],
    ["--guidance-scale", "5", "--negative-prompt", "dark", "--num-images", "3", "--guidance-rescale", "0.7"],
    ["--cfg-scale", "5", "--negative-prompt", "dark", "--count", "3", "--guidance-rescale", "0.7"],
])
def test_diffusers_and_a1111_names_set_the_same_settings(flags):
    args = cli.build_parser().parse_args(["generate", "x", *flags])
    assert (args.guidance_scale, args.negative_prompt, args.num_images, args.guidance_rescale) == (5.0, "dark", 3, 0.7)
    assert cli.seed_arguments(args) == {"seed": 0, "num_images": 3}


@pytest.mark.parametrize("text, seeds", [("7", [7]), ("1,5,9", [1, 5, 9]), ("10-13", [10, 11, 12, 13]),
                                         ("3, 7-8", [3, 7, 8])])
def test_seed_takes_a_number_a_list_or_a_range(text, seeds):
    args = cli.build_parser().parse_args(["generate", "x", "--seed", text])
    assert args.seed == seeds
    assert cli.seed_arguments(args) == ({"seed": 7, "num_images": 1} if text == "7" else {"seeds": seeds})


@pytest.mark.parametrize("text, message", [("x", "an integer, a list"), ("5-3", "runs backwards")])
def test_bad_seeds_say_what_is_accepted(text, message):
    with pytest.raises(Exception, match=message):
        cli.seed_list(text)


def test_bare_command_prints_help_and_version_and_samplers_list(capsys):
    from sdjax import __version__, schedules
    from sdjax.samplers import SAMPLERS
    assert cli.main([]) == 0 and "generate" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out.strip() == f"sdjax {__version__}"
    assert cli.main(["samplers"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert listed == sorted(SAMPLERS) + sorted(schedules.SCHEDULES)


@pytest.mark.slow
def test_generate_writes_pngs_with_parameters_and_shows_progress(sd1_folder, tmp_path):
    result = sdjax_command("generate", "a photo of a cat", "--negative-prompt", "blurry", "--model", str(sd1_folder[0]),
                           *BASE, "--seed", "7-8", "--out", str(tmp_path), "--grid", "--progress",
                           "--no-compile-cache")
    assert result.returncode == 0, result.stderr
    assert "euler 2/2 [" in result.stderr and "compiled in" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000-7.png", "00001-8.png", "grid.png"]
    text = images.read_parameters(tmp_path / "00001-8.png")
    assert text.splitlines()[:2] == ["a photo of a cat", "Negative prompt: blurry"]
    assert "Steps: 2, Sampler: Euler, Schedule type: Karras, CFG scale: 7.5, Seed: 8, Size: 16x16" in text
    assert images.read_parameters(tmp_path / "grid.png").startswith("a photo of a cat\n")
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size == (32, 16)


@pytest.mark.slow
def test_second_run_reads_the_persistent_compilation_cache(sd1_folder, tmp_path):
    """With the progress bar: it is driven by calling the cached program once per step, not by callbacks (the run
    without the bar is one call of the same kind of program).
    The second run takes its settings from the first one's PNG (--from-png), so it also checks that they
    reproduce the image bitwise."""
    cache = tmp_path / "cache"
    common = ["--model", str(sd1_folder[0]), "--progress", "--cache-dir", str(cache)]
    first = sdjax_command("generate", "a cat", *BASE, "--seed", "5", *common, "--out", str(tmp_path / "first.png"))
    assert first.returncode == 0, first.stderr
    assert any(p.name.startswith("jit__run_program") for p in cache.iterdir())
    assert "read from the persistent compilation cache" not in first.stderr
    second = sdjax_command("generate", "--from-png", str(tmp_path / "first.png"), *common,
                           "--out", str(tmp_path / "second.png"))
    assert second.returncode == 0, second.stderr
    assert "read from the persistent compilation cache" in second.stderr
    assert "euler 2/2 [" in second.stderr
    np.testing.assert_array_equal(images.load_image(tmp_path / "first.png"), images.load_image(tmp_path / "second.png"))


def test_img2img_records_a1111_steps_strength_and_syntax_and_reruns_from_its_png(sd1_folder, tmp_path, loaded_once):
    # The rerun gets the pipeline the first run loaded, so it reuses the program compiled for the first run's
    # settings only if the PNG gave it back the same settings (what this test is about).
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8)).save(tmp_path / "start.png")
    common = ["--image", str(tmp_path / "start.png"), "--model", str(sd1_folder[0]), "--no-compile-cache"]
    assert cli.main(["img2img", "a (cat:1.3)", "--steps", "4", "--strength", "0.5", "--sampler", "dpmpp_2m",
                     "--seed", "3", "--prompt-syntax", "a1111", *common, "--out", str(tmp_path / "first.png")]) == 0
    text = images.read_parameters(tmp_path / "first.png")
    assert "Steps: 4, Sampler: DPM++ 2M, Schedule type: Normal" in text and "Denoising strength: 0.5" in text
    assert "Prompt syntax: a1111" in text
    assert cli.main(["img2img", "--from-png", str(tmp_path / "first.png"), *common,
                     "--out", str(tmp_path / "again.png")]) == 0
    np.testing.assert_array_equal(images.load_image(tmp_path / "first.png"), images.load_image(tmp_path / "again.png"))


@pytest.mark.parametrize("args, message", [
    (["generate", "x", "--size", "17x16"], "width=17 must be a positive multiple of the VAE factor 2"),
    (["generate", "x", "--sampler", "eulr"], "unknown sampler 'eulr'"),
    (["generate", "x", "--seed", "1,2", "-n", "3"], "--seed gives 2 seeds but -n/--num-images asks for 3"),
    (["generate"], "give a prompt, or --from-png"),
    (["generate", "--from-png", "{tmp}/image.png"], "the PNG carries no generation parameters"),
    (["generate", "x", "--out", "{tmp}/missing/out.png"], "{tmp}/missing does not exist; create it first"),
    (["img2img", "x", "--image", "{tmp}/image.png", "--strength", "1.5"], "must be within [0, 1], got 1.5"),
    (["inpaint", "x", "--image", "{tmp}/image.png", "--mask", "{tmp}/small.png"], "they must be the same size"),
    (["controlnet", "x", "--controlnet", "{tmp}", "--control-image", "{tmp}/image.png"],
     "not a diffusers ControlNet folder"),
])
def test_bad_arguments_fail_fast_without_output(sd1_folder, tmp_path, args, message):
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "image.png")
    Image.fromarray(np.zeros((8, 16), np.uint8)).save(tmp_path / "small.png")
    before = set(tmp_path.iterdir())
    args = [a.format(tmp=tmp_path) for a in args]
    out = [] if "--out" in args else ["--out", str(tmp_path / "out.png")]
    result = sdjax_command(*args, "--model", str(sd1_folder[0]), *out)
    assert result.returncode == 2
    assert message.format(tmp=tmp_path) in result.stderr
    assert set(tmp_path.iterdir()) == before


def test_numbered_outputs_continue_after_existing_ones(tmp_path):
    for name in ("00000-7.png", "00003-1.png", "notes.png", "shot-00002-5.png"):
        (tmp_path / name).touch()
    assert [p.name for p in cli.output_paths(str(tmp_path), [9, 10])] == ["00004-9.png", "00005-10.png"]
    assert [p.name for p in cli.output_paths(str(tmp_path / "shot.png"), [1, 2])] == ["shot-00003-1.png",
                                                                                    "shot-00004-2.png"]
    assert cli.output_paths(str(tmp_path / "one.png"), [4]) == [tmp_path / "one.png"]


def test_an_unwritable_output_folder_fails_before_loading(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")
    monkeypatch.setattr(cli.tempfile, "NamedTemporaryFile", read_only)
    with pytest.raises(cli.SdjaxError, match="cannot write into .* \\(Read-only file system\\)"):
        cli.check_output(str(tmp_path))


def test_convert_on_a_full_disk_leaves_nothing_and_can_be_rerun(sd1_folder, tmp_path, monkeypatch):
    from sdjax.pipeline import Pipeline
    save = Pipeline.save_pretrained

    def disk_full(self, folder, **kwargs):
        (folder / "unet").mkdir(parents=True)
        (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Pipeline, "save_pretrained", disk_full)
    target = tmp_path / "converted"
    assert cli.main(["convert", str(sd1_folder[0]), str(target), "--dtype", "float16"]) == 2
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(Pipeline, "save_pretrained", save)
    assert cli.main(["convert", str(sd1_folder[0]), str(target), "--dtype", "float16"]) == 0
    assert (target / "model_index.json").is_file() and [p.name for p in tmp_path.iterdir()] == ["converted"]
