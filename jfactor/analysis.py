"""Static analysis of lowered programs: where a fold is exact, and what a stack costs.

Exact region.  Folding treats the input as zero-extended, which is what the first
layer's zero padding does too.  A later layer's zero padding stands where the folded map
sees the previous layer's response to the zero-extended input (its *virtual* values);
the two agree only where those virtual values are zero.  Per spatial dim we track

- ``clean``: which real positions of a tensor equal the infinite-grid composite, and
- ``support``: an interval outside which the infinite-grid tensor is zero (None once a
  bias makes it nonzero everywhere),

so a padded read is harmless exactly when it falls outside the support.  Treating dims
independently and supports as intervals can only flag more positions, never fewer, so
the reported box is guaranteed exact; the certificate measures the rest.
"""

from __future__ import annotations

import numpy as np

from jfactor import _checks
from jfactor.layers import Parallel


def _item_out_spatial(item, in_spatial):
    return _checks.window_out_spatial(in_spatial, item.extent, item.strides, item.padding, "program")


def _conv_dim(clean, support, item, d: int, m: int):
    """Clean mask and support of one conv item's output in spatial dim ``d`` (``m`` outputs).

    Output ``j`` reads ``s j - lo + dil t`` for taps ``t < k``; it is clean when none of those
    reads is *bad*: a real position that is not clean, or a padded one inside the support.  The
    bad reads are counted by prefix sums per residue mod ``dil``: O(n + m) memory, not O(m k).
    """
    n = clean.shape[0]
    lo, _ = item.padding[d]
    s, k = item.strides[d], item.size[d]
    dil = item.dilation[d] if k > 1 else 1  # one tap: no spacing (and no grid of dil columns)
    first, last = -lo, s * (m - 1) - lo + dil * (k - 1)  # the lowest and highest position read
    reads = np.arange(first, last + 1)
    inside = (reads >= 0) & (reads < n)
    bad = np.ones(reads.shape, bool) if support is None else (reads >= support[0]) & (reads <= support[1])
    bad[inside] = ~clean[reads[inside]]
    rows = -(-bad.size // dil)  # bad[r] sits at row r // dil, column r % dil
    grid = np.zeros(rows * dil, np.int64)
    grid[:bad.size] = bad
    counts = np.concatenate([np.zeros((1, dil), np.int64), np.cumsum(grid.reshape(rows, dil), axis=0)])
    start = s * np.arange(m)  # output j's first read, counted from `first`
    row, column = start // dil, start % dil
    fine = counts[row + k, column] == counts[row, column]
    if support is None or item.bias is not None:
        new_support = None
    else:
        u, v = support
        new_support = (-((-(u + lo - (k - 1) * dil)) // s), (v + lo) // s)
    return fine, new_support


def _clean(program, state):
    """Propagate (clean mask, support) per dim through ``program``."""
    for item in program:
        if isinstance(item, Parallel):
            results = [_clean(branch, state) for branch in item.branches]
            merged = []
            for d in range(len(state)):
                masks = [r[d][0] for r in results]
                supports = [r[d][1] for r in results]
                support = None if any(x is None for x in supports) else (
                    min(x[0] for x in supports), max(x[1] for x in supports))
                merged.append((np.logical_and.reduce(masks), support))
            state = merged
            continue
        out = _item_out_spatial(item, tuple(mask.shape[0] for mask, _ in state))
        state = [_conv_dim(mask, support, item, d, m) for d, ((mask, support), m) in enumerate(zip(state, out))]
    return state


def _longest_run(mask) -> tuple[int, int]:
    """Half-open (start, stop) of the longest (first longest) run of True; (0, 0) when there is none."""
    edges = np.diff(np.concatenate([[0], np.asarray(mask, np.int8), [0]]))
    starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    if not starts.size:
        return (0, 0)
    longest = int(np.argmax(stops - starts))
    return (int(starts[longest]), int(stops[longest]))


def exact_region(program, in_spatial: tuple[int, ...]):
    """Half-open ``((start, stop), ...)`` box of output positions where the fold is exact.

    Returns None when the fold is exact on the whole output.  An empty interval
    (start == stop) in some dim means no output position is guaranteed exact.
    """
    state = [(np.ones(n, bool), (0, n - 1)) for n in in_spatial]
    masks = [mask for mask, _ in _clean(program, state)]
    if all(mask.all() for mask in masks):
        return None
    return tuple(_longest_run(mask) for mask in masks)


def exact_nowhere(region) -> bool:
    """Whether an :func:`exact_region` box holds no position (an empty interval in some dim)."""
    return region is not None and any(start == stop for start, stop in region)


def program_macs(program, in_spatial: tuple[int, ...]) -> int:
    """Multiply-adds of one example through ``program`` (pools count their adds)."""
    total, spatial = 0, tuple(in_spatial)
    for item in program:
        if isinstance(item, Parallel):
            total += sum(program_macs(branch, spatial) for branch in item.branches)
            spatial = _program_out_spatial(item.branches[0], spatial)
            continue
        out = _item_out_spatial(item, spatial)
        k = item.kernel
        total += _checks.prod(out) * _checks.prod(k.shape[:-2]) * k.shape[-2] * k.shape[-1]
        spatial = out
    return int(total)


def _program_out_spatial(program, in_spatial):
    spatial = in_spatial
    for item in program:
        spatial = (_program_out_spatial(item.branches[0], spatial) if isinstance(item, Parallel)
                   else _item_out_spatial(item, spatial))
    return spatial
