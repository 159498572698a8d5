"""Experiment configs: what to factorize, with which chains, how, and what to report.

.. code-block:: yaml

    name: quickstart
    seed: 0
    dtype: float64
    target: {family: gaussian, size: 15, params: {sigma: 2.5}}   # or file / values / stack
    chains:                                  # or `chain:` for one
      - {sizes: [3, 5, 9]}
      - {sizes: [3, 3, 3], dilations: [1, 2, 4], channels: 2}
    objective: kernel                        # or {name: spectral, p: 8} / {name: images, images: [camera]}
    solver: {optimizer: lbfgs, steps: 200, refine: lm, refine_steps: 500}
    restarts: 32                             # exactly 32, each refined; omit for waves until sure,
    # budget_s: 60                           # ... or, with restarts omitted, no new wave after a minute
    init: auto
    baselines: [svd, als, lstsq, wiener, unsupervised_wiener]
    sweep:                                   # for `jfactor sweep` only
      grid: {chains.0.channels: [1, 2, 4]}
      zip: {target.family: [gaussian, log], target.size: [15, 15]}

Every file a config names (target, weights, stacks, image files) is read relative to its directory.
A config with a ``stack`` and no chain is a fold-only run.  ``tiny: true`` (or
``--set tiny=true``) shrinks steps, restarts and sizes for smoke tests, so every shipped
config can be run in seconds.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from jfactor import kernels
from jfactor._checks import assignments, repeated
from jfactor.errors import ConfigError
from jfactor.factorize import BASELINES, DEFAULT_BASELINES, Chain, Objective, Solver, Target
from jfactor.factorize.init import INITS
from jfactor.factorize.multistart import RESTARTS_OR_BUDGET
from jfactor.factorize.objectives import OBJECTIVES, load_images, local_image_path
from jfactor.factorize.solve import HESSIANS, LINEAR_SOLVERS, OPTIMIZERS, REFINES, SCHEDULES
from jfactor.schema import Strict, load_yaml, load_yaml_text, unknown_key, validate
from jfactor.stack_config import StackConfig, WeightSpec, _Builder, stack_from_dict

PositiveInt = Annotated[int, Field(strict=True, gt=0)]
Sizes = Annotated[PositiveInt | list[PositiveInt], Field(description="an int or one per spatial dim")]


SOURCE_KEYS = {"size": ("family",), "params": ("family",), "key": ("file",),
               "spatial_dims": ("family", "file", "values"), "stride": ("family", "file", "values")}
"""The target keys that only some sources read (a stack's target takes its dims and stride from its fold)."""


class TargetSpec(Strict):
    """Exactly one of ``family`` (with ``size``), ``file``, ``values`` or ``stack``."""

    family: str | None = None
    size: PositiveInt | None = None
    params: dict[str, Any] = {}
    file: str | None = None
    key: str | None = None
    values: list | None = None
    stack: str | StackConfig | None = None
    spatial_dims: PositiveInt | None = None
    stride: Sizes = 1

    @model_validator(mode="after")
    def _one_source(self):
        given = [k for k in ("family", "file", "values", "stack") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of family, file, values or stack; got {given or 'none'}")
        for key, sources in SOURCE_KEYS.items():  # a default (as a run's resolved config.yaml writes) is no value
            value = getattr(self, key)
            default = value in (None, type(self).model_fields[key].default) or (isinstance(value, list)
                                                                                 and set(value) == {1})  # stride
            if not default and given[0] not in sources:
                raise ValueError(f"{key} does not apply to a {given[0]} target (only to {' or '.join(sources)}): "
                                 "remove it")
        if self.family is not None:
            if self.family not in kernels.FAMILIES:
                raise ValueError(unknown_key(self.family, kernels.FAMILIES, "kernel family"))
            if self.size is None:
                raise ValueError(f"family {self.family!r} needs a size")
        return self


class FrozenSpec(Strict):
    layer: Annotated[int, Field(strict=True, ge=0)]
    weights: WeightSpec

    @model_validator(mode="after")
    def _given(self):
        if self.weights.init is not None:
            raise ValueError("a frozen layer's weights come from a file or values, not an initialiser (init)")
        return self


def _sizes_shorthand(data):
    """A chain written as its sizes (``chain: [3, 5, 9]``, as ``--chain 3,5,9``) as its mapping."""
    return {"sizes": data} if isinstance(data, list) else data


def _name_shorthand(data):
    """An objective written as its name (``objective: images``) as its mapping."""
    return {"name": data} if isinstance(data, str) else data


class ChainSpec(Strict):
    sizes: list[Sizes] = Field(min_length=1)
    dilations: list[Sizes] | None = None
    strides: list[Sizes] | None = None
    channels: PositiveInt | list[PositiveInt] = 1
    frozen: list[FrozenSpec] = []
    name: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data):
        if isinstance(data, str):  # validation's message, not set_path's (which leaves a string as it is)
            raise ValueError(f"give the sizes as a list ([3, 5, 9]) or a mapping ({{sizes: [3, 5, 9], ...}}), "
                             f"got {data!r}")
        return _sizes_shorthand(data)

    @model_validator(mode="after")
    def _frozen_once(self):
        twice = repeated(item.layer for item in self.frozen)
        if twice:
            raise ValueError(f"frozen layer {', '.join(map(str, twice))} is given twice")
        return self


class ObjectiveSpec(Strict):
    name: Literal[OBJECTIVES] = "kernel"  # type: ignore[valid-type]
    p: Annotated[float, Field(ge=2, allow_inf_nan=False)] = 2.0
    pad: PositiveInt = 4
    images: list[str] = Field(["camera", "astronaut", "coins"], min_length=1)
    image_size: PositiveInt = 96
    crops: PositiveInt = 2

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data):
        return _name_shorthand(data)


class SolverSpec(Strict):
    optimizer: Literal[OPTIMIZERS] = "lbfgs"  # type: ignore[valid-type]
    steps: Annotated[int, Field(strict=True, ge=0)] = 200
    learning_rate: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 0.01
    schedule: Literal[SCHEDULES] = "cosine"  # type: ignore[valid-type]
    refine: Literal[REFINES] = "lm"  # type: ignore[valid-type]
    refine_steps: Annotated[int, Field(strict=True, ge=0)] = 500
    first_order_share: Annotated[float, Field(ge=0, le=1)] = 0.5
    linear_solver: Literal[LINEAR_SOLVERS] = "auto"  # type: ignore[valid-type]
    cg_iterations: PositiveInt = 100
    hessian: Literal[HESSIANS] = "gauss-newton"  # type: ignore[valid-type]
    chunk: PositiveInt = 100


class SweepSpec(Strict):
    grid: dict[str, list] = {}
    zip: dict[str, list] = {}

    @model_validator(mode="after")
    def _shapes(self):
        lengths = {len(v) for v in self.zip.values()}
        if len(lengths) > 1:
            raise ValueError(f"every zip list needs the same length, got {sorted(lengths)}")
        twice = sorted(set(self.grid) & set(self.zip))
        if twice:
            raise ValueError(f"{', '.join(twice)}: swept twice (in grid and in zip); keep each key in one of them")
        for key, values in {**self.grid, **self.zip}.items():
            if not values:
                raise ValueError(f"{key}: needs at least one value")
        if "name" in self.grid or "name" in self.zip:
            raise ValueError("name: the sweep's cells are named after it (<name>-<index>); sweep another key")
        text = lambda value: json.dumps(value, sort_keys=True, default=str)  # noqa: E731  (lists, mappings, dates)
        lists = [(f"grid {key}", [text(v) for v in values]) for key, values in self.grid.items()]
        lists.append((f"zip {' and '.join(self.zip)}", [text(v) for v in zip(*self.zip.values())]))
        for key, texts in lists:
            twice = repeated(texts)
            if twice:
                raise ValueError(f"{key}: {', '.join(twice)} given twice (the same cell twice)")
        return self


class ExperimentConfig(Strict):
    name: str = "experiment"
    description: str | None = None
    seed: Annotated[int, Field(strict=True, ge=0)] = 0
    dtype: Literal["float32", "float64"] = "float64"
    target: TargetSpec | None = None
    stack: str | StackConfig | None = None
    chain: ChainSpec | None = None
    chains: list[ChainSpec] = []
    objective: ObjectiveSpec = ObjectiveSpec()
    solver: SolverSpec = SolverSpec()
    restarts: PositiveInt | None = None
    budget_s: Annotated[float, Field(strict=False, gt=0, allow_inf_nan=False)] | None = None
    init: Literal[INITS] = "auto"  # type: ignore[valid-type]
    baselines: list[Literal[BASELINES]] = list(DEFAULT_BASELINES)  # type: ignore[valid-type]
    plots: bool = True
    tiny: bool = False
    sweep: SweepSpec | None = None

    @field_validator("baselines")
    @classmethod
    def _baselines_once(cls, value: list) -> list:
        twice = repeated(value)
        if twice:
            raise ValueError(f"{', '.join(twice)} given twice")
        return value

    @model_validator(mode="after")
    def _what_to_do(self):
        if self.chain is not None and self.chains:
            raise ValueError("give chain (one) or chains (a list), not both")
        if self.target is None and self.stack is None:
            raise ValueError("give a target (to factorize) or a stack (to fold, or to factorize its folded kernel)")
        if self.target is not None and self.stack is not None:
            raise ValueError("give target or stack, not both (a stack's folded kernel is the target: "
                             "target: {stack: path.yaml})")
        if self.target is not None and not self.all_chains:
            raise ValueError("a target needs a chain (or chains) to factorize it into")
        if self.restarts is not None and self.budget_s is not None:
            raise ValueError(RESTARTS_OR_BUDGET)
        if self.solver.hessian == "full" and (self.objective.name != "kernel" or self.solver.refine != "lm"):
            raise ValueError("solver.hessian full (the exact Hessian) needs objective kernel and solver.refine lm")
        return self

    @property
    def all_chains(self) -> list[ChainSpec]:
        return [self.chain] if self.chain is not None else list(self.chains)


# ------------------------------------------------------------------------------- loading

def parse_value(text: str):
    """A ``--set`` value: YAML scalars and flow lists (``3``, ``true``, ``[1, 2]``, ``gaussian``)."""
    import yaml

    try:
        return load_yaml_text(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set value {text!r} is not YAML: {' '.join(str(exc).split())}") from None


def set_path(data: dict, path: str, value) -> dict:
    """A copy of ``data`` with ``value`` at the dotted ``path`` (list indices are numbers)."""
    data = copy.deepcopy(data)
    keys = path.split(".")
    node = data
    for i, key in enumerate(keys[:-1]):
        nxt = keys[i + 1]
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"{path}: {'.'.join(keys[:i])} is not a mapping")
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"{path}: {'.'.join(keys[:i])} has no item {key}")
            key = int(key)
        elif key not in node or node[key] is None:
            other = {"chain": "chains", "chains": "chain"}.get(key) if i == 0 else None
            if other in node:
                raise ConfigError(f"{path}: this config has {other}, not {key}")
            node[key] = [] if nxt.isdigit() else {}
        if not nxt.isdigit():  # `chain.0` is the first size of `chain: [3, 5]`, `chain.channels` a key of it
            node[key] = _expanded(keys[:i + 1], node[key])
        node = node[key]
    last = keys[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"{path}: the list has no item {last}")
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"{path}: {'.'.join(keys[:-1])} is not a mapping")
    return data


def _expanded(keys: list[str], value):
    """``value`` at the config path ``keys`` with its shorthand written out (a chain's sizes, an
    objective's name), so that a key below it can be set (``chain.channels`` of ``chain: [3, 5]``)."""
    if keys == ["chain"] or (len(keys) == 2 and keys[0] == "chains" and keys[1].isdigit()):
        return _sizes_shorthand(value)
    return _name_shorthand(value) if keys == ["objective"] else value


def overrides_of(items: list[str]) -> list[tuple[str, str]]:
    """``--set key.path=value`` texts as (key path, value text) pairs (:func:`jfactor._checks.assignments`)."""
    return assignments(items, "--set", "key.path=value")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key.path=value`` overrides (``--set``); a :class:`ConfigError` names the one at fault."""
    for path, text in overrides_of(overrides):
        if not text.strip():  # an unset shell variable, most likely: YAML would read it as null
            raise ConfigError(f"--set {path}=: the value is empty; write {path}=null where null is meant")
        value = parse_value(text)
        try:
            data = set_path(data, path, value)
        except ConfigError as exc:
            raise ConfigError(f"--set {exc}") from None
    return data


def load_config(path, overrides: list[str] = ()) -> tuple[ExperimentConfig, dict, Path]:
    """(validated config, resolved raw mapping, base directory) of a YAML file with overrides."""
    path = Path(path)
    raw = load_yaml(path)
    try:
        raw = apply_overrides(raw, list(overrides))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    # chains written as `chain` shorthand stay as written; validation reports the file and the overrides
    keys = [key for key, _ in overrides_of(list(overrides))]
    source = f"{path} with --set {', '.join(keys)}" if keys else str(path)
    return validate(ExperimentConfig, raw, source), raw, path.parent


def shrink(config: ExperimentConfig, extent: int = 0) -> ExperimentConfig:
    """The tiny variant: 10 LM iterations (no first-order phase), 2 restarts, cheap baselines,
    small images (48 pixels a side, or ``extent``, the largest chain extent, where that is more:
    no smaller than the kernels they are filtered with, and no larger than the config's).  It
    exercises a config end to end in seconds; its numbers mean nothing.

    (Sweeps also keep only their first and last cells; see :mod:`jfactor.experiment.sweep`.)
    """
    solver = config.solver.model_copy(update={"optimizer": "none", "refine": "lm", "refine_steps": 10,
                                              "chunk": 10})
    image_size = min(config.objective.image_size, max(48, extent))
    objective = config.objective.model_copy(update={"image_size": image_size, "crops": 1,
                                                    "images": config.objective.images[:1]})
    baselines = [b for b in config.baselines if b not in ("als", "scipy_lm", "unsupervised_wiener")]
    return config.model_copy(update={"solver": solver, "objective": objective, "baselines": baselines,
                                     "restarts": min(config.restarts or 2, 2), "budget_s": None,
                                     "plots": config.plots})


# ------------------------------------------------------------------------------- building

def _stack(spec, base: Path, where: str):
    if isinstance(spec, str):
        from jfactor.interop.seed_notation import load_any

        path = Path(spec) if Path(spec).is_absolute() else base / spec
        return load_any(path)
    return stack_from_dict(spec.model_dump(exclude_none=True), base_dir=base, source=where)


def build_target(spec: TargetSpec, base: Path, source: str) -> Target:
    """The :class:`Target` a spec describes (a stack's target is its folded kernel and stride)."""
    where = f"{source}: target"
    if spec.family is not None:
        try:
            array = kernels.make(spec.family, spec.size, **spec.params)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        name = f"{spec.family}{spec.size}"
    elif spec.stack is not None:
        from jfactor.fold import fold_affine

        stack = _stack(spec.stack, base, f"{source}: target.stack")
        affine = fold_affine(stack)
        return Target.from_array(np.asarray(affine.kernel), spatial_dims=stack.ndim, stride=affine.stride,
                                 name=Path(spec.stack).stem if isinstance(spec.stack, str) else "stack")
    else:
        weight = WeightSpec(file=spec.file, key=spec.key) if spec.file else WeightSpec(values=spec.values)
        array = _Builder(base, source).array(weight, None, "target")
        name = Path(spec.file).stem if spec.file else "values"
    try:
        return Target.from_array(array, spatial_dims=spec.spatial_dims, stride=spec.stride, name=name)
    except ConfigError:
        raise
    except ValueError as exc:  # every JFactorError is one, with its own message
        raise ConfigError(f"{where}: {exc}") from None


def build_chain(spec: ChainSpec, ndim: int, base: Path, source: str, index: int) -> Chain:
    where = f"{source}: chains[{index}]"
    frozen = {}
    builder = _Builder(base, source)
    for item in spec.frozen:
        frozen[item.layer] = builder.array(item.weights, None, f"chains[{index}].frozen.layer {item.layer}")
    try:
        return Chain.build(spec.sizes, dilations=spec.dilations, strides=spec.strides, channels=spec.channels,
                           ndim=ndim, frozen=frozen)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def build_solver(spec: SolverSpec) -> Solver:
    return Solver(**spec.model_dump())


def build_objective(spec: ObjectiveSpec, target: Target, base: Path, source: str):
    """(Objective, images (B, *spatial, C_in) or None for the default images); errors name ``source``.
    Image files (names with a suffix) are read relative to ``base``, the config's directory, like
    every other file a config names (and as a sweep hashes them)."""
    objective = Objective(spec.name, spec.p, spec.pad, target.stride)
    if spec.name != "images":
        return objective, None
    images = [local_image_path(name, base) for name in spec.images]
    try:  # rows of the crops for a 1-D target, stacks of shifted crops for a 3-D one
        return objective, load_images(images, size=spec.image_size, count=spec.crops, c_in=target.c_in,
                                      ndim=target.ndim)
    except ConfigError as exc:
        raise ConfigError(f"{source}: objective.images: {exc}") from None


def load_stack_spec(config: ExperimentConfig, base: Path, source: str):
    return _stack(config.stack, base, f"{source}: stack")
