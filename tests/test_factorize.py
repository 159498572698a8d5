"""Learned factorization: exactness where it exists, honest errors, and the result's contracts."""

import numpy as np
import pytest
import scipy.signal as sp

import jfactor as jf
from jfactor import kernels
from jfactor.factorize import Chain, FactorizationError, SearchPolicy, Solver, Target, factorize, factorize_batch

FAST = Solver(optimizer="none", refine_steps=200, chunk=50)  # LM only: one compile per geometry
SEED_A1 = np.array([[1, 1, 0], [1, 0, 0], [0, 1, 1]], float)  # seed section 3
SEED_A2 = np.array([[0, 0, 0], [1, 1, 1], [0, 0, 0]], float)


@pytest.mark.parametrize("family", ["gaussian", "box"])
def test_separable_targets_are_exact_when_sizes_add_up(family):
    result = factorize(kernels.make(family, 15), Chain.build([3, 5, 9]), solver=FAST, restarts=4, baselines=())
    assert result.rel_error <= 1e-10
    assert result.metrics["max_abs_error"] <= 1e-12


def test_factors_fold_back_to_the_reported_approximation():
    target = kernels.make("log", 9)
    result = factorize(target, Chain.build([3, 3, 3], dilations=[1, 1, 2]), solver=FAST, restarts=4, baselines=())
    stack = result.to_stack((20, 20, 1))
    folded = jf.fold(stack)
    np.testing.assert_allclose(np.asarray(folded.conv.kernel)[..., 0, 0], result.approx_like_target(), atol=1e-12)
    error = np.linalg.norm(np.asarray(folded.conv.kernel)[..., 0, 0] - target) / np.linalg.norm(target)
    assert error == pytest.approx(result.rel_error, rel=1e-9)
    assert result.rel_error < 0.2


def test_the_seeds_known_factor_case_is_exact_and_wiener_is_not():
    """Section 3: D1 = A1 (*) A2 with A1 known; the seed's Wiener route misses A2, least squares does not."""
    d1 = sp.convolve2d(SEED_A1, SEED_A2)
    chain = Chain.build([3, 3], frozen={0: SEED_A1})
    result = factorize(d1, chain, solver=FAST, restarts=2,
                       baselines=("lstsq", "wiener", "unsupervised_wiener", "als"))
    assert result.rel_error < 1e-10
    np.testing.assert_allclose(result.factors[1][..., 0, 0], SEED_A2, atol=1e-9)
    np.testing.assert_array_equal(result.factors[0][..., 0, 0], SEED_A1)
    assert result.baselines["lstsq"]["rel_error"] < 1e-10
    for name in ("wiener", "unsupervised_wiener"):
        assert result.baselines[name]["rel_error"] > 10 * max(result.rel_error, 1e-12)
        assert result.baselines[name]["time_s"] >= 0


@pytest.mark.parametrize("size", [1, 2])
def test_wiener_baselines_run_on_targets_smaller_than_their_regulariser(size):
    """skimage's Wiener filters regularise with a 3x3 Laplacian: a 1x1 or 2x2 target into one layer
    (the known part an impulse) still gets an error, not a broadcasting failure as its note."""
    target = np.random.default_rng(size).standard_normal((size, size))
    result = factorize(target, Chain.build([size]), solver=FAST, restarts=2,
                       baselines=("wiener", "unsupervised_wiener"))
    for name in ("wiener", "unsupervised_wiener"):
        assert "note" not in result.baselines[name], result.baselines[name]
        assert 0 < result.baselines[name]["rel_error"] < 1


def test_a_box_known_factor_of_the_seeds_upsampled_kernel():
    """Section 5's 6x6 kernel (A2 repeated 2x) is a 2x2 box after A2 dilated by 2: learn the rest."""
    a2 = np.array([[1, 1, 1], [0, 0, 0], [0, 0, 1]], float)
    a3 = np.repeat(np.repeat(a2, 2, axis=0), 2, axis=1)
    chain = Chain.build([3, 2], dilations=[2, 1], frozen={1: np.ones((2, 2))})
    result = factorize(a3, chain, solver=FAST, restarts=2, baselines=())
    assert result.rel_error < 1e-10
    np.testing.assert_allclose(result.factors[0][..., 0, 0], a2, atol=1e-9)


def test_width_equal_to_rank_is_exact():
    rng = np.random.default_rng(0)
    target = sum(np.outer(rng.normal(size=7), rng.normal(size=7)) for _ in range(2))
    narrow = factorize(target, Chain.build([3, 5], channels=1), solver=FAST, restarts=4, baselines=("svd",))
    wide = factorize(target, Chain.build([3, 5], channels=2), solver=FAST, restarts=4, baselines=("svd",))
    assert wide.rel_error < 1e-9
    assert narrow.rel_error > 1e-3
    assert narrow.rel_error <= narrow.baselines["svd"]["rel_error"] * (1 + 1e-6)


def test_the_svd_baseline_counts_the_macs_of_its_separable_passes_over_the_target_alone():
    """A 9x9 Gaussian in a 3-5-5 chain (the target zero-padded to the chain's 11x11): one 9-tap row
    and one 9-tap column pass, 18 MACs (22 before: the padding was counted); a width past the
    target's rank needs no more terms than the target has rows."""
    svd = factorize(kernels.gaussian(9), Chain.build([3, 5, 5]), solver=FAST, restarts=1, baselines=("svd",))
    assert svd.baselines["svd"]["macs"] == 18 and svd.baselines["svd"]["rel_error"] < 1e-12
    target = np.random.default_rng(0).normal(size=(3, 3))
    wide = factorize(target, Chain.build([2, 2], channels=5), solver=FAST, restarts=1, baselines=("svd",))
    assert wide.baselines["svd"]["macs"] == 3 * 6 and wide.baselines["svd"]["note"].startswith("rank 3")
    assert wide.baselines["svd"]["rel_error"] < 1e-12


def test_multichannel_and_float32():
    rng = np.random.default_rng(1)
    target = rng.normal(size=(5, 5, 2, 3))
    result = factorize(target, Chain.build([3, 3], channels=4), solver=FAST, restarts=4, dtype="float32",
                       baselines=())
    assert result.factors[0].shape == (3, 3, 2, 4) and result.factors[1].shape == (3, 3, 4, 3)
    assert result.approx.shape == (5, 5, 2, 3)
    assert result.rel_error < 0.5
    assert np.isfinite(result.metrics["spectral_error"])


def test_batch_of_targets_in_one_call():
    targets = [kernels.gaussian(9, s) for s in (1.0, 1.5, 2.0)]
    results = factorize_batch(targets, Chain.build([3, 3, 5]), solver=FAST, restarts=2)
    assert len(results) == 3
    for target, result in zip(targets, results):
        assert result.rel_error < 1e-10
        np.testing.assert_allclose(result.approx_like_target(), target, atol=1e-12)


def test_second_call_of_one_geometry_does_not_compile():
    chain = Chain.build([3, 3, 3])
    factorize(kernels.make("dog", 7), chain, solver=FAST, restarts=2, baselines=())
    again = factorize(kernels.make("dog", 7, ratio=2.0), chain, solver=FAST, restarts=2, baselines=())
    assert again.compile_s == 0.0


@pytest.mark.parametrize("objective", ["spectral", "images"])
def test_other_objectives_run_and_improve_on_zero(objective):
    from jfactor.factorize import Objective

    target = kernels.make("gabor", 7)
    chain = Chain.build([3, 5])
    objective = Objective(objective, p=8.0) if objective == "spectral" else objective
    result = factorize(target, chain, objective=objective, solver=FAST, restarts=2, baselines=())
    assert result.rel_error < 0.9
    assert result.settings["objective"] in ("spectral_p8", "images")


def test_receptive_field_and_stride_errors_say_what_would_fit():
    with pytest.raises(FactorizationError, match=r"covers 13x13 but the target is 15x15.*last layer of size 9x9"):
        factorize(kernels.make("gaussian", 15), Chain.build([3, 5, 7]), baselines=())
    with pytest.raises(FactorizationError, match=r"strides multiply to \(2, 2\).*stride \(1, 1\)"):
        factorize(kernels.make("gaussian", 15), Chain.build([3, 5, 9], strides=[1, 2, 1]), baselines=())
    with pytest.raises(FactorizationError, match=r"frozen layer 0: weights \(3, 3, 1, 2\) but the chain needs"):
        factorize(np.ones((5, 5)), Chain.build([3, 3], frozen={0: np.ones((3, 3, 1, 2))}), baselines=())
    with pytest.raises(FactorizationError, match="every layer of the chain is frozen"):
        factorize(np.ones((5, 5)), Chain.build([3, 3], frozen={0: np.ones((3, 3)), 1: np.ones((3, 3))}))


@pytest.mark.filterwarnings("error::RuntimeWarning")  # the check itself once warned "overflow in cast"
def test_frozen_weights_that_overflow_the_dtype_are_named():
    """Cast to float32, 1e40 became inf: "all 2 restarts diverged ... use optimizer lbfgs"."""
    chain = Chain.build([5, 3], frozen={1: np.full((3, 3), 1e40)})
    with pytest.raises(jf.ConfigError, match=r"^frozen layer 1: its weights \(largest \|w\| 1e\+40\) overflow "
                                             r"float32; scale them down or factorize in float64$"):
        factorize(np.ones((7, 7)), chain, dtype="float32", restarts=2, baselines=())
    assert np.isfinite(factorize(np.ones((7, 7)), chain, restarts=2, baselines=()).rel_error)


def test_a_larger_chain_approximates_the_zero_padded_target():
    result = factorize(kernels.make("gaussian", 13), Chain.build([3, 5, 9]), solver=FAST, restarts=4, baselines=())
    assert result.padding == ((1, 1), (1, 1))
    assert result.approx.shape == (15, 15, 1, 1)
    assert result.rel_error < 0.05


@pytest.mark.parametrize("bad,match", [
    (np.full((5, 5), np.nan), "non-finite"),
    (np.zeros((5, 5)), "all zeros"),
    (np.ones((5, 5), complex), "real numeric"),
])
def test_bad_targets(bad, match):
    with pytest.raises(FactorizationError, match=match):
        Target.from_array(bad)


W3 = np.ones((3, 3))


@pytest.mark.parametrize("build,match", [
    (lambda: Chain.build(3), r"sizes must be a list \(one kernel size per layer"),
    (lambda: Chain.build(None), "sizes must be a list"),
    (lambda: Chain.build("3,5"), "sizes must be a list"),
    (lambda: Chain.build([3, 3], channels=2.0), r"channels must be a list \(a positive int, or 1 of them"),
    (lambda: Chain.build(np.array(3)), "sizes must be a list"),
    (lambda: Chain.build([3, 3], dilations=2), "dilations must be a list"),
    (lambda: Chain.build([3, 3], frozen={"0": W3}), r"frozen layer '0' is not in a chain of 2 layers \(0 to 1\)"),
    (lambda: Chain.build([3, 3], frozen=[W3]), r"frozen must map layer indices to weights \(\{0: w\}\), got list"),
    (lambda: Chain.build([3, 3], frozen={0: W3 * 1j}), "frozen layer 0: weights must be real numbers, got dtype c"),
])
def test_bad_chains_say_what_is_wrong(build, match):
    with pytest.raises(FactorizationError, match=match):
        build()


@pytest.mark.parametrize("options,match", [
    ({"baselines": ("foo",)}, "unknown baseline 'foo'"),
    ({"baselines": "svd"}, "baselines must be a list of names"),
    ({"baselines": None}, "baselines must be a list of names"),
    ({"solver": {"steps": 5}}, "solver must be a Solver"),
    ({"search": 8}, "search must be a SearchPolicy"),
    ({"objective": None}, "objective must be a name"),
])
def test_bad_factorize_arguments_are_config_errors(options, match):
    with pytest.raises(jf.ConfigError, match=match):
        factorize(np.ones((5, 5)), Chain.build([3, 3]), restarts=2, **options)


@pytest.mark.parametrize("make,match", [
    (lambda: jf.factorize.Objective("spectral", p=float("nan")), "p must be a finite number >= 2"),
    (lambda: jf.factorize.Objective("spectral", p=float("inf")), "p must be a finite number >= 2"),
    (lambda: Solver(learning_rate=float("inf")), "learning_rate: must be a finite number > 0"),
    (lambda: Solver(learning_rate=float("nan")), "learning_rate: must be a finite number > 0"),
    # before: nothing ran, and the evidence counted the raw starts as restarts run to convergence
    (lambda: Solver(optimizer="none", refine="none"), "nothing would optimise the starts"),
    (lambda: Solver(steps=0, refine_steps=0), "nothing would optimise the starts"),
    (lambda: Solver(optimizer="adam", steps=0, refine="none"), "nothing would optimise the starts"),
])
def test_non_finite_settings_are_refused(make, match):
    with pytest.raises(jf.ConfigError, match=match):
        make()


@pytest.mark.parametrize("solver", [Solver(refine_steps=0), Solver(refine="none")])
def test_without_lm_every_restart_takes_the_first_order_phase(solver):
    """With refine_steps 0 half the restarts (first_order_share 0.5) kept their starts and still
    counted as refined minima; refine none gave them all the phase already."""
    rng = np.random.default_rng(0)
    target = rng.standard_normal((5, 5))
    starts = [[rng.standard_normal((3, 3, 1, 1)) for _ in range(2)] for _ in range(4)]
    result = factorize(target, Chain.build([3, 3]), starts=starts, restarts=4, solver=solver, init="random",
                       baselines=())
    for start, error in zip(starts, result.restart_errors):
        kernel = sp.convolve2d(start[0][..., 0, 0], start[1][..., 0, 0])
        scaled = np.linalg.norm(target - kernel * np.vdot(kernel, target) / np.vdot(kernel, kernel))
        assert error < 0.99 * scaled / np.linalg.norm(target)  # below the start at its best scale: it moved


def test_divergence_is_dropped_or_reported_never_returned():
    solver = Solver(optimizer="adam", learning_rate=1e12, steps=30, refine="none", chunk=30)
    with pytest.raises(FactorizationError, match="all 2 restarts diverged"):
        factorize(kernels.make("log", 7), Chain.build([3, 5]), solver=solver, restarts=2, baselines=(),
                  dtype="float32")
    mixed = Solver(optimizer="adam", learning_rate=1e12, steps=30, refine="lm", refine_steps=50,
                   first_order_share=0.5, chunk=30)
    result = factorize(kernels.make("log", 7), Chain.build([3, 5]), solver=mixed, restarts=2, baselines=(),
                       dtype="float32")
    assert result.to_dict()["diverged"] == 1  # the adam restart overflowed; LM carried on from its best point
    assert np.isfinite(result.rel_error) and result.rel_error < 1


def test_one_and_three_dimensional_targets():
    line = kernels.gaussian(11, ndim=1)
    result = factorize(line, Chain.build([3, 3, 7], ndim=1), solver=FAST, restarts=2, baselines=())
    assert result.rel_error < 1e-10  # a 1-D polynomial always splits into real factors of even degree
    cube = np.random.default_rng(0).normal(size=(5, 5, 5))
    result = factorize(cube, Chain.build([3, 3], ndim=3, channels=2), solver=FAST, restarts=2, baselines=())
    assert result.approx.shape == (5, 5, 5, 1, 1) and result.rel_error < 1


def test_search_front_and_budget():
    from jfactor.factorize import cheapest_under, search

    found = search(kernels.gaussian(7), sizes=(3, 5), layers=(2,), solver=FAST, restarts=2)
    front = [c for c in found if c.on_front]
    assert all(not any(o.rel_error <= c.rel_error and o.macs < c.macs for o in found) for c in front)
    pick = cheapest_under(found, 1e-8)
    assert pick is not None and pick.rel_error <= 1e-8
    assert pick.macs == min(c.macs for c in found if c.rel_error <= 1e-8)


def test_exact_candidates_tie_on_the_front_and_the_cheaper_one_dominates():
    # before: 2.3e-16 at 20 MACs and 3.2e-16 at 10 MACs (both exact) were both on the front, the
    # dearer one first
    from types import SimpleNamespace

    from jfactor.factorize.search import Candidate, pareto

    def candidate(error, macs, dtype="float64"):
        return Candidate(Chain.build([5, 5]), error, macs, macs, SimpleNamespace(settings={"dtype": dtype}))

    marked = pareto([candidate(2.3e-16, 20), candidate(3.2e-16, 10), candidate(1e-3, 5), candidate(2e-7, 30, "float32"),
                     candidate(1e-9, 40)])
    assert [(c.macs, c.on_front) for c in marked] == [(10, True), (5, True), (20, False), (30, False), (40, False)]
    from jfactor.factorize import cheapest_under

    # the exact chain fits a budget of 0 as the front compares it (before: None below 3.2e-16)
    assert [cheapest_under(marked, budget).macs for budget in (0.0, 1e-16, 1e-3)] == [10, 10, 5]


def test_the_cost_axis_is_logarithmic_only_where_the_costs_span_a_decade():
    # before: always log, and a front of 115 and 131 MACs labelled its minor ticks over one another
    import matplotlib.pyplot as plt

    from jfactor.report import _cost_axis

    fig, ax = plt.subplots()
    scales = []
    for macs in ([115, 131], [10, 100, 99], [12, 500]):
        _cost_axis(ax, macs)
        scales.append(ax.get_xscale())
    plt.close(fig)
    assert scales == ["linear", "log", "log"]


def test_errors_equal_to_rounding_get_an_error_axis_a_decade_tall_with_their_points_on_it(monkeypatch):
    # before: a sweep whose cells all ended at 0.2346379487904... drew summary.png with no tick and no point
    import matplotlib.pyplot as plt

    from jfactor import report

    figures = []
    monkeypatch.setattr(report, "_save", lambda fig, path: figures.append(fig) or path)
    rows = [{"rel_error": 0.23463794879044401 + i * 1e-17, "macs": 34, "seed": i, "chain": "3x3"} for i in range(4)]
    report.plot_sweep(rows, ["seed"], "summary.png")
    report.plot_error_vs_cost(rows, "pareto.png")
    for ax in [ax for fig in figures for ax in fig.axes]:
        low, high = ax.get_ylim()
        ticks = [t for t in ax.get_yticks() if low <= t <= high]
        assert high >= 10 * low and low < 0.2346 < high and ticks, (ax.get_title(), low, high)
    for fig in figures:
        plt.close(fig)


SHARDED = """
import numpy as np, jax
import jfactor
from jfactor import kernels
from jfactor.factorize import Chain, SearchPolicy, Solver, factorize_batch
assert jax.device_count() == 4
targets = [kernels.make("log", 7, sigma=s) for s in (0.8, 1.0, 1.2, 1.4, 1.6)]
solver = Solver(optimizer="none", refine_steps=40, chunk=20)
one = factorize_batch(targets, Chain.build([3, 5]), solver=solver, restarts=2)
many = factorize_batch(targets, Chain.build([3, 5]), solver=solver, restarts=2, shard=True)
diff = max(np.abs(a.approx - b.approx).max() for a, b in zip(one, many))
print("diff", diff)
assert diff < 1e-12
# the default search (waves, screening, per-restart graces: band-pass targets get blur hops)
policy = SearchPolicy(wave=16, min_restarts=32, max_restarts=48)
one = factorize_batch(targets, Chain.build([3, 3, 3]), solver=Solver(steps=20, refine_steps=60), search=policy)
many = factorize_batch(targets, Chain.build([3, 3, 3]), solver=Solver(steps=20, refine_steps=60), search=policy,
                       shard=True)
first = policy.wave
for a, b in zip(one, many):
    # the same first wave, to rounding: the same starts, screened alike, at the same minima. Each device's share
    # of the restarts is another batch, whose arithmetic differs in the last bits (errors agree to 1e-12), so
    # later waves may part: they perturb the best distinct minima so far, and two minima that tie to rounding
    # may be ranked, or grouped, the other way round, so that a hop starts from the other one (on one host,
    # 2026-12-06, the LoG at sigma 0.8 ended 0.35% lower on one device than on four, through its second wave).
    # Waves, restarts and the stop cannot move with them here: 48 restarts are three waves, too few for the
    # patience of `repeated` and `stalled`.
    assert np.allclose(a.restart_errors[:first], b.restart_errors[:first], rtol=1e-9), (a.restart_errors,
                                                                                       b.restart_errors)
    assert (a.pruned[:first] == b.pruned[:first]).all(), (a.pruned, b.pruned)
    assert a.evidence.keys() == b.evidence.keys()
    for key in ("restarts", "waves", "stopped", "exact"):
        assert a.evidence[key] == b.evidence[key], (key, a.evidence, b.evidence)
assert all(a.evidence["waves"] > 1 and a.evidence["refined"] < a.evidence["restarts"] for a in one)
"""


def test_batched_factorization_sharded_over_devices_matches():
    """Five targets over four CPU devices (padded to eight): with a fixed restart count the same
    factors as on one device; with the default search (waves, screening, per-restart graces) the
    same first wave, to rounding, and as many waves and restarts."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_given_starts_are_used_and_checked():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(3, 3, 1, 1)), rng.normal(size=(5, 5, 1, 1))
    target = sp.convolve2d(a[..., 0, 0], b[..., 0, 0])
    chain = Chain.build([3, 5])
    warm = factorize(target, chain, starts=[[a, b]], restarts=1, solver=Solver(optimizer="none", refine_steps=5),
                     baselines=())
    assert warm.rel_error < 1e-12  # started at the answer
    with pytest.raises(FactorizationError, match=r"starts\[0\]\[0\]: factor shapes"):
        factorize(target, chain, starts=[[b, a]], restarts=1, baselines=())
    # before: zero factors ran to the zero kernel (error 1) as a success, complex ones lost their
    # imaginary part, ragged lists raised numpy's errors, and None for one target a TypeError
    for start, message in (([0 * a, 0 * b], r"starts\[0\]\[0\]: layers 0, 1 are all zero, so every gradient"),
                           ([a, b + 1j], r"starts\[0\]\[0\]: factors must be real numbers, got complex128, "),
                           ([a, [[1, 2], [3]]], r"starts\[0\]\[0\]: not a list of factor arrays")):
        with pytest.raises(FactorizationError, match=message):
            factorize(target, chain, starts=[start], restarts=1, baselines=())
    for given in (5, np.stack([a, a])):  # before: TypeError "'int' object is not iterable"; numpy's truth value
        with pytest.raises(FactorizationError, match=r"starts\[0\]: a list of starting points .*, got "):
            factorize(target, chain, starts=given, restarts=2, baselines=())
    fast = Solver(optimizer="none", refine_steps=5)
    both = factorize_batch([target, target], chain, starts=[[[a, b]], None], restarts=1, solver=fast)
    one_zero = factorize(target, chain, starts=[[a, 0 * b]], restarts=1, solver=Solver(optimizer="none"), baselines=())
    assert one_zero.rel_error < 1e-6  # one zero factor: its gradient holds the other, and LM leaves it
    assert both[0].rel_error < 1e-12 and both[1].rel_error > 1e-12  # the second drew its own start


def test_a_batched_target_starts_like_a_single_call_with_its_seed():
    targets = [kernels.make("log", 7, sigma=s) for s in (0.9, 1.3)]
    batched = factorize_batch(targets, Chain.build([3, 5]), solver=FAST, restarts=3, seed=5)
    single = factorize(targets[1], Chain.build([3, 5]), solver=FAST, restarts=3, seed=6, baselines=())
    np.testing.assert_allclose(batched[1].restart_errors, single.restart_errors, rtol=1e-6)


def test_a_batch_of_mixed_shapes_names_the_target_that_differs():
    # before: the set of every (shape, stride) in the batch, not which target
    with pytest.raises(FactorizationError, match=r"targets\[2\] has shape \(5, 5, 1, 1\) and stride \(1, 1\), "
                                                 r"targets\[0\] \(7, 7, 1, 1\)"):
        factorize_batch([np.ones((7, 7)), np.ones((7, 7)), np.ones((5, 5))], Chain.build([3, 5]), restarts=1)


def test_a_target_exact_at_its_starts_keeps_its_own_evidence_in_a_batch():
    # before: the exact stop applied only when every target of the batch was exact at its starts, so a
    # gaussian beside a LoG ran LM on all 64 restarts (refined 10, hits 10) where alone it stood at 2 (the
    # root grouping and the projection start, each exact as drawn)
    chain = Chain.build([3, 5])
    targets = [kernels.make("gaussian", 7), kernels.make("log", 7)]
    batched = factorize_batch(targets, chain, seed=0, search=SearchPolicy(max_restarts=64))
    single = factorize(targets[0], chain, seed=0, baselines=())
    keys = ("restarts", "refined", "best_hits", "independent_hits", "distinct_minima", "stopped")
    assert {k: batched[0].evidence[k] for k in keys} == {k: single.evidence[k] for k in keys}
    assert batched[0].evidence["stopped"] == "exact" and batched[0].evidence["refined"] == 2
    assert batched[0].rel_error < 1e-14 and batched[1].rel_error > 1e-5
    np.testing.assert_array_equal(batched[0].pruned, single.pruned)


def test_search_and_cheapest_under_refuse_arguments_of_the_wrong_kind():
    from jfactor.factorize import cheapest_under, search

    with pytest.raises(FactorizationError, match="layers must be a non-empty list"):
        search(np.ones((5, 5)), layers=2)
    with pytest.raises(FactorizationError, match="sizes must be a non-empty list"):
        search(np.ones((5, 5)), sizes=5)
    strided = jf.factorize.Target.from_array(np.ones((7, 7)), stride=2)
    with pytest.raises(FactorizationError, match=r"search builds chains without strides, and the target has stride"):
        search(strided, sizes=(3, 5), layers=(2,))
    for bad in ("0.1", float("nan"), -1.0):
        with pytest.raises(jf.ConfigError, match="max_error must be a relative error >= 0"):
            cheapest_under([], bad)
    for bad in (["a"], None):  # before: AttributeError, TypeError
        with pytest.raises(jf.ConfigError, match="cheapest_under takes the list of Candidates search"):
            cheapest_under(bad, 1.0)


def test_numpy_dtypes_are_taken_and_a_target_whose_norm_overflows_is_named():
    fast = Solver(optimizer="none", refine_steps=5)
    for dtype in (np.float32, np.dtype("float32")):  # before: only the string was taken
        result = factorize(np.ones((5, 5)), Chain.build([3, 3]), dtype=dtype, restarts=1, solver=fast, baselines=())
        assert result.settings["dtype"] == "float32"
    # before: "all restarts diverged ... lower the learning rate"; 1e300 is fine (README: any finite scale)
    with pytest.raises(FactorizationError, match=r"the target's norm is past 1e\+306 \(largest \|tap\| 1\.5e\+308\)"):
        factorize(np.full((5, 5), 1.5e308), Chain.build([3, 3]), restarts=1)
    log = kernels.make("log", 7)  # a finite norm, 1.1e308: before, numpy's LinAlgError from an overflowing spectrum
    with pytest.raises(FactorizationError, match=r"the target's norm is past 1e\+306 .* overflow float64: scale it"):
        factorize(log * 1e308 / np.abs(log).max(), Chain.build([3, 5]), restarts=2)
    assert Target.from_array(np.full((5, 5), 1e300)).kernel.max() == 1e300


def test_search_takes_any_sequence_of_candidates():
    from jfactor.factorize.search import candidates

    chains = candidates(jf.factorize.Target.from_array(np.ones((5, 5))), sizes=range(3, 6, 2), layers=np.array([1, 2]))
    assert {c.extent for c in chains} == {(5, 5), (7, 7)}  # within the default slack of 2
    from_sets = candidates(jf.factorize.Target.from_array(np.ones((5, 5))), sizes={5, 3}, layers={2, 1})
    assert [c.describe() for c in from_sets] == [c.describe() for c in chains]  # a set: in sorted order


def _composite(factors):
    """scipy reference: the kernel (*extent, C_0, C_L) of a chain of full 2-D convolutions."""
    kernel = factors[0]
    for f in factors[1:]:
        kernel = np.stack([np.stack([sum(sp.convolve(kernel[..., i, a], f[..., a, o]) for a in range(f.shape[-2]))
                                     for o in range(f.shape[-1])], -1) for i in range(kernel.shape[-2])], -2)
    return kernel


def test_search_factorizes_each_distinct_chain_once():
    # before: 26 candidates for 9 distinct 3x3 chains dilated 1, 2 or 4 (each reordering its own run, and
    # scored apart), and no width-2 chain with 5x5 or 9x9 in the middle
    from jfactor.factorize.search import candidates

    single = Target.from_array(np.ones((9, 9)))
    chains = candidates(single, sizes=[3], dilations=[1, 2, 4], layers=[3], slack=30)
    layers = {tuple(sorted((layer.size[0], layer.dilation[0]) for layer in c.layers)) for c in chains}
    assert len(chains) == 9 and len(layers) == 9
    wide = candidates(Target.from_array(np.ones((15, 15))), sizes=[3, 5, 9], layers=[3], widths=[2])
    assert [c.describe() for c in wide] == ["3x3 -> 5x5 -> 9x9, width 2", "3x3 -> 9x9 -> 5x5, width 2",
                                            "5x5 -> 3x3 -> 9x9, width 2", "5x5 -> 5x5 -> 9x9, width 2",
                                            "5x5 -> 9x9 -> 5x5, width 2"]
    mixed = candidates(single, sizes=[3, (3, 3)], dilations=[1, (2, 2), 4], layers=[3], slack=30)
    assert [c.describe() for c in mixed] == [c.describe() for c in chains]  # per-dim forms: before, a TypeError
    two = candidates(Target.from_array(np.ones((15, 15, 2, 2))), sizes=[3, 5, 9], layers=[3])
    assert len(two) == 9  # channels in and out: every order (the six of 3-5-9, the three of 5-5-9)
    # why: a reordered width-1 chain, and a reversed wider one with its channels transposed, fold to the same kernel
    from jfactor.factorize.chain import chain_kernel

    rng = np.random.default_rng(0)
    narrow = [rng.standard_normal((k, k, 1, 1)) for k in (3, 5, 9)]
    reordered = chain_kernel([narrow[i] for i in (2, 0, 1)], Chain.build([9, 3, 5]))
    np.testing.assert_allclose(reordered, _composite(narrow), atol=1e-12)
    chain = Chain.build([3, 5, 9], channels=2)
    factors = [rng.standard_normal(s) for s in chain.factor_shapes(1, 1)]
    reversed_chain = Chain.build([9, 5, 3], channels=2)
    flipped = [np.swapaxes(f, -1, -2) for f in factors[::-1]]
    np.testing.assert_allclose(chain_kernel(flipped, reversed_chain), _composite(factors), atol=1e-12)
