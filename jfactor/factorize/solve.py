"""Optimisation of chain factors: optax first-order phase, then Levenberg-Marquardt.

Everything here works on one restart of one target and is vmapped twice (restarts, then
targets) and jitted with the static :class:`Problem`, so a sweep over weights or targets
of one geometry compiles once.  Long runs are cut into segments of ``chunk`` steps, each
one jitted call, so a progress bar can move between them.

Levenberg-Marquardt follows Nielsen's damping update with Marquardt scaling; with fewer
residuals than parameters it solves the dual system ``(J J^T + mu I)``.  Scale ambiguity
(factors times ``a_i`` with ``prod a_i = 1``) makes ``J^T J`` singular; the damping takes care
of it and factor norms are re-balanced between phases.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.flatten_util import ravel_pytree

from jfactor.cache import cached_jit
from jfactor.errors import ConfigError
from jfactor.factorize.chain import (Chain, chain_jacobian, chain_jacobian_norms, chain_kernel,
                                     chain_normal_equations, chain_second_order)
from jfactor.factorize.objectives import Objective
from jfactor.schema import unknown_key

OPTIMIZERS = ("adam", "lbfgs", "none")
SCHEDULES = ("constant", "cosine", "exponential")
REFINES = ("lm", "none")
LINEAR_SOLVERS = ("auto", "dense", "cg")
HESSIANS = ("gauss-newton", "full")


@dataclasses.dataclass(frozen=True)
class Solver:
    """How to optimise: a first-order optax phase, then an optional LM refinement.

    Attributes:
      optimizer: ``adam`` (with ``schedule`` on ``learning_rate``), ``lbfgs`` (zoom line
        search) or ``none``.
      steps: first-order steps.
      refine: ``lm`` (Levenberg-Marquardt on the residual) or ``none``.
      refine_steps: the most LM iterations (it stops earlier once converged).
      first_order_share: the fraction of restarts that run the first-order phase; the
        others go straight to LM (all take it where LM does not refine: ``refine`` none or
        ``refine_steps`` 0).  The two reach different minima, and a portfolio of
        both finds the best one more often than either alone.  (The adaptive search gives
        the phase to none of its waves by default: :attr:`SearchPolicy.first_order_waves`.)
      linear_solver: how LM solves for its step: ``dense`` (the Jacobian built, a direct
        solve), ``cg`` (matrix-free preconditioned conjugate gradients, ``cg_iterations`` at
        most) or ``auto`` (dense while it is cheap, see :func:`dense_solve`).
      hessian: the curvature LM's step is damped around: ``gauss-newton`` (``J^T J``) or ``full``
        (the loss's exact Hessian, ``J^T J`` plus the residual's second-order term,
        :func:`jfactor.factorize.chain.chain_second_order`, for every restart; only where the
        step comes from the normal equations: the kernel objective, at least as many residuals
        as parameters, a dense step, :func:`check_hessian`).  Where it is not positive
        definite, the step fails and the damping grows.
      chunk: steps per jitted segment (progress granularity).
    """

    optimizer: str = "lbfgs"
    steps: int = 200
    learning_rate: float = 0.01
    schedule: str = "cosine"
    refine: str = "lm"
    refine_steps: int = 500
    first_order_share: float = 0.5
    linear_solver: str = "auto"
    cg_iterations: int = 100
    hessian: str = "gauss-newton"
    chunk: int = 100

    def __post_init__(self):
        for name, value, accepted in (("optimizer", self.optimizer, OPTIMIZERS),
                                      ("schedule", self.schedule, SCHEDULES),
                                      ("refine", self.refine, REFINES),
                                      ("linear_solver", self.linear_solver, LINEAR_SOLVERS),
                                      ("hessian", self.hessian, HESSIANS)):
            if value not in accepted:
                raise ConfigError(f"solver.{name}: {unknown_key(value, accepted, name)}")
        for name in ("steps", "refine_steps", "chunk", "cg_iterations"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if name == "chunk" else 0):
                raise ConfigError(f"solver.{name}: must be a non-negative integer, got {value!r}")
        if not 0 < self.learning_rate < math.inf:
            raise ConfigError(f"solver.learning_rate: must be a finite number > 0, got {self.learning_rate!r}")
        if not 0 <= self.first_order_share <= 1:
            raise ConfigError(f"solver.first_order_share: must be in [0, 1], got {self.first_order_share!r}")
        if not self.refines and (self.optimizer == "none" or self.steps == 0):
            raise ConfigError("solver: nothing would optimise the starts (optimizer none or steps 0, and refine none "
                              "or refine_steps 0); give steps or refine_steps")
        if not self.refines and self.optimizer != "none":  # refine none, or refine_steps 0
            object.__setattr__(self, "first_order_share", 1.0)  # nothing else would optimise the rest

    @property
    def refines(self) -> bool:
        """Whether LM refines the restarts (``refine`` is ``lm`` with at least one step)."""
        return self.refine == "lm" and self.refine_steps > 0

    def runs_first_order(self, restarts: int):
        """(restarts,) bool: which restarts take the first-order phase (spread evenly)."""
        r = np.arange(restarts)
        return np.floor((r + 1) * self.first_order_share) > np.floor(r * self.first_order_share)

    def transform(self) -> optax.GradientTransformationExtraArgs:
        if self.optimizer == "lbfgs":
            return optax.lbfgs()
        schedule = {
            "constant": lambda: self.learning_rate,
            "cosine": lambda: optax.cosine_decay_schedule(self.learning_rate, max(self.steps, 1), alpha=1e-2),
            "exponential": lambda: optax.exponential_decay(self.learning_rate, max(self.steps, 1), 1e-2),
        }[self.schedule]()
        return optax.with_extra_args_support(optax.adam(schedule))


@dataclasses.dataclass(frozen=True)
class Problem:
    """The static part of a factorization: chain, target channels, objective, solver."""

    chain: Chain
    c_in: int
    c_out: int
    objective: Objective
    solver: Solver

    @property
    def free(self) -> tuple[int, ...]:
        return tuple(i for i, layer in enumerate(self.chain.layers) if not layer.frozen)


def factors_of(problem: Problem, free, frozen) -> list:
    """All factors in chain order from the free ones and the frozen weights."""
    free = iter(free)
    return [next(free) if w is None else w for w in frozen]


def residual(problem: Problem, free, frozen, target, images):
    approx = chain_kernel(factors_of(problem, free, frozen), problem.chain)
    return problem.objective.residual(approx, target, images)


def loss(problem: Problem, free, frozen, target, images):
    r = residual(problem, free, frozen, target, images)
    return 0.5 * jnp.vdot(r, r)


def balance(free):
    """Rescale free factors to equal norms, keeping their product (one restart)."""
    norms = jnp.stack([jnp.linalg.norm(f) for f in free])
    safe = jnp.where(norms > 0, norms, 1.0)
    mean = jnp.exp(jnp.mean(jnp.log(safe)))
    return tuple(f * jnp.where(n > 0, mean / n, 1.0) for f, n in zip(free, safe))


def _batched(function):
    """vmap over restarts (axis 0 of per-restart args), then over targets (axis 0 of all)."""
    over_restarts = jax.vmap(function, in_axes=(0, None, None, None))
    return jax.vmap(over_restarts, in_axes=(0, None, 0, None))


# ---------------------------------------------------------------- first-order phase

def _stored_value_and_grad(state):
    """The loss and gradient at the current point that L-BFGS's line search keeps in ``state``
    (put there for the first step by :func:`start`).  ``optax.value_and_grad_from_state`` chooses
    between them and a fresh evaluation with a ``lax.cond``, which under ``vmap`` becomes a
    ``select`` that evaluates the objective at every step anyway (13-20% of an L-BFGS step at 16-128
    restarts of a 43-parameter chain); a non-finite stored loss would evaluate to the same value again."""
    return optax.tree_utils.tree_get(state, "value"), optax.tree_utils.tree_get(state, "grad")


@cached_jit(static_argnames=("problem", "steps"))
def first_order_segment(problem: Problem, carry, frozen, target, images, steps: int, limit=None):
    """Up to ``steps`` optimizer steps; returns the new carry and the losses (B, R, steps).

    ``limit`` (a traced int32, default ``steps``) stops it earlier, so one program per batch
    shape serves every segment length; losses past the last step are NaN.
    """
    tx = problem.solver.transform()
    limit = steps if limit is None else jnp.minimum(limit, steps)

    def one(carry, frozen, target, images):
        value_fn = lambda p: loss(problem, p, frozen, target, images)  # noqa: E731

        def step(i, carry_losses):
            carry, losses = carry_losses
            free, state, best, best_value = carry
            value, grad = (_stored_value_and_grad(state) if problem.solver.optimizer == "lbfgs"
                           else jax.value_and_grad(value_fn)(free))
            updates, state = tx.update(grad, state, free, value=value, grad=grad, value_fn=value_fn)
            better = jnp.isfinite(value) & (value < best_value)
            best = jax.tree.map(lambda b, p: jnp.where(better, p, b), best, free)
            best_value = jnp.where(better, value, best_value)
            stepped = (optax.apply_updates(free, updates), state, best, best_value)
            # the carry keeps its types: optax 0.2.4's L-BFGS counts line-search steps as int64 at
            # init (under x64) and as int32 after a step, which the loop would reject
            stepped = jax.tree.map(lambda new, old: lax.convert_element_type(new, old.dtype), stepped, carry)
            return stepped, lax.dynamic_update_index_in_dim(losses, value, i, 0)

        return lax.fori_loop(0, limit, step, (carry, jnp.full(steps, jnp.nan, carry[3].dtype)))

    return _batched(one)(carry, frozen, target, images)


# ---------------------------------------------------------------- Levenberg-Marquardt

def _lm_state(problem: Problem, free, frozen, target, images):
    x, _ = ravel_pytree(free)
    r = residual(problem, free, frozen, target, images)
    cost = 0.5 * jnp.vdot(r, r)
    cost = jnp.where(jnp.isfinite(cost), cost, jnp.inf)
    one = jnp.ones((), x.dtype)
    return {"x": x, "cost": cost, "mu": 1e-3 * one, "nu": 2.0 * one, "done": ~jnp.isfinite(cost),
            "iterations": jnp.zeros((), jnp.int32)}


def _jacobian(problem: Problem, free, frozen, target, images):
    """Residual and its Jacobian w.r.t. the raveled free factors: (m,), (m, n).

    The chain part is structured (:func:`chain_jacobian`); the objective's own linear
    part is pushed through column by column.
    """
    factors = factors_of(problem, free, frozen)
    approx = chain_kernel(factors, problem.chain)
    of_approx = lambda a: problem.objective.residual(a, target, images)  # noqa: E731
    r, push = jax.linearize(of_approx, approx)
    columns = chain_jacobian(factors, problem.chain, problem.free)
    jac = jax.vmap(lambda c: push(c.reshape(approx.shape)), in_axes=1, out_axes=1)(columns)
    return r, jac


def _normal_equations(problem: Problem, free, frozen, target, exact=None, any_exact=True):
    """``J^T J`` (n, n) and ``J^T r`` (n,) of the kernel objective (whose residual is the
    kernel's error over the target's norm) by correlations (:func:`chain_normal_equations`);
    with ``solver.hessian == "full"``, or where ``exact`` (a bool, this restart's) is true, the
    loss's exact Hessian in place of ``J^T J`` (:func:`chain_second_order` added).  ``any_exact``
    (a bool shared by every restart of a vmapped call, so a branch, not a select): whether any of
    them is; where none is, the second-order term is not computed."""
    factors = factors_of(problem, free, frozen)
    scale = jnp.linalg.norm(target)
    error = (chain_kernel(factors, problem.chain) - target) / scale
    gram, gradient = chain_normal_equations(factors, problem.chain, problem.free, error)
    gram = gram / scale**2
    full = problem.solver.hessian == "full"
    second = lambda: chain_second_order(factors, problem.chain, problem.free, error) / scale  # noqa: E731
    if full:
        gram = gram + second()
    elif exact is not None:
        gram = gram + jnp.where(exact, lax.cond(any_exact, second, lambda: jnp.zeros_like(gram)), 0.0)
    return gram, gradient / scale


def dense_step(solver: Solver, m: int, n: int) -> bool:
    """Whether ``solver``'s LM step for ``m`` residuals and ``n`` parameters is a direct solve
    (``linear_solver`` dense, or auto where :func:`dense_solve` says so)."""
    return solver.linear_solver == "dense" or (solver.linear_solver == "auto" and dense_solve(m, n))


def _normal_path(problem: Problem, m: int, n: int) -> bool:
    """Whether LM's step for ``m`` residuals and ``n`` parameters comes from the chain's normal
    equations (:func:`_normal_equations`): the kernel objective, m >= n, a dense solve."""
    return dense_step(problem.solver, m, n) and m >= n and problem.objective.name == "kernel"


def takes_exact_hessian(problem: Problem, residuals: int) -> bool:
    """Whether LM's steps on this problem, with ``residuals`` residuals, may take the loss's
    exact Hessian (:func:`_normal_equations`): where they come from the normal equations."""
    n = sum(math.prod(shape) for i, shape in enumerate(problem.chain.factor_shapes(problem.c_in, problem.c_out))
            if i in problem.free)
    return problem.solver.refines and _normal_path(problem, residuals, n)


def check_hessian(problem: Problem, residuals: int) -> None:
    """Raise a :class:`ConfigError` where ``solver.hessian`` is ``full`` but LM's steps on this
    problem (``residuals`` residuals) cannot take the exact Hessian (:func:`takes_exact_hessian`)."""
    if problem.solver.hessian == "full" and not takes_exact_hessian(problem, residuals):
        raise ConfigError("solver.hessian full (the exact Hessian) needs LM refinement (refine lm), the kernel "
                          "objective, at least as many residuals as parameters and a dense step (linear_solver "
                          "dense, or auto on a small chain); use hessian gauss-newton")


def dense_solve(m: int, n: int) -> bool:
    """Whether an LM step with an (m, n) Jacobian builds it and solves directly.

    The direct solve costs about ``m n^2`` (or ``m^2 n`` through the dual system when
    m < n) per step; beyond ~3e8 of those (large multi-channel chains), conjugate
    gradients on Jacobian-vector products through the FFT chain is far cheaper.
    """
    return min(m * n * n, m * m * n) <= 3e8


def _spd_solve(a, b):
    """``a^-1 b`` for a symmetric positive definite ``a`` (n, n), b (n,), by Cholesky: NaN where
    ``a`` is not numerically positive definite, which the LM step rejects like any failed step.
    On XLA's CPU backend (jax 0.10.2, 2 cores) a batch of 64 solves takes 23 us per item at
    n = 59 and 91 at n = 115 (LU: 40 and 167); the line, Gabor and ring targets' default
    searches ran 9-29% faster than with LU, to the same minima."""
    return jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(a), b)


def _marquardt(d):
    """The diagonal ``D`` of Marquardt's scaling from ``diag(J^T J)`` (n,), kept off zero."""
    return jnp.maximum(d, 1e-9 * jnp.max(d) + jnp.finfo(d.dtype).tiny)


def _normal_step(gram, g, mu):
    """``-(J^T J + mu D)^-1 g`` with Marquardt scaling ``D = diag(J^T J)``, solved directly
    (:func:`_spd_solve`); gram (n, n), g (n,)."""
    return -_spd_solve(gram + mu * jnp.diag(_marquardt(jnp.diag(gram))), g)


def _dual_step(jac, r, mu):
    """The same step with fewer residuals than parameters: the dual (m x m) system, damped by
    ``mu`` times the mean of Marquardt's ``D``; jac (m, n), r (m,)."""
    m = jac.shape[0]
    d = _marquardt(jnp.sum(jac * jac, axis=0))
    return -jac.T @ _spd_solve(jac @ jac.T + mu * jnp.mean(d) * jnp.eye(m, dtype=jac.dtype), r)


def _matrix_free_step(problem: Problem, x, unravel, frozen, jvp, vjp, g, mu, iterations: int):
    """The same step by Jacobi-preconditioned CG on ``J^T J + mu D``, never forming J.

    ``D`` is the chain's exact column norms (:func:`chain_jacobian_norms`) rescaled to the
    objective along ``g`` (exact for the kernel objective, whose residual is the kernel's).
    """
    kernel_of = lambda x: chain_kernel(factors_of(problem, unravel(x), frozen), problem.chain)  # noqa: E731
    _, kernel_jvp = jax.linearize(kernel_of, x)
    tiny = jnp.finfo(g.dtype).tiny
    along = jnp.sum(jvp(g) ** 2) / (jnp.sum(kernel_jvp(g) ** 2) + tiny)
    d = _marquardt(chain_jacobian_norms(factors_of(problem, unravel(x), frozen), problem.chain, problem.free) * along)
    delta, _ = jax.scipy.sparse.linalg.cg(lambda v: vjp(jvp(v)) + mu * d * v, -g,
                                          M=lambda v: v / ((1 + mu) * d), tol=1e-10, maxiter=iterations)
    return delta


def _lm_iterate(problem: Problem, state, template, frozen, target, images, any_exact=True):
    """One damped Gauss-Newton step of one restart; a done restart is returned unchanged.
    ``any_exact``: whether any running restart of the vmapped block takes the exact Hessian
    (:func:`_normal_equations`)."""
    _, unravel = ravel_pytree(template)
    fn = lambda x: residual(problem, unravel(x), frozen, target, images)  # noqa: E731
    x, cost, mu, nu = state["x"], state["cost"], state["mu"], state["nu"]
    tiny = jnp.finfo(x.dtype).tiny
    eps = jnp.finfo(x.dtype).eps
    ftol = max(1e-10, 1e4 * float(eps))  # relative cost decrease below which a step counts as converged
    m, n = jax.eval_shape(fn, x).shape[0], x.shape[0]
    solver = problem.solver
    normal = _normal_path(problem, m, n)
    if (solver.hessian == "full" or "exact" in state) and not normal:
        raise ValueError("the exact Hessian needs the normal equations' step (see check_hessian)")
    if normal:  # J^T J without J (m n^2 saved)
        gram, g = _normal_equations(problem, unravel(x), frozen, target, state.get("exact"), any_exact)
        delta = _normal_step(gram, g, mu)
        curvature = jnp.vdot(delta, gram @ delta)
    elif dense_step(solver, m, n):
        r, jac = _jacobian(problem, unravel(x), frozen, target, images)
        g = jac.T @ r
        delta = _normal_step(jac.T @ jac, g, mu) if m >= n else _dual_step(jac, r, mu)
        curvature = jnp.sum((jac @ delta) ** 2)
    else:
        r, jvp = jax.linearize(fn, x)
        transposed = jax.linear_transpose(jvp, x)
        vjp = lambda w: transposed(w)[0]  # noqa: E731
        g = vjp(r)
        delta = _matrix_free_step(problem, x, unravel, frozen, jvp, vjp, g, mu, solver.cg_iterations)
        curvature = jnp.sum(jvp(delta) ** 2)
    new_r = fn(x + delta)
    new_cost = 0.5 * jnp.vdot(new_r, new_r)
    predicted = -jnp.vdot(g, delta) - 0.5 * curvature  # the decrease the linear model promises
    rho = (cost - new_cost) / jnp.where(predicted > 0, predicted, tiny)
    accept = jnp.isfinite(new_cost) & jnp.all(jnp.isfinite(delta)) & (new_cost < cost)
    small_step = jnp.linalg.norm(delta) <= 1e3 * eps * (jnp.linalg.norm(x) + 1e3 * eps)
    flat = (cost - new_cost <= ftol * cost) & (predicted <= ftol * cost)
    new = {
        "x": jnp.where(accept, x + delta, x),
        "cost": jnp.where(accept, new_cost, cost),
        "mu": jnp.where(accept, mu * jnp.maximum(1 / 3, 1 - (2 * rho - 1) ** 3), mu * nu),
        "nu": jnp.where(accept, 2.0, nu * 2.0).astype(nu.dtype),
        "done": (accept & (small_step | flat | (new_cost <= tiny * 1e6))) | (mu > 1e16)
        | (jnp.linalg.norm(g) <= tiny),
        "iterations": state["iterations"] + 1,
        **({"exact": state["exact"]} if "exact" in state else {}),
    }
    return jax.tree.map(lambda old, upd: jnp.where(state["done"], old, upd), state, new)


def sizes(total: int, base: int = 2, least: int = 4) -> tuple[int, ...]:
    """``total`` divided by powers of ``base`` while it divides evenly and stays at least ``least``:
    the few batch sizes that items shrink to as they finish (few sizes, few programs)."""
    out = [total]
    while out[-1] % base == 0 and out[-1] // base >= least:
        out.append(out[-1] // base)
    return tuple(out)


def cpu_blocks(total: int) -> tuple[int, ...]:
    """Block sizes for :func:`lm_segment`'s exact cover on a CPU: ``total`` halved while the half
    divides evenly and has at least 16 rows, then divided by four while that divides evenly, then 1
    where the last is at most 8.  A larger tail comes from a total with an odd factor (100
    restarts: 100, 50, 25); fewer running rows than it are then covered by one block of it that
    spans finished rows too, as before this ladder, rather than by up to 24 one-row blocks.

    Each size is one ``lax.switch`` branch, compiled on its own (on the 15x15 LoG into 3-5-9 each
    costs about half a second): the halving ladder down to one row (64, 32, 16, 8, 4, 2, 1) made
    the first call of a new geometry about 1 s slower, and below 16 rows the blocks' work is small;
    paired timings of the default search over seeds 400-405 of six targets of
    ``experiments/bench_optimality.py`` (the 2->2 kernel, the DoG, the 9x9 and 11x11 Gabors, the
    line at 45 degrees, the camera patch) moved by -2% to +4%, where dropping 32 too cost 3-8%.
    """
    out = [total]
    while out[-1] % 2 == 0 and out[-1] // 2 >= 16:
        out.append(out[-1] // 2)
    while out[-1] % 4 == 0 and out[-1] > 1:
        out.append(out[-1] // 4)
    return tuple(out) if out[-1] == 1 or out[-1] > 8 else (*out, 1)


def bucket(count: int, total: int, base: int = 4) -> int:
    """The smallest of :func:`sizes` that holds ``count`` items (``total`` if none is smaller)."""
    return min(size for size in sizes(total, base) if size >= count or size == total)


COVERS = ("exact", "one")


def _next_block(block_sizes, remaining, cover: str):
    """Index into ``block_sizes`` (descending) of the block that runs next on ``remaining`` rows:
    ``exact``, the largest block they fill (the smallest if none); ``one``, the smallest block that
    holds them all (the largest if none)."""
    if cover == "exact":
        return jnp.minimum(jnp.sum(block_sizes > remaining), block_sizes.shape[0] - 1)
    return jnp.maximum(jnp.sum(block_sizes >= remaining) - 1, 0)


@cached_jit(static_argnames=("problem", "steps", "blocks", "cover"))
def lm_segment(problem: Problem, state, template, frozen, target, images, steps: int, blocks: tuple[int, ...],
               cover: str = "exact", limit=None):
    """Up to ``steps`` LM iterations of K independent items in one program, stopping once all converged.

    ``limit`` (a traced int32, default ``steps``) stops it earlier: one program with a long
    ``steps`` serves every remaining iteration budget.

    ``state`` and ``target`` carry the item axis K first (each item is one restart of one
    target, with its own target); ``template`` is one item's free factors (their shapes).
    Once fewer items run than rows are in play, a stable sort on ``done`` gathers the running
    ones to the front, and each iteration covers them with blocks, one after another, of the
    sizes in ``blocks`` (descending, each dividing the one before it; one ``lax.switch`` branch
    each): with ``cover="exact"`` the largest block they fill, then the rest likewise (a rest
    smaller than every block: the smallest, over finished rows too), so work follows
    the running items (on a CPU, where a block's cost grows with its rows and a block of
    ~8 MB of Jacobians stays in cache); with ``cover="one"`` the smallest block that holds
    them (on an accelerator, where each block is a launch).  So converged items stop costing
    work without a host round trip or a recompile.  Returns the state in the items' order and
    the cost history (K, steps); entries after an item's last iteration repeat its final cost.
    """
    if cover not in COVERS:
        raise ValueError(f"cover must be one of {COVERS}, got {cover!r}")
    iterate = jax.vmap(functools.partial(_lm_iterate, problem), in_axes=(0, None, None, 0, None, None))
    items = state["cost"].shape[0]
    block_sizes = jnp.asarray(blocks, jnp.int32)
    padded = -(-items // blocks[0]) * blocks[0]  # rows: the items, then done copies of the first

    def pad(a):
        return jnp.concatenate([a, jnp.repeat(a[:1], padded - items, axis=0)])

    def block(size: int):
        def run(offset, state, target):
            rows = lambda a: lax.dynamic_slice_in_dim(a, offset, size)  # noqa: E731
            block_state = jax.tree.map(rows, state)
            # a block none of whose running restarts takes the exact Hessian skips its second-order term
            any_exact = jnp.any(block_state["exact"] & ~block_state["done"]) if "exact" in state else True
            new = iterate(block_state, template, frozen, rows(target), images, any_exact)
            return jax.tree.map(lambda a, n: lax.dynamic_update_slice_in_dim(a, n, offset, 0), state, new)

        return run

    def run_rows(state, target, live):
        def step(carry):
            offset, state = carry
            level = _next_block(block_sizes, live - offset, cover)
            state = lax.switch(level, [block(size) for size in blocks], offset, state, target)
            return offset + block_sizes[level], state

        return lax.while_loop(lambda carry: carry[0] < live, step, (jnp.zeros((), jnp.int32), state))[1]

    def gather_running(state, target, order, history):
        index = jnp.argsort(state["done"], stable=True)
        return jax.tree.map(lambda a: a[index], state), target[index], order[index], history[index]

    limit = steps if limit is None else jnp.minimum(limit, steps)

    def cond(carry):
        i, _, state, *_ = carry
        return (i < limit) & ~jnp.all(state["done"])

    def body(carry):
        i, rows, state, target, order, history = carry
        live = jnp.sum(~state["done"]).astype(jnp.int32)
        state, target, order, history = lax.cond(live < rows, gather_running, lambda *c: c,
                                                 state, target, order, history)
        state = run_rows(state, target, live)
        return (i + 1, jnp.minimum(rows, live), state, target, order,
                lax.dynamic_update_index_in_dim(history, state["cost"], i, 1))

    state = jax.tree.map(pad, state)
    state["done"] = state["done"] | (jnp.arange(padded) >= items)
    history = jnp.zeros((padded, steps), state["cost"].dtype)
    start = (jnp.zeros((), jnp.int32), jnp.asarray(padded, jnp.int32), state, pad(target), jnp.arange(padded), history)
    last, _, state, _, order, history = lax.while_loop(cond, body, start)
    unsorted = jnp.argsort(order)[:items]
    state = jax.tree.map(lambda a: a[unsorted], state)
    return state, jnp.where(jnp.arange(steps) < last, history[unsorted], state["cost"][..., None])


def residual_size(objective, target, images) -> int:
    """Length of ``objective``'s residual for a ``target`` (*k, C_in, C_out) and ``images`` (or None)."""
    spec = lambda a: None if a is None else (tuple(a.shape), str(a.dtype))  # noqa: E731
    return _residual_size(objective, spec(target), spec(images))


@functools.lru_cache(maxsize=64)
def _residual_size(objective, target: tuple, images: tuple | None) -> int:
    """:func:`residual_size` for a target and images given as (shape, dtype): cached, no tracing."""
    struct = lambda spec: None if spec is None else jax.ShapeDtypeStruct(*spec)  # noqa: E731
    return jax.eval_shape(objective.residual, struct(target), struct(target), struct(images)).shape[0]


def _blocks(problem: Problem, n: int, target, images, total: int) -> tuple[tuple[int, ...], str]:
    """The block sizes and cover of :func:`lm_segment` for ``total`` items of ``n`` parameters.

    On a CPU, the blocks of :func:`cpu_blocks`, covered exactly (a block's cost grows with its
    rows), and with the direct solve at most ~8 MB of dense Jacobians each (so each stays in
    cache: one batch of thousands is memory-bound and slower than a loop of blocks); on an
    accelerator, one block of all items, shrinking by halves as they converge.
    """
    if jax.default_backend() != "cpu":
        return sizes(total), "one"
    m = residual_size(problem.objective, target, images)
    solver = problem.solver
    group = total
    if dense_step(solver, m, n):
        group = int(min(total, 2 ** int(np.log2(max(1, 8e6 // (m * n * target.dtype.itemsize))))))
    return cpu_blocks(group), "exact"


POLISH_MAX_FREE = 3
"""The most free layers a chain may have for :attr:`Screening.polish` to apply.  The exact
Hessian's second-order term costs one inverse FFT per pair of free factors: on the quickstart's
15x15 LoG into seven 3x3 (21 pairs) polishing reached the same minima at seeds 0-3 in 27% more
time (4.55 s against 3.58 s) and its first call compiled 4 s longer (9.96 s against 6.02 s),
where on three layers (3 pairs) it took the 15x15 LoG's search 29% less time."""


class Screening(NamedTuple):
    """How restarts are screened (successive halving; see :func:`first_order` and :func:`refine`).

    Attributes:
      keep: the share of a target's running restarts that survives a screening.
      floor: restarts per target that survive every screening.
      cutoff: once screening is over, a restart still running after ``cutoff_after`` LM
        iterations stops if its loss is above ``cutoff**2`` times the target's lowest so far
        (:func:`_above_cutoff`; None: every survivor runs to convergence).
      cutoff_after: LM iterations before that check.
      polish: once screening is over, the survivors take LM steps on the loss's exact Hessian
        (as with ``Solver(hessian="full")``) where the chain has at most :data:`POLISH_MAX_FREE`
        free layers and the normal equations give the step (:func:`takes_exact_hessian`;
        elsewhere, and during screening, each restart steps as it did: the solver's steps, or
        the exact Hessian's where its ``exact_hessian`` flag is set).
    """

    keep: float
    floor: int
    cutoff: float | None = None
    cutoff_after: int = 0
    polish: bool = False


def _kept(size: int, prune: Screening) -> int:
    """How many of ``size`` running restarts survive a screening: ``prune.keep`` of them, at least ``prune.floor``."""
    return min(size, max(prune.floor, int(np.ceil(prune.keep * size))))


def _survivors(cost, live, stratum, prune: Screening) -> np.ndarray:
    """Successive halving: of each stratum's ``live`` items keep the ``prune.keep`` share with
    the lowest ``cost`` (at least ``prune.floor``); returns the live items to stop (pruned)."""
    pruned = []
    for b in np.unique(stratum[live]):
        mine = live[stratum[live] == b]
        count = _kept(mine.size, prune)
        if count < mine.size:
            pruned.append(mine[np.argsort(cost[mine], kind="stable")[count:]])
    return np.concatenate(pruned) if pruned else np.zeros(0, int)


def _above_cutoff(cost, live, owner, best_before, cutoff: float) -> np.ndarray:
    """The ``live`` items whose ``cost`` is above ``cutoff**2`` times their target's lowest:
    the lower of ``best_before`` (B,), the target's best loss before this batch, and the lowest
    current cost of its items (every cost is one its factors attain).  ``owner`` (items,):
    each item's target.  The loss is half the squared error, so for the kernel objective this
    is an error above ``cutoff`` times the best."""
    reference = np.array(best_before, float)
    np.minimum.at(reference, owner, cost)
    return live[cost[live] > cutoff**2 * reference[owner[live]]]


def refine(problem: Problem, state, free, frozen, target, images, progress, prune: Screening | None = None,
           exact_loss: float | None = None, screened: np.ndarray | None = None, fresh: int | None = None,
           graces: np.ndarray | None = None, best_before: np.ndarray | None = None,
           exact_hessian: np.ndarray | None = None):
    """LM on every (target, restart), ``chunk`` iterations at a time; returns (state, history, pruned).

    Items are flattened to one axis and each chunk is one :func:`lm_segment` call on all of
    them, which keeps the running ones together as others converge (one compiled program
    for every chunk and the rest alike, whatever converges when: a call's length is a traced limit).
    ``prune`` (a :class:`Screening`) screens restarts: after each chunk only the ``keep`` share
    of each target's still-running restarts with the lowest cost (at least ``floor``) goes on;
    the others stop and are marked in ``pruned`` (B, R).
    The first ``fresh`` restarts of a target and the others (perturbations of earlier minima,
    which start near one and would always win) are screened separately, each restart only
    after its ``graces`` (B, R) LM iterations (default: none): a start or a hop that leaves its
    minimum for a better basin may cross a plateau first (on the 9x9 Gabor into 5-5, each blur
    hop into the best basin ranked 30th of 32 for 40 iterations and first at 50).
    Once a target has a restart at or below ``exact_loss`` its other restarts stop too.
    Restarts marked in ``screened`` (B, R) (screened out of the first-order phase) do not run
    and count as pruned.  Once screening can stop no more restarts, the rest runs to
    convergence in one call (a target that turns exact in it lets its other restarts converge),
    but where ``prune.cutoff`` is set, first up to ``prune.cutoff_after`` iterations, after which
    the survivors far above their target's best (:func:`_above_cutoff`, ``best_before`` (B,) its
    best loss before this batch, default none) stop as pruned: their minima cannot be the best,
    and the slowest of them run on alone, where an iteration costs the most per restart.  Where
    ``prune.polish`` is set, that rest takes the exact Hessian's steps where a step can
    (:func:`takes_exact_hessian`) on a chain of at most :data:`POLISH_MAX_FREE` free layers:
    every restart's ``exact`` flag is set then, so the screening chunks and the rest run one
    program.
    ``exact_hessian`` (B, R): the restarts whose steps take the loss's exact Hessian where the
    solver's is Gauss-Newton's (:func:`_normal_equations`; default: none).
    """
    solver = problem.solver
    batch, restarts = state["cost"].shape
    pruned = np.zeros(batch * restarts, bool) if screened is None else screened.ravel().copy()
    total = batch * restarts
    state = jax.tree.map(lambda a: np.array(a).reshape((total,) + a.shape[2:]), state)
    if exact_hessian is not None:
        state["exact"] = np.array(exact_hessian, bool).ravel()  # a copy: polishing writes to it
    polish = (prune is not None and prune.polish and problem.solver.hessian != "full"
              and len(problem.free) <= POLISH_MAX_FREE
              and takes_exact_hessian(problem, residual_size(problem.objective, target[0], images)))
    if polish and "exact" not in state:
        state["exact"] = np.zeros(total, bool)
    # on the host like the state: a slice of sharded factors would make the segment one program over
    # every device they are sharded on, which deadlocks XLA's CPU backend (jax 0.10.2): each device's
    # batched Cholesky waits on the one intra-op thread pool they share (jfactor.one_at_a_time);
    # sliced after the copy, as a slice on the device compiles two small programs per factor shape
    template = jax.tree.map(lambda a: np.asarray(a)[0, 0], free)
    owner = np.repeat(np.arange(batch), restarts)
    hop = np.tile(np.arange(restarts), batch) >= (restarts if fresh is None else fresh)
    stratum = 2 * owner + hop
    ready = np.zeros(total, int) if graces is None else np.asarray(graces).ravel()  # first screening, per item
    target = np.asarray(target)[owner]
    steps = solver.refine_steps
    history = np.empty((total, steps), state["cost"].dtype)
    state["done"] |= pruned
    blocks, cover = _blocks(problem, state["x"].shape[1], target[0], images, total)
    best_before = np.full(batch, np.inf) if best_before is None else np.asarray(best_before, float)
    cut = prune is None or prune.cutoff is None  # whether the cutoff is behind (or off)
    done = 0
    while done < steps and not state["done"].all():
        # screening is over once it would stop none of the running items, whatever their costs
        running = np.flatnonzero(~state["done"])
        rest = prune is not None and not _survivors(state["cost"], running, stratum, prune).size
        if rest and not cut and done >= prune.cutoff_after:
            far = _above_cutoff(state["cost"], running, owner, best_before, prune.cutoff)
            pruned[far] = state["done"][far] = True
            cut = True
            continue
        length = (steps if cut else prune.cutoff_after) - done if rest else min(solver.chunk, steps - done)
        before = state["iterations"]
        # one program for every call: the iteration count is a traced limit, not a shape
        if rest and polish:
            state["exact"][:] = True
        state, costs = lm_segment(problem, state, template, frozen, target, images, steps, blocks, cover,
                                  np.asarray(length, np.int32))
        state = jax.tree.map(np.array, state)
        n = int(np.max(state["iterations"] - before)) if rest else length
        # a screening chunk's columns are cut on the device, so only they cross to the host; the
        # rest's count varies from call to call (cut on the device, each count would compile a slice)
        history[:, done: done + n] = (np.asarray(costs)[:, :n] if rest
                                      else np.asarray(lax.slice_in_dim(costs, 0, n, axis=1)))
        done += n
        live = np.flatnonzero(~state["done"])
        stopped = np.zeros(0, int)
        if prune is not None and done < steps:
            screen = live[done >= ready[live]]
            stopped = _survivors(state["cost"], screen, stratum, prune)
        if exact_loss is not None:
            solved = np.bincount(owner, weights=state["cost"] <= exact_loss, minlength=batch) > 0
            stopped = np.union1d(stopped, live[solved[owner[live]] & (state["cost"][live] > exact_loss)])
        pruned[stopped] = True
        state["done"][stopped] = True
        progress.advance(n, "refining (Levenberg-Marquardt)")
    history = history[:, :done]
    shaped = jax.tree.map(lambda a: a.reshape((batch, restarts) + a.shape[1:]), state)
    return shaped, history.reshape(batch, restarts, done), pruned.reshape(batch, restarts)


def _scale_to_unit(problem: Problem, free, frozen):
    """Scale one restart's free factors so its chain kernel has unit norm (the target's)."""
    approx = chain_kernel(factors_of(problem, free, frozen), problem.chain)
    norm = jnp.linalg.norm(approx)
    factor = jnp.where(norm > 0, norm, 1.0) ** (-1.0 / len(free))
    return tuple(f * factor for f in free)


def _first_order_share(problem: Problem, fresh: int) -> np.ndarray:
    """Indices of the restarts that take the first-order phase: a share of the ``fresh`` ones
    (the first ``fresh`` of a wave; the rest perturb earlier minima and go straight to LM)."""
    if problem.solver.optimizer == "none" or problem.solver.steps == 0:
        return np.zeros(0, int)
    return np.flatnonzero(problem.solver.runs_first_order(fresh))


@cached_jit(static_argnames=("problem", "fresh"))
def start(problem: Problem, free, frozen, target, images, fresh: int):
    """Starting points scaled to the target's norm, their losses (B, R), and the first-order
    carry of the restarts that take that phase (or None; see :func:`_first_order_share`)."""
    free = jax.vmap(jax.vmap(functools.partial(_scale_to_unit, problem), in_axes=(0, None)),
                    in_axes=(0, None))(free, frozen)
    finite = lambda value: jnp.where(jnp.isfinite(value), value, jnp.inf)  # noqa: E731
    losses = _batched(lambda f, fz, t, im: finite(loss(problem, f, fz, t, im)))(free, frozen, target, images)
    share = _first_order_share(problem, fresh)
    if not share.size:
        return free, losses, None
    sub = jax.tree.map(lambda f: f[:, share], free)

    def init(f, fz, t, im):
        state = problem.solver.transform().init(f)
        if problem.solver.optimizer != "lbfgs":
            return state
        value, grad = jax.value_and_grad(lambda p: loss(problem, p, fz, t, im))(f)
        return optax.tree_utils.tree_set(state, value=value, grad=grad)

    state = _batched(init)(sub, frozen, target, images)
    carry = (sub, state, sub, losses[:, share])
    # strong types, as the segments return them: otherwise the second segment compiles again
    return free, losses, jax.tree.map(lambda x: lax.convert_element_type(x, x.dtype), carry)


@cached_jit(static_argnames=("problem", "fresh"))
def to_refine(problem: Problem, starts, best, frozen, target, images, fresh: int):
    """Pick each restart's point (the first-order phase's ``best`` (B, S, ...) for the S
    restarts that took it, else its start), balance it; LM state or None."""
    free = starts
    if best is not None:
        restarts = starts[0].shape[1]
        took = np.zeros(restarts, bool)
        took[_first_order_share(problem, fresh)] = True
        row = np.maximum(np.cumsum(took) - 1, 0)  # each restart's row in the first-order phase
        pick = lambda s, b: jnp.where(took.reshape((1, -1) + (1,) * (s.ndim - 2)), b[:, row], s)  # noqa: E731
        free = jax.tree.map(pick, starts, best)
    free = jax.vmap(jax.vmap(balance))(free)
    if not problem.solver.refines:
        return free, None
    return free, _batched(functools.partial(_lm_state, problem))(free, frozen, target, images)


@cached_jit(static_argnames=("problem",))
def finish(problem: Problem, free, lm_state, frozen, target, images):
    """Final factors (balanced), losses (inf when non-finite) and kernel errors, all (B, R)."""
    if lm_state is not None:
        free = jax.vmap(jax.vmap(lambda x, t: ravel_pytree(t)[1](x)))(lm_state["x"], free)
    free = jax.vmap(jax.vmap(balance))(free)

    def one(free, target):
        approx = chain_kernel(factors_of(problem, free, frozen), problem.chain)
        value = 0.5 * jnp.sum(problem.objective.residual(approx, target, images) ** 2)
        error = jnp.linalg.norm(approx - target) / jnp.linalg.norm(target)
        return jnp.where(jnp.isfinite(value), value, jnp.inf), jnp.where(jnp.isfinite(error), error, jnp.inf)

    losses, errors = jax.vmap(jax.vmap(one, in_axes=(0, None)))(free, target)
    return free, losses, errors


def first_order(problem: Problem, carry, frozen, target, images, progress, prune: Screening | None = None,
                exact_loss: float | None = None, others: np.ndarray | None = None):
    """The first-order phase on the S restarts that take it, ``chunk`` steps at a time (with
    ``prune``, in two calls, to the screening and on: one compiled program per batch shape).

    ``carry`` comes from :func:`start` (leaves (B, S, ...)).  ``prune`` (a :class:`Screening`)
    screens once, after half the steps (rounded up): only the ``keep`` share of each target's
    restarts with the lowest loss so far (at least ``floor``) goes on.  (Screening earlier
    loses the best basins: an L-BFGS run's early loss says little about where it ends.  On
    the 13x13 disk into 5-9, the runs into the best basin ranked 10th-13th of 14 after 25
    and 50 steps, and with halving at 1/8, 1/4 and 1/2 of the steps 2 of 5 seeds found it,
    4 of 5 with one screening at 1/2 and the search's patience at three waves.)  The phase
    stops early once every target has a loss at or below ``exact_loss`` here or in
    ``others`` (B,), the lowest start of its other restarts.

    Returns each restart's best point (numpy leaves (B, S, ...)), its loss (B, S), the loss
    history (B, S, steps run; a screened restart repeats its best loss) and ``screened`` (B, S).
    """
    solver = problem.solver
    best = tuple(np.array(leaf) for leaf in carry[2])
    value = np.array(carry[3])
    batch, size = value.shape
    history = np.empty((batch, size, solver.steps))
    rows = np.tile(np.arange(size), (batch, 1))  # carry row j of target b is its restart rows[b, j]
    ran = np.full((batch, size), solver.steps)  # steps each restart ran before it was screened out
    owner = np.arange(batch)[:, None]
    floor = np.full(batch, np.inf) if others is None else others
    halfway = -(-solver.steps // 2) if prune is not None and _kept(size, prune) < size else None
    done = 0
    while done < solver.steps and not (exact_loss is not None
                                       and (np.minimum(value.min(axis=1), floor) <= exact_loss).all()):
        end = halfway if halfway is not None and done < halfway else solver.steps
        n = end - done if prune is not None else min(solver.chunk, solver.steps - done)
        carry, losses = first_order_segment(problem, carry, frozen, target, images, solver.steps,
                                            np.asarray(n, np.int32))
        losses = np.asarray(lax.slice_in_dim(losses, 0, n, axis=2))
        for full, part in zip(best, carry[2]):
            full[owner, rows] = np.asarray(part)
        value[owner, rows] = np.asarray(carry[3])
        history[owner, rows, done: done + n] = losses
        done += n
        progress.advance(n)
        if done == halfway < solver.steps:
            count = _kept(rows.shape[1], prune)
            order = np.argsort(np.asarray(carry[3]), axis=1, kind="stable")
            ran[owner, np.take_along_axis(rows, order[:, count:], axis=1)] = done
            keep = order[:, :count]
            carry = jax.tree.map(lambda a: jnp.asarray(np.take_along_axis(
                np.asarray(a), keep.reshape(keep.shape + (1,) * (a.ndim - 2)), axis=1)), carry)
            rows = np.take_along_axis(rows, keep, axis=1)
    history = np.where(np.arange(done) < ran[..., None], history[..., :done], value[..., None])
    return best, value, history, ran < solver.steps


def optimise(problem: Problem, free, frozen, target, images, progress, prune: Screening | None = None,
             exact_loss: float | None = None, fresh: int | None = None, first_order_phase: bool = True,
             graces: np.ndarray | None = None, best_before: np.ndarray | None = None,
             exact_hessian: np.ndarray | None = None):
    """Both phases on a batch (B targets, R restarts); ``progress.advance`` per segment.

    Returns (free factors, history (B, R, steps) of the normalised loss, losses (B, R),
    relative kernel errors (B, R), diverged (B, R), pruned (B, R)).  A restart diverged if
    its loss was ever non-finite in a phase it took part in; the history of a phase a
    restart skipped is NaN (not drawn).  ``prune`` screens restarts in both phases
    (:func:`first_order`, :func:`refine`).  Once every target has a restart at or below
    ``exact_loss`` (a start, or the first-order phase's best), the phases stop and the other
    restarts count as pruned; where the first-order phase did not run, so too for each target
    with such a start (its exact starts stand, unrefined, as they would alone; a first-order
    phase runs on every target until all are exact).  Only the first ``fresh`` restarts (default: all) may take the
    first-order phase; the others perturb earlier minima and go straight to LM.  ``graces``
    (B, R): LM iterations before each restart may be screened, and ``best_before`` (B,) each target's
    best loss before this batch, for ``prune.cutoff``, and ``exact_hessian`` (B, R) the restarts whose
    LM steps take the exact Hessian (:func:`refine`).  Without
    ``first_order_phase`` every restart goes straight to LM (where the solver refines by LM).
    """
    fresh = free[0].shape[1] if fresh is None else fresh
    eligible = fresh if first_order_phase or not problem.solver.refines else 0  # may take the first-order phase
    starts, initial, carry = start(problem, free, frozen, target, images, eligible)
    initial = np.asarray(initial)
    batch, restarts = initial.shape
    share = _first_order_share(problem, eligible)
    lowest = initial.copy()
    screened = np.zeros((batch, restarts), bool)
    first = np.zeros((batch, share.size, 0))
    best = None
    if carry is not None:
        best, lowest[:, share], first, screened[:, share] = first_order(
            problem, carry, frozen, target, images, progress, prune, exact_loss, initial.min(axis=1))
    free, state = to_refine(problem, starts, best, frozen, target, images, eligible)
    pruned = screened
    second = np.zeros((batch, restarts, 0))
    solved = np.zeros(batch, bool) if exact_loss is None else lowest.min(axis=1) <= exact_loss
    if solved.all():
        pruned = lowest > exact_loss
        state = None  # the starts, or the first-order phase's best points, stand
    elif state is not None:
        if solved.any() and carry is None:  # an exact target stands as alone: its exact starts, the rest pruned
            screened = screened | (solved[:, None] & (lowest > exact_loss))
            state = {**state, "done": np.asarray(state["done"]) | (solved[:, None] & (lowest <= exact_loss))}
        state, second, pruned = refine(problem, state, free, frozen, target, images, progress, prune, exact_loss,
                                       screened, fresh, graces, best_before, exact_hessian)
    free, losses, errors = finish(problem, free, state, frozen, target, images)
    losses, errors = np.asarray(losses), np.asarray(errors)
    took_first = np.zeros(restarts, bool)
    took_first[share] = True
    first_full = np.full((batch, restarts, first.shape[-1]), np.nan)
    first_full[:, share] = first
    diverged = ((~np.isfinite(first_full) & took_first[None, :, None]).any(axis=-1)
                | ~np.isfinite(second).all(axis=-1) | ~np.isfinite(losses) | ~np.isfinite(errors))
    history = np.concatenate([first_full, second], axis=-1)
    return free, history, losses, errors, diverged, pruned
