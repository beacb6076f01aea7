"""Model tests. Helpers here are shared by the parity tests that compare sdjax models with diffusers/torch."""
from __future__ import annotations

import numpy as np


def perturb_(torch_module, seed: int = 0, scale: float = 0.05):
    """Add N(0, scale^2) noise to every parameter in place, so no layer stays zero-initialised; returns the module."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in torch_module.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
    return torch_module.eval()


def torch_state_dict(torch_module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in torch_module.state_dict().items()}


def reference_pair(torch_class, flax_class, config, param_shapes):
    """(the diffusers model of `config` with perturbed weights, the sdjax module, those weights as its params)."""
    import torch

    from sdjax.weights import keymap

    torch.manual_seed(0)
    torch_model = perturb_(torch_class(**config.to_dict()))
    params = keymap.params_from_state_dict(torch_state_dict(torch_model), param_shapes, source="test")
    return torch_model, flax_class(config), params


def nchw(x) -> np.ndarray:
    """NHWC numpy/jax array -> NCHW numpy (for feeding torch)."""
    return np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2))


def nhwc(x) -> np.ndarray:
    """NCHW torch tensor or array -> NHWC numpy."""
    x = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    return x.transpose(0, 2, 3, 1)


def errors(actual, expected) -> tuple[float, float]:
    """(relative L2 error, max abs error) of `actual` against the reference `expected`, in float64."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    diff = actual - expected
    return float(np.linalg.norm(diff) / np.linalg.norm(expected)), float(np.abs(diff).max())


def optimised_hlo(fn, *args) -> str:
    import jax

    return jax.jit(fn).lower(*args).compile().as_text()


def bfloat16_dots(hlo: str) -> int:
    """How many dots of an optimised program take bfloat16 operands (XLA:CPU runs those on bfloat16 units; the
    operands of other bfloat16 dots it converts to float32)."""
    from experiments.perf.kernels import product_operand_types

    return sum(all(t == "bf16" for t in types) for types in product_operand_types(hlo, "dot"))
