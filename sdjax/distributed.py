"""Several processes (hosts) as one run: starting `jax.distributed`, and moving values between what one process
holds and the global arrays that span every process's devices.

Every process runs the same program on its own devices; a mesh (`sdjax.parallel`) spans all of them. Host values
that every process has (params at start) become global arrays shard by shard; each process's share of a batch
becomes its rows of the global batch; values are brought back to every host with a collective gather (so every
process must call it), and only process 0 writes files. With one process all of this reduces to plain
device_put / device_get.
"""
from __future__ import annotations

import socket
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from sdjax.errors import InvalidArgumentError, SdjaxError


class DistributedError(SdjaxError, RuntimeError):
    """The processes of a multi-process run could not be connected."""


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, timeout: int = 60) -> None:
    """`jax.distributed.initialize` with its arguments checked and a bounded wait: call it first, before any
    other JAX call. Without arguments JAX detects the cluster (Cloud TPU, SLURM, ...). On CPU the processes
    exchange data over gloo."""
    if coordinator is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        _join(jax.distributed.initialize, "the detected cluster", "this process", timeout)
        return
    if not isinstance(num_processes, int) or num_processes < 1:
        raise InvalidArgumentError(f"num_processes={num_processes!r} must be a positive integer")
    if not isinstance(process_id, int) or not 0 <= process_id < num_processes:
        raise InvalidArgumentError(f"process_id={process_id!r} must be in [0, {num_processes}) for "
                                   f"{num_processes} processes")
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise InvalidArgumentError(f"coordinator {coordinator!r} must be HOST:PORT, like localhost:12355")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # after the checks: bad input changes nothing
    who = f"process {process_id} of {num_processes}"
    if process_id > 0:  # XLA aborts the whole process when its first connection fails: look before joining
        _wait_for_listener(host, int(port), timeout, who, coordinator)
    _join(lambda **kw: jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id,
                                                  **kw), coordinator, who, timeout)


def _wait_for_listener(host: str, port: int, timeout: int, who: str, coordinator: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise DistributedError(f"{who} could not join the run at {coordinator} within {timeout} s: nothing "
                                       f"listens there ({err.strerror or err}); start process 0 first, with the "
                                       f"same --coordinator, on that host") from None
            time.sleep(0.5)


def _join(start, where: str, who: str, timeout: int) -> None:
    try:
        start(initialization_timeout=timeout)
    except Exception as err:  # XLA raises plain runtime errors (deadline exceeded, connection refused)
        raise DistributedError(f"{who} could not join the run at {where} within {timeout} s ({type(err).__name__}: "
                               f"{str(err).splitlines()[0][:200]}); start every process with the same "
                               f"--coordinator and --num-processes, process 0 on that host") from None


def is_primary() -> bool:
    """Whether this process writes the run's files (process 0)."""
    return jax.process_index() == 0


def to_global(tree, shardings):
    """Host values that every process holds identically -> arrays placed by `shardings` (NamedShardings that may
    span every process's devices), each device given only its slice. Arrays that already span the processes are
    resharded on the devices (a no-op when already placed so)."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    return jax.tree.map(_global_leaf, tree, shardings)


def _global_leaf(leaf, sharding):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:  # already global: no host copy exists
        return jax.device_put(leaf, sharding)
    value = np.asarray(leaf)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def global_batch(local_batch, sharding):
    """This process's rows of a batch -> the global batch split by `sharding` (its rows on its devices)."""
    if jax.process_count() == 1:
        return jax.device_put(local_batch, sharding)
    return jax.tree.map(lambda rows: jax.make_array_from_process_local_data(sharding, np.asarray(rows)),
                        local_batch)


def to_host(tree):
    """Every leaf as a whole numpy array on every process (a collective: all processes must call it)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def gather_rows(rows: np.ndarray) -> np.ndarray:
    """Each process's small host array (same shape everywhere) stacked in process order, on every process."""
    if jax.process_count() == 1:
        return np.asarray(rows)[None]
    return np.asarray(multihost_utils.process_allgather(np.asarray(rows)))
