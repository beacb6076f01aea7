"""Hostile-but-fair inputs and faults, as one catalogue through the API, the CLI, loading and training.

Every case must end in an `sdjax.errors` exception (or, for the commands, exit status 2 or 1 and one error line)
whose message names the argument, file or key at fault; never in a traceback from inside a dependency. Each
case runs in a fresh folder holding a file written before it: that file must be unchanged afterwards, and no
half-written (`*.partial`) file may be left. Cases that need a trained run or a compile live with their
feature's tests (resume after a damaged checkpoint: tests/train/test_checkpoint.py; NaN weights:
tests/test_pipeline.py); this module keeps to what fails before any program runs, so it stays fast.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sdjax
from sdjax import cli
from sdjax.errors import DiskFullError, SdjaxError
from sdjax.train import cli as train_cli
from tests.train.synthetic import write_synthetic_dataset

TINY_TRAIN = Path(__file__).resolve().parents[1] / "experiments" / "train_tiny" / "config.py"


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    run: Callable  # (context, tmp_path) -> None; raises, or returns a command's (status, stderr)
    match: str     # regex the message must contain (names the argument, file or key)


@dataclasses.dataclass
class Context:
    pipe: sdjax.Pipeline
    folder: Path  # the tiny SD1 model folder (never modified: cases copy it)


def copied_model(context, tmp: Path) -> Path:
    target = tmp / "model"
    shutil.copytree(context.folder, target)
    return target


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def damaged(context, tmp, damage) -> None:
    """Load a copy of the model after `damage(folder)`."""
    folder = copied_model(context, tmp)
    damage(folder)
    sdjax.load_pipeline(folder)


def image(tmp: Path, size=(16, 16), name="image.png") -> Path:
    Image.fromarray(np.zeros((*size, 3), np.uint8)).save(tmp / name)
    return tmp / name


def generate(**settings):
    return lambda c, t: c.pipe.generate(**{"prompt": "a cat", "steps": 2, **settings})


def command(*args, model=True):
    """`sdjax ARGS --model TINY --out TMP/out.png` run in this process: (exit status, stderr)."""
    def run(context, tmp):
        argv = [a.format(tmp=tmp) for a in args]
        argv += ["--model", str(context.folder)] if model else []
        argv += [] if "--out" in argv or not model else ["--out", str(tmp / "out.png")]
        try:
            return cli.main(argv)
        except SystemExit as exit:  # argparse's own refusal: usage and one error line, status 2
            return exit.code
    return run


def train(*overrides, config=None, data=True):
    """`sdjax train CONFIG --workdir TMP/run --set ...` in this process, on the tiny model and a small dataset."""
    def run(context, tmp):
        folder = write_synthetic_dataset(tmp / "data", count=4) if data else tmp / "data"
        argv = [str(config(tmp) if config else TINY_TRAIN), "--workdir", str(tmp / "run"), "--no-compile-cache",
                "--set", f"model.pretrained={context.folder}", "--set", f"data.folder={folder}",
                "--set", "num_steps=1", "--set", "data.resolution=16"]
        for override in overrides:
            argv += ["--set", override.format(tmp=tmp)]
        return train_cli.main(argv)
    return run


def written(tmp: Path, name: str, text: str) -> Path:
    (tmp / name).write_text(text)
    return tmp / name


TRAVERSAL = json.dumps({"file_name": "../../etc/passwd", "text": "x"})


def metadata(tmp: Path, line: str) -> Path:
    folder = write_synthetic_dataset(tmp / "data_bad", count=2)
    (folder / "metadata.jsonl").write_text(line + "\n")
    return folder


API = [
    Case("prompt None", generate(prompt=None), "prompt must be a string"),
    Case("prompt int", generate(prompt=5), "prompt must be a string"),
    Case("prompt empty list", generate(prompt=[]), "prompt must be a string or a non-empty list"),
    Case("prompt list with int", generate(prompt=["a", 3]), "prompt must be a string"),
    Case("negative int", generate(negative_prompt=5), "negative_prompt must be a string"),
    Case("negatives count", generate(prompt=["a", "b"], negative_prompt=["x", "y", "z"]),
         "negative_prompt has 3 entries for 2 prompts"),
    Case("guidance str", generate(guidance_scale="7"), "guidance_scale must be a finite number, got '7'"),
    Case("guidance nan", generate(guidance_scale=float("nan")), "guidance_scale must be a finite number"),
    Case("guidance inf", generate(guidance_scale=float("inf")), "guidance_scale must be a finite number"),
    Case("guidance bool", generate(guidance_scale=True), "guidance_scale must be a finite number"),
    Case("rescale inf", generate(guidance_rescale=float("inf")), "guidance_rescale must be a finite number"),
    Case("steps 0", generate(steps=0), "steps must be a positive integer"),
    Case("steps str", generate(steps="2"), "steps must be a positive integer"),
    Case("steps float", generate(steps=2.5), "steps must be a positive integer"),
    Case("seed negative", generate(seed=-1), "seed -1 is outside sdjax's seed range"),
    Case("seed 2**32", generate(seed=2**32), "seed 4294967296 is outside .* 0 <= seed < 2\\*\\*32"),
    Case("seed 2**70", generate(seed=2**70), "outside sdjax's seed range"),
    Case("seed float", generate(seed=1.5), "seed 1.5 is outside"),
    Case("seed bool", generate(seed=True), "seed True is outside"),
    Case("seed + i overflows", generate(seed=2**32 - 1, num_images=2), "seed \\+ i must stay below"),
    Case("seeds count", generate(seeds=[1, 2], prompt=["a", "b", "c"]), "seeds has 2 entries for 3 images"),
    Case("num_images 0", generate(num_images=0), "num_images must be a positive integer"),
    Case("num_images str", generate(num_images="2"), "num_images must be a positive integer"),
    Case("height odd", generate(height=33), "height=33 must be a positive multiple of the VAE factor"),
    Case("width negative", generate(width=-8), "width=-8 must be a positive multiple"),
    Case("height str", generate(height="32"), "height='32' must be a positive multiple"),
    Case("sampler misspelt", generate(sampler="eulr"), "unknown sampler 'eulr'. Did you mean 'euler'"),
    Case("sampler int", generate(sampler=5), "unknown sampler 5"),
    Case("sampler internal", generate(sampler="dpmpp_singlestep"), "reproduces diffusers scheduler configs only"),
    Case("schedule misspelt", generate(schedule="karas"), "karas"),
    Case("latents nan", generate(latents=np.full((1, 16, 16, 4), np.nan, np.float32)), "latents/noise hold NaN"),
    Case("latents shape", generate(latents=np.zeros((1, 16, 16, 3), np.float32)), "latents/noise must have shape"),
    Case("latents ndim", generate(latents=np.zeros((16, 16), np.float32)), "latents must be \\(N, h, w, c\\)"),
    Case("clip_skip too deep", generate(clip_skip=99), "clip_skip=99"),
    Case("prompt syntax", generate(prompt_syntax="comfy"), "comfy"),
    Case("strength above 1", lambda c, t: c.pipe.img2img(np.zeros((1, 32, 32, 3), np.uint8), "a", strength=1.5,
                                                         steps=2), "strength must be within \\[0, 1\\], got 1.5"),
    Case("strength leaves no step", lambda c, t: c.pipe.img2img(np.zeros((1, 32, 32, 3), np.uint8), "a",
                                                                strength=0.1, steps=2), "leaves no step to run"),
    Case("img2img nan pixels", lambda c, t: c.pipe.img2img(np.full((1, 32, 32, 3), np.nan, np.float32), "a",
                                                           steps=2), "NaN"),
    Case("img2img float out of range", lambda c, t: c.pipe.img2img(np.full((1, 32, 32, 3), 3.0, np.float32), "a",
                                                                   steps=2), "\\[0, 1\\]"),
    Case("img2img size", lambda c, t: c.pipe.img2img(np.zeros((1, 33, 32, 3), np.uint8), "a", steps=2),
         "multiple of the VAE factor"),
    Case("inpaint mask size", lambda c, t: c.pipe.inpaint(np.zeros((1, 32, 32, 3), np.uint8),
                                                          np.zeros((1, 16, 32), np.uint8), "a", steps=2), "mask"),
    Case("encode_image path missing", lambda c, t: c.pipe.encode_image(t / "missing.png"), "missing.png"),
]

LOADING = [
    Case("model folder missing", lambda c, t: sdjax.load_pipeline(t / "nowhere"), "nowhere"),
    Case("model path is a file", lambda c, t: sdjax.load_pipeline(written(t, "model.txt", "x")), "model.txt"),
    Case("no model_index.json", lambda c, t: damaged(c, t, lambda f: (f / "model_index.json").unlink()),
         "model_index.json is missing"),
    Case("component not listed", lambda c, t: damaged(
        c, t, lambda f: edit_json(f / "model_index.json", vae=[None, None])), "component 'vae' is not listed"),
    Case("component folder missing", lambda c, t: damaged(c, t, lambda f: shutil.rmtree(f / "vae")),
         "component folder vae/ is missing"),
    Case("config invalid JSON", lambda c, t: damaged(c, t, lambda f: (f / "unet" / "config.json").write_text("{")),
         "unet/config.json: not valid JSON"),
    Case("config wrong type", lambda c, t: damaged(
        c, t, lambda f: edit_json(f / "unet" / "config.json", block_out_channels="abc")),
         "'block_out_channels' = 'abc' should be a list of integers"),
    Case("config unknown key", lambda c, t: damaged(
        c, t, lambda f: edit_json(f / "unet" / "config.json", block_out_channel=[32, 64])),
         "unknown key 'block_out_channel'"),
    Case("config unsupported feature", lambda c, t: damaged(
        c, t, lambda f: edit_json(f / "unet" / "config.json", class_embed_type="timestep")),
         "'class_embed_type' = 'timestep' turns on a feature"),
    Case("config of another class", lambda c, t: damaged(
        c, t, lambda f: edit_json(f / "vae" / "config.json", _class_name="UNet2DConditionModel")),
         "component 'vae' is a UNet2DConditionModel"),
    Case("groups do not divide", lambda c, t: damaged(
        c, t, lambda f: edit_json(f / "unet" / "config.json", norm_num_groups=7)), "norm_num_groups"),
    Case("weights truncated", lambda c, t: damaged(c, t, lambda f: _truncate(f / "vae")), "vae"),
    Case("weights missing", lambda c, t: damaged(c, t, lambda f: _remove_weights(f / "text_encoder")),
         "text_encoder"),
    Case("pickle weights only", lambda c, t: damaged(c, t, lambda f: _pickle_only(f / "unet")), "pickle"),
    Case("tokenizer empty", lambda c, t: damaged(
        c, t, lambda f: [p.unlink() for p in (f / "tokenizer").iterdir()]), "tokenizer has neither tokenizer.json nor vocab.json"),
    Case("scheduler config invalid", lambda c, t: damaged(
        c, t, lambda f: (f / "scheduler" / "scheduler_config.json").write_text("[]")), "expected a JSON object"),
    Case("weights hold NaN", lambda c, t: sdjax.load_pipeline(_poison(copied_model(c, t)), check_finite=True),
         "vae/diffusion_pytorch_model.safetensors: 1 tensor\\(s\\) hold NaN or inf, e.g. decoder.conv_out.bias"),
    Case("devices empty", lambda c, t: sdjax.load_pipeline(c.folder, devices=[]), "devices=\\[\\] lists no device"),
    Case("dtype unknown", lambda c, t: sdjax.load_pipeline(c.folder, dtype="float8"), "dtype='float8'"),
]


def _poison(folder: Path) -> Path:
    """`folder` with a NaN in its VAE decoder's weights."""
    from safetensors.numpy import load_file, save_file
    path = _weights(folder / "vae")
    state = load_file(path)
    state["decoder.conv_out.bias"][0] = np.nan
    save_file(state, path)
    return folder


def _weights(component: Path) -> Path:
    return next(component.glob("*.safetensors"))


def _truncate(component: Path) -> None:
    path = _weights(component)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _remove_weights(component: Path) -> None:
    _weights(component).unlink()


def _pickle_only(component: Path) -> None:
    path = _weights(component)
    path.rename(path.with_suffix(".bin"))


COMMANDS = [
    Case("cli size", command("generate", "x", "--size", "17x16"), "width=17 must be a positive multiple"),
    Case("cli sampler", command("generate", "x", "--sampler", "eulr"), "unknown sampler 'eulr'"),
    Case("cli seed backwards", command("generate", "x", "--seed", "5-3"), "runs backwards"),
    Case("cli seeds vs -n", command("generate", "x", "--seed", "1,2", "-n", "3"), "--seed gives 2 seeds"),
    Case("cli no prompt", command("generate"), "give a prompt"),
    Case("cli out folder missing", command("generate", "x", "--out", "{tmp}/missing/out.png"),
         "missing does not exist; create it first"),
    Case("cli out under a file", command("generate", "x", "--out", "{tmp}/before.txt/out.png"),
         "before.txt is a file, not a folder"),
    Case("cli image missing", command("img2img", "x", "--image", "{tmp}/none.png"), "none.png"),
    Case("cli image not an image", lambda c, t: command("img2img", "x", "--image", str(written(t, "x.png", "no")))(
        c, t), "x.png"),
    Case("cli strength", lambda c, t: command("img2img", "x", "--image", str(image(t)), "--strength", "1.5")(c, t),
         "must be within \\[0, 1\\], got 1.5"),
    Case("cli mask size", lambda c, t: command("inpaint", "x", "--image", str(image(t)), "--mask",
                                               str(image(t, (8, 16), "mask.png")))(c, t), "same size"),
    Case("cli from-png without parameters", lambda c, t: command("generate", "--from-png", str(image(t)))(c, t),
         "carries no generation parameters"),
    Case("cli controlnet folder", lambda c, t: command("controlnet", "x", "--controlnet", str(t),
                                                       "--control-image", str(image(t)))(c, t),
         "not a diffusers ControlNet folder"),
    Case("cli weights hold NaN", lambda c, t: _poisoned_command(c, t), "hold NaN or inf, e.g. decoder.conv_out.bias"),
    Case("cli convert onto a file", command("convert", "{tmp}/before.txt", "{tmp}/out", model=False), "before.txt"),
]

def _poisoned_command(context, tmp):
    """`sdjax generate` on a copy of the model with a NaN weight (the CLI checks weights as it loads them)."""
    _poison(copied_model(context, tmp))
    return cli.main(["generate", "x", "--model", str(tmp / "model"), "--out", str(tmp / "out.png")])


TRAINING = [
    Case("train unknown key", train("optimizer.learning_rat=1e-3"), "learning_rat"),
    Case("train wrong type", train("batch_size=four"), "batch_size"),
    Case("train batch 0", train("batch_size=0"), "batch_size"),
    Case("train stage", train("stage=vea"), "stage"),
    Case("train config missing", train(config=lambda t: t / "none.py"), "none.py"),
    Case("train config invalid JSON", train(config=lambda t: written(t, "c.json", "{")), "c.json"),
    Case("train get_config raises", train(config=lambda t: written(
        t, "exp.py", "def get_config():\n    raise RuntimeError('boom')\n")), "exp.py"),
    Case("train data missing", train(data=False), "data.folder .* does not exist"),
    Case("train metadata traversal", lambda c, t: train("data.folder=" + str(metadata(t, TRAVERSAL)))(c, t),
         "'../../etc/passwd' is not a path inside"),
    Case("train metadata line", lambda c, t: train("data.folder=" + str(metadata(t, "{oops")))(c, t),
         "metadata.jsonl:1: expected a JSON object"),
    Case("train workdir is a file", lambda c, t: train()(c, _workdir_is_file(t)), "run"),
    Case("train loss mask on vae", train("stage=vae", "data.loss_mask=true"), "stage vae does not use it"),
    Case("train normalize without masks", train("diffusion.normalize_loss_mask=true"), "normalize_loss_mask"),
    Case("train mesh", train("mesh=data=3"), "mesh"),
    Case("train process id", lambda c, t: train_cli.main(["x.py", "--workdir", str(t), "--coordinator",
                                                         "localhost:1", "--num-processes", "2", "--process-id", "2"]),
         "process_id=2 must be in \\[0, 2\\)"),
    Case("train coordinator", lambda c, t: train_cli.main(["x.py", "--workdir", str(t), "--coordinator", "nowhere",
                                                          "--num-processes", "2", "--process-id", "0"]),
         "coordinator 'nowhere' must be HOST:PORT"),
]


def _workdir_is_file(tmp: Path) -> Path:
    (tmp / "run").write_text("not a folder")
    return tmp


CATALOGUE = API + LOADING + COMMANDS + TRAINING


@pytest.fixture(scope="module")
def context(sd1_folder):
    folder, _ = sd1_folder
    return Context(sdjax.load_pipeline(folder), folder)


def test_the_catalogue_is_large_enough():
    assert len(CATALOGUE) >= 60 and len({case.id for case in CATALOGUE}) == len(CATALOGUE)


@pytest.mark.parametrize("case", CATALOGUE, ids=[case.id for case in CATALOGUE])
def test_bad_input_gets_a_clear_error_and_damages_nothing(case, context, tmp_path, capsys):
    (tmp_path / "before.txt").write_text("written before")
    try:
        outcome = case.run(context, tmp_path)
    except SdjaxError as error:
        message = str(error)
    else:
        status, stderr = outcome, capsys.readouterr().err
        assert status in (1, 2), f"{case.id}: no error (exit status {status})"
        assert "Traceback" not in stderr
        message = stderr
    assert re.search(case.match, message), f"{case.id}: {message!r} does not match {case.match!r}"
    assert (tmp_path / "before.txt").read_text() == "written before"
    assert not list(tmp_path.rglob("*.partial"))


def test_a_full_disk_while_logging_metrics_is_one_sdjax_error(tmp_path, monkeypatch):
    from sdjax.train.metrics import MetricsLog

    log = MetricsLog(tmp_path, every=1, start_step=0, total_steps=2)
    log.add(1, {"loss": np.float32(0.5)})

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(log, "_file", type("Full", (), {"write": full, "flush": full, "close": full})())
    with pytest.raises(DiskFullError, match="no room to write .*metrics.jsonl \\(step 2\\).*rerun the same command"):
        log.add(2, {"loss": np.float32(0.4)})
    log.close()  # the file's own close fails too: logged, not raised
