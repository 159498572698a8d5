"""Experiments from configs: run directories, sweeps that survive kill -9, fail-fast configs."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from jfactor.cli import app

ROOT = Path(__file__).parent.parent
runner = CliRunner()
SMALL = {
    "name": "small", "seed": 0,
    "target": {"family": "gaussian", "size": 7, "params": {"sigma": 1.2}},
    "chain": {"sizes": [3, 5]},
    "restarts": 2, "baselines": ["svd"], "plots": False,
    "solver": {"optimizer": "none", "refine_steps": 20, "chunk": 10},
}


def _write(tmp_path, data, name="config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def _last_line(output: str) -> Path:
    return Path(output.strip().splitlines()[-1])


def _rows(path: Path, drop=("time_s", "compile_s")) -> list[dict]:
    with open(path) as handle:
        return [{k: v for k, v in row.items() if k not in drop and not k.endswith("time_s")}
                for row in csv.DictReader(handle)]


CONFIGS = sorted(p.relative_to(ROOT) for p in (ROOT / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_every_shipped_config_runs_in_its_tiny_variant(config, tmp_path):
    data = yaml.safe_load((ROOT / config).read_text())
    if "layers" in data:  # a stack config
        result = runner.invoke(app, ["fold", str(ROOT / config), "--out", str(tmp_path / "fold")])
        assert result.exit_code == 0, result.output
        assert (tmp_path / "fold" / "summary.json").exists()
        return
    command = "sweep" if "sweep" in data else "run"
    result = runner.invoke(app, [command, str(ROOT / config), "--runs-dir", str(tmp_path), "--set", "tiny=true",
                                 "--quiet"])
    assert result.exit_code == 0, result.output
    directory = _last_line(result.stdout)
    if command == "sweep":
        assert (directory / "table.csv").exists() and (directory / "summary.png").exists()
        rows = _rows(directory / "table.csv")
        assert len(rows) >= 1
        assert {"restarts_run", "distinct_minima", "best_hits", "runner_up", "stopped"} <= set(rows[0])  # how sure
        for row in rows:  # before: no best_error, so an images objective's runner_up read as below its rel_error
            assert row["runner_up"] == "" or float(row["runner_up"]) >= float(row["best_error"]), row
    else:
        for name in ("config.yaml", "results.json", "metrics.csv", "report.md"):
            assert (directory / name).exists(), name
        chains = [e for e in json.loads((directory / "results.json").read_text())["results"] if "chain" in e]
        assert all(e["evidence"]["restarts"] >= 1 for e in chains)
        if chains:
            assert "How sure each result is" in (directory / "report.md").read_text()
        if data.get("plots", True):
            assert list(directory.glob("*.png"))


def test_run_directory_holds_everything_and_is_never_reused(tmp_path):
    config = _write(tmp_path, {**SMALL, "plots": True})
    first = runner.invoke(app, ["run", str(config), "--runs-dir", str(tmp_path / "runs"), "--quiet"])
    second = runner.invoke(app, ["run", str(config), "--runs-dir", str(tmp_path / "runs"), "--quiet"])
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    a, b = _last_line(first.stdout), _last_line(second.stdout)
    assert a != b and a.parent == b.parent
    payload = json.loads((a / "results.json").read_text())
    for key in ("jax", "optax", "flax", "numpy", "device"):
        assert payload["environment"][key]
    result = payload["results"][0]
    assert result["rel_error"] < 1e-10  # separable Gaussian, 3 + 5 - 1 = 7
    assert set(result["baselines"]) == {"svd"}
    rows = list(csv.DictReader(open(a / "metrics.csv")))
    assert {"chain_index", "chain", "method", "metric", "value"} == set(rows[0])
    assert {r["method"] for r in rows} == {"jfactor", "svd"}
    report = (a / "report.md").read_text()
    assert "3x3 -> 5x5" in report and "chain0_kernels.png" in report and "chain0_search.png" in report
    for name in ("chain0_kernels.png", "chain0_spectrum.png", "chain0_loss.png", "chain0_search.png",
                 "chain0_factors.npz", "chain0_approx.npy", "config.yaml"):
        assert (a / name).exists(), name
    assert yaml.safe_load((a / "config.yaml").read_text())["restarts"] == 2
    # same config and seed, same numbers
    again = json.loads((b / "results.json").read_text())["results"][0]
    assert again["rel_error"] == result["rel_error"] and again["restart_errors"] == result["restart_errors"]


def test_set_overrides_any_key(tmp_path):
    config = _write(tmp_path, SMALL)
    result = runner.invoke(app, ["run", str(config), "--runs-dir", str(tmp_path), "--quiet",
                                 "--set", "target.family=box", "--set", "target.params={}",
                                 "--set", "chain.sizes=[5, 3]",
                                 "--set", "restarts=3"])
    assert result.exit_code == 0, result.output
    payload = json.loads((_last_line(result.stdout) / "results.json").read_text())
    assert payload["config"]["target"]["family"] == "box" and payload["config"]["restarts"] == 3
    assert payload["results"][0]["chain"].startswith("5x5 -> 3x3")


@pytest.mark.parametrize("change,message", [
    ({"restart": 3}, r"unknown key 'restart'; did you mean 'restarts'\?"),
    ({"restarts": "many"}, r"restarts: Input should be a valid integer"),
    # a union (an int or a list): the int alternative's complaint alone, not "or a valid list"
    ({"chain": {"sizes": [3, 5], "channels": 0}}, r"chain\.channels: Input should be greater than 0 \(got 0\)$"),
    ({"chain": {"sizes": [3, 5], "channels": "two"}},
     r"chain\.channels: Input should be a valid integer .*; or Input should be a valid list"),
    ({"chain": {"sizes": [3, 3]}}, r"chains\[0\]: chain 3x3 -> 3x3, width 1 covers 5x5 but the target is 7x7"),
    ({"target": {"file": "missing.npy"}}, r"missing\.npy: file not found"),
    ({"target": {"family": "gausian", "size": 7}}, r"unknown kernel family 'gausian'; did you mean 'gaussian'\?"),
    ({"solver": {"optimizer": "sgd"}}, r"solver\.optimizer: Input should be 'adam', 'lbfgs' or 'none'"),
    ({"solver": {"hessian": "newton"}}, r"solver\.hessian: Input should be 'gauss-newton' or 'full'"),
    ({"solver": {"hessian": "full"}, "objective": "spectral"}, r"solver\.hessian full .* needs objective kernel"),
    ({"target": {"family": "gaussian", "size": 7, "params": {"sigmaa": 1}}}, r"did you mean 'sigma'\?"),
    ({"target": {"family": "gaussian", "size": 7, "params": {"sigma": -1}}}, r"target: .*sigma must be a positive"),
    ({"target": {"family": "disk", "size": 7, "params": {"radius": 0}}}, r"radius must be a positive number, got 0"),
    ({"target": {"family": "gaussian", "size": 7, "params": {"ndim": 2.5}}}, r"ndim must be 1, 2 or 3, got 2\.5"),
    ({"target": {"family": "gaussian", "size": 7, "key": "k"}}, r"target: key does not apply to a family target"),
    ({"objective": {"name": "images", "images": ["camera"], "image_size": 4}},
     r"objective\.image_size 4 is smaller than chains\[0\]'s extent \(7, 7\): give at least 7"),
    ({"target": {"file": "t.npy", "size": 7}}, r"target: size does not apply to a file target \(only to family\)"),
    ({"target": {"values": [[1.0]], "params": {"sigma": 1}}}, r"target: params does not apply to a values target"),
    ({"target": {"stack": "s.yaml", "stride": 2}}, r"target: stride does not apply to a stack target"),
    ({"target": {"stack": "s.yaml", "stride": [1, 1]}, "chain": {"sizes": [3, 3], "dilations": [0, 1]}},
     r"chain\.dilations\[0\]: Input should be greater than 0"),  # stride [1, 1] on a stack: its default, taken
    ({"target": {"family": "gaussian", "size": 7, "params": {"sigma": 1e-1}}, "baselines": ["svd", "svd"]},
     r"baselines: svd given twice"),
])
def test_bad_configs_fail_before_any_compute_with_one_message(change, message, tmp_path):
    config = _write(tmp_path, {**SMALL, **change})
    started = time.perf_counter()
    result = runner.invoke(app, ["run", str(config), "--runs-dir", str(tmp_path / "r")])
    assert result.exit_code == 2, result.output
    assert re.search(message, result.output), result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())
    assert time.perf_counter() - started < 10


def test_unwritable_runs_dir_fails_before_compute(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    config = _write(tmp_path, SMALL)
    result = runner.invoke(app, ["run", str(config), "--runs-dir", str(blocker / "runs")])
    assert result.exit_code == 2
    assert "file: is a file, so the output directory" in result.output
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if not os.access(locked, os.W_OK):  # root writes anywhere
        result = runner.invoke(app, ["run", str(config), "--runs-dir", str(locked / "runs")])
        assert result.exit_code == 2 and "output directory is not writable" in result.output


CELLS = 12  # enough that the kill, polled every 20 ms after the second cell, lands mid-sweep


def _sweep_config(tmp_path) -> Path:
    sigmas = [round(0.8 + 0.1 * i, 1) for i in range(CELLS)]
    return _write(tmp_path, {**SMALL, "name": "resume", "sweep": {"grid": {"target.params.sigma": sigmas}}},
                  "sweep.yaml")


def test_run_and_factorize_say_that_they_leave_a_sweep_block_alone(tmp_path):
    config = _write(tmp_path, {**SMALL, "sweep": {"grid": {"seed": [0, 1]}}})
    result = runner.invoke(app, ["run", str(config), "--runs-dir", str(tmp_path / "r"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert f"note: {config} has a sweep: block, which jfactor run leaves alone" in result.output
    assert len(list((tmp_path / "r").iterdir())) == 1  # one run, the config as it stands
    result = runner.invoke(app, ["factorize", str(config), "--out", str(tmp_path / "f"), "--json"])
    assert result.exit_code == 0, result.output
    assert f"note: {config} has a sweep: block, which jfactor factorize leaves alone" in result.output


@pytest.mark.parametrize("change,message", [
    ({"sweep": {"grid": {"name": ["a", "b"]}}}, r"name: the sweep's cells are named after it"),
    ({"sweep": {"grid": {"seed": [0, 1, 0]}}}, r"sweep: grid seed: 0 given twice \(the same cell twice\)"),
    ({"sweep": {"zip": {"seed": [0, 0], "init": ["svd", "svd"]}}}, r'sweep: zip init and seed: \["svd", 0\] given'),
    ({"target": None, "stack": "s.yaml", "chain": None, "sweep": {"grid": {"seed": [0, 1]}}},
     r"a sweep tabulates factorizations and this config has no chain"),
    # before: refused only when its cell ran, after the cells before it
    ({"sweep": {"grid": {"solver.refine": ["lm", "none"]}}}, r"sweep cell 1\): solver: nothing would optimise"),
])
def test_sweeps_that_would_tabulate_nothing_new_are_refused(change, message, tmp_path):
    # before: a swept name ran identical cells, a repeated value ran a cell twice, and a fold-only
    # sweep wrote an empty table.csv (and no summary.png) with exit code 0
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"input_shape": [8, 8, 1], "layers": [
        {"conv": {"kernel_size": 3, "filters": 1}}]}))
    data = {k: v for k, v in {**SMALL, **change}.items() if v is not None}
    config = _write(tmp_path, data)
    result = runner.invoke(app, ["sweep", str(config), "--runs-dir", str(tmp_path / "r"), "--quiet"])
    assert result.exit_code == 2, result.output
    assert re.search(message, result.output), result.output
    assert not (tmp_path / "r").exists()


def test_a_swept_restart_count_keeps_its_column_beside_the_restarts_run(tmp_path):
    # before: the evidence's restarts (512 for the adaptive search) overwrote the swept value (null)
    config = _write(tmp_path, {**SMALL, "chain": [3, 5], "solver": {"optimizer": "none", "refine_steps": 10},
                               "sweep": {"grid": {"restarts": [None, 2], "chain.channels": [1, 2]}}})
    result = runner.invoke(app, ["sweep", str(config), "--runs-dir", str(tmp_path / "r"), "--quiet",
                                 "--set", "tiny=true"])
    assert result.exit_code == 0, result.output
    rows = _rows(_last_line(result.stdout) / "table.csv")
    assert [(r["restarts"], r["chain.channels"]) for r in rows] == [("None", "1"), ("2", "2")]  # tiny: first, last
    assert rows[1]["restarts_run"] == "2" and rows[1]["chain"].endswith("width 2")
    assert int(rows[0]["restarts_run"]) >= 1


def test_a_swept_key_goes_into_a_swept_mapping_above_it(tmp_path):
    # before: the zipped `chain` was set after the grid's `chain.channels` and replaced it
    from jfactor.experiment.config import ExperimentConfig
    from jfactor.experiment.sweep import _cell_config, cells
    from jfactor.schema import validate

    raw = {**SMALL, "sweep": {"grid": {"chain.channels": [1, 2]}, "zip": {"chain": [[3, 5], [5, 3]]}}}
    keys, assignments = cells(raw)
    chains = [validate(ExperimentConfig, _cell_config(raw, a, "s.yaml", i), "s.yaml").chain
              for i, a in enumerate(assignments)]
    assert [(c.sizes, c.channels) for c in chains] == [([3, 5], 1), ([5, 3], 1), ([3, 5], 2), ([5, 3], 2)]


def test_a_resumed_sweep_clears_the_temp_files_a_killed_table_write_left(tmp_path):
    config = _write(tmp_path, {**SMALL, "sweep": {"grid": {"seed": [0, 1]}}})
    args = ["sweep", str(config), "--runs-dir", str(tmp_path / "r"), "--quiet", "--set", "tiny=true"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    directory = _last_line(first.stdout)
    stale = [directory / ".summary.png.k1ll3d.tmp", directory / ".table.csv.k1ll3d.tmp"]
    for path in stale:
        path.write_bytes(b"")
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert _last_line(again.stdout) == directory and not any(p.exists() for p in stale)
    assert _rows(directory / "table.csv") and (directory / "summary.png").stat().st_size > 0


def test_a_killed_sweep_resumes_to_the_same_table(tmp_path):
    config = _sweep_config(tmp_path)
    whole = subprocess.run([sys.executable, "-m", "jfactor", "sweep", str(config), "--runs-dir",
                            str(tmp_path / "whole"), "--quiet"], capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    reference = _rows(_last_line(whole.stdout) / "table.csv")
    assert len(reference) == CELLS

    runs = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "jfactor", "sweep", str(config), "--runs-dir", str(runs),
                                "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not list(runs.glob("*/cells/001/results.json")):
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished = list(runs.glob("*/cells/*/results.json"))
    assert 2 <= len(finished) < CELLS, "the kill should land mid-sweep"
    before = {p: p.stat().st_mtime_ns for p in finished}
    resumed = subprocess.run([sys.executable, "-m", "jfactor", "sweep", str(config), "--runs-dir", str(runs),
                              "--quiet"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert _rows(_last_line(resumed.stdout) / "table.csv") == reference
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # finished cells were not rerun


@pytest.mark.parametrize("ndim", [1, 3])
def test_the_images_objective_of_a_config_takes_images_of_the_targets_dimensions(tmp_path, ndim):
    import numpy as np

    from jfactor.experiment.config import load_config
    from jfactor.experiment.run import plan

    np.save(tmp_path / "k.npy", np.ones((5,) * ndim))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"target": {"file": "k.npy"}, "chain": {"sizes": [3, 3]},
                                                     "objective": {"name": "images", "image_size": 12, "crops": 1}}))
    config, _, base = load_config(tmp_path / "c.yaml")
    images = plan(config, base, "c.yaml").images
    assert images.ndim == ndim + 2 and images.shape[1:-1] == (12,) * ndim


@pytest.mark.parametrize("image_size,expected", [(96, 49), (60, 49), (40, None)])
def test_the_tiny_variant_shrinks_images_no_smaller_than_the_chains_kernels(tmp_path, image_size, expected):
    # before: tiny cut every image to 48 pixels, so a config whose chain covers 49x49 ran in full
    # and failed in its smoke run, naming a size (48) the config did not have
    from jfactor.errors import ConfigError
    from jfactor.experiment.config import load_config
    from jfactor.experiment.run import plan

    config = _write(tmp_path, {"target": {"family": "gaussian", "size": 49}, "chain": [17, 33],
                               "objective": {"name": "images", "image_size": image_size, "crops": 1}})
    parsed, _, base = load_config(config, ["tiny=true"])
    if expected is None:  # the config's own size is too small: named as given
        with pytest.raises(ConfigError, match=rf"objective\.image_size {image_size} is smaller than chains\[0\]"):
            plan(parsed, base, str(config))
        return
    planned = plan(parsed, base, str(config))
    assert planned.images.shape[1:-1] == (expected, expected) and planned.config.objective.image_size == expected
    assert planned.config.restarts == 2 and planned.chains[0].describe().startswith("17x17 -> 33x33")


def test_a_chain_may_be_written_as_its_sizes_and_an_objective_as_its_name(tmp_path):
    from jfactor.errors import ConfigError
    from jfactor.experiment.config import load_config

    short, _, _ = load_config(_write(tmp_path, {**SMALL, "chain": [3, 5]}, "short.yaml"))
    full, _, _ = load_config(_write(tmp_path, {**SMALL, "chain": {"sizes": [3, 5]}}, "full.yaml"))
    assert short.chain == full.chain and short.chain.sizes == [3, 5]
    # the keys below a shorthand can be set, as on the mapping
    path = _write(tmp_path, {**SMALL, "chain": None, "chains": [[3, 5], [5, 3]], "objective": "spectral"}, "lists.yaml")
    parsed, raw, _ = load_config(path, ["chains.1.channels=2", "objective.p=4", "chains.0.sizes.0=5"])
    assert [c.sizes for c in parsed.chains] == [[5, 5], [5, 3]] and parsed.chains[1].channels == 2
    assert parsed.objective.name == "spectral" and parsed.objective.p == 4
    assert raw["chains"][1] == {"sizes": [5, 3], "channels": 2}
    # a number below a list shorthand is one of its sizes (before: an unknown key `0` beside `sizes`)
    parsed, raw, _ = load_config(path, ["chains.1.0=9", "chains.0.1=7"])
    assert [c.sizes for c in parsed.chains] == [[3, 7], [9, 3]] and raw["chains"] == [[3, 7], [9, 3]]
    parsed, _, _ = load_config(_write(tmp_path, {**SMALL, "chain": [3, 5]}, "one.yaml"), ["chain.1=9"])
    assert parsed.chain.sizes == [3, 9]
    with pytest.raises(ConfigError, match=r"target\.family\.x: target\.family is not a mapping"):
        load_config(path, ["target.family.x=1"])  # before: a TypeError from inside set_path


def test_image_files_are_read_relative_to_the_config_like_its_other_files(tmp_path, monkeypatch):
    # before: relative to the current directory, while targets and weights (and a sweep's file
    # hashes) resolve against the config's directory
    import numpy as np
    from skimage import io

    from jfactor.experiment.config import load_config
    from jfactor.experiment.run import plan
    from jfactor.factorize.objectives import load_images

    folder = tmp_path / "experiment"
    folder.mkdir()
    picture = np.random.default_rng(0).integers(0, 256, (64, 64)).astype(np.uint8)
    io.imsave(folder / "picture.png", picture, check_contrast=False)
    config = _write(folder, {**SMALL, "objective": {"name": "images", "images": ["picture.png"], "image_size": 24,
                                                    "crops": 1}})
    monkeypatch.chdir(tmp_path)
    parsed, _, base = load_config(config)
    images = plan(parsed, base, str(config)).images
    np.testing.assert_array_equal(images, load_images([str(folder / "picture.png")], size=24, count=1))
    from jfactor.factorize.objectives import local_image_path

    assert local_image_path("https://example.org/a.png", folder) == "https://example.org/a.png"  # a URL as it is
    assert local_image_path("camera", folder) == "camera"


@pytest.mark.parametrize("target", [
    {"family": "gaussian", "size": 7, "params": {"sigma": 1.2}},
    {"values": [[0.0, 1.0, 0.0], [1.0, 2.0, 1.0], [0.0, 1.0, 0.0]]},
    {"file": "t.npy"},
    {"stack": {"input_shape": [16, 16, 1], "layers": [{"conv": {"kernel_size": 3, "weights": "w.npy"}},
                                                      {"conv": {"kernel_size": 3, "filters": 1}}]}},
])
def test_a_runs_config_yaml_runs_again_from_its_run_directory(target, tmp_path, monkeypatch):
    # before: its relative file paths were read against the run directory (file not found), and an
    # inline stack's layers, written with their other kinds null, did not validate
    import numpy as np

    from jfactor.experiment.config import load_config
    from jfactor.experiment.run import plan

    folder = tmp_path / "experiment"
    folder.mkdir()
    np.save(folder / "t.npy", np.outer([1.0, 2.0, 1.0, 2.0, 1.0], [1.0, 0.0, 1.0, 3.0, 1.0]))
    np.save(folder / "w.npy", np.arange(9.0).reshape(3, 3, 1, 1) - 4)
    monkeypatch.chdir(tmp_path)
    parsed, _, base = load_config(_write(folder, {**SMALL, "target": target}))
    first = plan(parsed, base, "config.yaml")
    runs = tmp_path / "runs"
    result = runner.invoke(app, ["run", str(folder / "config.yaml"), "--runs-dir", str(runs), "--quiet"])
    assert result.exit_code == 0, result.output
    written = next(runs.iterdir()) / "config.yaml"
    assert yaml.safe_load(written.read_text())["target"].get("stride") == 1  # the defaults are written
    again, _, written_base = load_config(written)
    np.testing.assert_array_equal(plan(again, written_base, str(written)).target.kernel, first.target.kernel)
    # results.json records the files as config.yaml does (before: relative to a folder it does not name)
    recorded = json.loads((written.parent / "results.json").read_text())["config"]

    def paths(node):
        if isinstance(node, dict):
            return [v for k, v in node.items() if k in ("file", "stack") and isinstance(v, str)] + \
                [p for v in node.values() for p in paths(v)]
        return [p for v in node for p in paths(v)] if isinstance(node, list) else []

    assert all(Path(p).is_absolute() and Path(p).is_file() for p in paths(recorded))
    assert len(paths(recorded)) == ("file" in target) + ("stack" in target)


def test_messages_name_the_fault_in_the_users_terms(tmp_path):
    # before: raw errno text, "needs a key, one of []", "target: target:", "valid dictionary or
    # instance of ChainSpec" and "chain.sizes: Field required" for a config that has `chains`
    import numpy as np

    from jfactor import kernels, weights
    from jfactor.errors import ConfigError
    from jfactor.experiment.config import build_target, load_config

    with pytest.raises(ConfigError, match=r"parameters \{'sigma': 1e\+300\}: Numerical result out of range$"):
        kernels.make("gaussian", 7, sigma=1e300)
    np.savez(tmp_path / "empty.npz")
    with pytest.raises(ConfigError, match=r"empty\.npz: holds no arrays$"):
        weights.load(tmp_path / "empty.npz")
    config, _, base = load_config(_write(tmp_path, {**SMALL, "target": {"values": [[1.0, float("nan")]]}}, "v.yaml"))
    with pytest.raises(ConfigError, match=r"v\.yaml: target: values: the target has 1 non-finite values"):
        build_target(config.target, base, "v.yaml")
    with pytest.raises(ConfigError, match=r"chain: give the sizes as a list \(\[3, 5, 9\]\) or a mapping .* got '3,5'"):
        load_config(_write(tmp_path, {**SMALL, "chain": "3,5"}, "s.yaml"))
    with pytest.raises(ConfigError, match=r"s\.yaml: --set chain\.channels: chain is not a mapping$"):
        load_config(tmp_path / "s.yaml", ["chain.channels=2"])  # before: a ValueError's traceback
    with pytest.raises(ConfigError, match=r"l\.yaml: --set chain\.channels: this config has chains, not chain$"):
        load_config(_write(tmp_path, {**SMALL, "chain": None, "chains": [[3, 5]]}, "l.yaml"), ["chain.channels=2"])
