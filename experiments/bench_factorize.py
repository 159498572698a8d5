"""Benchmark learned factorization (jfactor.factorize): quality and speed against scipy and Wiener, batching.

    python experiments/bench_factorize.py                              # all parts, tables
    python experiments/bench_factorize.py --parts A                    # one part
    python experiments/bench_factorize.py --n 1024 --json              # one JSON object
    python experiments/bench_factorize.py --out-dir experiments/results   # -> results/<device>/bench_factorize.json
    python experiments/bench_factorize.py --tiny --json                 # smoke run (about 30 s)

A. Quality and speed vs competitors, float64.  Families gaussian, box, log, dog, gabor, disk,
   motion_blur, random_normal, randint (the seed's randint(-4, 5)) at 15x15 with the chains
   3-5-9 (width 1) and 3-5-9 (width 4), and at 5x5 with 3-3; plus the seed's known-factor case
   D = A1 (*) A2 (3x3 0/1 kernels) with A1 frozen in a 3-3 chain.  Each row runs ``factorize``
   with its defaults (restarts in screened waves until the stopping rule; ``--restarts N`` for
   exactly N), ``factorize`` from exactly scipy's ``--scipy-starts`` starts (the "same 16 starts"
   column compares the two optimisers point for point), scipy
   ``least_squares(method='lm')`` from ``--scipy-starts`` random starts (``baselines.scipy_lm``,
   float64; not applicable with more parameters than residuals) and the seed's Wiener route
   (``baselines.wiener``, where a known factor exists).
   Checks: separable targets whose chain sizes add up are exact (rel error <= 1e-10); the
   toolkit is within 1.01x of scipy's best (or both at the float64 floor, <= 1e-12); it is at
   least 10x below the better Wiener route where that applies.
B. Timing: ``--timing-restarts`` restarts of the random normal 15x15 target -> 3-5-9, warm
   (a first call compiles), against scipy LM from as many starts; target ratio < 1/5.
C. Width study, float32: the random normal 15x15 target -> 3-5-9 at ``--widths``; "exact"
   means rel error < 1e-6 (float32 eps is 1.2e-7; rounding the factors alone costs ~1e-7).
D. Batch: ``factorize_batch`` of ``--n`` random normal 15x15 targets (seeds 0..n-1) -> 3-5-9
   in one call, against a Python loop of single ``factorize`` calls on the first
   ``--single-n`` targets (per-target time, extrapolated to n).  Target b of the batch draws its
   starts like a single call with seed b, so the single calls start from the very starts the
   batched call drew for those targets, and ``max_abs_diff`` (max |batched
   approx - single approx| over that subset, target scale, random normal taps ~1) measures
   what batching changes, not which minimum a restart lands in: batched kernels round
   differently, and within a minimum's flat directions the LM stopping tolerance lets the
   two land ~1e-5 apart with relative errors equal to ~1e-12 (``max_rel_error_diff``).

The JSON names the device (``device``, ``device_slug``) and its bound measured through jax on
it (``device_bound``: a device-to-device copy and a float64 matmul; experiments/devices.py).
Times exclude JAX tracing, lowering and compiling (measured with jax.monitoring and reported
as compile_s).  Every call gets the same probe images, so no call loads them.  ``--tiny``
swaps in 5x5 targets, the 3-3 chain, two families, two restarts, LM-only 10 iterations and
n = 8, to exercise every code path fast; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import devices
import numpy as np
from scipy import signal

import jfactor  # noqa: F401  (float64 on)
from jfactor.cache import compile_stats
from jfactor import kernels
from jfactor.factorize import Chain, Solver, api, factorize, factorize_batch, load_images
from jfactor.factorize import baselines as baseline_lib
from jfactor.factorize.init import random_init
import arguments

FAMILIES = ("gaussian", "box", "log", "dog", "gabor", "disk", "motion_blur", "random_normal", "randint")
FAMILY_PARAMS = {"randint": {"low": -4, "high": 5}}  # the seed's randint(-4, 5)
SEED_A1 = np.array([[1, 1, 0], [1, 0, 0], [0, 1, 1]], float)  # seed section 3's printed kernels
SEED_A2 = np.array([[0, 0, 0], [1, 1, 1], [0, 0, 0]], float)
EXACT_F64 = 1e-10
FLOAT64_FLOOR = 1e-12  # both errors below this: a tie at float64 rounding
SCIPY_MARGIN = 1.01
WIENER_FACTOR = 10.0
EXACT_F32 = 1e-6
TIMING_TARGET = 1 / 5
SPEEDUP_TARGET = 20.0


@dataclasses.dataclass(frozen=True)
class Setup:
    """What each part runs: chains are (target size, kernel sizes, width)."""

    chains: tuple
    size: int  # B, C, D: random normal size x size -> sizes
    sizes: tuple
    families: tuple
    wiener_seeds: tuple  # randint(0, 2) pairs besides the seed's printed one
    restarts: int | None
    scipy_starts: int
    timing_restarts: int
    widths: tuple
    width_restarts: int
    n: int
    single_n: int
    batch_restarts: int
    solver: Solver
    images: np.ndarray
    kept_scipy: dict = dataclasses.field(default_factory=dict)  # A: scipy results reused, see kept_scipy()


def setup(args) -> Setup:
    images = load_images(api.DEFAULT_IMAGES, size=64, count=2, seed=0)
    if args.tiny:
        return Setup(chains=((5, (3, 3), 1), (5, (3, 3), 4)), size=5, sizes=(3, 3),
                     families=("gaussian", "random_normal"),
                     wiener_seeds=(1,), restarts=2, scipy_starts=2, timing_restarts=2, widths=(1, 2), width_restarts=2,
                     n=min(args.n, 8), single_n=min(args.single_n, 4), batch_restarts=2,
                     solver=Solver(optimizer="none", refine_steps=10), images=images)
    return Setup(chains=((15, (3, 5, 9), 1), (15, (3, 5, 9), 4), (5, (3, 3), 1)), size=15, sizes=(3, 5, 9),
                 families=FAMILIES, wiener_seeds=(1, 2), restarts=args.restarts, scipy_starts=args.scipy_starts,
                 timing_restarts=args.timing_restarts, widths=tuple(args.widths), width_restarts=args.width_restarts,
                 n=args.n, single_n=min(args.single_n, args.n), batch_restarts=args.batch_restarts, solver=Solver(),
                 images=images, kept_scipy=kept_scipy(args.reuse_scipy, args.scipy_starts))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_toolkit(target, chain: Chain, s: Setup, restarts: int | None, dtype: str = "float64", starts=None):
    """``factorize`` (no built-in baselines) and its wall time, less compiling, and the compile time."""
    compile_before = compile_stats()["seconds"]
    start = time.perf_counter()
    result = factorize(target, chain, restarts=restarts, dtype=dtype, solver=s.solver, images=s.images, baselines=(),
                       starts=starts)
    wall = time.perf_counter() - start
    compiled = compile_stats()["seconds"] - compile_before
    return result, wall - compiled, compiled


def scipy_starts(chain: Chain, count: int, seed: int = 0) -> list[list[np.ndarray]]:
    """``count`` random full factor lists (``init.random_init``), frozen layers holding their weights."""
    rng = np.random.default_rng(seed)
    return [[f if w is None else w for f, w in zip(random_init(chain.factor_shapes(1, 1), rng), chain.weights)]
            for _ in range(count)]


# -- A: quality vs competitors ----------------------------------------------------------


def targets_a(s: Setup) -> list[tuple]:
    """(label, target, chain): every family on every chain, then the known-factor cases."""
    rows = [(family, kernels.make(family, size, **FAMILY_PARAMS.get(family, {})), Chain.build(sizes, channels=width))
            for size, sizes, width in s.chains for family in s.families]
    pairs = [("seed A1 (*) A2", SEED_A1, SEED_A2)]
    for seed in s.wiener_seeds:
        a1, a2 = np.random.default_rng(seed).integers(0, 2, (2, 3, 3)).astype(float)
        pairs.append((f"randint(0,2) seed {seed}", a1, a2))
    rows += [(label, signal.convolve2d(a1, a2), Chain.build([3, 3], frozen={0: a1})) for label, a1, a2 in pairs
             if a1.any() and a2.any()]
    return rows


def quality_row(label: str, target: np.ndarray, chain: Chain, s: Setup, kept: dict | None = None) -> dict:
    """The toolkit with its own starts, and from exactly scipy's starts; scipy's LM (or ``kept``,
    scipy's result on the same starts from an earlier run); the seed's Wiener route."""
    shared = scipy_starts(chain, s.scipy_starts)
    result, seconds, compiled = run_toolkit(target, chain, s, s.restarts)
    same_starts, _, _ = run_toolkit(target, chain, s, len(shared), starts=shared)
    unit = result.target_padded / np.linalg.norm(result.target_padded)
    scipy = kept or baseline_lib.scipy_lm(unit, chain, shared)
    wiener = {name: baseline_lib.wiener(unit, chain, unsupervised=name == "unsupervised_wiener")
              for name in ("wiener", "unsupervised_wiener")}
    row = {"family": label, "target": "x".join(map(str, target.shape)), "chain": chain.describe(),
           "toolkit_rel_error": result.rel_error, "toolkit_s": seconds, "compile_s": compiled,
           "toolkit_same_starts_rel_error": same_starts.rel_error,
           "restarts": result.evidence["restarts"], "evidence": result.evidence, "diverged": int(result.diverged.sum()),
           "scipy_rel_error": scipy["rel_error"], "scipy_s": scipy["time_s"], "scipy_starts": s.scipy_starts,
           "scipy_note": scipy.get("note"),
           "ratio": None if scipy["rel_error"] is None else result.rel_error / max(scipy["rel_error"], 1e-300),
           **{f"{name}_rel_error": w["rel_error"] for name, w in wiener.items()},
           "wiener_note": wiener["wiener"].get("note")}
    separable = label in kernels.SEPARABLE and chain.extent == target.shape
    return {**row, **checks(row, separable)}


def _verdict(ok: bool | None) -> str | None:
    return None if ok is None else "PASS" if ok else "FAIL"


def checks(row: dict, separable: bool) -> dict:
    error, scipy = row["toolkit_rel_error"], row["scipy_rel_error"]
    wieners = [row[k] for k in ("wiener_rel_error", "unsupervised_wiener_rel_error") if row[k] is not None]
    return {
        "exact_check": _verdict(error <= EXACT_F64 if separable else None),
        "scipy_check": _verdict(None if scipy is None
                                else error <= SCIPY_MARGIN * scipy or max(error, scipy) <= FLOAT64_FLOOR),
        "wiener_check": _verdict(WIENER_FACTOR * error <= min(wieners) if wieners else None),
    }


def kept_scipy(path: Path | None, scipy_starts: int) -> dict:
    """scipy's part-A results in an earlier JSON, by (family, target, chain), where it used as many starts
    (the starts are seeded, so the same ones)."""
    if path is None:
        return {}
    rows = json.loads(path.read_text()).get("quality", {}).get("rows", [])
    return {(r["family"], r["target"], r["chain"]): {"rel_error": r["scipy_rel_error"], "time_s": r["scipy_s"],
                                                     "note": r["scipy_note"]}
            for r in rows if r["scipy_starts"] == scipy_starts}


def part_a(s: Setup) -> dict:
    rows = []
    for label, target, chain in targets_a(s):
        key = (label, "x".join(map(str, target.shape)), chain.describe())
        rows.append(quality_row(label, target, chain, s, s.kept_scipy.get(key)))
        r = rows[-1]
        log(f"A {label} {r['target']} {r['chain']}: toolkit {r['toolkit_rel_error']:.3e} ({r['toolkit_s']:.1f} s), "
            f"scipy {_num(r['scipy_rel_error'])} ({_num(r['scipy_s'], '.1f')} s)")
    summary = {name: {v: sum(r[name] == v for r in rows) for v in ("PASS", "FAIL")}
               for name in ("exact_check", "scipy_check", "wiener_check")}
    rules = {"exact_check": f"separable family, chain sizes add up to the target: toolkit rel error <= {EXACT_F64:g}",
             "scipy_check": f"toolkit <= {SCIPY_MARGIN} x scipy best-of-{s.scipy_starts}, or both <= {FLOAT64_FLOOR:g} "
                            "(float64 floor); n/a where scipy lm does not apply",
             "wiener_check": f"{WIENER_FACTOR:g} x toolkit <= the better of wiener / unsupervised_wiener,"
                             " where they apply"}
    return {"rows": rows, "summary": summary, "rules": rules, "dtype": "float64"}


# -- B: timing --------------------------------------------------------------------------


def part_b(s: Setup) -> dict:
    target = kernels.random_normal(s.size)
    chain = Chain.build(s.sizes)
    run_toolkit(target, chain, s, s.timing_restarts)  # compile
    result, seconds, compiled = run_toolkit(target, chain, s, s.timing_restarts)
    unit = result.target_padded / np.linalg.norm(result.target_padded)
    scipy = baseline_lib.scipy_lm(unit, chain, scipy_starts(chain, s.timing_restarts))
    ratio = seconds / scipy["time_s"]
    log(f"B toolkit {seconds:.2f} s, scipy {scipy['time_s']:.1f} s")
    return {"target": f"random_normal {s.size}x{s.size}", "chain": chain.describe(), "restarts": s.timing_restarts,
            "toolkit_s": seconds, "toolkit_solve_s": result.time_s, "toolkit_compile_s_in_timed_call": compiled,
            "toolkit_rel_error": result.rel_error, "scipy_s": scipy["time_s"], "scipy_rel_error": scipy["rel_error"],
            "ratio": ratio, "target_ratio": TIMING_TARGET, "check": _verdict(ratio < TIMING_TARGET)}


# -- C: width study ---------------------------------------------------------------------


def part_c(s: Setup) -> dict:
    target = kernels.random_normal(s.size)
    rows = []
    for width in s.widths:
        result, seconds, compiled = run_toolkit(target, Chain.build(s.sizes, channels=width), s, s.width_restarts,
                                                dtype="float32")
        rows.append({"width": width, "rel_error": result.rel_error, "exact": result.rel_error < EXACT_F32,
                     "params": result.chain.num_params(1, 1), "toolkit_s": seconds, "compile_s": compiled})
        log(f"C width {width}: {result.rel_error:.3e}")
    exact = [r["width"] for r in rows if r["exact"]]
    return {"target": f"random_normal {s.size}x{s.size}", "chain": "-".join(map(str, s.sizes)), "dtype": "float32",
            "restarts": s.width_restarts, "exact_below": EXACT_F32, "rows": rows,
            "smallest_exact_width": min(exact) if exact else None}


# -- D: batched factorization -------------------------------------------------------------


def _rss_mb(field: str) -> float:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def _reset_peak() -> bool:
    """Reset the process's peak RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def part_d(s: Setup) -> dict:
    chain = Chain.build(s.sizes)
    targets = [kernels.random_normal(s.size, seed=i) for i in range(s.n)]
    options = {"restarts": s.batch_restarts, "solver": s.solver, "images": s.images}
    factorize(targets[0], chain, seed=0, baselines=(), **options)  # compile
    compile_before, start = compile_stats()["seconds"], time.perf_counter()
    # target b of a batch with seed 0 starts where a single call with seed b does
    singles = [factorize(t, chain, seed=b, baselines=(), **options) for b, t in enumerate(targets[: s.single_n])]
    single_s = time.perf_counter() - start - (compile_stats()["seconds"] - compile_before)
    log(f"D {len(singles)} single calls: {single_s:.1f} s")

    reset = _reset_peak()
    before = _rss_mb("VmRSS")
    compile_before, start = compile_stats()["seconds"], time.perf_counter()
    batched = factorize_batch(targets, chain, seed=0, **options)
    wall = time.perf_counter() - start
    compiled = compile_stats()["seconds"] - compile_before
    peak = _rss_mb("VmHWM") - before
    log(f"D batch of {s.n}: {wall:.1f} s (compile {compiled:.1f} s)")

    errors = np.array([r.rel_error for r in batched])
    items_per_s = s.n / (wall - compiled)
    baseline_items_per_s = len(singles) / single_s
    return {
        "n": s.n,
        "items_per_s": items_per_s,
        "baseline_items_per_s": baseline_items_per_s,
        "speedup": items_per_s / baseline_items_per_s,
        "compile_s": compiled,
        "peak_mem_mb": peak,
        "max_abs_diff": max(float(np.abs(b.approx - r.approx).max()) for b, r in zip(batched, singles)),
        "batch": {
            "workload": f"{s.n} random_normal {s.size}x{s.size} targets (seeds 0..{s.n - 1}) -> {chain.describe()}",
            "restarts": s.batch_restarts, "dtype": "float64", "batch_s": wall - compiled,
            "errors": {"min": float(errors.min()), "median": float(np.median(errors)), "max": float(errors.max())},
            "baseline": f"Python loop of single factorize calls on the first {len(singles)} targets, warm, "
                        f"extrapolated to {s.n}",
            "baseline_n": len(singles), "baseline_extrapolated_s": s.n / baseline_items_per_s,
            "max_abs_diff_measures": "max |approx| difference between the batched and the single-call results on "
                                     "the single-call subset; each single call starts from the starts the batched "
                                     "call drew for that target, so it measures batching alone",
            "same_best_restart": sum(b.best == r.best for b, r in zip(batched, singles)),
            "max_rel_error_diff": max(abs(b.rel_error - r.rel_error) for b, r in zip(batched, singles)),
            "peak_mem_note": "peak RSS during the batched call minus RSS before it" if reset
            else "peak RSS of the whole process minus RSS before the batched call (peak reset not allowed)",
            "target_speedup": SPEEDUP_TARGET,
            "check": _verdict(items_per_s / baseline_items_per_s >= SPEEDUP_TARGET),
        },
    }


# -- output -----------------------------------------------------------------------------


def _num(value, spec: str = ".2e") -> str:
    return "n/a" if value is None else format(value, spec)


def table_a(a: dict) -> str:
    starts = "/".join(sorted({str(r["scipy_starts"]) for r in a["rows"]}, key=int))  # scipy's, the toolkit's too
    head = (f"| family | target | chain | toolkit err | same {starts} starts | scipy err | toolkit/scipy | wiener | "
            "unsup. wiener | toolkit s | compile s | scipy s | exact | <= scipy | 10x < wiener |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in a["rows"]:
        cells = [r["family"], r["target"], r["chain"], _num(r["toolkit_rel_error"]),
                 _num(r["toolkit_same_starts_rel_error"]), _num(r["scipy_rel_error"]),
                 _num(r["ratio"], ".3g"), _num(r["wiener_rel_error"]), _num(r["unsupervised_wiener_rel_error"]),
                 _num(r["toolkit_s"], ".2f"), _num(r["compile_s"], ".1f"), _num(r["scipy_s"], ".1f"),
                 r["exact_check"] or "-", r["scipy_check"] or "-", r["wiener_check"] or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    notes = sorted({f"{r['chain']}: scipy n/a, {r['scipy_note']}" for r in a["rows"] if r["scipy_note"]}
                   | {f"{r['chain']}: wiener n/a, {r['wiener_note']}" for r in a["rows"] if r["wiener_note"]})
    rules = [f"{name}: {rule}" for name, rule in a["rules"].items()]
    summary = ", ".join(f"{name} {c['PASS']} PASS / {c['FAIL']} FAIL" for name, c in a["summary"].items())
    return "\n".join(lines + [""] + notes + rules + [summary])


def table_b(b: dict) -> str:
    return (f"{b['target']} -> {b['chain']}, {b['restarts']} restarts: toolkit {b['toolkit_s']:.2f} s warm "
            f"(rel error {b['toolkit_rel_error']:.3e}), scipy lm {b['scipy_s']:.1f} s (rel error "
            f"{b['scipy_rel_error']:.3e}); ratio {b['ratio']:.3f} (target < {b['target_ratio']:.2f}): {b['check']}")


def table_c(c: dict) -> str:
    lines = [f"{c['target']} -> {c['chain']} at widths, {c['dtype']}, {c['restarts']} restarts; "
             f"exact = rel error < {c['exact_below']:g}",
             "| width | params | rel error | exact | toolkit s |", "|---|---|---|---|---|"]
    lines += [f"| {r['width']} | {r['params']} | {r['rel_error']:.3e} | {'yes' if r['exact'] else 'no'} | "
              f"{r['toolkit_s']:.1f} |" for r in c["rows"]]
    return "\n".join(lines + [f"smallest exact width: {c['smallest_exact_width']}"])


def table_d(d: dict) -> str:
    b = d["batch"]
    return "\n".join([
        f"workload        {b['workload']}, {b['restarts']} restarts, {b['dtype']}",
        f"factorize_batch {d['items_per_s']:.2f} targets/s warm ({b['batch_s']:.1f} s); compile {d['compile_s']:.1f} s",
        f"single calls    {d['baseline_items_per_s']:.2f} targets/s (timed on {b['baseline_n']}; "
        f"{b['baseline_extrapolated_s']:.0f} s extrapolated to {d['n']})",
        f"speedup         {d['speedup']:.2f}x (target >= {b['target_speedup']:g}x): {b['check']}",
        f"rel errors      min {b['errors']['min']:.3e}, median {b['errors']['median']:.3e}, "
        f"max {b['errors']['max']:.3e}",
        f"peak memory     {d['peak_mem_mb']:.0f} MB ({b['peak_mem_note']})",
        f"max abs diff    {d['max_abs_diff']:.2e}, rel errors differ by up to {b['max_rel_error_diff']:.1e}, same best "
        f"restart on {b['same_best_restart']}/{b['baseline_n']} ({b['max_abs_diff_measures']})",
    ])


PARTS = {"A": ("quality", part_a, table_a), "B": ("timing", part_b, table_b), "C": ("widths", part_c, table_c),
         "D": (None, part_d, table_d)}  # D's keys sit at the top level (the issue-5 contract)


def parse_parts(text: str) -> list[str]:
    parts = [p.strip().upper() for p in text.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"parts must be letters from {','.join(PARTS)}, got {text!r}")
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", type=parse_parts, default=list(PARTS), help="comma-separated, from A,B,C,D")
    parser.add_argument("--restarts", type=int, default=None,
                        help="A: exactly this many toolkit restarts (default: the default search)")
    parser.add_argument("--scipy-starts", type=int, default=16, help="A: scipy lm random starts")
    parser.add_argument("--timing-restarts", type=int, default=16, help="B: restarts timed (toolkit and scipy)")
    parser.add_argument("--widths", type=lambda t: [int(w) for w in t.split(",")], default=[1, 2, 4, 8, 16],
                        help="C: chain widths")
    parser.add_argument("--width-restarts", type=int, default=16, help="C: restarts per width")
    parser.add_argument("--n", type=arguments.positive_int, default=1024, help="D: targets in the batch")
    parser.add_argument("--single-n", type=int, default=16, help="D: targets timed with single calls")
    parser.add_argument("--batch-restarts", type=int, default=4, help="D: restarts per target")
    parser.add_argument("--tiny", action="store_true", help="smoke run: small targets and solver, n <= 8")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--out", type=arguments.kept_json, help="also write the JSON to this file")
    parser.add_argument("--out-dir", type=arguments.output_dir,
                        help="also write the JSON to OUT_DIR/<device>/bench_factorize.json")
    parser.add_argument("--reuse-scipy", type=Path, metavar="JSON",
                        help="A: take scipy's results (same seeded starts) from this earlier JSON instead of rerunning")
    args = parser.parse_args()
    if args.out_dir:  # the kept results there are read back too: check them before the bench runs
        try:
            arguments.kept_json(str(args.out_dir / devices.slug() / "bench_factorize.json"))
        except argparse.ArgumentTypeError as exc:
            parser.error(f"argument --out-dir: {exc}")

    s = setup(args)
    result = {"device": devices.describe(), "device_slug": devices.slug(), "device_bound": devices.bound(args.tiny),
              "parts": args.parts, "tiny": args.tiny, "solver": dataclasses.asdict(s.solver)}
    texts = []
    for part in args.parts:
        key, run, table = PARTS[part]
        out = run(s)
        result.update(out if key is None else {key: out})
        texts.append(f"== {part} ==\n{table(out)}")
    result["load_avg_1min"] = os.getloadavg()[0]  # other work on the machine skews the timings
    header = f"device {result['device']}  (1-min load {result['load_avg_1min']:.1f})\n"
    print(json.dumps(result) if args.json else header + "\n\n".join(texts))
    for path in filter(None, [args.out, args.out_dir and devices.results_path(args.out_dir, "bench_factorize.json")]):
        path.parent.mkdir(parents=True, exist_ok=True)
        earlier = json.loads(path.read_text()) if path.exists() else {}  # the parts not rerun stay
        parts = sorted(set(earlier.get("parts", [])) | set(args.parts))
        part_devices = ({part: earlier.get("device") for part in earlier.get("parts", [])}
                        | earlier.get("part_devices", {}) | {part: result["device"] for part in args.parts})
        path.write_text(json.dumps({**earlier, **result, "parts": parts, "part_devices": part_devices}, indent=2)
                        + "\n")


if __name__ == "__main__":
    main()
