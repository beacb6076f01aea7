"""`sdjax generate --refiner`: the SDXL base hands its partly denoised latents to a refiner (diffusers' ensemble of
expert denoisers), run in-process on the tiny SDXL base and refiner folders of tests/fixtures.py."""
import json
import shutil

import numpy as np
import pytest

from sdjax import cli, images
from tests import fixtures

PROMPT, NEGATIVE = "an astronaut riding a horse on the moon", "blurry"


@pytest.fixture(scope="module")
def sdxl_folders(tmp_path_factory):
    """(base folder, refiner folder): the base has SDXL's Euler scheduler, the refiner DPM-Solver++."""
    root = tmp_path_factory.mktemp("sdxl_cli")
    fixtures.save_sdxl_folders(root / "base", root / "refiner")
    return root / "base", root / "refiner"


def test_generate_with_refiner_writes_the_images_of_base_then_refiner(sdxl_folders, loaded_once, tmp_path):
    base_folder, refiner_folder = sdxl_folders
    steps, fraction = 5, 0.6
    command = ["generate", PROMPT, "--negative-prompt", NEGATIVE, "--model", str(base_folder), "--steps", str(steps),
               "--guidance-scale", "5", "--size", "16x16", "--seed", "3", "-n", "2", "--no-compile-cache",
               "--no-progress"]
    refining = ["--refiner", str(refiner_folder), "--high-noise-fraction", str(fraction)]
    # the fixture's base (Euler) and refiner (DPM-Solver++) keep their latents in different scalings
    with pytest.warns(UserWarning, match="--refiner reads them in another scaling"):
        assert cli.main([*command, *refining, "--out", str(tmp_path)]) == 0
    base, refiner = loaded_once.values()  # loaded in this order, the base's memory released before the refiner's

    settings = dict(steps=steps, guidance_scale=5.0, seed=3, num_images=2)
    stage_1 = base.generate(PROMPT, NEGATIVE, height=16, width=16, denoising_end=fraction, **settings)
    final = refiner.img2img(stage_1.latents, PROMPT, NEGATIVE, denoising_start=fraction, **settings)
    assert (stage_1.settings["steps"], final.settings["steps"]) == (3, 2)  # the cut of 5 steps at timestep 400
    paths = [tmp_path / "00000-3.png", tmp_path / "00001-4.png"]
    written = np.stack([images.load_image(path) for path in paths])
    assert np.abs(written.astype(int) - final.images.astype(int)).max() <= 1
    assert np.abs(written.astype(int) - stage_1.images.astype(int)).max() > 10  # the refined images, not the base's
    text = images.read_parameters(paths[1])
    assert "Steps: 5, Sampler: Euler, Schedule type: Automatic, CFG scale: 5, Seed: 4, Size: 16x16" in text
    assert "Model: base" in text and "Refiner: refiner, Refiner switch at: 0.6" in text

    # --from-png takes the switch back (and the rest; -n and --refiner come from the command line, as --model)
    again = tmp_path / "again"
    again.mkdir()
    with pytest.warns(UserWarning, match="another scaling"):
        assert cli.main(["generate", "--from-png", str(paths[0]), "-n", "2", "--model", str(base_folder),
                         "--refiner", str(refiner_folder), "--no-compile-cache", "--no-progress",
                         "--out", str(again)]) == 0
    np.testing.assert_array_equal(np.stack([images.load_image(again / path.name) for path in paths]), written)


def test_no_negative_prompt_guides_an_sdxl_base_from_zeros_as_diffusers(sdxl_folders, loaded_once, tmp_path):
    """Without --negative-prompt the library gets None, so the folder's force_zeros_for_empty_prompt applies (as
    in diffusers' default call); an explicit empty prompt is encoded like any other."""
    base_folder, _ = sdxl_folders
    assert cli.main(["generate", PROMPT, "--model", str(base_folder), "--steps", "2", "--size", "16x16", "--seed", "0",
                     "--no-compile-cache", "--no-progress", "--out", str(tmp_path / "a.png")]) == 0
    (base,) = loaded_once.values()
    written = images.load_image(tmp_path / "a.png")
    zeros, empty = (base.generate(PROMPT, negative, steps=2, height=16, width=16, seed=0).images[0]
                    for negative in (None, ""))
    assert np.abs(written.astype(int) - zeros.astype(int)).max() <= 1
    assert np.abs(written.astype(int) - empty.astype(int)).max() > 1


def folder_copy(folder, tmp_path, name, edit):
    """A copy of `folder` with edit(config dict) applied to the JSON file `name` inside it."""
    copy = tmp_path / f"{folder.name}-copy"
    shutil.copytree(folder, copy)
    config = json.loads((copy / name).read_text())
    edit(config)
    (copy / name).write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize("case", ["fraction without refiner", "fraction 1", "fraction 0", "sampler", "schedule",
                                  "base is SD", "base is a refiner", "refiner is SD", "refiner is no model",
                                  "refiner is missing",
                                  "no base step", "no refiner step", "refiner scheduler class", "other latents"])
def test_bad_refiner_arguments_fail_before_any_model_loads(case, sdxl_folders, sd1_folder, tmp_path, monkeypatch,
                                                           capsys):
    from sdjax import pipeline as pipeline_module

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(pipeline_module, "load_pipeline", no_loading)
    base, refiner, sd1 = (str(path) for path in (*sdxl_folders, sd1_folder[0]))
    (tmp_path / "empty").mkdir()
    heun = lambda config: config.update(_class_name="HeunDiscreteScheduler")
    wide = lambda config: config.update(latent_channels=8)
    args, message = {
        "fraction without refiner": (["--model", base, "--high-noise-fraction", "0.7"],
                                     "--high-noise-fraction is the share of the schedule --model runs before "
                                     "--refiner takes over; give --refiner too"),
        "fraction 1": (["--model", base, "--refiner", refiner, "--high-noise-fraction", "1"],
                       "--high-noise-fraction must be strictly between 0 and 1 (the share of the schedule --model "
                       "runs before --refiner takes over), got 1"),
        "fraction 0": (["--model", base, "--refiner", refiner, "--high-noise-fraction", "0"],
                       "must be strictly between 0 and 1"),
        "sampler": (["--model", base, "--refiner", refiner, "--sampler", "euler"],
                    "--sampler cannot be used with --refiner"),
        "schedule": (["--model", base, "--refiner", refiner, "--schedule", "karras"],
                     "--schedule cannot be used with --refiner"),
        "base is SD": (["--model", sd1, "--refiner", refiner],
                       f"--model {sd1} is a Stable Diffusion 1.x / 2.x model, not SDXL; --refiner continues an "
                       f"SDXL base's latents"),
        "base is a refiner": (["--model", refiner, "--refiner", base],
                              f"--model {refiner} is an SDXL refiner (text_encoder_2 only); the base starts the "
                              f"image: give the SDXL base as --model and this model as --refiner"),
        "refiner is SD": (["--model", base, "--refiner", sd1],
                          f"--refiner {sd1} is a Stable Diffusion 1.x / 2.x model, not SDXL"),
        "refiner is no model": (["--model", base, "--refiner", str(tmp_path / "empty")],
                                f"--refiner {tmp_path / 'empty'}: {tmp_path / 'empty'} is not a diffusers pipeline "
                                f"folder: model_index.json is missing"),
        "refiner is missing": (["--model", base, "--refiner", str(tmp_path / "missing")],
                               f"--refiner: {tmp_path / 'missing'}: no such file or folder"),
        "no base step": (["--model", base, "--refiner", refiner, "--steps", "5", "--high-noise-fraction", "0.1"],
                         f"--model {base} (--high-noise-fraction 0.1 is its denoising_end): denoising_end=0.1 with "
                         f"steps=5 leaves no step to run"),
        "no refiner step": (["--model", base, "--refiner", refiner, "--steps", "5", "--high-noise-fraction", "0.9"],
                            f"--refiner {refiner} (--high-noise-fraction 0.9 is its denoising_start): "
                            f"denoising_start=0.9 with steps=5 leaves no step to run"),
        "refiner scheduler class": (["--model", base, "--refiner", "{heun}"],
                                    "scheduler/scheduler_config.json is of class 'HeunDiscreteScheduler', but the "
                                    "hand-over cuts the schedule at diffusers' timesteps"),
        "other latents": (["--model", base, "--refiner", "{wide}"],
                          "has latents of 8 channels at 1/2 of the image size, --model "),
    }[case]
    if "{heun}" in args:
        args[args.index("{heun}")] = str(folder_copy(sdxl_folders[1], tmp_path, "scheduler/scheduler_config.json",
                                                     heun))
    if "{wide}" in args:
        args[args.index("{wide}")] = str(folder_copy(sdxl_folders[1], tmp_path, "vae/config.json", wide))
    out = tmp_path / "out"
    out.mkdir()
    assert cli.main(["generate", "a cat", *args, "--out", str(out), "--no-compile-cache"]) == 2
    error = capsys.readouterr().err
    assert message in error, error
    assert list(out.iterdir()) == []


def test_help_documents_the_refiner_options_on_generate_only():
    commands = cli.build_parser()._subparsers._group_actions[0].choices
    text = " ".join(commands["generate"].format_help().split())
    assert "--refiner FOLDER_OR_HUB_ID" in text and "--high-noise-fraction FRACTION" in text
    assert "(default 0.8, as in diffusers' docs)" in text and "--refiner stabilityai/stable-diffusion-xl-refiner" in text
    assert "--refiner" not in commands["img2img"].format_help()


def test_from_png_of_a_refined_image_says_that_a_refiner_finished_it(tmp_path):
    text = ("a cat\nSteps: 5, Sampler: Euler, Schedule type: Automatic, CFG scale: 5, Seed: 4, Size: 16x16, "
            "Model: base, Refiner: refiner, Refiner switch at: 0.6")
    images.save_png(tmp_path / "refined.png", np.zeros((16, 16, 3), np.uint8), text)
    plain = cli.build_parser().parse_args(["generate", "--from-png", str(tmp_path / "refined.png")])
    with pytest.warns(UserWarning, match=r"finished by a refiner \(refiner, switch at 0.6\); give --refiner"):
        cli.apply_png_settings(plain)
    refined = cli.build_parser().parse_args(["generate", "--from-png", str(tmp_path / "refined.png"),
                                             "--refiner", "r"])
    cli.apply_png_settings(refined)
    assert (refined.high_noise_fraction, refined.seed, refined.steps) == (0.6, [4], 5)
    given = cli.build_parser().parse_args(["generate", "--from-png", str(tmp_path / "refined.png"),
                                           "--refiner", "r", "--high-noise-fraction", "0.7"])
    cli.apply_png_settings(given)
    assert given.high_noise_fraction == 0.7  # the command line wins
