"""An independent numpy reference for linear stacks, written for the tests.

It shares no code with jfactor: it reads a layer's attributes (kernel, strides, ...)
and computes the output with explicit loops over kernel taps, numpy slicing and
``np.pad``.  'same' padding is resolved here with the TF/Keras rule, independently.
"""

from __future__ import annotations

import itertools

import numpy as np


def same_pads(n, extent, stride):
    out = -(-n // stride)
    total = max((out - 1) * stride + extent - n, 0)
    return total // 2, total - total // 2


def resolve_pads(padding, spatial, extents, strides):
    nd = len(spatial)
    if isinstance(padding, str):
        if padding == "valid":
            return [(0, 0)] * nd
        assert padding == "same"
        return [same_pads(n, e, s) for n, e, s in zip(spatial, extents, strides)]
    if isinstance(padding, int):
        return [(padding, padding)] * nd
    return [tuple(p) if isinstance(p, (tuple, list)) else (p, p) for p in padding]


def conv(x, kernel, bias=None, strides=1, dilation=1, padding="valid", groups=1):
    """x (N, *S, C_in) float64, kernel (*k, C_in/g, C_out): cross-correlation."""
    x = np.asarray(x, np.float64)
    kernel = np.asarray(kernel, np.float64)
    nd = kernel.ndim - 2
    strides = (strides,) * nd if np.isscalar(strides) else tuple(strides)
    dilation = (dilation,) * nd if np.isscalar(dilation) else tuple(dilation)
    ksize = kernel.shape[:nd]
    extents = [(k - 1) * d + 1 for k, d in zip(ksize, dilation)]
    pads = resolve_pads(padding, x.shape[1:-1], extents, strides)
    # negative pads crop
    crop = tuple(slice(max(-lo, 0), x.shape[1 + i] - max(-hi, 0)) for i, (lo, hi) in enumerate(pads))
    x = x[(slice(None),) + crop]
    xp = np.pad(x, [(0, 0)] + [(max(lo, 0), max(hi, 0)) for lo, hi in pads] + [(0, 0)])
    out_sizes = [(xp.shape[1 + i] - extents[i]) // strides[i] + 1 for i in range(nd)]
    cin_g, cout = kernel.shape[-2], kernel.shape[-1]
    cout_g = cout // groups
    out = np.zeros((x.shape[0], *out_sizes, cout))
    for tap in itertools.product(*(range(k) for k in ksize)):
        idx = tuple(
            slice(t * d, t * d + s * (o - 1) + 1, s)
            for t, d, s, o in zip(tap, dilation, strides, out_sizes)
        )
        patch = xp[(slice(None),) + idx]
        for g in range(groups):
            out[..., g * cout_g:(g + 1) * cout_g] += (
                patch[..., g * cin_g:(g + 1) * cin_g] @ kernel[tap][:, g * cout_g:(g + 1) * cout_g]
            )
    if bias is not None:
        out = out + np.asarray(bias, np.float64)
    return out


def pool(x, size, strides, average):
    nd = x.ndim - 2
    size = (size,) * nd if np.isscalar(size) else tuple(size)
    strides = (strides,) * nd if np.isscalar(strides) else tuple(strides)
    out_sizes = [(n - p) // s + 1 for n, p, s in zip(x.shape[1:-1], size, strides)]
    out = np.zeros((x.shape[0], *out_sizes, x.shape[-1]))
    for tap in itertools.product(*(range(p) for p in size)):
        idx = tuple(slice(t, t + s * (o - 1) + 1, s) for t, s, o in zip(tap, strides, out_sizes))
        out += x[(slice(None),) + idx]
    return out / np.prod(size) if average else out


def apply_layers(layers, x):
    for layer in layers:
        x = apply_layer(layer, x)
    return x


def apply_layer(layer, x):
    kind = type(layer).__name__
    if kind == "Conv":
        bias = None if layer.bias is None else np.asarray(layer.bias)
        return conv(x, np.asarray(layer.kernel), bias, layer.strides, layer.dilation, layer.padding,
                    layer.groups)
    if kind in ("AvgPool", "SumPool"):
        return pool(x, layer.pool_size, layer.strides, kind == "AvgPool")
    if kind == "Subsample":
        nd = x.ndim - 2
        s = (layer.strides,) * nd if np.isscalar(layer.strides) else layer.strides
        return x[(slice(None),) + tuple(slice(None, None, k) for k in s)]
    if kind == "BatchNorm":
        g, b, m, v = (np.asarray(a, np.float64) for a in (layer.gamma, layer.beta, layer.mean, layer.var))
        return (x - m) / np.sqrt(v + layer.epsilon) * g + b
    if kind == "Identity":
        return x
    if kind == "Residual":
        return x + apply_layers(layer.layers, x)
    if kind == "Branches":
        outs = [apply_layers(b, x) for b in layer.branches]
        return sum(outs) if layer.merge == "sum" else np.concatenate(outs, axis=-1)
    raise NotImplementedError(kind)


def apply_stack(stack, x):
    return apply_layers(stack.layers, np.asarray(x, np.float64))
