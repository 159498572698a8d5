"""Restarts in waves: the stopping rule, the evidence, --restarts and --budget-s, the compile cache."""

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jfactor import kernels
from jfactor.errors import ConfigError
from jfactor.factorize import Chain, Solver, factorize, factorize_batch, multistart, solve
from jfactor.factorize.chain import chain_kernel_numpy
from jfactor.factorize.multistart import SearchPolicy, crossover, evidence, minima, perturb, stop_reason, warning

FAST = Solver(optimizer="none", refine_steps=100)
SMALL = SearchPolicy(wave=16, floor=2, min_restarts=48, max_restarts=96)


def _by_hand(errors, pruned, independent, floor):
    """Evidence counted directly: sort refined errors, cut where one exceeds the group's lowest by 1e-6."""
    refined = [(e, i) for i, (e, p) in enumerate(zip(errors, pruned)) if not p and np.isfinite(e)]
    refined.sort()
    groups = []
    for e, i in refined:
        if groups and e <= max(groups[-1][0][0] * (1 + 1e-6), floor):
            groups[-1].append((e, i))
        else:
            groups.append([(e, i)])
    return {"refined": len(refined), "distinct_minima": len(groups),
            "best_hits": len(groups[0]) if groups else 0,
            "independent_hits": sum(independent[i] for _, i in groups[0]) if groups else 0,
            "runner_up": groups[1][0][0] if len(groups) > 1 else None}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([1e-3, 2e-3, 2e-3 * (1 + 1e-8), 5e-3, 0.1, np.inf]), st.booleans(),
                          st.booleans()), min_size=1, max_size=40))
def test_evidence_counts_minima_hits_and_runner_up(rows):
    errors = np.array([r[0] for r in rows])
    pruned = np.array([r[1] for r in rows])
    independent = np.array([r[2] for r in rows])
    found = evidence(errors, pruned, independent, "float64")
    expected = _by_hand(errors, pruned, independent, 1e-12)
    assert {k: found[k] for k in expected} == expected
    assert found["restarts"] == len(rows)
    assert found["best_hits"] <= found["refined"] <= found["restarts"]
    assert found["independent_hits"] <= found["best_hits"]


def test_minima_treat_errors_at_the_rounding_floor_as_one():
    groups = minima(np.array([3e-16, 1e-13, 2e-16, 0.5]), 1e-12, 1e-6)
    assert [sorted(g.tolist()) for g in groups] == [[0, 1, 2], [3]]


def test_float32_restarts_of_one_minimum_count_as_one():
    """LM stops a float32 restart once a step gains less than 1.2e-3 of its cost: restarts of one
    minimum ended up to 7e-4 apart, and at a tolerance of 1e-6 one minimum read as several (the
    best reached once, with a warning) where float64 counts one.  (Each restart is drawn alike in
    both dtypes; that each reaches the same minimum in both holds for this target and seed.)"""
    target = np.random.default_rng(0).standard_normal((5, 5))
    found = {dtype: factorize(target, Chain.build([3, 3]), restarts=6, dtype=dtype, baselines=())
             for dtype in ("float64", "float32")}
    single, double = found["float32"].evidence, found["float64"].evidence
    spread = found["float32"].restart_errors[found["float64"].restart_errors <= double["best_error"] * (1 + 1e-6)]
    assert spread.max() > spread.min() * (1 + 1e-6)  # float32's restarts of the best minimum do differ
    for key in ("distinct_minima", "best_hits"):
        assert single[key] == double[key], key
    assert single["warning"] is None
    # the hop sources: one float32 minimum's losses (half squared errors) are one source, two minima two
    one = [(0.5 * e**2, [e]) for e in (0.2088, 0.2088 * (1 + 7e-4), 0.3135)]
    assert [f for _, f in multistart.elite(one, 8, multistart.LOSS_TOLERANCE["float32"])] == [[0.2088], [0.3135]]
    # and a float32 best that moved by rounding alone has not improved: the search has stalled
    history = _history([0.1, 0.1 * (1 - 1e-4), 0.1 * (1 - 2e-4)], 5, 3, [64, 128, 192])
    assert stop_reason(history, SearchPolicy(wave=64, hits=3, patience=2), 1.0, "float32") == "repeated"
    assert stop_reason(history, SearchPolicy(wave=64, hits=3, patience=2), 1.0, "float64") is None


def _history(best_errors, best_hits, independent_hits, restarts):
    return [{"best_error": e, "best_hits": best_hits, "independent_hits": independent_hits, "restarts": r,
             "exact": False} for e, r in zip(best_errors, restarts)]


def test_stop_rule_cases():
    policy = SearchPolicy(wave=64, hits=3, patience=2, min_restarts=512, max_restarts=1024)
    # still improving: go on
    assert stop_reason(_history([0.3, 0.2, 0.1], 10, 5, [64, 128, 192]), policy, 1.0, "float64") is None
    # stalled for two waves and three fresh restarts at the best: repeated
    assert stop_reason(_history([0.1, 0.1, 0.1], 5, 3, [64, 128, 192]), policy, 1.0, "float64") == "repeated"
    # stalled, found only by perturbations: go on until min_restarts, then stop
    assert stop_reason(_history([0.1, 0.1, 0.1], 40, 0, [64, 128, 192]), policy, 1.0, "float64") is None
    assert stop_reason(_history([0.1, 0.1, 0.1], 40, 0, [384, 448, 512]), policy, 1.0, "float64") == "stalled"
    # the budget and the cap
    assert stop_reason(_history([0.3, 0.2], 1, 1, [64, 128]), SearchPolicy(budget_s=1.0), 1.5,
                       "float64") == "budget"
    assert stop_reason(_history([0.3, 0.2], 1, 1, [960, 1024]), policy, 1.0, "float64") == "max_restarts"
    exact = [{"best_error": 1e-16, "best_hits": 1, "independent_hits": 1, "restarts": 64, "exact": True}]
    assert stop_reason(exact, policy, 1.0, "float64") == "exact"
    assert stop_reason(exact, SearchPolicy(restarts=8), 1.0, "float64") == "restarts"


def test_the_warning_says_what_to_rerun():
    found = {"exact": False, "best_hits": 1, "refined": 64, "restarts": 64}
    assert warning({**found, "best_hits": 3}, "stalled", 5.0) is None
    assert warning({**found, "exact": True}, "restarts", 5.0) is None
    # a fixed count: more restarts or the adaptive search (a budget would not change a fixed count)
    fixed = warning(found, "restarts", 5.0)
    assert "reached by 1 of 64 refined restarts" in fixed and "--budget-s" not in fixed
    assert "--restarts 256 (restarts: 256 in a config, restarts=256 in Python)" in fixed
    # an adaptive search stopped by its budget: a longer budget
    assert warning(found, "budget", 30.0).endswith("rerun with --budget-s 60 (budget_s: 60 in a config, budget_s=60 in "
                                                   "Python)")
    # one that ran all its restarts: a longer budget would give the same answer, other seeds may not
    capped = warning({**found, "restarts": 1024}, "max_restarts", 2.0)
    assert "ran all its 1024 restarts" in capped and "--seed" in capped and "--budget-s" not in capped
    # a policy asking for fewer hits stopped it early: other seeds, and no claim that it ran all its restarts
    early = warning({**found, "best_hits": 2, "restarts": 512}, "stalled", 2.0)
    assert early.endswith("rerun with other --seed values (seed= in Python) and keep the best")
    assert "ran all its" not in early


def test_a_result_no_better_than_the_zero_kernel_is_said_to_be():
    found = {"exact": False, "best_hits": 5, "refined": 64, "restarts": 64}
    assert warning({**found, "best_error": 0.999}, "stalled", 1.0) is None
    assert warning({**found, "best_error": 1.3373}, "stalled", 1.0).startswith(
        "no better than the zero kernel: the relative error 1.337 is at least 1")
    assert warning({**found, "best_error": 1.3373}, "stalled", 1.0, kernel_objective=False) is None  # outputs decide
    both = warning({**found, "best_error": 1.0, "best_hits": 1}, "restarts", 1.0)
    assert both.startswith("likely not the global optimum") and "; no better than the zero kernel" in both


def test_a_target_with_an_exact_optimum_stops_in_the_first_wave():
    result = factorize(kernels.gaussian(9), Chain.build([3, 3, 5]), baselines=())
    assert result.rel_error < 1e-12
    assert result.evidence["stopped"] == "exact" and result.evidence["waves"] == 1
    assert result.evidence["warning"] is None


def test_a_multimodal_target_keeps_going_and_says_how_sure_it_is(tmp_path):
    target = kernels.motion_blur(7, angle=30.0)
    result = factorize(target, Chain.build([3, 5]), solver=FAST, search=SMALL, baselines=(), seed=0)
    found = result.evidence
    assert found["waves"] > 1 and found["stopped"] in ("repeated", "stalled", "max_restarts")
    assert found["restarts"] == len(result.restart_errors) == 16 * found["waves"]
    assert found["distinct_minima"] >= 2 and found["runner_up"] > found["best_error"]
    # the evidence describes the returned approximation
    assert found["best_error"] == pytest.approx(result.rel_error, rel=1e-9)
    approx = chain_kernel_numpy(result.factors, result.chain)
    np.testing.assert_allclose(approx, result.approx, atol=1e-14)
    assert np.linalg.norm(approx[..., 0, 0] - target) / np.linalg.norm(target) == pytest.approx(result.rel_error)
    assert result.restart_errors[result.best] == pytest.approx(result.rel_error, rel=1e-9)
    assert found["refined"] == int((~result.pruned & np.isfinite(result.restart_errors)).sum())
    assert (found["warning"] is None) == (found["best_hits"] >= 3)
    # the best comes from a later wave at this seed: the loss plot must find it in that wave's history
    assert result.best >= result.history.shape[0]
    assert result.history[result.history_row, -1] == pytest.approx(0.5 * found["best_error"] ** 2, rel=1e-6)
    from jfactor.report import factorization_plots, found_minima

    assert all(path.exists() for path in factorization_plots(result, tmp_path))
    # the search picture's minima are the evidence's: as many, the best first with its hits, every refined restart once
    minima, hits = found_minima(result)
    assert minima.size == found["distinct_minima"] and hits[0] == found["best_hits"]
    assert minima[0] == pytest.approx(found["best_error"], rel=1e-12) and minima[1] == pytest.approx(found["runner_up"])
    assert np.all(np.diff(minima) > 0) and hits.sum() == found["refined"]


def test_the_first_order_phase_screens_once_halfway_and_perturbations_skip_it(monkeypatch):
    """16 L-BFGS starts, keep half, floor 2: 8 stop at 200/2 steps (screened exactly there: one
    segment to the screening, one after it), 8 run all 200; screened ones are marked pruned,
    are not refined, and their history repeats their best loss.
    Restarts after ``fresh`` take no first-order step.  Every segment of a phase is one program
    per batch shape: its length is a traced limit, its static step count the phase's."""
    from jfactor.factorize import solve
    from jfactor.factorize.objectives import Objective
    from jfactor.factorize.solve import Problem, optimise
    from jfactor.progress import ProgressBar

    calls = {"first_order_segment": [], "lm_segment": []}
    for name, steps_at in (("first_order_segment", 5), ("lm_segment", 6)):
        original = getattr(solve, name)
        monkeypatch.setattr(solve, name, lambda *a, _o=original, _n=name, _s=steps_at:
                            calls[_n].append((a[_s], int(a[-1]), np.shape(a[1][3] if _s == 5 else a[1]["cost"])))
                            or _o(*a))

    chain = Chain.build([3, 5])
    target = kernels.motion_blur(7, angle=30.0)[None, :, :, None, None]
    target = target / np.linalg.norm(target)
    solver = Solver(first_order_share=1.0, steps=200, chunk=10, refine_steps=40)
    problem = Problem(chain, 1, 1, Objective("kernel"), solver)
    rng = np.random.default_rng(0)
    free = tuple(rng.standard_normal((1, 20) + shape) for shape in chain.factor_shapes(1, 1))
    free, history, losses, errors, diverged, pruned = optimise(problem, free, (None, None), target, None,
                                                               ProgressBar(False, 0, ""), solve.Screening(0.5, 2),
                                                               fresh=16)
    first = history[0, :, :200]
    ran = (~np.isnan(first)).sum(axis=1)
    assert (ran[16:] == 0).all() and (ran[:16] == 200).all()  # perturbations skip; screened ones are filled
    steps_run = np.array([np.flatnonzero(np.diff(row) != 0).max(initial=-1) + 2 for row in first[:16]])
    # (a screened restart's history repeats its best loss, which may differ from its last one: +-1)
    np.testing.assert_allclose(sorted(np.minimum(steps_run, 200)), sorted([100] * 8 + [200] * 8),
                               atol=1)
    assert not diverged.any()
    # a screened restart counts as pruned and was not refined: its history is flat through LM
    screened = np.flatnonzero(steps_run < 200)
    assert pruned[0, screened].all() and np.ptp(history[0, screened, 200:], axis=1).max() == 0
    assert not pruned[0, :16][steps_run > 150].any()  # the others were refined (from L-BFGS's end: flat or not)
    assert np.ptp(history[0, 16:, 200:], axis=1).min() > 0  # as were the perturbations, from their starts
    assert [(steps, limit, shape[-1]) for steps, limit, shape in calls["first_order_segment"]] == \
        [(200, 100, 16), (200, 100, 8)]
    assert {steps for steps, _, _ in calls["lm_segment"]} == {40} and len(calls["lm_segment"]) > 1
    assert len({shape for _, _, shape in calls["lm_segment"]}) == 1 and calls["lm_segment"][0][1] == 10


def test_restarts_means_exactly_that_many_every_one_refined():
    result = factorize(kernels.log(7), Chain.build([3, 5]), solver=FAST, restarts=5, baselines=())
    assert result.evidence["restarts"] == 5 and result.evidence["waves"] == 1
    assert result.evidence["stopped"] == "restarts" and not result.pruned.any()
    assert result.to_dict()["restarts"] == 5


def test_a_budget_stops_after_the_wave_that_spends_it():
    result = factorize(kernels.motion_blur(7, angle=30.0), Chain.build([3, 5]), solver=FAST,
                       search=SearchPolicy(wave=16, floor=2), budget_s=1e-3, baselines=())
    assert result.evidence["stopped"] == "budget" and result.evidence["waves"] == 1


def test_a_budget_beside_an_exact_restart_count_is_refused_not_ignored(tmp_path):
    # before: restarts=N ran its one wave to the end and the budget never applied, silently
    from jfactor.experiment.config import load_config, shrink

    with pytest.raises(ConfigError, match=r"restarts and budget_s: give one\. restarts=N runs exactly N"):
        factorize(kernels.gaussian(7), Chain.build([3, 5]), restarts=4, budget_s=10.0, solver=FAST, baselines=())
    with pytest.raises(ConfigError, match=r"restarts and budget_s: give one"):
        SearchPolicy(restarts=4, budget_s=1)
    path = tmp_path / "c.yaml"
    path.write_text("target: {family: gaussian, size: 7}\nchain: [3, 5]\nbudget_s: 30\n")
    with pytest.raises(ConfigError, match=r"c\.yaml with --set restarts: .*restarts and budget_s: give one"):
        load_config(path, ["restarts=8"])
    config, _, _ = load_config(path, ["tiny=true"])
    assert shrink(config).restarts == 2 and shrink(config).budget_s is None  # the tiny variant runs one wave


def test_waves_in_a_batch_stop_per_target():
    results = factorize_batch([kernels.gaussian(7), kernels.motion_blur(7, angle=30.0)], Chain.build([3, 5]),
                              solver=FAST, search=SMALL)
    assert results[0].evidence["stopped"] == "exact" and results[0].evidence["waves"] == 1
    assert results[1].evidence["waves"] > 1


@pytest.mark.parametrize("waves", [1, 2])
def test_only_the_first_waves_take_the_first_order_phase(monkeypatch, waves):
    phases = []
    original = solve.first_order
    monkeypatch.setattr(solve, "first_order", lambda *a, **k: phases.append(1) or original(*a, **k))
    target, chain, solver = kernels.motion_blur(7, angle=30.0), Chain.build([3, 5]), Solver(steps=20, refine_steps=50)
    result = factorize(target, chain, solver=solver, search=dataclasses.replace(SMALL, first_order_waves=waves),
                       baselines=())
    assert result.evidence["waves"] > 2 and len(phases) == waves
    plain = factorize(target, chain, solver=solver, search=SearchPolicy(restarts=8, first_order_waves=0), baselines=())
    assert len(phases) == waves + 1 and plain.evidence["waves"] == 1  # a plain multistart always takes it


@pytest.mark.parametrize("partial, expected", [(False, [0, 50, 7, 50]), (True, [0, 0, 7, 20])])
def test_graces_by_kind_of_start(partial, expected):
    """Fresh, fresh blur start, noise hop, blur hop: on two layers (not ``partial``) blur starts
    and hops wait ``grace``; on more, blur hops ``partial_grace`` and fresh starts none."""
    policy = SearchPolicy(grace=50, partial_grace=20, noise_grace=7, first_wave_grace=30)
    fresh, blurred = np.array([True, True, False, False]), np.array([False, True, False, True])
    assert policy.graces(fresh, blurred, partial=partial, wave=1).tolist() == expected


@pytest.mark.parametrize("partial, expected", [(False, [0, 30, 0, 50, 0, 30]), (True, [0, 30, 0, 30, 0, 30])])
def test_every_other_fresh_start_of_the_first_wave_waits_the_first_wave_grace(partial, expected):
    """Six fresh starts, the fourth a blur start: the odd places wait ``first_wave_grace`` in the
    first wave unless a grace of their own is set (a two-layer chain's blur start: ``grace``), and
    not where blur hops apply (``banded``)."""
    policy = SearchPolicy(grace=50, partial_grace=20, first_wave_grace=30)
    fresh, blurred = np.ones(6, bool), np.array([False, False, False, True, False, False])
    assert policy.graces(fresh, blurred, partial=partial, wave=0).tolist() == expected
    later = [0, 0, 0, 0 if partial else 50, 0, 0]
    assert policy.graces(fresh, blurred, partial=partial, wave=1).tolist() == later
    assert policy.graces(fresh, blurred, partial=partial, wave=0, banded=True).tolist() == later  # blur hops apply


@pytest.mark.parametrize("target, sizes, init, fresh_graces, hop_graces",
                         [(kernels.log(7), [3, 5], "auto", {0, 100}, {0, 100}),
                          (kernels.log(7), [3, 3, 3], "auto", {0}, {0, 20}),
                          (kernels.log(7), [3, 3, 3], "random", {0, 30}, {0, 20}),
                          (kernels.motion_blur(7, angle=30.0), [3, 5], "auto", {0, 30}, {0})])
def test_blur_starts_and_hops_get_the_longer_grace_and_noise_hops_none(monkeypatch, target, sizes, init, fresh_graces,
                                                                       hop_graces):
    """A band-pass target's hops are blur hops and noise hops (no grace); a line's are all noise.
    On two layers, where a blur hop keeps no factor of its minimum, blur starts and hops wait
    ``grace`` (100); on three, blur hops ``partial_grace`` (20) and fresh starts none; where no
    blur hops apply or the init is not ``auto``, every other fresh start of the first wave
    without a grace of its own ``first_wave_grace`` (30 here)."""
    seen = []
    original = solve.refine
    monkeypatch.setattr(solve, "refine", lambda *a, **k: seen.append((a[10], np.asarray(a[11])))
                        or original(*a, **k))
    result = factorize(target, Chain.build(sizes), solver=FAST, search=dataclasses.replace(SMALL, first_wave_grace=30),
                       baselines=(), init=init)
    assert result.evidence["waves"] > 1 and len(seen) == result.evidence["waves"]
    assert all(30 not in graces for _, graces in seen[1:])
    assert (30 in seen[0][1][:, :seen[0][0]]) == (30 in fresh_graces)
    assert set().union(*(graces[:, :fresh].ravel().tolist() for fresh, graces in seen)) == fresh_graces
    assert set().union(*(graces[:, fresh:].ravel().tolist() for fresh, graces in seen)) == hop_graces


@pytest.mark.parametrize("field, value", [("restarts", 0), ("first_order_waves", -1), ("first_wave_grace", -1),
                                          ("wave", -1),
                                          ("partial_grace", -1), ("budget_s", -1.0), ("budget_s", float("nan")),
                                          ("keep", 0.0), ("perturb", 1.5), ("cutoff", 0.9),
                                          ("cutoff", float("inf")), ("cutoff", True), ("cutoff_after", -1)])
def test_bad_policies_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        SearchPolicy(**{field: value})


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.floats(1e-6, 10.0), st.booleans()), min_size=1, max_size=30),
       st.lists(st.one_of(st.just(np.inf), st.floats(1e-6, 10.0)), min_size=3, max_size=3), st.floats(1.0, 3.0))
def test_the_cutoff_stops_the_running_restarts_far_above_their_targets_best(items, before, cutoff):
    owner = np.array([b for b, _, _ in items])
    cost = np.array([c for _, c, _ in items])
    live = np.flatnonzero([running for *_, running in items])
    batch = int(owner.max()) + 1
    far = solve._above_cutoff(cost, live, owner, np.array(before[:batch]), cutoff)
    for i in range(len(items)):  # by hand: the target's best is its best before or any of its current costs
        best = min([before[owner[i]]] + [c for b, c, _ in items if b == owner[i]])
        assert (i in far) == (i in live and cost[i] > cutoff**2 * best)


def test_the_cutoff_stops_survivors_as_pruned_not_as_minima():
    target, chain = kernels.motion_blur(7, angle=30.0), Chain.build([3, 5])
    runs = {cutoff: factorize(target, chain, solver=FAST, search=dataclasses.replace(SMALL, cutoff=cutoff,
                                                                                      cutoff_after=5),
                              baselines=(), seed=0) for cutoff in (None, 1.0)}
    off, on = runs[None], runs[1.0]
    assert on.pruned.sum() > off.pruned.sum()
    assert on.evidence["refined"] == int((~on.pruned & np.isfinite(on.restart_errors)).sum())
    assert on.evidence["best_error"] == pytest.approx(on.rel_error, rel=1e-9)
    # what runs on past the cutoff within a wave is at most the wave's and earlier waves' best then
    assert on.evidence["refined"] < off.evidence["refined"]


def _cli(args, env, tmp_path):
    result = subprocess.run([sys.executable, "-c", "from jfactor.cli import app; app()", *args], capture_output=True,
                            text=True, env={**os.environ, **env}, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_cli_restarts_budget_and_evidence_fields(tmp_path):
    base = ["factorize", "--family", "motion_blur", "--size", "7", "--chain", "3,5", "--optimizer", "none",
            "--refine-steps", "50", "--json"]
    env = {"JFACTOR_COMPILE_CACHE": "off"}
    exact = json.loads(_cli(base + ["--restarts", "3", "--out", "a"], env, tmp_path).stdout)
    assert exact["evidence"]["restarts"] == 3 and exact["evidence"]["stopped"] == "restarts"
    budget = json.loads(_cli(base + ["--budget-s", "0.001", "--out", "b"], env, tmp_path).stdout)
    assert budget["evidence"]["stopped"] == "budget" and budget["evidence"]["waves"] == 1
    for key in ("restarts", "refined", "distinct_minima", "best_hits", "independent_hits", "runner_up", "warning"):
        assert key in budget["evidence"]
    assert not list((tmp_path / "b").glob("*.png"))  # --json draws no pictures unless asked


def test_a_second_process_loads_compiled_code_from_the_cache(tmp_path):
    args = ["factorize", "--family", "log", "--size", "7", "--chain", "3,5", "--restarts", "4", "--optimizer",
            "none", "--refine-steps", "20", "--baselines", "", "--json"]
    env = {"JFACTOR_COMPILE_CACHE": str(tmp_path / "cache")}
    first = json.loads(_cli(args + ["--out", "one"], env, tmp_path).stdout)
    second = json.loads(_cli(args + ["--out", "two"], env, tmp_path).stdout)
    assert first["compiles"] > 0 and second["compiles"] == 0
    assert second["rel_error"] == pytest.approx(first["rel_error"], rel=1e-12)
    off = json.loads(_cli(args + ["--out", "three"], {"JFACTOR_COMPILE_CACHE": "off"}, tmp_path).stdout)
    assert off["compiles"] > 0
    # the default images were decoded once and kept beside the compiled code
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "cache" / "images").glob("*.npy")) == \
        ["astronaut", "camera", "coins"]


def test_a_second_process_loads_traced_programs_instead_of_tracing_them(tmp_path):
    args = ["factorize", "--family", "motion_blur", "--size", "7", "--chain", "3,5", "--restarts", "4", "--steps",
            "20", "--refine-steps", "20", "--baselines", "", "--json"]
    env = {"JFACTOR_COMPILE_CACHE": str(tmp_path / "cache"), "JAX_LOG_COMPILES": "1"}
    programs = {"start", "first_order_segment", "to_refine", "lm_segment", "finish"}

    def run(out):
        result = _cli(args + ["--out", out], env, tmp_path)
        return json.loads(result.stdout), set(re.findall(r"Finished tracing (\w+) for jit", result.stderr))

    first, traced = run("one")
    assert programs <= traced
    releases = list((tmp_path / "cache" / "programs").iterdir())
    assert len(releases) == 1  # one folder per release of jfactor and its jax
    kept = sorted(releases[0].iterdir())
    assert {p.name.split("-")[0] for p in kept} == programs
    second, traced = run("two")
    assert not programs & traced
    assert second["rel_error"] == first["rel_error"]
    assert second["evidence"]["best_hits"] == first["evidence"]["best_hits"]
    for path in kept:
        path.write_bytes(b"damaged")
    third, traced = run("three")  # traced again, and kept again
    assert programs <= traced and third["rel_error"] == first["rel_error"]
    assert all(path.stat().st_size > 1000 for path in kept)


def test_kept_programs_compute_what_the_plain_jit_computes(tmp_path, monkeypatch):
    from jfactor import cache

    options = dict(solver=Solver(steps=20, refine_steps=30), restarts=6, baselines=(), seed=5)
    target, chain = kernels.ring(9), Chain.build([3, 3, 5])
    monkeypatch.setattr(cache, "programs_directory", lambda: None)  # whatever an earlier test switched on
    plain = factorize(target, chain, **options)
    monkeypatch.setattr(cache, "programs_directory", lambda: tmp_path)
    kept = factorize(target, chain, **options)
    assert {p.name.split("-")[0] for p in tmp_path.glob("*.pickle")} >= {"first_order_segment", "lm_segment"}
    for a, b in zip(plain.factors, kept.factors):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(plain.restart_errors, kept.restart_errors)
    np.testing.assert_array_equal(plain.history, kept.history)


def test_a_program_that_cannot_be_kept_still_runs(tmp_path, monkeypatch):
    import jax

    from jfactor import cache

    def unavailable(self):
        raise ImportError("Please install 'flatbuffers' in order to use Exported serialization")

    monkeypatch.setattr(cache, "programs_directory", lambda: tmp_path)
    monkeypatch.setattr(jax.export.Exported, "serialize", unavailable)
    result = factorize(kernels.gaussian(7), Chain.build([3, 5]), solver=FAST, restarts=2, baselines=())
    assert result.rel_error < 1e-8 and not list(tmp_path.iterdir())


def test_no_programs_are_kept_with_a_jaxlib_that_crashes_running_them(tmp_path, monkeypatch):
    import jax

    from jfactor import cache

    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path))  # nothing compiles until it is restored
    try:
        monkeypatch.setattr(cache, "_jaxlib_version", lambda: (0, 8))
        assert cache.programs_directory() is None
        monkeypatch.setattr(cache, "_jaxlib_version", lambda: cache.KEEPS_FROM)
        assert cache.programs_directory() == tmp_path / "programs" / cache._release()[:cache.RELEASE_DIGITS]
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_kept_programs_of_stale_releases_are_pruned_but_the_newest_other(tmp_path):
    """An edit or an upgrade makes a release's kept programs stale: the first program kept for a
    new release removes the others' folders but the newest, and programs kept loose by versions
    before folders; folders not named by a release digest stay."""
    import os

    from jfactor import cache

    root = tmp_path / "programs"
    older, newer, current = (root / name for name in ("0" * 16, "a" * 16, "f" * 16))
    for age, folder in ((300, older), (100, newer)):
        (folder).mkdir(parents=True)
        (folder / "lm_segment-x.pickle").write_bytes(b"kept")
        os.utime(folder, (os.path.getatime(folder) - age,) * 2)
    (root / "lm_segment-loose.pickle").write_bytes(b"kept before folders")
    (root / "notes").mkdir()
    current.mkdir()
    removed = cache.prune_releases(current)
    assert sorted(p.name for p in removed) == ["0" * 16, "lm_segment-loose.pickle"]
    assert sorted(p.name for p in root.iterdir()) == ["a" * 16, "f" * 16, "notes"]
    assert (newer / "lm_segment-x.pickle").read_bytes() == b"kept"


def test_sample_images_are_decoded_once_then_read_from_the_cache(tmp_path, monkeypatch):
    from skimage import data

    from jfactor.factorize import objectives

    monkeypatch.setattr(objectives, "image_cache", lambda: tmp_path)
    first = objectives.load_images(["camera"], size=16, count=2, seed=3)
    decode = data.camera
    monkeypatch.setattr(data, "camera", lambda: pytest.fail("decoded again"))
    kept = next(tmp_path.glob("camera-*.npy"))
    kept.write_bytes(b"damaged")  # in memory for the rest of the process: the file is not read again
    np.testing.assert_array_equal(objectives.load_images(["camera"], size=16, count=2, seed=3), first)
    assert not objectives.sample_image("camera").flags.writeable
    objectives._sample_image.cache_clear()  # as a new process: the damaged copy is read, decoded again
    monkeypatch.setattr(data, "camera", decode)
    np.testing.assert_array_equal(objectives.load_images(["camera"], size=16, count=2, seed=3), first)
    assert np.load(kept).shape == decode().shape  # and replaced
    objectives._sample_image.cache_clear()
    monkeypatch.setattr(data, "camera", lambda: pytest.fail("decoded again"))
    np.testing.assert_array_equal(objectives.load_images(["camera"], size=16, count=2, seed=3), first)  # from disk
    # a copy that reads as an array but cannot be the image (before: "camera: the image is all zero", every run)
    for copy in (np.zeros((512, 512), np.uint8), np.full((4, 4), np.nan), np.array(["text"])):
        np.save(kept, copy)
        objectives._sample_image.cache_clear()
        monkeypatch.setattr(data, "camera", decode)
        np.testing.assert_array_equal(objectives.load_images(["camera"], size=16, count=2, seed=3), first)
        np.testing.assert_array_equal(np.load(kept), decode())


def _ring_carry(restarts: int, seed: int, optimizer: str = "lbfgs"):
    """A 3x3 -> 3x3 chain fitting the 5x5 ring at unit norm from ``restarts`` random starts: the
    problem, the target (1, 5, 5, 1, 1) and the first-order carry :func:`start` makes (half of them)."""
    from jfactor.factorize import solve
    from jfactor.factorize.objectives import Objective

    chain = Chain.build([3, 3])
    problem = solve.Problem(chain, 1, 1, Objective("kernel"), Solver(optimizer=optimizer))
    target = kernels.make("ring", 5)[None, :, :, None, None]
    target = target / np.linalg.norm(target)
    rng = np.random.default_rng(seed)
    free = tuple(rng.standard_normal((1, restarts) + shape) for shape in chain.factor_shapes(1, 1))
    return problem, target, solve.start(problem, free, (None, None), target, None, fresh=restarts)[2]


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_the_first_order_carry_keeps_its_types_from_segment_to_segment(optimizer):
    """The carry ``start`` makes has the dtypes and weak types a segment returns, so one compiled
    segment serves every later one (optax 0.2.4's L-BFGS counts line-search steps as int64 at init
    and int32 after a step: the scan rejected its own carry)."""
    import jax

    from jfactor.factorize import solve

    problem, target, carry = _ring_carry(4, seed=0, optimizer=optimizer)
    after, steps = solve.first_order_segment(problem, carry, (None, None), target, None, steps=3)
    types = lambda tree: [(a.dtype, jax.typeof(a).weak_type, a.shape) for a in jax.tree.leaves(tree)]  # noqa: E731
    assert types(after) == types(carry)
    assert np.isfinite(steps).all() and (np.asarray(after[3]) <= np.asarray(carry[3])).all()


def test_a_limit_stops_a_long_first_order_segment_where_a_short_one_stops():
    """A segment of 30 steps with a limit of 7 is the 7-step segment, bit for bit; its losses past the
    limit are NaN (not run)."""
    import jax

    from jfactor.factorize import solve

    problem, target, carry = _ring_carry(6, seed=2)
    short, short_losses = solve.first_order_segment(problem, carry, (None, None), target, None, steps=7)
    long, long_losses = solve.first_order_segment(problem, carry, (None, None), target, None, 30,
                                                  np.asarray(7, np.int32))
    for a, b in zip(jax.tree.leaves(short), jax.tree.leaves(long)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(long_losses)[..., :7], np.asarray(short_losses))
    assert np.isnan(np.asarray(long_losses)[..., 7:]).all()


def test_the_batched_lbfgs_phase_follows_optax_documented_loop_restart_by_restart():
    """The vmapped L-BFGS phase reads the loss and gradient the line search stored instead of
    ``optax.value_and_grad_from_state`` (whose ``lax.cond`` evaluates the objective anyway under
    vmap); each restart's losses must still be those of optax's own loop on that restart alone.

    In a process of its own: XLA crashed a test worker twice (a segfault compiling optax's line
    search loop, then run op by op, after the worker's earlier tests; jax 0.10.2), never on its own."""
    check = "from tests.test_multistart import _lbfgs_phase_against_optax; _lbfgs_phase_against_optax()"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                            cwd=Path(__file__).parent.parent, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def _lbfgs_phase_against_optax():
    import jax
    import jax.numpy as jnp
    import optax

    from jfactor.factorize import solve

    problem, target, carry = _ring_carry(4, seed=1)
    _, losses = solve.first_order_segment(problem, carry, (None, None), target, None, steps=12)
    assert np.asarray(losses).shape == (1, 2, 12)

    def value_fn(params):  # the objective written out: half the squared error of the two 3x3 factors' convolution
        approx = jax.scipy.signal.convolve2d(params[0][..., 0, 0], params[1][..., 0, 0], mode="full")
        return 0.5 * jnp.sum((approx - target[0, ..., 0, 0]) ** 2)

    tx = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(value_fn)
    @jax.jit
    def step(params, state):  # the step of optax's L-BFGS documentation, jitted once for all 24 calls
        value, grad = value_and_grad(params, state=state)
        updates, state = tx.update(grad, state, params, value=value, grad=grad, value_fn=value_fn)
        return value, optax.apply_updates(params, updates), state

    for row in range(2):  # the restarts that took the first-order phase
        params = tuple(jnp.asarray(np.asarray(leaf[0, row])) for leaf in carry[0])
        state, expected = tx.init(params), []
        for _ in range(12):
            value, params, state = step(params, state)
            expected.append(float(value))
        np.testing.assert_allclose(np.asarray(losses)[0, row], expected, rtol=1e-9)


def test_perturbations_give_three_pairs_in_four_to_a_structured_move_and_noise_where_it_has_none():
    elite = [[np.ones((3, 3, 1, 1))], [2 * np.ones((3, 3, 1, 1))]]
    moved, marked = perturb(elite, 16, np.random.default_rng(0), move=lambda factors, rng: [-factors[0]])
    by_move = [i for i, hop in enumerate(moved) if (hop[0] < 0).all()]
    assert len(by_move) == 12 and {int(-moved[i][0][0, 0, 0, 0]) for i in by_move} == {1, 2}
    assert np.flatnonzero(marked).tolist() == by_move
    noise, unmarked = perturb(elite, 16, np.random.default_rng(0))
    declined, refused = perturb(elite, 16, np.random.default_rng(0), move=lambda factors, rng: None)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(noise, declined))
    assert not unmarked.any() and not refused.any()
    assert not any(np.array_equal(hop[0], source[0]) for hop in noise for source in elite)


def _elite(parents: int, layers: int) -> list[list[np.ndarray]]:
    """Factor lists whose every factor says whose it is: parent p's factor i is 10 p + i + 1 everywhere."""
    return [[np.full((3, 3, 1, 1), 10.0 * p + i + 1) for i in range(layers)] for p in range(parents)]


def _parents(hop: list[np.ndarray], elite: list[list[np.ndarray]]) -> list[int] | None:
    """Which parent each factor of ``hop`` is a copy of (up to sign), None where one is no parent's."""
    found = [[p for p in range(len(elite)) if np.array_equal(np.abs(f), elite[p][i])] for i, f in enumerate(hop)]
    return [p[0] for p in found] if all(found) else None


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 4), st.integers(2, 4), st.integers(0, 2 ** 31))
def test_a_crossover_child_copies_each_factor_from_a_parent_never_all_from_one(parents, layers, seed):
    elite = _elite(parents, layers)
    child = crossover(elite, np.random.default_rng(seed))
    taken = _parents(child, elite)
    assert taken is not None and len(set(taken)) >= 2
    child[0][...] = -1.0  # copies: the parents keep their factors
    assert all(f.min() > 0 for factors in elite for f in factors)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 4), st.integers(0, 2 ** 31))
def test_a_crossover_mixes_the_free_factors_where_a_frozen_layer_is_the_same_in_every_parent(parents, seed):
    elite = _elite(parents, 3)
    for factors in elite:
        factors[0] = np.full((3, 3, 1, 1), 0.5)  # a frozen layer: one weight in every parent
    child = crossover(elite, np.random.default_rng(seed))
    assert child[0][0, 0, 0, 0] == 0.5 and len(set(_parents(child[1:], [f[1:] for f in elite]))) == 2


def test_crossovers_take_the_noise_hops_of_the_other_half_every_other_one_refitted():
    elite, negate_first = _elite(3, 3), lambda factors, rng: [-factors[0]] + factors[1:]
    hops, moved = perturb(elite, 16, np.random.default_rng(0), parents=elite, refit=negate_first)
    children = [i for i, hop in enumerate(hops) if _parents(hop, elite) is not None]
    assert children == list(range(1, 16, 2)) and not moved.any()
    assert all(len(set(_parents(hops[i], elite))) >= 2 for i in children)
    assert [i for i in children if (hops[i][0] < 0).all()] == list(range(3, 16, 4))
    # with structured moves, only the noise hops of the other half (pairs 0 and 4 of 8)
    with_moves, _ = perturb(elite, 16, np.random.default_rng(0), move=lambda factors, rng: [f + 0.5 for f in factors],
                            parents=elite)
    assert [i for i, hop in enumerate(with_moves) if _parents(hop, elite) is not None] == [1, 9]
    # one parent, or none (a one-layer chain): noise only
    for parents in (elite[:1], None):
        noise, _ = perturb(elite, 16, np.random.default_rng(0), parents=parents)
        assert not any(_parents(hop, elite) for hop in noise)
    # parents beyond the minima the hops perturb
    crossed, _ = perturb(elite[:1], 16, np.random.default_rng(0), parents=elite)
    assert [i for i, hop in enumerate(crossed) if _parents(hop, elite) is not None] == list(range(1, 16, 2))


def test_redraw_hops_take_the_noise_hops_of_the_best_and_leave_the_crossovers():
    elite, shift = _elite(3, 3), lambda factors, rng: [f + 100.0 for f in factors]
    hops, _ = perturb(elite, 16, np.random.default_rng(0), parents=elite, redraw=shift)
    redrawn = [i for i, hop in enumerate(hops) if all(f.min() > 100 for f in hop)]
    assert redrawn == list(range(0, 16, 2))
    assert all(np.array_equal(hops[i][0] - 100.0, elite[0][0]) for i in redrawn)  # of the best
    assert [i for i, hop in enumerate(hops) if _parents(hop, elite) is not None] == list(range(1, 16, 2))


@pytest.mark.parametrize("target, chain, crossing", [
    (kernels.ring(7), Chain.build([3, 5]), True), (kernels.motion_blur(7, angle=30.0), Chain.build([3, 3, 3]), True),
    (kernels.log(7), Chain.build([3, 5]), False),  # band-pass: blur hops instead
    (kernels.ring(7), Chain.build([3, 5], frozen={0: np.ones((3, 3))}), False),  # one free layer
])
def test_crossovers_where_two_or_more_layers_are_free_and_no_blur_hops_apply(monkeypatch, target, chain, crossing):
    seen = []
    original = multistart.perturb
    monkeypatch.setattr(multistart, "perturb",
                        lambda *a, **k: seen.append(k["parents"]) or original(*a, **k))
    result = factorize(target, chain, solver=FAST, search=SMALL, baselines=())
    assert result.evidence["waves"] > 1 and {parents is not None for parents in seen} == {crossing}
    assert any(len(parents) > 1 for parents in seen if parents) or not crossing  # one free layer: one minimum


def test_every_restart_of_a_fixed_count_run_but_the_impulse_and_mirrored_starts_is_independent_evidence():
    """One wave, no perturbations: every start is fresh and reaches the exact optimum, and all but the
    impulse start (slot 6) are independent evidence, the structured ones (root groupings, the SVD fit)
    included; on a target with mirror symmetries the random starts projected onto them (odd slots 3,
    5 and 7) and the projection start (slot 2, jfactor.factorize.api._projected) are not either: LM
    keeps them in the symmetric subspace."""
    solver = Solver(optimizer="none", refine_steps=50)
    lopsided = np.outer(np.poly([0.5, -2.0, 3.0, 0.3]), np.poly([-0.4, 1.5, -3.0, 0.8]))  # separable, no mirrors
    found = factorize(lopsided, Chain.build([3, 3]), restarts=8, baselines=(), solver=solver).evidence
    assert found["exact"] and found["best_hits"] == 8 and found["independent_hits"] == 7
    result = factorize(kernels.gaussian(5), Chain.build([3, 3]), restarts=8, baselines=(), solver=solver)
    assert result.evidence["best_hits"] == 8 and result.evidence["independent_hits"] == 3
    # the user's starts alike: of two that reach the exact optimum, the one with the target's mirrors is not
    # independent, the one a tap off them is
    binomial = np.outer([1.0, 2.0, 1.0], [1.0, 2.0, 1.0])[..., None, None]
    lopsided_start = binomial.copy()
    lopsided_start[0, 1] += 1e-3
    target = np.outer([1.0, 4, 6, 4, 1], [1.0, 4, 6, 4, 1])
    found = factorize(target, Chain.build([3, 3]), restarts=2, baselines=(), solver=solver,
                      starts=[[binomial, binomial], [lopsided_start, binomial]]).evidence
    assert found["exact"] and found["best_hits"] == 2 and found["independent_hits"] == 1
    # a frozen layer counts with its weights, not with what the user's start holds in its place (zeros here)
    for weight, independent in ((binomial[..., 0, 0], 0), (lopsided_start[..., 0, 0], 1)):
        found = factorize(target, Chain.build([3, 3], frozen={0: weight}), restarts=1, baselines=(), solver=solver,
                          starts=[[np.zeros_like(binomial), binomial]]).evidence
        assert found["best_hits"] == 1 and found["independent_hits"] == independent, weight
    # printed, one line with the answer and how sure it is, not every array it holds
    assert repr(result) == (f"Factorization(3x3 -> 3x3, width 1 for targets[0]: rel_error {result.rel_error:.3e}, "
                            f"best of 8 restarts reached 8 times, stopped: restarts)")


def test_a_float32_runs_evidence_ranks_restarts_as_its_result_is_measured():
    # before: float32's own errors ranked restarts (and chose the best by its loss), so restarts
    # reported below the returned rel_error and one minimum split into hundreds of "distinct" ones
    target = kernels.make("log", 9)
    result = factorize(target, Chain.build([3, 3, 5]), dtype="float32", restarts=8, solver=FAST)
    best, errors = result.evidence["best_error"], result.restart_errors
    assert result.rel_error == pytest.approx(best, rel=1e-12)
    assert np.min(errors[np.isfinite(errors)]) == pytest.approx(best, rel=1e-12)
    assert result.evidence["runner_up"] is None or result.evidence["runner_up"] > best
    approx = chain_kernel_numpy(result.factors, result.chain)[..., 0, 0]
    assert np.linalg.norm(approx - target) / np.linalg.norm(target) == pytest.approx(result.rel_error, rel=1e-12)


def test_the_evidence_of_another_objective_ranks_restarts_as_the_result_is_chosen():
    # before: minima were grouped and ranked by the kernel's error while the result was the lowest loss of
    # the objective, so the evidence's best could be another restart and its runner-up below the result
    from jfactor.factorize import Objective

    target = kernels.motion_blur(7, angle=30.0)
    result = factorize(target, Chain.build([3, 5]), objective=Objective("spectral", p=4.0), solver=FAST, search=SMALL,
                       baselines=(), seed=0)
    found = result.evidence
    final_loss = result.history[result.history_row][-1]
    assert found["best_error"] == pytest.approx((2 * final_loss) ** (1 / 4), rel=1e-9)  # the objective's own error
    assert found["runner_up"] is None or found["runner_up"] > found["best_error"]
    from jfactor.display import evidence_line

    line = evidence_line(result.to_dict())  # the terminal says which error the runner-up is
    assert found["runner_up"] is None or "(spectral_p4's own error)" in line
    # of degree one in the kernel's error: the p-th root, so the float floor means what it means for the kernel
    sharp = factorize(target, Chain.build([3, 5]), objective=Objective("spectral", p=8.0), solver=FAST,
                      search=SMALL, baselines=(), seed=0, dtype="float32")  # before: float64 arrays in a float32 run
    final_loss = sharp.history[sharp.history_row][-1]
    assert sharp.evidence["best_error"] == pytest.approx((2 * final_loss) ** (1 / 8), rel=1e-5)
    assert not sharp.evidence["exact"] and sharp.rel_error > 1e-3
