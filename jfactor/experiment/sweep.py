"""Sweeps: a grid (product) and zipped lists over config keys, run in one process.

The sweep directory is named by the config's content (``sweep-<name>-<hash>``), so calling
``jfactor sweep`` again with the same config finds it and resumes: every finished cell
has a ``results.json`` (written atomically, last), unfinished cell directories are
cleared and rerun.  ``table.csv`` has one row per cell and chain, one column per swept
key and per metric; times are measurements and are the only columns that differ
between an interrupted and an uninterrupted sweep.  One process means one compilation
per geometry, shared by all cells.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import shutil
from pathlib import Path

from jfactor import rundir
from jfactor.errors import ConfigError
from jfactor.experiment.config import ExperimentConfig, set_path
from jfactor.experiment.run import execute, plan
from jfactor.progress import ProgressBar
from jfactor.schema import validate

METRICS = ("rel_error", "max_abs_error", "psnr_db", "spectral_error", "output_psnr_db", "params", "macs",
           "dense_macs", "time_s", "compile_s")
EVIDENCE = ("restarts", "distinct_minima", "best_hits", "independent_hits", "runner_up", "stopped")  # how sure


def cells(raw: dict) -> tuple[list[str], list[dict]]:
    """(swept keys, one {key: value} per cell): grid product times the zipped lists."""
    sweep = raw.get("sweep") or {}
    grid, zipped = sweep.get("grid") or {}, sweep.get("zip") or {}
    keys = list(grid) + list(zipped)
    grid_values = list(itertools.product(*grid.values())) if grid else [()]
    zip_values = list(zip(*zipped.values())) if zipped else [()]
    combos = [dict(zip(keys, g + z)) for g in grid_values for z in zip_values]
    return keys, combos


def _cell_config(raw: dict, assignment: dict, source: str, index: int) -> dict:
    data = {k: v for k, v in raw.items() if k != "sweep"}
    for key, value in assignment.items():
        try:
            data = set_path(data, key, value)
        except ConfigError as exc:
            raise ConfigError(f"{source}: sweep key {exc}") from None
    data["name"] = f"{raw.get('name', 'experiment')}-{index:03d}"
    return data


def sweep_dir(runs_dir, raw: dict) -> Path:
    digest = hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return Path(runs_dir) / f"sweep-{raw.get('name', 'experiment')}-{digest}"


def _label(value) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def run_sweep(config: ExperimentConfig, raw: dict, base: Path, source: str, runs_dir="runs", *,
              progress: bool = True) -> Path:
    """Run (or resume) every cell; write table.csv and summary.png; return the sweep directory."""
    if config.sweep is None or not (config.sweep.grid or config.sweep.zip):
        raise ConfigError(f"{source}: sweep needs a `sweep:` block with grid and/or zip lists")
    keys, assignments = cells(raw)
    if config.tiny:  # smoke run: the first and last cells exercise the grid at a fraction of the cost
        assignments = list(dict.fromkeys(map(json.dumps, [assignments[0], assignments[-1]])))
        assignments = [json.loads(a) for a in assignments]
    cell_configs = []
    for i, assignment in enumerate(assignments):  # validate and plan every cell before computing any
        data = _cell_config(raw, assignment, source, i)
        cell = validate(ExperimentConfig, data, f"{source} (sweep cell {i}: {assignment})")
        cell_configs.append((assignment, plan(cell, base, f"{source} (sweep cell {i})")))
    directory = rundir.writable_dir(sweep_dir(runs_dir, raw))
    rundir.write_json(directory / "sweep.json", {"source": source, "keys": keys, "cells": assignments})
    bar = ProgressBar(progress, len(cell_configs), f"sweep {config.name}")
    rows = []
    with bar:
        for i, (assignment, the_plan) in enumerate(cell_configs):
            cell_dir = directory / "cells" / f"{i:03d}"
            results_file = cell_dir / "results.json"
            if not results_file.exists():
                if cell_dir.exists():
                    shutil.rmtree(cell_dir)  # an interrupted cell: start it again
                cell_dir.mkdir(parents=True)
                execute(the_plan, cell_dir, progress=False)
            payload = json.loads(results_file.read_text())
            for entry in payload["results"]:
                if "chain" not in entry:
                    continue
                row = {"cell": i, **{k: _label(assignment[k]) for k in keys}, "chain": entry["chain"]}
                row.update({m: entry[m] for m in METRICS})
                row.update({k: entry["evidence"][k] for k in EVIDENCE})
                for name, value in entry["baselines"].items():
                    row[f"{name}.rel_error"] = value["rel_error"]
                rows.append(row)
            bar.advance()
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
