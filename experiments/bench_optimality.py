"""Does the default factorization find the best basin?  Hard, multimodal targets against their best-known optimum.

    python experiments/bench_optimality.py                    # default runs against the kept reference, table
    python experiments/bench_optimality.py --reference        # (re)compute the best-known optima (long)
    python experiments/bench_optimality.py --tiny --json      # smoke run: two small targets, tiny reference

Targets: lines at four angles, two rings, two disks, three Gabors, a DoG, a LoG, a principal
component of real image patches, random kernels, a 1-D kernel whose roots cannot all be
grouped into the chain's sizes, a 3-D kernel and a 2->2 channel kernel, each with a 2-4 layer
chain whose receptive field is the target's size.  The best-known optimum of each is the
lowest of every run kept: jfactor with ``--ref-restarts``
(>= 1,024) plain restarts (every one refined to convergence), scipy's
``least_squares(method='lm')`` from ``--scipy-starts`` (>= 128) random starts, and the
default search run long: the default runs' own seeds 0 .. ``--hop-runs`` - 1 (5), each run on
to ``--hop-restarts`` (1,024) restarts in waves with perturbations of the best minima and no
early stop, so each shows what its default run would have found had it not stopped (on the
Gabors the long search beats 1,024 plain restarts by 20%; one run of 4,096 restarts, the
reference before, stayed 2.6% above the 15x15 ring's best, which 2 of the five found), and the
default runs themselves (one of them may find a lower minimum than the reference); all are kept in
``experiments/results/<device>/bench_optimality.json`` with their times, so the reference is computed
once.  The default run is ``factorize(target, chain)`` with no restart count: restarts in
waves until the stopping rule or the default budget, with seed 0 and then ``--seeds`` - 1 more
seeds (how often it lands in the best basin), and ``--held-out`` (10) runs with seeds from 100 on, which no
design choice of the search looked at (seeds 0-9 guided them).  Goal: every target within 1.01x of its
best-known optimum (or both at the float64 floor, 1e-12), in a median time over the seeds of
no more than 1/10 of the time of the 1,024 plain restarts (timed again right after seed 0's
run, on the same machine state; both warmed up first, and any compile time left (a batch
shape the warm-up did not meet, as jax's monitoring counts it) subtracted from both).  Every
target is reported, met or not, with the evidence the run returns.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import devices
import jax
import numpy as np
from readme_block import replace_block

import jfactor  # noqa: F401  (float64 on)
from jfactor import kernels
from jfactor.factorize import Chain, SearchPolicy, factorize
from jfactor.factorize import baselines as baseline_lib
from jfactor.factorize.init import random_init
import arguments

RESULTS_NAME = "bench_optimality.json"
MARGIN = 1.01
FLOAT64_FLOOR = 1e-12
TIME_SHARE = 0.1
PLAIN_TIMINGS = 3  # warm runs of the plain restarts whose median time the default is held to
HELD_OUT = 100  # the first held-out seed: seeds 0-9 guided the search's design, these did not


def patch_component(size: int, index: int = 1, count: int = 20000, seed: int = 0) -> np.ndarray:
    """The ``index``-th principal component of ``size`` x ``size`` patches of skimage's camera image."""
    from skimage import data

    image = data.camera().astype(np.float64) / 255.0
    rng = np.random.default_rng(seed)
    ys = rng.integers(0, image.shape[0] - size, count)
    xs = rng.integers(0, image.shape[1] - size, count)
    patches = np.stack([image[y: y + size, x: x + size].ravel() for y, x in zip(ys, xs)])
    patches -= patches.mean(axis=0)
    _, _, vt = np.linalg.svd(patches, full_matrices=False)
    return vt[index].reshape(size, size)


def unpairable_1d(size: int, seed: int = 3) -> np.ndarray:
    """A 1-D kernel with only complex root pairs: chains of size-4 factors cannot hold them all."""
    rng = np.random.default_rng(seed)
    angles = rng.uniform(0.2, 3.0, (size - 1) // 2)
    radii = rng.uniform(0.6, 1.3, (size - 1) // 2)
    roots = np.concatenate([radii * np.exp(1j * angles), radii * np.exp(-1j * angles)])
    return np.real(np.poly(roots))


def target_set(tiny: bool = False) -> list[dict]:
    """name, kernel (numpy, spatial or (*k, C_in, C_out)), chain sizes and width."""
    if tiny:
        return [{"name": "disk 5x5", "kernel": kernels.disk(5), "chain": [3, 3], "channels": 1},
                {"name": "line 5x5 at 30", "kernel": kernels.motion_blur(5, angle=30.0), "chain": [3, 3],
                 "channels": 1}]
    rng = np.random.default_rng(7)
    return [
        {"name": "line 11x11 at 30", "kernel": kernels.motion_blur(11, angle=30.0), "chain": [3, 5, 5], "channels": 1},
        {"name": "line 11x11 at 45", "kernel": kernels.motion_blur(11, angle=45.0), "chain": [3, 5, 5], "channels": 1},
        {"name": "motion_blur 15x15", "kernel": kernels.motion_blur(15), "chain": [3, 5, 9], "channels": 1},
        {"name": "line 15x15 at 15", "kernel": kernels.motion_blur(15, angle=15.0), "chain": [3, 5, 9], "channels": 1},
        {"name": "line 15x15 at 40", "kernel": kernels.motion_blur(15, angle=40.0), "chain": [3, 5, 9], "channels": 1},
        {"name": "ring 11x11", "kernel": kernels.ring(11), "chain": [3, 5, 5], "channels": 1},
        {"name": "ring 15x15", "kernel": kernels.ring(15), "chain": [3, 5, 9], "channels": 1},
        {"name": "disk 9x9", "kernel": kernels.disk(9), "chain": [5, 5], "channels": 1},
        {"name": "disk 13x13", "kernel": kernels.disk(13), "chain": [5, 9], "channels": 1},
        {"name": "gabor 9x9", "kernel": kernels.gabor(9), "chain": [5, 5], "channels": 1},
        {"name": "gabor 11x11", "kernel": kernels.gabor(11, theta=30.0), "chain": [3, 5, 5], "channels": 1},
        {"name": "gabor 15x15", "kernel": kernels.gabor(15), "chain": [3, 5, 9], "channels": 1},
        {"name": "dog 15x15", "kernel": kernels.make("dog", 15), "chain": [3, 5, 9], "channels": 1},
        {"name": "log 15x15", "kernel": kernels.make("log", 15), "chain": [3, 5, 9], "channels": 1},
        {"name": "camera patch PC2 9x9", "kernel": patch_component(9, 1), "chain": [3, 3, 5], "channels": 1},
        {"name": "random 7x7", "kernel": kernels.random_normal(7, seed=1), "chain": [3, 3, 3], "channels": 1},
        {"name": "1-D complex roots 13", "kernel": unpairable_1d(13), "chain": [4, 4, 4, 4], "channels": 1},
        {"name": "3-D random 5x5x5", "kernel": kernels.random_normal(5, seed=2, ndim=3), "chain": [3, 3],
         "channels": 1},
        {"name": "2->2 random 7x7", "kernel": rng.standard_normal((7, 7, 2, 2)), "chain": [3, 5], "channels": 2},
    ]


def _chain(entry: dict) -> Chain:
    ndim = entry["kernel"].ndim if entry["kernel"].ndim <= 3 else entry["kernel"].ndim - 2
    return Chain.build(entry["chain"], channels=entry["channels"], ndim=ndim)


def _scipy_reference(entry: dict, starts: int) -> dict:
    """scipy LM from ``starts`` random starts (the target at unit norm, as jfactor sees it)."""
    result_target = jfactor.factorize.Target.from_array(entry["kernel"])
    kernel = result_target.kernel / np.linalg.norm(result_target.kernel)
    chain = _chain(entry)
    shapes = chain.factor_shapes(result_target.c_in, result_target.c_out)
    rng = np.random.default_rng(1234)
    found = baseline_lib.scipy_lm(kernel, chain, [random_init(shapes, rng) for _ in range(starts)])
    return {"rel_error": found["rel_error"], "time_s": found["time_s"], "starts": starts}


def _plain_reference(entry: dict, restarts: int, timings: int = 1) -> dict:
    """``restarts`` plain restarts of one target: the best error, how many restarts reached it,
    and the median time of ``timings`` (>= 1) warm runs (one run's time moved by up to 60% between
    two runs of this bench on the 2-core CPU; the default's time it is held to is the median of
    its five seeds' runs, :func:`verdicts`)."""
    chain = _chain(entry)
    factorize(entry["kernel"], chain, restarts=restarts, baselines=())  # compile
    runs = [factorize(entry["kernel"], chain, restarts=restarts, baselines=()) for _ in range(timings)]
    result = runs[0]
    errors = result.restart_errors
    return {"rel_error": result.rel_error, "time_s": float(np.median([_run_time(r) for r in runs])),
            "restarts": restarts, "best_hits": int(np.sum(errors <= result.rel_error * (1 + 1e-6) + FLOAT64_FLOOR))}


def _run_time(result) -> float:
    """A warm run's seconds without the compile time it still spent (new batch shapes)."""
    return result.time_s - result.compile_s


def _hopping_reference(entry: dict, restarts: int, runs: int) -> dict:
    """The default search run long with seeds 0 .. ``runs`` - 1 (the default runs' seeds: each
    run's start is its default run's): ``restarts`` restarts each in waves (fresh starts and
    perturbations of the best minima so far), no early stop; the best of the runs."""
    chain = _chain(entry)
    policy = SearchPolicy(hits=restarts, max_restarts=restarts, min_restarts=restarts)
    results = [factorize(entry["kernel"], chain, search=policy, baselines=(), seed=seed) for seed in range(runs)]
    return {"rel_error": min(r.rel_error for r in results), "time_s": sum(r.time_s for r in results),
            "restarts": restarts, "seeds": list(range(runs)), "errors": [r.rel_error for r in results]}


def best_known(ref: dict) -> float:
    """The lowest error any reference run reached."""
    found = [ref[k]["rel_error"] for k in ("jfactor", "scipy_lm", "basin_hopping") if k in ref]
    return min(e for e in found if e is not None)


def hopping(targets: list[dict], restarts: int, runs: int, kept: dict, save) -> None:
    """The long basin-hopping reference (:func:`_hopping_reference`) of ``targets``, into ``kept``."""
    for entry in targets:
        ref = kept[entry["name"]]
        ref["basin_hopping"] = _hopping_reference(entry, restarts, runs)
        ref["best_known"] = best_known(ref)
        print(f"reference: {entry['name']}: basin hopping {runs} x {restarts} restarts "
              f"{ref['basin_hopping']['rel_error']:.4e}"
              f" in {ref['basin_hopping']['time_s']:.1f} s", file=sys.stderr, flush=True)
        save(kept)


def reference(targets: list[dict], restarts: int, scipy_starts: int, kept: dict, save) -> dict:
    """jfactor's plain restarts on every target first, then scipy's LM; ``save(kept)`` after each."""
    for entry in targets:
        plain = _plain_reference(entry, restarts)
        kept[entry["name"]] = {"jfactor": plain, "best_known": plain["rel_error"]}
        print(f"reference: {entry['name']}: jfactor {restarts} restarts {plain['rel_error']:.4e} in "
              f"{plain['time_s']:.1f} s", file=sys.stderr, flush=True)
        save(kept)
    for entry in targets:
        scipy = _scipy_reference(entry, scipy_starts)
        ref = kept[entry["name"]]
        ref["scipy_lm"] = scipy
        ref["best_known"] = best_known(ref)
        print(f"reference: {entry['name']}: scipy {scipy_starts} starts {scipy['rel_error']} in "
              f"{scipy['time_s']:.1f} s", file=sys.stderr, flush=True)
        save(kept)
    return kept


def default_run(entry: dict, plain_restarts: int) -> dict:
    """The default ``factorize`` of one target, and the time of ``plain_restarts`` plain restarts
    (the median of :data:`PLAIN_TIMINGS` runs) measured right after it on the same machine state
    (both warm, compile excluded)."""
    chain = _chain(entry)
    factorize(entry["kernel"], chain, baselines=(), seed=1)  # compile (the run's own compile time is excluded)
    start = time.perf_counter()
    result = factorize(entry["kernel"], chain, baselines=())
    wall = time.perf_counter() - start
    plain = _plain_reference(entry, plain_restarts, PLAIN_TIMINGS)
    return {"target": entry["name"], "chain": chain.describe(), "default": result.rel_error,
            "time_s": _run_time(result), "compile_s": result.compile_s, "wall_s": wall,
            "plain_time_s": plain["time_s"], "plain_restarts": plain_restarts, "evidence": result.evidence}


def seed_runs(entry: dict, seeds: range) -> list[dict]:
    """The default ``factorize`` with each of ``seeds`` (seed 0 is :func:`default_run`): how
    often the default lands in the best basin, not only whether one seed did."""
    chain = _chain(entry)
    runs = []
    for seed in seeds:
        result = factorize(entry["kernel"], chain, baselines=(), seed=seed)
        runs.append({"seed": seed, "default": result.rel_error, "time_s": _run_time(result),
                     "stopped": result.evidence["stopped"]})
    return runs


def _within(error: float, best: float) -> bool:
    return bool(error <= MARGIN * best or max(error, best) <= FLOAT64_FLOOR)


def verdicts(run: dict, ref: dict) -> dict:
    """The default run against the best-known optimum (kept reference) and the plain restarts' time."""
    runs, held_out = seed_runs_of(run), run.get("held_out", [])
    best = min(ref["best_known"], *(r["default"] for r in runs + held_out))
    ratio = run["default"] / best if best > 0 else float("inf")
    median = float(np.median([r["time_s"] for r in runs]))
    return {"best_known": best, "plain_1024": ref["jfactor"]["rel_error"],
            "hopping": ref.get("basin_hopping", {}).get("rel_error"),
            "scipy_lm": ref.get("scipy_lm", {}).get("rel_error"), "scipy_ran": "scipy_lm" in ref, "ratio": ratio,
            "within_margin": _within(run["default"], best),
            "seeds_within": sum(_within(r["default"], best) for r in runs), "seeds": len(runs),
            "held_out_within": sum(_within(r["default"], best) for r in held_out), "held_out": len(held_out),
            # the median over the seeds: one run's time moves by 10-20% on a small machine, and the
            # restarts a search takes differ from seed to seed
            "median_s": median, "time_share": median / run["plain_time_s"],
            "fast_enough": bool(median <= TIME_SHARE * run["plain_time_s"])}


def seed_runs_of(run: dict) -> list[dict]:
    """Seed 0's default run and those of the other seeds (each with ``default`` and ``time_s``)."""
    return [run, *run.get("seeds", [])]


def table(rows: list[dict]) -> str:
    lines = ["| target | chain | best known | 1,024 restarts | scipy LM | long search | default | ratio | default s | "
             "median s | share of 1,024 | restarts | minima | best hits | runner-up | stopped | seeds within | "
             "held-out within |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e = r["evidence"]
        runner = "-" if e["runner_up"] is None else f"{e['runner_up']:.3e}"
        scipy = f"{r['scipy_lm']:.3e}" if r["scipy_lm"] is not None else "n/a" if r["scipy_ran"] else "-"
        hop = "-" if r["hopping"] is None else f"{r['hopping']:.3e}"
        lines.append(f"| {r['target']} | {r['chain']} | {r['best_known']:.3e} | {r['plain_1024']:.3e} | {scipy} | "
                     f"{hop} | "
                     f"{r['default']:.3e} | {r['ratio']:.3f}{'' if r['within_margin'] else ' (miss)'} | "
                     f"{r['time_s']:.2f} | {r['median_s']:.2f} | "
                     f"{r['time_share']:.1%}{'' if r['fast_enough'] else ' (slow)'} | "
                     f"{e['restarts']} | {e['distinct_minima']} | {e['best_hits']} | {runner} | {e['stopped']} | "
                     f"{r['seeds_within']}/{r['seeds']} | {r['held_out_within']}/{r['held_out']} |")
    met = sum(r["within_margin"] for r in rows)
    runs, runs_met = sum(r["seeds"] for r in rows), sum(r["seeds_within"] for r in rows)
    held, held_met = sum(r["held_out"] for r in rows), sum(r["held_out_within"] for r in rows)
    fast = sum(r["fast_enough"] for r in rows)
    lines.append("")
    lines.append(f"Within {MARGIN}x of the best known: {met}/{len(rows)} with seed 0, {runs_met}/{runs} runs over "
                 f"seeds 0-{max(r['seeds'] for r in rows) - 1}, {held_met}/{held} runs over the held-out seeds; "
                 f"median time at most {TIME_SHARE:.0%} of the time of the plain restarts: {fast}/{len(rows)}.")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", action="store_true", help="recompute the best-known optima")
    parser.add_argument("--defaults", action="store_true", help="rerun the default factorizations")
    parser.add_argument("--ref-restarts", type=int, default=1024)
    parser.add_argument("--scipy-starts", type=int, default=128)
    parser.add_argument("--hop-restarts", type=int, default=1024, help="restarts of each long basin-hopping run")
    parser.add_argument("--hop-runs", type=int, default=5, help="long basin-hopping runs (seeds 0, 1, ...)")
    parser.add_argument("--long-search", action="store_true", help="recompute only the long basin-hopping search")
    parser.add_argument("--seeds", type=int, default=5, help="default runs per target (seeds 0 .. N-1)")
    parser.add_argument("--held-out", type=int, default=10,
                        help=f"more default runs per target, seeds {HELD_OUT} .. {HELD_OUT} + N - 1 (no design "
                             "choice looked at them)")
    parser.add_argument("--only", help="comma-separated target names")
    parser.add_argument("--tiny", action="store_true", help="two 5x5 targets, a small reference; numbers mean nothing")
    parser.add_argument("--out", type=arguments.kept_json, default=None,
                        help=f"JSON file (default experiments/results/<device>/{RESULTS_NAME})")
    parser.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    parser.add_argument("--readme", action="store_true", help="also rewrite README's bench_optimality block")
    args = parser.parse_args(argv)
    out = args.out or (None if args.tiny else devices.results_path(devices.RESULTS, RESULTS_NAME))
    targets = target_set(args.tiny)
    if args.only:
        wanted = set(args.only.split(","))
        targets = [t for t in targets if t["name"] in wanted]
    kept = json.loads(out.read_text()) if out is not None and out.exists() else {}
    kept.setdefault("reference", {})
    kept.setdefault("default", {})
    unknown = [t["name"] for t in targets if t["name"] not in kept["reference"]
               or not args.long_search and "basin_hopping" not in kept["reference"][t["name"]]]
    if unknown and not (args.reference or args.tiny):
        print(f"{out or 'no JSON'} has no best-known optimum of {len(unknown)} target(s) ({', '.join(unknown[:3])}"
              f"{', ...' if len(unknown) > 3 else ''}): computing them takes hours (scipy's {args.scipy_starts} "
              f"starts, {args.hop_runs} long searches each); pass --reference to compute them here, or --out "
              f"experiments/results/cpu/{RESULTS_NAME} for the kept CPU table", file=sys.stderr)
        return 2

    computed = []  # whether this run measured anything: only then does the JSON name this machine

    def save(_=None):
        computed.append(True)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(kept, indent=1))

    restarts, starts = (64, 8) if args.tiny else (args.ref_restarts, args.scipy_starts)
    missing = [t for t in targets if args.reference or t["name"] not in kept["reference"]]
    if missing:
        reference(missing, restarts, starts, kept["reference"], save)
    hops, runs = (64, 2) if args.tiny else (args.hop_restarts, args.hop_runs)
    hopping([t for t in targets if args.reference or args.long_search
             or "basin_hopping" not in kept["reference"][t["name"]]], hops, runs,
            kept["reference"], save)
    for entry in targets:
        if args.defaults or entry["name"] not in kept["default"]:
            kept["default"][entry["name"]] = default_run(entry, restarts)
            print(f"default: {entry['name']}: {kept['default'][entry['name']]['default']:.4e}", file=sys.stderr,
                  flush=True)
            save()
        run = kept["default"][entry["name"]]
        for key, seeds in (("seeds", range(1, args.seeds)), ("held_out", range(HELD_OUT, HELD_OUT + args.held_out))):
            if [r["seed"] for r in run.get(key, [])] != list(seeds):
                run[key] = seed_runs(entry, seeds)
                errors = ", ".join(f"{r['default']:.4e}" for r in run[key])
                print(f"default: {entry['name']}: seeds {seeds.start}-{seeds.stop - 1}: {errors}", file=sys.stderr,
                      flush=True)
                save()
    if computed:
        kept.update({"device": devices.describe(), "platform": jax.default_backend(), "jax": jax.__version__})
        save()
    def rows_of(entries):
        return [{**kept["default"][t["name"]], **verdicts(kept["default"][t["name"]], kept["reference"][t["name"]])}
                for t in entries]

    rows = rows_of(targets)
    if args.json:
        print(json.dumps({"rows": rows}, indent=1))
    else:
        print(table(rows))
    if args.readme:  # every target kept, not only the ones rerun (--only)
        rows = rows_of([t for t in target_set(args.tiny) if t["name"] in kept["default"]])
        unmeasured = [r["target"] for r in rows if not r["scipy_ran"]]
        caveat = (f" scipy's reference is missing for {len(unmeasured)} of {len(rows)} targets (`-`): there the "
                  "best known comes from jfactor's runs alone." if unmeasured else "")
        replace_block("bench_optimality", f"Measured on {kept['device']}, jax {kept['jax']}, float64; "
                                          f"`experiments/results/{devices.slug()}/{RESULTS_NAME}` holds every "
                                          "number. scipy's LM is n/a where the residuals are fewer than the "
                                          f"parameters.{caveat}\n\n{table(rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
