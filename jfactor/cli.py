"""The ``jfactor`` command line."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from jfactor._checks import assignments, given_path
from jfactor.errors import JFactorError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Fold linear convolution stacks exactly; factorize large kernels into small ones.")
# Piped or redirected output (logs, CI) gets wide tables rather than rich's 80-column default.
console = Console() if sys.stdout.isatty() else Console(width=150)


def _directory(value: str | Path) -> Path:
    """A directory option's value (the text given, or the option's default ``Path``, which typer
    passes through too); an empty one (an unset shell variable, say) is refused rather than read
    as the current directory, where results would land among whatever is there."""
    try:
        return given_path(value)
    except JFactorError as exc:
        raise typer.BadParameter(str(exc)) from None


OutputDir = Annotated[Path | None, typer.Option("--out", metavar="DIR", parser=_directory,
                                                help="output directory (default: a new one under runs/)")]


def _print_version(value: bool) -> None:
    """``--version``: jfactor's, jax's and jaxlib's versions and Python's, read without importing jax."""
    if not value:
        return
    from importlib.metadata import version

    print(f"jfactor {version('jfactor')} (jax {version('jax')}, jaxlib {version('jaxlib')}, "
          f"Python {sys.version.split()[0]})")
    raise typer.Exit()


@app.callback()
def _group(
    compile_cache: Annotated[Path | None, typer.Option(
        help="where compiled code is kept across runs (default: $JFACTOR_COMPILE_CACHE, else "
             "~/.cache/jfactor/xla; --no-compile-cache or JFACTOR_COMPILE_CACHE=off switches it off)",
        metavar="DIR", parser=_directory)] = None,
    use_compile_cache: Annotated[bool, typer.Option(
        "--compile-cache-on/--no-compile-cache", help="reuse compiled code across runs (a second run of the "
                                                      "same geometry skips compiling)")] = True,
    _version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True,
        help="print the versions of jfactor, jax, jaxlib and Python, and exit")] = False,
) -> None:
    """Fold linear convolution stacks exactly; factorize large kernels into small ones."""
    from jfactor.cache import configure
    from jfactor.memory import memory_budget

    try:
        configure(compile_cache, use_compile_cache)
        if not {"--help", "-h"} & set(sys.argv[1:]):  # a bad JFACTOR_MEMORY_BUDGET_GB: the environment's fault,
            memory_budget()  # named before any config's
    except EXPECTED as exc:
        _fail(exc)


def _fail(exc: Exception) -> None:
    text = f"{exc.filename}: {exc.strerror}" if isinstance(exc, OSError) and exc.filename else str(exc)
    print(f"error: {text}", file=sys.stderr)
    raise typer.Exit(code=2)


def _note_sweep(parsed, config: Path, command: str) -> None:
    """Say on stderr that ``jfactor COMMAND`` runs a config with a ``sweep:`` block as it stands."""
    if parsed.sweep is not None:
        print(f"note: {config} has a sweep: block, which jfactor {command} leaves alone: this runs the config as it "
              f"stands (jfactor sweep {config} runs its cells)", file=sys.stderr)


# what a command reports as one line instead of a traceback: bad input, and files it cannot read or write
EXPECTED = (JFactorError, OSError, typer.BadParameter)


@app.command()
def fold(
    config: Annotated[Path, typer.Argument(help="stack config (YAML), Keras lines (.txt/.py), or an ONNX model")],
    out: OutputDir = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the JSON summary only")] = False,
    cheaper_only: Annotated[bool, typer.Option(help="ONNX models: keep a segment as it is where one conv would "
                                                    "cost more multiply-adds")] = False,
) -> None:
    """Fold a stack into one convolution; write kernel.npy, bias.npy and summary.json.

    For an .onnx model: fold every linear segment; write <model>.folded.onnx and summary.json.
    """
    from jfactor import rundir

    if config.suffix.lower() == ".onnx":
        _fold_onnx(config, out, as_json, cheaper_only)
        return
    if cheaper_only:
        _fail("--cheaper-only: applies to ONNX models, whose segments may stay apart; a stack folds into one conv")
    from jfactor.display import fold_summary
    from jfactor.fold import fold as fold_stack
    from jfactor.interop.seed_notation import load_any as load_stack

    try:
        stack = load_stack(config)
        folded = fold_stack(stack)
        summary = {"config": str(config), **folded.to_dict()}
        with rundir.output_dir(out, "runs", f"fold-{config.stem}") as out_dir, rundir.staged(out_dir) as files:
            rundir.write_npy(files / "kernel.npy", folded.conv.kernel)
            bias = folded.conv.bias if folded.conv.bias is not None else folded.affine.bias
            rundir.write_npy(files / "bias.npy", bias)
            rundir.write_json(files / "summary.json", summary)
    except EXPECTED as exc:
        _fail(exc)
    if as_json:
        print(rundir.dumps(summary))
        return
    fold_summary(folded, console, title=config.stem)
    console.print(f"wrote {out_dir}/kernel.npy, bias.npy, summary.json")
    print(out_dir)


def _fold_onnx(model: Path, out: Path | None, as_json: bool, cheaper_only: bool) -> None:
    from jfactor import rundir

    try:
        from jfactor.interop.onnx import fold_file, segment_table

        with rundir.output_dir(out, "runs", f"fold-{model.stem}") as out_dir:
            summary = fold_file(model, out_dir, cheaper_only=cheaper_only)
    except ImportError as exc:
        _fail(f"{model}: reading ONNX needs the onnx extra (pip install 'jfactor[onnx]'): {exc}")
    except JFactorError as exc:
        _fail(exc)
    if as_json:
        print(rundir.dumps(summary))
        return
    console.print(segment_table(summary, title=f"{model.stem}: {len(summary['segments'])} linear segments"))
    check = summary["onnxruntime"]
    compared = (f"skipped: {check['skipped']}" if "skipped" in check else
                f"max abs diff {check['max_abs_diff']:.1e} ({check['dtype']})")
    console.print(f"{summary['folded_segments']} folded: MACs {summary['macs']['before']:,} -> "
                  f"{summary['macs']['after']:,}; onnxruntime, folded vs original on {check['input_shape']}: "
                  f"{compared}")
    console.print(f"wrote {summary['folded_model']}, {out_dir}/summary.json")
    print(out_dir)


def _int_list(text: str | None, what: str):
    """'3,5,9' -> [3, 5, 9]; '3x5,9' -> [[3, 5], 9] (per-dim sizes); every entry a positive integer."""
    if text is None:
        return None
    items = []
    for part in text.split(","):
        try:
            values = [int(v) for v in part.strip().split("x")]
        except ValueError:
            raise typer.BadParameter(f"{what}: {text!r} is not a comma-separated list of integers") from None
        if min(values) < 1:
            raise typer.BadParameter(f"{what}: {text!r}: every entry must be a positive integer")
        items.append(values[0] if len(values) == 1 else values)
    return items


def _target_spec(target, family, size, params, stack, *, stacks: bool = True) -> dict:
    """The ``target:`` mapping of a config from the command line's target flags (``stacks``: whether
    the command has ``--stack``)."""
    sources = [x for x in (target, family, stack) if x is not None]
    if len(sources) != 1:
        raise typer.BadParameter("give one target: --target T.npy" + (", --family NAME --size N, or --stack S.yaml"
                                                                     if stacks else " or --family NAME --size N"))
    if family is None and (size is not None or params):
        raise typer.BadParameter("--size and --param describe a --family target; remove them")
    if target is not None:
        return {"file": str(Path(target).resolve())}
    if family is not None:
        pairs = assignments(params, "--param", "key=value (for example sigma=2.0)")
        return {"family": family, "size": size, "params": {k: parse_value(v) for k, v in pairs}}
    return {"stack": str(Path(stack).resolve())}


def _factorize_config(target, family, size, params, stack, chain, dilations, strides, channels, dtype, restarts,
                      budget_s, objective, optimizer, steps, refine, refine_steps, init, baselines, seed) -> dict:
    spec = _target_spec(target, family, size, params, stack)
    sizes = _int_list(chain, "--chain")
    if sizes is None:
        raise typer.BadParameter("give the chain, e.g. --chain 3,5,9")
    chain_spec = {"sizes": sizes, "dilations": _int_list(dilations, "--dilations"),
                  "strides": _int_list(strides, "--strides"), "channels": channels}
    return {
        "name": "factorize", "target": spec, "chain": {k: v for k, v in chain_spec.items() if v is not None},
        "dtype": dtype, "restarts": restarts, "budget_s": budget_s, "objective": {"name": objective}, "init": init,
        "seed": seed,
        "solver": {"optimizer": optimizer, "steps": steps, "refine": refine, "refine_steps": refine_steps},
        "baselines": [b for b in baselines.split(",") if b] if baselines is not None else None,
    }


# the config key each of jfactor factorize's flags writes (:func:`_factorize_config`)
FLAG_KEYS = {"target": "target.file", "family": "target.family", "size": "target.size", "param": "target.params",
             "stack": "target.stack", "chain": "chain.sizes", "dilations": "chain.dilations",
             "strides": "chain.strides", "channels": "chain.channels", "dtype": "dtype", "restarts": "restarts",
             "budget_s": "budget_s", "objective": "objective.name", "optimizer": "solver.optimizer",
             "steps": "solver.steps", "refine": "solver.refine", "refine_steps": "solver.refine_steps",
             "init": "init", "baselines": "baselines", "seed": "seed"}


def _check_flags(ctx: typer.Context, config, overrides: list[str]) -> None:
    """Refuse flags that would be ignored or overridden: with a config file, the flags that describe a
    factorization (it is the file's); without one, a ``--set`` key that a flag given on the command
    line writes too (or a key inside or around it)."""
    given = [name for name in FLAG_KEYS if ctx.get_parameter_source(name).name == "COMMANDLINE"]
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    if config is not None and given:
        raise typer.BadParameter(f"{', '.join(map(flag, given))}: with a config file ({config}) the factorization "
                                 f"is the file's; change it there or with "
                                 f"{', '.join(f'--set {FLAG_KEYS[name]}=...' for name in given)}")
    from jfactor.experiment.config import overrides_of

    for path, _ in overrides_of(overrides):
        for name in given:
            key = FLAG_KEYS[name]
            if path == key or path.startswith(key + ".") or key.startswith(path + "."):
                raise typer.BadParameter(f"--set {path} and {flag(name)} both set {key}; give it once")


def parse_value(text: str):
    from jfactor.experiment.config import parse_value as parse

    return parse(text)


@app.command()
def factorize(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Argument(help="experiment config (YAML) instead of the flags")] = None,
    target: Annotated[Path | None,
                      typer.Option(help="target kernel .npy: (k, k), (k, k, C_in, C_out), 1-D, 3-D (3 axes "
                                        "read as 3-D: a 1-D (k, C_in, C_out) target needs --set "
                                        "target.spatial_dims=1)")] = None,
    family: Annotated[str | None, typer.Option(help="target family: gaussian, log, dog, gabor, disk, ring, box, "
                                                    "motion_blur, random_normal, randint")] = None,
    size: Annotated[int | None, typer.Option(help="size of a family target")] = None,
    param: Annotated[list[str], typer.Option(help="family parameter key=value, repeatable (e.g. sigma=2.0; "
                                                  "README: families)")] = [],  # noqa: B006
    stack: Annotated[Path | None, typer.Option(help="factorize the folded kernel of this stack config")] = None,
    chain: Annotated[str | None, typer.Option(help="kernel sizes, e.g. 3,5,9 (3x5 for per-dim sizes)")] = None,
    dilations: Annotated[str | None, typer.Option(help="per-layer dilations, e.g. 1,2,4")] = None,
    strides: Annotated[str | None, typer.Option(help="per-layer strides, e.g. 1,2,1")] = None,
    channels: Annotated[int, typer.Option(help="channel width between layers")] = 1,
    dtype: Annotated[str, typer.Option(help="float64 or float32")] = "float64",
    restarts: Annotated[int | None, typer.Option(
        help="exactly this many restarts, each refined (default: restarts in screened waves until the best "
             "minimum has been found repeatedly)")] = None,
    budget_s: Annotated[float | None, typer.Option(help="stop starting new waves of restarts after this many "
                                                        "seconds")] = None,
    objective: Annotated[str, typer.Option(help="kernel, spectral or images")] = "kernel",
    optimizer: Annotated[str, typer.Option(help="lbfgs, adam or none")] = "lbfgs",
    steps: Annotated[int, typer.Option(help="first-order steps")] = 200,
    refine: Annotated[str, typer.Option(help="lm (Levenberg-Marquardt) or none")] = "lm",
    refine_steps: Annotated[int, typer.Option(help="most LM iterations")] = 500,
    init: Annotated[str, typer.Option(help="auto, roots, svd, lines, blurs or random")] = "auto",
    baselines: Annotated[str | None, typer.Option(help="comma-separated, of svd, als, lstsq, wiener, "
                                                       "unsupervised_wiener, scipy_lm (default: all but als and "
                                                       "scipy_lm)")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    out: OutputDir = None,
    set_: Annotated[list[str], typer.Option("--set", help="override a config key: key.path=value")] = [],  # noqa: B006
    as_json: Annotated[bool, typer.Option("--json", help="print result.json only")] = False,
    plots: Annotated[bool | None, typer.Option("--plots/--no-plots", help="write kernels.png, spectrum.png, "
                                                                           "loss.png and search.png (default: not "
                                                                           "with --json)")]
    = None,
) -> None:
    """Learn the best chain of small kernels for a target; compare with the baselines."""
    from jfactor import rundir
    from jfactor.experiment.config import ExperimentConfig, apply_overrides, load_config
    from jfactor.experiment.run import PLOTS, environment, plan, write_factorization
    from jfactor.factorize import factorize as run_factorize
    from jfactor.schema import validate

    try:
        _check_flags(ctx, config, set_)
        if config is not None:
            parsed, _, base = load_config(config, set_)
            source = str(config)
            _note_sweep(parsed, config, "factorize")
        else:
            raw = _factorize_config(target, family, size, param, stack, chain, dilations, strides, channels, dtype,
                                    restarts, budget_s, objective, optimizer, steps, refine, refine_steps, init,
                                    baselines, seed)
            raw = apply_overrides({k: v for k, v in raw.items() if v is not None}, set_)
            parsed, base, source = validate(ExperimentConfig, raw, "command line"), Path("."), "command line"
        if len(parsed.all_chains) != 1:
            raise typer.BadParameter("jfactor factorize takes one chain; use jfactor run for several")
        the_plan = plan(parsed, base, source)
        rundir.check_writable(out or Path("runs"))
        result = run_factorize(the_plan.target, the_plan.chains[0], objective=the_plan.objective,
                               solver=the_plan.solver, restarts=the_plan.config.restarts,
                               budget_s=the_plan.config.budget_s, init=the_plan.config.init,
                               dtype=the_plan.config.dtype, seed=the_plan.config.seed,
                               images=the_plan.images, baselines=tuple(the_plan.config.baselines),
                               progress=not as_json)
        summary = {**result.to_dict(), "environment": environment()}
        draw = the_plan.config.plots and (plots or plots is None and not as_json)
        with (rundir.output_dir(out, "runs", "factorize") as out_dir,
              rundir.staged(out_dir, replaces=[f"{name}.png" for name in PLOTS]) as files):
            pictures = write_factorization(result, files, plots=draw)
            rundir.write_json(files / "result.json", summary)
    except EXPECTED as exc:
        _fail(exc)
    if as_json:
        print(rundir.dumps(summary))
        return
    from jfactor.display import factorization_summary

    factorization_summary(result, console)
    console.print(f"wrote {out_dir}/" + ", ".join(["result.json", "approx.npy", "factors.npz", *pictures]))
    print(out_dir)


@app.command()
def run(
    config: Annotated[Path | None, typer.Argument(help="experiment config (default: the built-in quickstart)")] = None,
    runs_dir: Annotated[Path, typer.Option(help="where run directories are created", metavar="DIR",
                                           parser=_directory)] = Path("runs"),
    set_: Annotated[list[str], typer.Option("--set", help="override a config key: key.path=value")] = [],  # noqa: B006
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
) -> None:
    """Run an experiment into a new run directory (printed last)."""
    from jfactor.experiment.config import load_config
    from jfactor.experiment.run import run as run_experiment

    config = config or QUICKSTART
    try:
        parsed, _, base = load_config(config, set_)
        _note_sweep(parsed, config, "run")
        directory = run_experiment(parsed, base, str(config), runs_dir, progress=not quiet)
    except EXPECTED as exc:
        _fail(exc)
    except KeyboardInterrupt as exc:
        kept = getattr(exc, "directory", None)
        print("interrupted: " + (f"{kept} keeps what finished (no results.json: the run is unfinished)"
                                 if kept else "nothing had finished; no run directory kept"), file=sys.stderr)
        raise typer.Exit(code=130) from None
    _print_run(directory)
    print(directory)


@app.command()
def sweep(
    config: Annotated[Path, typer.Argument(help="experiment config with a sweep: block")],
    runs_dir: Annotated[Path, typer.Option(help="where the sweep directory is created", metavar="DIR",
                                           parser=_directory)] = Path("runs"),
    set_: Annotated[list[str], typer.Option("--set", help="override a config key: key.path=value")] = [],  # noqa: B006
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
    coordinator: Annotated[str | None, typer.Option(help="HOST:PORT of process 0, for a sweep split over "
                                                         "several processes or hosts")] = None,
    num_processes: Annotated[int | None, typer.Option(help="how many processes share the sweep")] = None,
    process_id: Annotated[int | None, typer.Option(help="this process's index, 0 .. N-1")] = None,
) -> None:
    """Run (or resume) every cell of a sweep; write table.csv and summary.png (directory printed last).

    With --coordinator/--num-processes/--process-id (or under a cluster that
    jax.distributed.initialize() detects, such as Slurm's srun) the cells are split among the
    processes, which share --runs-dir; process 0 writes the table once every cell is done.
    """
    from jfactor.experiment.config import load_config
    from jfactor.experiment.processes import connect
    from jfactor.experiment.sweep import check_overrides, run_sweep

    try:
        parsed, raw, base = load_config(config, set_)
        check_overrides(raw, set_, str(config))
        processes = connect(coordinator, num_processes, process_id)
        directory = run_sweep(parsed, raw, base, str(config), runs_dir, progress=not quiet, processes=processes)
    except EXPECTED as exc:
        _fail(exc)
    if processes.index != 0:
        console.print(f"process {processes.index}: its cells are in {directory}/cells")
    else:
        console.print(f"{directory}/table.csv, summary.png")
    print(directory)


QUICKSTART = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"


def _print_run(directory: Path) -> None:
    """The run's report table on the terminal."""
    import json

    payload = json.loads((directory / "results.json").read_text())
    from jfactor.display import run_summary

    run_summary(payload, console)


@app.command()
def search(
    target: Annotated[Path | None, typer.Option(help="target kernel .npy")] = None,
    family: Annotated[str | None, typer.Option(help="target family (see jfactor factorize --help)")] = None,
    size: Annotated[int | None, typer.Option(help="size of a family target")] = None,
    param: Annotated[list[str], typer.Option(help="family parameter key=value, repeatable (e.g. sigma=2.0; "
                                                  "README: families)")] = [],  # noqa: B006
    sizes: Annotated[str, typer.Option(help="candidate kernel sizes")] = "3,5,9",
    dilations: Annotated[str, typer.Option(help="candidate dilations")] = "1",
    widths: Annotated[str, typer.Option(help="candidate channel widths")] = "1",
    layers: Annotated[str, typer.Option(help="candidate numbers of layers")] = "1,2,3",
    slack: Annotated[int, typer.Option(help="how far a chain's receptive field may exceed the target")] = 2,
    restarts: Annotated[int | None, typer.Option(help="exactly this many restarts per candidate (default: "
                                                      "screened waves until sure, as jfactor factorize)")] = None,
    budget_s: Annotated[float | None, typer.Option(help="seconds per candidate before no new wave starts")] = None,
    optimizer: Annotated[str, typer.Option(help="lbfgs, adam or none (then LM only)")] = "lbfgs",
    refine_steps: Annotated[int, typer.Option(help="most LM iterations")] = 500,
    budget: Annotated[float | None, typer.Option(help="error budget: also report the cheapest chain within it")] = None,
    seed: Annotated[int, typer.Option(help="the restarts' seed (each chain's search starts from it)")] = 0,
    out: OutputDir = None,
    as_json: Annotated[bool, typer.Option("--json", help="print front.json only")] = False,
) -> None:
    """The Pareto front of error vs multiply-adds over chains built from candidate sets."""
    from rich.table import Table

    from jfactor import rundir
    from jfactor.errors import ConfigError
    from jfactor.experiment.config import TargetSpec, build_target
    from jfactor.factorize import Solver, cheapest_under
    from jfactor.factorize import search as run_search
    from jfactor.report import plot_error_vs_cost
    from jfactor.schema import validate

    try:
        spec = validate(TargetSpec, _target_spec(target, family, size, param, None, stacks=False), "command line")
        the_target = build_target(spec, Path("."), "command line")
        if budget is not None and not budget >= 0:
            raise ConfigError(f"--budget: an error budget is a relative error >= 0, got {budget}")
        if slack < 0:
            raise ConfigError(f"--slack: how far a chain may exceed the target is >= 0, got {slack}")
        rundir.check_writable(out or Path("runs"))
        found = run_search(the_target, sizes=_int_list(sizes, "--sizes"), dilations=_int_list(dilations, "--dilations"),
                           widths=_int_list(widths, "--widths"), layers=_int_list(layers, "--layers"), slack=slack,
                           restarts=restarts, budget_s=budget_s, seed=seed, progress=not as_json,
                           solver=Solver(optimizer=optimizer, refine_steps=refine_steps))
        rows = [c.to_dict() for c in found]
        pick = cheapest_under(found, budget) if budget is not None else None
        summary = {"target": the_target.name, "dense_macs": int(the_target.kernel.size), "candidates": rows,
                   "budget": budget, "cheapest_under_budget": pick.to_dict() if pick else None}
        with rundir.output_dir(out, "runs", "search") as out_dir, rundir.staged(out_dir) as files:
            rundir.write_json(files / "front.json", summary)
            plot_error_vs_cost([r for r in rows if r["on_front"]], files / "pareto.png",
                               title=f"Pareto front, {the_target.name}")
    except EXPECTED as exc:
        _fail(exc)
    if as_json:
        print(rundir.dumps(summary))
        return
    table = Table(title=f"{the_target.name}: {len(rows)} chains, Pareto front first "
                        f"(dense: {summary['dense_macs']} MACs)")
    for column in ("chain", "rel. error", "MACs/pixel", "params", "front", "restarts", "minima", "best hits",
                   "runner-up"):
        table.add_column(column, justify="left" if column == "chain" else "right")
    for r in rows:
        e = r["evidence"]
        table.add_row(r["chain"], f"{r['rel_error']:.3e}", f"{r['macs']:,}", f"{r['params']:,}",
                      "*" if r["on_front"] else "", str(e["restarts"]), str(e["distinct_minima"]), str(e["best_hits"]),
                      "-" if e["runner_up"] is None else f"{e['runner_up']:.3e}")
    console.print(table)
    for r in rows:
        if r["evidence"]["warning"]:
            console.print(f"[bold yellow]warning[/bold yellow] ({r['chain']}): {r['evidence']['warning']}")
    if budget is not None:
        console.print(f"cheapest within {budget:g}: " + (f"{pick.chain.describe()} ({pick.macs} MACs, error "
                                                          f"{pick.rel_error:.2e})" if pick else "none"))
    print(out_dir)


def _options(params) -> dict:
    """Each spelling of an option among click ``params`` -> (the option, how many values follow it)."""
    return {spelling: (param, 0 if param.is_flag or param.count else param.nargs)
            for param in params if param.param_type_name == "option"
            for spelling in (*param.opts, *param.secondary_opts)}


def _given(params, args: list[str], *, to_first_positional: bool) -> tuple[dict[str, list[str]], list[str]]:
    """The single-valued options among ``params`` that ``args`` give (option name -> each time as
    written), and, with ``to_first_positional``, the args from the first positional one on (a
    group's: its command and that command's args).  Unknown options are left to typer."""
    options = _options(params)
    given: dict[str, list[str]] = {}
    i = 0
    while i < len(args) and args[i] != "--":
        token = args[i]
        name = token.split("=", 1)[0]
        if name not in options:
            if to_first_positional and not token.startswith("-"):
                return given, args[i:]
            i += 1
            continue
        param, values = options[name]
        follows = 0 if "=" in token else values
        if not (param.multiple or param.count):
            given.setdefault(param.name, []).append(" ".join(args[i:i + 1 + follows]))
        i += 1 + follows
    return given, []


def repeated_options(args: list[str]) -> list[list[str]]:
    """The options that ``args`` (a ``jfactor`` command line) give more than once where they take
    one value or are one flag: typer would keep the last without a word.  ``--set`` and
    ``--param`` may repeat (each names its own key).  Each as written, in order."""
    import typer.main

    group = typer.main.get_command(app)
    given, rest = _given(group.params, args, to_first_positional=True)
    times = list(given.values())
    if rest and rest[0] in group.commands:
        times += _given(group.commands[rest[0]].params, rest[1:], to_first_positional=False)[0].values()
    return [each for each in times if len(each) > 1]


def _terminated(signum, frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def _sigterm_as_ctrl_c():
    """SIGTERM raises KeyboardInterrupt inside the block (only the main thread may set handlers;
    elsewhere nothing changes); the previous handler comes back after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGTERM, _terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if before is None else before)  # None: set outside Python


def main(args: list[str] | None = None) -> None:
    """The ``jfactor`` command: an option given twice is refused before typer reads the command
    line (it would keep the last); then the command runs, ending on SIGTERM (``kill``, a batch
    scheduler, ``timeout``) as on Ctrl-C: what it made and had not finished is removed, finished
    work is kept and named."""
    args = sys.argv[1:] if args is None else list(args)
    if not {"--help", "--version"} & set(args) and (twice := repeated_options(args)):
        print(f"error: {', '.join(twice[0])}: one option given {len(twice[0])} times; give it once", file=sys.stderr)
        raise SystemExit(2)
    with _sigterm_as_ctrl_c():
        app(args=args, prog_name="jfactor")
