"""The sampler tests' model: a small Gaussian mixture (experiments/sampler_bench/mixture.py) whose exact denoiser
is known in closed form, callable from JAX (sdjax's samplers) and torch (k-diffusion's and diffusers' references).

A sampler that solves the probability-flow ODE (or the matching SDE) from the exact prior at sigma_max returns
data with exactly the moments `mean()` and `covariance()`, up to discretisation error.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import torch

from experiments.sampler_bench.mixture import Mixture


class TestMixture(Mixture):
    __test__ = False  # not a pytest class

    def denoise_jax(self, x, sigma):
        """E[x0 | x] for x of shape (n, d) at scalar noise level sigma (may be traced), in x's dtype."""
        return self.denoise(jnp, x, jnp.asarray(sigma, x.dtype))

    def denoise_torch(self, x, sigma):
        """E[x0 | x] for a torch tensor x (n, d); sigma a float or 0-d/1-element tensor; in x's dtype."""
        x_np = x.detach().numpy()
        sigma = np.asarray(float(sigma), x_np.dtype)
        return torch.from_numpy(np.asarray(self.denoise(np, x_np, sigma), x_np.dtype))

    def sample_prior(self, key, n, sigma, dtype=jnp.float32):
        """n exact samples, shape (n, d), of the noised marginal at level sigma (sigma = 0: the data)."""
        return self.sample_jax(key, n, sigma, dtype)


def default_mixture() -> TestMixture:
    """A 2-D, 3-component mixture with unequal weights and widths: curved ODE paths, non-Gaussian data."""
    return TestMixture.isotropic(means=[[-2.0, 0.5], [1.5, 1.0], [0.5, -2.0]], stds=[0.3, 0.6, 0.4],
                                 weights=[0.5, 0.3, 0.2])
