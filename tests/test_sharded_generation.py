"""Generation on a (data, fsdp) mesh of the 8 virtual CPU devices tests/conftest.py gives: the images of one
device, with FSDP's params split over the devices; and the generate command's multi-process options refusing bad
input before anything loads. (Two real processes generating: tests/train/test_multiprocess.py.)"""
import re

import jax
import numpy as np
import pytest

import sdjax
from sdjax import cli, parallel

SIZE = 32  # pixels; 16x16 latents with the tiny VAE
PROMPTS = ["a cat", "a dog", "red", "blue", "moon", "city", "forest", "castle"]
# A multistep SDE sampler: its history carry once failed to compile on a mesh, and its noise must follow each
# image's seed. batch_invariant: each image computed alone, so the mesh must give one device's images bit for bit.
SETTINGS = dict(steps=2, sampler="dpmpp_2m_sde", height=SIZE, width=SIZE, seeds=list(range(8)), batch_invariant=True)


@pytest.fixture(scope="module")
def one_device(sd1_folder):
    """The reference: seeds 0..7 on one device."""
    return sdjax.load_pipeline(sd1_folder[0]).generate(PROMPTS, **SETTINGS).images


@pytest.mark.parametrize("mesh", ["data=8", "data=4,fsdp=2", "fsdp=8"])
def test_a_mesh_generates_the_images_of_one_device(mesh, one_device, sd1_folder):
    pipeline = sdjax.load_pipeline(sd1_folder[0], mesh=mesh)
    fsdp = pipeline.mesh.shape["fsdp"]
    large = [leaf for leaf in jax.tree.leaves(pipeline.params["unet"]) if leaf.size >= parallel.MIN_FSDP_SIZE]
    assert len(large) >= 4  # the tiny U-Net's 64-channel convolutions and attention projections
    for leaf in large:  # every device holds its 1/fsdp of each large kernel, and no more
        assert [shard.data.size for shard in leaf.addressable_shards] == [leaf.size // fsdp] * 8, leaf.shape
    # Pure data parallelism runs one device's program per image: bit for bit. Partitioned over fsdp, XLA may order
    # a gathered kernel's sums differently: seen 3 of 24576 values 1/255 off.
    tolerance = 0 if fsdp == 1 else 1
    images = pipeline.generate(PROMPTS, **SETTINGS).images
    assert np.abs(images.astype(int) - one_device).max() <= tolerance
    # 6 images on 8 devices: padded with copies of the last image, which the result leaves out
    six = pipeline.generate(PROMPTS[:6], **{**SETTINGS, "seeds": SETTINGS["seeds"][:6]}).images
    assert six.shape[0] == 6 and np.abs(six.astype(int) - one_device[:6]).max() <= tolerance


def test_fsdp_gathers_each_layer_where_it_is_used(sd1_folder):
    """fsdp=8 holds 1/8 of the params per device and gathers each layer's kernel at its use, inside the sampler and
    decode loops (`parallel.per_layer`): the compiled program's peak per device is well below data=8's, and its
    temporaries (activations, kernels in flight) stay near data=8's. Left to XLA, the gathers were hoisted out of
    the sampler loop and the VAE decoder gathered every device's activations: fsdp=8 peaked at 1.22x data=8's,
    temporaries 3.8x (experiments/scaling/generation_memory.py)."""
    from experiments.scaling.generation_memory import measure
    data, fsdp = (measure(str(sd1_folder[0]), mesh, images=8, steps=2) for mesh in ("data=8", "fsdp=8"))
    assert fsdp["params"] + fsdp["temp"] < 0.75 * (data["params"] + data["temp"]), (fsdp, data)
    assert fsdp["temp"] < 1.5 * data["temp"], (fsdp, data)


@pytest.mark.parametrize("flags, message", [
    (["--coordinator", "localhost:12355", "--num-processes", "2", "--process-id", "2"],
     r"process_id=2 must be in \[0, 2\) for 2 processes"),
    (["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"],
     "coordinator 'localhost' must be HOST:PORT"),
    (["--process-id", "1"], "--process-id without --coordinator"),
])
def test_generate_refuses_a_bad_multi_process_setup_before_loading(flags, message, tmp_path, capsys):
    assert cli.main(["generate", "a cat", "--out", str(tmp_path), *flags]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not list(tmp_path.iterdir())
