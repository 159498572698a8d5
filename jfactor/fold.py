"""Fold a stack into one convolution, certify it, and give its canonical form.

``fold_conv(stack)`` is the one convolution alone: a pure function of the weights that
works under ``jax.jit``, ``jax.grad`` and ``jax.vmap`` (train through it, deploy its
result).  ``fold(stack)`` returns a :class:`Folded` holding

- ``conv``: one :class:`~jfactor.layers.Conv` (kernel, bias, stride, explicit padding,
  groups where they survive) with ``Stack([conv]) == stack`` on ``exact_region``;
- ``exact_region``: None when exact everywhere, else the half-open output box outside
  which zero padding between layers makes the two differ;
- ``certificate``: the difference measured in float64 on a random probe;
- ``canonical``: the same map as stride-1 convolutions dilated by the accumulated
  stride, then one AvgPool(S) (when every stride comes from a non-overlapping average
  pool) or Subsample(S);
- costs: receptive field, stride, offset, params and multiply-adds of all three forms.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jfactor import analysis
from jfactor._checks import is_int, non_finite
from jfactor.errors import FoldError
from jfactor.layers import AvgPool, Conv, Identity, Parallel, Subsample
from jfactor.memory import check_bytes
from jfactor.ops import Affine, affine_from_conv, compose, concat, pads_for, parallel_sum, regroup
from jfactor.stack import Stack, apply


def fold_program(program, where: str = "layers", *, compose_fn=compose, lift=lambda f: f) -> Affine:
    """The single affine map of a lowered program (see :mod:`jfactor.layers`).

    ``compose_fn`` and ``lift`` let :mod:`jfactor.batch` reuse this walk for weights with a
    batch axis: ``lift=jax.vmap`` maps the per-item rules, ``compose_fn`` is a batched
    composition.
    """
    result = None
    for item in program:
        if isinstance(item, Parallel):
            parts = [fold_program(branch, where, compose_fn=compose_fn, lift=lift) for branch in item.branches]
            merge = parallel_sum if item.merge == "sum" else concat
            affine = lift(functools.partial(merge, where=where))(parts)
        else:
            leaf = functools.partial(affine_from_conv, strides=item.strides, dilation=item.dilation,
                                     pads=item.padding, groups=item.groups)
            affine = lift(leaf)(item.kernel, item.bias)
        result = affine if result is None else compose_fn(result, affine)
    return result


def fold_layers(layers, programs, *, compose_fn=compose, lift=lambda f: f) -> Affine:
    """Compose the folded programs of top-level ``layers``; errors name ``layers[i] (kind)``."""
    parts = [fold_program(program, f"layers[{i}] ({layer.kind})", compose_fn=compose_fn, lift=lift)
             for i, (layer, program) in enumerate(zip(layers, programs))]
    return functools.reduce(compose_fn, parts)


def fold_affine(stack: Stack, dtype=None) -> Affine:
    """The infinite-grid map of ``stack``, computed in ``dtype`` (default: the stack's).

    One jitted computation per stack structure: repeated folds of one structure with
    other weights do not compile again.
    """
    return _fold_affine(stack, jnp.dtype(dtype or stack.dtype or jnp.float64))


@functools.partial(jax.jit, static_argnums=1)
def _fold_affine(stack: Stack, dtype) -> Affine:
    return fold_layers(stack.layers, stack.layer_programs(dtype))


def conv_from_affine(affine: Affine, in_shape, out_shape, *, bias: bool = True) -> Conv:
    """The padded, strided, grouped conv equal to ``affine`` between these shapes.

    ``bias=False`` drops the bias (for stacks with no bias anywhere, where it is zero).
    """
    pads = pads_for(affine, tuple(in_shape[:-1]), tuple(out_shape[:-1]))
    kernel = regroup(affine.kernel, affine.groups)
    for name, values in (("kernel", kernel), ("bias", affine.bias if bias else None)):
        # the layers are finite, so a non-finite fold is an overflow
        if values is not None and not isinstance(values, jax.core.Tracer) and (bad := non_finite(values)):
            raise FoldError(f"the folded {name} has {bad} non-finite value(s): the layers' weights "
                            f"overflow {values.dtype} when composed; scale them down")
    return Conv(kernel, affine.bias if bias else None, affine.stride, 1, pads, affine.groups)


def has_bias(program) -> bool:
    """Whether any convolution of a lowered program adds a bias."""
    for item in program:
        if isinstance(item, Parallel):
            if any(has_bias(branch) for branch in item.branches):
                return True
        elif item.bias is not None:
            return True
    return False


@dataclasses.dataclass(frozen=True)
class Certificate:
    """Stack vs folded conv on a random float64 probe of shape ``probe_shape``.

    ``max_abs_diff`` and ``rel_diff`` (max abs diff / max abs output) are measured on
    the exact region (None when it is empty: nothing is certified, so nothing reads as exact);
    ``outside_max_abs_diff`` on the rest (None when there is none).
    """

    max_abs_diff: float | None
    rel_diff: float | None
    dtype: str
    probe_shape: tuple[int, ...]
    positions_checked: int
    outside_max_abs_diff: float | None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def certified(certificate: dict, relative: bool = False) -> str:
    """A certificate (:meth:`Certificate.to_dict`) in a few words: its max abs diff (with
    ``relative``, to four digits and with the relative difference), or that it is empty."""
    if certificate["max_abs_diff"] is None:
        return "none: no output position is exact, so nothing is certified"
    if relative:
        return f"max abs diff {certificate['max_abs_diff']:.3e}, relative {certificate['rel_diff']:.3e}"
    return f"max abs diff {certificate['max_abs_diff']:.2e} ({certificate['dtype']})"


@dataclasses.dataclass(frozen=True)
class Canonical:
    """Stride-1 convs dilated by the accumulated stride, then ``final`` (AvgPool/Subsample).

    ``stack`` applies it (the first conv carries the folded padding); ``max_abs_diff`` is
    its measured difference from the folded conv on the certificate's probe.
    """

    stack: Stack
    final: str | None
    stride: tuple[int, ...]
    max_abs_diff: float

    @property
    def chain(self) -> tuple[Conv, ...]:
        return tuple(layer for layer in self.stack.layers if isinstance(layer, Conv))

    def describe(self) -> str:
        parts = [
            "x".join(map(str, c.size)) + (f" d{_fmt(c.dilation)}" if any(d > 1 for d in c.dilation) else "")
            for c in self.chain
        ]
        if self.final:
            parts.append(f"{'AvgPool' if self.final == 'avg_pool' else 'Subsample'}({_fmt(self.stride)})")
        return " -> ".join(parts)

    def to_dict(self) -> dict:
        return {
            "chain": [
                {"kernel_size": list(c.size), "dilation": list(c.dilation), "in_channels": c.in_channels,
                 "out_channels": c.out_channels, "groups": c.groups}
                for c in self.chain
            ],
            "final": self.final,
            "stride": list(self.stride),
            "description": self.describe(),
            "max_abs_diff": self.max_abs_diff,
        }


def _fmt(values) -> str:
    return str(values[0]) if len(set(values)) == 1 else "x".join(map(str, values))


@dataclasses.dataclass(frozen=True)
class Folded:
    """Result of :func:`fold`; see the module docstring."""

    conv: Conv
    affine: Affine
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    exact_region: tuple[tuple[int, int], ...] | None
    certificate: Certificate
    canonical: Canonical
    params: dict
    macs: dict
    layers: list

    @property
    def receptive_field(self) -> tuple[int, ...]:
        return self.affine.size

    @property
    def stride(self) -> tuple[int, ...]:
        return self.affine.stride

    @property
    def offset(self) -> tuple[int, ...]:
        """Input position of the kernel's first tap for output 0 (minus the low padding)."""
        return self.affine.offset

    @property
    def exact(self) -> bool:
        return self.exact_region is None

    def to_dict(self) -> dict:
        conv = self.conv
        return {
            "input_shape": list(self.input_shape),
            "output_shape": list(self.output_shape),
            "kernel_shape": list(conv.kernel.shape),
            "stride": list(conv.strides),
            "padding": [list(p) for p in conv.padding],
            "groups": conv.groups,
            "receptive_field": list(self.receptive_field),
            "offset": list(self.offset),
            "exact_region": None if self.exact_region is None else [list(r) for r in self.exact_region],
            "exact_everywhere": self.exact,
            "certificate": self.certificate.to_dict(),
            "canonical": self.canonical.to_dict(),
            "params": self.params,
            "macs": self.macs,
            "layers": self.layers,
        }


# Per spatial dim, inputs longer than this are certified on a shorter probe (see probe_input_shape).
PROBE_LENGTH = 64


def probe_input_shape(input_shape, stride, receptive_field, length: int = PROBE_LENGTH) -> tuple[int, ...]:
    """The input shape ``(*spatial, C)`` the certificate probes: ``input_shape`` where each
    spatial length is at most ``max(length, 4 (receptive field + stride))``, else the shortest
    length past that bound congruent to the input's modulo the total stride.

    Every layer's padding and cropping depends on its input length only modulo the stride
    accumulated before it, so a probe congruent modulo the total stride has the same left
    and right borders (each at most a receptive field wide) and the same interior as the
    real input: the certificate checks every kind of output position while its memory and
    time stay bounded for large inputs (and it no longer runs float64 convolutions of the
    full input size, where XLA's CPU backend has crashed; DESIGN.md 5).
    """
    spatial = []
    for n, s, r in zip(input_shape[:-1], stride, receptive_field):
        bound = max(length, 4 * (r + s))
        spatial.append(n if n <= bound else bound + (n - bound) % s)
    return tuple(spatial) + (input_shape[-1],)


# float64 copies of the largest layer output that the certificate's run holds at its peak (the
# stack, its folded convolution and its canonical chain, each with padded inputs): one 3x3
# convolution with padding 3,000 on a 28x28 input peaked at 7.3 of them on XLA's CPU backend
PROBE_COPIES = 8


def _check_probe_memory(probe_stack: Stack, batch: int) -> None:
    """A :class:`~jfactor.errors.ConfigError` before any compute where the certificate's float64
    run of ``probe_stack`` (``batch`` probes) would pass the memory budget (:data:`PROBE_COPIES`
    of its largest layer output); it names that layer (a large padding grows every output from
    there on)."""
    outputs = [out for _, out in probe_stack.shapes()]
    widest = int(np.argmax([math.prod(out) for out in outputs]))
    check_bytes(PROBE_COPIES * 8 * batch * math.prod(outputs[widest]),
                f"layers[{widest}]: the certificate's probe run (that layer's output {outputs[widest]} "
                f"on a {probe_stack.input_shape} probe)", "reduce the padding, the channels or the input size")


def _probe(shape, seed: int):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float64)


def _region_mask(region, out_shape):
    mask = np.ones(out_shape, bool)
    if region is not None:
        mask[...] = False
        mask[tuple(slice(a, b) for a, b in region) + (slice(None),)] = True
    return mask


@jax.jit
def _outputs(stacks, x):
    """Each stack of ``stacks`` applied to ``x`` in float64, in one compiled call."""
    return [apply(stack.astype(jnp.float64), x) for stack in stacks]


def _certificate(y_stack, y_conv, region, probe_shape) -> Certificate:
    diff = np.abs(y_stack - y_conv)
    mask = np.broadcast_to(_region_mask(region, y_stack.shape[1:]), y_stack.shape)
    inside = diff[mask]
    max_abs = float(inside.max()) if inside.size else None
    scale = float(np.abs(y_stack[mask]).max()) if inside.size else 0.0
    outside = diff[~mask]
    return Certificate(
        max_abs_diff=max_abs,
        rel_diff=None if max_abs is None else max_abs / scale if scale > 0 else max_abs,
        dtype="float64",
        probe_shape=probe_shape,
        positions_checked=int(inside.size),
        outside_max_abs_diff=float(outside.max()) if region is not None and outside.size else None,
    )


def _is_block_pool(layer, ndim: int) -> bool:
    """A non-overlapping average pool: strides equal to the pool size."""
    if type(layer) is not AvgPool:
        return False
    expand = lambda v: (v,) * ndim if isinstance(v, int) else tuple(v)  # noqa: E731
    return expand(layer.strides) == expand(layer.pool_size)


def _gathers_into_avg_pool(stack: Stack, strides: list[tuple[int, ...]]) -> bool:
    """True when every stride comes from a non-overlapping average pool (and there is one)."""
    strided = [layer for layer, stride in zip(stack.layers, strides) if any(s != 1 for s in stride)]
    return bool(strided) and all(_is_block_pool(layer, stack.ndim) for layer in strided)


def canonical_form(stack: Stack, pads, dtype) -> tuple[list, str | None, tuple[int, ...]]:
    """Elements of the dilated stride-1 chain, the final op and the total stride."""
    ndim = stack.ndim
    accumulated = (1,) * ndim
    elements, strides = [], []
    for layer, (shape, _), program in zip(stack.layers, stack.shapes(), stack.layer_programs(dtype)):
        if len(program) == 1 and not isinstance(program[0], Parallel):
            c = program[0]
            stride = c.strides
            dilation = tuple(d * a for d, a in zip(c.dilation, accumulated))
            element = Conv(c.kernel, c.bias, 1, dilation, "valid", c.groups)
        else:
            affine = fold_affine(Stack([layer], shape), dtype)
            stride = affine.stride
            element = Conv(regroup(affine.kernel, affine.groups), affine.bias, 1, accumulated, "valid",
                           affine.groups)
        strides.append(stride)
        if not isinstance(layer, (Identity, Subsample)):
            elements.append((layer, element))
        accumulated = tuple(a * s for a, s in zip(accumulated, stride))
    gather = _gathers_into_avg_pool(stack, strides)
    chain = [c for layer, c in elements if not (gather and _is_block_pool(layer, ndim))]
    if chain:
        first = chain[0]
        chain[0] = Conv(first.kernel, first.bias, 1, first.dilation, pads, first.groups)
    final = None
    if gather:
        final = "avg_pool"
        chain.append(AvgPool(accumulated))
    elif any(a != 1 for a in accumulated):
        final = "subsample"
        chain.append(Subsample(accumulated))
    return chain or [Identity()], final, accumulated


def _layer_rows(stack: Stack, dtype) -> list[dict]:
    rows = []
    for i, (layer, (shape, out), program) in enumerate(zip(stack.layers, stack.shapes(), stack.layer_programs(dtype))):
        rows.append({
            "index": i,
            "kind": layer.kind,
            "description": layer.describe(),
            "in_shape": list(shape),
            "out_shape": list(out),
            "params": layer.num_params(shape),
            "macs": analysis.program_macs(program, shape[:-1]),
        })
    return rows


def _check_stack(stack, function: str) -> None:
    if not isinstance(stack, Stack):
        raise FoldError(f"{function} takes a jfactor.Stack (jfactor.Stack(layers, input_shape)), "
                        f"got {type(stack).__name__}")


def fold_conv(stack: Stack) -> Conv:
    """The one :class:`~jfactor.layers.Conv` equal to ``stack`` (on ``fold(stack).exact_region``).

    Pure and traceable: ``jax.jit``, ``jax.grad`` (gradients flow to every weight of the
    stack, BatchNorm statistics included) and ``jax.vmap`` over stacks whose weights carry
    a batch axis.  Kernel ``(*K, C_in // groups, C_out)``, bias ``(C_out,)`` (None when no
    layer adds one), in the stack's dtype.  For thousands of stacks prefer
    :func:`jfactor.batch.fold_batch`: ``vmap`` over a convolution's kernel is a grouped
    convolution, quadratic in the batch on CPU.
    """
    _check_stack(stack, "fold_conv")
    dtype = stack.dtype or jnp.float64
    affine = fold_affine(stack, dtype)
    return conv_from_affine(affine, stack.input_shape, stack.output_shape, bias=has_bias(stack.lower(dtype)))


def fold(stack: Stack, *, seed: int = 0, probe_batch: int = 2) -> Folded:
    """Fold ``stack`` into one convolution; see the module docstring for what comes back.

    The fold runs in the stack's dtype; the certificate re-applies both in float64, so a
    float32 fold is certified to float32 rounding.  Under ``jax.jit``, ``jax.grad`` or
    ``jax.vmap`` use :func:`fold_conv` (the certificate needs concrete weights).
    """
    _check_stack(stack, "fold")
    for name, value, least in (("seed", seed, 0), ("probe_batch", probe_batch, 1)):
        if not is_int(value) or value < least:
            raise FoldError(f"fold: {name} must be an integer >= {least}, got {value!r}")
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(stack)):
        raise FoldError("fold certifies with concrete float64 weights and cannot run under jax.jit, jax.grad or "
                        "jax.vmap; use jfactor.fold_conv(stack) there")
    dtype = stack.dtype or jnp.float64
    conv = fold_conv(stack)
    affine = affine_from_conv(conv.kernel, conv.bias, strides=conv.strides, dilation=conv.dilation,
                              pads=conv.padding, groups=conv.groups)
    program = stack.lower(dtype)
    region = analysis.exact_region(program, stack.input_shape[:-1])
    chain, final, stride = canonical_form(stack, conv.padding, dtype)
    canonical_stack = Stack(chain, stack.input_shape)
    folded_stack = Stack([conv], stack.input_shape)

    probe_shape = probe_input_shape(stack.input_shape, affine.stride, affine.size)
    probe_stack = Stack(stack.layers, probe_shape)
    _check_probe_memory(probe_stack, probe_batch)
    probe_conv = conv_from_affine(affine, probe_shape, probe_stack.output_shape, bias=has_bias(program))
    probe_chain, _, _ = canonical_form(probe_stack, probe_conv.padding, dtype)
    x = _probe((probe_batch,) + probe_shape, seed)
    y_stack, y_conv, y_canonical = map(
        np.asarray, _outputs([probe_stack, Stack([probe_conv], probe_shape), Stack(probe_chain, probe_shape)], x))
    probe_region = analysis.exact_region(probe_stack.lower(dtype), probe_shape[:-1])
    certificate = _certificate(y_stack, y_conv, probe_region, tuple(x.shape))
    canonical = Canonical(canonical_stack, final, stride, float(np.abs(y_canonical - y_conv).max()))

    spatial = stack.input_shape[:-1]
    params = {
        "stack": stack.num_params(),
        "folded": folded_stack.num_params(),
        "canonical": canonical_stack.num_params(),
    }
    macs = {
        "stack": analysis.program_macs(program, spatial),
        "folded": analysis.program_macs(folded_stack.lower(dtype), spatial),
        "canonical": analysis.program_macs(canonical_stack.lower(dtype), spatial),
    }
    return Folded(conv, affine, stack.input_shape, stack.output_shape, region, certificate,
                  canonical, params, macs, _layer_rows(stack, dtype))


__all__ = ["fold", "fold_affine", "fold_conv", "fold_program", "Folded", "Certificate", "Canonical"]
