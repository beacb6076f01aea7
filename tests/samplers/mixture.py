"""An isotropic Gaussian mixture whose exact denoiser is known in closed form: the sampler tests' model.

Data x0 ~ sum_k w_k N(mu_k, s_k^2 I) in d dimensions (the last axis of x). Noised in variance-exploding
scaling, x = x0 + sigma * eps, component k becomes N(mu_k, (s_k^2 + sigma^2) I), so the optimal denoiser
E[x0 | x] is a responsibility-weighted sum of per-component Wiener filters. A sampler that solves the
probability-flow ODE (or the matching SDE) from the exact prior at sigma_max therefore returns data with
exactly the moments `mean()` and `covariance()`, up to discretisation error.

API: Mixture(means (K, d), stds (K,), weights (K,)); .denoise_jax(x, sigma); .denoise_torch(x, sigma);
.sample_prior(key, n, sigma); .mean(); .covariance().
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch


class Mixture:
    def __init__(self, means, stds, weights):
        self.means = np.asarray(means, np.float64)
        self.stds = np.asarray(stds, np.float64)
        self.weights = np.asarray(weights, np.float64) / np.sum(weights)
        if self.means.ndim != 2 or self.stds.shape != self.weights.shape != (len(self.means),):
            raise ValueError("means must be (K, d); stds and weights (K,)")
        if np.any(self.stds <= 0):
            raise ValueError("stds must be > 0 so that the denoiser at sigma = 0 is the identity")

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def mean(self):
        """E[x0], shape (d,)."""
        return self.weights @ self.means

    def covariance(self):
        """Cov[x0], shape (d, d): within-component isotropic variance plus the spread of the means."""
        centred = self.means - self.mean()
        within = np.sum(self.weights * self.stds**2) * np.eye(self.dim)
        return within + (self.weights[:, None] * centred).T @ centred

    def _denoise(self, xp, softmax, x, sigma, means, stds, weights):
        """The denoiser written once for both array libraries (`xp` is jax.numpy or torch)."""
        variance = stds**2 + sigma**2                                    # (K,)
        diff = x[..., None, :] - means                                   # (..., K, d)
        log_lik = xp.log(weights) - 0.5 * (diff**2).sum(-1) / variance - 0.5 * self.dim * xp.log(variance)
        responsibilities = softmax(log_lik)                              # (..., K)
        wiener_gain = (stds**2 / variance)[:, None]
        posterior_means = means + wiener_gain * diff                     # (..., K, d)
        return (responsibilities[..., None] * posterior_means).sum(-2)

    def denoise_jax(self, x, sigma):
        """E[x0 | x] for x of shape (..., d) at scalar noise level sigma (may be traced), in x's dtype."""
        cast = lambda a: jnp.asarray(a, x.dtype)
        sigma = jnp.asarray(sigma, x.dtype)
        softmax = lambda z: jax.nn.softmax(z, axis=-1)
        return self._denoise(jnp, softmax, x, sigma, cast(self.means), cast(self.stds), cast(self.weights))

    def denoise_torch(self, x, sigma):
        """E[x0 | x] for a torch tensor x (..., d); sigma a float or 0-d/1-element tensor, in x's dtype."""
        cast = lambda a: torch.as_tensor(a, dtype=x.dtype)
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(())
        softmax = lambda z: torch.softmax(z, dim=-1)
        return self._denoise(torch, softmax, x, sigma, cast(self.means), cast(self.stds), cast(self.weights))

    def sample_prior(self, key, n, sigma, dtype=jnp.float32):
        """n exact samples, shape (n, d), of the noised marginal at level sigma (sigma = 0: the data)."""
        component_key, normal_key = jax.random.split(key)
        k = jax.random.choice(component_key, len(self.weights), (n,), p=jnp.asarray(self.weights))
        scale = jnp.sqrt(jnp.asarray(self.stds, dtype)[k] ** 2 + jnp.asarray(sigma, dtype) ** 2)
        noise = jax.random.normal(normal_key, (n, self.dim), dtype)
        return jnp.asarray(self.means, dtype)[k] + scale[:, None] * noise


def default_mixture() -> Mixture:
    """A 2-D, 3-component mixture with unequal weights and widths: curved ODE paths, non-Gaussian data."""
    return Mixture(means=[[-2.0, 0.5], [1.5, 1.0], [0.5, -2.0]], stds=[0.3, 0.6, 0.4], weights=[0.5, 0.3, 0.2])
