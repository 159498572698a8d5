"""Keras 3 models (JAX backend) in, folded Keras conv layers out.

``from_keras(model)`` reads a ``keras.Sequential`` or functional ``keras.Model`` (channels
last, all spatial sizes known) into a :class:`~jfactor.stack.Stack`; ``to_keras(conv)``
writes a jfactor :class:`~jfactor.layers.Conv` back as a Keras conv layer with its weights.

Read, for inference (what ``model.predict`` computes):

- ``Conv1D/2D/3D`` (strides, dilation, groups, bias; padding 'valid', 'same', 'causal'
  for 1-D; activation None/'linear'), ``DepthwiseConv1D/2D`` (any depth multiplier);
- ``AveragePooling1D/2D/3D`` with padding 'valid' (a 'same' pool divides border windows by
  their own count of real pixels: not one convolution);
- ``BatchNormalization`` on the last axis, with its moving statistics;
- ``ZeroPadding1D/2D/3D`` (an identity convolution with that padding);
- ``Add`` (of tensors of one shape) and ``Concatenate`` on the last axis (parallel branches),
  as layers or as ``keras.ops`` calls on the model's tensors (``a + b``), ``Identity``,
  ``Activation('linear')``, ``Dropout`` and ``InputLayer``.  A ``keras.ops`` call with a
  constant operand (``x + 1.0``) is not read.

Any other layer (an activation, max pooling, dense, ...) is not linear: an error naming
it, or with ``split=True`` a boundary between linear segments.

Keras is imported with ``KERAS_BACKEND=jax`` (set here when unset).  A Keras already
imported with another backend is an error: its layers compute with another framework.
"""

from __future__ import annotations

import itertools
import os
import sys

if "keras" not in sys.modules:
    os.environ.setdefault("KERAS_BACKEND", "jax")
import keras
import numpy as np

from jfactor.errors import StackError
from jfactor.interop.graph import Node, Segment, build_stack, segments
from jfactor.layers import AvgPool, BatchNorm, Conv, Identity
from jfactor.stack import Stack

if keras.backend.backend() != "jax":
    raise ImportError(
        f"jfactor.interop.keras3 needs Keras on the JAX backend, but Keras was imported with backend "
        f"{keras.backend.backend()!r}; set KERAS_BACKEND=jax before anything imports keras"
    )

Shape = tuple[int, ...]


class _NotLinear(Exception):
    """A layer that is not one linear map of its input; the message says why."""


def _array(variable) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(variable))


def _check_channels_last(layer) -> None:
    data_format = getattr(layer, "data_format", "channels_last")
    if data_format != "channels_last":
        raise _NotLinear(f"data_format={data_format!r}; jfactor reads channels_last only")


def _check_linear_activation(layer) -> None:
    activation = getattr(layer, "activation", None)
    if activation not in (None, keras.activations.linear):
        raise _NotLinear(f"activation {getattr(activation, '__name__', activation)!r} is not linear")


def _padding(layer, size: Shape, dilation: Shape):
    mode = layer.padding.lower()
    if mode in ("valid", "same"):
        return mode
    if mode == "causal" and len(size) == 1:
        return (((size[0] - 1) * dilation[0], 0),)
    raise _NotLinear(f"padding {layer.padding!r} is not read")


def _conv(layer) -> Conv:
    """Conv*D: kernel ``(*k, C_in // groups, C_out)``, as jfactor's."""
    _check_linear_activation(layer)
    kernel = _array(layer.kernel)
    bias = _array(layer.bias) if layer.use_bias else None
    size = kernel.shape[:-2]
    dilation = tuple(layer.dilation_rate)
    return Conv(kernel, bias, tuple(layer.strides), dilation, _padding(layer, size, dilation), layer.groups)


def _depthwise(layer) -> Conv:
    """DepthwiseConv*D: kernel ``(*k, C, m)`` is jfactor's ``(*k, 1, C * m)`` with groups C."""
    _check_linear_activation(layer)
    kernel = _array(layer.kernel)
    *size, channels, multiplier = kernel.shape
    bias = _array(layer.bias) if layer.use_bias else None
    dilation = tuple(layer.dilation_rate)
    return Conv(kernel.reshape(*size, 1, channels * multiplier), bias, tuple(layer.strides), dilation,
                _padding(layer, tuple(size), dilation), channels)


def _avg_pool(layer) -> AvgPool:
    if layer.padding.lower() != "valid":
        raise _NotLinear("a 'same' average pool divides each border window by its own count of real pixels; "
                         "not one convolution")
    return AvgPool(tuple(layer.pool_size), tuple(layer.strides))


def _batch_norm(layer, shape: Shape) -> BatchNorm:
    axis = layer.axis if isinstance(layer.axis, int) else tuple(layer.axis)
    if axis not in (-1, len(shape), [-1], (-1,), (len(shape),)):
        raise _NotLinear(f"normalises axis {layer.axis}, not the channels (last) axis")
    mean, var = _array(layer.moving_mean), _array(layer.moving_variance)
    gamma = _array(layer.gamma) if layer.scale else np.ones_like(var)
    beta = _array(layer.beta) if layer.center else np.zeros_like(mean)
    return BatchNorm(gamma, beta, mean, var, layer.epsilon)


def _zero_padding(layer, shape: Shape) -> Conv:
    ndim = len(shape) - 1
    pads = layer.padding
    pads = (tuple(pads),) if ndim == 1 else tuple(tuple(p) for p in pads)
    channels = shape[-1]
    kernel = np.ones((1,) * ndim + (1, channels))
    return Conv(kernel, None, 1, 1, pads, channels)


def _concat_axis_ok(layer, ndim_total: int) -> bool:
    return layer.axis in (-1, ndim_total - 1)


def _node(layer, inputs: tuple[str, ...], output: str, shapes: list[Shape], constants: list[str]) -> Node:
    """The :class:`Node` of one Keras layer (or ``keras.ops`` operation) whose inputs have shapes
    ``shapes`` (each ``(*spatial, C)``); ``constants`` names the types of the operands that are
    not tensors of the model (``x + 1.0``: ``['float']``)."""
    kind = type(layer).__name__
    shape = shapes[0] if shapes else None
    try:
        if isinstance(layer, keras.Model):
            raise _NotLinear("a nested model; jfactor reads the layers of one flat model (build it from the nested "
                             "model's layers)")
        if kind in ("InputLayer", "Identity", "Dropout") or (kind == "Activation"
                                                             and layer.activation is keras.activations.linear):
            return Node(layer.name, inputs, output, Identity())
        if kind in ("Add", "Concatenate"):
            if constants:  # before: the constant was dropped, and x + 1.0 read as x
                raise _NotLinear(f"a keras.ops operation with operands that are not tensors of the model "
                                 f"({', '.join(constants)}); jfactor reads operations of the model's tensors only")
            if kind == "Concatenate" and not _concat_axis_ok(layer, len(shape) + 1):
                raise _NotLinear(f"concatenates axis {layer.axis}, not the channels (last) axis")
            if kind == "Add" and len(set(shapes)) > 1:
                raise _NotLinear(f"adds tensors of shapes {', '.join(map(str, shapes))} (broadcast); jfactor adds "
                                 "tensors of one shape")
            return Node(layer.name, inputs, output, merge="sum" if kind == "Add" else "concat")
        if len(inputs) != 1:  # the merges jfactor reads (Add, Concatenate) are above
            raise _NotLinear(f"takes {len(inputs)} inputs; of the layers with several, jfactor reads Add and "
                             "Concatenate")
        _check_channels_last(layer)
        if kind in ("Conv1D", "Conv2D", "Conv3D"):
            return Node(layer.name, inputs, output, _conv(layer))
        if kind in ("DepthwiseConv1D", "DepthwiseConv2D"):
            return Node(layer.name, inputs, output, _depthwise(layer))
        if kind in ("AveragePooling1D", "AveragePooling2D", "AveragePooling3D"):
            return Node(layer.name, inputs, output, _avg_pool(layer))
        if kind == "BatchNormalization":
            return Node(layer.name, inputs, output, _batch_norm(layer, shape))
        if kind in ("ZeroPadding1D", "ZeroPadding2D", "ZeroPadding3D"):
            return Node(layer.name, inputs, output, _zero_padding(layer, shape))
        raise _NotLinear(
            "not linear, or unknown to jfactor; it reads Conv1D/2D/3D, DepthwiseConv1D/2D, AveragePooling1D/2D/3D, "
            "BatchNormalization, ZeroPadding1D/2D/3D, Add, Concatenate, Identity, Activation('linear'), Dropout"
        )
    except _NotLinear as exc:
        return Node(layer.name, inputs, output, why=str(exc))


def _operands(call) -> list[str]:
    """The type names of a call's operands that are not Keras tensors (constants of a ``keras.ops`` call)."""
    values = keras.tree.flatten((call.arguments.args, call.arguments.kwargs))
    return [type(v).__name__ for v in values if not isinstance(v, keras.KerasTensor)]


def _where(model, op) -> str:
    """How messages name ``op``: its index among ``model.layers``, or as a ``keras.ops`` call."""
    names = [layer.name for layer in model.layers]
    if op.name in names:
        return f"layers[{names.index(op.name)}] ({op.name}, {type(op).__name__})"
    return f"operation {op.name} ({type(op).__name__}, a keras.ops call)"


def _graph(model) -> tuple[list[Node], str, str, dict, dict]:
    """Nodes of ``model`` in order, its input and output tensor names, every tensor's shape, and
    each node's Keras layer or operation by name."""
    if isinstance(model, keras.Sequential) and not model.layers:
        raise StackError(f"{model.name}: has no layers to read")
    if isinstance(model, keras.Model) and not model.built:
        raise StackError(f"{model.name}: the model is not built, so its input shape is unknown; start it with "
                         "keras.Input(shape=...) or call model.build((None, *spatial, C))")
    if isinstance(model, keras.Sequential):
        names = [layer.name for layer in model.layers]
        entries = [(layer, (before,), layer.name, []) for layer, before in zip(model.layers, ["input"] + names)]
        source, sink = "input", names[-1] if names else "input"
        shapes = {"input": tuple(model.input_shape[1:])}
        for layer, (inp,), out, _ in entries:
            shapes[out] = tuple(layer.compute_output_shape((None,) + shapes[inp])[1:])
    elif isinstance(model, keras.Model):
        if len(model.inputs) != 1 or len(model.outputs) != 1:
            raise StackError(f"{model.name}: has {len(model.inputs)} inputs and {len(model.outputs)} outputs; "
                             "jfactor reads models with one of each")
        entries, shapes = [], {}
        # the model's own calls of each layer (a layer may also be called in other models built from it)
        calls = {}
        for node in itertools.chain.from_iterable(model._nodes_by_depth.values()):
            calls.setdefault(id(node.operation), []).append(node)
        for op in model.operations:
            if len(calls[id(op)]) != 1:
                raise StackError(f"{op.name}: is used {len(calls[id(op)])} times in the model; jfactor reads "
                                 "each layer applied once")
            (call,) = calls[id(op)]
            inputs = tuple(str(id(t)) for t in call.input_tensors)
            if len(call.output_tensors) != 1:
                raise StackError(f"{op.name}: makes {len(call.output_tensors)} tensors; jfactor reads one per layer")
            out = call.output_tensors[0]
            shapes[str(id(out))] = tuple(out.shape[1:])
            if type(op).__name__ != "InputLayer":
                constants = [] if isinstance(op, keras.layers.Layer) else _operands(call)
                entries.append((op, inputs, str(id(out)), constants))
        source, sink = str(id(model.inputs[0])), str(id(model.outputs[0]))
        shapes[source] = tuple(model.inputs[0].shape[1:])
    else:
        raise StackError(f"from_keras: expected a keras.Sequential or keras.Model, got {type(model).__name__}")
    for shape in shapes.values():
        if any(d is None for d in shape):
            raise StackError(f"{model.name}: a tensor has shape {shape} with an unknown size; give the model's "
                             "Input a full shape, e.g. keras.Input((28, 28, 1))")
    nodes = []
    for layer, inputs, out, constants in entries:
        try:
            nodes.append(_node(layer, inputs, out, [shapes[t] for t in inputs], constants))
        except StackError as exc:  # a layer's own weights refused (non-finite, a variance below -epsilon, ...)
            raise StackError(f"{_where(model, layer)}: {exc}") from None
    return nodes, source, sink, shapes, {layer.name: layer for layer, *_ in entries}


def _positions(model, names: tuple[str, ...]) -> tuple[int, ...]:
    """The indices in ``model.layers`` of the layers named ``names`` (``keras.ops`` calls have none)."""
    index = {layer.name: i for i, layer in enumerate(model.layers)}
    return tuple(index[name] for name in names if name in index)


def from_keras(model, *, split: bool = False) -> Stack | list[tuple[Segment, Stack]]:
    """The jfactor stack equal to a Keras model (inference), or its linear segments.

    Args:
      model: a ``keras.Sequential`` or functional ``keras.Model`` with one input of known
        shape ``(None, *spatial, C)`` and one output; see the module docstring for what is read.
      split: what to do with layers that are not linear.

    Returns:
      ``split=False``: one :class:`Stack` on inputs ``(N, *spatial, C)``.
      ``split=True``: ``[(segment, stack), ...]`` for every maximal linear segment, in
      model order: ``segment.nodes`` are the Keras layer (and ``keras.ops`` call) names it covers
      (``segment.positions`` the layers' indices in ``model.layers``), ``segment.source``
      / ``segment.sink`` the layer names of its input (``'input'`` for the model's) and
      output, and ``stack`` runs on the shape reaching it.

    Raises:
      StackError: naming the layer that is not linear (``split=False``), or does not fit.
    """
    nodes, source, sink, shapes, ops = _graph(model)
    by_output = {n.output: n for n in nodes}
    if not split:
        for n in nodes:
            if not n.linear:
                raise StackError(f"{_where(model, ops[n.name])}: {n.why}; pass split=True to fold the linear "
                                 "segments around it")
        return build_stack(nodes, source, sink, shapes[source])
    found = []
    for seg in segments(nodes, [sink]):
        members = [n for n in nodes if n.name in seg.nodes]
        stack = build_stack(members, seg.source, seg.sink, shapes[seg.source])
        named = Segment(seg.nodes, by_output[seg.source].name if seg.source in by_output else "input",
                        by_output[seg.sink].name, _positions(model, seg.nodes))
        found.append((named, stack))
    return found


def _keras_padding(conv: Conv, ndim: int):
    """'valid'/'same' when the conv's padding is one of those, else None (explicit pairs)."""
    if isinstance(conv.padding, str):
        return conv.padding
    if all(tuple(p) == (0, 0) for p in conv.padding):
        return "valid"
    return None


def to_keras(conv: Conv, *, name: str | None = None):
    """A Keras layer computing jfactor ``conv`` (e.g. ``jfactor.fold(stack).conv``), weights set.

    Returns a ``Conv1D/2D/3D`` (dtype the kernel's, groups kept); for explicit padding
    pairs, a ``keras.Sequential`` of ``ZeroPadding*D`` and a 'valid' conv.  Keras convs have
    no kernel dilation other than ``dilation_rate`` with stride 1, so a strided dilated
    conv is an error.
    """
    if not isinstance(conv, Conv):
        raise StackError(f"to_keras: expected a jfactor Conv, got {type(conv).__name__}")
    ndim = conv.ndim
    if ndim not in (1, 2, 3):
        raise StackError(f"to_keras: Keras has Conv1D/2D/3D, not a {ndim}-D conv")
    if any(s > 1 for s in conv.strides) and any(d > 1 for d in conv.dilation):
        raise StackError("to_keras: Keras convs take strides > 1 or dilation_rate > 1, not both")
    kernel = np.asarray(conv.kernel)
    dtype = str(kernel.dtype)
    layer_cls = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)[ndim - 1]
    padding = _keras_padding(conv, ndim)
    layer = layer_cls(conv.out_channels, conv.size, strides=conv.strides, padding=padding or "valid",
                      dilation_rate=conv.dilation, groups=conv.groups, use_bias=conv.bias is not None,
                      dtype=dtype, name=name)
    layer.build((None,) + (None,) * ndim + (conv.in_channels,))
    weights = [kernel] + ([np.asarray(conv.bias)] if conv.bias is not None else [])
    layer.set_weights(weights)
    if padding is not None:
        return layer
    pad_cls = (keras.layers.ZeroPadding1D, keras.layers.ZeroPadding2D, keras.layers.ZeroPadding3D)[ndim - 1]
    pads = tuple(conv.padding[0]) if ndim == 1 else tuple(tuple(p) for p in conv.padding)
    # the Input's dtype too: a Sequential without one casts its input to Keras' floatx (float32 by default)
    return keras.Sequential([keras.Input((None,) * ndim + (conv.in_channels,), dtype=dtype), pad_cls(pads, dtype=dtype),
                             layer], name=name)


__all__ = ["from_keras", "to_keras"]
