"""Sweeps: a grid (product) and zipped lists over config keys, run by one or several processes.

The sweep directory is named by the config's content and the paths of the files it names
(``sweep-<name>-<hash>``), so calling ``jfactor sweep`` again with the same config finds it
and resumes.  Each cell runs under
its own file lock (``cells/<i>.lock``), so sweeps of one config started together, or
the processes of a multi-process sweep, share the cells and never touch one another's
running cell.  A cell is done when its ``results.json`` (written atomically, last) is
readable, records the same inputs (the cell's resolved config, the versions that compute it, and the content hash of
every file it references: targets, weights, stacks, and the files those reference), and
every file it lists is still beside it.  A cell whose inputs changed, whose files are not
all there, or whose ``results.json`` is unreadable, is computed again with a warning
naming the cause; a killed cell (no ``results.json``) is simply rerun.

``table.csv`` has one row per cell and chain, one column per swept key and per metric (the
evidence's restart count as ``restarts_run``: a swept ``restarts`` keeps its own column);
times are measurements and are the only columns that differ between an interrupted and
an uninterrupted sweep.  With several processes (:mod:`jfactor.experiment.processes`),
process ``p`` of ``n`` computes the cells ``c`` with ``c % n == p`` and records its index
in each ``results.json``; process 0 writes the table once every cell is done.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import io
import itertools
import json
import shutil
import socket
import sys
from pathlib import Path

from filelock import FileLock, Timeout

from jfactor import rundir
from jfactor.cache import source_digest
from jfactor.errors import ConfigError, JFactorError
from jfactor.experiment.config import ExperimentConfig, overrides_of, set_path
from jfactor.experiment.processes import Processes
from jfactor.experiment.run import execute, plan
from jfactor.progress import ProgressBar
from jfactor.schema import validate

METRICS = ("rel_error", "max_abs_error", "psnr_db", "spectral_error", "output_psnr_db", "params", "macs",
           "dense_macs", "time_s", "compile_s")
# how sure each result is, as table.csv names it: the restarts run are `restarts_run`, so that a swept
# `restarts` (the config's restart count) keeps its own column; `best_error` beside `runner_up`, in its
# units (the objective's own error: for `images`, the outputs', not the kernel's `rel_error`)
EVIDENCE = {"restarts_run": "restarts", "distinct_minima": "distinct_minima", "best_hits": "best_hits",
            "independent_hits": "independent_hits", "best_error": "best_error", "runner_up": "runner_up",
            "stopped": "stopped"}


def swept_keys(raw: dict) -> list[str]:
    """The keys a sweep sets in every cell: its grid's, then its zipped lists'."""
    sweep = raw.get("sweep") or {}
    return list(sweep.get("grid") or {}) + list(sweep.get("zip") or {})


def cells(raw: dict) -> tuple[list[str], list[dict]]:
    """(swept keys, one {key: value} per cell): grid product times the zipped lists."""
    sweep = raw.get("sweep") or {}
    grid, zipped = sweep.get("grid") or {}, sweep.get("zip") or {}
    keys = swept_keys(raw)
    grid_values = list(itertools.product(*grid.values())) if grid else [()]
    zip_values = list(zip(*zipped.values())) if zipped else [()]
    combos = [dict(zip(keys, g + z)) for g in grid_values for z in zip_values]
    return keys, combos


def check_overrides(raw: dict, overrides: list[str], source: str) -> None:
    """Refuse a ``--set`` of a key that every cell sets again: a swept key or one below it."""
    swept = swept_keys(raw)
    for key, _ in overrides_of(overrides):
        covering = [s for s in swept if key == s or key.startswith(s + ".")]
        if covering:
            raise ConfigError(f"{source}: --set {key}: the sweep sets {covering[0]} in every cell, so this would "
                              f"change nothing; change its values in the sweep block instead")


def _cell_config(raw: dict, assignment: dict, source: str, index: int) -> dict:
    data = {k: v for k, v in raw.items() if k != "sweep"}
    # shallower keys first: a swept `chain` is set before a swept `chain.channels` goes into it
    for key, value in sorted(assignment.items(), key=lambda item: item[0].count(".")):
        try:
            data = set_path(data, key, value)
        except ConfigError as exc:
            raise ConfigError(f"{source}: sweep key {exc}") from None
    data["name"] = f"{raw.get('name', 'experiment')}-{index:03d}"
    return data


def sweep_dir(runs_dir, raw: dict, base: Path) -> Path:
    """``runs_dir/sweep-<name>-<hash>``, the hash of the config and of where the files it names are
    (``base``: the config's directory), not of what they hold: one config text beside other files
    is another sweep, and a changed file is a changed input of the same sweep's cells."""
    where = sorted(_file_paths(raw, Path(base), {}))
    digest = hashlib.sha256(json.dumps([raw, where], sort_keys=True, default=str).encode()).hexdigest()[:10]
    return Path(runs_dir) / f"sweep-{rundir.slug(str(raw.get('name', 'experiment')))}-{digest}"


def _label(value) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _file_paths(data, base: Path, found: dict) -> dict:
    """``{resolved path: path}`` of every existing file a config mapping names (recursively into
    the YAML files it names, relative to each file's directory), in the order met."""
    if isinstance(data, dict):
        for value in data.values():
            _file_paths(value, base, found)
    elif isinstance(data, list):
        for value in data:
            _file_paths(value, base, found)
    elif isinstance(data, str) and len(data) < 4096:
        path = Path(data) if Path(data).is_absolute() else base / data
        try:
            is_file = path.is_file()
        except OSError:
            is_file = False
        key = str(path.resolve()) if is_file else None
        if key is not None and key not in found:
            found[key] = path
            if path.suffix in (".yaml", ".yml"):
                import yaml

                try:
                    _file_paths(yaml.safe_load(path.read_text()), path.parent, found)
                except yaml.YAMLError:
                    pass  # the cell's own validation reports it
    return found


def _files(data, base: Path) -> dict:
    """``{resolved path: sha256}`` of every file :func:`_file_paths` finds."""
    return {key: hashlib.sha256(path.read_bytes()).hexdigest() for key, path in _file_paths(data, base, {}).items()}


COMPUTED_BY = ("jfactor", "jax", "jaxlib", "optax", "numpy", "scipy")  # the packages a cell's numbers come from


SOURCE_DIGITS = 12  # of jfactor's source digest in its recorded version


def _version(name: str) -> str:
    """``name``'s version; jfactor's own is the code that runs, installed or not: its version and
    a digest of its source (``0.1.0+3f2a...``), so an edited jfactor computes the cells again."""
    if name == "jfactor":
        import jfactor

        return f"{jfactor.__version__}+{source_digest()[:SOURCE_DIGITS]}"
    return importlib.metadata.version(name)


def cell_inputs(cell: ExperimentConfig, data: dict, base: Path) -> dict:
    """What a cell's result depends on: its resolved config (every default filled in, so a changed
    default is a changed input), the versions of :data:`COMPUTED_BY`, and the hash of every file
    its config mapping ``data`` names."""
    text = json.dumps(cell.model_dump(mode="json"), sort_keys=True)
    return {"config": hashlib.sha256(text.encode()).hexdigest(),
            "versions": {name: _version(name) for name in COMPUTED_BY},
            "files": _files(data, base)}


def _changes(old: dict, new: dict) -> str:
    if old.get("config") != new["config"]:
        return "its config changed (or its defaults, or it was recorded by an older jfactor)"
    versions = old.get("versions", {})
    if versions != new["versions"]:
        moved = [f"{name} {versions.get(name)} -> {new['versions'][name]}" for name in COMPUTED_BY
                 if versions.get(name) != new["versions"][name]]
        return f"it was computed with other versions ({', '.join(moved)})"
    files = old.get("files", {})
    changed = [p for p in new["files"] if files.get(p) != new["files"][p]] + [p for p in files if p not in new["files"]]
    return "changed since it was computed: " + ", ".join(changed)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _finished(results_file: Path, inputs: dict, label: str) -> dict | None:
    """The cell's results if it finished with these inputs; None (with a warning when a
    result is there but unusable) if it has to be computed."""
    if not results_file.exists():
        return None
    try:
        payload = json.loads(results_file.read_text())
    except (OSError, ValueError) as exc:
        _warn(f"{label}: {results_file} is unreadable ({type(exc).__name__}: {exc}); computing the cell again")
        return None
    recorded = payload.get("sweep_cell", {}).get("inputs") if isinstance(payload, dict) else None
    if recorded is None:
        _warn(f"{label}: {results_file} records no inputs (an older or foreign result); computing the cell again")
        return None
    if recorded != inputs:
        _warn(f"{label}: {_changes(recorded, inputs)}; computing the cell again")
        return None
    missing = [name for name in payload.get("files", []) if not (results_file.parent / name).is_file()]
    if missing:
        _warn(f"{label}: {', '.join(missing)} of {results_file.parent} missing; computing the cell again")
        return None
    return payload


def _cell_dir(directory: Path, index: int) -> Path:
    return directory / "cells" / f"{index:03d}"


def _cell_results(directory: Path, index: int) -> Path:
    """The cell's ``results.json``, written last: the cell is done when it is there."""
    return _cell_dir(directory, index) / "results.json"


def _written(path: Path) -> int | None:
    """When ``path`` was last written (ns; None: it is not there)."""
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def _compute(cell: dict, directory: Path, processes: Processes) -> dict:
    """Run one cell (its lock held) into a clean directory; return its results."""
    cell_dir = _cell_dir(directory, cell["index"])
    if cell_dir.exists():
        shutil.rmtree(cell_dir)  # an interrupted, corrupt or stale cell: start it again
    cell_dir.mkdir(parents=True)
    record = {"index": cell["index"], "process": processes.index, "num_processes": processes.count,
              "host": socket.gethostname(), "inputs": cell["inputs"]}
    try:
        return execute(cell["plan"], cell_dir, progress=False, extra={"sweep_cell": record})
    except JFactorError as exc:  # a cell valid as a config that fails as work (too much memory, say): name it
        raise type(exc)(f"{cell['where']}: {exc}") from None


def _lock(directory: Path, index: int) -> FileLock:
    return FileLock(directory / "cells" / f"{index:03d}.lock")


def _run_cell(cell: dict, directory: Path, processes: Processes, lock: FileLock, *,
              wait: bool) -> tuple[dict | None, bool]:
    """The cell's results, computed here unless finished, and whether they were finished
    before; (None, False) if another process holds its ``lock`` and ``wait`` is False."""
    try:
        lock.acquire(timeout=-1 if wait else 0)
    except Timeout:
        return None, False
    try:
        results = _finished(_cell_results(directory, cell["index"]), cell["inputs"], cell["label"])
        return (results, True) if results is not None else (_compute(cell, directory, processes), False)
    finally:
        lock.release()


def run_sweep(config: ExperimentConfig, raw: dict, base: Path, source: str, runs_dir="runs", *,
              progress: bool = True, processes: Processes | None = None) -> Path:
    """Run (or resume) the cells of this process; process 0 then waits for every cell and
    writes table.csv and summary.png.  Returns the sweep directory."""
    processes = processes or Processes()
    if config.sweep is None or not (config.sweep.grid or config.sweep.zip):
        raise ConfigError(f"{source}: sweep needs a `sweep:` block with grid and/or zip lists")
    if not config.all_chains:
        raise ConfigError(f"{source}: a sweep tabulates factorizations and this config has no chain (a stack alone "
                          f"is only folded): give chain or chains, or fold it with jfactor fold")
    keys, assignments = cells(raw)
    if config.tiny:  # smoke run: the first and last cells exercise the grid at a fraction of the cost
        assignments = list(dict.fromkeys(map(json.dumps, [assignments[0], assignments[-1]])))
        assignments = [json.loads(a) for a in assignments]
    plans = []
    for i, assignment in enumerate(assignments):  # validate and plan every cell before computing any
        data = _cell_config(raw, assignment, source, i)
        where = f"{source} (sweep cell {i}: {assignment})"
        cell = validate(ExperimentConfig, data, where)
        plans.append({"index": i, "assignment": assignment, "plan": plan(cell, base, f"{source} (sweep cell {i})"),
                      "inputs": cell_inputs(cell, data, base), "label": f"sweep cell {i} ({assignment})",
                      "where": where})
    directory = rundir.writable_dir(sweep_dir(runs_dir, raw, base))
    (directory / "cells").mkdir(exist_ok=True)
    rundir.write_json(directory / "sweep.json", {"source": source, "keys": keys, "cells": assignments})

    # the cells it reuses are those whose results.json an earlier run wrote: still the file this run
    # found at its start, not one another process of this run wrote (or rewrote) while it waited
    earlier = {cell["index"]: _written(_cell_results(directory, cell["index"])) for cell in plans}
    mine = [cell for cell in plans if processes.owns(cell["index"])]
    locks = {cell["index"]: _lock(directory, cell["index"]) for cell in plans}
    if processes.count > 1:  # claimed before the barrier: process 0 waits for these rather than taking them
        for cell in mine:
            try:
                locks[cell["index"]].acquire(timeout=0)
            except Timeout:
                pass  # a concurrent sweep of the same config is running it
        processes.barrier(f"jfactor-sweep-{directory.name}-claimed")
    payloads, reused = {}, []
    bar = ProgressBar(progress, len(plans) if processes.index == 0 else len(mine),
                      f"sweep {config.name}" + (f" (process {processes.index}/{processes.count})"
                                                if processes.count > 1 else ""))

    def attempt(cell, wait: bool) -> bool:
        lock = locks[cell["index"]]
        try:
            result, finished = _run_cell(cell, directory, processes, lock, wait=wait)
        finally:
            while lock.is_locked:  # a claim holds it once more
                lock.release()
        if result is not None:
            payloads[cell["index"]] = result
            written = _written(_cell_results(directory, cell["index"]))
            reused.extend([cell["index"]] if finished and written == earlier[cell["index"]] else [])
            bar.advance()
        return result is not None

    with bar:
        # this process's cells, skipping any that a concurrent sweep is running
        busy = [cell for cell in mine if not attempt(cell, wait=False)]
        if processes.index != 0:
            return directory
        others = busy + [cell for cell in plans if not processes.owns(cell["index"])]
        while others:  # free cells first; then wait for one that another process is running
            left = [cell for cell in others if not attempt(cell, wait=False)]
            if len(left) == len(others):
                attempt(left.pop(0), wait=True)
            others = left
    if reused:
        print(f"sweep: {len(reused)} of {len(plans)} cells were finished with the same inputs in {directory} and "
              "are reused, not recomputed (remove that directory to compute them again)", file=sys.stderr)
    rows = []
    for cell in plans:
        for entry in payloads[cell["index"]]["results"]:
            if "chain" not in entry:
                continue
            row = {"cell": cell["index"], **{k: _label(cell["assignment"][k]) for k in keys}, "chain": entry["chain"]}
            row.update({m: entry[m] for m in METRICS})
            row.update({column: entry["evidence"][k] for column, k in EVIDENCE.items()})
            for name, value in entry["baselines"].items():
                row[f"{name}.rel_error"] = value["rel_error"]
            rows.append(row)
    with FileLock(directory / "table.lock"):  # sweeps of one config started together write it in turn
        for name in ("table.csv", "summary.png"):  # a write that a kill cut short left its temp file
            for stale in directory.glob(f".{name}.*.tmp"):
                stale.unlink(missing_ok=True)
        rundir.write_text(directory / "table.csv", _table(rows))
        if rows:
            from jfactor.report import plot_sweep

            plot_sweep(rows, keys, directory / "summary.png")
    return directory


def _table(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()
