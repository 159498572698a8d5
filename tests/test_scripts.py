"""The experiment scripts run (tiny sizes); their numbers live in experiments/, not in tests."""

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).parent.parent


def _run(*args, timeout=600):
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_seed_reproduction_prints_the_table(tmp_path):
    out = _run("experiments/seed_reproduction.py", "--print-only", "--json", str(tmp_path / "seed.json"))
    assert "| section8_avgpool | 78x78 / s16 |" in out
    assert "3x3 -> 3x3 d2 -> 3x3 d4 -> 3x3 d8 -> 3x3 d16 -> AvgPool(16)" in out
    assert (tmp_path / "seed.json").exists()


def test_an_ablation_runs_tiny(tmp_path):
    out = _run("experiments/ablation.py", "channel_width", "--tiny", "--runs-dir", str(tmp_path))
    assert "## channel_width" in out and "| gaussian | 1 |" in out


def test_bench_optimality_runs_tiny(tmp_path):
    kept = tmp_path / "bench_optimality.json"
    out = _run("experiments/bench_optimality.py", "--tiny", "--held-out", "2", "--out", str(kept))
    assert "| disk 5x5 | 3x3 -> 3x3, width 1 |" in out and "Within 1.01x of the best known:" in out
    row = next(line for line in out.splitlines() if line.startswith("| disk 5x5"))
    # five seeds and two held-out ones (100, 101), each exact or at the best
    assert row.endswith(" | 5/5 | 2/2 |") and "runs over seeds 0-4, " in out and "runs over the held-out seeds" in out
    data = json.loads(kept.read_text())
    assert [r["seed"] for r in data["default"]["disk 5x5"]["held_out"]] == [100, 101]
    # printing the kept table measures nothing, so it must not relabel the JSON with this machine
    long_search = data["reference"]["disk 5x5"]["basin_hopping"]  # the default's own seeds, run on
    assert long_search["seeds"] == [0, 1] and long_search["rel_error"] == min(long_search["errors"])
    data["device"] = "another machine"
    kept.write_text(json.dumps(data, indent=1))
    again = _run("experiments/bench_optimality.py", "--tiny", "--held-out", "2", "--out", str(kept))
    assert again == out and json.loads(kept.read_text())["device"] == "another machine"


def test_repvgg_reparam_runs_tiny(tmp_path):
    """Trained through fold_conv or as branches: one loss curve; the deployed conv equals the block."""
    out = _run("experiments/repvgg_reparam.py", "--tiny", "--out", str(tmp_path / "repvgg.json"))
    assert "| fold_conv | 108 | 84 |" in out and "| plain conv | 84 | 84 |" in out
    result = json.loads((tmp_path / "repvgg.json").read_text())
    assert result["fold_conv_vs_branches_max_loss_diff"] < 1e-12
    for row in result["rows"]:
        assert row["block_vs_deployed_max_abs"] < 1e-12 and row["exact_everywhere"]
        assert abs(row["deployed_test_mse"] - row["test_mse"]) < 1e-12


def test_a_tiny_repvgg_run_leaves_the_kept_results_alone(tmp_path, monkeypatch):
    # before: --tiny without --out wrote its 5-step numbers over experiments/results/repvgg_reparam.json
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    import repvgg_reparam

    kept, blocks = tmp_path / "kept.json", []
    monkeypatch.setattr(repvgg_reparam, "DEFAULT_OUT", kept)
    monkeypatch.setattr(repvgg_reparam, "run", lambda args: {"steps": args.steps})
    monkeypatch.setattr(repvgg_reparam, "table", lambda result: f"table of {result['steps']} steps")
    monkeypatch.setattr(repvgg_reparam, "replace_block", lambda name, text: blocks.append(name))
    monkeypatch.setattr(sys, "argv", ["repvgg_reparam.py", "--tiny"])
    repvgg_reparam.main()
    assert not kept.exists() and blocks == []
    monkeypatch.setattr(sys, "argv", ["repvgg_reparam.py", "--tiny", "--out", str(kept)])
    repvgg_reparam.main()
    assert json.loads(kept.read_text()) == {"steps": 5} and blocks == []  # asked for; README untouched
    monkeypatch.setattr(sys, "argv", ["repvgg_reparam.py", "--steps", "7"])
    repvgg_reparam.main()
    assert json.loads(kept.read_text()) == {"steps": 7} and blocks == ["repvgg_reparam"]


def test_bench_factorize_names_the_starts_its_table_shared(monkeypatch):
    # before: the header said "same 16 starts" whatever --scipy-starts (2 in the tiny run)
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    import bench_factorize

    kept = json.loads((ROOT / "experiments" / "results" / "cpu" / "bench_factorize.json").read_text())["quality"]
    assert "| same 16 starts |" in bench_factorize.table_a(kept).splitlines()[0]
    rows = [{**row, "scipy_starts": 2} for row in kept["rows"]]
    assert "| same 2 starts |" in bench_factorize.table_a({**kept, "rows": rows}).splitlines()[0]


def test_onnx_speed_runs_tiny(tmp_path):
    out = _run("experiments/onnx_speed.py", "--tiny", "--out", str(tmp_path / "speed.json"))
    assert "| whole model |" in out and "kept: inner zero padding" in out
    assert (tmp_path / "speed.json").exists()


def test_onnx_references_runs_on_one_light_model(tmp_path):
    out = _run("experiments/onnx_references.py", "--models", "squeezenet", "--out", str(tmp_path / "refs.json"))
    assert "node cases:" in out and "| squeezenet |" in out
    assert (tmp_path / "refs.json").exists()


def _grid_maps(ndim: int):
    """Every flip-then-permute of ``ndim`` spatial axes (the square grid's symmetries)."""
    for perm in itertools.permutations(range(ndim)):
        for flips in itertools.product((False, True), repeat=ndim):
            yield lambda k, perm=perm, flips=flips: np.transpose(
                np.flip(k, [a for a in range(ndim) if flips[a]]) if any(flips) else k,
                perm + tuple(range(ndim, k.ndim)))


def test_bench_optimality_targets_are_distinct_problems():
    """No target is another's mirror image, transpose or negative with the same chain: that one
    would have the same best and the same basins (a 15x15 line at 60 degrees is the 30-degree
    motion blur transposed, and both stood in the set once)."""
    sys.path.insert(0, str(ROOT / "experiments"))
    import bench_optimality

    targets = bench_optimality.target_set()
    for a, b in itertools.combinations(targets, 2):
        ka, kb = np.asarray(a["kernel"], np.float64), np.asarray(b["kernel"], np.float64)
        if ka.shape != kb.shape or sorted(a["chain"]) != sorted(b["chain"]) or a["channels"] != b["channels"]:
            continue
        ndim = ka.ndim if a["channels"] == 1 and ka.ndim <= 3 else ka.ndim - 2
        for grid_map in _grid_maps(ndim):
            moved = grid_map(ka)
            cosine = abs(np.vdot(moved, kb)) / (np.linalg.norm(moved) * np.linalg.norm(kb))
            assert cosine < 0.999, f"{a['name']} and {b['name']} are one problem (|cos| {cosine:.6f})"


def test_bench_optimality_without_kept_results_refuses_rather_than_compute_for_hours(tmp_path, monkeypatch, capsys):
    """On a device with no kept JSON (a GPU's results folder), the plain command that shows the
    kept table in seconds must not start the hours-long reference."""
    sys.path.insert(0, str(ROOT / "experiments"))
    import bench_optimality

    missing = tmp_path / "gpu" / "bench_optimality.json"
    monkeypatch.setattr(bench_optimality.devices, "results_path", lambda *_: missing)
    for args in ([], ["--defaults"], ["--long-search", "--only", "ring 15x15"]):
        assert bench_optimality.main(args) == 2
        assert "has no best-known optimum" in capsys.readouterr().err and not missing.exists()


@pytest.mark.parametrize("args,named", [
    (["experiments/bench_fold.py", "--n", "8", "--tiny", "--out-dir", "{d}/afile"], "argument --out-dir"),
    (["experiments/bench_fold.py", "--n", "0", "--tiny"], "argument --n: 0 must be a positive integer"),
    (["experiments/bench_factorize.py", "--tiny", "--parts", "B", "--out", "{d}"], "is a directory"),
    (["experiments/bench_optimality.py", "--tiny", "--out", "{d}/bad.json"], "holds earlier results that are not JSON"),
    (["experiments/ablation.py", "optimizer_init", "--tiny", "--runs-dir", "{d}/afile"], "argument --runs-dir"),
])
def test_experiment_flags_fail_before_any_compute_with_one_line(tmp_path, args, named):
    """Each of these once ran its whole bench first and then crashed writing its results."""
    (tmp_path / "afile").write_text("a file")
    (tmp_path / "bad.json").write_text("{bad")
    result = subprocess.run([sys.executable, *(a.format(d=tmp_path) for a in args)], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert named in result.stderr.strip().splitlines()[-1]
