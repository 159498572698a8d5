"""The on-device LM loop: items run alone or among others that converge at other times alike."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jfactor  # noqa: F401  (float64 on)
from jfactor import kernels
from jfactor.cache import compile_stats
from jfactor.factorize import Chain, Solver
from jfactor.factorize.chain import chain_kernel_numpy
from jfactor.factorize.objectives import Objective
from jfactor.factorize.solve import Problem, _lm_state, _next_block, bucket, cpu_blocks, lm_segment, sizes

CHAIN = Chain.build([3, 3])
PROBLEM = Problem(CHAIN, 1, 1, Objective("kernel"), Solver(optimizer="none"))
STEPS = 12  # long enough for the rows to shrink, short enough that rounding has not grown chaotic


def _items(count: int, seed: int):
    """LM states of ``count`` items, one restart each of its own 5x5 target, and the targets.

    Every other item starts next to an exact answer (its target is the chain of its start's
    factors before a 1e-3 nudge) and converges within a few iterations; the others fit a
    random kernel from a random start and take tens of iterations."""
    rng = np.random.default_rng(seed)
    free = [rng.normal(size=(count, 3, 3, 1, 1)) for _ in range(2)]
    targets = []
    for i in range(count):
        if i % 2 == 0:
            target = chain_kernel_numpy([f[i] for f in free], CHAIN)
            for f in free:
                f[i] += 1e-3 * rng.normal(size=f[i].shape)
        else:
            target = kernels.random_normal(5, seed=int(rng.integers(1 << 30)))[..., None, None]
        targets.append(target)
    targets = jnp.asarray(np.stack(targets))
    free = tuple(jnp.asarray(f) for f in free)
    state = jax.vmap(lambda f, t: _lm_state(PROBLEM, f, [None, None], t, None))(free, targets)
    return state, jax.tree.map(lambda a: a[0], free), targets


def _alone(state, template, targets, item: int):
    """Item ``item`` run by itself (a batch of one)."""
    one = jax.tree.map(lambda a: a[item: item + 1], state)
    return lm_segment(PROBLEM, one, template, [None, None], targets[item: item + 1], None, STEPS, (1,))


@pytest.mark.parametrize("blocks, cover", [
    ((16, 8, 4), "one"),  # one block that shrinks as items converge
    ((16, 8, 4, 2, 1), "exact"),  # blocks that cover the running items exactly
    ((16, 4, 1), "exact"),  # the same on the CPU's ladder (cpu_blocks)
    ((5,), "exact"),  # blocks of 5 over 20 padded rows
    ((6, 3), "exact"),  # a remainder smaller than every block: covered by a block over done rows
])
def test_an_item_runs_alike_alone_and_among_items_that_converge_earlier(blocks, cover):
    state, template, targets = _items(16, seed=0)
    together, history = lm_segment(PROBLEM, state, template, [None, None], targets, None, STEPS, blocks, cover)
    iterations = np.asarray(together["iterations"])
    # the premise: half the items stop within 6 iterations and the others run on, gathered into 8 rows
    assert iterations[::2].max() <= 6 and np.all(iterations[1::2] == STEPS)
    for item in range(16):
        alone, alone_history = _alone(state, template, targets, item)
        assert int(alone["iterations"][0]) == iterations[item]
        assert bool(alone["done"][0]) == bool(together["done"][item])
        np.testing.assert_allclose(np.asarray(together["x"][item]), np.asarray(alone["x"][0]), rtol=0, atol=1e-10)
        # costs agree to roundoff: 1e-9 of themselves, or of the start's cost once they near the float64
        # floor (the batched Cholesky's last bits differ with the batch size)
        np.testing.assert_allclose(np.asarray(history[item]), np.asarray(alone_history[0]), rtol=1e-9,
                                   atol=1e-9 * float(alone_history[0, 0]))
        # after its last iteration an item's history repeats its final cost
        assert np.all(np.asarray(history[item, iterations[item]:]) == np.asarray(together["cost"][item]))


def test_items_that_converge_at_other_times_run_in_the_same_program():
    first, template, targets = _items(16, seed=1)
    lm_segment(PROBLEM, first, template, [None, None], targets, None, STEPS, (16, 8, 4, 2, 1))
    other, _, other_targets = _items(16, seed=2)
    other["done"] = other["done"].at[::2].set(True)  # half the rows stopped before the segment starts
    before = compile_stats()["programs"]
    state, _ = lm_segment(PROBLEM, other, template, [None, None], other_targets, None, STEPS, (16, 8, 4, 2, 1))
    assert compile_stats()["programs"] == before
    stopped = np.asarray(other["x"])[::2]
    np.testing.assert_array_equal(np.asarray(state["x"])[::2], stopped)  # items done on entry are left as they are
    assert np.all(np.asarray(state["iterations"])[::2] == 0) and np.all(np.asarray(state["iterations"])[1::2] > 0)


@given(total=st.integers(1, 5000), count=st.integers(0, 5000), base=st.sampled_from([2, 4]))
def test_row_counts_divide_the_batch_and_the_bucket_holds_the_items(total, count, base):
    rows = sizes(total, base)
    assert rows[0] == total and list(rows) == sorted(rows, reverse=True)
    assert all(total % r == 0 and (r >= 4 or r == total) for r in rows)
    assert rows[-1] % base or rows[-1] // base < 4
    count = min(count, total)
    size = bucket(count, total, base)
    assert size in rows and size >= count
    assert all(r < count for r in rows if r < size)


@given(total=st.integers(1, 5000))
def test_cpu_blocks_halve_to_sixteen_then_quarter(total):
    blocks = cpu_blocks(total)
    assert blocks[0] == total and (blocks[-1] == 1 or blocks[-1] > 8) and all(total % b == 0 for b in blocks)
    assert all(big > small for big, small in zip(blocks, blocks[1:]))
    for big, small in zip(blocks, blocks[1:]):
        assert (big == 2 * small and small >= 16) or (big == 4 * small and big < 32) or small == 1
    assert len(blocks) <= 2 + np.log2(total)


@pytest.mark.parametrize("total, blocks", [(1, (1,)), (8, (8, 2, 1)), (48, (48, 24, 6, 1)), (64, (64, 32, 16, 4, 1)),
                                           (100, (100, 50, 25)), (34, (34, 17)), (256, (256, 128, 64, 32, 16, 4, 1))])
def test_cpu_blocks_of_some_batches(total, blocks):
    assert cpu_blocks(total) == blocks


@given(total=st.integers(1, 300), live=st.integers(0, 300), ladder=st.sampled_from(["halves", "halves to 4", "cpu"]),
       cover=st.sampled_from(["exact", "one"]))
def test_blocks_cover_the_running_rows_and_stay_inside_the_padded_ones(total, live, ladder, cover):
    blocks = cpu_blocks(total) if ladder == "cpu" else sizes(total, least=1 if ladder == "halves" else 4)
    padded = blocks[0]
    live = min(live, padded)
    block_sizes = jnp.asarray(blocks, jnp.int32)
    offset, used = 0, []
    while offset < live:
        size = blocks[int(_next_block(block_sizes, live - offset, cover))]
        assert offset + size <= padded  # never past the rows there are
        used.append(size)
        offset += size
    if cover == "exact" and blocks[-1] == 1:
        assert offset == live  # no work on rows that do not run
    if cover == "one" and live:
        assert used == [min(b for b in blocks if b >= live)]  # one launch, the smallest block that holds them


def test_a_limit_stops_a_long_segment_where_a_short_one_stops():
    state, template, targets = _items(16, seed=3)
    short, short_history = lm_segment(PROBLEM, state, template, [None, None], targets, None, 5, (16, 8, 4, 2, 1))
    long, long_history = lm_segment(PROBLEM, state, template, [None, None], targets, None, 40, (16, 8, 4, 2, 1),
                                    "exact", np.asarray(5, np.int32))
    assert int(np.max(long["iterations"])) == 5
    np.testing.assert_array_equal(np.asarray(long["x"]), np.asarray(short["x"]))
    np.testing.assert_array_equal(np.asarray(long_history)[:, :5], np.asarray(short_history))
    assert np.all(np.asarray(long_history)[:, 5:] == np.asarray(long["cost"])[:, None])


def test_once_screening_can_stop_nothing_the_rest_runs_in_one_call(monkeypatch):
    """Four restarts with a floor of four: no screening can stop one, so LM runs them to the end in
    one call, to the points that segment after segment reaches."""
    from jfactor.factorize import solve
    from jfactor.progress import ProgressBar

    state, template, targets = _items(4, seed=4)
    state = jax.tree.map(lambda a: np.asarray(a)[None], state)  # one target's four restarts: (1, 4, ...)
    free = tuple(np.asarray(f)[None, None] for f in template)
    calls = []
    original = solve.lm_segment
    monkeypatch.setattr(solve, "lm_segment", lambda *a, **k: calls.append((a[6], int(a[9]))) or original(*a, **k))
    problem = Problem(CHAIN, 1, 1, Objective("kernel"), Solver(optimizer="none", refine_steps=60, chunk=10))
    run = lambda prune: solve.refine(problem, dict(state), free, [None, None], np.asarray(targets[:1]), None,  # noqa: E731
                                     ProgressBar(False, 0, ""), prune)
    screened, screened_history, pruned = run(solve.Screening(0.5, 4))
    assert calls == [(60, 60)] and not pruned.any()
    calls.clear()
    chunked, chunked_history, _ = run(None)
    assert len(calls) > 1 and set(calls) == {(60, 10)}  # one program (60 steps), stopped every 10
    np.testing.assert_array_equal(screened["x"], chunked["x"])
    ran = screened_history.shape[-1]  # the one call reports the iterations it ran, chunks whole chunks
    assert ran == int(np.max(screened["iterations"])) < chunked_history.shape[-1]
    np.testing.assert_array_equal(screened_history, chunked_history[..., :ran])
    assert np.all(chunked_history[..., ran:] == chunked["cost"][..., None])


@pytest.mark.parametrize("grace", [0, 30])
def test_perturbations_are_screened_only_after_the_grace_iterations(grace):
    """Eight fresh restarts and eight perturbations of one target, screened every 10 LM
    iterations (keep half, floor 1): fresh ones are screened from the first chunk on, the
    perturbations (screened apart from them) not before ``grace`` iterations."""
    from jfactor.factorize import solve
    from jfactor.progress import ProgressBar

    rng = np.random.default_rng(5)
    target = jnp.asarray(kernels.random_normal(5, seed=11)[None, ..., None, None])
    free = tuple(jnp.asarray(rng.normal(size=(1, 16, 3, 3, 1, 1))) for _ in range(2))
    state = jax.vmap(jax.vmap(lambda f, t: _lm_state(PROBLEM, f, [None, None], t, None), in_axes=(0, None)))(
        free, target)
    problem = Problem(CHAIN, 1, 1, Objective("kernel"), Solver(optimizer="none", refine_steps=60, chunk=10))
    state, history, pruned = solve.refine(problem, state, free, [None, None], target, None, ProgressBar(False, 0, ""),
                                          solve.Screening(0.5, 1), fresh=8,
                                          graces=np.repeat([[0, grace]], 8, axis=1))
    ran = np.asarray(state["iterations"])[0]
    fresh, hops = ran[:8][pruned[0, :8]], ran[8:][pruned[0, 8:]]
    assert fresh.size and hops.size and fresh.min() == 10
    assert hops.min() == max(grace, 10)
