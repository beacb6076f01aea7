"""`train_step(state, batch, key) -> (state, metrics)`: gradients (optionally accumulated over micro-batches),
one optimizer update, and the EMA, in one compiled program.

The batch keeps the example axis first in every array, so a later data-parallel version only has to shard
that axis. Choices (the loss, the optimizer, the number of micro-batches) are closed over when the step is
built, never branched on inside it.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from sdjax.train.losses import LossFn
from sdjax.train.state import TrainState, ema_decay_at, update_ema


def split_microbatches(batch, count: int):
    """(B, ...) -> (count, B / count, ...) for every array of the batch."""
    return jax.tree.map(lambda x: x.reshape((count, x.shape[0] // count) + x.shape[1:]), batch)


def make_gradient_fn(loss_fn: LossFn, accumulation: int):
    """`gradients(params, frozen, batch, key) -> (grads, metrics)`, averaged over `accumulation` micro-batches
    run one after another by `lax.scan` (so activation memory is that of one micro-batch)."""
    value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)

    def whole_batch(params, frozen, batch, key):
        (_, metrics), grads = value_and_grad(params, frozen, batch, key)
        return grads, metrics

    if accumulation == 1:
        return whole_batch

    def accumulated(params, frozen, batch, key):
        micro_batches = split_microbatches(batch, accumulation)

        def add_micro_batch(total, inputs):
            index, micro_batch = inputs
            result = whole_batch(params, frozen, micro_batch, jax.random.fold_in(key, index))
            return jax.tree.map(jnp.add, total, result), None

        first = jax.tree.map(lambda x: x[0], micro_batches)
        shapes = jax.eval_shape(whole_batch, params, frozen, first, key)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        total, _ = jax.lax.scan(add_micro_batch, zeros, (jnp.arange(accumulation), micro_batches))
        return jax.tree.map(lambda x: x / accumulation, total)

    return accumulated


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, ema_decay: float,
                    grad_accumulation: int = 1, state_shardings=None):
    """The compiled step. The trained part of the input state is donated (its buffers become the output's);
    the frozen components are passed through untouched, since the base model shares them. On a mesh,
    `state_shardings` (of the state without its frozen part) pins the new state to the shardings the state came
    in with: left to the compiler, the first steps' outputs came back sharded otherwise, and each new sharding
    compiled the step again."""
    gradients = make_gradient_fn(loss_fn, grad_accumulation)

    def apply(state: TrainState, grads) -> TrainState:
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema_params = update_ema(state.ema_params, params, ema_decay_at(state.step, ema_decay))
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params)

    def skip(state: TrainState, grads) -> TrainState:
        return state.replace(step=state.step + 1)

    @functools.partial(jax.jit, donate_argnums=0,
                       out_shardings=None if state_shardings is None else (state_shardings, None))
    def update(state: TrainState, frozen, batch, key):
        grads, metrics = gradients(state.params, frozen, batch, key)
        grad_norm = optax.tree.norm(grads)
        # A NaN/inf loss or gradient (the norm is finite only if every gradient is) would poison params, optimizer
        # state and EMA for good: such an update is dropped, and the step still counts (data and keys move on).
        # A cond rather than a select per leaf: the same result, and XLA compiles it ~25% faster (measured).
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        state = jax.lax.cond(finite, apply, skip, state, grads)
        return state, {**metrics, "grad_norm": grad_norm, "nonfinite": 1.0 - finite.astype(jnp.float32)}

    def train_step(state: TrainState, batch, key):
        new_state, metrics = update(state.replace(frozen={}), state.frozen, batch, key)
        return new_state.replace(frozen=state.frozen), metrics

    return train_step
