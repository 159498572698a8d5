"""Sweeps that are never stale, shared safely by concurrent runs, and split over processes."""

import csv
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

SMALL = {
    "name": "small", "seed": 0,
    "chain": {"sizes": [3, 3]},
    "restarts": 2, "baselines": ["svd"], "plots": False,
    "solver": {"optimizer": "none", "refine_steps": 30, "chunk": 10},
}


def _sweep(config: Path, runs: Path, *extra, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "jfactor", "sweep", str(config), "--runs-dir", str(runs),
                             "--quiet", *extra], capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def _table(directory: Path, drop=("time_s", "compile_s")) -> list[dict]:
    with open(directory / "table.csv") as handle:
        return [{k: v for k, v in row.items() if k not in drop and not k.endswith("time_s")}
                for row in csv.DictReader(handle)]


def _directory(result) -> Path:
    return Path(result.stdout.strip().splitlines()[-1])


def _file_target_config(tmp_path) -> Path:
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({**SMALL, "target": {"file": "target.npy"},
                                      "sweep": {"grid": {"seed": [0, 1]}}}))
    return config


def test_a_changed_target_file_reruns_the_cells_that_read_it(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "target.npy", rng.standard_normal((5, 5)))  # not a 3x3 chain: error well above 0
    config = _file_target_config(tmp_path)
    first = _sweep(config, tmp_path / "runs")
    assert all(float(row["rel_error"]) > 1e-3 for row in _table(_directory(first)))

    a, b = rng.standard_normal(3), rng.standard_normal(3)
    separable = np.outer(np.convolve(a, b), np.convolve(b, a))  # exactly a chain of two 3x3
    np.save(tmp_path / "target.npy", separable)
    second = _sweep(config, tmp_path / "runs")
    assert _directory(second) == _directory(first)  # same config text: same sweep directory, resumed
    assert "target.npy" in second.stderr and "computing the cell again" in second.stderr
    assert "reused" not in second.stderr  # both cells read the changed file
    assert all(float(row["rel_error"]) < 1e-10 for row in _table(_directory(second)))
    third = _sweep(config, tmp_path / "runs")  # nothing changed: the cells are reused, and it says so
    assert f"sweep: 2 of 2 cells were finished with the same inputs in {_directory(first)}" in third.stderr
    assert _table(_directory(third)) == _table(_directory(second))


def test_a_cell_computed_by_other_versions_or_defaults_is_computed_again(tmp_path):
    """A cell's inputs are its resolved config (a default spelt out hashes as left out, so a changed
    default is a changed input) and the versions that computed it; before, the config as written
    and no versions, so a sweep resumed after an upgrade reused the old numbers."""
    from jfactor.experiment.config import ExperimentConfig
    from jfactor.experiment.sweep import cell_inputs
    from jfactor.schema import validate

    def inputs(data):
        return cell_inputs(validate(ExperimentConfig, data, "test"), data, tmp_path)

    small = {**SMALL, "target": {"family": "gaussian", "size": 5}}
    spelt = {**small, "solver": {**small["solver"], "steps": 200, "schedule": "cosine"}}
    assert inputs(spelt) == inputs(small) != inputs({**spelt, "solver": {**spelt["solver"], "steps": 201}})
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({**small, "sweep": {"grid": {"seed": [0, 1]}}}))
    first = _sweep(config, tmp_path / "runs")
    results = _directory(first) / "cells" / "000" / "results.json"
    payload = json.loads(results.read_text())
    jax_version = payload["sweep_cell"]["inputs"]["versions"]["jax"]
    payload["sweep_cell"]["inputs"]["versions"]["jax"] = "0.0.1"
    results.write_text(json.dumps(payload))
    second = _sweep(config, tmp_path / "runs")
    assert f"sweep cell 0 ({{'seed': 0}}): it was computed with other versions (jax 0.0.1 -> {jax_version}); " \
           "computing the cell again" in second.stderr
    assert "1 of 2 cells were finished with the same inputs" in second.stderr
    assert json.loads(results.read_text())["sweep_cell"]["inputs"]["versions"]["jax"] == jax_version


def _truncate(cell: Path) -> str:
    results = cell / "results.json"
    results.write_text(results.read_text()[:100])  # as by a full disk
    return "cells/001/results.json is unreadable"


def _lose_a_file(cell: Path) -> str:
    # before: "2 of 4 cells were finished ... reused", and chain0_factors.npz never came back
    assert "chain0_factors.npz" in json.loads((cell / "results.json").read_text())["files"]
    (cell / "chain0_factors.npz").unlink()
    return f"chain0_factors.npz of {cell} missing; computing the cell again"


@pytest.mark.parametrize("damage", [_truncate, _lose_a_file])
def test_a_damaged_cell_is_recomputed_with_a_warning(tmp_path, damage):
    np.save(tmp_path / "target.npy", np.random.default_rng(1).standard_normal((5, 5)))
    config = _file_target_config(tmp_path)
    first = _sweep(config, tmp_path / "runs")
    reference = _table(_directory(first))
    cell = _directory(first) / "cells" / "001"
    warning = damage(cell)
    second = _sweep(config, tmp_path / "runs")
    assert warning in second.stderr
    assert _table(_directory(second)) == reference
    json.loads((cell / "results.json").read_text())
    assert (cell / "chain0_factors.npz").is_file()


def test_one_config_text_beside_other_files_is_another_sweep(tmp_path):
    # before: both wrote sweep-<name>-<one hash>, each replacing the other's finished cells
    directories = []
    for folder, seed in (("a", 1), ("b", 2)):
        (tmp_path / folder).mkdir()
        np.save(tmp_path / folder / "target.npy", np.random.default_rng(seed).standard_normal((5, 5)))
        directories.append(_directory(_sweep(_file_target_config(tmp_path / folder), tmp_path / "runs")))
    assert directories[0] != directories[1]
    assert (tmp_path / "a" / "sweep.yaml").read_text() == (tmp_path / "b" / "sweep.yaml").read_text()
    again = _sweep(_file_target_config(tmp_path / "a"), tmp_path / "runs")
    assert _directory(again) == directories[0] and "computing the cell again" not in again.stderr


def test_a_cell_that_fails_as_work_is_named_in_the_error(tmp_path):
    # before: "error: gaussian5: chain 3x3 -> 3x3 ... needs about ... MB", with no word of the cell or its restarts
    import os

    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({**SMALL, "target": {"family": "gaussian", "size": 5},
                                      "sweep": {"grid": {"restarts": [2, 2_000_000]}}}))
    result = subprocess.run([sys.executable, "-m", "jfactor", "sweep", str(config), "--runs-dir", str(tmp_path / "r"),
                             "--quiet"], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "JFACTOR_MEMORY_BUDGET_GB": "0.1"})
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"error: {config} (sweep cell 1: {{'restarts': 2000000}}): gaussian5: " in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def _grid_config(tmp_path, cells: int = 6) -> Path:
    config = tmp_path / "grid.yaml"
    sigmas = [round(0.8 + 0.15 * i, 2) for i in range(cells)]
    config.write_text(yaml.safe_dump({**SMALL, "target": {"family": "gaussian", "size": 5, "params": {"sigma": 1.0}},
                                      "sweep": {"grid": {"target.params.sigma": sigmas}}}))
    return config


def _start(config: Path, runs: Path, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jfactor", "sweep", str(config), "--runs-dir", str(runs),
                             "--quiet", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_sweeps_of_one_config_started_together_share_the_cells(tmp_path):
    config = _grid_config(tmp_path)
    reference = _table(_directory(_sweep(config, tmp_path / "alone")))
    runs = tmp_path / "shared"
    both = [_start(config, runs) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in both]
    for process, (out, err) in zip(both, outputs):
        assert process.returncode == 0, err[-3000:]
    directory = Path(outputs[0][0].strip().splitlines()[-1])
    assert _table(directory) == reference
    for out, _ in outputs:
        assert Path(out.strip().splitlines()[-1]) == directory


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_sweep_split_over_two_processes_gives_the_single_process_table(tmp_path):
    config = _grid_config(tmp_path)
    reference = _table(_directory(_sweep(config, tmp_path / "alone")))
    runs = tmp_path / "split"
    address = f"127.0.0.1:{_free_port()}"
    processes = [_start(config, runs, "--coordinator", address, "--num-processes", "2", "--process-id", str(i))
                 for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in processes]
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-3000:]
    directory = Path(outputs[0][0].strip().splitlines()[-1])
    assert _table(directory) == reference
    computed_by = [json.loads((directory / "cells" / f"{i:03d}" / "results.json").read_text())["sweep_cell"]
                   for i in range(len(reference))]
    assert {c["process"] for c in computed_by} == {0, 1}
    assert all(c["num_processes"] == 2 for c in computed_by)
    assert [c["process"] for c in computed_by] == [i % 2 for i in range(len(reference))]
    assert "reused" not in outputs[0][1]  # before: process 1's cells of this run read as reused from an earlier one


def test_processes_started_with_different_configs_are_told_so(tmp_path):
    # before: both ended with jax's AssertionError "sync_global_devices name mismatch" and a traceback
    config = _grid_config(tmp_path, cells=2)
    address = f"127.0.0.1:{_free_port()}"
    processes = [_start(config, tmp_path / "runs", "--coordinator", address, "--num-processes", "2", "--process-id",
                        str(i), *(["--set", "seed=1"] if i else [])) for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in processes]
    for process, (_, err) in zip(processes, outputs):
        assert process.returncode == 2, err[-3000:]
        assert "processes reached different barriers" in err and "the same config and --set values" in err
        assert "Traceback" not in err


def test_process_flags_go_together_and_are_checked(tmp_path):
    config = _grid_config(tmp_path, cells=2)
    for extra, named in ((["--num-processes", "2"], "--coordinator"),
                         (["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"],
                          "--process-id"),
                         (["--coordinator", "nohost", "--num-processes", "2", "--process-id", "0"], "--coordinator")):
        result = _sweep(config, tmp_path / "runs", *extra, check=False)
        assert result.returncode == 2, result.stderr
        assert named in result.stderr and "Traceback" not in result.stderr


def test_a_running_cell_is_never_deleted_and_is_waited_for(tmp_path):
    """Another process holds cell 0 (its lock, a half-written directory): the sweep computes
    the other cells, leaves cell 0 alone while it is held, and computes it once released."""
    from filelock import FileLock

    from jfactor.experiment.sweep import sweep_dir

    config = _grid_config(tmp_path, cells=3)
    runs = tmp_path / "runs"
    directory = sweep_dir(runs, yaml.safe_load(config.read_text()), config.parent)
    (directory / "cells" / "000").mkdir(parents=True)
    partial = directory / "cells" / "000" / "partial.npy"
    partial.write_text("being written by another process")
    lock = FileLock(directory / "cells" / "000.lock")
    lock.acquire()
    process = _start(config, runs)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not all((directory / "cells" / f"{i:03d}" / "results.json").exists()
                                                  for i in (1, 2)):
            time.sleep(0.1)
        time.sleep(1.0)
        assert process.poll() is None, "the sweep must wait for the running cell"
        assert partial.exists(), "the running cell's files were deleted"
    finally:
        lock.release()
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    assert len(_table(directory)) == 3
    assert json.loads((directory / "cells" / "000" / "results.json").read_text())["sweep_cell"]["index"] == 0


@pytest.mark.parametrize("name,stem", [("../../outside", "sweep-..-..-outside-"), ("a/b", "sweep-a-b-"),
                                       ("a\0b", "sweep-a-b-"), ("plain_name.v2", "sweep-plain_name.v2-"),
                                       ("y" * 300, "sweep-" + "y" * 100 + "-")])  # before: File name too long
def test_a_sweeps_directory_stays_one_folder_under_runs_dir_whatever_its_name(tmp_path, name, stem):
    from jfactor.experiment.sweep import sweep_dir

    directory = sweep_dir(tmp_path, {"name": name}, tmp_path)
    assert directory.parent == tmp_path and directory.name.startswith(stem)
    directory.mkdir()  # a NUL byte would make this raise


def test_a_cell_computed_by_an_edited_jfactor_is_computed_again(tmp_path):
    """jfactor's recorded version carries a digest of its source: before, it was the fixed
    ``__version__``, so an edited jfactor whose defaults were the same reused the old numbers."""
    import jfactor

    copy = tmp_path / "edited" / "jfactor"
    shutil.copytree(Path(jfactor.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / "factorize" / "solve.py", "a") as handle:
        handle.write("\n# an edit that changes no default\n")
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({**SMALL, "target": {"family": "gaussian", "size": 5},
                                      "sweep": {"grid": {"seed": [0]}}}))
    first = _sweep(config, tmp_path / "runs")
    recorded = json.loads((_directory(first) / "cells" / "000" / "results.json").read_text())
    version = recorded["sweep_cell"]["inputs"]["versions"]["jfactor"]
    assert version.startswith(f"{jfactor.__version__}+")
    edited = subprocess.run([sys.executable, "-m", "jfactor", "sweep", str(config), "--runs-dir",
                             str(tmp_path / "runs"), "--quiet"], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(copy.parent)}, cwd=tmp_path)  # not the repo's
    assert edited.returncode == 0, edited.stderr[-3000:]
    moved = re.search(r"it was computed with other versions \(jfactor (\S+) -> (\S+)\); computing the cell again",
                      edited.stderr)
    assert moved is not None, edited.stderr[-3000:]
    assert moved[1] == version != moved[2]
    assert _sweep(config, tmp_path / "runs").stderr.count("computing the cell again") == 1  # back to the original
