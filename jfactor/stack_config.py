"""Stack configs: YAML with Keras-style keys -> :class:`~jfactor.stack.Stack`.

.. code-block:: yaml

    input_shape: [28, 28, 1]          # spatial dims..., channels
    dtype: float64
    layers:
      - conv: {kernel_size: [3, 3], filters: 1, strides: 1, dilation_rate: 1,
               padding: valid, groups: 1, use_bias: false,
               weights: {init: randint, low: 0, high: 2, seed: 0}}   # or weights: k.npy
      - avg_pool: {pool_size: 2}       # strides default to pool_size
      - conv: {kernel_size: 3, filters: 1, weights: k2.npy, bias: b2.npy}

Layer kinds: conv, avg_pool, sum_pool, subsample, batch_norm, identity, residual
(``layers:``), branches (``layers:`` a list of layer lists, ``merge: sum | concat``).
Weights are a ``.npy`` path (relative to the config file), ``{file: w.npz, key: k}``,
``{init: normal|uniform|randint|zeros|ones, seed, mean, std, low, high}`` or literal
nested lists; a kernel with only spatial axes is read as one channel in, one out.  A conv without
``weights`` gets ``{init: normal, std: 1/sqrt(fan_in)}``
seeded by its position among the config's convs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from jfactor import _checks, weights
from jfactor.errors import ConfigError, StackError
from jfactor.layers import AvgPool, BatchNorm, Branches, Conv, Identity, Residual, Subsample, SumPool
from jfactor.schema import Strict, load_yaml, unknown_key, validate
from jfactor.stack import Stack

PositiveInt = Annotated[int, Field(strict=True, gt=0)]


def _sizes(value):
    items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not (isinstance(items, list) and items
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in items)):
        raise ValueError(f"must be a positive integer or a list of them, got {value!r}")
    return value if isinstance(value, int) else tuple(value)


def _padding(value):
    try:
        return _checks.padding_spec(value, "padding")
    except StackError as exc:
        raise ValueError(str(exc).removeprefix("padding: ")) from None


Sizes = Annotated[Any, AfterValidator(_sizes)]
PaddingSpec = Annotated[Any, AfterValidator(_padding)]


Finite = Annotated[float, Field(allow_inf_nan=False)]


class WeightSpec(Strict):
    """A weight array: a file, an initialiser, or literal values (exactly one)."""

    file: str | None = None
    key: str | None = None
    init: Literal[weights.INITS] | None = None  # type: ignore[valid-type]
    seed: Annotated[int, Field(strict=True, ge=0)] = 0
    mean: Finite = 0.0
    std: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    low: Finite | None = None
    high: Finite | None = None
    values: list | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data):
        if isinstance(data, str):
            return {"file": data}
        if isinstance(data, (list, int, float)) and not isinstance(data, bool):
            return {"values": data if isinstance(data, list) else [data]}
        return data

    @model_validator(mode="after")
    def _one_source(self):
        given = [name for name in ("file", "init", "values") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of file, init or values; got {given or 'none'}")
        return self


class ConvSpec(Strict):
    kernel_size: Sizes | None = None
    filters: PositiveInt | None = None
    strides: Sizes = 1
    dilation_rate: Sizes = 1
    padding: PaddingSpec = "valid"
    groups: PositiveInt = 1
    use_bias: bool | None = None  # default: a bias exactly when `bias` is given
    weights: WeightSpec | None = None
    bias: WeightSpec | None = None

    @model_validator(mode="after")
    def _bias_agrees(self):
        if self.use_bias is False and self.bias is not None:
            raise ValueError("use_bias: false contradicts the bias given; drop one of them")
        return self


class PoolSpec(Strict):
    pool_size: Sizes = 2
    strides: Sizes | None = None
    padding: Literal["valid"] = "valid"


class SubsampleSpec(Strict):
    strides: Sizes = 2


class BatchNormSpec(Strict):
    gamma: WeightSpec | None = None
    beta: WeightSpec | None = None
    mean: WeightSpec | None = None
    var: WeightSpec | None = None
    epsilon: Annotated[float, Field(ge=0)] = 1e-3


class IdentitySpec(Strict):
    pass


class ResidualSpec(Strict):
    layers: list[LayerEntry]


class BranchesSpec(Strict):
    layers: list[list[LayerEntry]]
    merge: Literal["sum", "concat"] = "sum"


KINDS = {
    "conv": ConvSpec, "avg_pool": PoolSpec, "sum_pool": PoolSpec, "subsample": SubsampleSpec,
    "batch_norm": BatchNormSpec, "identity": IdentitySpec, "residual": ResidualSpec,
    "branches": BranchesSpec,
}


class LayerEntry(BaseModel):
    """One list item: a mapping with one key, the layer kind (``identity`` may be bare)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    conv: ConvSpec | None = None
    avg_pool: PoolSpec | None = None
    sum_pool: PoolSpec | None = None
    subsample: SubsampleSpec | None = None
    batch_norm: BatchNormSpec | None = None
    identity: IdentitySpec | None = None
    residual: ResidualSpec | None = None
    branches: BranchesSpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_kind(cls, data):
        if isinstance(data, str):
            data = {data: {}}
        if not isinstance(data, dict) or len(data) != 1:
            raise ValueError(
                "each layer is a mapping with one key, its kind (e.g. {conv: {kernel_size: 3}}); "
                f"got {data!r}"
            )
        kind, value = next(iter(data.items()))
        if kind not in KINDS:
            raise ValueError(unknown_key(kind, KINDS, "layer kind"))
        return {kind: {} if value is None else value}

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)

    @property
    def spec(self):
        return getattr(self, self.kind)


ResidualSpec.model_rebuild()
BranchesSpec.model_rebuild()


class StackConfig(Strict):
    input_shape: list[PositiveInt] = Field(min_length=2)
    dtype: Literal["float32", "float64"] = "float64"
    layers: list[LayerEntry] = Field(min_length=1)
    name: str | None = None
    description: str | None = None


class _Builder:
    """Walks layer entries with the shape reaching each, so initialisers know C_in."""

    def __init__(self, base_dir: Path, source: str):
        self.base_dir = base_dir
        self.source = source
        self.convs = 0

    def fail(self, where: str, message: str):
        raise ConfigError(f"{self.source}: {where}: {message}")

    def array(self, spec: WeightSpec, shape, where: str, std: float = 1.0) -> np.ndarray:
        if spec.file is not None:
            path = Path(spec.file)
            try:
                array = weights.load(path if path.is_absolute() else self.base_dir / path, spec.key)
            except ConfigError as exc:
                self.fail(where, str(exc))
        elif spec.values is not None:
            try:
                array = np.asarray(spec.values, dtype=np.float64)
            except (TypeError, ValueError) as exc:
                self.fail(where, f"values are not a rectangular array of numbers: {exc}")
        else:
            try:
                return weights.initialize(spec.init, shape, seed=spec.seed, mean=spec.mean,
                                          std=std if spec.std is None else spec.std,
                                          low=spec.low, high=spec.high)
            except ConfigError as exc:
                self.fail(where, str(exc))
        if shape is not None and array.shape != tuple(shape):
            self.fail(where, f"has shape {array.shape}, expected {tuple(shape)}")
        return array

    def sequence(self, entries, shape, path: str) -> list:
        layers = []
        for i, entry in enumerate(entries):
            where = f"{path}[{i}]"
            layer = self.layer(entry, shape, where)
            try:
                shape = layer.out_shape(shape, where)
            except StackError as exc:
                raise ConfigError(f"{self.source}: {exc}") from None
            layers.append(layer)
        return layers

    def layer(self, entry: LayerEntry, shape, where: str):
        kind, spec = entry.kind, entry.spec
        try:
            if kind == "conv":
                return self.conv(spec, shape, f"{where}.conv")
            if kind in ("avg_pool", "sum_pool"):
                return (AvgPool if kind == "avg_pool" else SumPool)(spec.pool_size, spec.strides)
            if kind == "subsample":
                return Subsample(spec.strides)
            if kind == "batch_norm":
                return self.batch_norm(spec, shape[-1], f"{where}.batch_norm")
            if kind == "identity":
                return Identity()
            if kind == "residual":
                return Residual(self.sequence(spec.layers, shape, f"{where}.residual.layers"))
            return Branches(
                [self.sequence(b, shape, f"{where}.branches.layers[{j}]") for j, b in enumerate(spec.layers)],
                spec.merge,
            )
        except StackError as exc:
            raise ConfigError(f"{self.source}: {where}.{kind}: {str(exc).split(': ', 1)[-1]}") from None

    def batch_norm(self, spec: BatchNormSpec, channels: int, where: str) -> BatchNorm:
        defaults = {"gamma": 1.0, "beta": 0.0, "mean": 0.0, "var": 1.0}
        arrays = {
            name: np.full(channels, fill) if getattr(spec, name) is None
            else self.array(getattr(spec, name), (channels,), f"{where}.{name}")
            for name, fill in defaults.items()
        }
        return BatchNorm(**arrays, epsilon=spec.epsilon)

    def conv(self, spec: ConvSpec, shape, where: str) -> Conv:
        ndim, cin = len(shape) - 1, shape[-1]
        if cin % spec.groups:
            self.fail(f"{where}.groups", f"{spec.groups} does not divide the {cin} input channels")
        seed = self.convs
        self.convs += 1
        if spec.weights is not None and spec.weights.init is None:
            kernel = self.array(spec.weights, None, f"{where}.weights")
            if kernel.ndim == ndim and cin // spec.groups == 1:
                kernel = kernel[..., None, None]  # spatial-only: one channel in, one out
            expected = (ndim + 2, cin // spec.groups)
            if kernel.ndim != expected[0] or kernel.shape[-2] != expected[1]:
                self.fail(f"{where}.weights", f"has shape {kernel.shape}; a {ndim}-D conv on {cin} channels "
                          f"with groups {spec.groups} needs (*kernel_size, {expected[1]}, filters)")
            declared = spec.kernel_size and _checks.expand(spec.kernel_size, ndim, "kernel_size", where)
            if declared and declared != kernel.shape[:ndim]:
                self.fail(f"{where}.kernel_size",
                          f"{spec.kernel_size} disagrees with the weights' shape {kernel.shape}")
            if spec.filters is not None and spec.filters != kernel.shape[-1]:
                self.fail(f"{where}.filters", f"{spec.filters} disagrees with the weights' shape {kernel.shape}")
        else:
            missing = [k for k in ("kernel_size", "filters") if getattr(spec, k) is None]
            if missing:
                self.fail(where, f"needs {' and '.join(missing)} (or a weights file to take them from)")
            size = _checks.expand(spec.kernel_size, ndim, "kernel_size", where)
            kshape = size + (cin // spec.groups, spec.filters)
            fan_in = _checks.prod(kshape[:-1])
            init = spec.weights or WeightSpec(init="normal", seed=seed)
            kernel = self.array(init, kshape, f"{where}.weights", std=fan_in ** -0.5)
        filters = kernel.shape[-1]
        bias = None
        if spec.bias is not None:
            bias = self.array(spec.bias, (filters,), f"{where}.bias")
        elif spec.use_bias:
            bias = np.zeros(filters)
        return Conv(kernel, bias, spec.strides, spec.dilation_rate, spec.padding, spec.groups)


def stack_from_dict(data: dict, *, base_dir=".", source: str = "config") -> Stack:
    """Build a stack from a parsed config mapping; errors name ``source`` and the key path."""
    config = validate(StackConfig, data, source)
    builder = _Builder(Path(base_dir), source)
    shape = tuple(config.input_shape)
    layers = builder.sequence(config.layers, shape, "layers")
    try:
        stack = Stack(layers, shape)
    except StackError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return stack.astype(np.dtype(config.dtype))


def load_stack(path) -> Stack:
    """Build the stack described by the YAML file at ``path``."""
    path = Path(path)
    return stack_from_dict(load_yaml(path), base_dir=path.parent, source=str(path))
