"""LM steps on the loss's exact Hessian: the solver option, the per-restart choice, and the
default search's use of it for the blur starts and hops of two-layer chains."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfactor  # noqa: F401  (float64 on)
from jfactor import kernels
from jfactor.errors import ConfigError
from jfactor.factorize import Chain, SearchPolicy, Solver, factorize, solve
from jfactor.factorize.objectives import Objective
from jfactor.factorize.solve import Problem, _lm_state, lm_segment

CHAIN = Chain.build([3, 3])
STEPS = 8
ITEMS = 6


def _run(hessian: str, exact=None, blocks=(1,), items=range(ITEMS)):
    """Restarts ``items`` of six, each fitting its own random 5x5 target into 3-3 from its own
    random start, ``STEPS`` LM iterations in ``blocks``; the final state (numpy)."""
    rng = np.random.default_rng(3)
    free = [rng.normal(size=(ITEMS, 3, 3, 1, 1)) for _ in range(2)]
    targets = np.stack([kernels.random_normal(5, seed=10 + i)[..., None, None] for i in range(ITEMS)])
    items = list(items)
    problem = Problem(CHAIN, 1, 1, Objective("kernel"), Solver(optimizer="none", hessian=hessian))
    free = tuple(jnp.asarray(f[items]) for f in free)
    target = jnp.asarray(targets[items])
    state = jax.vmap(lambda f, t: _lm_state(problem, f, [None, None], t, None))(free, target)
    if exact is not None:
        state["exact"] = jnp.asarray(exact)
    template = jax.tree.map(lambda a: a[0], free)
    state, _ = lm_segment(problem, state, template, [None, None], target, None, STEPS, blocks)
    return jax.tree.map(np.asarray, state)


def test_flagged_restarts_step_on_the_exact_hessian_and_the_others_on_gauss_newtons():
    """Six restarts in blocks of 4, 2 and 1 (padded, regrouped as they converge), every other
    one flagged: each runs as it does alone with the exact Hessian (flagged) or Gauss-Newton's."""
    exact = np.arange(ITEMS) % 2 == 0
    state = _run("gauss-newton", exact, blocks=(4, 2, 1))
    np.testing.assert_array_equal(state["exact"], exact)  # the flags come back in the items' order
    differ = 0.0
    for i in range(ITEMS):
        alone = _run("full" if exact[i] else "gauss-newton", items=[i])
        other = _run("gauss-newton" if exact[i] else "full", items=[i])
        np.testing.assert_allclose(state["x"][i], alone["x"][0], rtol=1e-8, atol=1e-10)  # rounding, grown over steps
        differ = max(differ, np.abs(alone["x"][0] - other["x"][0]).max())
    assert differ > 1e-3  # the two steps lead elsewhere: the comparisons above can fail


def test_the_exact_hessian_factorizes_an_exact_product_to_the_rounding_floor():
    rng = np.random.default_rng(8)
    a, b = rng.normal(size=(3, 3)), rng.normal(size=(3, 3))
    from scipy.signal import convolve2d

    result = factorize(convolve2d(a, b), CHAIN, restarts=4, baselines=(),
                       solver=Solver(optimizer="none", hessian="full"))
    assert result.rel_error < 1e-10


def test_the_exact_hessian_needs_the_kernel_objective():
    with pytest.raises(ConfigError, match="solver.hessian full"):
        factorize(kernels.gabor(9), Chain.build([5, 5]), restarts=2, baselines=(), objective="spectral",
                  solver=Solver(optimizer="none", hessian="full", refine_steps=3))


def test_unknown_hessian_and_exact_hessian_values_are_config_errors():
    with pytest.raises(ConfigError, match="solver.hessian"):
        Solver(hessian="newton")
    with pytest.raises(ConfigError, match="exact_hessian"):
        SearchPolicy(exact_hessian="yes")
    with pytest.raises(ConfigError, match="polish"):
        SearchPolicy(polish="yes")


@pytest.mark.parametrize("kernel, sizes, policy, takes", [
    (kernels.gabor(9), [5, 5], SearchPolicy(), True),  # band-pass, two layers: its blur starts and hops
    (kernels.gabor(9), [5, 5], SearchPolicy(exact_hessian=False), False),
    (kernels.make("log", 11), [3, 5, 5], SearchPolicy(), False),  # three layers
    (kernels.disk(9), [5, 5], SearchPolicy(), False),  # no blur starts: not band-pass
])
def test_the_default_search_flags_two_layer_blur_starts_only_for_the_exact_hessian(monkeypatch, kernel, sizes,
                                                                                     policy, takes):
    seen = []
    refine = solve.refine

    def spy(*args):
        seen.append((args[11], args[13]))  # graces, exact_hessian
        return refine(*args)

    monkeypatch.setattr(solve, "refine", spy)
    policy = SearchPolicy(**{**policy.__dict__, "max_restarts": policy.wave})  # one wave
    factorize(kernel, Chain.build(sizes), baselines=(), search=policy, solver=Solver(refine_steps=30))
    ((graces, exact),) = seen
    if not takes:
        assert exact is None
        return
    # the blur starts, and only they, wait the two-layer blur grace (other fresh starts: none or the first wave's)
    assert policy.grace not in (0, policy.first_wave_grace)
    assert exact.any() and np.array_equal(exact, graces == policy.grace)


def test_the_default_search_reaches_the_best_basin_of_a_9x9_gabor_into_5_5():
    """With Gauss-Newton steps throughout (and the grace of 50 that went with them), seed 402
    stopped at 1.085e-2 (31 of seeds 400-439 reached 9.746e-3; 39 with the exact Hessian)."""
    result = factorize(kernels.gabor(9), Chain.build([5, 5]), baselines=(), seed=402)
    assert result.rel_error <= 9.7462e-3



def _segments(monkeypatch, kernel, sizes, policy, **kwargs):
    """A default search's result and each of its LM segments' Hessian (the one its running
    restarts stepped on: ``full``, ``gauss-newton`` or ``mixed``) and LM iterations (its
    restarts' in all), in call order."""
    seen = []
    segment = solve.lm_segment

    def spy(problem, state, *args):
        running = ~np.asarray(state["done"])
        exact = np.asarray(state.get("exact", np.zeros_like(running)))[running]
        hessian = "full" if exact.all() else "mixed" if exact.any() else problem.solver.hessian
        before = np.asarray(state["iterations"]).sum()
        state, costs = segment(problem, state, *args)
        seen.append((hessian, int(np.asarray(state["iterations"]).sum() - before)))
        return state, costs

    monkeypatch.setattr(solve, "lm_segment", spy)
    result = factorize(kernel, Chain.build(sizes), baselines=(), search=policy, **kwargs)
    return result, seen


@pytest.mark.parametrize("kernel, sizes, policy, objective, first, polished", [
    (kernels.make("log", 11), [3, 5, 5], SearchPolicy(max_restarts=64), "kernel", "gauss-newton", True),
    (kernels.make("log", 11), [3, 5, 5], SearchPolicy(max_restarts=64, polish=False), "kernel", "gauss-newton", False),
    # its step does not come from the normal equations
    (kernels.make("log", 11), [3, 5, 5], SearchPolicy(max_restarts=64), "spectral", "gauss-newton", False),
    # two layers, band-pass: the blur starts take the exact Hessian from the start, the others after screening
    (kernels.gabor(9), [5, 5], SearchPolicy(max_restarts=64), "kernel", "mixed", True),
    # more free layers than POLISH_MAX_FREE: the second-order term costs one inverse FFT per pair
    (kernels.make("log", 9), [3, 3, 3, 3], SearchPolicy(max_restarts=64), "kernel", "gauss-newton", False),
    # a plain multistart: no screening, no polishing
    (kernels.make("log", 11), [3, 5, 5], SearchPolicy(restarts=16), "kernel", "gauss-newton", False),
])
def test_the_survivors_of_screening_and_only_they_step_on_the_exact_hessian(monkeypatch, kernel, sizes, policy,
                                                                           objective, first, polished):
    """One wave: segments of successive halving (or a plain run's chunks) on the restarts' own
    steps, then (polished) the rest to convergence on the exact Hessian's."""
    _, seen = _segments(monkeypatch, kernel, sizes, policy, objective=objective, solver=Solver(refine_steps=200))
    hessians = [h for h, _ in seen]
    screening = hessians.index("full") if polished else len(hessians)
    assert screening > (0 if policy.restarts else 1)  # successive halving: several segments
    assert hessians == [first] * screening + ["full"] * (len(hessians) - screening)


def test_polishing_keeps_the_best_minimum_in_fewer_iterations(monkeypatch):
    """One wave of the default search on the 15x15 LoG into 3-5-9 ends at the same best error
    with and without the exact Hessian after screening, in fewer LM iterations with it (2,042
    and 1,381 at seed 1 on the 2-core CPU): Gauss-Newton converges linearly where the residual
    is not small against J^T J's small eigenvalues."""
    kernel = kernels.make("log", 15)
    runs = {}
    for polish in (False, True):
        with monkeypatch.context() as patch:
            runs[polish] = _segments(patch, kernel, [3, 5, 9], SearchPolicy(max_restarts=64, polish=polish), seed=1)
    np.testing.assert_allclose(runs[True][0].rel_error, runs[False][0].rel_error, rtol=1e-6)
    iterations = {polish: sum(n for _, n in seen) for polish, (_, seen) in runs.items()}
    assert iterations[True] < 0.85 * iterations[False]


def _conds(jaxpr) -> int:
    """``cond`` equations in a jaxpr and every jaxpr nested in it (``lax.switch`` branches included)."""
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == "cond"
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    count += _conds(inner)
    return count


def test_the_second_order_term_is_a_branch_of_each_block_not_a_select():
    """With per-restart flags, each block size's LM step holds one more ``cond`` (whether any of
    its running rows is flagged) than without: a predicate batched with the rows would have made it
    a select, which computes the second-order term for every block."""
    rng = np.random.default_rng(3)
    problem = Problem(CHAIN, 1, 1, Objective("kernel"), Solver(optimizer="none"))
    free = tuple(jnp.asarray(rng.normal(size=(4, 3, 3, 1, 1))) for _ in range(2))
    target = jnp.asarray(rng.normal(size=(4, 5, 5, 1, 1)))
    state = jax.vmap(lambda f, t: _lm_state(problem, f, [None, None], t, None))(free, target)
    template = jax.tree.map(lambda a: a[0], free)

    def conds(state):
        return _conds(jax.make_jaxpr(lambda s: lm_segment(problem, s, template, [None, None], target, None, 3,
                                                          (4, 2, 1)))(state).jaxpr)

    blocks = 3
    assert conds({**state, "exact": jnp.zeros(4, bool)}) == conds(state) + blocks


def test_a_block_with_no_exact_restart_steps_as_gauss_newton_does():
    """Every restart flagged off: the block-level branch skips the second-order term, and each
    restart runs as it does with Gauss-Newton's steps and no flags."""
    flagged = _run("gauss-newton", np.zeros(ITEMS, bool), blocks=(4, 2, 1))
    plain = _run("gauss-newton", blocks=(4, 2, 1))
    np.testing.assert_allclose(flagged["x"], plain["x"], rtol=1e-12, atol=1e-14)
