"""Loss pieces, the optimizer schedule, EMA and gradient accumulation, on stand-in models (no compilation of
real networks)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax import schedules
from sdjax.errors import ConfigError
from sdjax.models.configs import VAEConfig
from sdjax.train import losses
from sdjax.train.config import DiffusionConfig, OptimizerConfig, TrainConfig
from sdjax.train.state import (
    create_state,
    ema_decay_at,
    learning_rate_schedule,
    make_optimizer,
)
from sdjax.train.step import make_gradient_fn, make_train_step
from sdjax.train.task import training_scheduler_config


def test_offset_noise_shifts_each_channel_mean():
    noise = losses.sample_noise(jax.random.key(1), (512, 8, 8, 4), offset_noise=0.5)
    channel_means = noise.mean(axis=(1, 2))
    assert 0.4 < float(channel_means.std()) < 0.6
    plain = losses.sample_noise(jax.random.key(1), (512, 8, 8, 4), offset_noise=0.0)
    assert float(plain.mean(axis=(1, 2)).std()) < 0.2


def test_caption_dropout():
    ids, empty = jnp.arange(12).reshape(3, 4), jnp.full((4,), 7)
    assert np.all(losses.drop_captions(jax.random.key(0), ids, empty, 1.0) == 7)
    assert np.all(losses.drop_captions(jax.random.key(0), ids, empty, 0.0) == ids)


class Stub:
    """A flax-like module: `apply(variables, *inputs)` calls `fn(params, *inputs)`."""

    def __init__(self, fn):
        self.fn = fn

    def apply(self, variables, *inputs, **_):
        return self.fn(variables["params"], *inputs)


def stub_diffusion_loss(alphas_cumprod, prediction_type="epsilon", **config):
    text = Stub(lambda p, ids: type("Out", (), {"prompt_embeds": jnp.zeros((ids.shape[0], 1, 1))}))
    unet = Stub(lambda p, x, t, context: p["scale"] * x)
    return losses.make_diffusion_loss(unet, losses.text_encoder_conditioning(text), alphas_cumprod=alphas_cumprod, prediction_type=prediction_type,
                                      config=DiffusionConfig(**config), vae_config=VAEConfig(scaling_factor=1.0),
                                      empty_ids=jnp.zeros((4,), jnp.int32))


def test_zero_terminal_snr_schedule_gives_a_finite_loss_at_the_last_timestep():
    scheduler = training_scheduler_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085,
                                           "beta_end": 0.012}, TrainConfig(diffusion=DiffusionConfig(
                                               zero_terminal_snr=True, prediction_type="v_prediction")))
    alphas_cumprod = schedules.alphas_cumprod_from_config(scheduler)
    assert alphas_cumprod[-1] == 0.0 and scheduler["prediction_type"] == "v_prediction"
    batch = {"moments": jnp.concatenate([jnp.ones((2, 4, 4, 4)), jnp.full((2, 4, 4, 4), -30.0)], -1),
             "input_ids": jnp.ones((2, 4), jnp.int32)}
    for prediction_type in ("epsilon", "v_prediction", "sample"):
        loss_fn = stub_diffusion_loss(alphas_cumprod[-1:], prediction_type, min_snr_gamma=5.0)  # only t = T
        loss, _ = loss_fn({"unet": {"scale": 1.0}}, {"text_encoder": {}}, batch, jax.random.key(0))
        assert np.isfinite(float(loss))
    # eps-prediction at zero SNR: x_t is the noise itself, so the identity network is exact.
    loss, _ = stub_diffusion_loss(alphas_cumprod[-1:])({"unet": {"scale": 1.0}}, {"text_encoder": {}}, batch,
                                                       jax.random.key(0))
    assert float(loss) == 0.0


def test_a_chosen_beta_schedule_replaces_the_folders_own_as_diffusers_computes_it():
    from diffusers import DDPMScheduler
    base = {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "trained_betas": [0.5] * 1000}
    sd = DiffusionConfig(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    scheduler = training_scheduler_config(base, TrainConfig(diffusion=sd))
    reference = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    np.testing.assert_allclose(schedules.alphas_cumprod_from_config(scheduler), reference.numpy(), rtol=1e-6)
    kept = training_scheduler_config(base, TrainConfig(diffusion=DiffusionConfig(beta_schedule="")))
    assert kept == base  # '' keeps the folder's schedule, its beta table included
    later_end = training_scheduler_config(base, TrainConfig(diffusion=DiffusionConfig(beta_end=0.03)))
    assert "trained_betas" not in later_end and later_end["beta_end"] == 0.03  # the table would ignore beta_end
    with pytest.raises(ConfigError, match="diffusion.beta_schedule"):
        DiffusionConfig(beta_schedule="scaled-linear")
    with pytest.raises(ConfigError, match="beta_start"):
        DiffusionConfig(beta_start=0.02, beta_end=0.01)


def test_learning_rate_schedules_and_ema_warmup():
    constant = learning_rate_schedule(OptimizerConfig(learning_rate=1.0, warmup_steps=4), 100)
    np.testing.assert_allclose([constant(s) for s in (0, 2, 4, 50)], [0.0, 0.5, 1.0, 1.0])
    cosine = learning_rate_schedule(OptimizerConfig(learning_rate=1.0, warmup_steps=0, schedule="cosine",
                                                    final_learning_rate_fraction=0.1), 100)
    np.testing.assert_allclose([cosine(0), cosine(50), cosine(100)], [1.0, 0.55, 0.1], rtol=1e-5)
    np.testing.assert_allclose([ema_decay_at(0, 0.999), ema_decay_at(10_000, 0.999)], [0.1, 0.999], rtol=1e-6)


def quadratic_loss(params, frozen, batch, key):
    loss = jnp.mean(jnp.square(batch["x"] @ params["w"] - batch["y"]))
    return loss, {"loss": loss}


def test_gradient_accumulation_matches_the_whole_batch():
    params = {"w": jnp.arange(6.0).reshape(3, 2) / 10}
    batch = {"x": jax.random.normal(jax.random.key(0), (8, 3)), "y": jnp.ones((8, 2))}
    whole = make_gradient_fn(quadratic_loss, 1)(params, {}, batch, jax.random.key(1))
    accumulated = make_gradient_fn(quadratic_loss, 4)(params, {}, batch, jax.random.key(1))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), whole, accumulated)


def test_train_step_updates_params_ema_and_step_and_keeps_frozen():
    optimizer = make_optimizer(OptimizerConfig(learning_rate=0.1, ema_decay=0.5), 10)
    frozen = {"text_encoder": jnp.ones(3)}
    state = create_state({"w": jnp.ones((3, 2))}, frozen, optimizer)
    step = make_train_step(quadratic_loss, optimizer, ema_decay=0.5, grad_accumulation=2)
    batch = {"x": jnp.ones((4, 3)), "y": jnp.zeros((4, 2))}
    new, metrics = step(state, batch, jax.random.key(0))
    assert int(new.step) == 1 and new.frozen is frozen and float(metrics["grad_norm"]) > 0
    # decay at step 0 is min(0.5, 1/10): the EMA moves 90% of the way to the new params
    np.testing.assert_allclose(new.ema_params["w"], 0.1 * 1.0 + 0.9 * new.params["w"], rtol=1e-6)


def test_text_encoder_learning_rate_sets_its_own_step_size():
    # Adam's first update is lr * sign(gradient) (up to eps): each component moves by its own peak.
    config = OptimizerConfig(learning_rate=0.1, text_encoder_learning_rate=0.01, weight_decay=0.0, max_grad_norm=0.0)
    optimizer = make_optimizer(config, 10)
    params = {name: {"w": jnp.ones(3)} for name in ("unet", "text_encoder", "text_encoder_2")}  # SDXL has two
    gradients = {"unet": {"w": jnp.array([1.0, -2.0, 3.0])}, "text_encoder": {"w": jnp.array([-1.0, 2.0, 0.5])},
                 "text_encoder_2": {"w": jnp.array([3.0, 1.0, -1.0])}}
    updates, _ = optimizer.update(gradients, optimizer.init(params), params)
    for name, peak in (("unet", 0.1), ("text_encoder", 0.01), ("text_encoder_2", 0.01)):
        np.testing.assert_allclose(updates[name]["w"], -peak * np.sign(gradients[name]["w"]), rtol=1e-5)


@pytest.mark.parametrize("mean, std", [(0.0, 1.0), (-1.0, 0.5)])
def test_logit_normal_timesteps_follow_their_distribution(mean, std):
    """P(t / T < q) = Phi((logit(q) - mean) / std), checked at three quantiles on 200k draws."""
    config = DiffusionConfig(timestep_sampling="logit_normal", logit_mean=mean, logit_std=std)
    t = np.asarray(losses.sample_timesteps(jax.random.key(0), 200_000, 1000, config))
    assert t.min() >= 0 and t.max() <= 999 and t.dtype == np.int32
    for q in (0.25, 0.5, 0.75):
        expected = 0.5 * (1 + math.erf((math.log(q / (1 - q)) - mean) / (std * math.sqrt(2))))
        assert abs(np.mean(t < q * 1000) - expected) < 0.005, (q, expected)
    uniform = np.asarray(losses.sample_timesteps(jax.random.key(0), 200_000, 1000, DiffusionConfig()))
    assert abs(np.mean(uniform < 250) - 0.25) < 0.005
