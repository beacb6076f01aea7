"""The model's parameterisation: training targets, Min-SNR weights and the samplers' denoiser coefficients are
one object per prediction type, and they agree with each other (the denoiser inverts the training target)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax import parameterization as P


def _draws():
    key_x, key_n = jax.random.split(jax.random.key(0))
    x0, noise = jax.random.normal(key_x, (3, 4, 4, 2)), jax.random.normal(key_n, (3, 4, 4, 2))
    return x0, noise, jnp.array([0.99, 0.5, 0.01])


def test_targets_recover_the_clean_latent():
    x0, noise, alpha_bar = _draws()
    x_t = P.add_noise(x0, noise, alpha_bar)
    a, s = jnp.sqrt(alpha_bar)[:, None, None, None], jnp.sqrt(1 - alpha_bar)[:, None, None, None]
    target = {name: p.target(x0, noise, alpha_bar) for name, p in P.PARAMETERIZATIONS.items()}
    np.testing.assert_allclose((x_t - s * target["epsilon"]) / a, x0, atol=1e-4)
    np.testing.assert_allclose(a * x_t - s * target["v_prediction"], x0, atol=1e-5)
    assert target["sample"] is x0


@pytest.mark.parametrize("prediction_type", list(P.PARAMETERIZATIONS))
def test_the_denoiser_inverts_the_training_target(prediction_type):
    """A network that outputs exactly its training target makes the sampler's denoiser return x0."""
    model = P.parameterization(prediction_type)
    x0, noise, alpha_bar = _draws()
    sigma = P.sigma_from_alpha_bar(alpha_bar)
    x_ve = P.from_vp(P.add_noise(x0, noise, alpha_bar), sigma)
    np.testing.assert_allclose(model.denoised(x_ve, sigma, model.target(x0, noise, alpha_bar)), x0, atol=2e-5)


@pytest.mark.parametrize("prediction_type, expected", [
    ("epsilon", [1.0, 1.0, 5.0 / 20.0]),          # min(snr, 5) / snr
    ("v_prediction", [0.0, 2.0 / 3.0, 5.0 / 21.0]),  # min(snr, 5) / (snr + 1)
    ("sample", [0.0, 2.0, 5.0]),                  # min(snr, 5)
])
def test_min_snr_weights_including_zero_terminal_snr(prediction_type, expected):
    alpha_bar = jnp.array([0.0, 2.0 / 3.0, 20.0 / 21.0])  # SNR 0, 2, 20
    model = P.parameterization(prediction_type)
    np.testing.assert_allclose(model.loss_weight(alpha_bar, 5.0), expected, rtol=1e-5)
    assert np.all(model.loss_weight(alpha_bar, 0.0) == 1.0)
