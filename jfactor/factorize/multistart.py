"""Restarts in waves until the best basin has been found repeatedly, and the evidence for it.

Chain factorization has many local minima (line-like, ring and Gabor targets land 1.1-5x
above the best one from most starts), and more starts help far more than longer runs.  So
the default search draws restarts in waves of :attr:`SearchPolicy.wave`, screens them by
successive halving (in the first-order phase once, halfway,
:func:`jfactor.factorize.solve.first_order`; in Levenberg-Marquardt after every segment only
the better share of a target's still-running restarts goes on, fresh starts and
perturbations ranked apart, blur starts and hops after a grace, :func:`jfactor.factorize.solve.refine`),
and after every wave asks
:func:`stop_reason`:

- ``exact``: the best error is at the float rounding floor: no start can do better;
- ``repeated``: at least :attr:`SearchPolicy.hits` independent restarts (fresh: drawn
  without regard to the minima found so far, random or structured, not perturbations of
  them; impulse and comb starts excepted, and starts that share the target's grid
  symmetries, which reach only minima that share them) reached the best error within a relative
  :data:`HIT_TOLERANCE` (of the run's dtype), and the last :attr:`SearchPolicy.patience` waves found nothing better;
- ``stalled``: :attr:`SearchPolicy.min_restarts` restarts have run, at least
  :attr:`SearchPolicy.hits` of them (perturbations included) reached the best, and the last
  :attr:`SearchPolicy.patience` waves, half of whose starts perturb the best factors (basin
  hopping), found nothing better;
- ``budget``: :attr:`SearchPolicy.budget_s` seconds have passed;
- ``max_restarts``: :attr:`SearchPolicy.max_restarts` restarts have run.

The landscape has a funnel: on a line-like target 256 plain restarts found 177 distinct minima,
the best by 2 of them, while perturbations of good minima land in better ones far more often
than fresh starts do.  So later waves mix fresh random starts and new root groupings
(independent evidence, but those that share the target's grid symmetries) with perturbations of
the best so far, which start next to a minimum and go straight to LM.  Half of those perturb
the best; where two or more layers are free and no blur hops apply, the others are crossovers
(:func:`crossover`): each factor copied from one of the eight best minima, every other child
with one factor refitted by least squares (one channel, no frozen layer).  Over seeds 400-419
of the 14 targets of ``experiments/bench_optimality.py`` without blur hops, 259 of 280 runs
landed within 1.01x of the best known instead of 243 (252 with the four best as parents), none
fewer on any target; in place of a band-pass target's few noise hops they took the 9x9 Gabor
into 5-5 from 37 of its seeds 420-469 within 1.01x to 24.  Where, besides, the target has
mirror symmetries that give symmetric starts, a factor can be refitted and the chain has three
or more layers, the perturbations of the best are redraw hops instead of noise
(:func:`jfactor.factorize.init.redraw_hop`, :func:`jfactor.factorize.api._redraw_hops`).  The
evidence counts both: ``best_hits`` (every refined restart at the best) and
``independent_hits`` (independent fresh starts only), next to the number of distinct minima and
the runner-up.  Fresh structured starts (root groupings, lines, blurs; not the impulse and comb
starts of ``jfactor.factorize.api._draw``, which gather in few basins, nor, since 2026-12-06,
starts that share the target's grid symmetries, the point reflection included: symmetric
starts, and blur starts on a target with any) count as independent: over ten seeds of every
target of ``experiments/bench_optimality.py`` run on to 1,024 restarts, no basin above the best
drew more than two fresh restarts while the search stalled on it, so three of them stop no
search early there, while the line, ring and camera-patch targets, whose best basin fresh line,
symmetric and blur starts find again and again, stopped after 192-512 restarts instead of 512
(the 11x11 ring no longer does, below).  (One exception, found later: on the 15x15 ring into
3-5-9 a basin 1.09x above the best draws 5-13 fresh restarts in every run, and the best one, 2
of 10 runs of 1,024 restarts found, none of them fresh; the first wave's projection start,
:func:`jfactor.factorize.api._projected`, now starts in it.) Without the symmetric starts' hits the
11x11 ring and the two disks, whose best basins symmetric starts found again and again, run on
to 512 restarts (replayed over seeds 400-409 and 470-479: a mean of 512 instead of 333-374),
every run where it was; excluding the even (point-symmetric) blur starts of the Gabors, and the
even fresh starts of the lines, stopped no search sooner or later over those seeds (the bench's
15x15 Gabor at seed 0 it did: 512 restarts instead of 256).

``min_restarts`` stays at 512: the searches of that bench's 17 targets run on to 1,024
restarts (seeds 0-9, one trajectory each) and replayed under each rule, ``stalled`` after 320
restarts left seeds 0-4 where 512 left them (76 of 85 within 1.01x) but lost 3 of 85 runs at
seeds 5-9 (the 11x11 line at 45 degrees 4.6x above its best, the 15x15 line at 60 degrees and
the 9x9 Gabor), after 384 lost 2.

No wave takes the first-order phase by default (:attr:`SearchPolicy.first_order_waves`, 0):
every restart goes straight to LM, and every other fresh start of the first wave (the ones the
phase took before) is screened only after :attr:`SearchPolicy.first_wave_grace` LM iterations
(not on a band-pass target with the auto init: there no random start reached the best, see that
attribute).
Over seeds 400-439 of the 18 targets of ``experiments/bench_optimality.py`` that took 672 of 720
runs within 1.01x of the best known where L-BFGS on those starts (200 steps, screened once
after 100) took 659 (the 15x15 ring 16 of 40 instead of 10, the line at 40 degrees 39 instead
of 36, the 2->2 kernel 33 instead of 32, the 9x9 Gabor 31 instead of 28), in less time on most
targets (the 11x11 Gabor's median 0.39-0.43 s against 0.48-0.50 s; the 2->2 kernel's the same
or more, up to 2.39 s against 1.77 s).  With no grace either, 329 of 360 over seeds 400-419
(333 with L-BFGS); with a grace of 20 for every fresh start of the first wave, 192 of 220 on
eleven targets (193); with 50 for all of them, as good as for half but slower.  Before, the
phase ran in the first wave only: where it ran in every wave its polished fresh restarts drew
the 13x13 disk's search into a basin 1.3x above the best often enough to stop there
(`repeated` at 256 restarts, 4 of 10 seeds).

``SearchPolicy(restarts=N)`` instead runs exactly N restarts in one wave, each refined to
convergence, as a plain multistart (every restart may take the first-order phase).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from jfactor._checks import is_int, is_real
from jfactor.errors import ConfigError
from jfactor.factorize.solve import Screening

RESTARTS_OR_BUDGET = ("restarts and budget_s: give one. restarts=N runs exactly N restarts in one wave, "
                      "budget_s bounds the default search's waves (with restarts it would never apply)")
# two restarts found the same minimum if their relative errors agree to this, per dtype: LM stops a float32
# restart once a step lowers its cost by less than 1e4 eps (1.2e-3 relative; ``ftol`` in
# jfactor.factorize.solve._lm_iterate), so restarts of one float32 minimum end up to about 7e-4 apart in error (at
# 1e-6 one minimum read as six, and the result warned)
HIT_TOLERANCE = {"float64": 1e-6, "float32": 1e-3}
# the same for the losses (half squared errors) :func:`elite` compares: float32's twice its errors'; float64's the
# 1e-6 the search was tuned with
LOSS_TOLERANCE = {"float64": 1e-6, "float32": 2e-3}
EXACT = {"float64": 1e-12, "float32": 1e-6}  # relative errors at the rounding floor


@dataclasses.dataclass(frozen=True)
class SearchPolicy:
    """How many restarts, in which waves, and when to stop.

    Attributes:
      restarts: exactly this many restarts, one wave, every one refined (no screening);
        None (default): waves until :func:`stop_reason` says so.
      budget_s: stop starting waves after this many seconds (None: no time limit).
      wave: restarts per wave (one compiled shape for every wave).
      keep: share of a target's running restarts that survives each LM segment.
      floor: restarts per target and wave that are always refined to convergence.
      segment: LM iterations between two screenings.
      grace: LM iterations before a blur start of a two-layer chain, fresh or a hop (one factor
        a blur, the other refitted: such a hop keeps nothing of its minimum), is first screened:
        a start into a better basin crosses a plateau before it drops (on the 9x9 Gabor into 5-5
        a grace of 30 for every hop lost 10 of 10 seeds; screening its fresh blur starts from the
        first segment on, as the search did before, 39 of 60 runs over seeds 340-399 landed
        within 1.01x of the best known instead of 46, in 9% less time; those were Gauss-Newton
        steps with a grace of 50).  With the exact Hessian (``exact_hessian``) the runs into the
        best basin cross it in 76-98 iterations, ranked in the worst sixth of their blur starts
        at 50: over seeds 400-439 a grace of 70 took 26 of 40 runs there, 85 took 40, 100 took
        39, in about as many LM iterations as 85.  LM iterations only: a fresh start that takes
        the first-order phase may be screened out there first.
      partial_grace: the same for a blur hop of a chain of three or more layers, which keeps a
        factor of its minimum (fresh blur starts there wait none): over seeds 340-349 of the 11x11
        and 15x15 Gabors and the DoG of ``experiments/bench_optimality.py``, 20 iterations left all
        30 runs within 1.01x of their best known, as 50 did, in 18-23% less median time; 10 or
        none lost the 11x11 Gabor one run (1.017x).  (A grace of 20 for their fresh blur starts
        too changed no run and cost 2-6%.)
      noise_grace: the same for a noise hop: over seeds 200-209 of the 13 targets without blur
        hops of ``experiments/bench_optimality.py``, 20 iterations left every target's
        count of runs within 1.01x of its best known where 50 did (109 of 130) and took 18-26%
        off the median time of those whose searches run to 512 restarts; none (0: screened
        from the first segment on, apart from the fresh restarts) left them there too (the 2->2
        kernel one run more) and took another 10-20% off the motion blur, the line at 60 degrees
        and the 13x13 disk.
      hits: independent restarts that must reach the best before the search may stop early; as
        many restarts of any kind must have reached it when it stops after ``min_restarts``.
      patience: waves in a row without a better minimum before the search may stop.
      min_restarts: restarts before the search may stop on perturbations' evidence.
      max_restarts: the most restarts per target.
      perturb: share of each later wave that perturbs the best factors so far.
      first_order_waves: waves whose fresh restarts take the first-order phase (the solver's
        ``first_order_share`` of them); the fresh restarts of later waves go straight to LM.
      first_wave_grace: LM iterations before every other fresh start of the first wave (one
        without a grace of its own) is first screened: a fresh start bound for a rare basin
        may rank low for a while (see the module docstring).  Not on a band-pass target
        (where blur hops apply) with the ``auto`` init, which draws blur starts and root
        groupings besides random ones (:func:`graces`' ``banded``): there no random start
        reached the best known (the DoG, the 11x11 and 15x15 Gabors, seeds 400-409: 0 of their
        1,820, 1,980 and 1,740 random starts, the best's hits from blur starts, root groupings
        and hops), and without it six band-pass targets of ``experiments/bench_optimality.py``
        (the 9x9 Gabor, the camera patch and the 1-D kernel too; the LoG, which joined later, 3
        of its seeds 0-9 within 1.01x against 2) kept every run but one on the same side of
        1.01x of the best known over seeds 400-469 (the 11x11 Gabor gained one: 39 of seeds
        400-439 against 38), in 2-9% less time.
      cutoff: once screening is over, a restart still running after ``cutoff_after`` LM
        iterations stops (as pruned, not a refined minimum) if its error is above ``cutoff``
        times the best so far (the loss above ``cutoff**2`` times; None: every survivor runs to
        convergence).  Its minimum cannot be the best, and the slowest survivors run on alone,
        where an iteration costs the most per restart.  Over seeds 400-419 of the 18 targets of
        ``experiments/bench_optimality.py`` (1.5 after 50), 333 of 360 runs landed within 1.01x
        of the best known as without it (the 15x15 ring one run more, the 9x9 Gabor one fewer;
        every other run on the same side of 1.01x), in 8.3% less time in all (the 15x15 line at
        15 degrees 20% less, the 9x9 Gabor 16%, the 15x15 ring 10%, the DoG and the motion blur
        5-8%; none slower beyond this machine's noise).
      cutoff_after: LM iterations before the cutoff applies.
      exact_hessian: whether the blur starts and hops of a two-layer chain (those that wait
        ``grace`` in the waves; the blur starts of a plain ``restarts=N`` run too) take LM
        steps on the loss's exact Hessian instead of Gauss-Newton's ``J^T J``
        (:func:`jfactor.factorize.solve.refine`; where the step comes from the normal
        equations, :func:`jfactor.factorize.solve.takes_exact_hessian`).  The plateau they
        cross is a saddle region (the Hessian has negative eigenvalues there), which ``J^T J``
        cannot see: from 512 blur starts of the 9x9 Gabor into 5-5, LM reached the best known
        from 9 (7 at another seed) with it, from none without; from 512 random starts 3 and
        none.  In the default search (grace 100) 39 of seeds 400-439 landed within 1.01x of the
        best known instead of 31, 30 of the held-out 440-469 instead of 23, in about 20% more
        LM iterations (Gauss-Newton steps with a grace of 100: 35 and 27).  For every restart
        of every target (``Solver(hessian="full")``) it lost runs elsewhere: 648 of 720 over
        seeds 400-439 of the 18 targets of ``experiments/bench_optimality.py`` against 685 (the
        line at 40 degrees 26 of 40 against 39, the 15x15 ring 16 against 28, the 11x11 Gabor
        29 against 38).
      polish: whether, once screening is over, the survivors run to convergence on the exact
        Hessian's LM steps (:attr:`jfactor.factorize.solve.Screening.polish`; where the step
        comes from the normal equations, on chains of at most
        :data:`jfactor.factorize.solve.POLISH_MAX_FREE` free layers). By then each is inside the
        basin it will end in, and Gauss-Newton converges only linearly there where the residual
        is not small against ``J^T J``'s small eigenvalues: the 15x15 LoG's survivors took
        250-450 iterations, most of them within 1e-3 of their minimum. Paired over seeds 0-4 and
        100-109 of the 19 targets of ``experiments/bench_optimality.py`` (one process, the same
        seeds with and without it), 278 of 285 runs landed within 1.01x of the best known
        against 276, in 8% less time in all (7% fewer LM iterations): the LoG 29% less, the 3-D
        kernel 26%, the 2->2 kernel 16-17%, the 11x11 Gabor 7-9%, the others within 5% either
        way (the DoG 1-3% more).
    """

    restarts: int | None = None
    budget_s: float | None = None
    wave: int = 64
    keep: float = 0.5
    floor: int = 4
    segment: int = 10
    grace: int = 100
    partial_grace: int = 20
    noise_grace: int = 0
    hits: int = 3
    patience: int = 3
    min_restarts: int = 512
    max_restarts: int = 1024
    perturb: float = 0.5
    first_order_waves: int = 0
    first_wave_grace: int = 50
    cutoff: float | None = 1.5
    cutoff_after: int = 50
    exact_hessian: bool = True
    polish: bool = True

    def __post_init__(self):
        for name in ("restarts", "wave", "floor", "segment", "grace", "partial_grace", "noise_grace", "hits",
                     "patience", "min_restarts", "max_restarts", "first_order_waves", "first_wave_grace",
                     "cutoff_after"):
            value = getattr(self, name)
            if value is None and name == "restarts":
                continue
            least = 0 if name in ("grace", "partial_grace", "noise_grace", "first_order_waves", "first_wave_grace",
                                 "cutoff_after") else 1
            if not is_int(value) or value < least:
                raise ConfigError(f"{name} must be an integer >= {least}, got {value!r}")
        if self.cutoff is not None and not (is_real(self.cutoff) and math.isfinite(self.cutoff) and self.cutoff >= 1):
            raise ConfigError(f"cutoff must be a number >= 1 (or None: off), got {self.cutoff!r}")
        for name in ("exact_hessian", "polish"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.budget_s is not None and not (is_real(self.budget_s) and math.isfinite(self.budget_s)
                                              and self.budget_s > 0):
            raise ConfigError(f"budget_s must be a positive number of seconds, got {self.budget_s!r}")
        if self.restarts is not None and self.budget_s is not None:
            raise ConfigError(RESTARTS_OR_BUDGET)
        for name in ("keep", "perturb"):
            value = getattr(self, name)
            if not 0 < value <= 1 if name == "keep" else not 0 <= value <= 1:
                raise ConfigError(f"{name} must be in {'(0, 1]' if name == 'keep' else '[0, 1]'}, got {value!r}")

    @property
    def adaptive(self) -> bool:
        return self.restarts is None

    @property
    def wave_size(self) -> int:
        return self.wave if self.adaptive else self.restarts

    def first_order(self, wave: int) -> bool:
        """Whether wave ``wave``'s fresh restarts may take the first-order phase (every restart of a
        plain multistart does)."""
        return not self.adaptive or wave < self.first_order_waves

    def prune(self) -> Screening | None:
        """The successive-halving setting of :func:`jfactor.factorize.solve.optimise`."""
        return Screening(self.keep, self.floor, self.cutoff, self.cutoff_after, self.polish) if self.adaptive else None

    def graces(self, fresh: np.ndarray, blurred: np.ndarray, *, partial: bool, wave: int,
               banded: bool = False) -> np.ndarray:
        """LM iterations before each restart of wave ``wave`` may be screened (R,), from which
        are ``fresh`` and which ``blurred`` (blur starts and the hops :func:`perturb` marks as
        moved), on a chain whose blur hops keep a factor of their minimum (``partial``: three or
        more layers) or not: ``grace`` for the blur starts and hops of a two-layer chain,
        ``partial_grace`` for the blur hops of a deeper one, ``noise_grace`` for the other hops,
        ``first_wave_grace`` for every other one (odd places) of the first wave's other fresh
        starts unless blur hops apply (``banded``), none for the rest."""
        blur = np.where(fresh, 0 if partial else self.grace, self.partial_grace if partial else self.grace)
        graces = np.where(blurred, blur, np.where(fresh, 0, self.noise_grace))
        if wave == 0 and not banded:
            odd = np.arange(fresh.size) % 2 == 1
            graces = np.where(fresh & odd & (graces == 0), self.first_wave_grace, graces)
        return graces


def minima(errors: np.ndarray, floor: float, tolerance: float) -> list[np.ndarray]:
    """Group refined restarts' relative errors into distinct minima, best first.

    A restart joins a minimum if its error is within a relative ``tolerance`` of the
    minimum's lowest (or both are below ``floor``).  Returns the indices into ``errors`` of
    each minimum's restarts.
    """
    order = np.argsort(errors, kind="stable")
    groups: list[list[int]] = []
    for i in order:
        if not np.isfinite(errors[i]):
            break
        lowest = errors[groups[-1][0]] if groups else None
        if lowest is not None and errors[i] <= max(lowest * (1 + tolerance), floor):
            groups[-1].append(int(i))
        else:
            groups.append([int(i)])
    return [np.asarray(g) for g in groups]


def refined(errors: np.ndarray, pruned: np.ndarray) -> np.ndarray:
    """Which restarts were refined to a minimum (R,): neither ``pruned`` (R,) nor diverged (their
    ``errors`` (R,) not finite)."""
    return ~pruned & np.isfinite(errors)


def refined_minima(errors: np.ndarray, pruned: np.ndarray, dtype: str) -> list[np.ndarray]:
    """The distinct minima (:func:`minima`, at ``dtype``'s floor and tolerance) of the :func:`refined`
    restarts among ``errors`` (R,), best first: each one's restarts as indices into ``errors``."""
    index = np.flatnonzero(refined(errors, pruned))
    return [index[group] for group in minima(errors[index], EXACT[dtype], HIT_TOLERANCE[dtype])]


def evidence(errors: np.ndarray, pruned: np.ndarray, independent: np.ndarray, dtype: str) -> dict:
    """What the restarts say about how sure the best is.

    Args:
      errors: (R,) relative errors of every restart (inf where diverged).
      pruned: (R,) restarts screened out before converging (not local minima).
      independent: (R,) restarts that are independent evidence: fresh starts (not derived
        from an earlier restart's result) other than impulse and comb starts and starts that
        share the target's grid symmetries (:func:`jfactor.factorize.symmetry.shares`).
      dtype: the run's dtype (sets the rounding floor and :data:`HIT_TOLERANCE`).
    Returns:
      restarts, refined (restarts run to convergence), distinct_minima, best_error,
      best_hits (refined restarts at the best), independent_hits (those of them from
      independent starts), runner_up (the next minimum's error, or None), exact (the best is at the
      rounding floor).
    """
    floor = EXACT[dtype]
    groups = refined_minima(errors, pruned, dtype)
    best = groups[0] if groups else np.zeros(0, int)
    return {
        "restarts": int(errors.size),
        "refined": int(refined(errors, pruned).sum()),
        "distinct_minima": len(groups),
        "best_error": float(errors[best[0]]) if best.size else None,
        "best_hits": int(best.size),
        "independent_hits": int(independent[best].sum()),
        "runner_up": float(errors[groups[1][0]]) if len(groups) > 1 else None,
        "exact": bool(best.size) and float(errors[best[0]]) <= floor,
    }


def stop_reason(history: list[dict], policy: SearchPolicy, elapsed: float, dtype: str) -> str | None:
    """Why the search of one target stops after a wave (None: run another wave).

    ``history``: the :func:`evidence` after every wave so far, last one last; ``dtype``: the run's.
    """
    found = history[-1]
    if not policy.adaptive:
        return "restarts"
    if found["exact"]:
        return "exact"
    if len(history) > policy.patience:
        before = history[-1 - policy.patience]["best_error"]
        stalled = before is not None and found["best_error"] >= before * (1 - HIT_TOLERANCE[dtype])
        if stalled and found["independent_hits"] >= policy.hits:
            return "repeated"
        if stalled and found["best_hits"] >= policy.hits and found["restarts"] >= policy.min_restarts:
            return "stalled"
    if policy.budget_s is not None and elapsed >= policy.budget_s:
        return "budget"
    if found["restarts"] + policy.wave > policy.max_restarts:
        return "max_restarts"
    return None


def warning(found: dict, stopped: str, elapsed: float, kernel_objective: bool = True) -> str | None:
    """A plain warning where the result may not be the best: reached by fewer than three restarts
    (:func:`_few_hits`), or, for the kernel objective, a relative error of 1 or more, which the zero
    kernel already reaches (:func:`_no_better_than_zero`); both joined where both apply."""
    notes = [_few_hits(found, stopped, elapsed), _no_better_than_zero(found) if kernel_objective else None]
    return "; ".join(note for note in notes if note) or None


def _no_better_than_zero(found: dict) -> str | None:
    """Where the best relative error is 1 or more (a chain of zeros has 1): the chain cannot fit the
    target at all, or its restarts stopped far from a minimum."""
    error = found.get("best_error")
    if error is None or error < 1:
        return None
    return (f"no better than the zero kernel: the relative error {error:.4g} is at least 1, what a chain of zeros "
            f"gives; the chain cannot fit this target, or its restarts stopped far from a minimum (raise "
            f"--refine-steps, solver.refine_steps in a config)")


def _few_hits(found: dict, stopped: str, elapsed: float) -> str | None:
    """Where the best was reached by fewer than three restarts, the warning with what to rerun: a
    fixed restart count (``stopped == "restarts"``) grows fourfold or gives way to the adaptive
    search; an adaptive search stopped by its budget gets a longer one; any other adaptive stop
    (all its restarts run, ``max_restarts``, which a longer budget would repeat to the digit; or
    ``repeated``/``stalled`` under a policy asking for fewer than three hits) other seeds."""
    if found["exact"] or found["best_hits"] >= 3:
        return None
    if stopped == "restarts":
        more = 4 * found["restarts"]
        hint = (f"rerun with --restarts {more} (restarts: {more} in a config, restarts={more} in Python), or "
                f"without a restart count (the adaptive search)")
    elif stopped == "budget":
        longer = f"{max(2 * elapsed, elapsed + 10):.0f}"
        hint = f"rerun with --budget-s {longer} (budget_s: {longer} in a config, budget_s={longer} in Python)"
    else:
        hint = "rerun with other --seed values (seed= in Python) and keep the best"
        if stopped == "max_restarts":
            hint = f"the search ran all its {found['restarts']} restarts; {hint}"
    return (f"likely not the global optimum: the best was reached by {found['best_hits']} of "
            f"{found['refined']} refined restarts (search stopped: {stopped}); {hint}")


def elite(candidates: list[tuple[float, list]], count: int, tolerance: float) -> list[tuple[float, list]]:
    """The ``count`` lowest-loss (loss, factors) pairs, one per distinct minimum (losses within a
    relative ``tolerance``)."""
    kept: list[tuple[float, list]] = []
    for loss, factors in sorted(candidates, key=lambda c: c[0]):
        if not any(abs(loss - other) <= tolerance * abs(other) for other, _ in kept):
            kept.append((loss, factors))
        if len(kept) == count:
            break
    return kept


def perturb(elite: list[list[np.ndarray]], count: int, rng: np.random.Generator,
            move: Callable[[list[np.ndarray], np.random.Generator], list[np.ndarray] | None] | None = None,
            parents: list[list[np.ndarray]] | None = None,
            refit: Callable[[list[np.ndarray], np.random.Generator], list[np.ndarray]] | None = None,
            redraw: Callable[[list[np.ndarray], np.random.Generator], list[np.ndarray]] | None = None,
            ) -> tuple[list[list[np.ndarray]], np.ndarray]:
    """``count`` perturbed copies of the elite factor lists (best first): half of them of the
    best, the rest spread over the others, with relative noise of 10% to 100% (log-spaced);
    where ``move`` is given, three pairs in four of them are ``move(factors, rng)`` instead
    (a structured hop such as :func:`jfactor.factorize.init.blur_hop`; noise where it gives
    None).  On the 11x11 Gabor into 3-5-5 the default search reached the best known minimum
    at 1 of 10 seeds with noise alone, 6 with half the hops blur hops, 10 with three in four
    and 9 with all.

    Where two or more ``parents`` are given (the best minima, best first, ``elite`` among them;
    for a chain of two or more free layers), the noise hops of the other half (odd slots) are
    :func:`crossover` children of them instead, every other one with one factor refitted
    (``refit(factors, rng)``, where given: a least-squares refit such as
    :func:`jfactor.factorize.init.refit_one`).  Where ``redraw`` is given, the noise hops of the
    best (even slots) are ``redraw(factors, rng)`` instead (a redraw hop such as
    :func:`jfactor.factorize.init.redraw_hop`; not marked: screened as noise hops are, a grace
    of 20 LM iterations for them gained the 15x15 ring no run).  Returns the hops and which of
    them ``move`` made (count,)."""
    scales = rng.permutation(np.geomspace(0.1, 1.0, max(count, 1)))
    sources = [0 if i % 2 == 0 or len(elite) == 1 else 1 + (i // 2) % (len(elite) - 1) for i in range(count)]
    hops, moved = [], np.zeros(count, bool)
    for i, (source, s) in enumerate(zip(sources, scales)):
        hop = move(elite[source], rng) if move is not None and (i // 2) % 4 else None
        moved[i] = hop is not None
        if hop is None and redraw is not None and i % 2 == 0:
            hop = redraw(elite[source], rng)
        if hop is None and parents is not None and len(parents) > 1 and i % 2 == 1:
            hop = crossover(parents, rng)
            if refit is not None and i % 4 == 3:
                hop = refit(hop, rng)
        hops.append(hop if hop is not None else
                    [f + s * rng.standard_normal(f.shape) * (np.linalg.norm(f) / math.sqrt(f.size) + 1e-300)
                     for f in elite[source]])
    return hops, moved


def crossover(parents: list[list[np.ndarray]], rng: np.random.Generator) -> list[np.ndarray]:
    """A child of two or more minima ``parents`` (factor lists of equal shapes): each factor a
    copy of that factor of a parent drawn among them, the factors the parents differ in (not
    frozen layers') not all of one parent.

    Good minima share good factors: on the 15x15 ring into 3-5-9, whose best basin 1 plain
    restart in about 1,000 reaches, children of the three best minima above it (1.03-1.47x)
    with one factor refitted reached it 5 times in 128, noise hops of them (30%) none."""
    picks = rng.integers(len(parents), size=len(parents[0]))
    mixed = [i for i in range(len(picks)) if any(not np.array_equal(p[i], parents[0][i]) for p in parents[1:])]
    if len(set(picks[mixed].tolist())) == 1:  # one parent would give back its own minimum
        first = picks[mixed[0]]
        picks[mixed[rng.integers(len(mixed))]] = (first + 1 + rng.integers(len(parents) - 1)) % len(parents)
    return [np.array(parents[p][i]) for i, p in enumerate(picks)]
