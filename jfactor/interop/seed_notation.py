"""Keras functional-API lines -> :class:`~jfactor.stack.Stack`: the seed document's notation.

.. code-block:: python

    x = Input(shape=(28, 28, 1))
    x = Conv2D(1, (3, 3), padding="valid", strides=2)(x)
    x = AveragePooling2D((2, 2))(x)   # a comment

The text is read with :mod:`ast` and :func:`ast.literal_eval`, never run.  Accepted:
``Input(shape=...)`` (or ``Input((...))``), ``Conv1D``/``Conv2D``/``Conv3D`` (also
``Convolution*D``) with ``filters, kernel_size, strides, padding ('valid', 'same', and
'causal' for Conv1D), dilation_rate, groups, use_bias, activation (None or 'linear'),
data_format ('channels_last'), name``, and ``AveragePooling1D/2D/3D`` (also
``AvgPool*D``) with ``pool_size, strides (default: pool_size), padding ('valid'),
data_format, name``; a dotted prefix (``layers.Conv2D``) is fine.  Blank lines,
comments, ``import`` lines, bare ``python`` lines (the seed's code-block markers) and
``-----`` separator lines are skipped.  Each layer must apply to the tensor the line
before it made: one chain, no branches.

Keras lines carry no weights.  Kernels are drawn by ``init`` (a
:data:`jfactor.weights.INITS` name) from ``numpy.random.default_rng(seed + i)``, ``i``
the conv's position among the model's convs: ``'normal'`` has std ``1/sqrt(fan_in)``,
the YAML configs' default (same kernels); ``'randint'`` is the seed's
``np.random.randint(0, 2, ...)``.  ``use_bias`` defaults to True as in Keras, with
Keras' zero bias.  Weights are float64.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import textwrap
from pathlib import Path

from jfactor import _checks, weights
from jfactor.errors import ConfigError, StackError
from jfactor.layers import AvgPool, Conv
from jfactor.stack import Stack
from jfactor.stack_config import load_stack

Shape = tuple[int, ...]

SEPARATOR = re.compile(r"^\s*-{3,}\s*$")
CONV = re.compile(r"^Conv(olution)?([123])D$")
POOL = re.compile(r"^(AveragePooling|AvgPool)([123])D$")
NOT_LINEAR = re.compile(
    r"^((Global)?Max(Pooling|Pool)[123]D|Activation|ReLU|LeakyReLU|PReLU|ELU|Softmax|ThresholdedReLU)$"
)


def _conv_arguments(filters, kernel_size, strides=1, padding="valid", data_format=None,
                    dilation_rate=1, groups=1, activation=None, use_bias=True, name=None):
    """Keras' Conv*D signature, as far as jfactor reads it."""


def _pool_arguments(pool_size=2, strides=None, padding="valid", data_format=None, name=None):
    """Keras' AveragePooling*D signature, as far as jfactor reads it."""


def _input_arguments(shape=None, batch_size=None, name=None):
    """Keras' Input signature, as far as jfactor reads it."""


@dataclasses.dataclass(frozen=True)
class _Line:
    """One ``target = layer(*args, **kwargs)(applied_to)`` statement (``applied_to`` None: Input)."""

    lineno: int
    text: str
    target: str
    layer: str
    args: tuple
    kwargs: dict
    applied_to: str | None

    def fail(self, source: str, message: str):
        _fail(source, self.lineno, self.text, message)


def _fail(source: str, lineno: int, text: str, message: str):
    raise ConfigError(f"{source}:{lineno}: {message}\n    {text}")


def _call_name(func: ast.expr) -> str | None:
    """``Conv2D`` for ``Conv2D`` and ``keras.layers.Conv2D``."""
    if isinstance(func, ast.Name):
        return func.id
    return func.attr if isinstance(func, ast.Attribute) else None


def _statement(node: ast.stmt, lines: list[str], source: str) -> _Line | None:
    """The :class:`_Line` of one statement; None for imports and ``python`` markers."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return None
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Name) and node.value.id == "python":
        return None
    text = lines[node.lineno - 1].strip()

    def fail(message: str):
        _fail(source, node.lineno, text, message)

    expected = "expected `x = Layer(...)(x)` or `x = Input(shape=...)`"
    if not (isinstance(node, ast.Assign) and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name) and isinstance(node.value, ast.Call)):
        fail(expected)
    call, applied_to = node.value, None
    if isinstance(call.func, ast.Call):  # Layer(...)(x)
        if len(call.args) != 1 or call.keywords or not isinstance(call.args[0], ast.Name):
            fail("a layer applies to one tensor variable, as in `x = Conv2D(...)(x)`")
        call, applied_to = call.func, call.args[0].id
    name = _call_name(call.func)
    if name is None or (name == "Input") != (applied_to is None):
        fail(expected)
    if any(k.arg is None for k in call.keywords):
        fail("**kwargs cannot be read; write the arguments out")
    values = []
    for node_arg in call.args + [k.value for k in call.keywords]:
        try:
            values.append(ast.literal_eval(node_arg))
        except (ValueError, TypeError, SyntaxError):
            fail(f"argument {ast.unparse(node_arg)} is not a literal; jfactor reads numbers, strings "
                 "and tuples, and never runs the code")
    args, kwargs = tuple(values[: len(call.args)]), dict(zip((k.arg for k in call.keywords), values[len(call.args):]))
    return _Line(node.lineno, text, node.targets[0].id, name, args, kwargs, applied_to)


def _lines(text: str, source: str) -> list[_Line]:
    """Every layer statement of ``text``, separators, markers and imports dropped."""
    if not isinstance(text, str):
        raise ConfigError(f"{source}: the Keras lines must be text (str), got {type(text).__name__}")
    lines = textwrap.dedent(text).splitlines()
    code = "\n".join("" if SEPARATOR.match(line) else line for line in lines)
    try:
        tree = ast.parse(code, filename=source)
    except SyntaxError as exc:
        lineno = exc.lineno or 0
        shown = lines[lineno - 1].strip() if 0 < lineno <= len(lines) else ""
        _fail(source, lineno, shown, f"not a line of Python ({exc.msg})")
    parsed = (_statement(node, lines, source) for node in tree.body)
    return [line for line in parsed if line is not None]


def _models(lines: list[_Line], source: str) -> list[list[_Line]]:
    """Statements grouped into models, each starting at its Input line."""
    models = []
    for line in lines:
        if line.layer == "Input":
            models.append([line])
        elif not models:
            line.fail(source, f"{line.layer} comes before any Input(shape=...) line")
        else:
            models[-1].append(line)
    if not models:
        raise ConfigError(f"{source}: no Input(shape=...) line; a model starts with `x = Input(shape=(28, 28, 1))`")
    return models


def _bind(signature, line: _Line, source: str) -> dict:
    """``line``'s arguments bound to a Keras signature, defaults filled in."""
    try:
        bound = inspect.signature(signature).bind(*line.args, **line.kwargs)
    except TypeError as exc:
        accepted = ", ".join(inspect.signature(signature).parameters)
        line.fail(source, f"{line.layer}: {exc} (jfactor reads {accepted})")
    bound.apply_defaults()
    return bound.arguments


def _conv_padding(padding, ndim: int, size: Shape, dilation) -> str | tuple:
    """jfactor's padding spec of a Keras conv padding string."""
    mode = padding.lower() if isinstance(padding, str) else None
    if mode in ("valid", "same"):
        return mode
    if mode == "causal" and ndim == 1:
        return (((size[0] - 1) * _checks.expand(dilation, 1, "dilation_rate", "conv")[0], 0),)
    raise StackError(f"conv: padding must be 'valid' or 'same' ('causal' for Conv1D), got {padding!r}")


def _conv(args: dict, ndim: int, shape: Shape, init: str, seed: int) -> Conv:
    """A Conv from bound Conv*D arguments on inputs ``(N, *shape)``; kernel drawn by ``init``."""
    if args["activation"] not in (None, "linear"):
        raise StackError(f"conv: activation={args['activation']!r} is not linear; jfactor folds stacks "
                         "without activations")
    filters = _checks.positive_ints(args["filters"], "filters", "conv")
    groups = _checks.positive_ints(args["groups"], "groups", "conv")
    if not (isinstance(filters, int) and isinstance(groups, int)):
        raise StackError(f"conv: filters and groups must be positive integers, got {filters!r} and {groups!r}")
    if shape[-1] % groups:
        raise StackError(f"conv: groups = {groups} does not divide the {shape[-1]} input channels")
    size = _checks.expand(_checks.positive_ints(args["kernel_size"], "kernel_size", "conv"), ndim,
                          "kernel_size", "conv")
    kshape = size + (shape[-1] // groups, filters)
    try:
        kernel = weights.initialize(init, kshape, seed=seed, std=_checks.prod(kshape[:-1]) ** -0.5)
    except ConfigError as exc:  # past the memory budget: refused before drawing
        raise StackError(f"conv: {exc}") from None
    if not isinstance(args["use_bias"], bool):
        raise StackError(f"conv: use_bias must be True or False, got {args['use_bias']!r}")
    bias = weights.initialize("zeros", (filters,)) if args["use_bias"] else None
    padding = _conv_padding(args["padding"], ndim, size, args["dilation_rate"])
    return Conv(kernel, bias, args["strides"], args["dilation_rate"], padding, groups)


def _layer(line: _Line, shape: Shape, init: str, seed: int, source: str):
    """The Conv or AvgPool of one layer line on inputs ``(N, *shape)``."""
    conv, pool = CONV.match(line.layer), POOL.match(line.layer)
    if NOT_LINEAR.match(line.layer):
        line.fail(source, f"{line.layer} is not linear; jfactor folds convolutions and average pools "
                          "without activations")
    if not (conv or pool):
        line.fail(source, f"{line.layer} is not a layer jfactor reads; it reads Input, Conv1D/2D/3D and "
                          "AveragePooling1D/2D/3D")
    args = _bind(_conv_arguments if conv else _pool_arguments, line, source)
    ndim = int((conv or pool).group(2))
    if len(shape) - 1 != ndim:
        raise StackError(f"{line.layer}: needs a {ndim}-D input (*spatial, C); its input has shape {shape}")
    if args["data_format"] not in (None, "channels_last"):
        raise StackError(f"{line.layer}: data_format={args['data_format']!r}; jfactor reads channels_last only")
    if conv:
        return _conv(args, ndim, shape, init, seed)
    padding = args["padding"].lower() if isinstance(args["padding"], str) else args["padding"]
    return AvgPool(args["pool_size"], args["strides"], padding)


def _build(model: list[_Line], source: str, init: str, seed: int) -> Stack:
    """The stack of one model's lines (its Input line first)."""
    head, body = model[0], model[1:]
    if not body:
        head.fail(source, "this model has no layers after its Input line")
    try:
        input_shape = _checks.input_shape(_bind(_input_arguments, head, source)["shape"], "Input")
    except StackError as exc:
        head.fail(source, str(exc))
    layers, shape, current = [], input_shape, head.target
    for line in body:
        if line.applied_to != current:
            line.fail(source, f"{line.layer} applies to {line.applied_to!r}, but the line before made "
                              f"{current!r}; jfactor reads one chain of layers")
        convs = sum(isinstance(layer, Conv) for layer in layers)
        try:
            layer = _layer(line, shape, init, seed + convs, source)
            shape = layer.out_shape(shape, line.layer)
        except StackError as exc:
            line.fail(source, f"{line.layer}: {str(exc).split(': ', 1)[-1]}")
        layers.append(layer)
        current = line.target
    return Stack(layers, input_shape)


def _check_init(init: str, seed) -> None:
    if init not in weights.INITS:
        raise ConfigError(f"init must be one of {', '.join(weights.INITS)}; got {init!r}")
    if not _checks.is_int(seed) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")


def parse_keras(text: str, *, source: str = "<text>", init: str = "normal", seed: int = 0) -> Stack:
    """The stack of one Keras model written as lines (see the module docstring).

    Args:
      text: the lines, starting with one ``x = Input(shape=(*spatial, C))``.
      source: the name errors start with, e.g. a file name: ``model.txt:4: ...``.
      init: kernel initialiser (:data:`jfactor.weights.INITS`); ``'normal'`` draws std
        ``1/sqrt(fan_in)``, ``'randint'`` 0/1 like the seed's ``randint(0, 2)``.
      seed: the i-th conv's kernel is drawn from ``default_rng(seed + i)``.

    Raises:
      ConfigError: ``source:line: message`` and the line's text, for a line that is not
        Python, a layer that is not linear or not read, arguments that do not fit, a
        missing Input line, or several models (read those with :func:`parse_keras_blocks`).
    """
    _check_init(init, seed)
    models = _models(_lines(text, source), source)
    if len(models) > 1:
        models[1][0].fail(source, f"a second Input line: this text holds {len(models)} models; keep one "
                                  "per file, or read them all with parse_keras_blocks")
    return _build(models[0], source, init, seed)


def parse_keras_blocks(text: str, *, source: str = "<text>", init: str = "normal", seed: int = 0) -> list[Stack]:
    """One stack per ``Input(...)``-started model of ``text``, in order.

    For the seed's code blocks, whose models are separated by ``-----`` lines (skipped).
    Each model's convs are numbered from 0, so a model gets the weights
    :func:`parse_keras` gives it alone.  Arguments and errors as in :func:`parse_keras`.
    """
    _check_init(init, seed)
    return [_build(model, source, init, seed) for model in _models(_lines(text, source), source)]


def load_keras(path) -> Stack:
    """The stack of the Keras lines in the file at ``path`` (default weights)."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    return parse_keras(text, source=str(path))


LOADERS = {".yaml": load_stack, ".yml": load_stack, ".txt": load_keras, ".py": load_keras}


def load_any(path) -> Stack:
    """The stack in ``path``, read by its suffix: ``.yaml``/``.yml`` a YAML stack config
    (:func:`jfactor.stack_config.load_stack`), ``.txt``/``.py`` Keras lines (:func:`load_keras`).
    """
    path = Path(path)
    loader = LOADERS.get(path.suffix.lower())
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, not a stack file (.yaml, .yml, .txt, .py)")
    if loader is None:
        raise ConfigError(f"{path}: unknown file type {path.suffix!r}; expected a YAML stack config "
                          f"(.yaml, .yml), Keras lines (.txt, .py) or, for jfactor fold, an ONNX model (.onnx); a "
                          f"Keras model file is read in Python (jfactor.from_keras)")
    return loader(path)


__all__ = ["load_any", "load_keras", "parse_keras", "parse_keras_blocks"]
