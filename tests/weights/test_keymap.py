"""The PyTorch <-> Flax rules, checked on a small module pair whose outputs must agree after conversion."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sdjax.errors import WeightsError
from sdjax.weights import keymap


class TorchNet(torch.nn.Module):
    """One of each layer kind the rules cover, with a list of blocks and a name that ends in a digit."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 8)
        self.blocks = torch.nn.ModuleList([torch.nn.Conv2d(8, 8, 3, padding=1) for _ in range(2)])
        self.norm = torch.nn.GroupNorm(4, 8)
        self.linear_1 = torch.nn.Linear(8, 5)

    def forward(self, ids):
        h = self.embed(ids).permute(0, 3, 1, 2)  # (B, 8, H, W)
        for block in self.blocks:
            h = block(h)
        return self.linear_1(self.norm(h).permute(0, 2, 3, 1))


class FlaxNet(nn.Module):
    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(10, 8, name="embed")(ids)
        for i in range(2):
            h = nn.Conv(8, (3, 3), padding=1, name=f"blocks.{i}")(h)
        h = nn.GroupNorm(num_groups=4, epsilon=1e-5, name="norm")(h)
        return nn.Dense(5, name="linear_1")(h)


@pytest.fixture
def torch_net():
    torch.manual_seed(0)
    return TorchNet().eval()


def state_dict(module):
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def expected_params():
    return jax.eval_shape(FlaxNet().init, jax.random.key(0), jnp.zeros((1, 4, 4), jnp.int32))["params"]


def test_imported_params_reproduce_torch_outputs(torch_net):
    for p in torch_net.parameters():  # move norms off their identity init
        p.data.add_(torch.randn_like(p) * 0.1)
    ids = np.random.default_rng(0).integers(0, 10, size=(2, 4, 6))
    params = keymap.params_from_state_dict(state_dict(torch_net), expected_params(), source="test")
    ours = FlaxNet().apply({"params": params}, jnp.asarray(ids))
    reference = torch_net(torch.from_numpy(ids)).detach().numpy()
    np.testing.assert_allclose(np.asarray(ours), reference, rtol=1e-5, atol=1e-5)


def test_export_restores_the_torch_state_dict_exactly(torch_net):
    original = state_dict(torch_net)
    params = keymap.params_from_state_dict(original, expected_params(), source="test")
    exported = keymap.state_dict_from_params(params)
    assert exported.keys() == original.keys()
    for key, value in original.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_mismatches_are_reported_by_key(torch_net):
    original = state_dict(torch_net)
    broken = dict(original)
    del broken["norm.bias"]
    broken["extra.weight"] = np.zeros(3, np.float32)
    broken["linear_1.weight"] = np.zeros((4, 8), np.float32)
    with pytest.raises(WeightsError) as err:
        keymap.params_from_state_dict(broken, expected_params(), source="weights.safetensors")
    message = str(err.value)
    assert "weights.safetensors" in message
    assert "missing keys: norm.bias" in message
    assert "unexpected keys: extra.weight" in message
    assert "linear_1.weight: file has (4, 8), model expects (5, 8)" in message


def test_legacy_attention_names_and_1x1_conv_weights_are_accepted():
    class Attention(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4, name="to_q")(x) + nn.Dense(4, name="to_out.0")(x)

    expected = jax.eval_shape(Attention().init, jax.random.key(0), jnp.zeros((1, 4)))["params"]
    rng = np.random.default_rng(0)
    shapes = {"query.weight": (4, 4, 1, 1), "query.bias": (4,), "proj_attn.weight": (4, 4), "proj_attn.bias": (4,)}
    legacy = {key: rng.normal(size=shape).astype(np.float32) for key, shape in shapes.items()}
    params = keymap.params_from_state_dict(legacy, expected, source="old.ckpt")
    np.testing.assert_array_equal(params["to_q"]["kernel"], legacy["query.weight"][:, :, 0, 0].T)
    np.testing.assert_array_equal(params["to_out.0"]["kernel"], legacy["proj_attn.weight"].T)
