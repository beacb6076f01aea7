"""The one home of sharding: a device mesh with axes `data` and `fsdp`, and the shardings of batches and params.

A batch splits over both axes (every device holds different images or examples). Params are replicated, or,
with fsdp > 1, each large array is split along its largest axis that the fsdp size divides (ZeRO-3 / FSDP:
every device holds 1/fsdp of it; the compiler gathers it where it is used), following name rules in the style of
big_vision's: the first rule whose regex matches a param's path decides.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import jax
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
