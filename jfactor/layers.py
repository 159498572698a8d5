"""The layer vocabulary of a linear stack, and its lowering to convolutions.

Every layer is a pytree (weights are leaves, settings are static) with three methods:

- ``out_shape(in_shape, path)`` checks the layer against its input ``(*spatial, C)``
  and returns the output shape, raising :class:`StackError` naming ``path``;
- ``lower(in_shape, dtype, path)`` returns a *program*: a tuple of :class:`Conv` with explicit
  padding and :class:`Parallel` nodes, which is what gets applied and folded (a refusal
  names ``path``: weights set past the checks, as ``jax.tree.map`` does, are checked again);
- ``num_params(in_shape)`` counts its inference-time parameters.

Pools, subsampling, BatchNorm and identity lower to depthwise convolutions (a box, a
1x1 delta with stride, a 1x1 scale, a 1x1 one), so one rule folds them all.
"""

from __future__ import annotations

import math
from typing import ClassVar

import jax.numpy as jnp

from jfactor import _checks
from jfactor._pytree import pytree_dataclass, set_field, static
from jfactor.errors import StackError
from jfactor.ops import conv as _conv

Shape = tuple[int, ...]


def _where(path: str, kind: str) -> str:
    return f"{path} ({kind})" if path else kind


class Layer:
    """Base class: see the module docstring for the three methods every layer has."""

    kind: ClassVar[str]

    def out_shape(self, in_shape: Shape, path: str = "") -> Shape:
        raise NotImplementedError

    def lower(self, in_shape: Shape, dtype, path: str = "") -> tuple:
        raise NotImplementedError

    def num_params(self, in_shape: Shape) -> int:
        return 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"

    def describe(self) -> str:
        return ""


@pytree_dataclass
class Conv(Layer):
    """Convolution (cross-correlation) with kernel ``(*k, C_in // groups, C_out)``.

    Args:
      kernel: array of shape (*k, C_in // groups, C_out); 1-D, 2-D or 3-D (any N-d).
      bias: (C_out,) or None.
      strides, dilation: int or one per spatial dim (dilation is the kernel's, ``rhs_dilation``).
      padding: 'valid', 'same' (TF/Keras rule), an int, or per-dim ints / (low, high) pairs;
        a negative amount crops the input (as ``lax.conv_general_dilated`` reads it).
      groups: feature groups; ``groups == C_in`` is depthwise.
    """

    kernel: jnp.ndarray
    bias: jnp.ndarray | None = None
    strides: tuple[int, ...] = static(default=1)
    dilation: tuple[int, ...] = static(default=1)
    padding: object = static(default="valid")
    groups: int = static(default=1)
    kind: ClassVar[str] = "conv"

    def __post_init__(self):
        where = self.kind
        kernel = _checks.as_weight(self.kernel, "kernel", where)
        if kernel.ndim < 3:
            raise StackError(
                f"{where}: kernel must have shape (*k, C_in // groups, C_out), got {tuple(kernel.shape)}"
            )
        ndim = kernel.ndim - 2
        set_field(self, "kernel", kernel)
        strides = _checks.positive_ints(self.strides, "strides", where)
        set_field(self, "strides", _checks.expand(strides, ndim, "strides", where))
        dilation = _checks.positive_ints(self.dilation, "dilation", where)
        set_field(self, "dilation", _checks.expand(dilation, ndim, "dilation", where))
        set_field(self, "padding", _checks.padding_spec(self.padding, where))
        groups = _checks.positive_ints(self.groups, "groups", where)
        if not isinstance(groups, int):
            raise StackError(f"{where}: groups must be one positive integer, got {self.groups!r}")
        if kernel.shape[-1] % groups:
            raise StackError(
                f"{where}: C_out = {kernel.shape[-1]} is not divisible by groups = {groups}"
            )
        set_field(self, "groups", groups)
        if self.bias is not None:
            bias = _checks.as_weight(self.bias, "bias", where, ndim=1)
            if bias.shape[0] != kernel.shape[-1]:
                raise StackError(
                    f"{where}: bias has {bias.shape[0]} entries for C_out = {kernel.shape[-1]}"
                )
            set_field(self, "bias", bias)

    @property
    def ndim(self) -> int:
        return self.kernel.ndim - 2

    @property
    def size(self) -> tuple[int, ...]:
        return tuple(self.kernel.shape[: self.ndim])

    @property
    def extent(self) -> tuple[int, ...]:
        """Spatial extent of the dilated kernel, ``(k - 1) * d + 1``."""
        return tuple((k - 1) * d + 1 for k, d in zip(self.size, self.dilation))

    @property
    def in_channels(self) -> int:
        return self.kernel.shape[-2] * self.groups

    @property
    def out_channels(self) -> int:
        return self.kernel.shape[-1]

    def _check_input(self, in_shape: Shape, where: str) -> tuple[tuple[int, int], ...]:
        spatial, channels = in_shape[:-1], in_shape[-1]
        if len(spatial) != self.ndim:
            raise StackError(
                f"{where}: a {self.ndim}-D kernel {tuple(self.kernel.shape)} cannot apply to a "
                f"{len(spatial)}-D input of shape {in_shape}"
            )
        if channels != self.in_channels:
            raise StackError(
                f"{where}: the kernel expects C_in = {self.kernel.shape[-2]} x groups {self.groups} "
                f"= {self.in_channels} channels, its input has {channels}"
            )
        return _checks.resolve_padding(self.padding, spatial, self.extent, self.strides, where)

    def out_shape(self, in_shape: Shape, path: str = "") -> Shape:
        where = _where(path, self.kind)
        pads = self._check_input(in_shape, where)
        spatial = _checks.window_out_spatial(in_shape[:-1], self.extent, self.strides, pads, where)
        return spatial + (self.out_channels,)

    def resolved(self, in_shape: Shape, dtype=None, path: str = "") -> Conv:
        """This conv with explicit (low, high) padding for ``in_shape`` (and weights cast to ``dtype``)."""
        pads = self._check_input(in_shape, _where(path, self.kind))
        cast = (lambda a: a) if dtype is None else (lambda a: a.astype(dtype))
        bias = None if self.bias is None else cast(self.bias)
        return Conv(cast(self.kernel), bias, self.strides, self.dilation, pads, self.groups)

    def lower(self, in_shape: Shape, dtype, path: str = "") -> tuple:
        return (self.resolved(in_shape, dtype, path),)

    def __call__(self, x):
        """Apply to ``x`` (N, *spatial, C_in); padding is resolved for ``x``'s shape, and ``x`` and the
        weights meet in their common floating dtype (as a :class:`~jfactor.Stack` applies)."""
        x = jnp.asarray(x)
        dtype = _checks.floating_result(x.dtype, self.kernel.dtype)
        op = self.resolved(tuple(x.shape[1:]), dtype)
        return _conv(x.astype(dtype), op.kernel, op.bias, strides=op.strides, dilation=op.dilation,
                     pads=op.padding, groups=op.groups)

    def num_params(self, in_shape: Shape) -> int:
        return int(self.kernel.size + (0 if self.bias is None else self.bias.size))

    def describe(self) -> str:
        k = "x".join(map(str, self.size))
        parts = [f"{k}", f"{self.in_channels}->{self.out_channels}"]
        if any(s != 1 for s in self.strides):
            parts.append(f"stride {_fmt(self.strides)}")
        if any(d != 1 for d in self.dilation):
            parts.append(f"dilation {_fmt(self.dilation)}")
        if self.padding != "valid":
            parts.append(f"padding {_fmt_padding(self.padding)}")
        if self.groups != 1:
            parts.append(f"groups {self.groups}")
        if self.bias is not None:
            parts.append("bias")
        return ", ".join(parts)


def _fmt(values: tuple[int, ...]) -> str:
    return str(values[0]) if len(set(values)) == 1 else "x".join(map(str, values))


def _fmt_padding(padding) -> str:
    if isinstance(padding, (str, int)):
        return str(padding)
    return "[" + ", ".join(f"{lo},{hi}" for lo, hi in padding) + "]"


def _depthwise(value, channels: int, ndim: int, dtype, strides=None, size=None) -> Conv:
    """A depthwise conv with constant taps ``value`` on a ``size`` window (default 1x..x1)."""
    size = size or (1,) * ndim
    kernel = jnp.full(size + (1, channels), value, dtype)
    return Conv(kernel, None, strides or (1,) * ndim, (1,) * ndim, ((0, 0),) * ndim, channels)


class _Window(Layer):
    """Shared checks of the parameter-free windowed layers (pools and subsampling)."""

    def _window(self, in_shape: Shape, path: str) -> tuple[Shape, tuple[int, ...], tuple[int, ...]]:
        where = _where(path, self.kind)
        ndim = len(in_shape) - 1
        size = _checks.expand(self._size, ndim, self._size_name, where)
        strides = _checks.expand(self._strides, ndim, "strides", where)
        spatial = _checks.window_out_spatial(
            in_shape[:-1], size, strides, ((0, 0),) * ndim, where, what=self._size_name
        )
        return spatial + (in_shape[-1],), size, strides

    def out_shape(self, in_shape: Shape, path: str = "") -> Shape:
        return self._window(in_shape, path)[0]


@pytree_dataclass
class AvgPool(_Window):
    """Average pooling (valid); ``strides`` default to ``pool_size``."""

    pool_size: tuple[int, ...] | int = static(default=2)
    strides: tuple[int, ...] | int | None = static(default=None)
    padding: str = static(default="valid")
    kind: ClassVar[str] = "avg_pool"
    _size_name: ClassVar[str] = "pool_size"
    _scale_by_size: ClassVar[bool] = True

    def __post_init__(self):
        where = self.kind
        size = _checks.positive_ints(self.pool_size, "pool_size", where)
        set_field(self, "pool_size", size)
        strides = size if self.strides is None else _checks.positive_ints(self.strides, "strides", where)
        set_field(self, "strides", strides)
        if self.padding != "valid":
            raise StackError(
                f"{where}: only padding='valid' is supported; a padded average pool divides "
                "by the count of real pixels at the border, which is not one convolution"
            )

    @property
    def _size(self):
        return self.pool_size

    @property
    def _strides(self):
        return self.strides

    def lower(self, in_shape: Shape, dtype, path: str = "") -> tuple:
        _, size, strides = self._window(in_shape, path)
        value = 1.0 / _checks.prod(size) if self._scale_by_size else 1.0
        return (_depthwise(value, in_shape[-1], len(size), dtype, strides, size),)

    def describe(self) -> str:
        size = self.pool_size if isinstance(self.pool_size, int) else "x".join(map(str, self.pool_size))
        return f"{size}, stride {self.strides if isinstance(self.strides, int) else _fmt(self.strides)}"


@pytree_dataclass
class SumPool(AvgPool):
    """Sum pooling (valid): a box of ones; ``strides`` default to ``pool_size``."""

    kind: ClassVar[str] = "sum_pool"
    _scale_by_size: ClassVar[bool] = False


@pytree_dataclass
class Subsample(_Window):
    """Keep every ``strides``-th sample: ``x[:, ::s, ::s, :]``."""

    strides: tuple[int, ...] | int = static(default=2)
    kind: ClassVar[str] = "subsample"
    _size_name: ClassVar[str] = "window"

    def __post_init__(self):
        set_field(self, "strides", _checks.positive_ints(self.strides, "strides", self.kind))

    @property
    def _size(self):
        return 1

    @property
    def _strides(self):
        return self.strides

    def lower(self, in_shape: Shape, dtype, path: str = "") -> tuple:
        _, _, strides = self._window(in_shape, path)
        return (_depthwise(1.0, in_shape[-1], len(strides), dtype, strides),)

    def describe(self) -> str:
        return f"stride {self.strides if isinstance(self.strides, int) else _fmt(self.strides)}"


@pytree_dataclass
class Identity(Layer):
    """``x -> x``."""

    kind: ClassVar[str] = "identity"

    def out_shape(self, in_shape: Shape, path: str = "") -> Shape:
        return in_shape

    def lower(self, in_shape: Shape, dtype, path: str = "") -> tuple:
        return (_depthwise(1.0, in_shape[-1], len(in_shape) - 1, dtype),)


def _check_variance(var, epsilon: float, where: str) -> None:
    """A :class:`StackError` naming the channels (the first five) where ``var + epsilon`` (C,) is not
    positive; nothing for traced values."""
    if _checks.is_concrete(var) and bool((var + epsilon <= 0).any()):
        bad = [int(c) for c in jnp.flatnonzero(var + epsilon <= 0)[:5]]
        raise StackError(f"{where}: var + epsilon must be > 0 in every channel, not in channel(s) {bad}")


@pytree_dataclass
class BatchNorm(Layer):
    """Inference-mode BatchNorm: ``gamma (x - mean) / sqrt(var + epsilon) + beta``, all (C,)."""

    gamma: jnp.ndarray
    beta: jnp.ndarray
    mean: jnp.ndarray
    var: jnp.ndarray
    epsilon: float = static(default=1e-3)
    kind: ClassVar[str] = "batch_norm"

    def __post_init__(self):
        where = self.kind
        arrays = {}
        for name in ("gamma", "beta", "mean", "var"):
            arrays[name] = _checks.as_weight(getattr(self, name), name, where, ndim=1)
            set_field(self, name, arrays[name])
        sizes = {name: a.shape[0] for name, a in arrays.items()}
        if len(set(sizes.values())) > 1:
            raise StackError(f"{where}: gamma, beta, mean and var must have one length, got {sizes}")
        if not _checks.is_real(self.epsilon) or not math.isfinite(self.epsilon) or self.epsilon < 0:
            raise StackError(f"{where}: epsilon must be a finite number >= 0, got {self.epsilon!r}")
        set_field(self, "epsilon", float(self.epsilon))
        _check_variance(arrays["var"], self.epsilon, where)

    @property
    def channels(self) -> int:
        return self.gamma.shape[0]

    def out_shape(self, in_shape: Shape, path: str = "") -> Shape:
        if in_shape[-1] != self.channels:
            raise StackError(
                f"{_where(path, self.kind)}: has {self.channels} channels, its input has {in_shape[-1]}"
            )
        return in_shape

    def lower(self, in_shape: Shape, dtype, path: str = "") -> tuple:
        where = _where(path, self.kind)
        ndim = len(in_shape) - 1
        gamma, beta, mean, var = (a.astype(dtype) for a in (self.gamma, self.beta, self.mean, self.var))
        _check_variance(var, self.epsilon, where)  # again: weights set past __post_init__ (jax.tree.map)
        scale = gamma / jnp.sqrt(var + self.epsilon)
        if _checks.is_concrete(scale) and not bool(jnp.isfinite(scale).all()):
            bad = [int(c) for c in jnp.flatnonzero(~jnp.isfinite(scale))[:5]]
            raise StackError(f"{where}: gamma / sqrt(var + epsilon) overflows {jnp.dtype(dtype).name} in "
                             f"channel(s) {bad}")
        shift = beta - mean * scale
        kernel = scale.reshape((1,) * ndim + (1, self.channels))
        return (Conv(kernel, shift, (1,) * ndim, (1,) * ndim, ((0, 0),) * ndim, self.channels),)

    def num_params(self, in_shape: Shape) -> int:
        return 2 * self.channels  # scale and shift

    def describe(self) -> str:
        return f"{self.channels} channels, eps {self.epsilon:g}"


@pytree_dataclass
class Parallel:
    """Program node: run each branch program on the same input, then sum or concatenate."""

    branches: tuple
    merge: str = static(default="sum")


def sequence_out_shape(layers, in_shape: Shape, path: str) -> Shape:
    """Thread ``in_shape`` through ``layers``; errors name ``path[i] (kind)``."""
    shape = in_shape
    for i, layer in enumerate(layers):
        if not isinstance(layer, Layer):
            raise StackError(f"{path}[{i}]: {layer!r} is not a jfactor layer")
        missing = [name for name in ("out_shape", "lower") if getattr(type(layer), name) is getattr(Layer, name)]
        if missing:
            raise StackError(f"{path}[{i}]: {type(layer).__name__} defines no {' or '.join(missing)}, so jfactor "
                             "cannot fold it (only linear layers fold; see jfactor.layers)")
        shape = layer.out_shape(shape, f"{path}[{i}]")
    return shape


def layer_programs(layers, in_shape: Shape, dtype, path: str) -> list[tuple]:
    """Each of ``layers``' own program, applied in order to an input of ``in_shape``; a layer's
    refusal names it ``path[i] (kind)``."""
    programs, shape = [], in_shape
    for i, layer in enumerate(layers):
        programs.append(layer.lower(shape, dtype, f"{path}[{i}]"))
        shape = layer.out_shape(shape)
    return programs


def lower_sequence(layers, in_shape: Shape, dtype, path: str) -> tuple:
    """The program of ``layers`` applied in order (:func:`layer_programs`, joined)."""
    return tuple(item for program in layer_programs(layers, in_shape, dtype, path) for item in program)


def _layer_tuple(layers, where: str) -> tuple:
    if isinstance(layers, Layer) or not hasattr(layers, "__iter__"):
        raise StackError(f"{where}: expected a list of layers, got {layers!r}")
    layers = tuple(layers)
    if not layers:
        raise StackError(f"{where}: needs at least one layer")
    return layers


@pytree_dataclass
class Residual(Layer):
    """``x -> x + f(x)``, with ``f`` the given layers (they must keep the shape)."""

    layers: tuple
    kind: ClassVar[str] = "residual"

    def __post_init__(self):
        set_field(self, "layers", _layer_tuple(self.layers, self.kind))

    def out_shape(self, in_shape: Shape, path: str = "") -> Shape:
        out = sequence_out_shape(self.layers, in_shape, f"{path}.layers" if path else "residual.layers")
        if out != in_shape:
            raise StackError(
                f"{_where(path, self.kind)}: its layers map {in_shape} to {out}; x + f(x) needs "
                "f to keep the shape (use padding='same' and stride 1)"
            )
        return in_shape

    def lower(self, in_shape: Shape, dtype, path: str = "") -> tuple:
        identity = Identity().lower(in_shape, dtype)
        layers = lower_sequence(self.layers, in_shape, dtype, f"{path}.layers" if path else "residual.layers")
        return (Parallel((identity, layers), "sum"),)

    def num_params(self, in_shape: Shape) -> int:
        return _sequence_params(self.layers, in_shape)

    def describe(self) -> str:
        return f"x + f(x), f = {len(self.layers)} layer(s)"


@pytree_dataclass
class Branches(Layer):
    """Parallel branches on one input, merged by ``'sum'`` or ``'concat'`` (channels)."""

    branches: tuple
    merge: str = static(default="sum")
    kind: ClassVar[str] = "branches"

    def __post_init__(self):
        where = self.kind
        if isinstance(self.branches, Layer) or not hasattr(self.branches, "__iter__"):
            raise StackError(f"{where}: expected a list of branches (lists of layers)")
        branches = tuple(_layer_tuple(b, f"{where}[{i}]") for i, b in enumerate(self.branches))
        if not branches:
            raise StackError(f"{where}: needs at least one branch")
        set_field(self, "branches", branches)
        if self.merge not in ("sum", "concat"):
            raise StackError(f"{where}: merge must be 'sum' or 'concat', got {self.merge!r}")

    def out_shape(self, in_shape: Shape, path: str = "") -> Shape:
        where = _where(path, self.kind)
        prefix = f"{path}.branches" if path else "branches"
        outs = [sequence_out_shape(b, in_shape, f"{prefix}[{i}]") for i, b in enumerate(self.branches)]
        if self.merge == "sum":
            if len(set(outs)) > 1:
                raise StackError(f"{where}: branch output shapes {outs} differ; a sum needs one shape")
            return outs[0]
        if len({o[:-1] for o in outs}) > 1:
            raise StackError(
                f"{where}: branch spatial shapes {[o[:-1] for o in outs]} differ; concat needs one"
            )
        return outs[0][:-1] + (sum(o[-1] for o in outs),)

    def lower(self, in_shape: Shape, dtype, path: str = "") -> tuple:
        prefix = f"{path}.branches" if path else "branches"
        programs = tuple(lower_sequence(b, in_shape, dtype, f"{prefix}[{i}]") for i, b in enumerate(self.branches))
        return (Parallel(programs, self.merge),)

    def num_params(self, in_shape: Shape) -> int:
        return sum(_sequence_params(b, in_shape) for b in self.branches)

    def describe(self) -> str:
        return f"{len(self.branches)} branches, {self.merge}"


def _sequence_params(layers, in_shape: Shape) -> int:
    total, shape = 0, in_shape
    for layer in layers:
        total += layer.num_params(shape)
        shape = layer.out_shape(shape)
    return total
