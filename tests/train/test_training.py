"""End-to-end training of the tiny experiment in this process: the loss falls, runs repeat exactly, the export
matches diffusers, the VAE stage trains, and bad run directories fail before anything is written."""
import hashlib
import shutil

import jax
import numpy as np
import pytest
import torch

import sdjax
from sdjax.errors import ConfigError
from sdjax.train.checkpoint import CheckpointMismatchError
from sdjax.train.data import DatasetError
from tests.train.conftest import EXPERIMENT, REFERENCE_STEPS, read_losses, run_training


def test_loss_goes_down(reference_run):
    workdir, result = reference_run
    losses = read_losses(workdir)
    assert sorted(losses) == list(range(1, REFERENCE_STEPS + 1)) and result.step == REFERENCE_STEPS
    values = np.array([losses[s] for s in sorted(losses)])
    assert np.all(np.isfinite(values))
    assert values[-4:].mean() < 0.7 * values[:4].mean(), values
    assert (workdir / "config.json").is_file() and "git_revision" in (workdir / "runs.jsonl").read_text()


@pytest.mark.slow
def test_same_seed_same_losses(reference_run, tiny_overrides, tmp_path):
    reference = read_losses(reference_run[0])
    run_training(tiny_overrides, tmp_path / "again", "num_steps=3")
    assert read_losses(tmp_path / "again") == {step: reference[step] for step in (1, 2, 3)}


@pytest.mark.slow
def test_cached_latents_train_like_encoded_ones(reference_run, tiny_overrides, tmp_path):
    reference = read_losses(reference_run[0])
    run_training(tiny_overrides, tmp_path / "cached", "num_steps=2", "data.cache_latents=true")
    manifest = tmp_path / "cached" / "latent_cache" / "manifest.json"
    assert manifest.is_file()
    losses = read_losses(tmp_path / "cached")
    np.testing.assert_allclose([losses[1], losses[2]], [reference[1], reference[2]], rtol=1e-4)


def test_export_loads_in_diffusers_with_the_same_unet_output(reference_run):
    from diffusers import UNet2DConditionModel
    export = reference_run[0] / "export"
    ours = sdjax.load_pipeline(export)
    theirs = UNet2DConditionModel.from_pretrained(export / "unet").eval()
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    timesteps = np.array([10, 700])
    embeddings = rng.standard_normal((2, 77, 32)).astype(np.float32)
    with torch.no_grad():
        expected = theirs(torch.from_numpy(latents.transpose(0, 3, 1, 2)), torch.from_numpy(timesteps),
                          torch.from_numpy(embeddings)).sample.numpy().transpose(0, 2, 3, 1)
    actual = np.asarray(ours.unet_output(latents, timesteps, embeddings))
    assert np.linalg.norm(actual - expected) / np.linalg.norm(expected) < 1e-5
    # The export holds the final EMA weights, bit for bit.
    jax.tree.map(np.testing.assert_array_equal, ours.params["unet"], reference_run[1].state.ema_params["unet"])


@pytest.mark.slow
def test_vae_stage_loss_goes_down(tiny_overrides, compilation_cache, tmp_path):
    result = run_training(tiny_overrides, tmp_path / "vae", "stage=vae", "num_steps=12",
                          "optimizer.warmup_steps=0")
    losses = read_losses(tmp_path / "vae")
    assert result.step == 12 and losses[12] < 0.9 * losses[1], losses
    assert sdjax.load_pipeline(result.export_dir).configs["vae"].block_out_channels == (32, 64)


def _snapshot(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def test_workdir_of_another_model_is_refused_untouched(reference_run, tiny_overrides, tmp_path):
    workdir = tmp_path / "other"
    shutil.copytree(reference_run[0], workdir)
    before = _snapshot(workdir)
    with pytest.raises(CheckpointMismatchError, match=r"unet\.block_out_channels.*\[32, 32\].*\[32, 64\]"):
        run_training(tiny_overrides, workdir, "model.unet_config=tiny")
    assert _snapshot(workdir) == before


def test_bad_data_fails_before_the_workdir_is_written(tiny_overrides, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="holds no images"):
        run_training(tiny_overrides, tmp_path / "run", f"data.folder={tmp_path / 'empty'}")
    assert not (tmp_path / "run").exists()
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="notes.txt is a file, not a folder"):
        run_training(tiny_overrides, tmp_path / "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_sample_grid_from_the_trained_weights(reference_run, tmp_path):
    from sdjax.images import load_image
    from sdjax.train.export import save_sample_grid
    pipeline = sdjax.load_pipeline(reference_run[0] / "export")
    path = save_sample_grid(pipeline, tmp_path / "grid.png", ["a photo of red", "a photo of blue"], size=16, steps=2,
                            guidance_scale=3.0, seed=0)
    assert load_image(path).shape == (16, 32, 3)


@pytest.mark.slow
def test_every_loss_option_together_in_bfloat16(tiny_overrides, compilation_cache, sd1_folder, tmp_path):
    """One compiled variant covering the options the reference run leaves off."""
    result = run_training(
        tiny_overrides, tmp_path / "options", "num_steps=4", "model.compute_dtype=bfloat16",
        "model.train_text_encoder=true", "diffusion.prediction_type=v_prediction", "diffusion.min_snr_gamma=5",
        "diffusion.offset_noise=0.1", "diffusion.zero_terminal_snr=true", "diffusion.caption_dropout=0.5",
        "diffusion.beta_schedule=squaredcos_cap_v2", "optimizer.grad_accumulation=2", "optimizer.schedule=cosine",
        "optimizer.warmup_steps=1")
    assert all(np.isfinite(list(read_losses(tmp_path / "options").values())))
    assert {x.dtype for x in jax.tree.leaves(result.state.params)} == {np.dtype("float32")}
    exported = sdjax.load_pipeline(result.export_dir)
    assert exported.scheduler_config["prediction_type"] == "v_prediction"
    assert exported.scheduler_config["rescale_betas_zero_snr"] is True
    assert exported.scheduler_config["beta_schedule"] == "squaredcos_cap_v2"
    base = sdjax.load_pipeline(sd1_folder[0])
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), exported.params["text_encoder"],
                           base.params["text_encoder"])
    assert any(jax.tree.leaves(changed))  # the text encoder was trained


def _squared_norm(tree) -> float:
    return float(sum(np.sum(np.square(np.asarray(leaf, np.float64))) for leaf in jax.tree.leaves(tree)))


@pytest.mark.slow
def test_evaluator_sees_the_ema_and_raw_weights_and_a_resume_repeats_lost_rows(tiny_overrides, compilation_cache,
                                                                                tmp_path):
    import json

    from sdjax.train import load_config, train
    seen = []

    def evaluate(pipeline):
        seen.append(pipeline)
        return {"unet_norm": _squared_norm(pipeline.params["unet"])}

    def rows():
        return [json.loads(line) for line in (workdir / "eval.jsonl").read_text().splitlines()]

    workdir, every = tmp_path / "run", REFERENCE_STEPS // 2  # the reference run's train step: compiled already
    config = load_config(EXPERIMENT, [*tiny_overrides, f"eval_every={every}", "eval_raw_weights=true"])
    result = train(config, workdir, evaluate=evaluate)
    first = rows()
    assert [(r["step"], r["weights"]) for r in first] == [(every, "ema"), (every, "raw"),
                                                           (2 * every, "ema"), (2 * every, "raw")]
    assert first[2]["unet_norm"] == pytest.approx(_squared_norm(result.state.ema_params["unet"]), rel=1e-6)
    assert first[3]["unet_norm"] == pytest.approx(_squared_norm(result.state.params["unet"]), rel=1e-6)
    assert first[2]["unet_norm"] != first[3]["unet_norm"] and len({id(p) for p in seen}) == 1  # one pipeline reused

    # As if the process died after the last evaluation but before its checkpoint: the resumed run drops the rows
    # past the checkpoint it restores and evaluates those steps again, once.
    shutil.rmtree(workdir / "checkpoints" / str(REFERENCE_STEPS))
    train(config, workdir, evaluate=evaluate)
    assert rows() == first
