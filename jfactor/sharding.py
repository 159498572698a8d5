"""Spreading a batch axis over devices, and over processes under ``jax.distributed``.

One process: the batch is padded to a multiple of the mesh size and sharded over its
devices (:func:`shard_batch`).  Several processes (``jax.distributed.initialize()``,
every process calling with the same full batch): each process takes one contiguous block
of the batch, spreads it over its own devices of the mesh, computes, and the outputs are
gathered so that every process returns all of them (:func:`sharded_call`).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

from jfactor.errors import ConfigError


def check_mesh(mesh, shard) -> None:
    """A :class:`ConfigError` unless ``mesh`` is None or a ``jax.sharding.Mesh`` and ``shard`` a bool."""
    if mesh is not None and not isinstance(mesh, jax.sharding.Mesh):
        raise ConfigError(f"mesh must be a jax.sharding.Mesh (jfactor.sharding.batch_mesh(devices) makes one), got "
                          f"{type(mesh).__name__}")
    if not isinstance(shard, (bool, np.bool_)):
        raise ConfigError(f"shard must be True or False, got {shard!r}")


def batch_mesh(devices=None) -> jax.sharding.Mesh:
    """A 1-D mesh named ``"batch"`` over ``devices`` (default: all, on every process)."""
    return jax.sharding.Mesh(np.asarray(devices if devices is not None else jax.devices()), ("batch",))


def _pad_items(leaf, size: int) -> np.ndarray:
    """Axis 0 of ``leaf`` padded to ``size`` with copies of item 0 (on the host)."""
    host = np.asarray(leaf)
    return np.concatenate([host, np.repeat(host[:1], size - host.shape[0], axis=0)])


def shard_batch(tree, mesh: jax.sharding.Mesh):
    """Pad axis 0 of every leaf to a multiple of ``mesh.size`` (copies of item 0) and shard it.

    The mesh's devices must belong to this process (see :func:`sharded_call` for several).
    """
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(tuple(mesh.axis_names)))

    def place(leaf):
        n = np.shape(leaf)[0]
        host = _pad_items(leaf, n + -n % mesh.size)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(place, tree)


def local_mesh(mesh: jax.sharding.Mesh) -> jax.sharding.Mesh:
    """A 1-D batch mesh over the devices of ``mesh`` that belong to this process."""
    devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    if not devices:
        raise ValueError(f"process {jax.process_index()} has no device in the mesh {mesh}")
    return batch_mesh(devices)


def _take(tree, n: int):
    return jax.tree.map(lambda x: x[:n], tree)


def gather_blocks(tree):
    """Concatenate every process's block (axis 0) of each leaf, in process order, on every process.

    Leaves become numpy arrays.  A trailing axis that is shorter on some processes (a
    history cut short once all of a block's items converged) is extended with its last
    entry to the longest before gathering.
    """

    def gather(leaf):
        host = np.asarray(leaf)
        shapes = np.asarray(multihost_utils.process_allgather(np.asarray(host.shape, np.int64)))
        longest = shapes.reshape(jax.process_count(), host.ndim).max(axis=0)
        pads = [(0, 0)] + [(0, int(m - s)) for s, m in zip(host.shape[1:], longest[1:])]
        if any(hi for _, hi in pads):
            host = np.pad(host, pads, mode="edge")
        wire = host.astype(np.uint8) if host.dtype == np.bool_ else host
        gathered = np.asarray(multihost_utils.process_allgather(wire, tiled=True))
        return gathered.astype(host.dtype)

    return jax.tree.map(gather, tree)


def sharded_call(fn, batch, *, mesh: jax.sharding.Mesh | None = None, shard: bool = False):
    """``fn(batch)`` for a pytree whose leaves share a leading batch axis N; outputs keep it.

    ``mesh=None, shard=False``: a plain call.  Otherwise the batch is spread over ``mesh``
    (``shard=True``: :func:`batch_mesh` over every device of every process) as the module
    docstring says; the outputs are the first N items, identical on every process.  ``fn``
    must treat items independently (padding repeats item 0) and be called by every process.
    """
    check_mesh(mesh, shard)
    if mesh is None and not shard:
        return fn(batch)
    mesh = mesh if mesh is not None else batch_mesh()
    n = jax.tree.leaves(batch)[0].shape[0]
    if jax.process_count() == 1:
        return _take(fn(shard_batch(batch, mesh)), n)
    block = -(-n // jax.process_count())
    first = jax.process_index() * block
    mine = jax.tree.map(lambda leaf: _pad_items(leaf, block * jax.process_count())[first : first + block], batch)
    outputs = _take(fn(shard_batch(mine, local_mesh(mesh))), block)
    return _take(gather_blocks(outputs), n)
