"""Convolution on arrays, and the algebra of shift-invariant affine maps.

Conventions (channels-last, cross-correlation, like flax and Keras):
inputs ``(N, *spatial, C)``, kernels ``(*k, C_in // groups, C_out)``.

An :class:`Affine` is a convolution on the *infinite* grid,

    y[j] = bias + sum_t kernel[t]^T x[stride * j + offset + t],

with a dense ``(*k, C_in, C_out)`` kernel whose dilation is already spelled out.  On
infinite grids such maps are closed under composition, sums and channel concatenation;
borders (zero padding between layers) are handled separately in :mod:`jfactor.analysis`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from jfactor._pytree import pytree_dataclass, static
from jfactor.errors import FoldError

Pads = tuple[tuple[int, int], ...]


def dimension_numbers(ndim: int) -> lax.ConvDimensionNumbers:
    """Channels-last numbering for ``ndim`` spatial dims: (N, *S, C), (*S, I, O), (N, *S, C)."""
    spatial = tuple(range(1, ndim + 1))
    lhs = (0, ndim + 1) + spatial
    rhs = (ndim + 1, ndim) + tuple(range(ndim))
    return lax.ConvDimensionNumbers(lhs, rhs, lhs)


UNROLL_TAPS = 128  # kernels with at most this many taps have their taps unrolled (fused); more: a loop
TAPS_FROM = 2 ** 18  # float64 inputs of at least this many values (512x512) convolve tap by tap on the CPU


@functools.partial(jax.jit, static_argnames=("strides", "dilation", "pads", "groups"))
def conv_by_taps(x, kernel, *, strides: tuple, dilation: tuple, pads: Pads, groups: int):
    """The convolution :func:`conv` computes, as one strided slice and channel matmul per tap.

    ``y[n, j] = sum_t x_pad[n, stride * j + dilation * t] @ kernel[t]`` (grouped: each group's
    channels with its block); up to :data:`UNROLL_TAPS` taps unrolled (XLA fuses them into one
    pass), more in a ``fori_loop``.  No convolution op: XLA's CPU convolution crashes (SIGSEGV)
    on some large float64 inputs, depending on the exact shape (jaxlib 0.10.2: a 3x3 SAME conv
    on 1x2048x2048x1 crashed where 1024 and 3000 did not), so large float64 inputs on the CPU
    take this path (:func:`conv`).
    """
    ndim = kernel.ndim - 2
    k = kernel.shape[:ndim]
    x = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in pads] + [(0, 0, 0)])
    n, cin_g, cout = x.shape[0], kernel.shape[-2], kernel.shape[-1]
    out = [(size - d * (kk - 1) - 1) // s + 1 for size, kk, s, d in zip(x.shape[1:-1], k, strides, dilation)]
    if min(out) <= 0:
        return jnp.zeros((n, *(max(o, 0) for o in out), cout), x.dtype)
    taps = jnp.asarray(kernel).reshape(-1, cin_g, groups, cout // groups)
    extent = [n] + [s * (o - 1) + 1 for s, o in zip(strides, out)] + [x.shape[-1]]

    def term(i):
        """Tap ``i`` (flat index, static or traced) applied to the whole output: (N, *out, g, C_out/g)."""
        begin = [0] + [d * t for d, t in zip(dilation, jnp.unravel_index(i, k))] + [0]
        block = lax.dynamic_slice(x, begin, extent)
        window = lax.slice(block, [0] * x.ndim, extent, [1, *strides, 1]).reshape(n, *out, groups, cin_g)
        return jnp.einsum("...gc,cgo->...go", window, taps[i], precision=lax.Precision.HIGHEST)

    if len(taps) <= UNROLL_TAPS:
        y = sum((term(i) for i in range(1, len(taps))), term(0))
    else:
        y = lax.fori_loop(1, len(taps), lambda i, total: total + term(i), term(0))
    return y.reshape(n, *out, cout)


FFT_TAPS = 1024  # kernels with fewer taps (32x32) never convolve through FFTs
FFT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64))  # what jnp.fft transforms (no half, integer or complex)


@functools.partial(jax.jit, static_argnames=("strides", "dilation", "pads", "groups"))
def conv_by_fft(x, kernel, *, strides: tuple, dilation: tuple, pads: Pads, groups: int):
    """The convolution :func:`conv` computes, through FFTs: for large kernels (``x`` and ``kernel``
    float32 or float64, one dtype, the result's).

    ``y[n, j] = sum_t x_pad[n, stride * j + t] @ K[t]`` with ``K`` the dilated, ungrouped
    kernel (*kd, C_in, C_out): the circular convolution of ``x_pad`` with ``K`` reversed, over
    the padded input's own extent ``P`` (no output it keeps wraps around: they start at
    ``kd - 1``), then every ``stride``-th.  One transform of the input, one of the kernel and
    one of the output, where the tap-by-tap sum costs a pass over the output per tap.  Equal
    to the direct sum up to FFT rounding (relative to the norms of ``x`` and the kernel).
    """
    ndim = kernel.ndim - 2
    x = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in pads] + [(0, 0, 0)])
    dense = ungroup(dilate(kernel, tuple(dilation)), groups)
    size, extent = dense.shape[:ndim], x.shape[1:-1]
    out = [(p - k) // s + 1 for p, k, s in zip(extent, size, strides)]
    if min(out) <= 0:
        return jnp.zeros((x.shape[0], *(max(o, 0) for o in out), dense.shape[-1]), x.dtype)
    axes = tuple(range(1, ndim + 1))
    spectrum = jnp.fft.rfftn(lax.rev(dense, tuple(range(ndim))), s=extent, axes=tuple(range(ndim)))
    product = jnp.einsum("n...i,...io->n...o", jnp.fft.rfftn(x, axes=axes), spectrum,
                         precision=lax.Precision.HIGHEST)
    full = jnp.fft.irfftn(product, s=extent, axes=axes)
    start = [0] + [k - 1 for k in size] + [0]
    stop = [full.shape[0]] + [k - 1 + s * (o - 1) + 1 for k, s, o in zip(size, strides, out)] + [full.shape[-1]]
    return lax.slice(full, start, stop, [1, *strides, 1]).astype(x.dtype)


def fft_pays(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...], strides, dilation, pads: Pads,
             groups: int) -> bool:
    """Whether :func:`conv_by_fft` is the better way to convolve: at least :data:`FFT_TAPS` taps,
    the kernel's spectrum (*P, C_in, C_out) at most eight times the input's and output's, and
    the direct sum's multiply-adds more than four times the transforms' and products' estimated
    flops.  On the 2-core CPU (float64) the estimate undercounts the FFTs' lead: kernels of
    33x33 to 101x101 on one channel ran 10-61x faster than the direct sum where it predicted
    7-59x, and 2.9x on 32 channels where it predicted 13x."""
    ndim = len(kernel_shape) - 2
    taps = math.prod(kernel_shape[:ndim])
    n, cin, cout = x_shape[0], x_shape[-1], kernel_shape[-1]
    if taps < FFT_TAPS or cin * cout > 8 * n * (cin + cout):
        return False
    extent = [size + lo + hi for size, (lo, hi) in zip(x_shape[1:-1], pads)]
    reach = [d * (k - 1) + 1 for k, d in zip(kernel_shape[:ndim], dilation)]
    out = [max((e - r) // s + 1, 0) for e, r, s in zip(extent, reach, strides)]
    points = math.prod(max(e, 1) for e in extent)
    direct = n * math.prod(out) * taps * (cin // groups) * cout
    transforms = points * (n * (cin + cout) + cin * cout) * 2.5 * math.log2(max(points, 2))
    products = points * 8 * n * cin * cout
    return direct > 4 * (transforms + products)


def pads_beyond_reach(size: tuple[int, ...], dilation, pads: Pads) -> bool:
    """Whether a padding exceeds the reach ``d (k - 1)`` of a kernel of ``size`` (*k,), so that
    some outputs see padding only (a chain's first layer padded for the whole chain).  XLA's CPU
    convolution (jaxlib 0.10.2, an AVX-512 Intel Xeon) crashed the process (SIGSEGV in its
    generated ``convolution_kernel``) in about one run of three on a float64 (4, 32, 32, 1) input
    with a 3x3 kernel padded by 3 on each side; with ``--xla_cpu_max_isa=AVX2`` it did not."""
    return any(max(lo, hi) > d * (k - 1) for k, d, (lo, hi) in zip(size, dilation, pads))


def conv(x, kernel, bias=None, *, strides, dilation, pads: Pads, groups: int):
    """Apply one convolution: ``x`` (N, *S, C_in), ``kernel`` (*k, C_in/g, C_out) -> (N, *S', C_out).

    Large float32 or float64 kernels on inputs of the same dtype, where the transforms cost far
    less than the direct sum (:func:`fft_pays`), convolve through FFTs (:func:`conv_by_fft`).
    Otherwise float64 inputs on the CPU run :func:`conv_by_taps` where XLA's convolution has
    crashed: inputs of at least :data:`TAPS_FROM` values, and padding beyond the dilated
    kernel's reach (:func:`pads_beyond_reach`); everything else, the kernel algebra and the fold
    certificate's bounded probe of small kernels included, XLA's convolution (it compiles several
    times faster than the unrolled taps).
    """
    pads = tuple(tuple(p) for p in pads)
    if x.dtype == kernel.dtype in FFT_DTYPES and fft_pays(x.shape, kernel.shape, strides, dilation, pads, groups):
        y = conv_by_fft(x, kernel, strides=tuple(strides), dilation=tuple(dilation), pads=pads, groups=int(groups))
    elif (jnp.result_type(x.dtype, kernel.dtype) == jnp.float64 and jax.default_backend() == "cpu"
            and (math.prod(x.shape) >= TAPS_FROM or pads_beyond_reach(kernel.shape[:-2], dilation, pads))):
        y = conv_by_taps(x, kernel, strides=tuple(strides), dilation=tuple(dilation), pads=pads, groups=int(groups))
    else:
        y = lax.conv_general_dilated(
            x,
            kernel,
            window_strides=tuple(strides),
            padding=tuple(pads),
            rhs_dilation=tuple(dilation),
            dimension_numbers=dimension_numbers(kernel.ndim - 2),
            feature_group_count=groups,
            precision=lax.Precision.HIGHEST,
        )
    return y if bias is None else y + bias


def dilate(kernel, dilation: tuple[int, ...]):
    """Insert ``d - 1`` zeros between taps along each spatial axis.

    (..., *k, I, O) -> (..., *((k-1)d+1), I, O): the ``len(dilation)`` axes before the last
    two are spatial, any before them are batch axes.  Uses interior padding; a stride-1
    scatter followed by a reverse aborts XLA (DESIGN.md 5).
    """
    batch = kernel.ndim - len(dilation) - 2
    config = [(0, 0, 0)] * batch + [(0, 0, d - 1) for d in dilation] + [(0, 0, 0), (0, 0, 0)]
    return lax.pad(kernel, jnp.zeros((), kernel.dtype), config)


def ungroup(kernel, groups: int):
    """Grouped kernel (*k, C_in/g, C_out) -> block-diagonal dense kernel (*k, C_in, C_out)."""
    if groups == 1:
        return kernel
    *k, cin_g, cout = kernel.shape
    cout_g = cout // groups
    blocks = kernel.reshape(*k, cin_g, groups, cout_g)
    eye = jnp.eye(groups, dtype=kernel.dtype)
    dense = jnp.einsum("...igo,hg->...higo", blocks, eye)
    return dense.reshape(*k, groups * cin_g, cout)


def regroup(dense, groups: int):
    """Diagonal blocks of a dense kernel (*k, C_in, C_out) -> grouped kernel (*k, C_in/g, C_out)."""
    if groups == 1:
        return dense
    *k, cin, cout = dense.shape
    nd = len(k)
    blocks = dense.reshape(*k, groups, cin // groups, groups, cout // groups)
    diagonal = jnp.diagonal(blocks, axis1=nd, axis2=nd + 2)  # (*k, ci, co, g)
    return jnp.moveaxis(diagonal, -1, -2).reshape(*k, cin // groups, cout)


def full_conv(a, b, step: tuple[int, ...]):
    """Kernel of "apply ``a`` then ``b``" when ``a`` has stride ``step``.

    ``a`` (*ka, I, M), ``b`` (*kb, M, O) -> (*(ka + step (kb - 1)), I, O) with
    ``out[u] = sum_{ta + step * tb = u} a[ta] @ b[tb]`` (full convolution, ``b`` dilated).
    """
    ndim = a.ndim - 2
    lhs = jnp.moveaxis(a, -2, 0)  # (I, *ka, M): batch I, features M
    rhs = lax.rev(b, tuple(range(ndim)))
    pads = tuple((s * (kb - 1), s * (kb - 1)) for s, kb in zip(step, b.shape[:ndim]))
    out = conv(lhs, rhs, strides=(1,) * ndim, dilation=step, pads=pads, groups=1)
    return jnp.moveaxis(out, 0, -2)


@pytree_dataclass
class Affine:
    """``y[j] = bias + sum_t kernel[t]^T x[stride * j + offset + t]`` on the infinite grid.

    Attributes:
      kernel: dense (*k, C_in, C_out), dilation spelled out.
      bias: (C_out,).
      stride, offset: per spatial dim (offset is minus the low padding).
      groups: block-diagonal structure the kernel is known to have, by construction.
    """

    kernel: jnp.ndarray
    bias: jnp.ndarray
    stride: tuple[int, ...] = static()
    offset: tuple[int, ...] = static()
    groups: int = static(default=1)

    @property
    def ndim(self) -> int:
        return len(self.stride)

    @property
    def size(self) -> tuple[int, ...]:
        return tuple(self.kernel.shape[: self.ndim])


def affine_from_conv(kernel, bias, *, strides, dilation, pads: Pads, groups: int) -> Affine:
    """The infinite-grid map of one padded, strided, dilated, grouped convolution."""
    dense = ungroup(dilate(kernel, tuple(dilation)), groups)
    if bias is None:
        bias = jnp.zeros(dense.shape[-1], dense.dtype)
    return Affine(dense, bias, tuple(strides), tuple(-lo for lo, _ in pads), groups)


def compose(first: Affine, second: Affine) -> Affine:
    """The single map equal to applying ``first`` then ``second``."""
    return composed_affine(first, second, full_conv(first.kernel, second.kernel, first.stride))


def composed_affine(first: Affine, second: Affine, kernel) -> Affine:
    """``first`` then ``second``, given the composed ``kernel`` (``full_conv`` of theirs).

    Lets another kernel formulation (batched, FFT; :mod:`jfactor.batch`) reuse the
    bias, stride, offset and groups rules of :func:`compose`.
    """
    taps = tuple(range(second.ndim))
    bias = second.bias + jnp.einsum("mo,m->o", second.kernel.sum(axis=taps), first.bias)
    stride = tuple(a * b for a, b in zip(first.stride, second.stride))
    offset = tuple(o1 + s1 * o2 for o1, s1, o2 in zip(first.offset, first.stride, second.offset))
    return Affine(kernel, bias, stride, offset, math.gcd(first.groups, second.groups))


def _aligned_kernels(affines: list[Affine], where: str):
    """Pad kernels onto a common window; returns (kernels, offset)."""
    strides = {a.stride for a in affines}
    if len(strides) > 1:
        raise FoldError(
            f"{where}: the branches have different effective strides {sorted(strides)}; "
            "their merge is not shift-invariant, so it is not one convolution"
        )
    ndim = affines[0].ndim
    start = tuple(min(a.offset[d] for a in affines) for d in range(ndim))
    stop = tuple(max(a.offset[d] + a.size[d] for a in affines) for d in range(ndim))
    kernels = []
    for a in affines:
        pads = [(a.offset[d] - start[d], stop[d] - a.offset[d] - a.size[d]) for d in range(ndim)]
        kernels.append(jnp.pad(a.kernel, pads + [(0, 0), (0, 0)]))
    return kernels, start


def parallel_sum(affines: list[Affine], where: str = "branches") -> Affine:
    """The map ``x -> sum_i affines[i](x)``; all must share stride and channels."""
    kernels, offset = _aligned_kernels(affines, where)
    bias = sum(a.bias for a in affines[1:]) + affines[0].bias
    groups = math.gcd(*(a.groups for a in affines))
    return Affine(sum(kernels[1:]) + kernels[0], bias, affines[0].stride, offset, groups)


def concat(affines: list[Affine], where: str = "branches") -> Affine:
    """The map ``x -> concat_i affines[i](x)`` along output channels."""
    kernels, offset = _aligned_kernels(affines, where)
    groups = affines[0].groups if len(affines) == 1 else 1
    return Affine(
        jnp.concatenate(kernels, axis=-1),
        jnp.concatenate([a.bias for a in affines]),
        affines[0].stride,
        offset,
        groups,
    )


def pads_for(affine: Affine, in_spatial: tuple[int, ...], out_spatial: tuple[int, ...]) -> Pads:
    """(low, high) pads that make ``affine`` produce exactly ``out_spatial`` from ``in_spatial``."""
    pads = []
    for n, m, k, s, o in zip(in_spatial, out_spatial, affine.size, affine.stride, affine.offset):
        low = -o
        high = (m - 1) * s + k - n - low  # smallest high pad giving m outputs
        if high < 0 <= high + s - 1:
            high = 0
        pads.append((low, high))
    return tuple(pads)
