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
- ``"chain"``: no pairwise compositions at all: every map of a sequence, its kernel dilated
  by the stride accumulated before it, is transformed once at the final size (a DFT
  taken tap by tap), the spectra are multiplied per frequency with the channels
  contracted, and one ``irfftn`` gives the folded kernel (:func:`compose_chain`); branches
  are folded that way too and enter their sequence as one map.  Few bytes per item and
  few device ops, more FLOPs than shift-and-add: the formulation for accelerators;
- ``"auto"``: per platform (:func:`auto_method`).  On the CPU, per composition, the
  measured crossover of :func:`choose_method`; on accelerators, the plan with the least
  modelled time (:func:`modelled_seconds`: FLOPs, streamed bytes and ops of each
  composition, :func:`fold_plan`, with rates fitted to an H200).

All agree with :func:`jfactor.fold.fold_affine` to rounding.  Memory is linear in N:
the result (N * prod(K) * C_in * C_out values) plus intermediates of the same order.

Sharding: ``fold_batch(batch, mesh=mesh)`` (or ``shard=True`` for a 1-D mesh over
``jax.devices()``) pads N to a multiple of the mesh size by repeating item 0, spreads the
batch axis over every mesh axis with ``NamedSharding(mesh, PartitionSpec(axes))``, folds,
and strips the padding; the result equals the single-device one.  Under
``jax.distributed.initialize()`` (several processes or hosts) every process calls
``fold_batch`` with the same full batch; each folds one contiguous block of it on its own
devices, and every process gets the whole result (:func:`jfactor.sharding.sharded_call`).

Compilation happens once per structure, N, dtype and method (``_fold._cache_size()``
counts them; the finiteness check of the result is one small program more per result shape);
:func:`enable_compilation_cache` (from :mod:`jfactor.cache`) keeps compiled folds across processes.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import operator
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jfactor import ops
from jfactor._checks import floating, is_concrete
from jfactor._pytree import pytree_dataclass, static
from jfactor.cache import enable_compilation_cache
from jfactor.errors import ConfigError, StackError
from jfactor.fold import conv_from_affine, fold_layers, has_bias
from jfactor.layers import Conv
from jfactor.sharding import batch_mesh, check_mesh, shard_batch, sharded_call
from jfactor.stack import Stack

METHODS = ("auto", "shift", "fft", "gather", "chain")


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

    def __repr__(self) -> str:
        *_, c_in, c_out = self.kernel.shape
        return (f"BatchFolded({len(self)} stacks: {'x'.join(map(str, self.size))} kernels, {c_in}->{c_out} "
                f"channels, stride {'x'.join(map(str, self.stride))}, {self.kernel.dtype})")

    @property
    def size(self) -> tuple[int, ...]:
        """Receptive field ``K`` of every item."""
        return tuple(self.kernel.shape[1 : len(self.stride) + 1])

    def affine(self, i: int) -> ops.Affine:
        """The infinite-grid map of item ``i`` (negative ``i`` counts from the end)."""
        try:
            i = operator.index(i)  # Python, numpy and concrete jax integers
        except TypeError:
            raise TypeError(f"items are numbered by integers, got {i!r}") from None
        if not -len(self) <= i < len(self):
            raise IndexError(f"item {i} of a batch of {len(self)} folded stacks")
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


def _transform_dtype(*arrays):
    """The dtype FFTs of ``arrays`` run in: theirs, at least float32 (XLA's FFT takes no half precision)."""
    return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def compose_fft(a, b, step):
    """Batched FFT: pad both to the full size, ``rfftn``, channel matmul per frequency, ``irfftn``.
    Half-precision kernels are transformed in float32 and the result cast back."""
    nd = len(step)
    size = _full_size(a, b, step)
    axes = tuple(range(1, nd + 1))
    work = _transform_dtype(a, b)
    fa = jnp.fft.rfftn(a.astype(work), s=size, axes=axes)
    fb = jnp.fft.rfftn(_dilate(b, step).astype(work), s=size, axes=axes)
    return jnp.fft.irfftn(_matmul(fa, fb), s=size, axes=axes).astype(jnp.result_type(a, b))


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


# ----------------------------------------------------------------------------------------
# The whole chain at once: every kernel's DFT at the final size, one product, one inverse.
# ----------------------------------------------------------------------------------------


def chain_size(sizes: Sequence[tuple[int, ...]], steps: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
    """Spatial size of a chain of kernels ``sizes[i]``, each dilated by its accumulated stride ``steps[i]``."""
    return tuple(1 + sum(s * (k - 1) for k, s in zip(ks, ss)) for ks, ss in zip(zip(*sizes), zip(*steps)))


@functools.lru_cache(maxsize=256)
def dft_matrix(length: int, taps: int, step: int, half: bool) -> np.ndarray:
    """(F, taps) complex128: ``[f, t] = exp(-2 pi i f step t / length)``; F = ``length // 2 + 1`` if ``half``.

    The DFT at ``length`` points of a kernel axis with ``taps`` taps dilated by ``step``;
    ``(f step t) mod length`` is reduced in integers first, so every entry is within one
    rounding of the exact root of unity.
    """
    f = np.arange(length // 2 + 1 if half else length)[:, None]
    return np.exp(-2j * np.pi * ((f * step * np.arange(taps)[None, :]) % length) / length)


def _dft_axis(x, w, axis: int, fuse: bool):
    """Contract spatial ``axis`` of x (N, ..., k, ..., I, O) with w (F, k) -> (N, ..., F, ..., I, O).

    ``fuse`` (the last axis, up to ``UNROLL_CONTRACTION`` taps): a sum of broadcast products
    that XLA fuses with its consumer, the product of the spectra.  Else one ``tensordot``,
    whose result goes through memory: fused, the first axes would be recomputed for every
    frequency of the last (``F_last`` times the FLOPs for a few bytes less).
    """
    w = jnp.asarray(w, jnp.result_type(x.dtype, jnp.complex64))
    taps = x.shape[axis]
    if not fuse or taps > UNROLL_CONTRACTION:
        return jnp.moveaxis(jnp.tensordot(x, w, axes=((axis,), (1,)), precision=lax.Precision.HIGHEST), -1, axis)
    shape = [1] * x.ndim
    shape[axis] = w.shape[0]
    return sum(lax.slice_in_dim(x, t, t + 1, axis=axis) * w[:, t].reshape(shape) for t in range(taps))


def compose_chain(kernels: Sequence, steps: Sequence[tuple[int, ...]]):
    """The composition of a whole chain in the frequency domain, at its final size, in one transform.

    ``kernels[i]`` (N, *k_i, C_i, C_{i+1}) is applied after the others before it, dilated by
    the accumulated stride ``steps[i]`` (``steps[0]`` all ones).  Each kernel's DFT at the
    final size ``K`` (:func:`chain_size`) is taken tap by tap (:func:`dft_matrix`: ``prod(k_i)``
    terms per frequency, no padded copy), the spectra are multiplied per frequency with the
    channels contracted in order, and one ``irfftn`` returns (N, *K, C_0, C_last).  ``K``
    holds the full linear convolution, so nothing wraps around: exact to float64 rounding
    (errors grow like log(K) * eps * prod |k_i|).  Bytes per item: the kernels, the first
    axes' partial DFTs of each kernel (``F_1 ... F_{d-1} k_d`` values), one spectrum and the
    result; the product runs in one fused loop.  Memory linear in N.  Half-precision kernels
    are transformed in float32 and the result cast back to their dtype.
    """
    nd = len(steps[0])
    size = chain_size([_spatial(k, nd) for k in kernels], steps)
    work = _transform_dtype(*kernels)
    spectrum = None
    for kernel, step in zip(kernels, steps):
        x = kernel.astype(work)
        for axis in range(nd):
            w = dft_matrix(size[axis], x.shape[1 + axis], step[axis], half=axis == nd - 1)
            x = _dft_axis(x, w, 1 + axis, fuse=axis == nd - 1)
        spectrum = x if spectrum is None else _matmul(spectrum, x)
    return jnp.fft.irfftn(spectrum, s=size, axes=tuple(range(1, nd + 1))).astype(jnp.result_type(*kernels))


# Crossover, measured with ``python experiments/bench_fold.py --crossover`` (N = 256, float64,
# AMD EPYC, 2 cores, jax 0.10.2; microseconds per item, C_in = C_out = C; a has ka^d taps,
# b kb^d; the full table is in experiments/results/cpu/bench_fold_crossover.json):
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
# What a fold runs and what it costs: the model behind method="auto" off the CPU.
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Composition:
    """One composition a fold runs: ``method`` on kernels ``shapes[j]`` (N, *k_j, C_j, C_{j+1}).

    ``steps[j]``: the stride accumulated before kernel ``j`` (``steps[0]`` all ones); a
    pairwise composition is a chain of two.
    """

    method: str
    shapes: tuple[tuple[int, ...], ...]
    steps: tuple[tuple[int, ...], ...]

    def cost(self, itemsize: int = 8) -> dict:
        """Per item: ``bytes`` (ideal: kernels read, result written once), ``bytes_moved`` (as streamed),
        ``flops`` and ``ops`` (device kernels launched per call, whatever N).

        shift: every tap after the first reads the copy of the larger kernel and reads and
        writes its window of the result; fft: both kernels padded to the full size, two
        forward transforms, the product and one inverse, each through memory (FFT
        ``2.5 n log2 n`` FLOPs); gather: the Toeplitz matrix written and read; chain: the
        partial DFTs of the first axes, one spectrum and the result (FFT passes counted twice).
        """
        nd = len(self.steps[0])
        sizes = [s[1 : nd + 1] for s in self.shapes]
        channels = [self.shapes[0][-2]] + [s[-1] for s in self.shapes]
        i, o = channels[0], channels[-1]
        full = math.prod(chain_size(sizes, self.steps))
        ideal = itemsize * (sum(math.prod(k) * a * b for k, a, b in zip(sizes, channels, channels[1:])) + full * i * o)
        if self.method == "chain":
            return {"bytes": ideal, **_chain_cost(sizes, channels, chain_size(sizes, self.steps), itemsize)}
        (ka, kb), m = sizes, channels[1]
        taps, other = sorted((math.prod(ka), math.prod(kb)))
        if self.method == "fft":
            flops = 2.5 * full * math.log2(full) * (i * m + m * o + i * o) + 8 * (full / 2) * i * m * o
            return {"bytes": ideal, "bytes_moved": itemsize * full * (4 * (i * m + m * o) + 3 * i * o),
                    "flops": flops, "ops": 6}
        flops = 2.0 * taps * other * i * m * o
        if self.method == "gather":
            return {"bytes": ideal, "bytes_moved": ideal + 2 * itemsize * full * math.prod(kb) * i * m,
                    "flops": flops, "ops": 3}
        moved = itemsize * (full * i * o + (taps - 1) * other * (i * m + 2 * i * o))
        return {"bytes": ideal, "bytes_moved": moved, "flops": flops, "ops": taps}


def _chain_cost(sizes, channels, size, itemsize: int) -> dict:
    """Streamed bytes, FLOPs and ops per item of :func:`compose_chain` (complex values: 2 items, 4x FLOPs)."""
    nd = len(size)
    freqs = (*size[:-1], size[-1] // 2 + 1)
    flops, moved, i, o = 0.0, 0.0, channels[0], channels[-1]
    for j, (k, m, out) in enumerate(zip(sizes, channels, channels[1:])):
        moved += itemsize * math.prod(k) * m * out
        for axis in range(nd):  # contracting axis ``axis``: output size times its taps
            flops += 8 * m * out * math.prod(freqs[: axis + 1]) * math.prod(k[axis:])
            if axis < nd - 1:  # the first axes' partial DFTs go through memory, the last axis is fused
                moved += 2 * 2 * itemsize * math.prod(freqs[: axis + 1]) * math.prod(k[axis + 1 :]) * m * out
        if j:
            flops += 8 * math.prod(freqs) * i * m * out
    flops += 2.5 * math.prod(size) * math.log2(math.prod(size)) * i * o
    moved += 2 * 2 * itemsize * math.prod(freqs) * i * o + 2 * itemsize * math.prod(size) * i * o
    return {"bytes_moved": moved, "flops": flops, "ops": len(sizes) * (nd - 1) + 2}


def plan_cost(plan: Sequence[Composition], itemsize: int = 8) -> dict:
    """The per-item costs of a whole fold (see :meth:`Composition.cost`), summed."""
    costs = [c.cost(itemsize) for c in plan]
    return {key: float(sum(c[key] for c in costs)) for key in ("bytes", "bytes_moved", "flops", "ops")}


@dataclasses.dataclass(frozen=True)
class DeviceModel:
    """Rates of a device for :func:`modelled_seconds`.

    ``byte_s``: streamed bytes per second each formulation achieves (its ``bytes_moved``
    over its time), ``flop_s``: FLOP/s, ``op_s``: seconds per op (a kernel launch and its gap).
    """

    byte_s: dict
    flop_s: float
    op_s: float


# Accelerators, fitted to the section-8 stack on one H200 in float64 (jax 0.11.2, N = 100k:
# shift 193k stacks/s, i.e. 0.14 TB/s of its modelled bytes; fft 1.15M, 1.2 TB/s; the
# device copies 4.3 TB/s).  The chain is not measured there: it is assumed to stream like
# fft (fused elementwise loops and one FFT library call), so on that stack it is modelled
# at 3M stacks/s.  Rerun experiments/device_check.sh on a GPU to check the ranking.
ACCELERATOR = DeviceModel(byte_s={"shift": 0.14e12, "gather": 0.14e12, "fft": 1.2e12, "chain": 1.2e12},
                          flop_s=10e12, op_s=10e-6)


def modelled_seconds(plan: Sequence[Composition], n: int, device: DeviceModel = ACCELERATOR,
                     itemsize: int = 8) -> float:
    """Modelled seconds of a fold of ``n`` items: per item FLOPs and streamed bytes, plus a fixed cost per op."""
    total = 0.0
    for composition in plan:
        cost = composition.cost(itemsize)
        total += (n * (cost["flops"] / device.flop_s + cost["bytes_moved"] / device.byte_s[composition.method])
                  + cost["ops"] * device.op_s)
    return total


# ----------------------------------------------------------------------------------------
# The batched fold.
# ----------------------------------------------------------------------------------------


def _kernel(composition: Composition, kernels: list):
    """The composed kernel of ``composition`` (the default ``kernel_fn`` of the walk below)."""
    if composition.method == "chain":
        return compose_chain(kernels, composition.steps)
    return COMPOSERS[composition.method](*kernels, composition.steps[1])


class _Chain:
    """Maps collected by ``method="chain"``, composed at once by :func:`_close`."""

    def __init__(self, affines: list):
        self.affines = affines


def _chain(first, second) -> _Chain:
    return _Chain([a for x in (first, second) for a in (x.affines if isinstance(x, _Chain) else [x])])


def _close(x, kernel_fn) -> ops.Affine:
    """The batched :class:`~jfactor.ops.Affine` of a :class:`_Chain` (anything else passes through).

    Bias, stride, offset and groups follow :func:`jfactor.ops.composed_affine` map by map
    (its kernel argument is a placeholder until the end); the kernel comes from ``kernel_fn``.
    """
    if not isinstance(x, _Chain):
        return x
    steps, result = [], None
    for affine in x.affines:
        steps.append((1,) * affine.ndim if result is None else result.stride)
        result = affine if result is None else jax.vmap(ops.composed_affine)(result, affine, result.kernel)
    kernels = [a.kernel for a in x.affines]
    kernel = kernel_fn(Composition("chain", tuple(k.shape for k in kernels), tuple(steps)), kernels)
    return ops.Affine(kernel, result.bias, result.stride, result.offset, result.groups)


def _compose(first: ops.Affine, second: ops.Affine, method: str, kernel_fn) -> ops.Affine:
    if method == "auto":
        method = choose_method(first.kernel.shape, second.kernel.shape, first.stride)
    composition = Composition(method, (first.kernel.shape, second.kernel.shape), ((1,) * first.ndim, first.stride))
    kernel = kernel_fn(composition, [first.kernel, second.kernel])
    return jax.vmap(ops.composed_affine)(first, second, kernel)


def _fold_affine(stack: Stack, dtype, method: str, kernel_fn=_kernel) -> tuple[ops.Affine, bool]:
    """The batched fold (``method``: a composer, ``"chain"``, or ``"auto"`` = per composition,
    :func:`choose_method`), and whether any layer has a bias."""
    programs = jax.vmap(lambda s: s.layer_programs(dtype))(stack)
    if method == "chain":
        close = functools.partial(_close, kernel_fn=kernel_fn)

        def lift(fn):  # branch merges need closed chains
            return lambda *args: jax.vmap(fn)(*jax.tree.map(close, args, is_leaf=lambda x: isinstance(x, _Chain)))

        result = close(fold_layers(stack.layers, programs, compose_fn=_chain, lift=lift))
    else:
        compose = functools.partial(_compose, method=method, kernel_fn=kernel_fn)
        result = fold_layers(stack.layers, programs, compose_fn=compose, lift=jax.vmap)
    return result, any(has_bias(program) for program in programs)


@functools.partial(jax.jit, static_argnames=("dtype", "method"))
def _fold(stack: Stack, dtype, method: str) -> BatchFolded:
    result, bias = _fold_affine(stack, dtype, method)
    item = jax.tree.map(lambda x: x[0], stack)
    return BatchFolded(result.kernel, result.bias, result.stride, result.offset, result.groups,
                       item.input_shape, item.output_shape, bias)


def fold_plan(stacks: Stack, method: str = "auto", dtype=None) -> tuple[Composition, ...]:
    """The compositions :func:`fold_batch` runs with ``method`` (``"auto"``: the CPU's per-composition
    picks), found by tracing the fold abstractly (nothing computed); cached per structure and shapes."""
    n = batch_size(stacks)  # a batched stack, or a clear error
    dtype = jnp.dtype(dtype or stacks.dtype)
    shapes = tuple(leaf.shape for leaf in jax.tree.leaves(stacks))
    try:
        return _cached_plan(jax.tree.structure(stacks), shapes, dtype, method)
    except StackError as exc:
        raise _not_an_item(exc, n) from exc


@functools.lru_cache(maxsize=256)
def _cached_plan(structure, shapes, dtype, method: str) -> tuple[Composition, ...]:
    plan = []

    def record(composition, kernels):
        plan.append(composition)
        size = chain_size([k.shape[1:-2] for k in kernels], composition.steps)
        return jnp.zeros((kernels[0].shape[0], *size, kernels[0].shape[-2], kernels[-1].shape[-1]), kernels[0].dtype)

    abstract = jax.tree.unflatten(structure, [jax.ShapeDtypeStruct(s, dtype) for s in shapes])
    jax.eval_shape(lambda s: _fold_affine(s, dtype, method, record)[0], abstract)
    return tuple(plan)


def auto_method(stacks: Stack, platform: str, n_per_device: int, dtype=None) -> str:
    """What ``method="auto"`` runs on ``platform`` (``jax.Device.platform``).

    CPU: ``"auto"``, the measured per-composition crossover (:func:`choose_method`).
    Elsewhere: of ``"chain"``, ``"fft"`` and ``"shift"``, the one with the least
    :func:`modelled_seconds` on :data:`ACCELERATOR` for ``n_per_device`` items.
    """
    if platform == "cpu":
        return "auto"
    itemsize = jnp.dtype(dtype or stacks.dtype).itemsize
    return min(("chain", "fft", "shift"),
               key=lambda m: modelled_seconds(fold_plan(stacks, m, dtype), n_per_device, ACCELERATOR, itemsize))


def _not_an_item(exc: StackError, n: int) -> StackError:
    """The error of a batch whose items (weights without their leading axis N) are not valid stacks."""
    return StackError(f"one item of the batch (the weights without their leading axis, N = {n}) is not a valid "
                      f"stack; does every weight carry the batch axis first? {exc}")


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
    n = next(iter(sizes.values()))
    if n == 0:
        raise StackError("the batch is empty (leading axis 0): there is no stack to fold")
    return n


def fold_batch(stacks: Stack, *, method: str = "auto", dtype=None, mesh=None, shard: bool = False) -> BatchFolded:
    """Fold N stacks of one structure in one jitted call; see the module docstring.

    Args:
      stacks: a :class:`~jfactor.Stack` whose weights carry a leading batch axis N
        (:func:`stack_batch`).
      method: ``"auto"`` (:func:`auto_method` for the platform it runs on), ``"shift"``,
        ``"fft"``, ``"gather"`` or ``"chain"`` (all exact to rounding).
      dtype: compute dtype; default the weights' dtype.
      mesh: a :class:`jax.sharding.Mesh` to spread the batch over (all its axes; under
        ``jax.distributed``, each process uses its own devices of it).
      shard: with ``mesh=None``, build :func:`batch_mesh` over all devices of all processes.

    Returns:
      :class:`BatchFolded` with kernel (N, *K, C_in, C_out) and bias (N, C_out).

    Raises:
      ConfigError: an unknown method, a dtype that is not floating (integer weights would fold
        truncated), a mesh or shard of the wrong type.
      StackError: items that are not valid stacks, or whose folds are not finite (NaN or inf
        weights, an overflow): found by one more jitted reduction over the result, whose value
        it waits for (not under ``jax.jit``, where the result is not concrete).
    """
    if method not in METHODS:
        raise ConfigError(f"fold_batch: method must be one of {METHODS}, got {method!r}")
    check_mesh(mesh, shard)
    n = batch_size(stacks)
    dtype = floating(dtype or stacks.dtype, "fold_batch: dtype" if dtype else "fold_batch: the weights' dtype")
    try:
        if method == "auto":
            devices = list(mesh.devices.flat) if mesh is not None else jax.devices() if shard else jax.devices()[:1]
            method = auto_method(stacks, devices[0].platform, -(-n // len(devices)), dtype)
        folded = sharded_call(lambda s: _fold(s, dtype, method), stacks, mesh=mesh, shard=shard)
    except StackError as exc:
        raise _not_an_item(exc, n) from exc
    folded = jax.tree.map(jnp.asarray, folded)
    if not is_concrete(folded.kernel):  # under jax.jit or jax.grad: the caller's to check
        return folded
    bad = np.flatnonzero(np.asarray(_non_finite_items(folded.kernel, folded.bias)))  # a pass on its device
    if bad.size:
        raise StackError(f"fold_batch: the folds of {bad.size} of {n} items are not finite (the first: item {bad[0]}): "
                         "their weights hold NaN or inf, overflow when composed, or give a BatchNorm a var + "
                         "epsilon that is not > 0")
    return folded


@jax.jit
def _non_finite_items(kernel, bias):
    """Which items (axis 0) of a batched fold, kernel (N, ...) and bias (N, C_out), are not finite: (N,) bool."""
    rows = lambda a: jnp.isfinite(a.reshape(a.shape[0], -1)).all(axis=1)  # noqa: E731
    return ~(rows(kernel) & rows(bias))


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

    All stacks must share a structure: input shape, layers, settings and weight shapes; concrete
    weights must be finite (a :class:`~jfactor.errors.StackError` names the first stack and layer
    that are not).
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
    batched = jax.tree.map(lambda *xs: jnp.stack(xs), *stacks)
    # traced leaves (under jax.jit or vmap) are checked where they are concrete; one transfer for the rest
    checked = [(path, leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(batched)[0] if is_concrete(leaf)]
    flags = np.asarray(jnp.stack([~jnp.isfinite(leaf).reshape(len(stacks), -1).all(axis=1) for _, leaf in checked])
                       if checked else np.zeros((0, len(stacks)), bool))
    for (path, _), bad in zip(checked, flags):
        if bad.any():
            raise StackError(f"stack_batch: stacks[{int(np.argmax(bad))}]{jax.tree_util.keystr(path)} has non-finite "
                             f"values ({int(bad.sum())} of the {len(stacks)} stacks have some there)")
    return batched


__all__ = [
    "ACCELERATOR",
    "METHODS",
    "BatchFolded",
    "Composition",
    "DeviceModel",
    "auto_method",
    "batch_mesh",
    "batch_size",
    "chain_size",
    "choose_method",
    "compose_chain",
    "compose_fft",
    "compose_gather",
    "compose_shift",
    "dft_matrix",
    "enable_compilation_cache",
    "fold_batch",
    "fold_plan",
    "full_size",
    "modelled_seconds",
    "plan_cost",
    "shard_batch",
    "stack_batch",
]
