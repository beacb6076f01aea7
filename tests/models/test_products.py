"""The Dense / Conv products: float32 accumulation in low precision, and on CPU a bfloat16 convolution computed as
matmuls that XLA:CPU can run on bfloat16 units. Checked against torch's convolution and linear layers."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sdjax.models import products
from sdjax.models.layers import make_conv, make_dense
from tests.models import bfloat16_dots, errors, nchw, nhwc, optimised_hlo

CASES = [  # (kernel, stride, padding): SD's 3x3 convs, the U-Net's and the VAE encoder's downsamplers, 1x1 shortcuts
    (3, 1, ((1, 1), (1, 1))),
    (3, 2, ((1, 1), (1, 1))),
    (3, 2, ((0, 1), (0, 1))),
    (1, 1, ((0, 0), (0, 0))),
]


def _inputs(kernel, channels=(24, 16), size=(9, 10), seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, *size, channels[0])).astype(np.float32)
    w = (rng.standard_normal((kernel, kernel, *channels)) / np.sqrt(kernel * kernel * channels[0])).astype(np.float32)
    return x, w


def _torch_conv(x, w, stride, padding):
    (top, bottom), (left, right) = padding
    padded = F.pad(torch.from_numpy(nchw(x)), (left, right, top, bottom))
    return nhwc(F.conv2d(padded, torch.from_numpy(w.transpose(3, 2, 0, 1).copy()), stride=stride))


@pytest.mark.parametrize("kernel,stride,padding", CASES)
def test_conv_as_matmuls_matches_torch_conv(kernel, stride, padding):
    x, w = _inputs(kernel)
    out = jax.jit(products.conv_as_matmuls, static_argnums=(2, 3))(x, w, (stride, stride), padding)
    rel, max_abs = errors(out, _torch_conv(x, w, stride, padding))
    assert rel <= 1e-6 and max_abs <= 1e-5, (rel, max_abs)


@pytest.mark.parametrize("kernel,stride,padding", CASES)
def test_bfloat16_conv_layer_rounds_once_from_float32(kernel, stride, padding):
    x, w = _inputs(kernel)
    layer = nn.Conv(w.shape[-1], (kernel, kernel), strides=stride, padding=padding, dtype=jnp.bfloat16,
                    conv_general_dilated=products.conv_general_dilated)
    bias = np.linspace(-1, 1, w.shape[-1], dtype=np.float32)
    out = jax.jit(layer.apply)({"params": {"kernel": w, "bias": bias}}, x)
    assert out.dtype == jnp.bfloat16
    # the reference convolves the bfloat16-rounded inputs exactly: what is left is the output's one rounding
    rounded = [np.asarray(jnp.asarray(a, jnp.bfloat16), np.float32) for a in (x, w, bias)]
    expected = _torch_conv(rounded[0], rounded[1], stride, padding) + rounded[2]
    rel, max_abs = errors(np.asarray(out, np.float32), expected)
    assert rel <= 4e-3, (rel, max_abs)  # bfloat16 keeps 8 bits: one rounding is <= 2^-9 relative


def _bfloat16_layer(make):
    """A module computing in bfloat16 (float32 params) that applies the layer `make(module)` builds."""
    class Layer(nn.Module):
        dtype = jnp.bfloat16
        param_dtype = jnp.float32

        @nn.compact
        def __call__(self, x):
            return make(self)(x)

    return Layer


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the matmul form is XLA:CPU's bfloat16 convolution")
def test_bfloat16_conv_on_cpu_is_bfloat16_dots_with_float32_results():
    x, w = _inputs(3)
    xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    hlo = optimised_hlo(lambda a, b: products.conv_general_dilated(a, b, (1, 1), ((1, 1), (1, 1)),
                                                                    dimension_numbers=products.NHWC), xb, wb)
    assert "convolution(" not in hlo and bfloat16_dots(hlo) == 9


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks what XLA:CPU is handed")
def test_bfloat16_dense_dot_takes_bfloat16_operands():
    Layer = _bfloat16_layer(lambda m: make_dense(m, 32, "proj"))
    x = jnp.ones((4, 7, 48), jnp.bfloat16)
    params = Layer().init(jax.random.key(0), x)
    hlo = optimised_hlo(Layer().apply, params, x)
    assert bfloat16_dots(hlo) == 1
    assert Layer().apply(params, x).dtype == jnp.bfloat16


def test_float32_products_are_lax_exactly():
    x, w = _inputs(3)
    args = ((1, 1), ((1, 1), (1, 1)))
    expected = jax.lax.conv_general_dilated(x, w, *args, dimension_numbers=products.NHWC)
    np.testing.assert_array_equal(products.conv_general_dilated(x, w, *args, dimension_numbers=products.NHWC),
                                  expected)
    a, b = x.reshape(-1, 24), w[1, 1]
    dims = (((1,), (0,)), ((), ()))
    np.testing.assert_array_equal(products.dot_general(a, b, dims), jax.lax.dot_general(a, b, dims))


def test_layers_built_by_make_conv_use_the_products():
    Layer = _bfloat16_layer(lambda m: make_conv(m, 8, 3, "conv"))
    x = jnp.ones((1, 6, 6, 4), jnp.bfloat16)
    params = Layer().init(jax.random.key(0), x)
    if jax.default_backend() == "cpu":
        assert "convolution(" not in optimised_hlo(Layer().apply, params, x)
    assert Layer().apply(params, x).shape == (1, 6, 6, 8)
