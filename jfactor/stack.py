"""A linear stack bound to an input shape: validation, shape inference and jitted apply."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jfactor import _checks
from jfactor._pytree import pytree_dataclass, set_field, static
from jfactor.errors import StackError
from jfactor.layers import Layer, Parallel, _layer_tuple, layer_programs, lower_sequence, sequence_out_shape
from jfactor.ops import conv

Shape = tuple[int, ...]


@pytree_dataclass
class Stack:
    """Layers applied in order to inputs of shape ``(N, *input_shape)``.

    Args:
      layers: a sequence of :class:`~jfactor.layers.Layer`.
      input_shape: ``(*spatial, C)``, e.g. ``(28, 28, 1)``; any number of spatial dims.

    Construction checks every layer against the shape reaching it and raises
    :class:`StackError` naming the first bad layer (``layers[i]``, or a nested path).
    """

    layers: tuple
    input_shape: tuple[int, ...] = static()

    def __post_init__(self):
        set_field(self, "layers", _layer_tuple(self.layers, "layers"))
        set_field(self, "input_shape", _checks.input_shape(self.input_shape))
        sequence_out_shape(self.layers, self.input_shape, "layers")

    @property
    def ndim(self) -> int:
        """Number of spatial dims."""
        return len(self.input_shape) - 1

    @property
    def in_channels(self) -> int:
        return self.input_shape[-1]

    @property
    def output_shape(self) -> Shape:
        """``(*spatial, C_out)`` of one output, inferred without running anything."""
        return sequence_out_shape(self.layers, self.input_shape, "layers")

    def shapes(self) -> list[tuple[Shape, Shape]]:
        """(input shape, output shape) of every top-level layer."""
        result, shape = [], self.input_shape
        for i, layer in enumerate(self.layers):
            out = layer.out_shape(shape, f"layers[{i}]")
            result.append((shape, out))
            shape = out
        return result

    @property
    def dtype(self):
        """Result dtype of the weights; None for a stack without weights (pools only)."""
        leaves = jax.tree_util.tree_leaves(self)
        return jnp.result_type(*leaves) if leaves else None

    def astype(self, dtype) -> Stack:
        """The same stack with every weight cast to ``dtype`` (a floating dtype: integer weights
        would fold truncated)."""
        dtype = _checks.floating(dtype, "Stack.astype: dtype")
        return jax.tree_util.tree_map(lambda a: a.astype(dtype), self)

    def with_input_shape(self, input_shape) -> Stack:
        """The same layers bound to another input shape (re-validated)."""
        return Stack(self.layers, tuple(input_shape))

    def lower(self, dtype=None) -> tuple:
        """The program (convs with explicit padding, and :class:`Parallel` nodes).

        ``dtype`` defaults to the weights' dtype, float64 for a stack without weights.
        """
        return lower_sequence(self.layers, self.input_shape, dtype or self.dtype or jnp.float64, "layers")

    def layer_programs(self, dtype) -> list[tuple]:
        """Each top-level layer's own program, in order (what :meth:`lower` joins); a refusal names
        ``layers[i] (kind)``."""
        return layer_programs(self.layers, self.input_shape, dtype, "layers")

    def num_params(self) -> int:
        return sum(layer.num_params(shape) for layer, (shape, _) in zip(self.layers, self.shapes()))

    def __call__(self, x):
        return apply(self, x)

    def __repr__(self) -> str:
        lines = [f"Stack(input_shape={self.input_shape}, layers=["]
        lines += [f"  {layer!r}," for layer in self.layers]
        return "\n".join(lines + ["])"])


def run_program(program, x):
    """Apply a lowered program to ``x`` (N, *spatial, C)."""
    for item in program:
        if isinstance(item, Parallel):
            outs = [run_program(branch, x) for branch in item.branches]
            x = sum(outs[1:], outs[0]) if item.merge == "sum" else jnp.concatenate(outs, axis=-1)
        else:
            x = conv(x, item.kernel, item.bias, strides=item.strides, dilation=item.dilation,
                     pads=item.padding, groups=item.groups)
    return x


def compute_dtype(stack: Stack, x):
    """Floating dtype to run ``stack`` on ``x`` in: the promotion of both (ints become float64)."""
    return _checks.floating_result(x.dtype, *(() if stack.dtype is None else (stack.dtype,)))


def check_input(stack: Stack, x) -> None:
    if tuple(x.shape[1:]) != stack.input_shape or x.ndim != len(stack.input_shape) + 1:
        raise StackError(
            f"input of shape {tuple(x.shape)} does not match the stack: expected "
            f"(N, {', '.join(map(str, stack.input_shape))}); bind another size with "
            "stack.with_input_shape(...)"
        )


@jax.jit
def apply(stack: Stack, x):
    """Apply ``stack`` to a batch ``x`` of shape (N, *input_shape) -> (N, *output_shape).

    Compiled once per stack structure, weight shapes and input shape and dtype.
    """
    x = jnp.asarray(x)
    check_input(stack, x)
    dtype = compute_dtype(stack, x)
    return run_program(stack.lower(dtype), x.astype(dtype))


__all__ = ["Stack", "Layer", "apply", "run_program"]
