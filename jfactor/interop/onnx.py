"""ONNX models in, folded ONNX models out.

ONNX tensors are NCHW (``(N, C, *spatial)``) and conv weights ``(C_out, C_in // group, *k)``;
jfactor is channels-last, ``(N, *spatial, C)`` and ``(*k, C_in // groups, C_out)``: every
weight and shape is converted here, once.

Linear nodes, read as jfactor layers (weights must be constants: initializers, ``Constant``
nodes, or ``Unsqueeze``/``Squeeze``/``Identity`` of constants):

- ``Conv`` (strides, dilations, group, bias, pads or auto_pad);
- ``BatchNormalization`` (inference), and ``Mul``/``Add`` of a per-channel or scalar constant;
- ``AveragePool`` without padding, or with zero padding and ``count_include_pad=1``
  (a padded pool with ``count_include_pad=0`` divides each border window by its own count:
  not one convolution), ``ceil_mode=0``;
- ``Pad`` with mode 'constant', value 0, non-negative pads on the spatial axes only;
- ``Add``/``Sum`` of data tensors (parallel branches), ``Concat`` on the channel axis (1),
  ``Identity`` and ``Dropout`` (inference).

Everything else is a non-linear node: the boundary of a linear segment.  :func:`fold_model`
folds every segment of two or more nodes into one ``Conv`` where that is exact, and says
why it keeps the others.
"""

from __future__ import annotations

import dataclasses
import graphlib
import itertools
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from jfactor._checks import non_finite
from jfactor.analysis import exact_nowhere
from jfactor.errors import ConfigError, FoldError, StackError
from jfactor.fold import Folded, fold
from jfactor.interop.graph import Node, Segment, build_stack, segments
from jfactor.layers import AvgPool, BatchNorm, Conv, Identity
from jfactor.stack import Stack


class _NotLinear(Exception):
    """A node that is not one linear map of one input; the message says why."""


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every tensor whose value is known without an input: initializers and constant-only nodes."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        inputs = [i for i in node.input if i]
        if not all(i in values for i in inputs):
            continue
        a, x = _attrs(node), [values[i] for i in inputs]
        if node.op_type == "Constant" and "value" in a:
            values[node.output[0]] = numpy_helper.to_array(a["value"])
        elif node.op_type == "Identity":
            values[node.output[0]] = x[0]
        elif node.op_type in ("Unsqueeze", "Squeeze"):
            axes = a.get("axes", x[1].tolist() if len(x) > 1 else None)
            if node.op_type == "Squeeze":
                values[node.output[0]] = np.squeeze(x[0], axis=None if axes is None else tuple(axes))
            else:
                out = x[0]
                for axis in sorted(ax % (out.ndim + len(axes)) for ax in axes):
                    out = np.expand_dims(out, axis)
                values[node.output[0]] = out
    return values


def _tensor_types(model: onnx.ModelProto) -> tuple[dict[str, tuple], dict[str, np.dtype]]:
    """From one shape inference: the NCHW shape of every tensor it can follow (None for unknown
    sizes), and the element dtype of every tensor whose type it knows."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes, dtypes = {}, {}
    for info in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims = info.type.tensor_type.shape.dim
        shapes[info.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
        if info.type.tensor_type.elem_type:
            dtypes[info.name] = np.dtype(helper.tensor_dtype_to_np_dtype(info.type.tensor_type.elem_type))
    return shapes, dtypes


def _pairs(pads, ndim: int) -> tuple[tuple[int, int], ...]:
    """ONNX ``[x1_begin, x2_begin, ..., x1_end, x2_end, ...]`` -> ((lo, hi), ...)."""
    pads = list(pads) if pads is not None else [0] * (2 * ndim)
    return tuple((int(pads[i]), int(pads[i + ndim])) for i in range(ndim))


def _auto_pad(a: dict, spatial, extent, strides):
    """jfactor padding of ONNX ``auto_pad``/``pads`` on ``spatial`` inputs."""
    mode = a.get("auto_pad", b"NOTSET")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    ndim = len(extent)
    if mode in ("NOTSET", ""):
        return _pairs(a.get("pads"), ndim)
    if mode == "VALID":
        return ((0, 0),) * ndim
    pairs = []
    for n, k, s in zip(spatial, extent, strides):
        total = max((-(-n // s) - 1) * s + k - n, 0)
        small = total // 2
        pairs.append((small, total - small) if mode == "SAME_UPPER" else (total - small, small))
    return tuple(pairs)


def _constant(values: dict, name: str, what: str) -> np.ndarray:
    if name not in values:
        raise _NotLinear(f"its {what} {name!r} is not a constant")
    return np.asarray(values[name], np.float64)


def _conv(node, a, values, spatial) -> Conv:
    w = _constant(values, node.input[1], "weight")
    ndim = w.ndim - 2
    kernel = np.moveaxis(w, (0, 1), (-1, -2))  # (C_out, C_in/g, *k) -> (*k, C_in/g, C_out)
    bias = _constant(values, node.input[2], "bias") if len(node.input) > 2 and node.input[2] else None
    strides = tuple(a.get("strides", (1,) * ndim))
    dilation = tuple(a.get("dilations", (1,) * ndim))
    extent = tuple((k - 1) * d + 1 for k, d in zip(kernel.shape[:ndim], dilation))
    return Conv(kernel, bias, strides, dilation, _auto_pad(a, spatial, extent, strides), int(a.get("group", 1)))


def _box(channels: int, window, strides, pads) -> Conv:
    kernel = np.full(tuple(window) + (1, channels), 1.0 / np.prod(window))
    return Conv(kernel, None, strides, 1, pads, channels)


def _avg_pool(a, spatial, channels):
    window = tuple(a["kernel_shape"])
    ndim = len(window)
    strides = tuple(a.get("strides", (1,) * ndim))
    if a.get("ceil_mode", 0):
        raise _NotLinear("ceil_mode=1: partial windows at the border are averaged over their own size")
    if any(d != 1 for d in a.get("dilations", (1,) * ndim)):
        raise _NotLinear("dilated average pools are not read")
    pads = _auto_pad(a, spatial, window, strides)
    if all(p == (0, 0) for p in pads):
        return AvgPool(window, strides)
    if not a.get("count_include_pad", 0):
        raise _NotLinear("padded with count_include_pad=0: each border window is divided by its own count of "
                         "real pixels, which is not one convolution")
    return _box(channels, window, strides, pads)


def _pad(node, a, values, ndim: int, channels: int) -> Conv:
    mode = a.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "constant":
        raise _NotLinear(f"mode {mode!r} is not zero padding")
    pads = a["pads"] if "pads" in a else _constant(values, node.input[1], "pads").astype(int).tolist()
    value = a.get("value", 0.0)
    if len(node.input) > 2 and node.input[2]:
        value = float(_constant(values, node.input[2], "constant_value"))
    if len(node.input) > 3 and node.input[3]:
        raise _NotLinear("pads only some axes; jfactor reads pads of every axis")
    if value != 0:
        raise _NotLinear(f"pads with {value}, not zeros: not linear")
    full = ndim + 2
    begin, end = pads[:full], pads[full:]
    if any(begin[:2]) or any(end[:2]):
        raise _NotLinear("pads the batch or channel axis")
    pairs = tuple(zip(begin[2:], end[2:]))
    if any(p < 0 for pair in pairs for p in pair):
        raise _NotLinear("negative pads crop the input")
    return Conv(np.ones((1,) * ndim + (1, channels)), None, 1, 1, pairs, channels)


def _per_channel(node, values, channels: int, ndim: int) -> BatchNorm:
    """``Mul``/``Add`` of a data tensor and a constant that is per channel or one number."""
    const = next(i for i in node.input if i in values)
    c = np.asarray(values[const], np.float64)
    shape = tuple(c.shape)
    if len(shape) > ndim + 2:  # broadcasting would add axes to the output: not a map of (N, C, *spatial) onto itself
        raise _NotLinear(f"{node.op_type} by a constant of shape {shape} gives an output of rank {len(shape)}, "
                         f"not its input's {ndim + 2}")
    while len(shape) > ndim + 1 and shape[0] == 1:
        shape = shape[1:]
    if c.size == 1:
        c = np.full(channels, float(c.reshape(())))
    elif shape == (channels,) + (1,) * ndim:
        c = c.reshape(-1)
    else:
        raise _NotLinear(f"{node.op_type} by a constant of shape {tuple(c.shape)} is not one value per channel")
    ones, zeros = np.ones(channels), np.zeros(channels)
    if node.op_type == "Mul":
        return BatchNorm(c, zeros, zeros, ones, 0.0)
    return BatchNorm(ones, c, zeros, ones, 0.0)


def _layer_of(node, values: dict, shapes: dict):
    """(layer, merge) of one ONNX node; raises _NotLinear."""
    op, a = node.op_type, _attrs(node)
    data = [i for i in node.input if i and i not in values]
    shape = shapes.get(data[0]) if data else None
    if shape is None or len(shape) < 3 or any(d is None for d in shape[1:]):
        raise _NotLinear(f"its input has shape {shape}; jfactor needs (N, C, *spatial) with known sizes")
    channels, spatial, ndim = shape[1], shape[2:], len(shape) - 2
    if op in ("Add", "Sum") and len(data) > 1:
        if len(data) != len([i for i in node.input if i]):
            raise _NotLinear("adds data tensors and constants together")
        known = [shapes[t] for t in data if shapes.get(t) is not None]
        if len(set(known)) > 1:
            raise _NotLinear(f"adds tensors of shapes {', '.join(map(str, known))} (broadcast); jfactor adds "
                             "tensors of one shape")
        return None, "sum"
    if op == "Concat":
        if len(data) != len([i for i in node.input if i]):
            raise _NotLinear("concatenates data tensors and constants")
        if a.get("axis") not in (1, 1 - len(shape)):
            raise _NotLinear(f"concatenates axis {a.get('axis')}, not the channels (1)")
        return None, "concat"
    if len(data) != 1:
        raise _NotLinear(f"reads {len(data)} data tensors")
    if op == "Conv":
        return _conv(node, a, values, spatial), None
    if op == "BatchNormalization":
        if a.get("training_mode", 0):
            raise _NotLinear("training_mode=1 normalises with the batch's own statistics")
        gamma, beta, mean, var = (_constant(values, node.input[i], w) for i, w in
                                  zip(range(1, 5), ("scale", "B", "mean", "var")))
        if a.get("spatial", 1) == 0 and any(np.ndim(v) > 1 for v in (gamma, beta, mean, var)):
            raise _NotLinear("spatial=0 with statistics per position, not per channel")
        return BatchNorm(gamma, beta, mean, var, float(a.get("epsilon", 1e-5))), None
    if op in ("Mul", "Add") and len([i for i in node.input if i]) == 2:
        return _per_channel(node, values, channels, ndim), None
    if op == "AveragePool":
        return _avg_pool(a, spatial, channels), None
    if op == "Pad":
        return _pad(node, a, values, ndim, channels), None
    if op in ("Identity", "Dropout"):
        if op == "Dropout" and len(node.input) > 2 and node.input[2]:
            raise _NotLinear("takes a training_mode input")
        return Identity(), None
    raise _NotLinear("not linear, or unknown to jfactor")


def _nodes(model: onnx.ModelProto, values: dict, shapes: dict) -> list[Node]:
    nodes = []
    read = {t for node in model.graph.node for t in node.input} | {o.name for o in model.graph.output}
    for node in model.graph.node:
        if all(o in values for o in node.output if o):
            continue  # a constant
        name = node.name
        data = tuple(t for t in node.input if t and t not in values)
        try:
            if len([o for o in node.output if o]) != 1 and node.op_type != "Dropout":
                raise _NotLinear(f"makes {len(node.output)} tensors")
            if any(o in read for o in node.output[1:] if o):  # a Dropout's mask
                raise _NotLinear(f"its output {next(o for o in node.output[1:] if o in read)!r} is read")
            layer, merge = _layer_of(node, values, shapes)
            nodes.append(Node(name, data, node.output[0], layer, merge))
        except _NotLinear as exc:  # a boundary between linear segments
            nodes.append(Node(name, data, node.output[0], why=f"{node.op_type}: {exc}"))
        except StackError as exc:  # a linear node whose layer is bad (non-finite weights, ...): an error,
            # not a boundary between segments
            bad = _non_finite_names({t: values[t] for t in node.input if t in values})
            raise StackError(f"node {name} ({node.op_type}): {exc}"
                             + (f"; non-finite initializers: {', '.join(map(repr, bad))}" if bad else "")) from None
    return nodes


def _channels_last(shape) -> tuple[int, ...]:
    return tuple(shape[2:]) + (shape[1],)


def _load(model) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if not isinstance(model, (str, os.PathLike)):  # bytes, a number: pathlib's own TypeError named neither
        raise ConfigError(f"expected an onnx.ModelProto or the path of a .onnx file, got {type(model).__name__} "
                          "(serialized bytes: onnx.load_from_string)")
    path = Path(model)
    try:
        loaded = onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001  a bad file is an error naming it
        raise ConfigError(f"{path}: cannot read an ONNX model: {exc}") from None
    try:
        onnx.checker.check_model(str(path))  # by path: models over 2 GB keep their weights beside the file
    except onnx.checker.ValidationError as exc:  # an empty file parses as an empty model
        raise ConfigError(f"{path}: not a valid ONNX model (onnx.checker: {_first_line(exc)})") from None
    return loaded


def _non_finite_names(arrays: dict) -> list[str]:
    """The names of ``arrays`` (name -> array) that are floating and hold a NaN or an inf."""
    return [name for name, a in arrays.items()
            if np.issubdtype(np.asarray(a).dtype, np.floating) and non_finite(np.asarray(a))]


def _checker_complaint(model: onnx.ModelProto) -> str | None:
    """The first line of onnx.checker's complaint about ``model`` (None: it passes)."""
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        return _first_line(exc)
    return None


def _first_line(exc: Exception) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


@dataclasses.dataclass(frozen=True)
class _Graph:
    model: onnx.ModelProto
    nodes: list
    values: dict
    shapes: dict
    dtypes: dict

    def stack(self, segment: Segment) -> Stack:
        members = [n for n in self.nodes if n.name in segment.nodes]
        return build_stack(members, segment.source, segment.sink, _channels_last(self.shapes[segment.source]))


def _graph(model) -> _Graph:
    model = _in_order(_named(_load(model)))
    values = _constants(model)
    shapes, dtypes = _tensor_types(model)
    return _Graph(model, _nodes(model, values, shapes), values, shapes, dtypes)


def _data_io(graph: _Graph) -> tuple[str, str]:
    g = graph.model.graph
    inputs = [i.name for i in g.input if i.name not in graph.values]
    if len(inputs) != 1 or len(g.output) != 1:
        raise StackError(f"the model has {len(inputs)} data inputs and {len(g.output)} outputs; "
                         "from_onnx(split=False) reads one of each (use split=True)")
    return inputs[0], g.output[0].name


def from_onnx(model, *, split: bool = False) -> Stack | list[tuple[Segment, Stack]]:
    """The jfactor stack equal to an ONNX model (a path or ``onnx.ModelProto``), or its linear segments.

    ``split=False``: the whole model (one data input, one output) must be linear; a node that
    is not is a :class:`StackError` naming it.  ``split=True``: ``[(segment, stack), ...]`` for
    every maximal linear segment, ``segment.nodes`` the ONNX node names, ``segment.source`` /
    ``segment.sink`` its input and output tensor names; each stack runs on channels-last
    inputs ``(N, *spatial, C)`` of the shape reaching it.
    """
    graph = _graph(model)
    if split:
        return [(seg, graph.stack(seg)) for seg in segments(graph.nodes, [o.name for o in graph.model.graph.output])]
    source, sink = _data_io(graph)
    for n in graph.nodes:
        if not n.linear:
            raise StackError(f"node {n.name} ({n.why}); pass split=True to fold the linear segments around it")
    return build_stack(graph.nodes, source, sink, _channels_last(graph.shapes[source]))


def conv_node(conv: Conv, source: str, sink: str, name: str, dtype) -> tuple[onnx.NodeProto, list]:
    """An ONNX ``Conv`` node computing jfactor ``conv`` (explicit padding) and its initializers."""
    if isinstance(conv.padding, str):
        raise StackError(f"{name}: give the conv explicit padding pairs (jfactor.fold(stack).conv has them)")
    weight = np.moveaxis(np.asarray(conv.kernel, dtype), (-1, -2), (0, 1))
    inits = [numpy_helper.from_array(weight, f"{name}.weight")]
    if conv.bias is not None:
        inits.append(numpy_helper.from_array(np.asarray(conv.bias, dtype), f"{name}.bias"))
    pads = [p[0] for p in conv.padding] + [p[1] for p in conv.padding]
    node = helper.make_node("Conv", [source] + [t.name for t in inits], [sink], name=name,
                            kernel_shape=list(conv.size), strides=list(conv.strides), dilations=list(conv.dilation),
                            pads=pads, group=conv.groups)
    return node, inits


def to_onnx(conv: Conv, input_shape, *, dtype=np.float32, opset: int = 17) -> onnx.ModelProto:
    """A one-node ONNX model computing jfactor ``conv`` on NCHW inputs ``(N, C, *spatial)``.

    ``input_shape`` is jfactor's channels-last ``(*spatial, C)``; the batch axis is symbolic.
    """
    if not isinstance(conv, Conv):
        raise StackError(f"to_onnx: expected a jfactor Conv, got {type(conv).__name__}")
    conv = conv.resolved(tuple(input_shape))
    out_shape = Stack([conv], tuple(input_shape)).output_shape
    node, inits = conv_node(conv, "input", "output", "conv", dtype)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    def nchw(shape):
        return ["N", shape[-1], *shape[:-1]]

    graph = helper.make_graph([node], "jfactor_conv", [helper.make_tensor_value_info("input", elem, nchw(input_shape))],
                              [helper.make_tensor_value_info("output", elem, nchw(out_shape))], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@dataclasses.dataclass(frozen=True)
class SegmentReport:
    """One linear segment of an ONNX model and what folding did with it."""

    nodes: tuple[str, ...]
    ops: tuple[str, ...]
    source: str
    sink: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    folded: bool
    reason: str
    macs: dict
    params: dict
    kernel: tuple[int, ...] | None
    stride: tuple[int, ...] | None
    exact_region: list | None
    certificate: dict | None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _report(segment: Segment, ops, stack: Stack, folded: Folded | None, done: bool, reason: str) -> SegmentReport:
    return SegmentReport(
        segment.nodes, tuple(ops), segment.source, segment.sink, stack.input_shape, stack.output_shape, done, reason,
        dict(folded.macs) if folded else {}, dict(folded.params) if folded else {},
        tuple(folded.conv.kernel.shape) if folded else None, tuple(folded.stride) if folded else None,
        None if folded is None or folded.exact_region is None else [list(r) for r in folded.exact_region],
        folded.certificate.to_dict() if folded else None)


def _fold_segment(graph: _Graph, segment: Segment, cheaper_only: bool) -> tuple[SegmentReport, Folded | None]:
    ops = [n.op_type for n in graph.model.graph.node if (n.name or "") in segment.nodes]
    stack = graph.stack(segment)
    if len(segment.nodes) == 1:
        return _report(segment, ops, stack, None, False, "one node: nothing to fold"), None
    folded = fold(stack.astype(np.float64))
    if folded.exact_region is not None:
        region = ", ".join(f"{a}:{b}" for a, b in folded.exact_region)
        shape = "x".join(map(str, folded.output_shape[:-1]))
        where = "nowhere" if exact_nowhere(folded.exact_region) else f"on [{region}] of {shape} only"
        reason = f"kept: inner zero padding spoils the borders (one conv is exact {where})"
        return _report(segment, ops, stack, folded, False, reason), folded
    if any(p < 0 for pair in folded.conv.padding for p in pair):
        return _report(segment, ops, stack, folded, False, f"kept: the one conv needs negative padding "
                                                           f"{folded.conv.padding} (a crop)"), folded
    if cheaper_only and folded.macs["folded"] > folded.macs["stack"]:
        reason = f"kept: one conv costs more multiply-adds ({folded.macs['stack']:,} -> {folded.macs['folded']:,})"
        return _report(segment, ops, stack, folded, False, reason), folded
    return _report(segment, ops, stack, folded, True, "folded"), folded


def _weights_dtype(graph: _Graph, segment: Segment):
    """The dtype of the segment's input, in which ONNX's ``Conv`` takes its weights (a
    BatchNormalization's parameters may be float32 on float16 data from opset 15); where shape
    inference does not say, the segment's first float weight's, else float32."""
    if segment.source in graph.dtypes:
        return graph.dtypes[segment.source]
    for node in graph.model.graph.node:
        if node.name in segment.nodes:
            for name in node.input:
                if name in graph.values and graph.values[name].dtype.kind == "f":
                    return graph.values[name].dtype
    return np.dtype(np.float32)


def _named(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every node named: ``<op>_<i>`` where it had no name (``<op>_<i>_<k>`` where
    another node has that name).  Two nodes of one name are a :class:`StackError` (onnxruntime
    refuses such a model too)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    given = [node.name for node in model.graph.node if node.name]
    twice = sorted({name for name in given if given.count(name) > 1})
    if twice:
        raise StackError(f"node name {twice[0]!r} is given to {given.count(twice[0])} nodes; ONNX needs each node's "
                         "name unique")
    taken = set(given)
    for i, node in enumerate(model.graph.node):
        if not node.name:
            base = f"{node.op_type}_{i}"
            candidates = itertools.chain([base], (f"{base}_{k}" for k in itertools.count(2)))
            node.name = next(name for name in candidates if name not in taken)
            taken.add(node.name)
    return model


def _in_order(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its nodes in an order where each comes after the nodes making its inputs (ONNX
    asks for it; onnxruntime and graph-editing tools do not); as it was where they already are.
    A cycle is a :class:`StackError` naming its nodes."""
    made_by = {out: node.name for node in model.graph.node for out in node.output if out}
    ready: set[str] = set()
    in_order = True
    for node in model.graph.node:
        in_order &= all(name in ready for name in node.input if name in made_by)
        ready.update(node.output)
    if in_order:
        return model
    needs = {node.name: {made_by[name] for name in node.input if name in made_by} for node in model.graph.node}
    try:
        order = list(graphlib.TopologicalSorter(needs).static_order())
    except graphlib.CycleError as exc:
        raise StackError(f"nodes {exc.args[1]} read each other's outputs in a cycle; an ONNX graph has none") from None
    by_name = {node.name: node for node in model.graph.node}
    nodes = [by_name[name] for name in order]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def fold_model(model, *, cheaper_only: bool = False) -> tuple[onnx.ModelProto, list[SegmentReport]]:
    """Fold every linear segment of two or more nodes of an ONNX model into one ``Conv``.

    Returns the new model (its other nodes, inputs and outputs untouched; initializers no node
    reads any more dropped) and one :class:`SegmentReport` per segment, in graph order.  A
    segment stays as it was where one conv would change the output (zero padding between
    its layers, a crop), and with ``cheaper_only`` where one conv has more multiply-adds than
    the segment (strides inside a segment grow the folded kernel); the report says why.
    """
    graph = _graph(model)
    model = graph.model
    unknown = {i.name: graph.shapes.get(i.name) for i in model.graph.input if i.name not in graph.values
               and len(graph.shapes.get(i.name) or ()) > 2 and None in graph.shapes[i.name][2:]}
    if unknown:  # every node then reads as not foldable, and no segment would say why
        named = ", ".join(f"{name!r} has shape {shape}" for name, shape in unknown.items())
        raise StackError(f"input {named}: fold_model needs the spatial sizes (None: unknown); export the model "
                         "with fixed ones")
    reports, replace = [], {}
    for segment in segments(graph.nodes, [o.name for o in model.graph.output]):
        dtype = _weights_dtype(graph, segment)
        report, folded = _fold_segment(graph, segment, cheaper_only)
        reports.append(report)
        if report.folded:
            replace[segment.sink] = (segment, folded, dtype)
    removed = {name for segment, _, _ in replace.values() for name in segment.nodes}
    nodes, inits = [], list(model.graph.initializer)
    for node in model.graph.node:
        if node.name not in removed:
            nodes.append(node)
        elif node.output[0] in replace:
            segment, folded, dtype = replace[node.output[0]]
            conv_proto, weights = conv_node(folded.conv, segment.source, segment.sink, f"{node.name}.folded", dtype)
            nodes.append(conv_proto)
            inits += weights
    return _pruned(model, nodes, inits), reports


def _declared(inputs: list, inits: list, ir_version: int) -> list:
    """Graph inputs, plus one per initializer where the IR version (< 4) wants every initializer declared."""
    if ir_version >= 4:
        return inputs
    names = {i.name for i in inputs}
    return inputs + [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits
                     if t.name not in names]


def _pruned(model: onnx.ModelProto, nodes: list, inits: list) -> onnx.ModelProto:
    """The model with ``nodes``, minus nodes and initializers nothing reads any more."""
    g = model.graph
    needed = {o.name for o in g.output}
    kept = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed |= set(node.input)
    kept.reverse()
    inits = [t for t in inits if t.name in needed]
    inputs = [i for i in g.input if i.name in needed or i.name not in {t.name for t in g.initializer}]
    graph = helper.make_graph(kept, g.name, _declared(inputs, inits, model.ir_version), list(g.output), inits)
    out = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    try:
        onnx.checker.check_model(out)
    except onnx.checker.ValidationError as exc:  # the model's own flaw (an output declared without a
        # shape, which onnxruntime runs) stays the folded model's; any other is the fold's, a bug
        if _first_line(exc) != _checker_complaint(model):
            raise FoldError(f"the folded model is not valid ONNX (onnx.checker: {_first_line(exc)})") from None
    return out


def with_random_weights(model, *, seed: int = 0) -> onnx.ModelProto:
    """``model`` with every float weight (initializer or ``ConstantOfShape`` output) drawn at random.

    For models shipped without weights (onnx's light test models make theirs in-graph with
    ``ConstantOfShape``).  Tensors of rank >= 2 get ``normal(0, 1 / sqrt(fan_in))`` (fan_in the
    product of all but the first axis), vectors ``uniform(0.5, 1.5)`` (positive, so a
    BatchNorm variance stays valid); integer tensors (shapes) are kept.
    """
    model = _load(model)
    rng = np.random.default_rng(seed)
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}

    def draw(shape, dtype):
        if len(shape) >= 2:
            return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(dtype)
        return rng.uniform(0.5, 1.5, shape).astype(dtype)

    shapes_of = {n.input[0] for n in model.graph.node if n.op_type == "ConstantOfShape"}
    inits = []
    for name, value in values.items():
        if name in shapes_of:
            continue
        inits.append(numpy_helper.from_array(draw(value.shape, value.dtype) if value.dtype.kind == "f" else value,
                                             name))
    nodes = []
    for node in model.graph.node:
        if node.op_type == "ConstantOfShape" and node.input[0] in shapes_of:
            fill = _attrs(node).get("value")
            dtype = numpy_helper.to_array(fill).dtype if fill is not None else np.float32
            inits.append(numpy_helper.from_array(draw(tuple(values[node.input[0]].tolist()), dtype), node.output[0]))
        else:
            nodes.append(node)
    g = model.graph
    made = {t.name for t in inits}
    inputs = [i for i in g.input if i.name not in shapes_of]
    for info in inputs:  # float weight vectors declared as inputs without a value
        dims = tuple(d.dim_value for d in info.type.tensor_type.shape.dim)
        dtype = helper.tensor_dtype_to_np_dtype(info.type.tensor_type.elem_type)
        if info.name not in made and len(dims) == 1 and np.dtype(dtype).kind == "f":
            inits.append(numpy_helper.from_array(draw(dims, dtype), info.name))
    graph = helper.make_graph(nodes, g.name, _declared(inputs, inits, model.ir_version), list(g.output), inits)
    return helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)


def with_constant_inputs(model, values: dict) -> onnx.ModelProto:
    """``model`` with the graph inputs named in ``values`` made initializers holding those arrays.

    For test models that feed weights as inputs (onnx's node test cases give ``Conv`` its ``W``
    that way): jfactor folds constant weights only.
    """
    model = _load(model)
    g = model.graph
    inits = list(g.initializer) + [numpy_helper.from_array(np.asarray(v), k) for k, v in values.items()]
    inputs = [i for i in g.input if i.name not in values]
    graph = helper.make_graph(list(g.node), g.name, _declared(inputs, inits, model.ir_version), list(g.output), inits)
    return helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)


def compare_outputs(original: onnx.ModelProto, folded: onnx.ModelProto, *, seed: int = 0, batch: int = 1,
                    strict: bool = False) -> dict:
    """Both models run by onnxruntime on one random input: the max abs and relative output difference.

    Symbolic axes get ``batch`` (the first) or 1; every data input is standard normal in its dtype
    (the result names the first).
    Where onnxruntime cannot run the original (an op or dtype it lacks, a size too small), or the
    original's output is not finite on that input and no initializer is, the result says why under
    ``skipped`` instead (with ``strict``, a :class:`ConfigError`).  A :class:`ConfigError` too where
    the original's output is not finite and initializers are (it names them), and a
    :class:`FoldError` where the original runs to a finite output and the folded model does not.
    """
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    feeds = {}
    for info in (i for i in original.graph.input if i.name not in {t.name for t in original.graph.initializer}):
        dims = [d.dim_value if d.HasField("dim_value") else (batch if k == 0 else 1)
                for k, d in enumerate(info.type.tensor_type.shape.dim)]
        dtype = helper.tensor_dtype_to_np_dtype(info.type.tensor_type.elem_type)
        feeds[info.name] = rng.standard_normal(dims).astype(dtype)  # every data input (before: the first alone)
    name, x = next(iter(feeds.items()))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    entry = {"input": name, "input_shape": list(x.shape), "dtype": str(x.dtype)}

    def run(model):
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return session.run(None, feeds)

    def skipped(why: str) -> dict:
        if strict:
            raise ConfigError(f"onnxruntime comparison: {why}")
        return {**entry, "skipped": why}

    try:
        before = run(original)
    except Exception as exc:  # noqa: BLE001  onnxruntime's own errors (an op or dtype it lacks, symbolic sizes)
        return skipped(f"onnxruntime cannot run the model on this input: {_first_line(exc)}")
    bad = sum(non_finite(a) for a in before)
    if bad:
        inits = _non_finite_names({t.name: numpy_helper.to_array(t) for t in original.graph.initializer})
        why = f"the model's output on a standard normal input of shape {list(x.shape)} has {bad} non-finite value(s)"
        if inits:
            raise ConfigError(f"{why}; non-finite initializers: {', '.join(map(repr, inits))}")
        return skipped(why)
    try:
        after = run(folded)
    except Exception as exc:  # noqa: BLE001  the original ran: the folded model must too
        raise FoldError(f"onnxruntime runs the model but not its folded version: {_first_line(exc)}") from None
    if sum(non_finite(a) for a in after):
        raise FoldError(f"the folded model's output is not finite where the model's is (input of shape "
                        f"{list(x.shape)}): a folded kernel overflows its dtype")
    shapes = [(a.shape, b.shape) for a, b in zip(before, after) if a.shape != b.shape]
    if shapes:
        raise FoldError(f"the folded model's output has shape {shapes[0][1]}, the model's {shapes[0][0]}")
    diff = max(float(np.abs(a.astype(np.float64) - b).max()) for a, b in zip(before, after))
    scale = max(float(np.abs(a).max()) for a in before)
    return {**entry, "max_abs_diff": diff, "rel_diff": diff / scale if scale else diff}


def fold_file(path, out_dir, *, cheaper_only: bool = False) -> dict:
    """Fold the ONNX model at ``path``; write ``out_dir/<model>.folded.onnx`` and ``summary.json``
    (``out_dir`` and its parents made where missing).

    Returns the summary: every segment's :class:`SegmentReport`, the MAC and parameter totals
    of the folded segments, and the onnxruntime comparison of both models on a random input.
    """
    from jfactor import rundir

    path, out_dir = Path(path), rundir.check_writable(out_dir)
    original = _load(path)
    try:
        folded, reports = fold_model(original, cheaper_only=cheaper_only)
    except StackError as exc:
        raise StackError(f"{path}: {exc}") from None
    target = out_dir / f"{path.stem}.folded.onnx"
    checked = _compared(path, original, folded)  # before anything is written: a failed check leaves nothing
    rundir.writable_dir(out_dir)
    rundir.write_with(target, lambda handle: handle.write(folded.SerializeToString()))
    done = [r for r in reports if r.folded]
    summary = {
        "model": str(path), "folded_model": str(target),
        "segments": [r.to_dict() for r in reports],
        "folded_segments": len(done),
        "macs": {"before": sum(r.macs["stack"] for r in done), "after": sum(r.macs["folded"] for r in done)},
        "params": {"before": sum(r.params["stack"] for r in done), "after": sum(r.params["folded"] for r in done)},
        "onnxruntime": checked,
    }
    rundir.write_json(out_dir / "summary.json", summary)
    return summary


def _compared(path: Path, original: onnx.ModelProto, folded: onnx.ModelProto) -> dict:
    try:
        return compare_outputs(original, folded)
    except (ConfigError, FoldError) as exc:
        raise type(exc)(f"{path}: {exc}") from None


_SHORT = {"BatchNormalization": "BN", "AveragePool": "AvgPool"}


def _compact(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def segment_table(summary: dict, title: str = ""):
    """A rich table of :func:`fold_file`'s summary: one row per linear segment (full reasons in the summary)."""
    from collections import Counter

    from rich.table import Table

    table = Table(title=title)
    for column in ("#", "layers merged", "in -> out", "one conv", "MACs", "params", "exact on", "cert.", "result"):
        table.add_column(column, justify="left" if column in ("layers merged", "result") else "right", no_wrap=True)

    def shape(dims):
        return "x".join(map(str, dims))

    def before_after(timing):
        return f"{_compact(timing['stack'])} -> {_compact(timing['folded'])}" if timing else ""

    for i, seg in enumerate(summary["segments"]):
        ops = " ".join(f"{n}x{_SHORT.get(op, op)}" if n > 1 else _SHORT.get(op, op)
                       for op, n in Counter(seg["ops"]).items())
        kernel = seg["kernel"]
        conv = f"{shape(kernel[:-2])} s{seg['stride'][0]}" if kernel else ""
        region = ("all" if seg["exact_region"] is None else "nowhere" if exact_nowhere(seg["exact_region"]) else
                  "[" + ", ".join(f"{a}:{b}" for a, b in seg["exact_region"]) + "]") if kernel else ""
        cert = ("" if not seg["certificate"] else "none" if seg["certificate"]["max_abs_diff"] is None
                else f"{seg['certificate']['max_abs_diff']:.0e}")
        result = seg["reason"] if seg["folded"] or not kernel else seg["reason"].split(" (")[0].replace(
            " spoils the borders", "")
        table.add_row(str(i), ops, f"{shape(seg['input_shape'])} -> {shape(seg['output_shape'])}", conv,
                      before_after(seg["macs"]), before_after(seg["params"]), region, cert, result)
    return table


__all__ = ["SegmentReport", "compare_outputs", "conv_node", "fold_file", "fold_model", "from_onnx", "segment_table",
           "to_onnx", "with_constant_inputs", "with_random_weights"]
