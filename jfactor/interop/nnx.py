"""Flax NNX models <-> jfactor stacks.

``from_nnx(model, input_shape)`` reads an ``nnx.Sequential`` (or a list of layers, or one
layer) into a :class:`~jfactor.stack.Stack`; ``to_nnx(obj)`` writes a
:class:`~jfactor.layers.Conv` or a stack back as ``nnx`` modules with their weights set.

What ``from_nnx`` reads (exact types; subclasses may change ``__call__`` and count as
unknown), checked against flax 0.12.8:

- ``nnx.Conv``: kernel ``(*k, C_in // groups, C_out)`` (times ``mask`` when set), bias,
  ``strides``, ``kernel_dilation``, ``feature_group_count`` and zero padding: ``'SAME'``
  (lax's rule, the TF/Keras one jfactor uses), ``'VALID'``, an int, per-dim ints or
  ``(low, high)`` pairs, and 1-D ``'CAUSAL'`` (``((k - 1) * d, 0)``).  Its compute
  ``dtype`` and ``precision`` are ignored: the map is read, not how it is rounded.
- ``nnx.BatchNorm`` with ``use_running_average=True`` (``model.eval()``) on the last
  axis: ``(x - mean) / sqrt(var + epsilon) * scale + bias`` (missing scale/bias are 1/0).
- ``functools.partial(nnx.avg_pool, window_shape=..., strides=...)``; ``nnx.avg_pool`` is
  ``flax.linen.avg_pool``, whose ``strides`` default to 1 (not to the window, as in
  Keras).  ``padding='VALID'`` reads as :class:`~jfactor.layers.AvgPool`; a padded pool
  with ``count_include_pad=True`` (the default) as a depthwise box convolution (float64
  taps ``1 / prod(window_shape)``; 'SAME' pads by the same TF rule as nnx.Conv).
- the identity: ``nnx.Dropout`` in eval mode (``deterministic=True``, or rate 0) and an
  empty ``nnx.Sequential()``.  A non-empty nested ``nnx.Sequential`` is read in line;
  its layers are named ``layers[i].layers[j]``.

Anything else (activations, max pooling, training-mode BatchNorm or Dropout, circular
padding, unknown modules and functions) is a layer jfactor cannot fold.
"""

from __future__ import annotations

import functools
import inspect
import warnings

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jfactor import _checks
from jfactor.errors import StackError
from jfactor.layers import AvgPool, BatchNorm, Conv, Identity, Layer
from jfactor.stack import Stack

Shape = tuple[int, ...]


class _NotFoldable(Exception):
    """A layer that is not one affine convolution; the message says why."""


def _name(layer) -> str:
    """A short name for messages: the function's, the partial's function's, or the type's."""
    func = layer.func if isinstance(layer, functools.partial) else layer
    return getattr(func, "__name__", None) or type(layer).__name__


def _leaves(module, path: str = "layers"):
    """``(path, layer)`` of every layer of ``module``, nested non-empty Sequentials inlined."""
    if isinstance(module, nnx.Sequential) and len(module.layers):
        items = module.layers
    elif isinstance(module, (list, tuple, nnx.List)):
        items = module
    else:
        items = [module]
    for i, layer in enumerate(items):
        where = f"{path}[{i}]"
        if isinstance(layer, nnx.Sequential) and len(layer.layers):
            yield from _leaves(layer, f"{where}.layers")
        else:
            yield where, layer


def _expand(value, ndim: int) -> tuple[int, ...]:
    """flax's broadcast of ``None`` / an int / a sequence to ``ndim`` entries."""
    value = 1 if value is None else value
    return (value,) * ndim if isinstance(value, int) else tuple(value)


def _conv_padding(padding, size: Shape, dilation: Shape):
    """jfactor's padding spec of an nnx.Conv ``padding``."""
    if not isinstance(padding, str):
        return padding  # int or per-dim ints / pairs: one meaning in flax and jfactor
    mode = padding.upper()
    if mode in ("SAME", "VALID"):
        return mode.lower()
    if mode == "CAUSAL" and len(size) == 1:
        return (((size[0] - 1) * dilation[0], 0),)
    if mode == "CAUSAL":
        raise _NotFoldable("padding 'CAUSAL' is only defined for 1-D convolutions")
    if mode == "SAME_LOWER":  # zero padding, whose pads depend on the input's size at strides > 1 (not given here)
        raise _NotFoldable("padding 'SAME_LOWER' (the odd pad before, not after) is not read; give the pads as "
                           "(low, high) pairs")
    raise _NotFoldable(f"not one convolution: padding {padding!r} is not zero padding")


def _from_conv(layer: nnx.Conv) -> Conv:
    """nnx.Conv -> Conv, kernel ``(*k, C_in // groups, C_out)``."""
    if layer.conv_general_dilated is not lax.conv_general_dilated:
        raise _NotFoldable("calls a custom conv_general_dilated; jfactor reads lax.conv_general_dilated only")
    ndim = len(layer.kernel_size)
    if any(d != 1 for d in _expand(layer.input_dilation, ndim)):
        raise _NotFoldable(
            f"not one convolution: input_dilation {layer.input_dilation} makes it a transposed convolution"
        )
    kernel = layer.kernel[...]
    if layer.mask is not None:
        kernel = kernel * layer.mask
    dilation = _expand(layer.kernel_dilation, ndim)
    padding = _conv_padding(layer.padding, tuple(kernel.shape[:ndim]), dilation)
    bias = None if layer.bias is None else layer.bias[...]
    return Conv(kernel, bias, _expand(layer.strides, ndim), dilation, padding, layer.feature_group_count)


def _from_batch_norm(layer: nnx.BatchNorm, shape: Shape) -> Layer:
    """nnx.BatchNorm in eval mode -> BatchNorm with gamma = scale, beta = bias, all (C,)."""
    if layer.use_running_average is not True:
        raise _NotFoldable(
            "not linear: BatchNorm in training mode normalises with the batch's own statistics; "
            "call model.eval() or set use_running_average=True"
        )
    if layer.axis not in (-1, len(shape)):
        raise _NotFoldable(f"normalises axis {layer.axis}, not the channels (last) axis")
    mean, var = layer.mean[...], layer.var[...]
    gamma = jnp.ones_like(var) if layer.scale is None else layer.scale[...]
    beta = jnp.zeros_like(mean) if layer.bias is None else layer.bias[...]
    return BatchNorm(gamma, beta, mean, var, layer.epsilon)


def _from_avg_pool(layer: functools.partial, shape: Shape) -> Layer:
    """partial(nnx.avg_pool, ...) -> AvgPool (valid) or a depthwise box Conv (zero-padded)."""
    if layer.args:
        raise _NotFoldable(
            "binds positional arguments, which nnx.avg_pool takes as its inputs; "
            "give window_shape=..., strides=... by keyword"
        )
    try:
        bound = inspect.signature(nnx.avg_pool).bind(None, **layer.keywords)
    except TypeError as exc:
        raise _NotFoldable(f"is not a valid avg_pool call: {exc}") from None
    bound.apply_defaults()
    args = bound.arguments
    ndim = len(shape) - 1
    window = _expand(args["window_shape"], ndim)
    strides = _expand(args["strides"], ndim)  # flax: None means 1
    padding = args["padding"]
    if isinstance(padding, str) and padding.upper() == "VALID":
        return AvgPool(window, strides)
    if not args["count_include_pad"]:
        raise _NotFoldable(
            "not one convolution: a padded avg_pool with count_include_pad=False divides each "
            "border window by its own count of real pixels"
        )
    kernel = jnp.full(window + (1, shape[-1]), 1.0 / _checks.prod(window), jnp.float64)
    spec = padding.lower() if isinstance(padding, str) else padding
    return Conv(kernel, None, strides, 1, spec, shape[-1])


def conv_from_nnx(layer: nnx.Conv) -> Conv:
    """The jfactor :class:`Conv` an ``nnx.Conv`` computes; StackError if it is not one conv."""
    try:
        return _from_conv(layer)
    except _NotFoldable as exc:
        raise StackError(f"{_name(layer)}: {exc}") from None


def _from_nnx_layer(layer, shape: Shape) -> Layer:
    """The jfactor layer equal to one nnx layer on inputs ``(N, *shape)``; else _NotFoldable."""
    kind = type(layer)
    if kind is nnx.Conv:
        return _from_conv(layer)
    if kind is nnx.BatchNorm:
        return _from_batch_norm(layer, shape)
    if kind is nnx.Dropout:
        if layer.deterministic is True or layer.rate == 0:
            return Identity()
        raise _NotFoldable(
            "not linear: Dropout in training mode zeroes random inputs; "
            "call model.eval() or set deterministic=True"
        )
    if kind is nnx.Sequential:  # only empty ones reach here
        return Identity()
    if isinstance(layer, functools.partial) and layer.func is nnx.avg_pool:
        return _from_avg_pool(layer, shape)
    if isinstance(layer, nnx.Linear):  # linear: "not linear" would puzzle
        raise _NotFoldable("nnx.Linear (on an (N, *spatial, C) input, a 1x1 convolution) is not read: write it as "
                           "nnx.Conv(kernel_size=1), which jfactor folds")
    raise _NotFoldable(
        "not linear, or unknown to jfactor; it folds nnx.Conv, nnx.BatchNorm(use_running_average=True), "
        "functools.partial(nnx.avg_pool, window_shape=..., strides=...), nnx.Dropout in eval mode "
        "and nnx.Sequential (empty: the identity)"
    )


def _reworded(exc: StackError, where: str) -> StackError:
    """``exc`` with its leading location replaced by ``where``."""
    return StackError(f"{where}: {str(exc).split(': ', 1)[-1]}")


def _eval_out_shape(layer, shape: Shape, where: str) -> Shape:
    """``(*spatial, C)`` of what a layer jfactor cannot fold makes of ``(1, *shape)``.

    Modules run functionally (split/merge), so their state (batch statistics, rng counts)
    is left untouched; only shapes are computed, so dtype warnings are silenced.
    """
    spec = jax.ShapeDtypeStruct((1,) + shape, jnp.float64)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = _eval_shape(layer, spec)
    except Exception as exc:  # noqa: BLE001  any failure of user code names the layer
        raise StackError(f"{where}: cannot infer its output shape on an input {spec.shape}: {exc}") from None
    if not isinstance(out, jax.ShapeDtypeStruct):
        raise StackError(
            f"{where}: returns {type(out).__name__}, not one array; the shape cannot be followed past it"
        )
    return tuple(out.shape[1:])


def _eval_shape(layer, spec):
    """``jax.eval_shape`` of ``layer(x)`` for ``x`` like ``spec``; an nnx module runs on a copy."""
    if isinstance(layer, nnx.Module):
        graphdef, state = nnx.split(layer)
        return jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, spec)
    return jax.eval_shape(layer, spec)


def _check_rank(shape: Shape, input_shape: Shape, after: str | None, where: str) -> None:
    """A run of foldable layers must start on ``(*spatial, C)`` of the input's rank."""
    if len(shape) != len(input_shape):
        raise StackError(
            f"{where}: its input, the output of {after}, has shape {shape}; a stack needs "
            f"(*spatial, C) with {len(input_shape) - 1} spatial dims, like the model's input"
        )


def from_nnx(module, input_shape, *, split: bool = False) -> Stack | list[Stack]:
    """The jfactor stack equal to ``module`` on inputs ``(N, *input_shape)``.

    Args:
      module: an ``nnx.Sequential``, a list, tuple or ``nnx.List`` of layers, or one layer
        (see the module docstring for what is read).
      input_shape: ``(*spatial, C)``, e.g. ``(28, 28, 1)``.
      split: what to do with a layer jfactor cannot fold (an activation, max pooling, ...).

    Returns:
      ``split=False``: one :class:`Stack`; a layer jfactor cannot fold raises
      :class:`StackError` naming it, e.g. ``layers[3] (relu): not linear, ...``.
      ``split=True``: a ``list[Stack]``, one per maximal run of foldable layers, in order
      (runs with no layer, such as between two activations, are skipped; the list is
      empty when nothing folds).  Each stack's ``input_shape`` is the shape reaching its
      first layer: the output shape of the layer before, found with ``jax.eval_shape``,
      so a max pool that halves the image is followed by a stack on the halved image.

    Raises:
      StackError: naming ``layers[i]`` (and its name) for a layer that does not fit the
        shape reaching it, or cannot be folded when ``split=False``.
    """
    input_shape = _checks.input_shape(input_shape)
    stacks, layers = [], []
    start = shape = input_shape
    after = None  # the layer the current shape came out of, when it is not the input
    for path, layer in _leaves(module):
        where = f"{path} ({_name(layer)})"
        try:
            converted = _from_nnx_layer(layer, shape)
            _check_rank(shape, input_shape, after, where)
            shape = converted.out_shape(shape, path)
        except _NotFoldable as exc:
            if not split:
                raise StackError(
                    f"{where}: {exc}; pass split=True to fold the runs of linear layers around it"
                ) from None
            if layers:
                stacks.append(Stack(layers, start))
            layers, after = [], where
            start = shape = _eval_out_shape(layer, shape, where)
            continue
        except StackError as exc:
            raise _reworded(exc, where) from None
        layers.append(converted)
    if split:
        return stacks + [Stack(layers, start)] if layers else stacks
    return Stack(layers, input_shape)


def _nnx_padding(padding):
    """flax's spelling of a jfactor padding spec."""
    if isinstance(padding, str):
        return padding.upper()
    return padding if isinstance(padding, int) else [tuple(p) for p in padding]


def _nnx_conv(conv: Conv, rngs) -> nnx.Conv:
    """An nnx.Conv computing ``conv`` (param_dtype = the kernel's dtype, precision HIGHEST)."""
    return nnx.Conv(
        conv.in_channels, conv.out_channels, conv.size, conv.strides,
        padding=_nnx_padding(conv.padding), kernel_dilation=conv.dilation,
        feature_group_count=conv.groups, use_bias=conv.bias is not None, param_dtype=conv.kernel.dtype,
        precision=lax.Precision.HIGHEST,
        kernel_init=lambda _key, _shape, _dtype: conv.kernel,  # no random draw to throw away
        bias_init=lambda _key, _shape, dtype: conv.bias.astype(dtype),
        rngs=rngs or nnx.Rngs(0),
    )


def _nnx_layer(layer: Layer, shape: Shape, dtype, where: str, rngs):
    """One nnx layer computing ``layer`` on inputs ``(N, *shape)``."""
    if type(layer) is Conv:
        return _nnx_conv(layer, rngs)
    if type(layer) is AvgPool:
        ndim = len(shape) - 1
        size = _checks.expand(layer.pool_size, ndim, "pool_size", where)
        return functools.partial(nnx.avg_pool, window_shape=size,
                                 strides=_checks.expand(layer.strides, ndim, "strides", where))
    program = layer.lower(shape, dtype)
    if len(program) != 1 or not isinstance(program[0], Conv):
        raise StackError(
            f"{where}: runs parallel branches, which nnx.Sequential cannot express; "
            "fold it first: to_nnx(jfactor.fold(stack).conv)"
        )
    return _nnx_conv(program[0], rngs)


def to_nnx(obj, *, rngs=None):
    """nnx modules computing a jfactor :class:`Conv` or :class:`Stack`, weights set.

    Args:
      obj: a :class:`Conv` (e.g. ``jfactor.fold(stack).conv``, explicit padding pairs)
        or a :class:`Stack` without Residual/Branches layers (e.g. a factorization chain
        or ``jfactor.fold(stack).canonical.stack``).
      rngs: ``nnx.Rngs`` handed to the constructors (default ``nnx.Rngs(0)``); the
        weights are set from ``obj``, so it only feeds nnx's bookkeeping.

    Returns:
      For a Conv, one ``nnx.Conv`` (kernel ``(*k, C_in // groups, C_out)``,
      ``param_dtype`` the kernel's dtype, ``precision=HIGHEST`` like jfactor's own conv).
      For a Stack, an ``nnx.Sequential`` on inputs ``(N, *stack.input_shape)``: a Conv
      becomes an nnx.Conv, an AvgPool ``partial(nnx.avg_pool, window_shape, strides)``
      (weightless; ``from_nnx`` reads it back as an AvgPool), and every other layer
      (Subsample, SumPool, BatchNorm, Identity) the nnx.Conv of its lowering: a
      depthwise 1x1 or box kernel.

    Raises:
      StackError: for another type, or a Residual/Branches layer (naming ``layers[i]``).
    """
    if rngs is not None and not isinstance(rngs, nnx.Rngs):
        raise StackError(f"to_nnx: rngs must be an nnx.Rngs (nnx.Rngs({rngs!r}), say), got {type(rngs).__name__}")
    if isinstance(obj, Conv):
        return _nnx_conv(obj, rngs)
    if not isinstance(obj, Stack):
        raise StackError(f"to_nnx: expected a jfactor Conv or Stack, got {type(obj).__name__}")
    dtype = obj.dtype or jnp.float64
    modules = [
        _nnx_layer(layer, shape, dtype, f"layers[{i}] ({layer.kind})", rngs)
        for i, (layer, (shape, _)) in enumerate(zip(obj.layers, obj.shapes()))
    ]
    return nnx.Sequential(*modules)


__all__ = ["conv_from_nnx", "from_nnx", "to_nnx"]
