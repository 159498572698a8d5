"""One experiment -> one run directory, never overwritten.

The directory holds ``config.yaml`` (the resolved config), ``results.json`` (written last:
its presence marks a finished run), a tidy ``metrics.csv`` (one row per method and
metric), the factors (``factors_<i>.npz``), PNG plots and ``report.md``.  Everything is
built and checked before any compute, so a bad config fails in a second with one message.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import platform
import time
from pathlib import Path

import jax
import numpy as np

from jfactor import rundir
from jfactor.errors import ConfigError, JFactorError
from jfactor.experiment.config import (
    ExperimentConfig, build_chain, build_objective, build_solver, build_target, load_stack_spec, shrink,
)
from jfactor.factorize import Factorization, check_chain, factorize
from jfactor.factorize.objectives import local_image_path
from jfactor.fold import certified
from jfactor.schema import dump_yaml

PLOTS = ("kernels", "spectrum", "loss", "search")  # the PNGs of a factorization (jfactor.report.factorization_plots)


@dataclasses.dataclass
class Plan:
    """Everything a run needs, built from a config without computing anything heavy."""

    config: ExperimentConfig
    source: str
    target: object = None
    chains: list = dataclasses.field(default_factory=list)
    objective: object = None
    images: object = None
    solver: object = None
    stack: object = None
    base: Path = Path(".")  # the config's directory: what its relative file paths are read against


def plan(config: ExperimentConfig, base: Path, source: str) -> Plan:
    """Build and check target, chains and objective; raises ConfigError before any compute."""
    result = Plan(config, source, base=Path(base))
    try:
        if config.stack is not None:
            result.stack = load_stack_spec(config, base, source)
            if config.all_chains:
                from jfactor.experiment.config import TargetSpec

                spec = config.stack if not isinstance(config.stack, str) else str(base / config.stack)
                result.target = build_target(TargetSpec(stack=spec), base, source)
        else:
            result.target = build_target(config.target, base, source)
        if result.target is not None:
            ndim = result.target.ndim
            result.chains = [build_chain(spec, ndim, base, source, i) for i, spec in enumerate(config.all_chains)]
            for i, chain in enumerate(result.chains):
                try:
                    check_chain(chain, result.target)
                except JFactorError as exc:
                    raise ConfigError(f"{source}: chains[{i}]: {exc}") from None
        if config.tiny:  # the tiny variant's images no smaller than the chains' kernels
            config = result.config = shrink(config, max((max(chain.extent) for chain in result.chains), default=0))
        if result.target is not None:
            try:  # a solver that optimises nothing is refused here, before any cell of a sweep runs
                result.solver = build_solver(config.solver)
            except ConfigError as exc:
                raise ConfigError(f"{source}: {exc}") from None
            result.objective, result.images = build_objective(config.objective, result.target, base, source)
            for i, chain in enumerate(result.chains if result.images is not None else []):
                extent = tuple(chain.extent)  # what the images are filtered with (it covers the target)
                if any(n < k for n, k in zip(result.images.shape[1:-1], extent)):
                    raise ConfigError(f"{source}: objective.image_size {config.objective.image_size} is smaller "
                                      f"than chains[{i}]'s extent {extent}: give at least {max(extent)}")
    except ConfigError:
        raise
    except JFactorError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return result


def environment() -> dict:
    """Versions and device, recorded in every run (versions from package metadata: nothing imported)."""
    from importlib.metadata import version

    return {
        "jax": jax.__version__, "optax": version("optax"), "flax": version("flax"), "numpy": np.__version__,
        "python": platform.python_version(), "device": str(jax.devices()[0]), "platform": jax.default_backend(),
        "device_count": jax.device_count(),
    }


def _rows(index: int, result: Factorization) -> list[dict]:
    """Tidy metric rows of one chain's result: the factorizer and every baseline."""
    summary = result.to_dict()
    rows = []
    for metric in ("rel_error", "max_abs_error", "psnr_db", "spectral_error", "output_psnr_db", "params", "macs",
                   "time_s", "compile_s"):
        rows.append({"chain_index": index, "chain": summary["chain"], "method": "jfactor", "metric": metric,
                     "value": summary[metric]})
    for name, entry in summary["baselines"].items():
        for metric in ("rel_error", "time_s"):
            rows.append({"chain_index": index, "chain": summary["chain"], "method": name, "metric": metric,
                         "value": entry[metric]})
    return rows


def _csv(rows: list[dict]) -> str:
    if not rows:
        return ""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def resolved_yaml(config: ExperimentConfig, base: Path) -> str:
    """``config`` as a run's ``config.yaml`` keeps it, so that it runs again from there as it ran:
    every key given or defaulted but none null (every optional key defaults to None; an inline
    stack's layers with their other kinds null did not read back), and every file it names (read
    relative to ``base``, the config's directory) as an absolute path."""
    return dump_yaml(_absolute_paths(config.model_dump(mode="json", exclude_none=True), Path(base)))


def _absolute_paths(node, base: Path):
    """``node`` (a config mapping) with its file paths (``file:`` and ``stack:`` strings, image
    files among ``images:``) made absolute against ``base``."""
    def absolute(path: str) -> str:
        return str((base / path).resolve())  # an absolute path stays itself

    if isinstance(node, list):
        return [_absolute_paths(item, base) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in ("file", "stack") and isinstance(value, str):
            out[key] = absolute(value)
        elif key == "images" and isinstance(value, list):
            out[key] = [local_image_path(name, base) for name in value]  # as build_objective reads them
        else:
            out[key] = _absolute_paths(value, base)
    return out


def execute(the_plan: Plan, directory: Path, *, progress: bool = True, extra: dict | None = None) -> dict:
    """Run a plan into ``directory``; returns the results mapping (also in results.json, with
    the entries of ``extra`` added)."""
    config = the_plan.config
    started = time.time()
    rundir.write_text(directory / "config.yaml", resolved_yaml(config, the_plan.base))
    summaries, metric_rows, plots = [], [], []
    if the_plan.stack is not None:
        from jfactor.fold import fold

        folded = fold(the_plan.stack)
        fold_summary = folded.to_dict()
        rundir.write_npy(directory / "folded_kernel.npy", folded.conv.kernel)
        summaries.append({"fold": fold_summary})
        for metric in ("max_abs_diff", "rel_diff"):
            metric_rows.append({"chain_index": "", "chain": "", "method": "fold", "metric": metric,
                                "value": fold_summary["certificate"][metric]})
    results = []
    for i, chain in enumerate(the_plan.chains):
        result = factorize(the_plan.target, chain, objective=the_plan.objective, solver=the_plan.solver,
                           restarts=config.restarts, budget_s=config.budget_s, init=config.init, dtype=config.dtype,
                           seed=config.seed,
                           images=the_plan.images, baselines=tuple(config.baselines), progress=progress)
        results.append(result)
        summary = result.to_dict()
        summary["name"] = config.all_chains[i].name or summary["chain"]
        summaries.append(summary)
        metric_rows += _rows(i, result)
        plots += write_factorization(result, directory, f"chain{i}", plots=config.plots)
    if config.plots and len(results) > 1:
        from jfactor.report import plot_error_vs_cost

        plots.append(plot_error_vs_cost([s for s in summaries if "chain" in s], directory / "error_vs_macs.png",
                                        label_key="name", title=the_plan.target.name).name)
    rundir.write_text(directory / "metrics.csv", _csv(metric_rows))
    payload = {
        "name": config.name,
        "config": _absolute_paths(config.model_dump(mode="json"), the_plan.base),  # as config.yaml has them
        "environment": environment(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "wall_s": time.time() - started,
        "results": summaries,
        "plots": plots,
        **(extra or {}),
    }
    rundir.write_text(directory / "report.md", _report(payload))
    # the files beside it, so that a sweep reuses a cell only while all of them are there
    payload["files"] = sorted(p.name for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))
    rundir.write_json(directory / "results.json", payload)
    return payload


def write_factorization(result: Factorization, directory: Path, stem: str = "", *, plots: bool = True) -> list[str]:
    """``<stem>_factors.npz`` (layer0, layer1, ... in chain order), ``<stem>_approx.npy`` (the
    folded chain in the target's layout, its whole extent: the target sits at ``padding`` inside
    it where the chain's extent is larger) and, with ``plots``, the PNGs (:data:`PLOTS`); returns
    the PNG names.  ``directory`` is a new one (a run's, a sweep cell's, a command's staging
    folder: :func:`jfactor.rundir.staged` removes an earlier result's pictures)."""
    prefix = f"{stem}_" if stem else ""
    rundir.write_npz(directory / f"{prefix}factors.npz", **{f"layer{j}": f for j, f in enumerate(result.factors)})
    rundir.write_npy(directory / f"{prefix}approx.npy", result.approx_like_target(crop=False))
    if not plots:
        return []
    from jfactor.report import factorization_plots

    return [p.name for p in factorization_plots(result, directory, stem)]


def _report(payload: dict) -> str:
    """report.md: what was run, the table of results, the baselines, the pictures."""
    from jfactor.report import markdown_table

    config = payload["config"]
    lines = [f"# {payload['name']}", ""]
    if config.get("description"):
        lines += [config["description"], ""]
    env = payload["environment"]
    lines += [f"Run {payload['started']} on {env['device']} (jax {env['jax']}, optax {env['optax']}, "
              f"flax {env['flax']}, numpy {env['numpy']}), {payload['wall_s']:.1f} s.", ""]
    for entry in payload["results"]:
        if "fold" in entry:
            fold = entry["fold"]
            lines += ["## Fold", "",
                      f"One conv {'x'.join(map(str, fold['kernel_shape'][:-2]))}, stride {fold['stride']}, "
                      f"receptive field {fold['receptive_field']}; canonical form "
                      f"`{fold['canonical']['description']}`; certificate {certified(fold['certificate'])}"
                      + ("" if fold["exact_region"] is None else f"; exact on output region {fold['exact_region']}")
                      + ".", ""]
    chains = [e for e in payload["results"] if "chain" in e]
    if chains:
        target = chains[0]["target"]
        lines += ["## Factorization", "",
                  f"Target `{target['name']}` {target['shape']}, stride {target['stride']}; objective "
                  f"{chains[0]['objective']}, init {chains[0]['init']}, {chains[0]['dtype']}.", ""]
        lines.append(markdown_table(chains, ["chain", "rel_error", "max_abs_error", "psnr_db", "spectral_error",
                                             "output_psnr_db", "params", "macs", "dense_macs", "time_s"]))
        lines += ["", "How sure each result is (restarts run, distinct local minima among those run to "
                  "convergence, how many reached the best, the next-best minimum, why the search stopped):", "",
                  markdown_table([{"chain": e["chain"], **e["evidence"]} for e in chains],
                                 ["chain", "restarts", "refined", "distinct_minima", "best_hits", "independent_hits",
                                  "runner_up", "stopped"]), ""]
        lines += [f"**{e['chain']}**: {e['evidence']['warning']}" for e in chains if e["evidence"]["warning"]]
        lines.append("")
        for i, entry in enumerate(chains):
            if entry["baselines"]:
                rows = [{"method": "jfactor", "rel_error": entry["rel_error"], "time_s": entry["time_s"]}]
                rows += [{"method": name, **value} for name, value in entry["baselines"].items()]
                lines += [f"### Baselines, chain {entry['chain']}", "",
                          markdown_table(rows, ["method", "rel_error", "time_s", "note"]), ""]
            lines += [*(f"![{name}](chain{i}_{name}.png)" for name in PLOTS), ""] if config["plots"] else []
        if config["plots"] and len(chains) > 1:
            lines += ["![error vs cost](error_vs_macs.png)", ""]
    lines += ["Relative error is |approx - target|_F / |target|_F; spectral error is the worst-case "
              "frequency-response error relative to max |T(w)|; output PSNR is measured on filtered "
              "image crops (valid positions).", ""]
    return "\n".join(lines)


def _has_results(directory: Path) -> bool:
    """Whether a run directory holds a finished chain's or fold's output (not only its config.yaml)."""
    return any(directory.glob("chain*_factors.npz")) or (directory / "folded_kernel.npy").exists()


def run(config: ExperimentConfig, base: Path, source: str, runs_dir="runs", *, progress: bool = True) -> Path:
    """Plan (fail fast), create a fresh run directory, execute; returns the directory.

    A run that raises removes its directory; a killed one leaves it without ``results.json``,
    and so does Ctrl-C once a chain has finished (:class:`jfactor.rundir.Interrupted`).
    """
    the_plan = plan(config, base, source)
    with rundir.output_dir(None, runs_dir, config.name, finished=_has_results) as directory:
        execute(the_plan, directory, progress=progress)
    return directory
