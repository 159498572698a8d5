"""Validation and normalisation of user-given sizes, paddings and arrays.

Every function takes ``where``, the name of the thing being checked (a layer path
such as ``layers[2] (conv)``), and raises :class:`~jfactor.errors.StackError` with it.
"""

from __future__ import annotations

import math
import numbers
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jfactor.errors import ConfigError, StackError

Padding = str | tuple[tuple[int, int], ...]

MAX_SPATIAL_DIMS = 3
"""The most spatial dims a target may have: the output metric filters natural images, which
:func:`jfactor.factorize.objectives.load_images` gives in 1, 2 or 3 dims."""


def repeated(items) -> list:
    """The items that occur more than once in ``items``, sorted (each once)."""
    return sorted(item for item, count in Counter(items).items() if count > 1)


def assignments(items, flag: str, form: str) -> list[tuple[str, str]]:
    """The ``key=value`` texts of a repeatable flag (``--set``, ``--param``) as (key, value text)
    pairs, keys stripped; a :class:`ConfigError` names ``flag`` where one has no ``=`` (``form``
    says what it should be) or a key comes twice."""
    pairs = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{flag} {item!r}: expected {form}")
        key, text = item.split("=", 1)
        pairs.append((key.strip(), text))
    twice = repeated(key for key, _ in pairs)
    if twice:
        raise ConfigError(f"{flag} {', '.join(twice)}: given twice")
    return pairs


def floating(dtype, where: str):
    """``dtype`` as a dtype if it is a real floating one (bfloat16 too); a :class:`ConfigError`
    naming ``where`` otherwise (``where`` says whose dtype it is)."""
    try:
        dtype = jnp.dtype(dtype)
    except TypeError:
        raise ConfigError(f"{where}: {dtype!r} is not a dtype; use float32 or float64") from None
    if not jnp.issubdtype(dtype, jnp.floating):
        why = ("integer weights would be truncated" if jnp.issubdtype(dtype, jnp.integer) or dtype == jnp.dtype(bool)
               else "jfactor works with real floating weights")
        raise ConfigError(f"{where} must be a floating dtype (float64, float32, float16 or bfloat16), got "
                          f"{dtype}: {why}")
    return dtype


def given_path(text) -> Path:
    """``text`` (a string or a path) as a :class:`~pathlib.Path`; a :class:`ConfigError` where it is
    empty (an unset shell variable, say), which would otherwise mean the current directory."""
    if not str(text).strip():
        raise ConfigError("an empty path; give a directory (. for the current one)")
    return Path(text)


def non_finite(array) -> int:
    """How many entries of a concrete array are NaN or infinite."""
    array = np.asarray(array)
    return int(array.size - np.isfinite(array).sum())


def is_int(value) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_real(value) -> bool:
    """A real number (Python or numpy, NaN and inf included), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def positive_ints(value, name: str, where: str) -> int | tuple[int, ...]:
    """An int >= 1, or a non-empty sequence of them (returned as a tuple)."""
    if is_int(value):
        if value < 1:
            raise StackError(f"{where}: {name} must be a positive integer, got {value!r}")
        return int(value)
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) > 0:
        if all(is_int(v) and v >= 1 for v in value):
            return tuple(int(v) for v in value)
    raise StackError(
        f"{where}: {name} must be a positive integer or a list of them, got {value!r}"
    )


def expand(value: int | tuple[int, ...], ndim: int, name: str, where: str) -> tuple[int, ...]:
    """Broadcast an int to ``ndim`` entries; check a tuple has exactly ``ndim``."""
    if isinstance(value, int):
        return (value,) * ndim
    if len(value) != ndim:
        raise StackError(
            f"{where}: {name} {list(value)} has {len(value)} entries for a {ndim}-D input"
        )
    return tuple(value)


def padding_spec(value, where: str):
    """Normalise a padding spec: 'valid', 'same', an int, or per-dim ints / (lo, hi) pairs."""
    if isinstance(value, str):
        if value.lower() in ("valid", "same"):
            return value.lower()
        raise StackError(f"{where}: padding must be 'valid', 'same', an int or per-dim pairs, got {value!r}")
    if is_int(value):
        return int(value)
    if isinstance(value, Sequence) and len(value) > 0:
        entries = []
        for entry in value:
            if is_int(entry):
                entries.append((int(entry), int(entry)))
            elif (isinstance(entry, Sequence) and len(entry) == 2
                  and all(is_int(v) for v in entry)):
                entries.append((int(entry[0]), int(entry[1])))
            else:
                break
        else:
            return tuple(entries)
    raise StackError(
        f"{where}: padding must be 'valid', 'same', an int, or a list of ints or "
        f"[low, high] pairs per spatial dim, got {value!r}"
    )


def resolve_padding(
    padding, in_spatial: tuple[int, ...], extent: tuple[int, ...], strides: tuple[int, ...], where: str
) -> tuple[tuple[int, int], ...]:
    """Explicit (low, high) pads per dim; 'same' follows TF/Keras (extra pad goes high)."""
    ndim = len(in_spatial)
    if padding == "valid":
        return ((0, 0),) * ndim
    if padding == "same":
        pads = []
        for n, e, s in zip(in_spatial, extent, strides):
            total = max((-(-n // s) - 1) * s + e - n, 0)
            pads.append((total // 2, total - total // 2))
        return tuple(pads)
    if isinstance(padding, int):
        return ((padding, padding),) * ndim
    if len(padding) != ndim:
        raise StackError(
            f"{where}: padding {[list(p) for p in padding]} has {len(padding)} entries for a {ndim}-D input"
        )
    return tuple(padding)


def window_out_spatial(
    in_spatial: tuple[int, ...],
    extent: tuple[int, ...],
    strides: tuple[int, ...],
    pads: tuple[tuple[int, int], ...],
    where: str,
    what: str = "kernel",
) -> tuple[int, ...]:
    """Output size of a valid window of ``extent`` sliding with ``strides`` over padded input."""
    out = []
    for dim, (n, e, s, (lo, hi)) in enumerate(zip(in_spatial, extent, strides, pads)):
        padded = n + lo + hi
        if e > padded:
            raise StackError(
                f"{where}: {what} extent {e} is larger than its (padded) input {padded} in "
                f"spatial dim {dim}; the input is too small for the stack up to this layer"
            )
        out.append((padded - e) // s + 1)
    return tuple(out)


def floating_result(*dtypes):
    """The dtype arrays of ``dtypes`` compute in together: their promotion, float64 where that is not floating."""
    dtype = jnp.result_type(*dtypes)
    return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.dtype(jnp.float64)


def is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def as_weight(value, name: str, where: str, ndim: int | None = None) -> jax.Array:
    """A floating jax array; integer/bool input becomes float64.  Concrete values must be finite."""
    if value is None:
        raise StackError(f"{where}: {name} is missing")
    if isinstance(value, (str, bytes)):
        raise StackError(f"{where}: {name} must be an array, got the string {value!r}; "
                         "load files with jfactor.weights.load")
    try:
        array = jnp.asarray(value)
    except (TypeError, ValueError) as exc:
        raise StackError(f"{where}: {name} is not an array: {exc}") from exc
    if not jnp.issubdtype(array.dtype, jnp.floating):
        if jnp.issubdtype(array.dtype, jnp.complexfloating):
            raise StackError(f"{where}: {name} is complex; jfactor works with real kernels")
        array = array.astype(jnp.float64)
    if ndim is not None and array.ndim != ndim:
        raise StackError(f"{where}: {name} must have {ndim} dims, got shape {tuple(array.shape)}")
    if array.size == 0:
        raise StackError(f"{where}: {name} is empty (shape {tuple(array.shape)})")
    if is_concrete(array) and (bad := non_finite(array)):
        raise StackError(f"{where}: {name} has {bad} non-finite value(s) (NaN or inf)")
    return array


def input_shape(value, where: str = "input_shape") -> tuple[int, ...]:
    """(*spatial, channels) with 1-3+ spatial dims, all positive."""
    shape = positive_ints(value, "input_shape", where)
    if isinstance(shape, int) or len(shape) < 2:
        raise StackError(
            f"{where}: input_shape must list the spatial sizes then the channels, "
            f"e.g. [28, 28, 1]; got {value!r}"
        )
    return shape


def prod(values) -> int:
    return math.prod(values)
