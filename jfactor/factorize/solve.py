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

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.flatten_util import ravel_pytree

from jfactor.errors import ConfigError
from jfactor.factorize.chain import Chain, chain_jacobian, chain_kernel
from jfactor.factorize.objectives import Objective
from jfactor.schema import unknown_key

OPTIMIZERS = ("adam", "lbfgs", "none")
SCHEDULES = ("constant", "cosine", "exponential")
REFINES = ("lm", "none")


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
        others go straight to LM.  The two reach different minima, and a portfolio of
        both finds the best one more often than either alone.
      chunk: steps per jitted segment (progress granularity).
    """

    optimizer: str = "lbfgs"
    steps: int = 200
    learning_rate: float = 0.01
    schedule: str = "cosine"
    refine: str = "lm"
    refine_steps: int = 500
    first_order_share: float = 0.5
    chunk: int = 100

    def __post_init__(self):
        for name, value, accepted in (("optimizer", self.optimizer, OPTIMIZERS),
                                      ("schedule", self.schedule, SCHEDULES),
                                      ("refine", self.refine, REFINES)):
            if value not in accepted:
                raise ConfigError(f"solver.{name}: {unknown_key(value, accepted, name)}")
        for name in ("steps", "refine_steps", "chunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if name == "chunk" else 0):
                raise ConfigError(f"solver.{name}: must be a non-negative integer, got {value!r}")
        if not self.learning_rate > 0:
            raise ConfigError(f"solver.learning_rate: must be > 0, got {self.learning_rate!r}")
        if not 0 <= self.first_order_share <= 1:
            raise ConfigError(f"solver.first_order_share: must be in [0, 1], got {self.first_order_share!r}")
        if self.refine == "none" and self.optimizer != "none":
            object.__setattr__(self, "first_order_share", 1.0)  # nothing else would optimise the rest

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

@functools.partial(jax.jit, static_argnames=("problem", "steps"))
def first_order_segment(problem: Problem, carry, frozen, target, images, steps: int):
    """``steps`` optimizer steps; returns the new carry and the losses (B, R, steps)."""
    tx = problem.solver.transform()

    def one(carry, frozen, target, images):
        value_fn = lambda p: loss(problem, p, frozen, target, images)  # noqa: E731
        value_and_grad = (optax.value_and_grad_from_state(value_fn) if problem.solver.optimizer == "lbfgs"
                          else lambda p, state: jax.value_and_grad(value_fn)(p))

        def step(carry, _):
            free, state, best, best_value = carry
            value, grad = value_and_grad(free, state=state)
            updates, state = tx.update(grad, state, free, value=value, grad=grad, value_fn=value_fn)
            better = jnp.isfinite(value) & (value < best_value)
            best = jax.tree.map(lambda b, p: jnp.where(better, p, b), best, free)
            best_value = jnp.where(better, value, best_value)
            return (optax.apply_updates(free, updates), state, best, best_value), value

        return lax.scan(step, carry, None, length=steps)

    free, state, best, best_value = carry
    return _batched(lambda c, fz, t, im: one(c, fz, t, im))((free, state, best, best_value), frozen, target, images)


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


def _lm_iterate(problem: Problem, state, template, frozen, target, images):
    """One damped Gauss-Newton step of one restart; a done restart is returned unchanged."""
    _, unravel = ravel_pytree(template)
    fn = lambda x: residual(problem, unravel(x), frozen, target, images)  # noqa: E731
    x, cost, mu, nu = state["x"], state["cost"], state["mu"], state["nu"]
    tiny = jnp.finfo(x.dtype).tiny
    eps = jnp.finfo(x.dtype).eps
    ftol = 1e4 * eps  # relative cost decrease below which a step counts as converged
    r, jac = _jacobian(problem, unravel(x), frozen, target, images)
    n, m = x.shape[0], r.shape[0]
    g = jac.T @ r
    if m >= n:
        a = jac.T @ jac
        d = jnp.diag(a)
        d = jnp.maximum(d, 1e-9 * jnp.max(d) + tiny)
        delta = -jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(a + mu * jnp.diag(d)), g)
        damped = mu * d * delta
    else:  # fewer residuals than parameters: the dual (m x m) system
        b = jac @ jac.T
        scale = jnp.trace(b) / m + tiny
        damped_gram = b + mu * scale * jnp.eye(m, dtype=b.dtype)
        delta = -jac.T @ jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(damped_gram), r)
        damped = mu * scale * delta
    new_r = fn(x + delta)
    new_cost = 0.5 * jnp.vdot(new_r, new_r)
    predicted = 0.5 * jnp.vdot(delta, damped - g)
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
    }
    return jax.tree.map(lambda old, upd: jnp.where(state["done"], old, upd), state, new)


@functools.partial(jax.jit, static_argnames=("problem", "steps"))
def lm_segment(problem: Problem, state, free_template, frozen, target, images, steps: int):
    """Up to ``steps`` LM iterations for every (target, restart), stopping once all converged.

    Returns the state and the cost history (B, R, steps); entries after the last
    iteration repeat the final cost.
    """
    iterate = jax.vmap(functools.partial(_lm_iterate, problem), in_axes=(0, 0, None, None, None))
    iterate = jax.vmap(iterate, in_axes=(0, 0, None, 0, None))
    history = jnp.zeros(state["cost"].shape + (steps,), state["cost"].dtype)

    def cond(carry):
        i, state, _ = carry
        return (i < steps) & ~jnp.all(state["done"])

    def body(carry):
        i, state, history = carry
        state = iterate(state, free_template, frozen, target, images)
        return i + 1, state, lax.dynamic_update_index_in_dim(history, state["cost"], i, axis=-1)

    last, state, history = lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), state, history))
    filled = jnp.arange(steps) < last
    return state, jnp.where(filled, history, state["cost"][..., None])


def _scale_to_unit(problem: Problem, free, frozen):
    """Scale one restart's free factors so its chain kernel has unit norm (the target's)."""
    approx = chain_kernel(factors_of(problem, free, frozen), problem.chain)
    norm = jnp.linalg.norm(approx)
    factor = jnp.where(norm > 0, norm, 1.0) ** (-1.0 / len(free))
    return tuple(f * factor for f in free)


@functools.partial(jax.jit, static_argnames=("problem",))
def start(problem: Problem, free, frozen, target, images):
    """Starting points scaled to the target's norm, and the first-order carry (or None)."""
    free = jax.vmap(jax.vmap(functools.partial(_scale_to_unit, problem), in_axes=(0, None)),
                    in_axes=(0, None))(free, frozen)
    if problem.solver.optimizer == "none" or problem.solver.steps == 0:
        return free, None

    def one(free, frozen, target, images):
        value = loss(problem, free, frozen, target, images)
        return problem.solver.transform().init(free), free, jnp.where(jnp.isfinite(value), value, jnp.inf)

    state, best, best_value = _batched(one)(free, frozen, target, images)
    carry = (free, state, best, best_value)
    # strong types, as the segments return them: otherwise the second segment compiles again
    return free, jax.tree.map(lambda x: lax.convert_element_type(x, x.dtype), carry)


@functools.partial(jax.jit, static_argnames=("problem",))
def to_refine(problem: Problem, starts, carry, frozen, target, images):
    """Pick each restart's point (first-order best, or its start), balance it; LM state or None."""
    free = starts
    if carry is not None:
        chosen = jnp.asarray(problem.solver.runs_first_order(starts[0].shape[1]))
        free = jax.tree.map(lambda best, s: jnp.where(chosen.reshape((1, -1) + (1,) * (s.ndim - 2)), best, s),
                            carry[2], starts)
    free = jax.vmap(jax.vmap(balance))(free)
    if problem.solver.refine == "none" or problem.solver.refine_steps == 0:
        return free, None
    return free, _batched(functools.partial(_lm_state, problem))(free, frozen, target, images)


@functools.partial(jax.jit, static_argnames=("problem",))
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


def optimise(problem: Problem, free, frozen, target, images, progress):
    """Both phases on a batch (B targets, R restarts); ``progress.advance`` per segment.

    Returns (free factors, history (B, R, steps) of the normalised loss, losses (B, R),
    relative kernel errors (B, R), diverged (B, R)).  A restart diverged if its loss was
    ever non-finite in a phase it took part in; the history of a phase a restart skipped
    is NaN (not drawn).
    """
    solver = problem.solver
    first, second = [], []
    starts, carry = start(problem, free, frozen, target, images)
    done = 0
    while carry is not None and done < solver.steps:
        n = min(solver.chunk, solver.steps - done)
        carry, losses = first_order_segment(problem, carry, frozen, target, images, n)
        first.append(np.asarray(losses))
        done += n
        progress.advance(n)
    free, state = to_refine(problem, starts, carry, frozen, target, images)
    done = 0
    while state is not None and done < solver.refine_steps and not bool(jnp.all(state["done"])):
        n = min(solver.chunk, solver.refine_steps - done)
        state, costs = lm_segment(problem, state, free, frozen, target, images, n)
        second.append(np.asarray(costs))
        done += n
        progress.advance(n, "refining (Levenberg-Marquardt)")
    free, losses, errors = finish(problem, free, state, frozen, target, images)
    losses, errors = np.asarray(losses), np.asarray(errors)
    empty = np.zeros(losses.shape + (0,))
    first = np.concatenate(first, axis=-1) if first else empty
    second = np.concatenate(second, axis=-1) if second else empty
    took_first = solver.runs_first_order(losses.shape[1])[None, :, None]
    diverged = ((~np.isfinite(first) & took_first).any(axis=-1) | ~np.isfinite(second).all(axis=-1)
                | ~np.isfinite(losses) | ~np.isfinite(errors))
    history = np.concatenate([np.where(took_first, first, np.nan), second], axis=-1)
    return free, history, losses, errors, diverged
