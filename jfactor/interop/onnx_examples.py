"""Small ONNX models built with ``onnx.helper`` (nothing downloaded), for the examples, tests and experiments."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class _Builder:
    """Appends nodes and random float32 weights to one graph."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.count = [], [], 0

    def name(self, kind: str) -> str:
        self.count += 1
        return f"{kind}{self.count}"

    def weight(self, name: str, value) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int = 1, pad: int = 0) -> str:
        name = self.name("conv")
        w = self.weight(f"{name}.w", self.rng.standard_normal((cout, cin, k, k)) / np.sqrt(cin * k * k))
        self.nodes.append(helper.make_node("Conv", [x, w], [name], name=name, kernel_shape=[k, k],
                                           strides=[stride, stride], pads=[pad] * 4))
        return name

    def bn(self, x: str, channels: int) -> str:
        name = self.name("bn")
        params = [self.weight(f"{name}.{p}", self.rng.uniform(0.5, 1.5, channels) if p in ("scale", "var")
                              else 0.1 * self.rng.standard_normal(channels)) for p in ("scale", "bias", "mean", "var")]
        self.nodes.append(helper.make_node("BatchNormalization", [x, *params], [name], name=name, epsilon=1e-5))
        return name

    def op(self, kind: str, inputs: list[str], **attrs) -> str:
        name = self.name(kind.lower())
        self.nodes.append(helper.make_node(kind, inputs, [name], name=name, **attrs))
        return name


def repvgg(*, channels: int = 8, size: int = 32, seed: int = 0) -> onnx.ModelProto:
    """A RepVGG-style network on NCHW inputs ``(N, 3, size, size)``, float32, random weights.

    Three linear segments between ReLUs:

    1. ``3x3+BN + 1x1+BN`` summed (RepVGG's training-time block): folds into one 3x3;
    2. a stride-2 stage ``3x3/s2+BN + 1x1/s2+BN``, then ``AveragePool 2`` and a valid ``3x3+BN``:
       folds into one 8x8 conv of stride 4;
    3. two padded 3x3 convs in a row: the inner zero padding makes one conv differ at the
       borders, so it stays as it is.
    """
    b = _Builder(seed)
    x = "input"
    c = channels
    branches = [b.bn(b.conv(x, 3, c, 3, pad=1), c), b.bn(b.conv(x, 3, c, 1), c)]
    y = b.op("Relu", [b.op("Add", branches)])
    stage = [b.bn(b.conv(y, c, c, 3, stride=2, pad=1), c), b.bn(b.conv(y, c, c, 1, stride=2), c)]
    y = b.op("AveragePool", [b.op("Add", stage)], kernel_shape=[2, 2], strides=[2, 2])
    y = b.op("Relu", [b.bn(b.conv(y, c, c, 3), c)])
    y = b.conv(b.conv(y, c, c, 3, pad=1), c, 4, 3, pad=1)
    out = size // 4 - 2
    graph = helper.make_graph(
        b.nodes, "repvgg", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["N", 4, out, out])], b.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


__all__ = ["repvgg"]
