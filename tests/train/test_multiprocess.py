"""A real multi-process run: 2 processes x 2 CPU devices, coordinated by jax.distributed over gloo, resume a run of
the tiny experiment that one device started, on one data=4 mesh, each reading only its share of the data, and
finish it. The result must agree with one device training the same global batches uninterrupted. The same
two processes generate a batch on a data=2,fsdp=2 mesh: the images of one device, written once."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.train.conftest import EXPERIMENT, REPO, run_training

pytestmark = pytest.mark.slow
TIMEOUT = 420  # seconds for one launch: a hang fails the test instead of the suite


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


SETTINGS = ["checkpoint_every=3", "batch_size=8"]


def launch(tiny_overrides, workdir, cache, *extra, flags=()) -> list[subprocess.CompletedProcess]:
    """`sdjax train --set EXTRA... FLAGS` in 2 processes with 2 CPU devices each, all waited for."""
    command = [sys.executable, "-m", "sdjax.train.cli", str(EXPERIMENT), "--workdir", str(workdir), "--mesh",
               "data=4", *flags, *[arg for item in [*tiny_overrides, *SETTINGS, *extra] for arg in ("--set", item)]]
    return run_two_processes(command, {"JAX_COMPILATION_CACHE_DIR": str(cache),
                                       "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})


def run_two_processes(command: list[str], env: dict) -> list[subprocess.CompletedProcess]:
    """`command` as processes 0 and 1 of one run, 2 CPU devices each, both waited for and required to succeed."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_NUM_CPU_DEVICES": "2", "XLA_FLAGS": "", **env}
    command = [*command, "--coordinator", f"localhost:{free_port()}", "--num-processes", "2"]
    running = [subprocess.Popen(command + ["--process-id", str(i)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        results = [subprocess.CompletedProcess(p.args, p.wait(timeout=TIMEOUT), p.stdout.read()) for p in running]
    finally:
        for p in running:
            p.kill()
    for result in results:
        assert result.returncode == 0, result.stdout[-3000:]
    return results


def exported_unet(workdir):
    return load_file(workdir / "export" / "unet" / "diffusion_pytorch_model.safetensors")


def test_two_processes_resume_a_one_device_run_and_train_like_one(tiny_overrides, compilation_cache, tmp_path):
    """A run started on one device (in this process, its 2 data streams read by one process) is resumed by two
    processes on a data=4 mesh: they restore its checkpoint sharded over their devices, each takes over one
    stream, and they train on, save and export as one run. The losses and weights equal an uninterrupted
    one-device run's."""
    workdir, streams = tmp_path / "multi", "data.streams=2"
    run_training(tiny_overrides, workdir, *SETTINGS, "num_steps=3", streams)
    # The launch restores checkpoint 3 and trains on to step 6; the learning rate is constant after warm-up, so
    # the longer budget changes nothing that was computed (and the one-device steps share one program).
    launch(tiny_overrides, workdir, tmp_path / "cache", "num_steps=6", streams, flags=["--allow-changed-settings"])
    reference = tmp_path / "single"
    run_training(tiny_overrides, reference, *SETTINGS, "num_steps=6", streams)

    losses = {name: [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
              for name, folder in (("multi", workdir), ("single", reference))}
    assert len(losses["multi"]) == 6  # 3 from this process, then 3 from one writer: process 0
    np.testing.assert_allclose(losses["multi"], losses["single"], rtol=1e-4)
    ours, theirs = exported_unet(workdir), exported_unet(reference)
    for key in theirs:
        error = np.linalg.norm(ours[key] - theirs[key]) / max(np.linalg.norm(theirs[key]), 1e-12)
        assert error < 1e-5, (key, error)
    assert (workdir / "checkpoints" / "6").is_dir()  # saved by the two processes
    starts = [json.loads(line)["start_step"] for line in (workdir / "runs.jsonl").read_text().splitlines()]
    assert starts == [0, 3]
    assert not json.loads((workdir / "config.json").read_text())["mesh"]  # as the run began, on one device
    assert json.loads((workdir / "config.step_3.json").read_text())["mesh"] == "data=4"


def test_two_processes_generate_the_images_of_one_device(sd1_folder, tmp_path):
    """`sdjax generate` on a data=2,fsdp=2 mesh over both processes' devices: process 0 alone writes the images."""
    import sdjax
    from sdjax.images import load_image

    settings = dict(steps=2, sampler="dpmpp_2m", height=32, width=32, seeds=[0, 1, 2, 3])
    out = tmp_path / "out"
    out.mkdir()
    run_two_processes([sys.executable, "-m", "sdjax.cli", "generate", "a cat", "--model", str(sd1_folder[0]),
                       "--steps", "2", "--sampler", "dpmpp_2m", "--size", "32x32", "--seed", "0,1,2,3",
                       "--mesh", "data=2,fsdp=2", "--no-compile-cache", "--out", str(out)], {})
    written = sorted(out.iterdir())
    assert [path.name for path in written] == [f"{i:05d}-{i}.png" for i in range(4)]  # once, not per process
    one_device = sdjax.load_pipeline(sd1_folder[0]).generate("a cat", **settings).images
    images = np.stack([load_image(path) for path in written])
    assert np.abs(images.astype(int) - one_device).max() <= 1


def test_an_unreachable_coordinator_is_a_clear_error_in_bounded_time(tmp_path):
    command = [sys.executable, "-m", "sdjax.train.cli", str(EXPERIMENT), "--workdir", str(tmp_path / "run"),
               "--coordinator", f"localhost:{free_port()}", "--num-processes", "2", "--process-id", "1",
               "--join-timeout", "5"]
    result = subprocess.run(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "process 1 of 2 could not join the run at localhost:" in result.stderr and "within 5 s" in result.stderr
    assert not (tmp_path / "run").exists()
