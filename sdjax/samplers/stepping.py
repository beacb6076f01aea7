"""The samplers' loop over steps, and running it a window of steps at a time.

Every sampler loops with `scan(body, carry, xs)`: one `lax.scan` whose body returns (carry, None). Inside
`with window(w):` (at trace time) the same scan runs only the steps in [w.start, w.stop), starting from the
carry of an earlier call (`w.carry`, used where `w.resume` is true) and recording its final carry in
`w.final_carry`. A host loop can then call one compiled program once per window and pass the carry along, which
gives a progress bar without host callbacks: JAX does not persist programs that contain callbacks, so a bar
fed by `jax.debug.callback` forced a fresh compilation on every run. The program is the same for every window
(start and stop are traced), so it compiles, and is cached, once; skipped steps cost nothing (`lax.cond`).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass
class Window:
    start: Any            # first step to run (a traced int)
    stop: Any             # one past the last step to run
    resume: Any           # bool: continue from `carry` instead of the sampler's own initial carry
    carry: Any = None     # the carry an earlier window ended with (None: only discover its structure)
    final_carry: Any = None  # set by `scan`: the carry after this window
    scans: int = 0        # how many loops ran inside the window (a windowed program needs exactly one)


_active: contextvars.ContextVar[Window | None] = contextvars.ContextVar("sdjax_sampler_window", default=None)


@contextlib.contextmanager
def window(w: Window):
    """Trace the samplers called inside with their loop restricted to `w`."""
    token = _active.set(w)
    try:
        yield w
    finally:
        _active.reset(token)


def _vma(value) -> frozenset:
    """The mesh axes a value (or a ShapeDtypeStruct) varies over inside shard_map; empty outside it. JAX 0.10
    keeps them in the type's `manual_axis_type.varying`, earlier versions in `vma`."""
    aval = value if isinstance(value, jax.ShapeDtypeStruct) else jax.typeof(value)
    axis_type = getattr(aval, "manual_axis_type", None)
    return frozenset(axis_type.varying) if axis_type is not None else frozenset(getattr(aval, "vma", ()))


def varying_carry(body, carry):
    """`carry` with each leaf cast to vary over the `jax.shard_map` mesh axes that `body(carry)`'s matching leaf
    varies over. A loop's carry must keep its type, and state initialised from constants (a zero history, an
    error estimate) is invariant until the first step derives it from the image. Outside shard_map (no axes
    anywhere) the carry is returned untouched without tracing `body`."""
    if not any(_vma(leaf) for leaf in jax.tree.leaves(carry)):
        return carry
    for _ in jax.tree.leaves(carry):  # a cast can make more of the body's outputs vary: repeat to a fixed point
        produced = jax.tree.leaves(jax.eval_shape(body, carry))
        missing = [tuple(sorted(_vma(out) - _vma(leaf))) for leaf, out in zip(jax.tree.leaves(carry), produced)]
        if not any(missing):
            break
        leaves = [jax.lax.pcast(leaf, axes, to="varying") if axes else leaf
                  for leaf, axes in zip(jax.tree.leaves(carry), missing)]
        carry = jax.tree.unflatten(jax.tree.structure(carry), leaves)
    return carry


def scan(body, carry, xs):
    """The final carry of `lax.scan(body, carry, xs)` (body returns (carry, None)), or of the active window."""
    carry = varying_carry(lambda c: body(c, jax.tree.map(lambda x: x[0], xs))[0], carry)
    w = _active.get()
    if w is None:
        return jax.lax.scan(body, carry, xs)[0]
    w.scans += 1
    if w.carry is not None:
        carry = jax.tree.map(lambda own, given: jnp.where(w.resume, given, own), carry, w.carry)

    def windowed(carry, item):
        i, x = item
        inside = (i >= w.start) & (i < w.stop)
        return jax.lax.cond(inside, lambda c: body(c, x)[0], lambda c: c, carry), None

    steps = jax.tree.leaves(xs)[0].shape[0]
    w.final_carry, _ = jax.lax.scan(windowed, carry, (jnp.arange(steps), xs))
    return w.final_carry
