"""The products every Dense and Conv layer computes, accumulated in float32 whatever the parameters' dtype.

`dot_general` and `conv_general_dilated` are drop-ins for flax's `Dense(dot_general=...)` and
`Conv(conv_general_dilated=...)`. In float32 they are exactly lax's. In bfloat16 they ask for a float32 result
and round it once: what torch and cuDNN do, and on XLA:CPU the difference between using the CPU's bfloat16 units
or not. XLA:CPU (jaxlib 0.10.2) hands a bfloat16 x bfloat16 -> float32 dot to YNNPACK, which runs it on
AVX512-BF16 / AMX (2048^3: 3.3x the float32 dot's GFLOP/s on a 2-core AMX Xeon, measured beside a training
run), while a dot with a bfloat16 result, and any bfloat16 convolution, it converts to float32 first. So on CPU a
bfloat16 convolution is computed as matmuls (`conv_as_matmuls`). The SD 1.5 U-Net call in bfloat16 went from
1.04x to 0.48x its float32 time on that Xeon (experiments/perf/results/unet_sd15_dtypes_xeon.md).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NHWC = ("NHWC", "HWIO", "NHWC")


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    dtype = preferred_element_type or jnp.result_type(lhs, rhs)
    out = jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                              preferred_element_type=jnp.float32)
    return out.astype(dtype)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, preferred_element_type=None):
    dtype = preferred_element_type or jnp.result_type(lhs, rhs)
    plain = (lhs_dilation in (None, (1, 1)) and rhs_dilation in (None, (1, 1)) and feature_group_count == 1
             and not isinstance(padding, str))
    if dtype == jnp.bfloat16 and plain and jax.default_backend() == "cpu" and _is_nhwc(lhs, rhs, dimension_numbers):
        return conv_as_matmuls(lhs, rhs, window_strides, padding).astype(dtype)
    out = jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                       dimension_numbers, feature_group_count, precision=precision,
                                       preferred_element_type=jnp.float32)
    return out.astype(dtype)


def _is_nhwc(lhs, rhs, dimension_numbers) -> bool:
    return (lhs.ndim == 4 and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
            == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC))


def conv_as_matmuls(x, kernel, strides, padding):
    """A 2-D convolution of NHWC `x` with an HWIO `kernel` as one matmul per kernel tap: tap (i, j) multiplies
    the input shifted by (i, j) (and strided) by kernel[i, j]; the products are summed in float32."""
    kernel_h, kernel_w = kernel.shape[:2]
    stride_h, stride_w = strides
    x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    batch, height, width, channels = x.shape
    out_h, out_w = (height - kernel_h) // stride_h + 1, (width - kernel_w) // stride_w + 1
    out = None
    for i in range(kernel_h):
        for j in range(kernel_w):
            tap = jax.lax.slice(x, (0, i, j, 0), (batch, i + stride_h * (out_h - 1) + 1,
                                                 j + stride_w * (out_w - 1) + 1, channels), (1, stride_h, stride_w, 1))
            term = jax.lax.dot_general(tap, kernel[i, j], (((3,), (0,)), ((), ())),
                                       preferred_element_type=jnp.float32)
            out = term if out is None else out + term
    return out
