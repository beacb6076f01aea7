"""The README's code blocks run as written, with the tiny test models in place of the real Stable Diffusion and
ControlNet folders, so the README cannot rot."""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"
# Lines of the quickstart that are the setup of the machine the tests run on, not things to try on it.
SETUP_LINES = ("python -m pip install", "python -m pytest")


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.S)


@pytest.fixture(scope="module")
def workspace(sd1_folder, tmp_path_factory):
    """A working folder with the README's input files and the model paths it names substituted."""
    from diffusers import ControlNetModel

    folder = tmp_path_factory.mktemp("readme")
    controlnet = folder / "controlnet"
    ControlNetModel.from_unet(sd1_folder[1].unet, conditioning_embedding_out_channels=(16, 32)).save_pretrained(
        controlnet, safe_serialization=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(folder / "photo.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    Image.fromarray(rng.integers(0, 2, (32, 32), np.uint8) * 255).save(folder / "edges.png")
    paths = {"path/to/stable-diffusion-v1-5": str(sd1_folder[0]), "path/to/controlnet": str(controlnet)}
    return folder, lambda code: re.sub("|".join(map(re.escape, paths)), lambda m: paths[m.group(0)], code)


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # two devices for the data-parallel example: on 8 virtual devices one image is padded to 8 on two cores
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_the_quickstart_commands_run(workspace):
    folder, substitute = workspace
    [block] = code_blocks("bash")
    commands = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    assert any(c.startswith(SETUP_LINES[0]) for c in commands) and any(c.startswith(SETUP_LINES[1]) for c in commands)
    for command in commands:
        if not command.startswith(SETUP_LINES):
            done = run(["bash", "-c", substitute(command)], folder)
            assert done.returncode == 0, (command, done.stderr[-3000:])
    assert (folder / "circle.png").is_file() and (folder / "astronaut.png").is_file()


@pytest.mark.slow
def test_the_python_examples_run(workspace):
    folder, substitute = workspace
    for block in code_blocks("python"):
        done = run([sys.executable, "-c", substitute(block)], folder)
        assert done.returncode == 0, (block, done.stderr[-3000:])
