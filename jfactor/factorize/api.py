"""``factorize``: the best chain of small kernels for a target kernel, and how good it is.

A run normalises the target to unit norm (zero-padded to the chain's receptive field when
that is larger), draws ``restarts`` starting points (root splitting / SVD / random), runs
the optax phase and the Levenberg-Marquardt refinement on all restarts and targets in
batched, jitted calls, keeps the best restart per target, and measures the result
against the target and the baselines.  Non-finite restarts are dropped (and counted);
if none is left the run fails rather than report a NaN.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from jfactor.errors import ConfigError
from jfactor.factorize import baselines as baseline_lib
from jfactor.factorize import metrics
from jfactor.factorize.chain import Chain, FactorizationError, Target, chain_kernel_numpy, check_chain, to_stack
from jfactor.factorize.init import INITS, random_init, separable_init
from jfactor.factorize.objectives import Objective, load_images
from jfactor.factorize.solve import Problem, Solver, optimise
from jfactor.progress import ProgressBar
from jfactor.sharding import sharded_call
from jfactor.schema import unknown_key

DEFAULT_IMAGES = ("camera", "astronaut", "coins")
# tracing, lowering and XLA compilation: the first call of a geometry pays all three
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
_compile_seconds = [0.0]
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **_: _compile_seconds.__setitem__(0, _compile_seconds[0] + duration)
    if event in COMPILE_EVENTS else None)


@dataclasses.dataclass(frozen=True)
class Factorization:
    """One target's result.  Arrays are numpy float64 (or the run's dtype for factors).

    Attributes:
      factors: every layer's kernel ``(*k_i, C_{i-1}, C_i)``, frozen ones included.
      approx: the chain's folded kernel ``(*extent, C_in, C_out)``, in the target's scale.
      target_padded: the target zero-padded to the chain's extent (what approx is compared to).
      metrics: rel_error, max_abs_error, psnr_db, spectral_error, output_psnr_db.
      restart_errors: relative error of every restart (inf where it cannot be used).
      diverged: which restarts met a non-finite loss on the way.
      history: normalised loss ``|r|^2 / 2`` per step of every restart (R, steps).
      baselines: name -> {"rel_error", "time_s"[, "note"]}.
    """

    target: Target
    chain: Chain
    factors: list
    approx: np.ndarray
    target_padded: np.ndarray
    padding: tuple
    metrics: dict
    restart_errors: np.ndarray
    diverged: np.ndarray
    history: np.ndarray
    best: int
    time_s: float
    compile_s: float
    settings: dict
    baselines: dict

    @property
    def rel_error(self) -> float:
        return self.metrics["rel_error"]

    def approx_like_target(self) -> np.ndarray:
        """``approx`` with the target's own layout (spatial-only targets lose the channel axes)."""
        return self.approx[..., 0, 0] if self.settings["target_spatial_only"] else self.approx

    def to_stack(self, input_shape) -> "jfactor.Stack":  # noqa: F821
        """The chain as a Stack of valid convolutions on ``input_shape`` (*spatial, C_in)."""
        return to_stack(self.factors, self.chain, input_shape)

    def to_dict(self) -> dict:
        c_in, c_out = self.target.c_in, self.target.c_out
        finite = self.restart_errors[np.isfinite(self.restart_errors)]
        return {
            "target": {"name": self.target.name, "shape": list(self.target.kernel.shape),
                       "stride": list(self.target.stride), "padding": [list(p) for p in self.padding]},
            "chain": self.chain.describe(),
            **self.metrics,
            "params": self.chain.num_params(c_in, c_out),
            "macs": self.chain.macs_per_output(c_in, c_out),
            "dense_params": int(self.target.kernel.size),
            "dense_macs": int(self.target.kernel.size),
            "time_s": self.time_s,
            "compile_s": self.compile_s,
            "restarts": len(self.restart_errors),
            "diverged": int(np.sum(self.diverged)),
            "best_restart": self.best,
            "restart_errors": {"min": float(finite.min()), "median": float(np.median(finite)),
                               "max": float(finite.max())},
            "steps": int(self.history.shape[-1]),
            **self.settings,
            "baselines": self.baselines,
        }


def _as_target(target, name: str = "target") -> Target:
    return target if isinstance(target, Target) else Target.from_array(target, name=name)


def _inits(target: Target, chain: Chain, init: str, restarts: int, rng: np.random.Generator) -> list[list]:
    """``restarts`` full factor lists (frozen layers hold their weights).

    ``auto``: restart 0 splits roots and restart 1 fits SVD terms, where they apply (single
    channel, no frozen layer); the rest are random, for a broad search.  ``roots``/``svd``:
    every restart uses that init, later ones with other root groupings or ALS starts.
    """
    shapes = chain.factor_shapes(target.c_in, target.c_out)
    structured = not any(layer.frozen for layer in chain.layers)
    starts = []
    for r in range(restarts):
        kind = init if init in ("roots", "svd") else ("roots", "svd")[r] if init == "auto" and r < 2 else None
        factors = separable_init(target, chain, kind, rng, shuffle=r > 1) if kind and structured else None
        if factors is None and init in ("roots", "svd"):
            raise ConfigError(
                f"init {init}: needs a single-channel 1-D or 2-D target"
                + (" and a chain without dilation" if init == "roots" else "")
                + " and no frozen layers; use init auto or random")
        noise = random_init(shapes, rng)
        factors = noise if factors is None else [f + 1e-3 * n for f, n in zip(factors, noise)]  # wake unused channels
        starts.append([f if w is None else w for f, w in zip(factors, chain.weights)])
    return starts


def _given_starts(given, chain: Chain, target: Target, restarts: int, b: int) -> list[list]:
    """User starting points for target ``b``, checked against the chain's factor shapes."""
    shapes = chain.factor_shapes(target.c_in, target.c_out)
    given = [[np.asarray(f, np.float64) for f in factors] for factors in given]
    if len(given) > restarts:
        raise ConfigError(f"starts[{b}]: {len(given)} starting points for {restarts} restarts")
    for r, factors in enumerate(given):
        if [f.shape for f in factors] != shapes:
            raise FactorizationError(f"starts[{b}][{r}]: factor shapes {[f.shape for f in factors]}, "
                                     f"the chain needs {shapes}")
        if not all(np.isfinite(f).all() for f in factors):
            raise FactorizationError(f"starts[{b}][{r}]: non-finite factors")
    return given


def factorize_batch(targets, chain: Chain, *, objective: Objective | str = "kernel", solver: Solver | None = None,
                    restarts: int = 32, init: str = "auto", dtype: str = "float64", seed: int = 0,
                    starts=None, images=None, baselines=(), progress: bool = False, mesh=None,
                    shard: bool = False) -> list[Factorization]:
    """Factorize several targets of one geometry with one chain, in one batched call.

    Args:
      targets: list of :class:`Target` or arrays (see ``Target.from_array``), one shape.
      chain: the :class:`Chain` to fit.
      objective: ``kernel`` | ``spectral`` | ``images`` or an :class:`Objective`.
      solver: a :class:`Solver` (default: L-BFGS on half the restarts, then LM).
      restarts: starting points per target, optimised together.
      init: ``auto`` (root splitting and SVD for the first two where they apply, random
        for the rest), ``roots``, ``svd`` or ``random``.
      dtype: ``float64`` or ``float32``.
      seed: target ``b`` draws its starts from ``numpy.random.default_rng(seed + b)``, so
        ``factorize_batch(ts, seed=s)[b]`` starts where ``factorize(ts[b], seed=s + b)`` does.
      starts: per target, factor lists (``(*k_i, C_{i-1}, C_i)``, frozen layers included)
        to use as its first restarts (warm starts, or another tool's starting points); the
        remaining ``restarts - len(starts[b])`` are drawn by ``init``.
      images: (B, *spatial, C_in) for the ``images`` objective and the output-space metric
        (default: crops of skimage's camera, astronaut and coins).
      baselines: names from :data:`jfactor.factorize.baselines.BASELINES`.
      mesh, shard: spread the targets over the devices of ``mesh`` (``shard=True``: all
        devices), and over the processes of ``jax.distributed``, as
        :func:`jfactor.batch.fold_batch` does; results are the same.
    Returns:
      one :class:`Factorization` per target.
    """
    solver = solver or Solver()
    targets = [_as_target(t, f"targets[{i}]") for i, t in enumerate(targets)]
    if not targets:
        raise ConfigError("factorize_batch needs at least one target")
    geometry = {(t.kernel.shape, t.stride) for t in targets}
    if len(geometry) > 1:
        raise FactorizationError(f"targets of one batch must share shape and stride, got {sorted(geometry)}")
    if init not in INITS:
        raise ConfigError(unknown_key(init, INITS, "init"))
    if dtype not in ("float32", "float64"):
        raise ConfigError(f"dtype must be float32 or float64, got {dtype!r}")
    if not isinstance(restarts, int) or restarts < 1:
        raise ConfigError(f"restarts must be a positive integer, got {restarts!r}")
    first = targets[0]
    if isinstance(objective, str):
        objective = Objective(objective, stride=first.stride)
    elif not objective.stride:
        objective = dataclasses.replace(objective, stride=first.stride)
    padding = check_chain(chain, first)
    problem = Problem(chain, first.c_in, first.c_out, objective, solver)
    if not problem.free:
        raise FactorizationError("every layer of the chain is frozen: there is nothing to learn")
    np_dtype = np.dtype(dtype)
    if images is None:
        images = load_images(DEFAULT_IMAGES, size=max(64 if first.ndim < 3 else 16, 4 * max(chain.extent)), count=2,
                             c_in=first.c_in, seed=seed, ndim=first.ndim)
    images = np.asarray(images, np.float64)
    if images.ndim != first.ndim + 2 or images.shape[-1] != first.c_in:
        raise ConfigError(f"images must be (B, *spatial, {first.c_in}), got {images.shape}")

    norms = [float(np.linalg.norm(t.kernel)) for t in targets]
    padded = [np.pad(t.kernel, list(padding) + [(0, 0), (0, 0)]) for t in targets]
    normalised = jnp.asarray(np.stack([p / n for p, n in zip(padded, norms)]), np_dtype)
    if starts is not None and len(starts) != len(targets):
        raise ConfigError(f"starts has {len(starts)} entries for {len(targets)} targets (one list per target)")
    starts = [_given_starts(given, chain, first, restarts, b) for b, given in enumerate(starts or [[]] * len(targets))]
    starts = [given + _inits(t, chain, init, restarts - len(given), np.random.default_rng(seed + b))
              for b, (t, given) in enumerate(zip(targets, starts))]
    free = tuple(jnp.asarray(np.stack([[s[i] for s in per_target] for per_target in starts]), np_dtype)
                 for i in problem.free)
    frozen = [None if w is None else jnp.asarray(w, np_dtype) for w in chain.weights]
    objective_images = jnp.asarray(images, np_dtype) if objective.name == "images" else None

    compile_before = _compile_seconds[0]
    start = time.perf_counter()
    label = f"factorizing {len(targets)} target(s) x {restarts} restarts"
    total_steps = solver.steps * (solver.optimizer != "none") + solver.refine_steps * (solver.refine == "lm")
    with ProgressBar(progress, total_steps, label) as bar:
        free, history, losses, errors, diverged = sharded_call(
            lambda batch: optimise(problem, batch[1], frozen, batch[0], objective_images, bar),
            (normalised, free), mesh=mesh, shard=shard)
    elapsed = time.perf_counter() - start
    compile_s = _compile_seconds[0] - compile_before

    # a diverged restart keeps its best finite point; only LM (which never accepts a
    # non-finite step) can carry it on
    results = []
    for b, target in enumerate(targets):
        ok = np.isfinite(losses[b]) & np.isfinite(errors[b]) & (~diverged[b] | (solver.refine == "lm"))
        if not ok.any():
            raise FactorizationError(
                f"{target.name}: all {restarts} restarts diverged (non-finite loss); lower the learning "
                "rate, use optimizer lbfgs, or check the target's scale")
        best = int(np.argmin(np.where(ok, losses[b], np.inf)))
        results.append(_result(target, chain, problem, [np.asarray(f, np.float64)[b, best] for f in free],
                               norms[b], padded[b], padding, np.where(ok, errors[b], np.inf), diverged[b],
                               history[b], best,
                               elapsed / len(targets), compile_s / len(targets),
                               _settings(objective, solver, init, dtype, restarts, seed, target),
                               images, baselines, starts[b], seed))
    return results


def _settings(objective: Objective, solver: Solver, init: str, dtype: str, restarts: int, seed: int,
              target: Target) -> dict:
    return {"objective": objective.label, "solver": dataclasses.asdict(solver), "init": init, "dtype": dtype,
            "seed": seed, "target_spatial_only": target.spatial_only}


def _result(target, chain, problem, free, norm, padded, padding, errors, diverged, history, best, elapsed, compile_s,
            settings, images, baseline_names, starts, seed) -> Factorization:
    n_free = len(problem.free)
    scale = norm ** (1.0 / n_free)
    free = iter(f * scale for f in free)
    factors = [next(free) if w is None else np.asarray(w, np.float64) for w in chain.weights]
    approx = chain_kernel_numpy(factors, chain)
    measured = metrics.summary(approx, padded)
    measured["output_psnr_db"] = metrics.output_psnr_db(approx, padded, images, target.stride)
    table = baseline_lib.run_baselines(baseline_names, padded / norm, chain, starts, seed) if baseline_names else {}
    return Factorization(target, chain, factors, approx, padded, padding, measured, errors, diverged, history, best,
                         elapsed, compile_s, settings, table)


def factorize(target, chain: Chain, *, starts=None, **options) -> Factorization:
    """Factorize one target; see :func:`factorize_batch` for the options.

    ``starts`` is a list of factor lists (this target's); ``baselines`` defaults to
    :data:`~jfactor.factorize.baselines.DEFAULT_BASELINES` here.
    """
    options.setdefault("baselines", baseline_lib.DEFAULT_BASELINES)
    return factorize_batch([target], chain, starts=None if starts is None else [starts], **options)[0]


__all__ = ["Factorization", "factorize", "factorize_batch"]
