"""Chains of small kernels, targets, and the folded kernel of a chain.

A chain is L convolutions applied in order: layer i has kernel ``(*k_i, C_{i-1}, C_i)``,
dilation ``d_i`` and stride ``s_i``; ``C_0`` and ``C_L`` are the target's channels and the
widths between are the chain's.  Its folded kernel is the canonical form of
:mod:`jfactor.fold`: the kernels dilated by ``d_i * S_{<i}`` (the stride accumulated before
them) and convolved, with total stride ``S = prod s_i``.  :func:`chain_kernel` computes it
with one FFT per factor and a per-frequency channel product, which is exact (the FFT size
is the full extent, so nothing wraps), linear in any batch of restarts or targets, and
differentiable.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax.numpy as jnp
import numpy as np

from jfactor._checks import MAX_SPATIAL_DIMS, is_int
from jfactor.errors import JFactorError
from jfactor.factorize.metrics import norm
from jfactor.factorize.npconv import convolve_full
from jfactor.layers import Conv
from jfactor.ops import dilate
from jfactor.stack import Stack


MAX_NORM = 1e306  # a target's largest norm: at 1.1e308 (a finite norm) the chain's spectra overflowed float64


class FactorizationError(JFactorError):
    """A chain that cannot match its target, or a factorization that cannot be trusted."""


def _per_dim(value, ndim: int, name: str) -> tuple[int, ...]:
    try:
        values = (value,) * ndim if isinstance(value, (int, np.integer)) else tuple(value)
    except TypeError:  # neither an integer nor a sequence of them (a float, None)
        values = ()
    if len(values) != ndim or not all(is_int(v) and v >= 1 for v in values):
        raise FactorizationError(f"{name} must be a positive integer or {ndim} of them, got {value!r}")
    return tuple(int(v) for v in values)


def _entries(value, name: str, hint: str) -> list:
    """``value`` (a list or tuple, one entry per layer) as a list; a :class:`FactorizationError` otherwise."""
    if not isinstance(value, (list, tuple)) and not (isinstance(value, np.ndarray) and value.ndim == 1):
        raise FactorizationError(f"{name} must be a list" + (f" ({hint})" if hint else "") + f", got {value!r}")
    return list(value)


@dataclasses.dataclass(frozen=True)
class ChainLayer:
    """One layer of a chain: kernel size, dilation and stride per spatial dim."""

    size: tuple[int, ...]
    dilation: tuple[int, ...]
    stride: tuple[int, ...]
    frozen: bool = False

    @property
    def extent(self) -> tuple[int, ...]:
        return tuple((k - 1) * d + 1 for k, d in zip(self.size, self.dilation))


@dataclasses.dataclass(frozen=True)
class Chain:
    """Layers and the channel widths between them (``len(widths) == len(layers) - 1``).

    ``weights[i]`` holds the fixed ``(*k, C_in, C_out)`` kernel of a frozen layer (None for
    free ones); it is left out of equality and hashing, so a chain is a static jit argument
    and its frozen weights travel as data.
    """

    layers: tuple[ChainLayer, ...]
    widths: tuple[int, ...]
    weights: tuple = dataclasses.field(default=(), compare=False, hash=False, repr=False)

    def __post_init__(self):
        if not self.weights:
            object.__setattr__(self, "weights", (None,) * len(self.layers))
        if len(self.widths) != len(self.layers) - 1 or len(self.weights) != len(self.layers):
            raise FactorizationError(
                f"a chain of {len(self.layers)} layers needs {len(self.layers) - 1} widths and "
                f"{len(self.layers)} weight entries, got {len(self.widths)} and {len(self.weights)}")

    @classmethod
    def build(cls, sizes, *, dilations=None, strides=None, channels=1, ndim: int = 2,
              frozen: dict[int, np.ndarray] | None = None) -> Chain:
        """``Chain.build([3, 5, 9], dilations=[1, 1, 1], channels=4)``.

        ``sizes``/``dilations``/``strides`` give one entry per layer (an int, or one per
        spatial dim); ``channels`` is the width between layers (an int or a list of L - 1);
        ``frozen`` maps a layer index to its fixed weights ``(*k, C_in, C_out)`` (or ``(*k,)``
        for one channel in and out).
        """
        sizes = _entries(sizes, "sizes", "one kernel size per layer, for example [3, 5, 9]")
        if not sizes:
            raise FactorizationError("a chain needs at least one layer")
        n = len(sizes)
        dilations = [1] * n if dilations is None else _entries(dilations, "dilations", "one entry per layer")
        strides = [1] * n if strides is None else _entries(strides, "strides", "one entry per layer")
        for name, values in (("dilations", dilations), ("strides", strides)):
            if len(values) != n:
                raise FactorizationError(f"{name} has {len(values)} entries for a chain of {n} layers")
        widths = [channels] * (n - 1) if is_int(channels) else _entries(
            channels, "channels", f"a positive int, or {n - 1} of them: one between each two layers")
        if len(widths) != n - 1 or not all(is_int(w) and w >= 1 for w in widths):
            raise FactorizationError(f"channels must be a positive int or {n - 1} of them, got {channels!r}")
        frozen = {} if frozen is None else frozen
        if not isinstance(frozen, dict):
            raise FactorizationError(f"frozen must map layer indices to weights ({{0: w}}), got "
                                     f"{type(frozen).__name__}")
        for index in frozen:
            if not is_int(index) or not 0 <= index < n:
                raise FactorizationError(f"frozen layer {index!r} is not in a chain of {n} layers (0 to {n - 1})")
        layers, fixed = [], []
        for i in range(n):
            size = _per_dim(sizes[i], ndim, f"layer {i} size")
            weights = None
            if i in frozen:
                weights = np.asarray(frozen[i])
                if not np.issubdtype(weights.dtype, np.floating) and not np.issubdtype(weights.dtype, np.integer):
                    raise FactorizationError(f"frozen layer {i}: weights must be real numbers, got dtype "
                                             f"{weights.dtype}")
                weights = weights.astype(np.float64)
                if weights.shape == size:
                    weights = weights[..., None, None]
                if weights.shape[:ndim] != size or weights.ndim != ndim + 2:
                    raise FactorizationError(
                        f"frozen layer {i}: weights of shape {weights.shape} do not fit size {size} "
                        f"(expected (*{size}, C_in, C_out))")
                if not np.isfinite(weights).all():
                    raise FactorizationError(f"frozen layer {i}: weights are not all finite")
                if not weights.any():
                    raise FactorizationError(f"frozen layer {i}: weights are all zero, so every chain's output is "
                                             "zero whatever the other layers learn")
            layers.append(ChainLayer(size, _per_dim(dilations[i], ndim, f"layer {i} dilation"),
                                     _per_dim(strides[i], ndim, f"layer {i} stride"), weights is not None))
            fixed.append(weights)
        return cls(tuple(layers), tuple(int(w) for w in widths), tuple(fixed))

    @property
    def ndim(self) -> int:
        return len(self.layers[0].size)

    @property
    def stride(self) -> tuple[int, ...]:
        return tuple(math.prod(layer.stride[d] for layer in self.layers) for d in range(self.ndim))

    @property
    def effective_dilations(self) -> list[tuple[int, ...]]:
        """Dilation of each kernel in the folded (stride-1) form: ``d_i * S_{<i}``."""
        out, accumulated = [], (1,) * self.ndim
        for layer in self.layers:
            out.append(tuple(d * a for d, a in zip(layer.dilation, accumulated)))
            accumulated = tuple(a * s for a, s in zip(accumulated, layer.stride))
        return out

    @property
    def extent(self) -> tuple[int, ...]:
        """Receptive field: the size of the folded kernel."""
        return tuple(
            1 + sum((layer.size[d] - 1) * dil[d] for layer, dil in zip(self.layers, self.effective_dilations))
            for d in range(self.ndim)
        )

    def channels(self, c_in: int, c_out: int) -> list[int]:
        """``[C_0, ..., C_L]`` for a target with ``c_in`` and ``c_out`` channels."""
        return [c_in, *self.widths, c_out]

    def factor_shapes(self, c_in: int, c_out: int) -> list[tuple[int, ...]]:
        c = self.channels(c_in, c_out)
        return [layer.size + (c[i], c[i + 1]) for i, layer in enumerate(self.layers)]

    def describe(self) -> str:
        parts = []
        for layer in self.layers:
            text = "x".join(map(str, layer.size))
            if any(d > 1 for d in layer.dilation):
                text += f" d{_fmt(layer.dilation)}"
            if any(s > 1 for s in layer.stride):
                text += f" s{_fmt(layer.stride)}"
            if layer.frozen:
                text += " (frozen)"
            parts.append(text)
        if not self.widths:
            suffix = ""
        elif len(set(self.widths)) == 1:
            suffix = f", width {self.widths[0]}"
        else:
            suffix = f", widths {list(self.widths)}"
        return " -> ".join(parts) + suffix

    def num_params(self, c_in: int, c_out: int) -> int:
        """Weights of the free layers."""
        return sum(math.prod(s) for s, layer in zip(self.factor_shapes(c_in, c_out), self.layers)
                   if not layer.frozen)

    def macs_per_output(self, c_in: int, c_out: int) -> int:
        """Multiply-adds per output position, each layer at its own resolution (borders ignored)."""
        total, accumulated = 0, (1,) * self.ndim
        for shape, layer in zip(self.factor_shapes(c_in, c_out), self.layers):
            accumulated = tuple(a * s for a, s in zip(accumulated, layer.stride))
            rate = math.prod(S // a for S, a in zip(self.stride, accumulated))
            total += math.prod(shape) * rate
        return total


def _fmt(values) -> str:
    return str(values[0]) if len(set(values)) == 1 else "x".join(map(str, values))


@dataclasses.dataclass(frozen=True)
class Target:
    """A kernel to approximate: ``kernel`` (*k, C_in, C_out), applied with ``stride``."""

    kernel: np.ndarray
    stride: tuple[int, ...]
    name: str = "target"
    spatial_only: bool = False

    @classmethod
    def from_array(cls, array, *, spatial_dims: int | None = None, stride=1, name: str = "target") -> Target:
        """An array with only spatial axes (1-D, 2-D; 3 axes read as 3-D) or ``(*k, C_in, C_out)``.

        Arrays of 4 or 5 axes are 2-D or 3-D with channels; pass ``spatial_dims=1`` for a
        1-D ``(k, C_in, C_out)`` target.
        """
        kernel = np.asarray(array)
        if not np.issubdtype(kernel.dtype, np.number) or np.iscomplexobj(kernel):
            raise FactorizationError(f"{name}: the target must be a real numeric array, got {kernel.dtype}")
        kernel = kernel.astype(np.float64)
        if spatial_dims is None:
            spatial_dims = kernel.ndim if kernel.ndim <= 3 else kernel.ndim - 2
        if spatial_dims < 1 or kernel.ndim not in (spatial_dims, spatial_dims + 2):
            raise FactorizationError(
                f"{name}: shape {kernel.shape} is neither (*k,) nor (*k, C_in, C_out) with {spatial_dims} spatial dims")
        if spatial_dims > MAX_SPATIAL_DIMS:
            raise FactorizationError(
                f"{name}: shape {kernel.shape} has {spatial_dims} spatial dims; jfactor factorizes kernels of 1 to "
                f"{MAX_SPATIAL_DIMS} (its output metric filters images of at most {MAX_SPATIAL_DIMS} dims)")
        spatial_only = kernel.ndim == spatial_dims
        if spatial_only:
            kernel = kernel[..., None, None]
        if kernel.size == 0:
            raise FactorizationError(f"{name}: the target is empty")
        if not np.isfinite(kernel).all():
            raise FactorizationError(f"{name}: the target has {int((~np.isfinite(kernel)).sum())} non-finite values")
        if not np.any(kernel):
            raise FactorizationError(f"{name}: the target is all zeros; there is nothing to approximate")
        with np.errstate(over="ignore"):
            if not norm(kernel) <= MAX_NORM:  # every error is relative to it
                raise FactorizationError(f"{name}: the target's norm is past {MAX_NORM:g} (largest |tap| "
                                         f"{np.abs(kernel).max():.3g}), where the chain's spectra and errors "
                                         "overflow float64: scale it down")
        return cls(kernel, _per_dim(stride, spatial_dims, "target stride"), name, spatial_only)

    @property
    def ndim(self) -> int:
        return self.kernel.ndim - 2

    @property
    def size(self) -> tuple[int, ...]:
        return self.kernel.shape[: self.ndim]

    @property
    def c_in(self) -> int:
        return self.kernel.shape[-2]

    @property
    def c_out(self) -> int:
        return self.kernel.shape[-1]


def target_padding(extent, size, stride) -> tuple[tuple[int, int], ...]:
    """The zeros around a ``size`` kernel applied at ``stride`` that fill ``extent``, per dim
    ``(low, high)``: centred, the odd one high, and the low side a multiple of the stride (a
    strided kernel moved by less than a stride samples its input at other places: another map)."""
    low = [(e - n) // 2 // s * s for e, n, s in zip(extent, size, stride)]
    return tuple((lo, e - n - lo) for lo, e, n in zip(low, extent, size))


def check_chain(chain: Chain, target: Target) -> tuple[tuple[int, int], ...]:
    """Raise if ``chain`` cannot produce ``target``'s shape; return the target's zero padding.

    A chain whose receptive field exceeds the target approximates the target zero-padded as
    :func:`target_padding` places it; a smaller one, another stride, or frozen weights with the
    wrong channels are errors that say what would fit; so is a chain with every layer frozen.
    """
    if all(layer.frozen for layer in chain.layers):
        raise FactorizationError("every layer of the chain is frozen: there is nothing to learn")
    if chain.ndim != target.ndim:
        raise FactorizationError(f"the chain is {chain.ndim}-D but the target {target.size} is {target.ndim}-D")
    if chain.stride != target.stride:
        raise FactorizationError(
            f"the chain's strides multiply to {chain.stride} but the target is applied with stride "
            f"{target.stride}; give strides whose product is {target.stride}")
    extent = chain.extent
    if any(e < n for e, n in zip(extent, target.size)):
        last = chain.layers[-1]
        dil = chain.effective_dilations[-1]
        grow = [max(0, -(-(n - e) // d)) for n, e, d in zip(target.size, extent, dil)]
        fix = "x".join(str(k + g) for k, g in zip(last.size, grow))
        raise FactorizationError(
            f"chain {chain.describe()} covers {'x'.join(map(str, extent))} but the target is "
            f"{'x'.join(map(str, target.size))}: the kernel sizes minus one, times their effective "
            f"dilations {chain.effective_dilations}, must add up to at least the target size minus one; "
            f"for example a last layer of size {fix}")
    shapes = chain.factor_shapes(target.c_in, target.c_out)
    for i, (weights, shape) in enumerate(zip(chain.weights, shapes)):
        if weights is not None and weights.shape != shape:
            raise FactorizationError(
                f"frozen layer {i}: weights {weights.shape} but the chain needs {shape} here "
                f"(channels {chain.channels(target.c_in, target.c_out)})")
    return target_padding(extent, target.size, target.stride)


def _spectra(factors, chain: Chain) -> list:
    """rfft of every factor dilated and zero-padded to the chain's extent: (..., *freq, C_{i-1}, C_i)."""
    nd = chain.ndim
    out = []
    for factor, dilation in zip(factors, chain.effective_dilations):
        spread = dilate(factor, dilation)
        batch = spread.ndim - nd - 2
        pads = ([(0, 0)] * batch + [(0, e - s) for e, s in zip(chain.extent, spread.shape[batch:batch + nd])]
                + [(0, 0)] * 2)
        out.append(jnp.fft.rfftn(jnp.pad(spread, pads), axes=tuple(range(batch, batch + nd))))
    return out


def chain_kernel(factors, chain: Chain):
    """Folded kernel of a chain: ``factors[i]`` (..., *k_i, C_{i-1}, C_i) -> (..., *extent, C_0, C_L).

    Leading batch axes (restarts, targets) broadcast.  Exact up to FFT rounding.
    """
    spectrum = functools.reduce(lambda a, b: jnp.einsum("...im,...mo->...io", a, b), _spectra(factors, chain))
    batch = spectrum.ndim - chain.ndim - 2
    return jnp.fft.irfftn(spectrum, s=chain.extent, axes=tuple(range(batch, batch + chain.ndim)))


def chain_kernel_numpy(factors: list[np.ndarray], chain: Chain) -> np.ndarray:
    """:func:`chain_kernel` with numpy convolutions, for single results and the scipy baseline.

    A second, independent implementation: results report the approximation it computes.
    """
    approx = None
    for f, dilation in zip(factors, chain.effective_dilations):
        nd = f.ndim - 2
        spread = np.zeros([(k - 1) * d + 1 for k, d in zip(f.shape[:nd], dilation)] + list(f.shape[-2:]))
        spread[tuple(slice(None, None, d) for d in dilation)] = f
        if approx is None:
            approx = spread
            continue
        out = np.zeros([a + b - 1 for a, b in zip(approx.shape[:nd], spread.shape[:nd])]
                       + [approx.shape[-2], spread.shape[-1]])
        for i in range(approx.shape[-2]):
            for m in range(approx.shape[-1]):
                for o in range(spread.shape[-1]):
                    out[..., i, o] += convolve_full(approx[..., i, m], spread[..., m, o])
        approx = out
    return approx


def to_stack(factors, chain: Chain, input_shape) -> Stack:
    """The chain as a :class:`~jfactor.Stack` of valid convolutions on ``input_shape``."""
    layers = [Conv(np.asarray(f), None, layer.stride, layer.dilation, "valid")
              for f, layer in zip(factors, chain.layers)]
    return Stack(layers, tuple(input_shape))


def _others(spectra, chain: Chain, i: int):
    """``R_i``, the folded kernel of every factor but ``i``, per channel pairing.

    (prod(extent), C_0, C_L, C_{i-1}, C_i): entry ``[u, a, b, c, d]`` is the kernel from
    input channel a to factor i's input c, convolved with factor i's output d to output b.
    """
    nd = chain.ndim
    outer = _others_spectrum(spectra, chain, i)
    return jnp.fft.irfftn(outer, s=chain.extent, axes=tuple(range(nd))).reshape((-1,) + outer.shape[nd:])


def _others_spectrum(spectra, chain: Chain, i: int):
    """The rfft of ``R_i`` (:func:`_others`): (*freq, C_0, C_L, C_{i-1}, C_i)."""
    freq_shape = spectra[0].shape[:chain.ndim]
    before = _product(spectra[:i], freq_shape, spectra[0].shape[-2], spectra[i].dtype)
    after = _product(spectra[i + 1:], freq_shape, spectra[i].shape[-1], spectra[i].dtype)
    return jnp.einsum("...ac,...db->...abcd", before, after)


def _points(shape: tuple[int, ...]) -> np.ndarray:
    """Every index of an array of ``shape``, in ``ravel`` order: (prod(shape), len(shape))."""
    return np.stack(np.meshgrid(*[np.arange(k) for k in shape], indexing="ij"), -1).reshape(-1, len(shape))


def _wrapped(offsets: np.ndarray, extent: tuple[int, ...]) -> np.ndarray:
    """Flat indices into ``extent`` of ``offsets`` (..., nd) wrapped around it."""
    return np.ravel_multi_index(tuple(np.moveaxis(offsets % np.array(extent), -1, 0)), extent)


def chain_jacobian(factors, chain: Chain, free: tuple[int, ...]):
    """Jacobian of the folded kernel w.r.t. the free factors: (prod(extent) C_0 C_L, n_free).

    Row order is ``approx.ravel()``, column order the free factors raveled one after
    another.  The chain kernel is linear in each factor: its derivative w.r.t. tap ``t``
    of factor ``i`` is the product of the other factors, ``R_i`` (:func:`_others`), shifted
    by ``D_i t``.  So each block is a gather from one small kernel per factor instead of
    one forward pass per parameter.
    """
    nd = chain.ndim
    extent = chain.extent
    spectra = _spectra(factors, chain)
    blocks = []
    for i in free:
        others = _others(spectra, chain, i)
        size = factors[i].shape[:nd]
        shift = np.array(chain.effective_dilations[i])
        index = _wrapped(_points(extent)[:, None, :] - _points(size)[None, :, :] * shift, extent)  # (m_spatial, taps)
        block = others[index]  # (m_spatial, taps, C_0, C_L, C_{i-1}, C_i)
        block = jnp.transpose(block, (0, 2, 3, 1, 4, 5))
        blocks.append(block.reshape(block.shape[0] * block.shape[1] * block.shape[2], -1))
    return jnp.concatenate(blocks, axis=1)


def _correlation_at(spectrum, offsets: np.ndarray, chain: Chain):
    """The correlation whose rfft is ``spectrum`` (*freq, ...) at ``offsets`` (..., nd), wrapped
    into the chain's extent: (..., *spectrum's trailing axes)."""
    nd = chain.ndim
    corr = jnp.fft.irfftn(spectrum, s=chain.extent, axes=tuple(range(nd)))
    return corr.reshape((-1,) + corr.shape[nd:])[_wrapped(offsets, chain.extent)]


def _pair_block(pair):
    """A (T_i, T_j, C_{i-1}, C_i, C_{j-1}, C_j) block of a matrix over two factors' entries as
    rows (i's taps and channels, raveled as the factor is) by columns (j's)."""
    pair = jnp.transpose(pair, (0, 2, 3, 1, 4, 5))
    return pair.reshape(pair.shape[0] * pair.shape[1] * pair.shape[2], -1)


def _tap_shifts(factors, chain: Chain, free: tuple[int, ...]) -> dict:
    """Each free factor's taps times its effective dilation: factor -> (taps, nd)."""
    return {i: _points(factors[i].shape[:chain.ndim]) * np.array(chain.effective_dilations[i]) for i in free}


def chain_normal_equations(factors, chain: Chain, free: tuple[int, ...], residual):
    """``J^T J`` (n_free, n_free) and ``J^T r`` (n_free,) of :func:`chain_jacobian` ``J``, without building it.

    ``residual`` is ``r`` shaped like the folded kernel (*extent, C_0, C_L).  A column of
    ``J`` is ``R_i`` (:func:`_others`) shifted by ``D_i t``, so ``(J^T J)[(i, t), (j, s)]`` is
    the cross-correlation of ``R_i`` and ``R_j`` at ``D_i t - D_j s`` and ``(J^T r)[(i, t)]``
    that of ``R_i`` and ``r`` at ``D_i t``: both come from the spectra by one inverse FFT per
    pair of factors and a gather, where ``J^T J`` by a matrix product costs ``m n^2`` (on the
    15x15 DoG into 3-5-9, m = 225 and n = 115).  Equal to the products of ``J`` up to FFT
    rounding; the shifts wrap around the extent as :func:`chain_jacobian`'s do.
    """
    spectra = _spectra(factors, chain)
    others = {i: _others_spectrum(spectra, chain, i) for i in free}  # (*freq, C_0, C_L, C_{i-1}, C_i)
    shifts = _tap_shifts(factors, chain, free)
    error = jnp.fft.rfftn(residual, axes=tuple(range(chain.ndim)))
    gradient = jnp.concatenate([_correlation_at(jnp.einsum("...ab,...abcd->...cd", error, jnp.conj(others[i])),
                                                shifts[i], chain).ravel() for i in free])
    blocks = {}
    for a, i in enumerate(free):
        for j in free[a:]:
            blocks[i, j] = _pair_block(_correlation_at(jnp.einsum("...abcd,...abef->...cdef", jnp.conj(others[i]),
                                                                  others[j]),
                                                       shifts[i][:, None] - shifts[j][None, :], chain))
            blocks[j, i] = blocks[i, j].T
    return jnp.block([[blocks[i, j] for j in free] for i in free]), gradient


def chain_second_order(factors, chain: Chain, free: tuple[int, ...], residual):
    """``sum_x r(x) d^2 K(x)``, the Hessian of ``|r|^2 / 2`` less ``J^T J`` (n_free, n_free), where
    ``K`` is the folded kernel and ``r`` (``residual``, shaped like it) is ``K`` minus a target.

    ``K`` is linear in each factor, so the diagonal blocks are zero; the block of factors
    ``i < j`` at taps ``(t, s)`` is the cross-correlation of ``r`` with the chain of every
    factor but those two (``i``'s and ``j``'s slots left open: before ``i``, between them,
    after ``j``) at ``D_i t + D_j s``: one inverse FFT per pair and a gather, as in
    :func:`chain_normal_equations`, whose layout it shares.  The factor spectra and the
    error's FFT are the ones that function computes; jitted together, XLA computes them once
    (the compiled normal equations of a 5-5 chain hold 10 FFTs with this term and 9 without,
    of a 3-5-9 chain 17 and 14: one inverse FFT per pair).
    """
    spectra = _spectra(factors, chain)
    freq_shape = spectra[0].shape[:chain.ndim]
    dtype = spectra[0].dtype
    channels = chain.channels(spectra[0].shape[-2], spectra[-1].shape[-1])
    product = lambda first, stop, size: _product(spectra[first:stop], freq_shape, size, dtype)  # noqa: E731
    before = {i: product(0, i, channels[0]) for i in free}  # (*freq, C_0, C_{i-1})
    after = {j: product(j + 1, len(spectra), channels[j + 1]) for j in free}  # (*freq, C_j, C_L)
    shifts = _tap_shifts(factors, chain, free)
    error = jnp.fft.rfftn(residual, axes=tuple(range(chain.ndim)))  # (*freq, C_0, C_L)
    blocks = {}
    for a, i in enumerate(free):
        blocks[i, i] = jnp.zeros((factors[i].size,) * 2, residual.dtype)
        for j in free[a + 1:]:
            between = product(i + 1, j, channels[i + 1])  # (*freq, C_i, C_{j-1})
            spectrum = jnp.einsum("...ab,...ac,...de,...fb->...cdef", error, jnp.conj(before[i]), jnp.conj(between),
                                  jnp.conj(after[j]))
            blocks[i, j] = _pair_block(_correlation_at(spectrum, shifts[i][:, None] + shifts[j][None, :], chain))
            blocks[j, i] = blocks[i, j].T
    return jnp.block([[blocks[i, j] for j in free] for i in free])


def chain_jacobian_norms(factors, chain: Chain, free: tuple[int, ...]):
    """Squared column norms of :func:`chain_jacobian` (n_free,), without building it.

    A column is ``R_i`` shifted inside the extent, so its norm does not depend on the tap.
    """
    spectra = _spectra(factors, chain)
    norms = []
    for i in free:
        per_channel = jnp.sum(_others(spectra, chain, i) ** 2, axis=(0, 1, 2))  # (C_{i-1}, C_i)
        norms.append(jnp.broadcast_to(per_channel, factors[i].shape).ravel())
    return jnp.concatenate(norms)


def _product(spectra, freq_shape, channels: int, dtype):
    """Per-frequency matrix product of ``spectra`` (identity of size ``channels`` if empty)."""
    if not spectra:
        return jnp.broadcast_to(jnp.eye(channels, dtype=dtype), freq_shape + (channels, channels))
    out = spectra[0]
    for s in spectra[1:]:
        out = jnp.einsum("...im,...mo->...io", out, s)
    return out
