"""The one home of sharding: a device mesh with axes `data` and `fsdp`, and the shardings of batches and params.

A batch splits over both axes (every device holds different images or examples). Params are replicated, or,
with fsdp > 1, each large array is split along its largest axis that the fsdp size divides (ZeRO-3 / FSDP:
every device holds 1/fsdp of it), following name rules in the style of big_vision's: the first rule whose regex
matches a param's path decides. Generation gathers each layer's split params where that layer runs (`per_layer`).
"""
from __future__ import annotations

import contextvars
import re
from collections.abc import Mapping, Sequence
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sdjax.errors import InvalidArgumentError

AXES = ("data", "fsdp")
MIN_FSDP_SIZE = 2 ** 14  # elements; smaller arrays (norms, biases) stay replicated: splitting them saves nothing
# (path regex, how): "fsdp" splits the array as described above, "replicate" keeps a whole copy on every device.
DEFAULT_RULES = ((r".*", "fsdp"),)


def make_mesh(data: int | None = None, fsdp: int = 1, devices: Sequence | None = None) -> Mesh:
    """A mesh of `devices` (default: all) with axes (data, fsdp); data defaults to the devices fsdp leaves."""
    devices = list(jax.devices() if devices is None else devices)
    if fsdp < 1 or len(devices) % fsdp:
        raise InvalidArgumentError(f"fsdp={fsdp} must be a positive divisor of the device count {len(devices)}")
    data = len(devices) // fsdp if data is None else data
    if data < 1 or data * fsdp != len(devices):
        raise InvalidArgumentError(f"mesh data={data} x fsdp={fsdp} = {data * fsdp} devices, but there are "
                                   f"{len(devices)}; the sizes must multiply to the device count")
    return Mesh(np.asarray(devices).reshape(data, fsdp), AXES)


def parse_mesh(text: str, devices: Sequence | None = None) -> Mesh:
    """`make_mesh` from "data=4,fsdp=2" (either may be left out)."""
    sizes = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in AXES or not value.isdigit():
            raise InvalidArgumentError(f"mesh {text!r}: expected axis=size pairs with axes {', '.join(AXES)}, "
                                       f"like data=4,fsdp=2")
        sizes[name] = int(value)
    return make_mesh(sizes.get("data"), sizes.get("fsdp", 1), devices)


def resolve_mesh(mesh: Mesh | str | None = None, devices: Sequence | None = None) -> Mesh | None:
    """The mesh a pipeline generates on: `mesh` as "data=4,fsdp=2" over `devices` (default: all, across every
    process) or as a Mesh with axes (data, fsdp); else data parallelism over `devices`; else None (one device)."""
    if isinstance(mesh, Mesh):
        if devices is not None:
            raise InvalidArgumentError("give devices= or a Mesh as mesh=, not both: a Mesh names its own devices")
        if tuple(mesh.axis_names) != AXES:
            raise InvalidArgumentError(f"mesh axes {tuple(mesh.axis_names)}: sdjax shards over axes {AXES}; build "
                                       f"the mesh with sdjax.parallel.make_mesh, or pass mesh='data=4,fsdp=2'")
        return mesh
    if mesh is not None and not isinstance(mesh, str):
        raise InvalidArgumentError(f"mesh={mesh!r}: pass a string like 'data=4,fsdp=2' or a jax Mesh with axes "
                                   f"{AXES}")
    if devices is not None and len(devices) == 0:
        raise InvalidArgumentError("devices=[] lists no device; pass None (the first device) or e.g. jax.devices()")
    if mesh is not None:
        return parse_mesh(mesh, devices)
    return None if devices is None else make_mesh(devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """A leading batch axis split over every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec(AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def fsdp_spec(shape: Sequence[int], fsdp: int) -> PartitionSpec:
    """Split along the largest axis that `fsdp` divides (the last of equal ones); replicated if none does or the
    array is small."""
    if fsdp == 1 or int(np.prod(shape)) < MIN_FSDP_SIZE:
        return PartitionSpec()
    for axis in sorted(range(len(shape)), key=lambda a: (-shape[a], -a)):  # ties: the output features
        if shape[axis] % fsdp == 0:
            return PartitionSpec(*([None] * axis), "fsdp")
    return PartitionSpec()


def param_shardings(params, mesh: Mesh, rules=DEFAULT_RULES):
    """A NamedSharding per param leaf (arrays or ShapeDtypeStructs), from the first rule matching its path
    ("down_blocks.0/resnets.0/conv1/kernel")."""
    fsdp = mesh.shape["fsdp"]
    compiled = [(re.compile(pattern), how) for pattern, how in rules]

    def sharding(path, leaf):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        how = next((how for pattern, how in compiled if pattern.fullmatch(name)), "replicate")
        if how not in ("fsdp", "replicate"):
            raise InvalidArgumentError(f"sharding rule for {name!r} says {how!r}; use 'fsdp' or 'replicate'")
        return NamedSharding(mesh, fsdp_spec(leaf.shape, fsdp) if how == "fsdp" else PartitionSpec())

    return jax.tree_util.tree_map_with_path(sharding, params)


def bytes_per_device(params, shardings) -> int:
    """The bytes of `params` (arrays or ShapeDtypeStructs) that each device holds under `shardings`."""
    sizes = jax.tree.map(lambda leaf, s: int(np.prod(s.shard_shape(leaf.shape))) * np.dtype(leaf.dtype).itemsize,
                         params, shardings)
    return sum(jax.tree.leaves(sizes))


# ------------------------------------------------------------------- FSDP: each layer gathers its params where it runs

def per_use(params, x):
    """`params` for a use on `x`, on an FSDP mesh (`fsdp_mesh`) each param split over fsdp gathered whole there.

    Each split param first has a zero computed from x subtracted on its own slice (p - (+0.0) is p bit for bit, signed
    zeros and NaN included), so it depends on x: the compiler can neither hoist its gather out of a loop nor issue it
    before x exists. It is then constrained to be replicated: the kernel is gathered and every device computes its own
    images with it, as under data parallelism (not a slice of the channels of every device's images). Params that
    this module leaves whole (small ones), and every param off an FSDP mesh, are returned unchanged."""
    if not fsdp_mesh():
        return params
    fsdp = dict(jax.sharding.get_abstract_mesh().shape)["fsdp"]
    split = lambda p: fsdp_spec(p.shape, fsdp) != jax.sharding.PartitionSpec()  # noqa: E731
    if not any(split(p) for p in jax.tree.leaves(params)):
        return params  # nothing to gather (small params stay whole on every device)
    zero = _zero_after(x)

    def gathered(p):  # subtracted on each device's slice (as `fsdp_spec` splits it), then gathered
        if not split(p):
            return p
        p = jax.lax.with_sharding_constraint(p - zero.astype(p.dtype), fsdp_spec(p.shape, fsdp))
        return jax.lax.with_sharding_constraint(p, jax.sharding.PartitionSpec())
    return jax.tree.map(gathered, params)


@jax.custom_batching.custom_vmap
def _zero_after(x):
    """+0.0 (whatever x holds, NaN included), computed from x's first element, so only once x exists; unbatched
    under vmap (from the first image), so the params it is subtracted from stay one copy for all the images. The
    barrier keeps the compiler from folding it to a constant (which would cut the dependency)."""
    return jax.lax.optimization_barrier((jnp.ravel(x)[0] > 0).astype(jnp.float32)) * 0


@_zero_after.def_vmap
def _zero_after_vmap(axis_size, in_batched, x):
    return _zero_after(x), False


def fsdp_mesh() -> bool:
    """Whether the program is being traced on a mesh (`jax.set_mesh`; `Pipeline` sets its own when it compiles)
    whose fsdp axis splits params, outside shard_map."""
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and not mesh.manual_axes and dict(mesh.shape).get("fsdp", 1) > 1


_in_layer: contextvars.ContextVar[bool] = contextvars.ContextVar("sdjax_per_layer", default=False)


def _layer_per_use(next_fun, args, kwargs, context):
    """A Flax method interceptor: a layer that holds params of its own and no sub-layers (a Conv, Dense, norm) is
    called with its params passed through `per_use` together with its input."""
    module = context.module
    if context.method_name != "__call__" or _in_layer.get() or not args or module.scope is None:
        return next_fun(*args, **kwargs)
    variables = module.variables
    own = variables.get("params", {})
    if set(variables) != {"params"} or not own or any(isinstance(v, Mapping) for v in own.values()):
        return next_fun(*args, **kwargs)
    token = _in_layer.set(True)
    try:
        return module.clone(parent=None).apply({"params": per_use(own, args[0])}, *args, **kwargs)
    finally:
        _in_layer.reset(token)


def per_layer(fn: Callable) -> Callable:
    """fn (a Flax model's apply) with every layer's FSDP-split params gathered where that layer runs (`per_use` on
    the layer's own params and its input); fn unchanged unless traced on an FSDP mesh (`fsdp_mesh`).

    Left to itself the compiler (GSPMD) decides where the gathers go, and decided badly for a model too big for one
    device (experiments/scaling/generation_memory.py, SD 1.5 on fsdp=8): it hoisted the U-Net's gathers out of the
    sampler loop as loop-invariant code (the whole gathered U-Net live on every device for the whole call), issued
    those it kept in the loop all at the start of a step, and in the VAE decoder gathered every device's
    activations instead of the kernels (2 GiB per device). Tied to its layer's input, a param is gathered only once
    that input exists, inside whatever loop the layer runs in, and is dead after the layer: a device holds its 1/N
    of the params, its own images' activations and the kernels of the layers in flight. (A layer whose input does
    not change over the steps, the cross-attention keys and values of the prompt, is computed once before the loop,
    its gather with it.) The cost: each such layer also waits for one scalar reduction over the devices."""
    def wrapped(*args, **kwargs):
        if not fsdp_mesh():
            return fn(*args, **kwargs)
        with nn.intercept_methods(_layer_per_use):
            return fn(*args, **kwargs)
    return wrapped
