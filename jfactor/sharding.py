"""Spreading a batch axis over devices (one host or several, via ``jax.distributed``)."""

from __future__ import annotations

import jax
import numpy as np


def batch_mesh(devices=None) -> jax.sharding.Mesh:
    """A 1-D mesh named ``"batch"`` over ``devices`` (default: all, on every host)."""
    return jax.sharding.Mesh(np.asarray(devices if devices is not None else jax.devices()), ("batch",))


def shard_batch(tree, mesh: jax.sharding.Mesh):
    """Pad axis 0 of every leaf to a multiple of ``mesh.size`` (copies of item 0) and shard it.

    Each host fills only the shards of its own devices (``make_array_from_callback``), so
    the same call works under ``jax.distributed`` on several hosts.
    """
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(tuple(mesh.axis_names)))

    def place(leaf):
        host = np.asarray(leaf)
        extra = -host.shape[0] % mesh.size
        host = np.concatenate([host, np.repeat(host[:1], extra, axis=0)])
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(place, tree)
