"""Fold N stacks of one structure (same layers and shapes, other weights) in one jitted call.

Build the batch from stacks that share a structure, fold it, read items back::

    batch = jf.batch.stack_batch([stack_0, stack_1, ...])   # weights get a leading axis N
    # the same by hand: jax.tree.map(lambda *xs: jnp.stack(xs), *stacks)
    folded = jf.batch.fold_batch(batch)       # kernel (N, *K, C_in, C_out), bias (N, C_out)
    folded.conv(3)                            # the jfactor.Conv of stack_3

Every layer lowers (under ``vmap``) to an :class:`~jfactor.ops.Affine` with a batch axis;
the fold is the same reduction as :func:`jfactor.fold.fold_program`, with the kernel of
each composition computed by a formulation that is linear in N (``vmap`` over the kernel
of ``conv_general_dilated`` is a grouped conv, quadratic in N on CPU: DESIGN.md 5):

- ``"shift"``: shift-and-add over the taps of one kernel, accumulated with in-place
  ``dynamic_update_slice`` (N * taps * size multiply-adds, no scatter, no reverse);
- ``"fft"``: both kernels zero-padded to the full size, ``rfftn``, a channel matmul per
  frequency, ``irfftn``; the full size leaves no wrap-around, so it is exact to float64
  rounding (errors grow like log(size) * eps * |a| |b|);
- ``"gather"``: a static Toeplitz index of the first kernel turns the composition into
  one batched matmul (it materialises taps x size values per item);
- ``"auto"``: per composition, the measured crossover in :func:`choose_method`.

All four agree with :func:`jfactor.fold.fold_affine` to rounding.  Memory is linear in N:
the result (N * prod(K) * C_in * C_out values) plus intermediates of the same order.

Sharding: ``fold_batch(batch, mesh=mesh)`` (or ``shard=True`` for a 1-D mesh over
``jax.devices()``) pads N to a multiple of the mesh size by repeating item 0, spreads the
batch axis over every mesh axis with ``NamedSharding(mesh, PartitionSpec(axes))``, folds,
and strips the padding; the result equals the single-device one.  Under
``jax.distributed.initialize()`` (several processes or hosts) every process calls
``fold_batch`` with the same full batch; each folds one contiguous block of it on its own
devices, and every process gets the whole result (:func:`jfactor.sharding.sharded_call`).

Compilation happens once per structure, N, dtype and method (``_fold._cache_size()``
counts them); :func:`enable_compilation_cache` keeps compiled folds across processes.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.compilation_cache import compilation_cache

from jfactor import ops
from jfactor._pytree import pytree_dataclass, static
from jfactor.errors import StackError
from jfactor.fold import conv_from_affine, fold_layers, has_bias
from jfactor.layers import Conv
from jfactor.sharding import batch_mesh, shard_batch, sharded_call
from jfactor.stack import Stack

METHODS = ("auto", "shift", "fft", "gather")


@pytree_dataclass
class BatchFolded:
    """N folded stacks: ``y_i[j] = bias[i] + sum_t kernel[i, t]^T x[stride * j + offset + t]``.

    Attributes:
      kernel: (N, *K, C_in, C_out), dense (groups spelled out block-diagonally).
      bias: (N, C_out).
      stride, offset, groups: shared by all items (see :class:`~jfactor.ops.Affine`).
      input_shape, output_shape: the stacks' ``(*spatial, C)``.
      has_bias: whether any layer adds a bias (else ``conv(i)`` has none).
    """

    kernel: jnp.ndarray
    bias: jnp.ndarray
    stride: tuple[int, ...] = static()
    offset: tuple[int, ...] = static()
    groups: int = static()
    input_shape: tuple[int, ...] = static()
    output_shape: tuple[int, ...] = static()
    has_bias: bool = static()

    def __len__(self) -> int:
        return self.kernel.shape[0]

    @property
    def size(self) -> tuple[int, ...]:
        """Receptive field ``K`` of every item."""
        return tuple(self.kernel.shape[1 : len(self.stride) + 1])

    def affine(self, i: int) -> ops.Affine:
        """The infinite-grid map of item ``i``."""
        return ops.Affine(self.kernel[i], self.bias[i], self.stride, self.offset, self.groups)

    def conv(self, i: int) -> Conv:
        """Item ``i`` as one padded, strided, grouped :class:`~jfactor.layers.Conv`."""
        return conv_from_affine(self.affine(i), self.input_shape, self.output_shape, bias=self.has_bias)


# ----------------------------------------------------------------------------------------
# Kernel compositions: a (N, *ka, I, M) applied with stride ``step``, then b (N, *kb, M, O)
# -> (N, *(ka + step (kb - 1)), I, O), out[u] = sum_{ta + step * tb = u} a[ta] @ b[tb]
# (ops.full_conv with a batch axis).
# ----------------------------------------------------------------------------------------


def _spatial(x, ndim: int) -> tuple[int, ...]:
    return tuple(x.shape[1 : ndim + 1])


def full_size(ka: tuple[int, ...], kb: tuple[int, ...], step: tuple[int, ...]) -> tuple[int, ...]:
    """Spatial size of the composition of a ``ka`` kernel (stride ``step``) and a ``kb`` one."""
    return tuple(x + s * (y - 1) for x, y, s in zip(ka, kb, step))


def _full_size(a, b, step) -> tuple[int, ...]:
    return full_size(_spatial(a, len(step)), _spatial(b, len(step)), tuple(step))


def _dilate(b, step):
    """(N, *k, M, O) -> (N, *((k - 1) step + 1), M, O), by interior padding."""
    return jax.vmap(lambda k: ops.dilate(k, tuple(step)))(b)


def _taps(shape) -> itertools.product:
    return itertools.product(*map(range, shape))


def _tap(x, t: tuple[int, ...], ndim: int):
    """Tap ``t`` of a batched kernel (N, *k, I, O) as (N, 1, ..., 1, I, O), to broadcast."""
    return lax.expand_dims(x[(slice(None),) + t], tuple(range(1, ndim + 1)))


UNROLL_CONTRACTION = 32


def _matmul(x, w):
    """``jnp.matmul(x, w)``: (..., I, M) @ (..., M, O) -> (..., I, O), leading axes broadcast.

    Up to ``UNROLL_CONTRACTION`` (measured: XLA's CPU dot on batches of tiny matrices runs
    at 1-4 GFLOP/s, 5-20x slower) it is a sum of M broadcast products, fused by XLA.
    """
    m = x.shape[-1]
    if m > UNROLL_CONTRACTION:
        return jnp.matmul(x, w, precision=lax.Precision.HIGHEST)
    return sum(x[..., :, k, None] * w[..., None, k, :] for k in range(m))


def compose_shift(a, b, step):
    """Shift-and-add: one scaled copy of the larger kernel per tap of the smaller one.

    Loops over the taps of ``b`` (copies of ``a`` at offsets ``step * tb``) or, when ``a``
    has fewer taps, over those of ``a`` (copies of dilated ``b`` at offsets ``ta``).  The
    copies are accumulated in place with ``dynamic_update_slice`` (never a scatter).
    """
    nd = len(step)
    ka, kb = _spatial(a, nd), _spatial(b, nd)
    if math.prod(kb) <= math.prod(ka):
        terms = ((tuple(s * t for s, t in zip(step, tb)), _matmul(a, _tap(b, tb, nd)))
                 for tb in _taps(kb))
    else:
        bd = _dilate(b, step)
        terms = ((ta, _matmul(_tap(a, ta, nd), bd)) for ta in _taps(ka))
    out = jnp.zeros((a.shape[0], *_full_size(a, b, step), a.shape[-2], b.shape[-1]), a.dtype)
    for start, term in terms:
        start = (0, *start, 0, 0)
        out = lax.dynamic_update_slice(out, lax.dynamic_slice(out, start, term.shape) + term, start)
    return out


def compose_fft(a, b, step):
    """Batched FFT: pad both to the full size, ``rfftn``, channel matmul per frequency, ``irfftn``."""
    nd = len(step)
    size = _full_size(a, b, step)
    axes = tuple(range(1, nd + 1))
    fa = jnp.fft.rfftn(a, s=size, axes=axes)
    fb = jnp.fft.rfftn(_dilate(b, step), s=size, axes=axes)
    return jnp.fft.irfftn(_matmul(fa, fb), s=size, axes=axes)


@functools.lru_cache(maxsize=256)
def toeplitz_index(ka: tuple[int, ...], kb: tuple[int, ...], step: tuple[int, ...]) -> np.ndarray:
    """(U, T) int index: entry [u, tb] is the flat position of ``a[u - step * tb]``.

    ``U = prod(full size)``, ``T = prod(kb)``; positions outside ``a`` get ``prod(ka)``,
    the index of a zero row appended to the flattened ``a``.
    """
    size = full_size(ka, kb, step)
    u = np.indices(size).reshape(len(size), -1, 1)
    t = np.indices(kb).reshape(len(kb), 1, -1)
    src = u - np.asarray(step).reshape(-1, 1, 1) * t
    inside = np.all((src >= 0) & (src < np.asarray(ka).reshape(-1, 1, 1)), axis=0)
    flat = np.ravel_multi_index(tuple(np.clip(src, 0, None)), ka, mode="clip")
    return np.where(inside, flat, math.prod(ka))


def compose_gather(a, b, step):
    """Batched matmul: gather the Toeplitz matrix of ``a`` (static index), contract with ``b``."""
    nd = len(step)
    n, i, m, o = a.shape[0], a.shape[-2], a.shape[-1], b.shape[-1]
    index = toeplitz_index(_spatial(a, nd), _spatial(b, nd), tuple(step))
    flat = jnp.pad(a.reshape(n, -1, i, m), ((0, 0), (0, 1), (0, 0), (0, 0)))
    toeplitz = jnp.moveaxis(flat[:, index], 2, 3).reshape(n, -1, i, index.shape[1] * m)  # (N, U, I, T M)
    out = jnp.matmul(toeplitz, b.reshape(n, 1, -1, o), precision=lax.Precision.HIGHEST)
    return out.reshape(n, *_full_size(a, b, step), i, o)


COMPOSERS = {"shift": compose_shift, "fft": compose_fft, "gather": compose_gather}


# Crossover, measured with ``python experiments/bench_fold.py --crossover`` (N = 256, float64,
# AMD EPYC, 2 cores, jax 0.10.2; microseconds per item, C_in = C_out = C; a has ka^d taps,
# b kb^d; the full table is in experiments/results/bench_fold_crossover.json):
#
#   d  ka  kb  C  step   shift     fft   gather
#   1  64   9  1    1      1.3     1.3      4.1
#   1 256  33  1    1      9.6     5.3     65.2
#   1  64  17  4    1      9.8    20.1    159.2
#   1 256  33  4    1    124.0   102.9   1196.9
#   2  24   5  1    1     11.5    15.6     52.1
#   2  24   7  1    1     87.9    59.1    612.3
#   2   8   7  1    1      2.8     4.9     20.3
#   2  64   9  1    1    557.3   192.5   3066.9
#   2  64   5  4    1   3115.0  5650.6        -
#   2  64   7  4    1   5919.1  4501.2        -
#   3  12   3  1    1     30.1    72.0    494.5
#   3  12   5  1    1    201.2   100.2   3881.3
#
# Shift-and-add wins up to 27 taps in the smaller kernel, FFT from 33 taps on, unless the
# larger kernel is small too (8x8 with 7x7: FFT's fixed cost dominates).  Gather never
# wins on CPU: XLA's gather and its batched matmul of tiny matrices are slow there.  The
# rule below picks the faster one in 67 of the 72 measured cases; the 5 misses (9 to 25
# taps, near-ties) cost at most 1.24x.
FFT_MIN_TAPS = 33
FFT_MIN_SIZE_RATIO = 4


def choose_method(a_shape: tuple[int, ...], b_shape: tuple[int, ...], step: tuple[int, ...]) -> str:
    """The faster formulation on CPU for a (N, *ka, I, M) then b (N, *kb, M, O); see above.

    ``"fft"`` when the smaller kernel has at least ``FFT_MIN_TAPS`` taps and the larger
    one ``FFT_MIN_SIZE_RATIO`` times as many; ``"shift"`` otherwise.
    """
    nd = len(step)
    small, large = sorted((math.prod(a_shape[1 : nd + 1]), math.prod(b_shape[1 : nd + 1])))
    return "fft" if small >= FFT_MIN_TAPS and large >= FFT_MIN_SIZE_RATIO * small else "shift"


# ----------------------------------------------------------------------------------------
# The batched fold.
# ----------------------------------------------------------------------------------------


def _compose(first: ops.Affine, second: ops.Affine, method: str) -> ops.Affine:
    if method == "auto":
        method = choose_method(first.kernel.shape, second.kernel.shape, first.stride)
    kernel = COMPOSERS[method](first.kernel, second.kernel, first.stride)
    return jax.vmap(ops.composed_affine)(first, second, kernel)


def _lower(stack: Stack, dtype) -> list:
    """Per top-level layer, its program (for one item; vmapped by the caller)."""
    return [layer.lower(shape, dtype) for layer, (shape, _) in zip(stack.layers, stack.shapes())]


@functools.partial(jax.jit, static_argnames=("dtype", "method"))
def _fold(stack: Stack, dtype, method: str) -> BatchFolded:
    programs = jax.vmap(lambda s: _lower(s, dtype))(stack)
    result = fold_layers(stack.layers, programs, compose_fn=functools.partial(_compose, method=method), lift=jax.vmap)
    bias = any(has_bias(program) for program in programs)
    item = jax.tree.map(lambda x: x[0], stack)
    return BatchFolded(result.kernel, result.bias, result.stride, result.offset, result.groups,
                       item.input_shape, item.output_shape, bias)


def batch_size(stacks: Stack) -> int:
    """N, the common leading axis of every weight of a batched stack; clear errors otherwise."""
    if not isinstance(stacks, Stack):
        raise StackError(
            f"expected a jfactor.Stack whose weights carry a leading batch axis (build one with "
            f"jfactor.batch.stack_batch), got {type(stacks).__name__}"
        )
    leaves = jax.tree_util.tree_flatten_with_path(stacks)[0]
    if not leaves:
        raise StackError("the stack has no weights, so there is nothing to batch: fold it once with jfactor.fold")
    sizes = {jax.tree_util.keystr(path): (leaf.shape[0] if leaf.ndim else None) for path, leaf in leaves}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"stack{path}: {n}" for path, n in sizes.items())
        raise StackError(
            f"the weights disagree on the leading batch axis ({listed}); is this an unbatched "
            "stack? build the batch with jfactor.batch.stack_batch([...])"
        )
    return next(iter(sizes.values()))


def fold_batch(stacks: Stack, *, method: str = "auto", dtype=None, mesh=None, shard: bool = False) -> BatchFolded:
    """Fold N stacks of one structure in one jitted call; see the module docstring.

    Args:
      stacks: a :class:`~jfactor.Stack` whose weights carry a leading batch axis N
        (:func:`stack_batch`).
      method: ``"auto"``, ``"shift"``, ``"fft"`` or ``"gather"`` (all exact to rounding).
      dtype: compute dtype; default the weights' dtype.
      mesh: a :class:`jax.sharding.Mesh` to spread the batch over (all its axes; under
        ``jax.distributed``, each process uses its own devices of it).
      shard: with ``mesh=None``, build :func:`batch_mesh` over all devices of all processes.

    Returns:
      :class:`BatchFolded` with kernel (N, *K, C_in, C_out) and bias (N, C_out).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    n = batch_size(stacks)
    dtype = jnp.dtype(dtype or stacks.dtype)
    try:
        folded = sharded_call(lambda s: _fold(s, dtype, method), stacks, mesh=mesh, shard=shard)
    except StackError as exc:
        raise StackError(
            f"one item of the batch (the weights without their leading axis, N = {n}) is not a "
            f"valid stack; does every weight carry the batch axis first? {exc}"
        ) from exc
    return jax.tree.map(jnp.asarray, folded)


def _structure_error(stacks: Sequence[Stack], i: int) -> StackError:
    """Name the first difference between ``stacks[i]`` and ``stacks[0]``."""
    first, other = stacks[0], stacks[i]
    if first.input_shape != other.input_shape:
        return StackError(f"stack_batch: stacks[{i}] has input_shape {other.input_shape}, "
                          f"stacks[0] has {first.input_shape}")
    if len(first.layers) != len(other.layers):
        return StackError(f"stack_batch: stacks[{i}] has {len(other.layers)} layers, "
                          f"stacks[0] has {len(first.layers)}")
    for j, (a, b) in enumerate(zip(first.layers, other.layers)):
        if jax.tree.structure(a) != jax.tree.structure(b):
            return StackError(f"stack_batch: stacks[{i}].layers[{j}] is {b!r}, stacks[0].layers[{j}] "
                              f"is {a!r}; a batch needs one structure (same layers and settings)")
    paths = jax.tree_util.tree_flatten_with_path(first)[0]
    for (path, a), b in zip(paths, jax.tree.leaves(other)):
        if a.shape != b.shape:
            return StackError(f"stack_batch: stacks[{i}]{jax.tree_util.keystr(path)} has shape "
                              f"{tuple(b.shape)}, stacks[0]'s has {tuple(a.shape)}")
    return StackError(f"stack_batch: stacks[{i}] differs from stacks[0]")


def stack_batch(stacks: Sequence[Stack]) -> Stack:
    """One :class:`~jfactor.Stack` whose weights stack those of ``stacks`` along a new axis 0.

    All stacks must share a structure: input shape, layers, settings and weight shapes.
    """
    stacks = list(stacks)
    if not stacks:
        raise StackError("stack_batch: needs at least one stack")
    for i, stack in enumerate(stacks):
        if not isinstance(stack, Stack):
            raise StackError(f"stack_batch: stacks[{i}] is a {type(stack).__name__}, not a jfactor.Stack")
    structure = jax.tree.structure(stacks[0])
    shapes = [leaf.shape for leaf in jax.tree.leaves(stacks[0])]
    for i, stack in enumerate(stacks[1:], start=1):
        if (jax.tree.structure(stack) != structure
                or [leaf.shape for leaf in jax.tree.leaves(stack)] != shapes):
            raise _structure_error(stacks, i)
    return jax.tree.map(lambda *xs: jnp.stack(xs), *stacks)


def enable_compilation_cache(path, *, min_compile_time_s: float = 0.0) -> Path:
    """Keep compiled folds on disk under ``path`` (jax's persistent compilation cache).

    Sets ``jax_compilation_cache_dir`` and ``jax_persistent_cache_min_compile_time_secs``
    (default 0: cache every fold, they compile in about a second); a later process with
    the same jax, backend and shapes loads instead of compiling.  Returns the directory.
    Anyone who can write there can run code in your process: keep it private.
    """
    path = Path(path).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    if jax.config.jax_compilation_cache_dir not in (None, str(path)):
        compilation_cache.reset_cache()  # jax opened another directory already
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
    return path


__all__ = [
    "BatchFolded", "METHODS", "batch_mesh", "batch_size", "shard_batch", "choose_method", "compose_fft",
    "compose_gather", "compose_shift", "enable_compilation_cache", "fold_batch", "full_size",
    "stack_batch",
]
