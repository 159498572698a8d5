"""Frozen dataclasses that are JAX pytrees.

Array fields are pytree leaves; fields declared with :func:`static` are part of the
tree structure (hashable, compared by ``jit``'s cache).  Unflattening bypasses
``__init__``/``__post_init__``, so validation written there runs only when a user
builds an object, never on tracers or batched leaves inside ``jit``/``vmap``.
"""

from __future__ import annotations

import dataclasses

import jax


def static(**kwargs):
    """A dataclass field that belongs to the pytree structure, not its leaves."""
    return dataclasses.field(metadata={"static": True}, **kwargs)


def pytree_dataclass(cls):
    """Make ``cls`` a frozen, non-comparing dataclass registered as a pytree."""
    cls = dataclasses.dataclass(frozen=True, eq=False, repr=False)(cls)
    fields = dataclasses.fields(cls)
    data_names = tuple(f.name for f in fields if not f.metadata.get("static"))
    meta_names = tuple(f.name for f in fields if f.metadata.get("static"))

    def flatten_with_keys(obj):
        children = [(jax.tree_util.GetAttrKey(n), getattr(obj, n)) for n in data_names]
        return children, tuple(getattr(obj, n) for n in meta_names)

    def flatten(obj):
        return [getattr(obj, n) for n in data_names], tuple(getattr(obj, n) for n in meta_names)

    def unflatten(meta, data):
        obj = object.__new__(cls)
        for name, value in zip(meta_names, meta):
            object.__setattr__(obj, name, value)
        for name, value in zip(data_names, data):
            object.__setattr__(obj, name, value)
        return obj

    jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)
    return cls


def set_field(obj, name, value):
    """Assign a field of a frozen dataclass during ``__post_init__`` normalisation."""
    object.__setattr__(obj, name, value)
