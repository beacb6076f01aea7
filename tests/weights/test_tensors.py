"""safetensors reading/writing checked against the reference `safetensors` package, and the file errors."""
import json

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch

from sdjax.errors import WeightsError
from sdjax.weights import tensors


def sample_tensors():
    rng = np.random.default_rng(0)
    return {"a.weight": rng.normal(size=(3, 4)).astype(np.float32),
            "b.bias": rng.normal(size=(5,)).astype(np.float16),
            "c.ids": np.arange(6, dtype=np.int64).reshape(2, 3)}


def test_reads_what_the_reference_library_writes(tmp_path):
    path = tmp_path / "model.safetensors"
    safetensors.numpy.save_file(sample_tensors(), path)
    loaded = tensors.read_safetensors(path)
    for name, value in sample_tensors().items():
        np.testing.assert_array_equal(loaded[name], value)
        assert loaded[name].dtype == value.dtype


def test_read_tensors_reach_the_device_without_a_copy(tmp_path):
    """Weights in memory once while a pipeline loads: read arrays are aligned so that jax.device_put on CPU takes
    them as they are (the same buffer), and params_from_state_dict(consume=True) lets each file tensor go once
    converted."""
    import jax

    from sdjax.weights import keymap

    path = tmp_path / "model.safetensors"
    safetensors.numpy.save_file({"layer.weight": np.ones((8, 4, 3, 3), np.float32),
                                 "layer.bias": np.arange(8, dtype=np.float32)}, path)
    state = tensors.read_safetensors(path)
    bias = state["layer.bias"]
    assert bias.ctypes.data % tensors.ALIGNMENT == 0
    expected = {"layer": {"kernel": jax.ShapeDtypeStruct((3, 3, 4, 8), np.float32),
                          "bias": jax.ShapeDtypeStruct((8,), np.float32)}}
    params = keymap.params_from_state_dict(state, expected, source=str(path), consume=True)
    assert state == {}
    assert params["layer"]["bias"] is bias  # already in layout: not copied
    kernel = params["layer"]["kernel"]  # transposed into one aligned copy
    assert kernel.flags.c_contiguous and kernel.ctypes.data % tensors.ALIGNMENT == 0
    on_device = jax.device_put(params)
    assert on_device["layer"]["kernel"].unsafe_buffer_pointer() == kernel.ctypes.data


def test_written_files_load_in_the_reference_library_bfloat16_included(tmp_path):
    path = tmp_path / "out.safetensors"
    values = {**sample_tensors(), "d.bf16": np.linspace(-2, 2, 8).astype(ml_dtypes.bfloat16)}
    tensors.write_safetensors(path, values, metadata={"format": "pt"})
    import safetensors.torch
    reference = safetensors.torch.load_file(path)
    assert reference["d.bf16"].dtype == torch.bfloat16
    np.testing.assert_array_equal(reference["d.bf16"].float().numpy(), values["d.bf16"].astype(np.float32))
    np.testing.assert_array_equal(reference["a.weight"].numpy(), values["a.weight"])
    assert not list(tmp_path.glob("*.partial"))


def test_truncated_file_names_the_file_and_the_tensor(tmp_path):
    path = tmp_path / "model.safetensors"
    safetensors.numpy.save_file(sample_tensors(), path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(WeightsError, match=r"model\.safetensors: tensor 'b\.bias' .* truncated"):
        tensors.read_safetensors(path)
    path.write_bytes(b"\x00" * 5)
    with pytest.raises(WeightsError, match="truncated or empty"):
        tensors.read_safetensors(path)


def test_weight_files_are_found_by_variant_and_shards(tmp_path):
    safetensors.numpy.save_file(sample_tensors(), tmp_path / "diffusion_pytorch_model.fp16.safetensors")
    assert tensors.find_weight_files(tmp_path, "fp16") == [tmp_path / "diffusion_pytorch_model.fp16.safetensors"]
    with pytest.raises(WeightsError, match="no weight file found|no weight file"):
        tensors.find_weight_files(tmp_path)
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    values = sample_tensors()
    safetensors.numpy.save_file({"a.weight": values["a.weight"]}, shard_dir / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                            "b.bias": "model-00002-of-00002.safetensors"}}
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError, match="shard model-00002-of-00002.safetensors is listed but missing"):
        tensors.find_weight_files(shard_dir)
    safetensors.numpy.save_file({"b.bias": values["b.bias"]}, shard_dir / "model-00002-of-00002.safetensors")
    merged = tensors.read_weights(tensors.find_weight_files(shard_dir))
    assert sorted(merged) == ["a.weight", "b.bias"]


def test_torch_pickles_load_only_weights(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.arange(4.0), "step": 3}, path)
    assert list(tensors.read_torch_pickle(path)) == ["w"]
    evil = tmp_path / "evil.bin"
    torch.save({"w": torch.ones(1), "obj": object()}, evil)
    with pytest.raises(WeightsError, match="evil.bin: cannot read PyTorch checkpoint"):
        tensors.read_torch_pickle(evil)


def test_pickle_without_torch_is_a_clear_error(tmp_path, without_torch):
    without_torch()
    with pytest.raises(WeightsError, match="pytorch_model.bin is a PyTorch pickle and torch is not installed"):
        tensors.read_torch_pickle(tmp_path / "pytorch_model.bin")
