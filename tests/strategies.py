"""Hypothesis strategies: random linear stacks that fit their input.

Layers are drawn one at a time against the shape reaching them, so every drawn stack
is valid: kinds conv / avg_pool / sum_pool / subsample / batch_norm / identity /
residual / branches, sizes 1-7, strides 1-3, dilations 1-3, groups, channels 1-4,
1-D, 2-D and 3-D.
"""

from __future__ import annotations

import jax
import numpy as np
from hypothesis import strategies as st

import jfactor as jf

SPATIAL = {1: (10, 40), 2: (8, 22), 3: (5, 11)}


def _divisors(n):
    return [g for g in range(1, n + 1) if n % g == 0]


def _conv(draw, rng, shape, *, padding_kinds, stride=None, same_shape=False, max_size=7):
    nd, cin = len(shape) - 1, shape[-1]
    groups = draw(st.sampled_from(_divisors(cin)))
    cout = cin if same_shape else groups * draw(st.integers(1, max(1, 4 // groups)))
    padding = "same" if same_shape else draw(st.sampled_from(padding_kinds))
    if padding == "explicit":
        padding = tuple((draw(st.integers(0, 2)), draw(st.integers(0, 2))) for _ in range(nd))
    sizes, dilations, strides = [], [], []
    for d in range(nd):
        s = stride if stride is not None else (1 if same_shape else draw(st.integers(1, 3)))
        dil = draw(st.integers(1, 3))
        k = draw(st.integers(1, max_size))
        room = shape[d] + (sum(padding[d]) if isinstance(padding, tuple) else 0)
        if padding != "same" and (k - 1) * dil + 1 > room:
            dil, k = 1, max(1, min(k, room))
        sizes.append(k)
        dilations.append(dil)
        strides.append(s)
    kernel = rng.normal(size=(*sizes, cin // groups, cout))
    bias = rng.normal(size=cout) if draw(st.booleans()) else None
    return jf.Conv(kernel, bias, tuple(strides), tuple(dilations), padding, groups)


def _pool(draw, shape, cls):
    nd = len(shape) - 1
    size = tuple(draw(st.integers(1, min(4, shape[d]))) for d in range(nd))
    strides = tuple(draw(st.integers(1, 3)) for _ in range(nd)) if draw(st.booleans()) else None
    return cls(size, strides)


def _batch_norm(rng, channels):
    return jf.BatchNorm(rng.normal(size=channels), rng.normal(size=channels),
                        rng.normal(size=channels), rng.uniform(0.2, 2.0, channels), 1e-3)


def _layer(draw, rng, shape, padding_kinds, allow_nested):
    kinds = ["conv", "conv", "conv", "avg_pool", "sum_pool", "subsample", "batch_norm", "identity"]
    if allow_nested:
        kinds += ["residual", "branches_sum", "branches_concat"]
    kind = draw(st.sampled_from(kinds))
    if kind == "conv":
        return _conv(draw, rng, shape, padding_kinds=padding_kinds)
    if kind in ("avg_pool", "sum_pool"):
        return _pool(draw, shape, jf.AvgPool if kind == "avg_pool" else jf.SumPool)
    if kind == "subsample":
        return jf.Subsample(tuple(draw(st.integers(1, 3)) for _ in range(len(shape) - 1)))
    if kind == "batch_norm":
        return _batch_norm(rng, shape[-1])
    if kind == "identity":
        return jf.Identity()
    if kind == "residual":
        inner = [_conv(draw, rng, shape, padding_kinds=padding_kinds, same_shape=True, max_size=5)]
        if draw(st.booleans()):
            inner.append(_batch_norm(rng, shape[-1]))
        return jf.Residual(inner)
    stride = draw(st.integers(1, 2))
    if kind == "branches_sum":
        cout = shape[-1]
        branches = []
        for _ in range(draw(st.integers(2, 3))):
            kernel = rng.normal(size=(*[draw(st.integers(1, 5)) for _ in shape[:-1]], shape[-1], cout))
            branches.append([jf.Conv(kernel, None, stride, 1, "same")])
        if stride == 1 and draw(st.booleans()):
            branches.append([jf.Identity()])
        return jf.Branches(branches, "sum")
    branches = []
    for _ in range(2):
        kernel = rng.normal(size=(*[draw(st.integers(1, 5)) for _ in shape[:-1]], shape[-1],
                                  draw(st.integers(1, 3))))
        branches.append([jf.Conv(kernel, rng.normal(size=kernel.shape[-1]), stride, 1, "same")])
    return jf.Branches(branches, "concat")


@st.composite
def stacks(draw, ndims=(1, 2, 3), max_layers=4, padding_kinds=("valid", "same", "explicit"),
           allow_nested=True):
    """A random valid :class:`jfactor.Stack` with float64 weights."""
    nd = draw(st.sampled_from(ndims))
    cin = draw(st.integers(1, 4))
    low, high = SPATIAL[nd]
    spatial = tuple(draw(st.integers(low, high)) for _ in range(nd))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = spatial + (cin,)
    layers = []
    for _ in range(draw(st.integers(1, max_layers))):
        try:
            layer = _layer(draw, rng, shape, padding_kinds, allow_nested)
            out = layer.out_shape(shape)
        except jf.StackError:
            continue  # did not fit what is left of the input; try another
        if any(n < 1 for n in out[:-1]):
            continue
        layers.append(layer)
        shape = out
    if not layers:
        layers = [jf.Identity()]
    return jf.Stack(layers, spatial + (cin,))


def redraw(stack, seed: int):
    """``stack``'s structure with new normal weights (BatchNorm variances drawn in [0.2, 2])."""
    rng = np.random.default_rng(seed)

    def draw(path, w):
        positive = jax.tree_util.keystr(path).endswith(".var")
        return rng.uniform(0.2, 2.0, w.shape) if positive else rng.standard_normal(w.shape)

    return jax.tree_util.tree_map_with_path(draw, stack)


def weighted_stacks(**kwargs):
    """Random stacks as :func:`stacks` draws them (same keywords), with at least one weight."""
    return stacks(**kwargs).filter(lambda stack: stack.dtype is not None)
