"""``factorize``: the best chain of small kernels for a target kernel, and how good it is.

A run normalises the target to unit norm (zero-padded to the chain's receptive field when
that is larger), draws starting points in waves (root splitting / SVD / lines / blurs /
random, later also perturbations and blur hops from the best so far), runs the optax phase and the
Levenberg-Marquardt refinement on all restarts and targets of a wave in batched, jitted
calls, screening them during LM, until :mod:`jfactor.factorize.multistart`'s stopping rule
holds; it keeps the best restart per target, measures the result against the target and the
baselines, and says how sure it is (``evidence``).  Non-finite restarts are dropped (and
counted); if none is left the run fails rather than report a NaN.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from jfactor import code_mappings
from jfactor._checks import is_int
from jfactor.cache import compile_stats
from jfactor.errors import ConfigError
from jfactor.factorize import baselines as baseline_lib
from jfactor.factorize import budget, metrics
from jfactor.factorize import multistart, solve, symmetry
from jfactor.factorize.chain import (Chain, FactorizationError, Target, chain_kernel, chain_kernel_numpy, check_chain,
                                    to_stack)
from jfactor.factorize.init import (INITS, blur_hop, blur_init, blur_target, comb_init, fit_target, has_line_axis,
                                    impulse_start, line_init, projection_starts, random_init, redraw_hop, refit_one,
                                    separable_init)
from jfactor.factorize.multistart import SearchPolicy
from jfactor.factorize.objectives import Objective, factor_fits, factor_taps, gram_factor, load_images
from jfactor.factorize.solve import Problem, Solver, bucket, optimise, residual_size
from jfactor.host_blas import serial_blas
from jfactor.one_at_a_time import one_at_a_time
from jfactor.progress import ProgressBar
from jfactor.sharding import check_mesh, sharded_call
from jfactor.schema import unknown_key

DEFAULT_IMAGES = ("camera", "astronaut", "coins")
ELITE = 8  # distinct minima kept: crossovers' parents
HOP_SOURCES = 4  # of them, the best ones, whose factors later waves perturb (noise and blur hops)
PROJECTED = 1  # projection starts (jfactor.factorize.init.projection_starts), the best fitted, in the first wave


@dataclasses.dataclass(frozen=True)
class Factorization:
    """One target's result.  Arrays are numpy float64, a float32 run's factors too (its values).

    Attributes:
      factors: every layer's kernel ``(*k_i, C_{i-1}, C_i)``, frozen ones included.
      approx: the chain's folded kernel ``(*extent, C_in, C_out)``, in the target's scale.
      target_padded: the target zero-padded to the chain's extent (what approx is compared to).
      metrics: rel_error, max_abs_error, psnr_db, spectral_error, output_psnr_db.
      restart_errors: relative error of every restart, all waves (inf where it cannot be used;
        a screened-out restart's error where it stopped).
      diverged: which restarts met a non-finite loss on the way.
      pruned: which restarts were screened out before they converged.
      evidence: how sure the best is (:func:`jfactor.factorize.multistart.evidence`), with
        ``stopped`` (why the search ended), ``waves`` and ``warning`` (None or a sentence).
      history: normalised loss ``|r|^2 / 2`` per step of every restart of the wave that
        found the best (R_wave, steps).
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
    pruned: np.ndarray
    evidence: dict
    history: np.ndarray
    best: int
    time_s: float
    compile_s: float
    compiles: int
    settings: dict
    baselines: dict

    def __repr__(self) -> str:
        found = self.evidence
        return (f"Factorization({self.chain.describe()} for {self.target.name}: rel_error {self.rel_error:.3e}, "
                f"best of {found['restarts']} restarts reached {found['best_hits']} times, stopped: "
                f"{found['stopped']})")

    @property
    def rel_error(self) -> float:
        return self.metrics["rel_error"]

    @property
    def history_row(self) -> int:
        """The best restart's row of ``history`` (every wave has the same number of restarts)."""
        return self.best % self.history.shape[0]

    def approx_like_target(self, crop: bool = True) -> np.ndarray:
        """``approx`` in the target's layout (without the channel axes for spatial-only targets),
        cropped to the target's support where the chain's extent is larger (``padding``), or with
        ``crop=False`` whole: the chain's folded kernel, the one convolution that replaces it."""
        window = tuple(slice(lo, n - hi) if crop else slice(None)
                       for (lo, hi), n in zip(self.padding, self.approx.shape))
        approx = self.approx[window]
        return approx[..., 0, 0] if self.settings["target_spatial_only"] else approx

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
            "compiles": self.compiles,
            "restarts": len(self.restart_errors),
            "diverged": int(np.sum(self.diverged)),
            "best_restart": self.best,
            "restart_errors": {"min": float(finite.min()), "median": float(np.median(finite)),
                               "max": float(finite.max())},
            "evidence": self.evidence,
            "steps": int(self.history.shape[-1]),
            **self.settings,
            "baselines": self.baselines,
        }


def _as_target(target, name: str = "target") -> Target:
    return target if isinstance(target, Target) else Target.from_array(target, name=name)


NEEDS = {  # what a structured init needs of the target and chain (besides no frozen layers)
    "roots": "a single-channel 1-D or 2-D target and a chain without dilation",
    "svd": "a single-channel 1-D or 2-D target",
    "lines": "a single-channel 2-D target with a slanted long axis (a line or motion blur at an angle) and a chain "
             "without dilation",
    "blurs": "a single-channel band-pass target (little gain at zero frequency) and a chain of width 1",
}


def _with_weights(factors: list, chain: Chain) -> list:
    """A full factor list with each frozen layer's slot holding its weights (the solver takes those)."""
    return [f if w is None else w for f, w in zip(factors, chain.weights)]


def _draw(target: Target, chain: Chain, init: str, count: int, rng: np.random.Generator, wave: int,
          group: list, symmetries: list, projected: list = ()) -> tuple[list[list], np.ndarray, np.ndarray]:
    """``count`` full factor lists (frozen layers hold their weights) for wave ``wave``, which
    of them are independent evidence (count,): all but the impulse and comb starts and those that
    share the target's grid symmetries ``symmetries`` (:func:`jfactor.factorize.symmetry.grid_symmetries`,
    the point reflection included, where ``group``, the symmetric starts', leaves it out;
    :func:`jfactor.factorize.symmetry.shares`),
    and which are blur starts (count,): an impulse start made from one is not.

    ``auto``: in the first wave restart 0 splits roots and restart 1 fits SVD terms, where
    they apply (single channel, no frozen layer); later waves give an eighth of their starts
    new root groupings; the next half are lines along the target's slanted axis where it has
    one (:func:`jfactor.factorize.init.line_init`; every other pair grid-spaced; where it has
    none, a quarter are random), the next quarter blurs (isotropic along the axes ``group``
    exchanges) and one fitted factor where the target passes a band and the chain has one
    channel (:func:`jfactor.factorize.init.blur_init`);
    the rest (and those, where they do not apply) are random, for a broad search, and every
    other one of them shares the target's grid symmetries ``group`` where it has mirror ones
    (:func:`jfactor.factorize.symmetry.start_group`).  Where a factor can be refitted (one
    channel, :func:`jfactor.factorize.init.fit_target`), about a quarter of the starts after
    the root groupings and the first line, neither grid-spaced lines nor symmetric ones,
    become impulse starts (:func:`jfactor.factorize.init.impulse_start`); with two layers,
    where an impulse and a refit leave nothing random, only the first two of the first wave
    (one per layer).  Those gather in few basins, which on some
    targets lie far above the best (the 11x11 line at 45 degrees: 2-4x), so their hits do not
    count towards ``repeated`` (:mod:`jfactor.factorize.multistart`): counted, they stopped one
    search in ten there at 3.97x after 256 restarts.  Where lines apply, the last odd slot and the
    odd one before it, where they come after the separable starts, are comb starts
    (:func:`jfactor.factorize.init.comb_init`: the doubling spacings, then random ones), not
    independent evidence either (a basin per spacing).  Nor are starts that share the target's
    grid symmetries (symmetric starts; blur starts, centred and isotropic, on a target with
    mirrors, and centred, so even, on a Gabor or a line, whose one symmetry is the point
    reflection): LM keeps them in the symmetric subspace, so their hits show the best symmetric
    minimum, not the best (the 15x15 LoG's is 1.065x above it).  Counted, they stopped one of the LoG's
    searches (seeds 400-409 and 470-479 run on to 1,024 restarts, replayed) `repeated` at that
    minimum after 256 restarts (without them it reached the best), and one of the 15x15 ring's at
    its 1.09x one after 384 (without them it stalled there after 512).
    The ``projected`` starts (full factor lists; the first wave's, :func:`_projected`) take the
    slots after the separable ones, in place of the first lines, blurs or random starts.
    ``roots``/``svd``/``lines``/``blurs``: every restart uses that init, later ones with other
    root groupings (or ALS starts, other lines, other blurs).
    """
    shapes = chain.factor_shapes(target.c_in, target.c_out)
    structured = not any(layer.frozen for layer in chain.layers)
    orbits = symmetry.axis_orbits(group, chain.ndim)
    fit = fit_target(target, chain) if init == "auto" and len(chain.layers) > 1 else None
    starts, independent, blurred = [], np.ones(count, bool), np.zeros(count, bool)
    separable = 2 if wave == 0 else count // 8  # the separable starts of an auto wave, lines next
    # half, not a quarter, where lines apply: 124 of 140 default runs of the line targets of
    # experiments/bench_optimality.py within 1.01x of the best known instead of 111
    slanted = init == "auto" and has_line_axis(target, chain)  # line and comb starts apply
    lines = count // 2 if slanted else count // 4
    # impulse starts: even slots (not symmetric) of the unit-spaced line pairs, after the first line (unshuffled)
    impulses = [] if fit is None else [r for r in range(separable + 1, count) if r % 2 == 0 and (r - separable) % 4 < 2]
    if len(chain.layers) == 2:  # an impulse and a refit leave nothing random: each layer's once
        impulses = impulses[:2] if wave == 0 else []
    # comb starts where lines apply: the last odd slot (the doubling spacings) and the odd one before it (random
    # ones), never an impulse slot (even)
    last = count - 1 - (count % 2)
    combs = {r: r == last - 2 for r in (last, last - 2) if r > separable} if slanted else {}
    for r in range(count):
        if init != "auto":
            kind = None if init == "random" else init
        elif r < separable:
            kind = ("roots", "svd")[r] if wave == 0 else "roots"
        else:
            kind = ("lines" if r < separable + lines else "blurs" if r < separable + lines + count // 4
                    else None)
        factors = None
        if 0 <= r - separable < len(projected):
            factors = projected[r - separable]
        elif r in combs:
            factors = comb_init(target, chain, rng, shuffle=combs[r])
            independent[r] = False
        elif kind == "lines":
            first = 0 if init == "lines" else separable  # the first line slot
            factors = line_init(target, chain, rng, shuffle=wave > 0 or r > first, grid=(r - first) % 4 >= 2)
        elif kind == "blurs":
            factors = blur_init(target, chain, rng, orbits)
            blurred[r] = factors is not None
        elif kind and structured:
            factors = separable_init(target, chain, kind, rng, shuffle=wave > 0 or r > 1)
        if factors is None and init in NEEDS:
            raise ConfigError(f"init {init}: needs {NEEDS[init]} and no frozen layers; use init auto or random")
        noise = random_init(shapes, rng)
        if factors is None:
            symmetric = init == "auto" and structured and bool(group) and r % 2 == 1
            factors = symmetry.symmetric_start(noise, group, rng) if symmetric else noise
        elif any(w > 1 for w in chain.widths):  # wake the channels the separable terms leave unused
            factors = [f + 1e-3 * n for f, n in zip(factors, noise)]
        if r in impulses:
            factors = impulse_start(factors, fit, chain, rng, impulses.index(r) if len(chain.layers) == 2 else None)
            independent[r] = False
            blurred[r] = False
        starts.append(_with_weights(factors, chain))
        # LM keeps a symmetric start symmetric: its hits say the best is the best symmetric minimum, not the best
        independent[r] &= not symmetry.shares(starts[-1], symmetries)
    return starts, independent, blurred


def _blur_hops(target: Target, chain: Chain, group: list):
    """``move(factors, rng)``: a blur hop (:func:`jfactor.factorize.init.blur_hop`, its blurs
    isotropic along the axes the target's symmetries ``group`` exchange) for a target where
    blur starts apply and a chain of two or more layers; None elsewhere (noise hops only)."""
    kernel = blur_target(target, chain)
    if kernel is None or len(chain.layers) < 2:
        return None
    orbits = symmetry.axis_orbits(group, chain.ndim)
    return lambda factors, rng: blur_hop(factors, kernel, chain, rng, orbits)


def _redraw_hops(target: Target, chain: Chain, group: list):
    """``redraw(factors, rng)``: a redraw hop (:func:`jfactor.factorize.init.redraw_hop`, its
    draw projected onto the target's mirror symmetries ``group``, :func:`symmetry.start_group`)
    for a target that has them (not a 1-D one: its mirror is the point reflection, which gives
    no symmetric starts), where no blur hops apply (:func:`_blur_hops`), a factor can be
    refitted (one channel, width 1, no frozen layer) and the chain has three or more layers
    (with two a hop would keep nothing of its minimum); None elsewhere.

    Over seeds 400-439 of ``experiments/bench_optimality.py``, the 15x15 ring into 3-5-9 landed
    within 1.01x of its best known in 32 of 40 runs with them instead of 16, the 11x11 line at 45
    degrees in 40 instead of 38, the 11x11 ring in 40 as before.  A trial of them on every
    target without blur hops, with the draw unprojected where the target has no mirrors (lines
    at other angles, the motion blur, random kernels), gained those targets no run, took them
    15-37% more time and lost the line at 40 degrees 3 runs; from the ring's 1.026x minimum
    unprojected draws reached its best in 1 of 128 hops, projected ones in 30.
    """
    kernel = fit_target(target, chain)
    if not group or kernel is None or len(chain.layers) < 3 or blur_target(target, chain) is not None:
        return None  # (with three or more layers, blur hops apply wherever blur starts do)
    return lambda factors, rng: redraw_hop(factors, kernel, chain, rng, group)


def _projected(target: Target, chain: Chain, init: str, group: list, rng: np.random.Generator) -> list[list]:
    """The first wave's :data:`PROJECTED` best projection starts
    (:func:`jfactor.factorize.init.projection_starts`, full factor lists) with the ``auto`` init
    on a target with mirror symmetries ``group``; [] elsewhere.

    On the 15x15 ring into 3-5-9 the best of them lands in the best basin, which random,
    symmetric and root starts reach about once in 500 (seeds 0, 4 and 6 of
    ``experiments/bench_optimality.py`` stalled 1.09x above it; with it seeds 0-9 and 100-109
    all reached it); on the 11x11 ring, the DoG and the 9x9 disk too.  Only the best: with the
    four best the LoG, whose best chain is not symmetric, stopped in its best symmetric minimum
    (1.065x) at held-out seed 101, with the best alone none of its seeds 0-9 and 100-109 did.
    They share the target's mirrors, so their hits are not independent evidence.  Not where
    line starts apply (:func:`jfactor.factorize.init.has_line_axis`: the first line start keeps
    its slot), nor without mirrors (lines, Gabors, random kernels): there they were not
    measured.  They draw from a child of ``rng``, which leaves its stream as it was."""
    if init != "auto" or not group or has_line_axis(target, chain):
        return []
    return [_with_weights(factors, chain) for factors in projection_starts(target, chain, rng.spawn(1)[0])[:PROJECTED]]


def _refits(target: Target, chain: Chain):
    """``refit(factors, rng)``: one factor (drawn) refitted by least squares given the others
    (:func:`jfactor.factorize.init.refit_one`) where a factor can be refitted
    (:func:`jfactor.factorize.init.fit_target`) and the chain has two or more layers; None elsewhere."""
    kernel = fit_target(target, chain)
    if kernel is None or len(chain.layers) < 2:
        return None
    return lambda factors, rng: refit_one(factors, kernel, chain, rng)


def _checked_baselines(baselines) -> tuple[str, ...]:
    """``baselines`` as a tuple of names from :data:`jfactor.factorize.baselines.BASELINES`; a
    :class:`ConfigError` otherwise."""
    if isinstance(baselines, str) or not isinstance(baselines, (list, tuple)):
        raise ConfigError(f"baselines must be a list of names from {', '.join(baseline_lib.BASELINES)} (() for "
                          f"none), got {baselines!r}")
    for name in baselines:
        if not isinstance(name, str) or name not in baseline_lib.BASELINES:
            raise ConfigError(unknown_key(str(name), baseline_lib.BASELINES, "baseline"))
    return tuple(baselines)


def _checked_images(images, target: Target, extent: tuple[int, ...]) -> np.ndarray:
    """The user's ``images`` as float64 (B, *spatial, C_in), each spatial size at least the kernel's
    ``extent`` they are filtered with, all finite; a :class:`ConfigError` naming what is wrong."""
    if np.iscomplexobj(images):
        raise ConfigError("images are complex: give real images")
    images = np.asarray(images, np.float64)
    if images.ndim != target.ndim + 2 or images.shape[-1] != target.c_in:
        raise ConfigError(f"images must be (B, *spatial, {target.c_in}), got {images.shape}")
    if images.shape[0] == 0:
        raise ConfigError(f"images hold no image (B = 0 of shape {images.shape}): give at least one")
    if any(n < k for n, k in zip(images.shape[1:-1], extent)):
        raise ConfigError(f"images {images.shape[1:-1]} are smaller than the kernel they are filtered with "
                          f"{extent} (the chain's extent or the target's): give larger images")
    if not np.isfinite(images).all():
        raise ConfigError("images have non-finite values (NaN or inf)")
    if not images.any():  # before, with the kernel objective: an output PSNR of None, "agree bit for bit"
        raise ConfigError("images are all zero: the output metric (and the images objective) compares the "
                          "kernels' outputs on them; give images with content")
    flat = np.flatnonzero(~np.ptp(images, axis=tuple(range(1, images.ndim - 1))).any(axis=0))
    if flat.size:  # before: 302 dB at a kernel error of 0.83, where every channel was constant
        raise ConfigError(f"images are constant in input channel(s) {flat.tolist()} (one value per image): the output "
                          "metric (and the images objective) would see only the sum of the kernel's taps there; give "
                          "images with content in every channel")
    return images


def _check_frozen_range(chain: Chain, dtype: np.dtype) -> None:
    """A :class:`ConfigError` where a frozen layer's weights overflow ``dtype`` (float32: the restarts
    diverged, and the message blamed the optimizer)."""
    for i, weights in enumerate(chain.weights):
        largest = 0.0 if weights is None else float(np.abs(weights).max())
        if largest > float(np.finfo(dtype).max):  # as Python floats: no cast to dtype, no overflow warning
            raise ConfigError(f"frozen layer {i}: its weights (largest |w| {largest:.3g}) overflow {dtype.name}; "
                              "scale them down or factorize in float64")


def _given_starts(given, chain: Chain, target: Target, restarts: int, b: int) -> list[list]:
    """User starting points for target ``b`` (None: none), checked against the chain's factor shapes:
    real, finite, and at most one free layer's factor all zero (with two, every gradient is zero:
    LM stays at the zero kernel, error 1)."""
    shapes = chain.factor_shapes(target.c_in, target.c_out)
    if given is not None and not isinstance(given, (list, tuple)):  # before: TypeError, or numpy's truth value
        raise FactorizationError(f"starts[{b}]: a list of starting points (each a list of factor arrays, one per "
                                 f"layer), got {type(given).__name__}")
    checked = []
    for r, factors in enumerate(given or []):
        try:
            factors = [np.asarray(f) for f in factors]
        except (TypeError, ValueError) as exc:  # ragged nested lists, not a list at all
            raise FactorizationError(f"starts[{b}][{r}]: not a list of factor arrays ({exc})") from None
        if [f.shape for f in factors] != shapes:
            raise FactorizationError(f"starts[{b}][{r}]: factor shapes {[f.shape for f in factors]}, "
                                     f"the chain needs {shapes}")
        if any(f.dtype.kind in "cbOSU" for f in factors):  # complex, bool, objects, strings (bfloat16 is fine)
            raise FactorizationError(f"starts[{b}][{r}]: factors must be real numbers, got "
                                     f"{', '.join(sorted({str(f.dtype) for f in factors}))}")
        factors = [f.astype(np.float64) for f in factors]
        if not all(np.isfinite(f).all() for f in factors):
            raise FactorizationError(f"starts[{b}][{r}]: non-finite factors")
        zero = [i for i, (f, w) in enumerate(zip(factors, chain.weights)) if w is None and not f.any()]
        if len(zero) > 1:  # each factor's gradient holds every other factor: one zero is left, two never
            raise FactorizationError(f"starts[{b}][{r}]: layers {', '.join(map(str, zero))} are all zero, so every "
                                     "gradient is zero: a stationary point no step leaves")
        checked.append(factors)
    if len(checked) > restarts:
        raise ConfigError(f"starts[{b}]: {len(checked)} starting points for {restarts} restarts")
    return checked


@dataclasses.dataclass
class _Record:
    """Every restart of one target so far, across waves (numpy, restart axis first)."""

    first_starts: list
    tolerance: float  # relative, between the losses of one minimum (multistart.LOSS_TOLERANCE of the run's dtype)
    losses: list = dataclasses.field(default_factory=list)
    errors: list = dataclasses.field(default_factory=list)
    diverged: list = dataclasses.field(default_factory=list)
    pruned: list = dataclasses.field(default_factory=list)
    independent: list = dataclasses.field(default_factory=list)
    best_loss: float = np.inf
    best_free: list | None = None
    best_history: np.ndarray | None = None
    best_index: int = -1
    elite: list = dataclasses.field(default_factory=list)
    stopped: str | None = None
    found: list = dataclasses.field(default_factory=list)

    def add(self, free, history, losses, errors, diverged, pruned, independent, usable: bool) -> None:
        """One wave's (R, ...) results; ``usable``: whether diverged restarts may still count."""
        ok = np.isfinite(losses) & np.isfinite(errors) & (~diverged | usable)
        offset = sum(map(len, self.losses))
        for name, value in (("losses", losses), ("errors", np.where(ok, errors, np.inf)), ("diverged", diverged),
                            ("pruned", pruned), ("independent", independent)):
            getattr(self, name).append(np.asarray(value))
        candidates = [(float(losses[r]), [f[r] for f in free]) for r in np.flatnonzero(ok & ~pruned)]
        self.elite = multistart.elite(self.elite + candidates, ELITE, self.tolerance)
        if ok.any():
            best = int(np.argmin(np.where(ok, losses, np.inf)))
            if losses[best] < self.best_loss:
                self.best_loss, self.best_history, self.best_index = float(losses[best]), history, offset + best
                self.best_free = [f[best] for f in free]

    def joined(self, name: str) -> np.ndarray:
        return np.concatenate(getattr(self, name))

    def ranked_errors(self, objective: Objective) -> np.ndarray:
        """The errors the evidence groups and ranks restarts by, as the result is chosen (R,): the
        kernel's relative errors for the kernel objective (its loss is half their square), the
        objective's own (:meth:`Objective.error_of_loss`) for the others, whose best by loss may
        not be the best kernel; inf where a restart's result is not usable."""
        errors = self.joined("errors")
        if objective.name == "kernel":
            return errors
        return np.where(np.isfinite(errors), objective.error_of_loss(self.joined("losses")), np.inf)


@one_at_a_time
def factorize_batch(targets, chain: Chain, *, objective: Objective | str = "kernel", solver: Solver | None = None,
                    restarts: int | None = None, budget_s: float | None = None, search: SearchPolicy | None = None,
                    init: str = "auto", dtype: str = "float64", seed: int = 0, starts=None, images=None,
                    baselines=(), progress: bool = False, mesh=None, shard: bool = False) -> list[Factorization]:
    """Factorize several targets of one geometry with one chain, in batched calls.

    Args:
      targets: list of :class:`Target` or arrays (see ``Target.from_array``), one shape.
      chain: the :class:`Chain` to fit.
      objective: ``kernel`` | ``spectral`` | ``images`` or an :class:`Objective`.
      solver: a :class:`Solver` (default: L-BFGS on half the restarts, then LM).
      restarts: exactly this many restarts per target, every one refined to convergence.
        None (default): restarts in screened waves until the best minimum has been found
        repeatedly, the result is exact, or a budget is spent (:mod:`.multistart`).
      budget_s: stop starting new waves after this many seconds.
      search: a :class:`SearchPolicy` with every knob of the waves (``restarts`` and
        ``budget_s``, where given, override its fields).
      init: ``auto`` (root splitting and SVD for the first two where they apply, then line
        and blur starts where they apply, random for the rest, some of them impulse starts;
        see ``_draw``), ``roots``,
        ``svd``, ``lines``, ``blurs`` or ``random``.
      dtype: ``float64`` or ``float32``.
      seed: target ``b`` draws its starts from ``numpy.random.default_rng(seed + b)``, so
        ``factorize_batch(ts, seed=s)[b]`` starts where ``factorize(ts[b], seed=s + b)`` does;
        the default images (the ``images`` objective's and the output metric's) are drawn with
        ``seed``, one set for the whole batch (``factorize`` with ``images=`` those reproduces it).
      starts: per target, factor lists (``(*k_i, C_{i-1}, C_i)``, frozen layers included: their
        slot holds any finite real array of their shape, and their weights are used) to use as its first
        restarts (warm starts, or another tool's starting points; None: none for that target);
        the rest of the first wave is drawn by ``init``.
      images: (B, *spatial, C_in) for the ``images`` objective and the output-space metric
        (default: crops of skimage's camera, astronaut and coins).
      baselines: names from :data:`jfactor.factorize.baselines.BASELINES`.
      mesh, shard: spread the targets over the devices of ``mesh`` (``shard=True``: all
        devices), and over the processes of ``jax.distributed``, as
        :func:`jfactor.batch.fold_batch` does; results are the same.
    Returns:
      one :class:`Factorization` per target, with its :attr:`~Factorization.evidence`.
    """
    for name, value, kind in (("solver", solver, Solver), ("search", search, SearchPolicy)):
        if value is not None and not isinstance(value, kind):
            raise ConfigError(f"{name} must be a {kind.__name__} (for example {kind.__name__}()), got "
                              f"{type(value).__name__}")
    if not isinstance(objective, (str, Objective)):
        raise ConfigError(f"objective must be a name ('kernel', 'images', 'spectral') or an Objective, got "
                          f"{type(objective).__name__}")
    baselines = _checked_baselines(baselines)
    check_mesh(mesh, shard)
    solver = solver or Solver()
    policy = dataclasses.replace(search or SearchPolicy(), **{k: v for k, v in
                                                              (("restarts", restarts), ("budget_s", budget_s))
                                                              if v is not None or search is None})
    if not isinstance(chain, Chain):
        raise ConfigError(f"chain must be a Chain (for example Chain.build([3, 5, 9])), got {type(chain).__name__}")
    if not is_int(seed) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    targets = [_as_target(t, f"targets[{i}]") for i, t in enumerate(targets)]
    if not targets:
        raise ConfigError("factorize_batch needs at least one target")
    other = next((i for i, t in enumerate(targets) if (t.kernel.shape, t.stride) != (targets[0].kernel.shape,
                                                                                       targets[0].stride)), None)
    if other is not None:
        raise FactorizationError(f"targets of one batch must share shape and stride: targets[{other}] has shape "
                                 f"{targets[other].kernel.shape} and stride {targets[other].stride}, targets[0] "
                                 f"{targets[0].kernel.shape} and {targets[0].stride}")
    if init not in INITS:
        raise ConfigError(unknown_key(init, INITS, "init"))
    dtype = getattr(dtype, "__name__", None) or str(getattr(dtype, "name", dtype))  # np.float32, np.dtype, "float32"
    if dtype not in ("float32", "float64"):
        raise ConfigError(f"dtype must be float32 or float64, got {dtype!r}")
    first = targets[0]
    if isinstance(objective, str):
        objective = Objective(objective, stride=first.stride)
    elif not objective.stride:
        objective = dataclasses.replace(objective, stride=first.stride)
    if len(objective.stride) != first.ndim:
        raise ConfigError(f"objective stride {objective.stride} has {len(objective.stride)} entries for a "
                          f"{first.ndim}-D target")
    if tuple(objective.stride) != tuple(first.stride):  # before: the images were filtered at the objective's
        raise ConfigError(f"objective stride {tuple(objective.stride)} is not the target's {first.stride}: the "
                          "objective measures the target's map; leave its stride out (it is the target's)")
    padding = check_chain(chain, first)
    code_mappings.drop_when_crowded()  # a long sweep or search compiles many chains' programs in one process
    np_dtype = np.dtype(dtype)
    _check_frozen_range(chain, np_dtype)
    size = policy.wave_size
    extent = tuple(chain.extent)  # the target zero-padded to it
    side = max(64 if first.ndim < 3 else 16, 4 * max(extent))  # the default images'
    if images is not None:
        images = _checked_images(images, first, extent)
    # the whole cost from shapes, before any array is made (a huge chain once ran out of memory padding its target)
    image_shape = images.shape if images is not None else (2 * len(DEFAULT_IMAGES),) + (side,) * first.ndim + (
        first.c_in,)
    padded_shape = extent + first.kernel.shape[-2:]
    # the images objective from the images' Gram factor where it fits (decided here, whatever the caller's
    # objective said): the same steps, far fewer residuals
    factored = objective.name == "images" and factor_fits(image_shape, padded_shape, objective.stride)
    objective = dataclasses.replace(objective, factored=factored)
    # adaptive searches screen restarts every ``segment`` LM iterations
    problem = Problem(chain, first.c_in, first.c_out, objective,
                      dataclasses.replace(solver, chunk=policy.segment) if policy.adaptive else solver)
    spec = lambda shape: jax.ShapeDtypeStruct(shape, np_dtype)  # noqa: E731
    objective_shape = (factor_taps(padded_shape),) * 2 if factored else image_shape
    residuals = residual_size(objective, spec(padded_shape),
                              spec(objective_shape) if objective.name == "images" else None)
    solve.check_hessian(problem, residuals)
    cost = budget.estimate(chain, first.c_in, first.c_out, problem.free, residuals, len(targets) * size,
                           size, solver, np_dtype.itemsize, baselines, cpu=jax.default_backend() == "cpu",
                           arrays=budget.arrays(padded_shape, len(targets),
                                                0 if images is not None else math.prod(image_shape),
                                                residuals if objective.name == "images" else 0,
                                                factor_taps(padded_shape) if factored else 0))
    budget.check(cost, f"{first.name}: chain {chain.describe()}")
    norms = [metrics.norm(t.kernel) for t in targets]
    padded = [np.pad(t.kernel, list(padding) + [(0, 0), (0, 0)]) for t in targets]
    normalised = np.stack([p / n for p, n in zip(padded, norms)])
    if images is None:
        images = load_images(DEFAULT_IMAGES, size=side, count=2, c_in=first.c_in, seed=seed, ndim=first.ndim)

    if starts is not None and not isinstance(starts, (list, tuple)):
        raise ConfigError(f"starts: one list of starting points per target, got {type(starts).__name__}")
    if starts is not None and len(starts) != len(targets):
        raise ConfigError(f"starts has {len(starts)} entries for {len(targets)} targets (one list per target)")
    given = [_given_starts(g, chain, first, size, b)
             for b, g in enumerate(starts if starts is not None else [None] * len(targets))]
    rngs = [np.random.default_rng(seed + b) for b in range(len(targets))]
    units = [dataclasses.replace(t, kernel=t.kernel / n) for t, n in zip(targets, norms)]  # starts are scale-free
    groups = [symmetry.start_group(k, chain) for k in normalised]
    symmetries = [symmetry.grid_symmetries(k, chain) for k in normalised]  # for the evidence (see _draw)
    moves = [_blur_hops(u, chain, g) for u, g in zip(units, groups)]
    refits = [_refits(u, chain) for u in units]
    redraws = [_redraw_hops(u, chain, g) for u, g in zip(units, groups)]
    projected = [_projected(u, chain, init, g, rng) for u, g, rng in zip(units, groups, rngs)]
    frozen = [None if w is None else jnp.asarray(w, np_dtype) for w in chain.weights]
    # blur starts and hops of a two-layer chain take the exact Hessian (SearchPolicy.exact_hessian); a block of LM
    # rows computes its second-order term where any of its running rows is one of them, the others not using it
    exact_blurs = (policy.exact_hessian and len(chain.layers) == 2 and any(m is not None for m in moves)
                   and solve.takes_exact_hessian(problem, residuals))
    objective_images = None if objective.name != "images" else jnp.asarray(
        gram_factor(images, padded_shape, objective.stride) if factored else images, np_dtype)

    def draw(b: int, wave: int) -> tuple[list[list], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Wave ``wave``'s starts of target ``b`` and, each (size,): which are fresh (drawn without
        regard to the minima found so far: the user's, structured and random starts; they come
        first), not perturbations of those minima; which are independent evidence (the fresh
        ones but impulse, comb and symmetric starts); the LM iterations before each may
        be screened; and which take the exact Hessian (``exact_blurs``: the blur starts and hops)."""
        own = [_with_weights(factors, chain) for factors in given[b]] if wave == 0 else []
        elite = records[b].elite if wave else []
        count = int(policy.perturb * size) if elite else 0
        full = lambda free: [next(free) if w is None else w for w in chain.weights]  # noqa: E731
        minima = [full(iter(free)) for _, free in elite]
        # crossovers where no blur hops apply (see jfactor.factorize.multistart)
        crossing = len(problem.free) > 1 and moves[b] is None
        hops, moved = multistart.perturb(minima[:HOP_SOURCES], count, rngs[b], move=moves[b], refit=refits[b],
                                         parents=minima if crossing else None, redraw=redraws[b])
        hops = [_with_weights(factors, chain) for factors in hops]
        sampled, evidence, blur_starts = _draw(units[b], chain, init, size - len(own) - len(hops), rngs[b], wave,
                                               groups[b], symmetries[b], projected[b] if wave == 0 else ())
        fresh = np.arange(size) < size - len(hops)
        blurred = np.concatenate([np.zeros(len(own), bool), blur_starts, moved])
        mirrored = [symmetry.shares(factors, symmetries[b]) for factors in own]  # the user's starts as drawn ones
        independent = np.concatenate([~np.array(mirrored, bool), evidence, np.zeros(len(hops), bool)])
        # no first-wave grace on a band-pass target with the auto init (SearchPolicy.first_wave_grace)
        banded = moves[b] is not None and init == "auto"
        # a blur hop replaces one factor and refits another: on three or more layers it keeps the rest
        return (own + sampled + hops, fresh, independent,
                policy.graces(fresh, blurred, partial=len(chain.layers) > 2, wave=wave, banded=banded),
                blurred & exact_blurs)

    # the kernel objective's loss is half the squared relative error: stop a target once it is exact
    exact_loss = 0.5 * multistart.EXACT[dtype] ** 2 if policy.adaptive and objective.name == "kernel" else None
    records: list[_Record] = []
    compile_before = compile_stats()
    start = time.perf_counter()
    live = list(range(len(targets)))
    quiet = ProgressBar(False, 0, "")
    cap = policy.max_restarts if policy.adaptive else size
    label = f"factorizing {len(targets)} target(s) ({cost.describe()})"
    total_steps = solver.steps * (solver.optimizer != "none") + solver.refine_steps * (solver.refine == "lm")
    # the host's draws and jax's CPU LAPACK kernels (LM's Cholesky, the baselines' solves) on one BLAS
    # thread: beside XLA's own threads, OpenBLAS's made LM on large chains many times slower (jfactor.host_blas)
    with serial_blas():
        with ProgressBar(progress, cap if policy.adaptive else total_steps, label) as bar:
            wave = 0
            while live:
                drawn = [draw(b, wave) for b in live]
                if wave == 0:
                    records = [_Record(s, multistart.LOSS_TOLERANCE[dtype]) for s, *_ in drawn]
                size_now = bucket(len(live), len(targets))
                rows = live + live[:1] * (size_now - len(live))
                padded_rows = drawn + drawn[:1] * (size_now - len(live))
                free = tuple(jnp.asarray(np.stack([[s[i] for s in starts] for starts, *_ in padded_rows]), np_dtype)
                             for i in problem.free)
                wave_targets = jnp.asarray(normalised[rows], np_dtype)
                graces = np.stack([row[3] for row in padded_rows])
                exact = np.stack([row[4] for row in padded_rows])
                best_before = np.array([records[b].best_loss for b in rows])
                free, history, losses, errors, diverged, pruned = sharded_call(  # targets over devices and processes
                    lambda batch: optimise(problem, batch[1], frozen, batch[0], objective_images,
                                           quiet if policy.adaptive else bar, policy.prune(), exact_loss,
                                           min(int(fresh.sum()) for _, fresh, *_ in drawn), policy.first_order(wave),
                                           batch[2], batch[3], batch[4] if exact_blurs else None),
                    (wave_targets, free, graces, best_before, exact), mesh=mesh, shard=shard)
                free = [np.asarray(f, np.float64) for f in free]
                if np_dtype != np.float64:  # float32's rounding would split minima and rank them (_float64_results)
                    errors, losses = _float64_results(free, chain, normalised[rows], errors, losses, objective,
                                                      objective_images)
                elapsed = time.perf_counter() - start
                for j, b in enumerate(live):
                    records[b].add([f[j] for f in free], history[j], losses[j], errors[j], diverged[j], pruned[j],
                                   drawn[j][2], solver.refine == "lm")
                    records[b].found.append(multistart.evidence(records[b].ranked_errors(objective),
                                                                records[b].joined("pruned"),
                                                                records[b].joined("independent"), dtype))
                    records[b].stopped = multistart.stop_reason(records[b].found, policy, elapsed, dtype)
                if policy.adaptive:
                    lead = records[live[0]].found[-1]
                    bar.advance(size, f"{label}: wave {wave + 1}, {lead['restarts']} restarts, best hit "
                                      f"{lead['best_hits']}x")
                live = [b for b in live if records[b].stopped is None]
                wave += 1
        elapsed = time.perf_counter() - start
        compiled = {k: v - compile_before[k] for k, v in compile_stats().items()}

        results = []
        for b, (target, record) in enumerate(zip(targets, records)):
            if record.best_free is None:
                raise FactorizationError(
                    f"{target.name}: all {record.found[-1]['restarts']} restarts diverged (non-finite loss); lower the "
                    "learning rate, use optimizer lbfgs, or check the target's scale")
            found = {**record.found[-1], "stopped": record.stopped, "waves": len(record.losses),
                     "warning": multistart.warning(record.found[-1], record.stopped, elapsed,
                                                   objective.name == "kernel")}
            results.append(_result(target, chain, problem, record.best_free, norms[b], padded[b], padding,
                                   record.joined("errors"), record.joined("diverged"), record.joined("pruned"), found,
                                   record.best_history, record.best_index, elapsed / len(targets),
                                   compiled["seconds"] / len(targets), compiled["programs"] - compiled["cache_hits"],
                                   _settings(objective, solver, init, dtype, policy, seed, target),
                                   images, baselines, record.first_starts, seed))
    return results


def _float64_results(free: list[np.ndarray], chain: Chain, targets: np.ndarray, errors, losses,
                     objective: Objective, images) -> tuple[np.ndarray, np.ndarray]:
    """Relative errors and losses (B, R) of a float32 run's restarts, recomputed in float64 from their
    factors (``free``: the free layers', each (B, R, *shape)) against ``targets`` (B, *k, C_in, C_out),
    as the result's ``rel_error`` is: float32's own carry its rounding (about 1e-3 relative on an
    error of 2e-4), which splits one minimum into many and ranks restarts against the result.  One
    batched chain kernel over the finite restarts (frozen layers broadcast), and ``objective``'s
    residual of it (``images``: the objective's images or Gram factor, or None); diverged ones
    (``errors`` not finite) keep theirs."""
    errors, losses = np.array(errors, np.float64), np.array(losses, np.float64)
    rows, cols = np.nonzero(np.isfinite(errors))
    if rows.size:
        layers = iter(f[rows, cols] for f in free)
        factors = [next(layers) if w is None else np.asarray(w, np.float64) for w in chain.weights]
        approx, wanted = chain_kernel(factors, chain), jnp.asarray(targets[rows], jnp.float64)
        scale = jnp.linalg.norm(wanted.reshape(rows.size, -1), axis=1)
        errors[rows, cols] = np.asarray(jnp.linalg.norm((approx - wanted).reshape(rows.size, -1), axis=1) / scale)
        images = None if images is None else jnp.asarray(images, jnp.float64)
        residuals = jax.vmap(lambda a, t: objective.residual(a, t, images))(approx, wanted)
        losses[rows, cols] = np.asarray(0.5 * jnp.sum(residuals**2, axis=1))
    return errors, losses


def _settings(objective: Objective, solver: Solver, init: str, dtype: str, policy: SearchPolicy, seed: int,
              target: Target) -> dict:
    return {"objective": objective.label, "solver": dataclasses.asdict(solver), "search": dataclasses.asdict(policy),
            "init": init, "dtype": dtype, "seed": seed, "target_spatial_only": target.spatial_only}


def _result(target, chain, problem, free, norm, padded, padding, errors, diverged, pruned, found, history, best,
            elapsed, compile_s, compiles, settings, images, baseline_names, starts, seed) -> Factorization:
    n_free = len(problem.free)
    scale = norm ** (1.0 / n_free)
    free = iter(f * scale for f in free)
    factors = [next(free) if w is None else np.asarray(w, np.float64) for w in chain.weights]
    approx = chain_kernel_numpy(factors, chain)
    measured = metrics.scaled_summary(approx, padded, images, target.stride, taps=target.kernel.size)
    table = baseline_lib.run_baselines(baseline_names, padded / norm, chain, starts, seed) if baseline_names else {}
    return Factorization(target, chain, factors, approx, padded, padding, measured, errors, diverged, pruned, found,
                         history, best, elapsed, compile_s, compiles, settings, table)


def factorize(target, chain: Chain, *, starts=None, **options) -> Factorization:
    """Factorize one target; see :func:`factorize_batch` for the options.

    ``starts`` is a list of factor lists (this target's); ``baselines`` defaults to
    :data:`~jfactor.factorize.baselines.DEFAULT_BASELINES` here.
    """
    accepted = set(inspect.signature(factorize_batch).parameters) - {"targets", "chain", "starts"}
    for key in options:
        if key not in accepted:
            raise TypeError(f"factorize(): {unknown_key(key, accepted, 'option')}")
    options.setdefault("baselines", baseline_lib.DEFAULT_BASELINES)
    return factorize_batch([target], chain, starts=None if starts is None else [starts], **options)[0]


__all__ = ["Factorization", "factorize", "factorize_batch"]
