"""LoRA training (`lora.rank` > 0) on the tiny SD1 folder, three steps, with adapters on the U-Net and the text
encoder: only the adapters are trained, checkpointed and exported; the PEFT and kohya exports load in diffusers and
in sdjax with the same U-Net and text encoder outputs; a resume repeats the run bitwise; bad settings fail before
anything is written."""
import hashlib
import shutil

import jax
import numpy as np
import pytest
import torch

import sdjax
from sdjax import lora
from sdjax.errors import ConfigError
from sdjax.train.adapters import FILES, by_path, lora_spec
from sdjax.train.checkpoint import CheckpointMismatchError, CheckpointStore
from sdjax.train.config import LoRAConfig, load_config
from sdjax.train.state import checkpointed
from sdjax.weights.tensors import read_safetensors
from tests.models import errors, nchw, nhwc
from tests.train.conftest import EXPERIMENT, read_losses, run_training

pytest.importorskip("peft")
STEPS = 3
# The folder's own U-Net (the experiment trains a new one from scratch); rank 4, alpha 8: a scaling of 2 that the
# files must carry. No warmup and a large learning rate, so that three steps move the adapter visibly.
# The text encoder's attention projections too, as diffusers' --train_text_encoder.
LORA = ("model.unet_config=", "lora.rank=4", "lora.alpha=8", "lora.export_formats=peft|kohya", f"num_steps={STEPS}",
        "checkpoint_every=1", "optimizer.warmup_steps=0", "optimizer.learning_rate=0.02",
        "lora.text_encoder_targets=q_proj|k_proj|v_proj|out_proj")
TARGETS = {"unet": ("to_q", "to_k", "to_v", "to_out.0"),  # the default lora.targets
           "text_encoder": ("q_proj", "k_proj", "v_proj", "out_proj")}
OUTPUT_TOLERANCE = 1e-5  # relative L2 of U-Net outputs and text embeddings, float32 on both sides
PROMPTS = ["a photo of a cat", "an astronaut"]


@pytest.fixture(scope="module")
def lora_run(tiny_overrides, compilation_cache, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lora") / "run"
    return workdir, run_training(tiny_overrides, workdir, *LORA)


@pytest.fixture(scope="module")
def base(sd1_folder):
    return sdjax.load_pipeline(sd1_folder[0])


def test_the_adapter_starts_as_the_base_model(base):
    assert list(lora_spec(LoRAConfig(rank=4), base.params).layers) == ["unet"]  # the text encoder: only when asked
    spec = lora_spec(LoRAConfig(rank=4, alpha=8, text_encoder_targets=TARGETS["text_encoder"]), base.params)
    trained = spec.init(base.params, jax.random.key(0))
    factors = by_path(trained)
    assert list(factors) == ["unet", "text_encoder"]
    assert all(not np.any(pair["up"]) and np.any(pair["down"]) for layers in factors.values()
               for pair in layers.values())
    merged = spec.merged(base.params, trained)
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, merged, base.params)))


def test_only_the_adapter_is_trained_checkpointed_and_exported(lora_run, base):
    workdir, result = lora_run
    state = result.state
    trained = by_path(state.params)
    assert sorted(trained) == sorted(TARGETS)
    for component, layers in trained.items():
        expected = {m for m in map(lora.module_name, lora.kernel_shapes(base.params[component]))
                    if m.endswith(TARGETS[component])}
        assert expected and {lora.module_name(path) for path in layers} == expected
        assert all(pair["down"].shape[-1] == 4 and pair["up"].shape[0] == 4 and np.any(pair["up"])
                   for pair in layers.values())
    # Optimizer state and EMA: the adapter's shapes (Adam's two moments of each factor) and scalar counters only.
    adapter_sizes = sorted(leaf.size for leaf in jax.tree.leaves(state.params))
    moments = [leaf.size for leaf in jax.tree.leaves(state.opt_state) if leaf.ndim]
    assert sorted(moments) == sorted(2 * adapter_sizes)
    assert jax.tree.structure(state.ema_params) == jax.tree.structure(state.params)
    saved, _ = CheckpointStore(workdir / "checkpoints").restore(checkpointed(state))
    jax.tree.map(np.testing.assert_array_equal, saved, checkpointed(state))
    # The base weights stay as they were; the export holds the EMA adapters alone, in both formats, under the keys
    # diffusers' save_lora_weights(unet_lora_layers=, text_encoder_lora_layers=) and kohya's sd-scripts write.
    assert sorted(state.frozen) == sorted(TARGETS)
    jax.tree.map(np.testing.assert_array_equal, state.frozen, {name: base.params[name] for name in TARGETS})
    assert sorted(p.name for p in result.export_dir.iterdir()) == sorted(FILES.values())
    exported = read_safetensors(result.export_dir / FILES["peft"])
    kohya = read_safetensors(result.export_dir / FILES["kohya"])
    ema = by_path(state.ema_params)
    assert len(exported) == 2 * sum(map(len, ema.values())) and len(kohya) == 3 * sum(map(len, ema.values()))
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in exported
    assert "lora_te_text_model_encoder_layers_0_self_attn_out_proj.lora_up.weight" in kohya
    for component, prefix in {"unet": "lora_unet_", "text_encoder": "lora_te_"}.items():
        for path, pair in ema[component].items():
            down, up = lora.torch_factors(pair)
            module = lora.module_name(path)
            np.testing.assert_array_equal(exported[f"{component}.{module}.lora_A.weight"], down)
            np.testing.assert_array_equal(exported[f"{component}.{module}.lora_B.weight"], up)
            kohya_name = prefix + module.replace(".", "_")
            np.testing.assert_array_equal(kohya[f"{kohya_name}.lora_down.weight"], down)
            assert kohya[f"{kohya_name}.alpha"] == 8.0


def unet_inputs():
    rng = np.random.default_rng(0)
    return (rng.standard_normal((2, 8, 8, 4)).astype(np.float32), np.array([10, 700]),
            rng.standard_normal((2, 77, 32)).astype(np.float32))


def outputs(unet, encode_prompt):
    """(U-Net output NHWC, text embeddings) on fixed inputs, from a U-Net call (latents, timesteps, embeddings) and
    an encode_prompt(prompts) of either library."""
    latents, timesteps, embeddings = unet_inputs()
    return np.asarray(unet(latents, timesteps, embeddings)), np.asarray(encode_prompt(PROMPTS))


def diffusers_outputs(pipe):
    with torch.no_grad():
        return outputs(lambda latents, timesteps, embeddings: nhwc(pipe.unet(
            torch.from_numpy(nchw(latents)), torch.from_numpy(timesteps), torch.from_numpy(embeddings)).sample),
            lambda prompts: pipe.encode_prompt(prompts, "cpu", 1, False)[0])


@pytest.mark.usefixtures("transformers_peft_gate")  # diffusers loads the text encoder's adapters through PEFT
@pytest.mark.parametrize("kind", ["peft", "kohya"])
def test_export_loads_in_diffusers_and_sdjax_with_the_same_outputs(kind, lora_run, base, sd1_folder):
    from diffusers import StableDiffusionPipeline
    export, scale = lora_run[1].export_dir, 0.7
    reference = StableDiffusionPipeline.from_pretrained(sd1_folder[0])
    reference.load_lora_weights(export, weight_name=FILES[kind], adapter_name="trained")
    reference.set_adapters(["trained"], [scale])
    theirs = diffusers_outputs(reference)
    plain = outputs(base.unet_output, base.encode_prompt)
    name = base.load_lora(export / FILES[kind], scale=scale)
    try:
        ours = outputs(base.unet_output, base.encode_prompt)
        # sdjax reads back the EMA factors of both components bitwise, with alpha / rank = 2
        for component, layers in by_path(lora_run[1].state.ema_params).items():
            for path, pair in layers.items():
                loaded = base.loras[name].layers[component][path]
                assert loaded["scaling"] == 2.0
                np.testing.assert_array_equal(loaded["down"], pair["down"])
                np.testing.assert_array_equal(loaded["up"], pair["up"])
    finally:
        base.unload_lora()
    for what, mine, their, before in zip(("U-Net", "text encoder"), ours, theirs, plain):
        relative, max_abs = errors(mine, their)
        effect = errors(before, their)[0]
        print(f"{kind} {what}: relative L2 {relative:.2e}, max-abs {max_abs:.2e}, LoRA effect {effect:.2e}")
        assert relative <= OUTPUT_TOLERANCE and max_abs <= OUTPUT_TOLERANCE * np.abs(their).max()
        assert effect > 100 * OUTPUT_TOLERANCE  # the adapter acts


def _snapshot(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def test_resume_is_exact_and_other_lora_settings_are_refused(lora_run, tiny_overrides, tmp_path):
    reference_dir, reference = lora_run
    workdir = tmp_path / "run"
    shutil.copytree(reference_dir, workdir)
    shutil.rmtree(workdir / "checkpoints" / str(STEPS))  # as if killed before the last checkpoint
    shutil.rmtree(workdir / "export")
    before = _snapshot(workdir)
    with pytest.raises(ConfigError, match=r"lora\.alpha 8\.0 -> 4\.0"):
        run_training(tiny_overrides, workdir, *LORA, "lora.alpha=4")
    with pytest.raises(CheckpointMismatchError, match=r"lora\.rank: 4 in the checkpoint, 2 now"):
        run_training(tiny_overrides, workdir, *LORA, "lora.rank=2")
    with pytest.raises(CheckpointMismatchError, match=r"lora: \{'rank': 4.* in the checkpoint, None now"):
        run_training(tiny_overrides, workdir, *[o for o in LORA if not o.startswith("lora.")])
    with pytest.raises(CheckpointMismatchError, match=r"lora\.text_encoder_targets: \['q_proj'.* in the checkpoint, "
                                                      r"None now"):
        run_training(tiny_overrides, workdir, *LORA, "lora.text_encoder_targets=[]")
    assert _snapshot(workdir) == before

    result = run_training(tiny_overrides, workdir, *LORA)
    assert read_losses(workdir) == read_losses(reference_dir)
    jax.tree.map(np.testing.assert_array_equal, checkpointed(result.state), checkpointed(reference.state))
    assert _snapshot(result.export_dir) == _snapshot(reference.export_dir)


def test_bad_lora_settings_fail_before_anything_is_written(tiny_overrides, tmp_path):
    with pytest.raises(ConfigError, match=r"lora\.rank = -1 must be >= 0"):
        load_config(EXPERIMENT, ["lora.rank=-1"])
    with pytest.raises(ConfigError, match=r"stage = 'vae' trains no U-Net"):
        load_config(EXPERIMENT, ["model.unet_config=", "lora.rank=4", "stage=vae"])
    with pytest.raises(ConfigError, match=r"model\.unet_config = '.*unet\.json' makes a new U-Net from scratch"):
        load_config(EXPERIMENT, ["lora.rank=4"])
    with pytest.raises(ConfigError, match=r"lora\.targets 'to_qkv' match no .* layers end in attn1\.to_k, .*proj_in"):
        run_training(tiny_overrides, tmp_path / "run", *LORA, "lora.targets=to_q|to_qkv")
    with pytest.raises(ConfigError, match=r"lora\.text_encoder_targets 'to_q' match no .* of the text encoder .* end "
                                          r"in mlp\.fc1, .*self_attn\.q_proj"):
        run_training(tiny_overrides, tmp_path / "run", *LORA, "lora.text_encoder_targets=q_proj|to_q")
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match=r"model\.train_text_encoder would train them whole .* lora\.text_encoder_"):
        load_config(EXPERIMENT, [*LORA, "model.train_text_encoder=true"])
    with pytest.raises(ConfigError, match=r"lora\.text_encoder_targets names .* but lora\.rank = 0"):
        load_config(EXPERIMENT, ["lora.text_encoder_targets=q_proj"])
