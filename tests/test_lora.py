"""LoRA adapters (sdjax.lora) against diffusers' `load_lora_weights` with `set_adapters` (PEFT layers, unmerged) and
`fuse_lora` (merged) in torch, on the tiny SD1 folder. The LoRAs are made without sdjax: one with PEFT and saved by
diffusers' `save_lora_weights` (its LoraConfig in the file's metadata), one in kohya's format written straight from
the torch module names, and one in diffusers' pre-PEFT key form. Checked: U-Net and text encoder outputs, whole
generations from the same noise with two adapters at once, scale changes without recompilation, merging and
unloading back to the original weights bitwise, and the errors."""
import jax
import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
from safetensors.torch import save_file

import sdjax
from sdjax.errors import InvalidArgumentError, WeightsError
from tests.fixtures import assert_images_match, nchw
from tests.models import errors, nhwc

peft = pytest.importorskip("peft")
pytestmark = [pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning"),  # 2 adapters
              pytest.mark.usefixtures("transformers_peft_gate")]  # diffusers loads text-encoder LoRAs

PROMPT, NEGATIVE = "a photo of a cat", "blurry"
SIZE = 32  # pixels; latents 16x16
OUTPUT_TOLERANCE = 1e-5  # relative L2 of U-Net outputs and text embeddings, float32 on both sides
LATENT_TOLERANCE = 1e-4  # relative L2 of the final latents after a few sampler steps
SCALES = {"peft": 0.8, "kohya": -0.6}


def assert_close(ours, reference, rel):
    error, max_abs = errors(ours, reference)
    print(f"relative L2 {error:.2e}, max-abs {max_abs:.2e}")
    assert error <= rel, f"relative L2 {error:.2e} (max-abs {max_abs:.2e}) exceeds {rel:.0e}"


def torch_pipeline(folder) -> StableDiffusionPipeline:
    """A fresh diffusers pipeline of the folder (the session's reference stays without adapters), with Euler on
    linspace timesteps as sdjax's `sampler="euler", schedule="linspace"`."""
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_peft_lora(folder, target):
    """A LoRA made with PEFT on the U-Net (linear, 1x1 and 3x3 conv layers; a rank and an alpha pattern) and the
    text encoder (rsLoRA scaling), B random so that it acts, saved by diffusers with its LoraConfigs as metadata."""
    pipe = torch_pipeline(folder)
    unet_config = peft.LoraConfig(r=4, lora_alpha=8, rank_pattern={"to_k": 2}, alpha_pattern={"to_v": 3},
                                  init_lora_weights=False,
                                  target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1"])
    text_config = peft.LoraConfig(r=2, lora_alpha=3, use_rslora=True, init_lora_weights=False,
                                  target_modules=["q_proj", "v_proj", "fc1"])
    torch.manual_seed(5)
    pipe.unet.add_adapter(unet_config)
    pipe.text_encoder.add_adapter(text_config)
    StableDiffusionPipeline.save_lora_weights(
        target, unet_lora_layers=peft.get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=peft.get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=unet_config.to_dict(), text_encoder_lora_adapter_metadata=text_config.to_dict())
    return target


def make_kohya_lora(folder, path, rank=3):
    """A kohya-format LoRA written from the torch module names (dots -> underscores, lora_unet_ / lora_te_text_model_
    prefixes as sd-scripts writes them), with conv LoRA (LoCon: down a conv kernel, up 1x1) and alpha tensors. One
    alpha for all layers, as sd-scripts' --network_alpha gives: diffusers' kohya loader keeps only the most common
    alpha (the alpha_pattern it builds for the others names no module; PEFT warns and ignores it)."""
    pipe = torch_pipeline(folder)
    generator = torch.Generator().manual_seed(7)
    targets = {"lora_unet_": (pipe.unet, ("attn1.to_q", "attn2.to_k", "attn2.to_out.0", "proj_in", "conv2",
                                          "ff.net.0.proj")),
               "lora_te_text_model_": (pipe.text_encoder, ("self_attn.k_proj", "self_attn.out_proj", "mlp.fc2"))}
    state = {}
    for prefix, (model, endings) in targets.items():
        for name, module in model.named_modules():
            if not name.endswith(endings) or not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            kohya = prefix + name.removeprefix("text_model.").replace(".", "_")
            out_features, in_features, *kernel = module.weight.shape
            state[f"{kohya}.lora_down.weight"] = 0.3 * torch.randn(rank, in_features, *kernel, generator=generator)
            state[f"{kohya}.lora_up.weight"] = 0.3 * torch.randn(out_features, rank, *([1, 1] if kernel else []),
                                                                 generator=generator)
            state[f"{kohya}.alpha"] = torch.tensor(1.5)
    save_file(state, path)
    return path


def old_diffusers_form(peft_folder, path):
    """The PEFT file's factors under diffusers' pre-PEFT names (`lora.down` / `lora.up`, `lora_linear_layer` in
    the text encoder), without metadata: alpha = rank."""
    from safetensors.torch import load_file
    renamed = {}
    for key, value in load_file(peft_folder / "pytorch_lora_weights.safetensors").items():
        layer = ".lora_linear_layer." if key.startswith("text_encoder.") else ".lora."
        key = key.replace(".lora_A.weight", f"{layer}down.weight").replace(".lora_B.weight", f"{layer}up.weight")
        renamed[key] = value
    save_file(renamed, path)
    return path


@pytest.fixture(scope="module")
def loras(sd1_folder, tmp_path_factory):
    """{format: path} of the three LoRA files."""
    folder, root = sd1_folder[0], tmp_path_factory.mktemp("lora")
    peft_folder = make_peft_lora(folder, root / "peft")
    return {"peft": peft_folder, "kohya": make_kohya_lora(folder, root / "kohya.safetensors"),
            "old_diffusers": old_diffusers_form(peft_folder, root / "old_diffusers.safetensors")}


@pytest.fixture(scope="module")
def shared_pipeline(sd1_folder):
    return sdjax.load_pipeline(sd1_folder[0])


@pytest.fixture
def pipeline(shared_pipeline):
    """The module's sdjax pipeline (its compiled functions reused), without adapters after each test."""
    yield shared_pipeline
    shared_pipeline.unload_lora()


def reference_with(folder, loras: dict, scales: dict) -> StableDiffusionPipeline:
    """A diffusers pipeline with LoRA files {name: path} loaded as adapters of those names, at `scales`."""
    pipe = torch_pipeline(folder)
    for name, path in loras.items():
        pipe.load_lora_weights(path, adapter_name=name)
    pipe.set_adapters(list(scales), list(scales.values()))
    return pipe


def component_outputs(pipe):
    """(U-Net output NHWC, text embeddings) of a diffusers pipeline on fixed inputs; (sdjax's come from
    `sdjax_outputs`)."""
    latents, timesteps, embeddings = unet_inputs()
    with torch.no_grad():
        unet = pipe.unet(nchw(latents), torch.from_numpy(timesteps), torch.from_numpy(embeddings)).sample
        text = pipe.encode_prompt([PROMPT, "an astronaut"], "cpu", 1, False)[0]
    return nhwc(unet), text.numpy()


def sdjax_outputs(pipeline):
    latents, timesteps, embeddings = unet_inputs()
    return (np.asarray(pipeline.unet_output(latents, timesteps, embeddings)),
            np.asarray(pipeline.encode_prompt([PROMPT, "an astronaut"])))


def unet_inputs():
    rng = np.random.default_rng(3)
    return (rng.normal(size=(2, 16, 16, 4)).astype(np.float32), np.array([901, 14], np.int64),
            rng.normal(size=(2, 77, 32)).astype(np.float32))


@pytest.mark.parametrize("kind", ["peft", "kohya", "old_diffusers"])
def test_unet_and_text_encoder_match_diffusers_unmerged_and_merged(kind, loras, pipeline, sd1_folder):
    scale = 0.7
    base_unet, base_text = sdjax_outputs(pipeline)
    reference = reference_with(sd1_folder[0], {kind: loras[kind]}, {kind: scale})
    unmerged_unet, unmerged_text = component_outputs(reference)      # PEFT layers, the scale as adapter weight
    reference.set_adapters([kind], [1.0])
    reference.fuse_lora(lora_scale=scale)
    merged_unet, merged_text = component_outputs(reference)          # the update added to the weights

    name = pipeline.load_lora(loras[kind], scale=scale)
    assert name == loras[kind].stem and not pipeline.loras[name].merged
    unet, text = sdjax_outputs(pipeline)
    assert_close(unet, unmerged_unet, OUTPUT_TOLERANCE)
    assert_close(text, unmerged_text, OUTPUT_TOLERANCE)
    assert errors(unet, base_unet)[0] > 0.05 and errors(text, base_text)[0] > 0.05  # the LoRA acts
    pipeline.fuse_lora(name)
    assert pipeline.loras[name].merged
    unet, text = sdjax_outputs(pipeline)
    assert_close(unet, merged_unet, OUTPUT_TOLERANCE)
    assert_close(text, merged_text, OUTPUT_TOLERANCE)


def generate_both(pipeline, reference, noise, **settings):
    """(sdjax result, diffusers images in [0, 1], diffusers final latents NHWC) from the same noise."""
    ours = pipeline.generate(PROMPT, NEGATIVE, steps=3, guidance_scale=7.0, sampler="euler", schedule="linspace",
                             latents=noise, height=SIZE, width=SIZE, **settings)
    theirs = {kind: reference(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=3, guidance_scale=7.0,
                              latents=nchw(noise), height=SIZE, width=SIZE, output_type=kind).images
              for kind in ("np", "latent")}
    return ours, theirs["np"], nhwc(theirs["latent"])


def check_generation(ours, images, latents):
    """Images within 2/255 (mean 0.5/255); final latents within LATENT_TOLERANCE in relative L2 and in max-abs
    relative to their largest value (about 60 here: random weights at guidance 7; the same differences as
    without a LoRA, measured 4.5e-6 and 3.5e-4)."""
    assert_images_match(ours.images, images)
    assert_close(ours.latents, latents, LATENT_TOLERANCE)
    assert errors(ours.latents, latents)[1] <= LATENT_TOLERANCE * np.abs(latents).max()


def test_two_adapters_generate_like_diffusers_and_scales_do_not_recompile(loras, pipeline, sd1_folder):
    folder = sd1_folder[0]
    original = jax.tree.map(np.array, pipeline.params)
    noise = np.random.default_rng(0).normal(size=(1, 16, 16, 4)).astype(np.float32)
    plain = pipeline.generate(PROMPT, NEGATIVE, steps=3, guidance_scale=7.0, sampler="euler", schedule="linspace",
                              latents=noise, height=SIZE, width=SIZE)
    for name, scale in SCALES.items():
        pipeline.load_lora(loras[name], scale)
    reference = reference_with(folder, {name: loras[name] for name in SCALES}, SCALES)
    ours, images, latents = generate_both(pipeline, reference, noise)
    check_generation(ours, images, latents)
    assert ours.compile_seconds > 0 and np.abs(ours.images.astype(int) - plain.images).max() > 10
    compiled = len(pipeline._executables)

    # New scales: traced values of the same program, set on the pipeline or per call.
    pipeline.set_lora_scale("kohya", 1.1)
    reference.set_adapters(["peft", "kohya"], [0.3, 1.1])
    ours, images, latents = generate_both(pipeline, reference, noise, lora_scales={"peft": 0.3})
    check_generation(ours, images, latents)
    assert ours.compile_seconds == 0 and len(pipeline._executables) == compiled
    assert pipeline.loras["peft"].scale == SCALES["peft"]  # a call's scales do not stick

    # Merged: both updates in the stored weights, against diffusers' fused weights (its program for plain weights).
    pipeline.set_lora_scale("peft", 0.3)
    pipeline.fuse_lora()
    reference.fuse_lora()
    ours, images, latents = generate_both(pipeline, reference, noise)
    check_generation(ours, images, latents)
    assert ours.compile_seconds == 0  # the program without unmerged adapters compiled for `plain`

    pipeline.unfuse_lora("peft")  # one merged, one not (checked on the components: no third program to compile)
    reference.unfuse_lora()
    for ours, theirs in zip(sdjax_outputs(pipeline), component_outputs(reference)):
        assert_close(ours, theirs, OUTPUT_TOLERANCE)

    pipeline.unload_lora()
    assert pipeline.loras == {}
    restored = jax.tree.map(np.array, pipeline.params)
    assert jax.tree.structure(restored) == jax.tree.structure(original)
    assert all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(restored), jax.tree.leaves(original)))


# --- errors -----------------------------------------------------------------------------------------------------

def test_a_lora_for_another_architecture_names_the_keys_that_match_nothing(pipeline):
    sdxl_kohya = {"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": np.zeros((4, 640), np.float32),
                  "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": np.zeros((640, 4), np.float32),
                  "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": np.zeros((4, 1280))}
    with pytest.raises(WeightsError, match=r"3 of 3 LoRA keys match no layer .*another architecture.*"
                                           r"lora_unet_input_blocks_4_1_proj_in\.lora_down\.weight \(looked up as the "
                                           r"kohya name of a unet layer 'input_blocks_4_1_proj_in'"):
        pipeline.load_lora(sdxl_kohya)
    with pytest.raises(WeightsError, match=r"transformer\.single_transformer_blocks\.0\.attn\.to_q\.lora_A\.weight "
                                           r"\(looked up as component 'transformer'"):
        pipeline.load_lora({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": np.zeros((4, 8)),
                            "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": np.zeros((8, 4))})
    layer = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    mixed = {**sdxl_kohya, f"{layer}.lora_A.weight": np.ones((2, 32), np.float32),
             f"{layer}.lora_B.weight": np.ones((32, 2), np.float32)}
    with pytest.warns(UserWarning, match="3 of 5 LoRA keys match no layer.*skipped"):
        name = pipeline.load_lora(mixed, strict=False, name="mixed")
    assert list(pipeline.loras[name].layers["unet"]) == [
        "down_blocks.0/attentions.0/transformer_blocks.0/attn1/to_q/kernel"]
    assert pipeline.loras == {name: pipeline.loras[name]}  # nothing was loaded by the failed calls


def test_misranked_and_misshaped_factors_are_refused_by_key(pipeline):
    layer = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    with pytest.raises(WeightsError, match=rf"rank mismatch: {layer}\.lora_A\.weight has shape \(4, 32\) \(rank 4\) "
                                           rf"but {layer}\.lora_B\.weight has shape \(32, 3\) \(rank 3\)"):
        pipeline.load_lora({f"{layer}.lora_A.weight": np.ones((4, 32)), f"{layer}.lora_B.weight": np.ones((32, 3))})
    with pytest.raises(WeightsError, match=r"make an update of shape \(32, 48\), but the layer down_blocks\.0\..*"
                                           r"to_q has a weight of shape \(32, 32\)"):
        pipeline.load_lora({f"{layer}.lora_A.weight": np.ones((4, 48)), f"{layer}.lora_B.weight": np.ones((32, 4))})
    with pytest.raises(WeightsError, match=rf"{layer}\.lora_A\.weight has no up factor"):
        pipeline.load_lora({f"{layer}.lora_A.weight": np.ones((4, 32))})
    with pytest.raises(WeightsError, match="DoRA"):
        pipeline.load_lora({f"{layer}.lora_A.weight": np.ones((4, 32)), f"{layer}.lora_B.weight": np.ones((32, 4)),
                            f"{layer}.lora_magnitude_vector": np.ones(32)})
    assert pipeline.loras == {}


def test_bad_scales_and_names_are_refused(pipeline):
    layer = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    lora = {f"{layer}.lora_A.weight": np.ones((2, 32)), f"{layer}.lora_B.weight": np.ones((32, 2))}
    for scale in ("0.5", True, float("nan"), None):
        with pytest.raises(InvalidArgumentError, match=r"the scale of LoRA 'style' must be a finite number, got "):
            pipeline.load_lora(lora, scale, name="style")
    pipeline.load_lora(lora, 0.5, name="style")
    with pytest.raises(InvalidArgumentError, match="a LoRA named 'style' is loaded already"):
        pipeline.load_lora(lora, name="style")
    with pytest.raises(InvalidArgumentError, match=r"the scale of LoRA 'style' must be a finite number, got '1'"):
        pipeline.set_lora_scale("style", "1")
    with pytest.raises(InvalidArgumentError, match=r"no LoRA named 'other' is loaded; loaded: \['style'\]"):
        pipeline.prepare(PROMPT, steps=2, lora_scales={"other": 1.0})
    pipeline.fuse_lora("style")
    with pytest.raises(InvalidArgumentError, match="LoRA 'style' is merged into the weights"):
        pipeline.prepare(PROMPT, steps=2, lora_scales={"style": 1.0})
    with pytest.raises(WeightsError, match="no such LoRA file"):
        pipeline.load_lora("missing.safetensors")
