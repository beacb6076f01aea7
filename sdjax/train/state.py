"""The training state, the optimizer (AdamW, warmup + constant/cosine, clipping) and the EMA of the params.

Params, gradients, optimizer moments and the EMA are float32 (master weights) whatever the compute dtype;
the modules cast to bf16 where they compute. `frozen` holds the components the loss reads but does not
train (the text encoder, usually); it comes from the base model and is never checkpointed.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from sdjax.models.components import TEXT_ENCODERS
from sdjax.train.config import OptimizerConfig


@flax.struct.dataclass
class TrainState:
    step: jax.Array          # int32 scalar: optimizer updates applied so far
    params: dict[str, Any]   # trained components, e.g. {"unet": ...}
    opt_state: Any
    ema_params: dict[str, Any]
    frozen: dict[str, Any]   # read by the loss, not trained, not checkpointed


def learning_rate_schedule(config: OptimizerConfig, num_steps: int, peak: float | None = None) -> optax.Schedule:
    """Linear warmup from 0 over warmup_steps, then constant, or cosine down to final_learning_rate_fraction
    (of `peak`, by default config.learning_rate)."""
    peak, warmup = config.learning_rate if peak is None else peak, config.warmup_steps
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(num_steps, warmup + 1),
                                                  end_value=peak * config.final_learning_rate_fraction)
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup])


def make_optimizer(config: OptimizerConfig, num_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping (when max_grad_norm > 0), then AdamW on the scheduled learning rate; the text
    encoders' params (SDXL: both) on their own peak when text_encoder_learning_rate is set (clipping stays
    global)."""
    def adamw(peak):
        return optax.adamw(learning_rate_schedule(config, num_steps, peak), b1=config.b1, b2=config.b2,
                           eps=config.eps, weight_decay=config.weight_decay)

    update = adamw(config.learning_rate)
    if config.text_encoder_learning_rate and config.text_encoder_learning_rate != config.learning_rate:
        labels = lambda params: {name: jax.tree.map(lambda _: name in TEXT_ENCODERS, tree)
                                 for name, tree in params.items()}
        update = optax.multi_transform({False: update, True: adamw(config.text_encoder_learning_rate)}, labels)
    if config.max_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), update)
    return update


def create_state(params: dict, frozen: dict, optimizer: optax.GradientTransformation) -> TrainState:
    """Step 0: float32 copies of `params` as both the weights and their EMA."""
    params = jax.tree.map(lambda x: jnp.array(x, jnp.float32), params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      ema_params=jax.tree.map(jnp.copy, params), frozen=frozen)


def ema_decay_at(step, max_decay: float):
    """diffusers' EMAModel decay: min(max_decay, (1 + step) / (10 + step)), so early averages are not dominated
    by the random (or pretrained) starting point."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(max_decay, (1.0 + step) / (10.0 + step))


def update_ema(ema_params, params, decay):
    """ema <- decay * ema + (1 - decay) * params."""
    return optax.incremental_update(params, ema_params, 1.0 - decay)


def checkpointed(state: TrainState) -> dict[str, Any]:
    """What a checkpoint holds: everything but the frozen components."""
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state, "ema_params": state.ema_params}


def with_checkpointed(state: TrainState, restored: dict[str, Any]) -> TrainState:
    return state.replace(**restored)
