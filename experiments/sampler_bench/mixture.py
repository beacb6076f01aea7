"""A Gaussian mixture with diagonal covariances: data whose exact denoiser and moments are closed form. The
sampler benchmark measures samplers on it, and the sampler tests use it as the model their references share.

x0 ~ sum_k w_k N(mu_k, diag(s_k^2)). Noised in variance-exploding scaling, x = x0 + sigma eps, component k
becomes N(mu_k, diag(s_k^2 + sigma^2)), so E[x0 | x] is the responsibility-weighted sum of per-component,
per-coordinate Wiener filters mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k). The probability-flow ODE
dx/dsigma = (x - E[x0 | x]) / sigma then maps the noised marginal at sigma_max exactly onto the data.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from scipy.integrate import solve_ivp


@dataclasses.dataclass(frozen=True)
class Mixture:
    means: np.ndarray    # (K, d)
    stds: np.ndarray     # (K, d) per-coordinate standard deviations
    weights: np.ndarray  # (K,), sums to 1

    @classmethod
    def random(cls, seed: int, components: int, dim: int, mean_scale: float, std_range: tuple[float, float]):
        rng = np.random.default_rng(seed)
        weights = rng.dirichlet(np.full(components, 2.0))
        return cls(means=rng.normal(size=(components, dim)) * mean_scale,
                   stds=rng.uniform(*std_range, size=(components, dim)), weights=weights)

    @classmethod
    def isotropic(cls, means, stds, weights) -> Mixture:
        """Components N(mu_k, s_k^2 I): means (K, d), stds (K,), weights (K,) (normalised here)."""
        means, stds, weights = (np.asarray(a, np.float64) for a in (means, stds, weights))
        if means.ndim != 2 or not stds.shape == weights.shape == (len(means),):
            raise ValueError("means must be (K, d); stds and weights (K,)")
        if np.any(stds <= 0):
            raise ValueError("stds must be > 0 so that the denoiser at sigma = 0 is the identity")
        return cls(means, np.repeat(stds[:, None], means.shape[1], axis=1), weights / np.sum(weights))

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def responsibilities(self, xp, x, sigma):
        """P(component k | x) at noise level sigma, (n, K), for numpy or jax.numpy (`xp`)."""
        means, stds, weights = (xp.asarray(a, x.dtype) for a in (self.means, self.stds, self.weights))
        variance = stds**2 + sigma**2                                          # (K, d)
        diff = x[:, None, :] - means                                           # (n, K, d)
        log_lik = xp.log(weights) - 0.5 * xp.sum(diff**2 / variance + xp.log(variance), axis=-1)
        log_lik = log_lik - xp.max(log_lik, axis=-1, keepdims=True)            # a stable softmax
        return xp.exp(log_lik) / xp.sum(xp.exp(log_lik), axis=-1, keepdims=True)

    def denoise(self, xp, x, sigma):
        """E[x0 | x] for x (n, d) at scalar sigma, written once for numpy and jax.numpy (`xp`)."""
        means, stds = (xp.asarray(a, x.dtype) for a in (self.means, self.stds))
        posterior_means = means + stds**2 / (stds**2 + sigma**2) * (x[:, None, :] - means)   # (n, K, d)
        return xp.sum(self.responsibilities(xp, x, sigma)[..., None] * posterior_means, axis=1)

    def component(self, x: np.ndarray, sigma: float) -> np.ndarray:
        """The most probable component of each point of x (n, d) at noise level sigma, (n,) ints."""
        return np.argmax(self.responsibilities(np, np.asarray(x), sigma), axis=-1)

    def sample_jax(self, key, n: int, sigma, dtype=jnp.float32) -> jax.Array:
        """`sample` drawn with a JAX key, in `dtype`."""
        component_key, normal_key = jax.random.split(key)
        k = jax.random.choice(component_key, len(self.weights), (n,), p=jnp.asarray(self.weights))
        scale = jnp.sqrt(jnp.asarray(self.stds, dtype)[k] ** 2 + jnp.asarray(sigma, dtype) ** 2)
        return jnp.asarray(self.means, dtype)[k] + scale * jax.random.normal(normal_key, (n, self.dim), dtype)

    def sample(self, rng: np.random.Generator, n: int, sigma: float = 0.0) -> np.ndarray:
        """n exact samples of the marginal at noise level sigma (0: the data), float64 (n, d)."""
        k = rng.choice(len(self.weights), size=n, p=self.weights)
        scale = np.sqrt(self.stds[k] ** 2 + sigma**2)
        return self.means[k] + scale * rng.standard_normal(self.means[k].shape)

    def mean(self) -> np.ndarray:
        return self.weights @ self.means

    def covariance(self) -> np.ndarray:
        centred = self.means - self.mean()
        within = np.diag(self.weights @ self.stds**2)
        return within + (self.weights[:, None] * centred).T @ centred


def solve_flow(mixture: Mixture, x_start: np.ndarray, sigma_start: float, sigma_end: float,
               tolerance: float = 1e-12, sigma_zero: float = 1e-8) -> np.ndarray:
    """The probability-flow ODE's exact solution at sigma_end from x_start at sigma_start, to ~tolerance.

    In u = log sigma the ODE reads dx/du = x - E[x0 | x], smooth down to sigma -> 0, and DOP853 integrates it.
    For sigma_end = 0 it stops at sigma_zero, where x differs from its limit by O(sigma_zero^2 / std^2), and one
    denoiser call removes the remaining noise.
    """
    shape = x_start.shape
    stop = sigma_end if sigma_end > 0 else sigma_zero

    def velocity(u, flat):
        x = flat.reshape(shape)
        return (x - mixture.denoise(np, x, np.exp(u))).ravel()

    solution = solve_ivp(velocity, (np.log(sigma_start), np.log(stop)), x_start.ravel(), method="DOP853",
                         rtol=tolerance, atol=tolerance)
    if not solution.success:
        raise RuntimeError(f"reference ODE solve failed: {solution.message}")
    x_end = solution.y[:, -1].reshape(shape)
    return x_end if sigma_end > 0 else mixture.denoise(np, x_end, sigma_zero)
