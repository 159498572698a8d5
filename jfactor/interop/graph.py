"""Dataflow graphs of layers (Keras functional models, ONNX graphs) -> stacks and linear segments.

A model is read as a topologically ordered list of :class:`Node`: each maps named input
tensors to one named output tensor, and is a jfactor layer (one input), a merge (``'sum'``
or ``'concat'`` of several inputs), or not linear (``layer`` and ``merge`` both None, with
the reason in ``why``).

- :func:`segments` finds every maximal *linear segment*: a set of linear nodes that reads
  one tensor and makes one tensor, with no tensor inside it used anywhere else.  A linear
  node that mixes two such inputs (a residual ``Add`` of two convolution chains, DenseNet's
  ``Concat``) is not one convolution of one input; it stays, and segments end and start
  at it.
- :func:`build_stack` turns the nodes of one segment into a :class:`~jfactor.stack.Stack`:
  a merge becomes a :class:`~jfactor.layers.Branches` layer whose branches start at the
  nearest tensor every merged input depends on only through it (its dominator).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

from jfactor.errors import StackError
from jfactor.layers import Branches, Identity, Layer
from jfactor.stack import Stack


@dataclasses.dataclass(frozen=True)
class Node:
    """One operation: ``output = op(*inputs)``; ``layer`` (one input) or ``merge`` (several), else not linear."""

    name: str
    inputs: tuple[str, ...]
    output: str
    layer: Layer | None = None
    merge: str | None = None
    why: str = ""

    @property
    def linear(self) -> bool:
        return self.layer is not None or self.merge is not None


@dataclasses.dataclass(frozen=True)
class Segment:
    """A maximal linear segment: ``nodes`` (names, in graph order) map tensor ``source`` to ``sink``.

    ``positions``: where the reader knows them, the indices in the model's layer list of the
    nodes that are in it, in order (a Keras ``keras.ops`` call is a node but not a layer).
    """

    nodes: tuple[str, ...]
    source: str
    sink: str
    positions: tuple[int, ...] = ()


def segments(nodes: list[Node], outputs) -> list[Segment]:
    """Every maximal linear segment of ``nodes`` (topologically ordered), in graph order of its sink.

    ``outputs`` are the graph's output tensors (they end a segment).  A linear node whose
    output depends on two tensors made outside linear runs belongs to none.
    """
    linear = [n for n in nodes if n.linear]
    made_by = {n.output: n for n in linear}
    order = {n.output: i for i, n in enumerate(linear)}
    users = defaultdict(list)
    for n in nodes:
        for t in n.inputs:
            users[t].append(n)
    outputs = set(outputs)
    boundary: set[str] = set()  # linear tensors a segment may start from
    while True:
        sources = {}
        for n in linear:
            found = set()
            for t in n.inputs:
                found |= sources[t] if t in made_by and t not in boundary else {t}
            sources[n.output] = found
        mixed = {t for t, s in sources.items() if len(s) > 1}
        if not mixed <= boundary:
            boundary |= mixed
            continue
        exits = [t for t, s in sources.items() if t not in mixed and (
            t in outputs or t in boundary or any(not u.linear or u.output in mixed for u in users[t]))]
        # an exit that linear nodes read on: the segment after it starts there, rather than both
        # segments' nodes before it being cut apart as shared
        inner = {t for t in exits if t not in boundary and any(u.linear and u.output not in mixed for u in users[t])}
        if inner:
            boundary |= inner
            continue
        cones, owner, shared = {}, {}, set()
        for e in exits:
            cone, todo = [], [e]
            while todo:
                t = todo.pop()
                if t in cone:
                    continue
                cone.append(t)
                if t in owner and owner[t] != e:
                    shared.add(t)
                owner.setdefault(t, e)
                todo += [i for i in made_by[t].inputs if i in made_by and i not in boundary]
            cones[e] = cone
        if not shared:
            break
        boundary |= shared
    return [Segment(tuple(made_by[t].name for t in sorted(cones[e], key=order.get)), next(iter(sources[e])), e)
            for e in sorted(exits, key=order.get)]


def build_stack(nodes: list[Node], source: str, sink: str, input_shape) -> Stack:
    """The stack computing tensor ``sink`` from tensor ``source`` through ``nodes`` (all linear).

    Raises:
      StackError: naming the node at fault (a layer that does not fit the shape reaching it,
        or merged inputs of different shapes).
    """
    made_by = {n.output: n for n in nodes}
    rank = {n.output: i for i, n in enumerate(nodes)}
    rank[source] = -1
    dominators = {source: {source}}
    for n in nodes:
        common = set.intersection(*(dominators[t] for t in n.inputs))
        dominators[n.output] = common | {n.output}

    def chain(start: str, end: str) -> list:
        layers = []
        while end != start:
            node = made_by[end]
            if node.layer is not None:
                layers.append(node.layer)
                end = node.inputs[0]
                continue
            split = max(set.intersection(*(dominators[t] for t in node.inputs)), key=rank.get)
            branches = [chain(split, t) or [Identity()] for t in node.inputs]
            layers.append(Branches(branches, node.merge))
            end = split
        return layers[::-1]

    layers = chain(source, sink)
    names = _layer_names(source, sink, made_by)
    try:
        return Stack(layers or [Identity()], tuple(input_shape))
    except StackError as exc:
        raise StackError(f"segment {' -> '.join(names)}: {exc}") from None


def _layer_names(source: str, sink: str, made_by: dict) -> list[str]:
    seen, todo = [], [sink]
    while todo:
        t = todo.pop()
        if t == source or t not in made_by or made_by[t].name in seen:
            continue
        seen.append(made_by[t].name)
        todo += made_by[t].inputs
    return seen[::-1]


__all__ = ["Node", "Segment", "build_stack", "segments"]
