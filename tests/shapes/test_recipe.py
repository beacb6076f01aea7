"""The one command that re-creates the embedded model, at toy sizes: every stage runs through sdjax's own
trainer, the packaged folder loads and generates, and a rerun reuses what is already done."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import sdjax


def recipe(workdir, out):
    env = {**os.environ, "SDJAX_CACHE_DIR": str(workdir.parent / "compile_cache")}
    return subprocess.run([sys.executable, "-m", "experiments.shapes.recipe", "--smoke", "--workdir", str(workdir),
                           "--out", str(out)], capture_output=True, text=True, timeout=900, env=env)


@pytest.mark.slow
def test_the_smoke_recipe_trains_every_stage_and_packages_a_model(tmp_path):
    workdir, out = tmp_path / "run", tmp_path / "package"
    first = recipe(workdir, out)
    assert first.returncode == 0, first.stderr[-3000:]
    for stage, kind in (("vae", "vae"), ("unet", "unet"), ("refine", "unet"), ("balance", "unet"), ("decoder", "vae")):
        assert json.loads((workdir / stage / "config.json").read_text())["stage"] == kind
        assert (workdir / stage / "export" / "model_index.json").is_file()
    scale = json.loads((workdir / "base" / "vae" / "config.json").read_text())["scaling_factor"]
    assert json.loads((out / "vae" / "config.json").read_text())["scaling_factor"] == scale != 1.0
    assert {"vocab.json", "merges.txt"} <= {p.name for p in (out / "tokenizer").iterdir()}
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    pipeline = sdjax.load_pipeline(out)
    assert not pipeline.is_embedded
    images = pipeline.generate("a red circle on a blue background", steps=3).images
    assert images.shape == (1, 64, 64, 3)
    # The text encoder was trained (it moved away from its initialisation), the VAE kept from stage 1.
    init = sdjax.load_pipeline(workdir / "init")
    moved = lambda name: not all(np.array_equal(a, b) for a, b in zip(
        *(jax_leaves(p.params[name]) for p in (init, pipeline))))
    assert moved("text_encoder") and moved("unet") and moved("vae")
    # Each U-Net cycle started from the previous one's weights, and the last one's are the ones packaged.
    for stage, previous in (("refine", "unet"), ("balance", "refine")):
        assert json.loads((workdir / stage / "config.json").read_text())["model"]["pretrained"] == str(
            workdir / previous / "export")
    assert json.loads((workdir / "balance" / "config.json").read_text())["diffusion"]["normalize_loss_mask"]
    last = sdjax.load_pipeline(workdir / "balance" / "export")
    assert all(np.array_equal(a.astype(np.float16), b.astype(np.float16)) for a, b in zip(
        jax_leaves(last.params["unet"]), jax_leaves(pipeline.params["unet"])))
    # The decoder stage changed the decoder only: the encoder (the latent space of the U-Net) is stage 1's.
    base, decoder = sdjax.load_pipeline(workdir / "base"), sdjax.load_pipeline(workdir / "decoder" / "export")
    for part in ("encoder", "quant_conv"):
        assert all(np.array_equal(a, b) for a, b in zip(jax_leaves(base.params["vae"][part]),
                                                         jax_leaves(decoder.params["vae"][part])))
    assert not all(np.array_equal(a, b) for a, b in zip(jax_leaves(base.params["vae"]["decoder"]),
                                                         jax_leaves(decoder.params["vae"]["decoder"])))
    assert all(np.array_equal(a.astype(np.float16), b.astype(np.float16)) for a, b in zip(
        jax_leaves(decoder.params["vae"]), jax_leaves(pipeline.params["vae"])))  # the package is float16

    second = recipe(workdir, out)  # everything is done: no stage trains again
    assert second.returncode == 0, second.stderr[-3000:]
    assert "vae: training" in second.stdout and "train 1/" not in second.stderr
    seconds = json.loads((workdir / "timing.json").read_text())  # what the whole re-creation cost, by stage
    assert set(seconds) == {"data", "init", "vae", "base", "unet", "refine", "balance", "decoder", "package"}


def jax_leaves(tree):
    import jax
    return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]
