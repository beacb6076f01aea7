"""sdjax's CLIP text encoder against transformers' CLIPTextModel (torch), the reference."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from sdjax.errors import InvalidArgumentError
from sdjax.models import configs
from sdjax.models.clip import CLIPTextModel
from sdjax.models.components import COMPONENTS
from sdjax.weights import diffusers_folder, keymap
from tests.tokenizer_fixture import make_clip_tokenizer

PROMPTS = ["a photo of an astronaut riding a horse on the moon",
           "Blurry, ugly!",
           "a beautiful detailed oil painting of a castle in the forest, with a red dog and a blue cat " * 3]

# SD1-like: quick_gelu, legacy eos_token_id (pool at the argmax id). SD2-like: exact gelu, other widths and
# heads, pooling at the first end-of-text token (eos id set from the tokenizer below).
SD1_LIKE = dataclasses.replace(configs.TINY_TEXT, eos_token_id=2)
SD2_LIKE = configs.CLIPTextConfig(vocab_size=1000, hidden_size=48, intermediate_size=61, num_hidden_layers=4,
                                  num_attention_heads=6, hidden_act="gelu")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_clip_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def tokens(tokenizer):
    """Ids and attention mask (batch 3, length 77), padded with end-of-text as SD pipelines do."""
    encoded = tokenizer(PROMPTS, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="np")
    assert (encoded["attention_mask"] == 0).any(), "the test prompts should include padding"
    return encoded["input_ids"].astype(np.int32), encoded["attention_mask"].astype(np.int32)


def torch_reference(config: configs.CLIPTextConfig, seed: int = 0) -> transformers.CLIPTextModel:
    """transformers' CLIPTextModel for `config`, every parameter moved away from its initial value."""
    torch.manual_seed(seed)
    # bos/pad ids inside the tiny vocabularies keep transformers from warning; they do not change the outputs.
    model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config.to_dict(), bos_token_id=0, pad_token_id=1))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def checkpoint_state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The model's weights as SD text_encoder checkpoints name them.

    transformers >= 5 drops the `text_model.` prefix from CLIPTextModel's state dict (and adds it back
    when loading older files); every SD checkpoint on disk carries it.
    """
    state = {k: v.detach().numpy() for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}


def sdjax_params(config: configs.CLIPTextConfig, reference: torch.nn.Module) -> dict:
    expected = jax.eval_shape(CLIPTextModel(config).init, jax.random.key(0), jnp.zeros((1, 77), jnp.int32))
    return keymap.params_from_state_dict(checkpoint_state_dict(reference), expected["params"], source="test")


def relative_l2(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def max_abs(actual, expected) -> float:
    return float(np.max(np.abs(np.asarray(actual, np.float64) - np.asarray(expected, np.float64))))


def compare_with_transformers(config, tokenizer, tokens, *, use_mask: bool, clip_skip: int = 1) -> dict:
    """Relative L2 errors of sdjax's outputs against transformers', by output name."""
    config = config if config.eos_token_id == 2 else dataclasses.replace(config, eos_token_id=tokenizer.eos_token_id)
    reference = torch_reference(config)
    ids, mask = tokens
    mask = mask if use_mask else None
    with torch.no_grad():
        ref = reference(torch.from_numpy(ids).long(),
                        attention_mask=None if mask is None else torch.from_numpy(mask).long(),
                        output_hidden_states=True)
        ref_skipped = reference.final_layer_norm(ref.hidden_states[-(clip_skip + 1)])
    out = CLIPTextModel(config).apply({"params": sdjax_params(config, reference)}, ids, mask, clip_skip=clip_skip,
                                      output_hidden_states=True)
    pairs = {"last_hidden_state": (out.last_hidden_state, ref.last_hidden_state),
             "prompt_embeds (clip_skip)": (out.prompt_embeds, ref_skipped),
             "pooler_output": (out.pooler_output, ref.pooler_output)}
    pairs.update({f"hidden_states[{i}]": (ours, theirs)
                  for i, (ours, theirs) in enumerate(zip(out.hidden_states, ref.hidden_states, strict=True))})
    return {name: (relative_l2(ours, theirs.numpy()), max_abs(ours, theirs.numpy()))
            for name, (ours, theirs) in pairs.items()}


@pytest.mark.parametrize("use_mask", [False, True], ids=["no_mask", "padding_mask"])
@pytest.mark.parametrize("config", [SD1_LIKE, SD2_LIKE], ids=["sd1_like", "sd2_like"])
def test_matches_transformers(config, use_mask, tokenizer, tokens):
    errors = compare_with_transformers(config, tokenizer, tokens, use_mask=use_mask)
    worst = {name: rel for name, (rel, _) in errors.items() if not rel < 1e-5}
    assert not worst, f"relative L2 above 1e-5: {worst}"


def test_pooling_rule_follows_eos_token_id(tokenizer, tokens):
    """Legacy configs pool at the largest id, newer ones at the first end-of-text token."""
    ids = tokens[0].copy()
    ids[0, 1] = 999  # an id above end-of-text, like a textual-inversion token
    for eos_token_id in (2, tokenizer.eos_token_id):
        config = dataclasses.replace(configs.TINY_TEXT, eos_token_id=eos_token_id)
        reference = torch_reference(config)
        with torch.no_grad():
            expected = reference(torch.from_numpy(ids).long()).pooler_output.numpy()
        out = CLIPTextModel(config).apply({"params": sdjax_params(config, reference)}, ids)
        np.testing.assert_allclose(out.pooler_output, expected, rtol=1e-5, atol=1e-5)
        position = 1 if eos_token_id == 2 else list(ids[0]).index(tokenizer.eos_token_id)
        np.testing.assert_array_equal(out.pooler_output[0], out.last_hidden_state[0, position])


@pytest.mark.parametrize("config", [SD1_LIKE, SD2_LIKE], ids=["sd1_like", "sd2_like"])
def test_param_names_are_checkpoint_keys(config):
    params = CLIPTextModel(config).init(jax.random.key(0), jnp.zeros((1, 77), jnp.int32))["params"]
    assert set(keymap.state_dict_from_params(params)) == set(checkpoint_state_dict(torch_reference(config)))


@pytest.mark.parametrize("config", [configs.SD15_TEXT, configs.SD21_TEXT], ids=["sd15", "sd21"])
def test_real_architectures_have_transformers_parameter_count(config):
    shapes = jax.eval_shape(CLIPTextModel(config).init, jax.random.key(0), jnp.zeros((1, 77), jnp.int32))
    count = sum(leaf.size for leaf in jax.tree_util.tree_leaves(shapes))
    with torch.device("meta"):
        reference = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config.to_dict()))
    assert count == sum(p.numel() for p in reference.parameters())
    if config is configs.SD15_TEXT:
        assert count == 123_060_480  # openai/clip-vit-large-patch14's text model


def test_attention_implementations_agree(tokens):
    ids, mask = tokens
    params = CLIPTextModel(SD2_LIKE).init(jax.random.key(1), ids)
    outputs = {impl: CLIPTextModel(SD2_LIKE, attention_implementation=impl).apply(params, ids, mask, clip_skip=1)
               for impl in ("einsum", "blocked", "xla")}
    for impl in ("blocked", "xla"):
        for name in ("last_hidden_state", "prompt_embeds", "pooler_output"):
            assert relative_l2(getattr(outputs[impl], name), getattr(outputs["einsum"], name)) < 1e-5, (impl, name)


def test_clip_skip_zero_is_the_last_hidden_state(tokens):
    ids, _ = tokens
    model = CLIPTextModel(configs.TINY_TEXT)
    params = model.init(jax.random.key(0), ids)
    for skip in (0, None):
        out = model.apply(params, ids, clip_skip=skip)
        np.testing.assert_array_equal(out.prompt_embeds, out.last_hidden_state)


@pytest.mark.parametrize("clip_skip", [-1, configs.TINY_TEXT.num_hidden_layers + 1, 1.0])
def test_rejects_clip_skip_out_of_range(clip_skip, tokens):
    model = CLIPTextModel(configs.TINY_TEXT)
    params = model.init(jax.random.key(0), tokens[0])
    with pytest.raises(InvalidArgumentError, match="clip_skip"):
        model.apply(params, tokens[0], clip_skip=clip_skip)


def test_rejects_more_tokens_than_positions():
    model = CLIPTextModel(configs.TINY_TEXT)
    with pytest.raises(InvalidArgumentError, match="max_length=77"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 78), jnp.int32))


def test_bfloat16_compute_stays_close_to_float32(tokens):
    ids, _ = tokens
    params = CLIPTextModel(SD2_LIKE).init(jax.random.key(2), ids)
    full = CLIPTextModel(SD2_LIKE).apply(params, ids).last_hidden_state
    half = CLIPTextModel(SD2_LIKE, dtype=jnp.bfloat16).apply(params, ids).last_hidden_state
    assert half.dtype == jnp.bfloat16
    assert relative_l2(half, full) < 3e-2


# ---- CLIPTextModelWithProjection (SDXL's text_encoder_2) ------------------------------------------------------

SDXL2_LIKE = dataclasses.replace(SD2_LIKE, projection_dim=40)


def projection_reference(config: configs.CLIPTextConfig, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.CLIPTextModelWithProjection(
        transformers.CLIPTextConfig(**config.to_dict(), bos_token_id=0, pad_token_id=1))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def test_with_projection_matches_transformers_through_the_registry(tokenizer, tokens, tmp_path):
    """Saved by transformers, loaded as the registry's text_encoder_2 (no sdjax-specific key handling)."""
    config = dataclasses.replace(SDXL2_LIKE, eos_token_id=tokenizer.eos_token_id)
    reference = projection_reference(config)
    reference.save_pretrained(tmp_path / "text_encoder_2")
    loaded, _ = diffusers_folder.read_config(tmp_path / "text_encoder_2", "text_encoder_2")
    assert loaded == config
    params = diffusers_folder.load_params(tmp_path / "text_encoder_2", "text_encoder_2", loaded)
    ids, _ = tokens
    with torch.no_grad():
        ref = reference(torch.from_numpy(ids).long(), output_hidden_states=True)
    out = COMPONENTS["text_encoder_2"].build(loaded).apply({"params": params}, ids, output_hidden_states=True)
    for ours, theirs in ((out.text_embeds, ref.text_embeds), (out.last_hidden_state, ref.last_hidden_state),
                         (out.hidden_states[-2], ref.hidden_states[-2])):  # SDXL's prompt embeddings
        assert relative_l2(ours, theirs.numpy()) < 1e-5 and max_abs(ours, theirs.numpy()) < 1e-4


def test_with_projection_param_names_are_checkpoint_keys():
    params = COMPONENTS["text_encoder_2"].init(SDXL2_LIKE, jax.random.key(0))
    expected = {k for k in projection_reference(SDXL2_LIKE).state_dict() if not k.endswith("position_ids")}
    assert set(keymap.state_dict_from_params(params)) == expected


def test_sdxl_text_encoder_2_preset_has_transformers_parameter_count():
    config = COMPONENTS["text_encoder_2"].presets["sdxl"]
    count = sum(leaf.size for leaf in jax.tree_util.tree_leaves(COMPONENTS["text_encoder_2"].param_shapes(config)))
    with torch.device("meta"):
        reference = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**config.to_dict()))
    assert count == sum(p.numel() for p in reference.parameters()) == 694_659_840  # SDXL base's text_encoder_2
