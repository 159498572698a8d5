"""Benchmark batched folding (jfactor.batch.fold_batch) against the seed's scipy loop, on the device jax uses.

    python experiments/bench_fold.py --n 10000             # readable table
    python experiments/bench_fold.py --n 10000 --json      # one JSON object
    python experiments/bench_fold.py --sweep 1000,10000,100000 --out-dir experiments/results
    python experiments/bench_fold.py --sweep 100000 --methods auto,chain,fft,shift --out-dir OUT
    python experiments/bench_fold.py --n 8 --tiny --json   # smoke run (a few seconds)
    python experiments/bench_fold.py --n 10000 --devices 2  # CPU split in 2 XLA devices, batch sharded
    python experiments/bench_fold.py --crossover           # the CPU timings behind method="auto"

Workload: configs/seed/section8_avgpool.yaml (five 3x3 convs, four 2x2 average pools ->
one 78x78 conv, stride 16) with N sets of random normal float64 weights, folded in one
jitted call.  Baseline, in the same run: the seed's route, a Python loop composing each
stack's kernels with ``scipy.signal.convolve2d`` (each pool then conv becomes the conv
kernel repeated 2x2 by ``np.repeat`` and dilated by the stride so far, divided by 4),
timed on the first ``--baseline-n`` stacks and reported per item.

Reported: warm throughput (best of ``--repeats`` calls) apart from the first call's compile
time; the fold's peak memory (host: max RSS during the fold calls minus RSS before them;
accelerators: the device allocator's peak; each ``--sweep`` point runs in a fresh process);
max abs difference to the baseline's kernels; and the device bound, measured through jax on
the device the fold runs on (``devices.bound``: a device-to-device copy and a float64
matmul), with the bytes and FLOPs per item of the compositions the method runs
(``jfactor.batch.fold_plan`` and ``plan_cost``; ideal: each operand read once and each
result written once; as streamed: what the formulation moves) and the achieved fraction of
both.  ``--out-dir DIR`` writes ``DIR/<device>/bench_fold.json`` (``devices.slug``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import devices
import jax
import jax.numpy as jnp
import numpy as np
import scipy.signal

import jfactor  # noqa: F401  (float64 on)
from jfactor import batch
from jfactor.stack_config import load_stack
from readme_block import replace_block
import arguments

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "seed" / "section8_avgpool.yaml"
BYTES = 8  # float64


# -- workload and baseline --------------------------------------------------------------


def workload(n: int, seed: int = 0):
    """The section-8 structure and a batch of ``n`` random-weight copies (leaves (n, ...))."""
    structure = load_stack(CONFIG)
    rng = np.random.default_rng(seed)
    stacks = jax.tree.map(lambda w: jnp.asarray(rng.standard_normal((n,) + w.shape)), structure)
    return structure, stacks


def _dilate2d(kernel: np.ndarray, step: int) -> np.ndarray:
    out = np.zeros(((kernel.shape[0] - 1) * step + 1, (kernel.shape[1] - 1) * step + 1))
    out[::step, ::step] = kernel
    return out


def seed_route(kernels: list[np.ndarray]) -> np.ndarray:
    """The seed's composition: K <- convolve2d(K, dilate(repeat(A, 2x2), stride)) / 4."""
    composed, stride = kernels[0], 1
    for kernel in kernels[1:]:
        upsampled = np.repeat(np.repeat(kernel, 2, axis=0), 2, axis=1)
        composed = scipy.signal.convolve2d(composed, _dilate2d(upsampled, stride)) / 4
        stride *= 2
    return composed


def run_baseline(stacks, count: int) -> tuple[float, np.ndarray]:
    """Items/s of the scipy loop on the first ``count`` stacks, and its kernels (count, 78, 78)."""
    kernels = [np.asarray(w)[:count, :, :, 0, 0] for w in jax.tree.leaves(stacks)]
    start = time.perf_counter()
    results = np.stack([seed_route([k[i] for k in kernels]) for i in range(count)])
    return count / (time.perf_counter() - start), results


# -- the fold under test ---------------------------------------------------------------


def _rss_mb() -> float:
    """Current resident set size (Linux /proc; max RSS elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return _max_rss_mb()


def _max_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def run_fold(stacks, method: str, repeats: int, shard: bool) -> dict:
    """First-call and best warm time of ``fold_batch``, its peak memory, and the result."""
    before = _rss_mb()
    start = time.perf_counter()
    folded = jax.block_until_ready(batch.fold_batch(stacks, method=method, shard=shard))
    first = time.perf_counter() - start
    warm = []
    for _ in range(repeats):
        del folded
        start = time.perf_counter()
        folded = jax.block_until_ready(batch.fold_batch(stacks, method=method, shard=shard))
        warm.append(time.perf_counter() - start)
    device_peak = devices.peak_device_mb()
    return {"first_s": first, "warm_s": min(warm), "peak_device_mb": device_peak,
            "peak_mem_mb": _max_rss_mb() - before if device_peak is None else device_peak,
            "compiled": batch._fold._cache_size(), "folded": folded}


# -- device bound -----------------------------------------------------------------------


def _best(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def ran_method(stacks, method: str) -> str:
    """The method ``fold_batch`` runs for ``method`` on this device (``"auto"`` resolved as it resolves it)."""
    if method != "auto":
        return method
    n = jax.tree.leaves(stacks)[0].shape[0]
    return batch.auto_method(stacks, jax.devices()[0].platform, -(-n // jax.device_count()))


def bound(stacks, method: str, rates: dict) -> dict:
    """Per-item bytes and FLOPs of the compositions ``method`` runs here, and the items/s they allow.

    ``items_per_s``: the device bound, ``min(copy bandwidth / ideal bytes, FLOP rate / FLOPs)``;
    ``items_per_s_as_moved``: the same with the bytes the formulation streams.
    """
    plan = batch.fold_plan(stacks, ran_method(stacks, method))
    totals = batch.plan_cost(plan)
    bandwidth, flop_rate = rates["copy_gb_s"] * 1e9, rates["matmul_gflop_s"] * 1e9
    compute = flop_rate / totals["flops"]
    return {"methods": [c.method for c in plan], "bytes_per_item": totals["bytes"],
            "bytes_moved_per_item": totals["bytes_moved"], "flops_per_item": totals["flops"],
            "ops_per_call": totals["ops"],
            "limited_by": "memory" if bandwidth / totals["bytes"] < compute else "compute",
            "items_per_s": min(bandwidth / totals["bytes"], compute),
            "items_per_s_as_moved": min(bandwidth / totals["bytes_moved"], compute)}


# -- one run, a sweep, the crossover ---------------------------------------------------


def run(n: int, method: str, tiny: bool, baseline_n: int, repeats: int) -> dict:
    _, stacks = workload(n)
    fold = run_fold(stacks, method, 1 if tiny else repeats, shard=jax.device_count() > 1)
    count = min(n, baseline_n)
    baseline_rate, reference = run_baseline(stacks, count)
    kernel = np.asarray(fold["folded"].kernel[:count, :, :, 0, 0])
    rates = devices.bound(tiny)
    limit = bound(stacks, method, rates)
    items_per_s = n / fold["warm_s"]
    return {
        "n": n,
        "device": devices.describe(),
        "device_slug": devices.slug(),
        "method": method,
        "ran": ran_method(stacks, method),
        "sharded": jax.device_count() > 1,
        "dtype": "float64",
        "workload": f"{CONFIG.stem}: {'x'.join(map(str, fold['folded'].size))} stride {fold['folded'].stride[0]}",
        "items_per_s": items_per_s,
        "warm_s": fold["warm_s"],
        "first_call_s": fold["first_s"],
        "compile_s": fold["first_s"] - fold["warm_s"],
        "compiled_executables": fold["compiled"],
        "baseline": "scipy.signal.convolve2d loop (seed route)",
        "baseline_items_per_s": baseline_rate,
        "baseline_n": count,
        "speedup": items_per_s / baseline_rate,
        "peak_mem_mb": fold["peak_mem_mb"],
        "peak_mem_measures": "host RSS" if fold["peak_device_mb"] is None else "device allocator peak",
        "output_mb": fold["folded"].kernel.nbytes / 2**20,
        "max_abs_diff": float(np.abs(kernel - reference).max()),
        "max_abs_kernel": float(np.abs(reference).max()),
        "device_bound": rates,
        "bound": limit,
        "bound_fraction": items_per_s / limit["items_per_s"],
        "bound_fraction_as_moved": items_per_s / limit["items_per_s_as_moved"],
        "load_avg_1min": os.getloadavg()[0],
    }


def sweep(ns: list[int], methods: list[str], args) -> list[dict]:
    """One fresh process per N and method, so each peak memory is that run's alone."""
    results = []
    for n, method in itertools.product(ns, methods):
        command = [sys.executable, __file__, "--n", str(n), "--json", "--method", method,
                   "--baseline-n", str(args.baseline_n), "--repeats", str(args.repeats),
                   "--devices", str(args.devices)] + (["--tiny"] if args.tiny else [])
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out))
    return results


CROSSOVER_GRID = {  # ndim: [(ka, kb)], square kernels, each with C in (1, 4) and step in (1, 2)
    1: [(64, 5), (64, 9), (64, 17), (256, 9), (256, 33)],
    2: [(8, 3), (8, 7), (24, 3), (24, 5), (24, 7), (24, 9), (64, 3), (64, 5), (64, 7), (64, 9)],
    3: [(8, 3), (12, 3), (12, 5)],
}


CROSSOVER_COMPOSERS = {**batch.COMPOSERS,
                       "chain": lambda a, b, step: batch.compose_chain([a, b], [(1,) * len(step), step])}


def crossover(n: int) -> list[dict]:
    """Per-item microseconds of each formulation on one composition (a (n, ka^d, C, C), b (n, kb^d, C, C))."""
    rng = np.random.default_rng(0)
    rows = []
    for (nd, pairs), channels, step in itertools.product(CROSSOVER_GRID.items(), (1, 4), (1, 2)):
        for ka, kb in pairs:
            a = jnp.asarray(rng.standard_normal((n,) + (ka,) * nd + (channels, channels)))
            b = jnp.asarray(rng.standard_normal((n,) + (kb,) * nd + (channels, channels)))
            row = {"ndim": nd, "ka": ka, "kb": kb, "channels": channels, "step": step}
            full = np.prod(batch.full_size((ka,) * nd, (kb,) * nd, (step,) * nd))
            for method, compose in CROSSOVER_COMPOSERS.items():
                if method == "gather" and full * kb**nd * channels**2 * n * BYTES > 2**30:
                    row[method] = None  # would gather more than 1 GiB
                    continue
                fn = jax.jit(lambda a, b, compose=compose: compose(a, b, (step,) * nd))
                row[method] = _best(lambda: fn(a, b).block_until_ready(), 3) / n * 1e6
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


# -- output ----------------------------------------------------------------------------


def table(result: dict) -> str:
    b, m = result["bound"], result["device_bound"]
    lines = [
        f"workload        {result['workload']}, N = {result['n']:,}, float64, method {result['method']} "
        f"(ran {result['ran']}: {', '.join(sorted(set(b['methods'])))})",
        f"device          {result['device']}  (1-min load {result['load_avg_1min']:.1f})",
        f"fold_batch      {result['items_per_s']:,.0f} items/s warm ({result['warm_s'] * 1e3:.1f} ms per call); "
        f"compile {result['compile_s']:.2f} s",
        f"scipy loop      {result['baseline_items_per_s']:,.1f} items/s (timed on {result['baseline_n']} stacks)",
        f"speedup         {result['speedup']:,.0f}x",
        f"peak memory     {result['peak_mem_mb']:,.0f} MB ({result['peak_mem_measures']}) for a "
        f"{result['output_mb']:,.0f} MB result",
        f"max abs diff    {result['max_abs_diff']:.2e} (kernel values up to {result['max_abs_kernel']:.1f})",
        f"device bound    copy {m['copy_gb_s']:.1f} GB/s (read + written), matmul {m['matmul_gflop_s']:.0f} GFLOP/s, "
        "through jax on the device",
        f"bound           {b['bytes_per_item'] / 1e3:.0f} kB and {b['flops_per_item'] / 1e3:.0f} kFLOP per item -> "
        f"{b['items_per_s']:,.0f} items/s ({b['limited_by']}); achieved {result['bound_fraction']:.1%}",
        f"as streamed     {b['bytes_moved_per_item'] / 1e3:.0f} kB per item -> "
        f"{b['items_per_s_as_moved']:,.0f} items/s; "
        f"achieved {result['bound_fraction_as_moved']:.1%}",
    ]
    return "\n".join(lines)


def formulations(r: dict) -> str:
    """The compositions one run's fold ran (``auto`` on a CPU picks per composition), e.g. ``shift``."""
    return "/".join(sorted(set(r["bound"]["methods"])))


def sweep_table(results: list[dict]) -> str:
    lines = ["| N | method (ran) | items/s (warm) | scipy items/s | speedup | compile s | peak MB | result MB | "
             "of bound (ideal / as streamed) | max abs diff |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['n']:,} | {r['method']} ({formulations(r)}) | {r['items_per_s']:,.0f} | "
                     f"{r['baseline_items_per_s']:,.1f} | {r['speedup']:,.0f}x | "
                     f"{r['compile_s']:.2f} | {r['peak_mem_mb']:,.0f} | {r['output_mb']:,.0f} | "
                     f"{r['bound_fraction']:.1%} / {r['bound_fraction_as_moved']:.0%} | {r['max_abs_diff']:.1e} |")
    return "\n".join(lines)


def device_table(results: Path = devices.RESULTS, expected: tuple[str, ...] = ("cpu", "GPU")) -> str:
    """CPU and GPU side by side: warm items/s of every measured N and method, from each device's JSON.

    Reads ``results/<device>/bench_fold.json``, then ``bench_fold_methods.json`` (the first
    run of an N and method is shown); a device of ``expected`` with no folder yet gets a
    column that says so.  Each cell gives the machine's load during its run.
    """
    runs = {}
    for path in sorted(results.glob("*/bench_fold*.json")):
        for r in json.loads(path.read_text()).get("sweep", []):
            runs.setdefault(path.parent.name, {}).setdefault((r["n"], r["method"], None), r)
    columns = list(runs) + [e for e in expected if e not in runs and not (e == "GPU" and set(runs) - {"cpu"})]
    keys = sorted({k for device in runs.values() for k in device}, key=lambda k: (k[1] != "auto", k[0], k[1]))
    # a column's runs may come from different machines of one platform (bench_fold.json rerun on another CPU):
    # the header names every one of them
    head = "| N | method | " + " | ".join(
        " / ".join(dict.fromkeys(r["device"] for r in runs[c].values())) if c in runs else f"{c}: not yet measured"
        for c in columns) + " |"
    lines = ["Warm stacks/s folding N copies of the seed's section-8 stack in float64, per device (the formulation "
             "that ran; the share of the device's ideal bound; the 1-minute load average of the machine, which "
             "other work shares):", "", head, "|---|---|" + "---|" * len(columns)]
    for n, method, _ in dict.fromkeys((k[0], k[1], None) for k in keys):
        cells = []
        for c in columns:
            r = next((r for (rn, rm, _), r in runs.get(c, {}).items() if (rn, rm) == (n, method)), None)
            cells.append("-" if r is None else f"{r['items_per_s']:,.0f}/s ({formulations(r)}, "
                                               f"{r['bound_fraction']:.1%} of bound, "
                                               f"load {r['load_avg_1min']:.1f})")
        lines.append(f"| {n:,} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def crossover_table(rows: list[dict]) -> str:
    methods = [m for m in CROSSOVER_COMPOSERS if any(m in r for r in rows)]
    lines = ["| d | ka | kb | C | step | " + " | ".join(f"{m} us" for m in methods) + " | fastest | auto (CPU) |",
             "|---|---|---|---|---|" + "---|" * len(methods) + "---|---|"]
    for r in rows:
        timed = {m: r[m] for m in methods if r.get(m) is not None}
        cells = " | ".join("-" if r.get(m) is None else f"{r[m]:.1f}" for m in methods)
        shapes = [(1,) + (k,) * r["ndim"] + (r["channels"],) * 2 for k in (r["ka"], r["kb"])]
        auto = batch.choose_method(*shapes, (r["step"],) * r["ndim"])
        lines.append(f"| {r['ndim']} | {r['ka']} | {r['kb']} | {r['channels']} | {r['step']} | {cells} | "
                     f"{min(timed, key=timed.get)} | {auto} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=arguments.positive_int, default=10_000, help="stacks per batch")
    parser.add_argument("--sweep", type=arguments.positive_ints,
                        help="comma-separated N values, each in a fresh process")
    parser.add_argument("--crossover", action="store_true", help="time shift / fft / gather / chain per composition")
    parser.add_argument("--method", default="auto", choices=batch.METHODS)
    parser.add_argument("--methods", help="with --sweep: comma-separated methods, each N run with each")
    parser.add_argument("--devices", type=arguments.positive_int, default=1,
                        help="split the CPU into this many XLA devices and shard the batch over them")
    parser.add_argument("--baseline-n", type=arguments.positive_int, default=200,
                        help="stacks the scipy loop is timed on")
    parser.add_argument("--repeats", type=arguments.positive_int, default=3, help="warm calls; the best is reported")
    parser.add_argument("--tiny", action="store_true", help="smoke run: one warm call, small probes")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--out", type=arguments.output_file, help="also write the JSON to this file")
    parser.add_argument("--out-dir", type=arguments.output_dir, help="also write the JSON to OUT_DIR/<device>/NAME")
    parser.add_argument("--readme", action="store_true",
                        help="only rewrite README's bench_fold_devices block from "
                             "experiments/results/*/bench_fold*.json")
    parser.add_argument("--name", help="file name under --out-dir (default bench_fold.json, "
                                       "bench_fold_crossover.json with --crossover)")
    args = parser.parse_args()
    if args.tiny:
        args.baseline_n = min(args.baseline_n, 8)
    if args.devices > 1:  # before the backend starts
        jax.config.update("jax_num_cpu_devices", args.devices)
    methods = args.methods.split(",") if args.methods else [args.method]
    unknown = [m for m in methods if m not in batch.METHODS]
    if unknown:
        parser.error(f"--methods: {unknown} not in {batch.METHODS}")

    if args.readme:
        replace_block("bench_fold_devices", device_table())
        return
    name = args.name or ("bench_fold_crossover.json" if args.crossover else "bench_fold.json")
    if args.crossover:
        result = {"crossover": crossover(16 if args.tiny else 256), "device": devices.describe(),
                  "device_slug": devices.slug()}
        text = crossover_table(result["crossover"])
    elif args.sweep:
        result = {"sweep": sweep(args.sweep, methods, args),
                  "device": devices.describe(), "device_slug": devices.slug()}
        text = sweep_table(result["sweep"])
    else:
        result = run(args.n, args.method, args.tiny, args.baseline_n, args.repeats)
        text = table(result)
    print(json.dumps(result) if args.json else text)
    for path in filter(None, [args.out, args.out_dir and devices.results_path(args.out_dir, name)]):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
