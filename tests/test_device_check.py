"""Smoke run of experiments/device_check.sh at tiny sizes: every step runs and its JSON lands per device."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "experiments"))
import bench_fold  # noqa: E402

ROOT = Path(__file__).parent.parent


def test_device_check_writes_every_json(tmp_path):
    env = {**os.environ, "JFACTOR_DEVICE_CHECK_TINY": "1", "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(ROOT / "experiments" / "device_check.sh"), str(tmp_path / "out")],
                         check=False, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "command not found" not in out.stderr, out.stderr[-3000:]  # a broken line of the script itself
    summary = json.loads((tmp_path / "out" / "device_check.json").read_text())
    assert list(summary["steps"]) == ["tests", "fold", "fold_methods", "factorize"]
    assert all(step["exit"] == 0 for step in summary["steps"].values())
    device = tmp_path / "out" / summary["device_slug"]
    fold = json.loads((device / "bench_fold.json").read_text())["sweep"]
    assert [(r["n"], r["method"]) for r in fold] == [(8, "auto"), (16, "auto")]
    methods = json.loads((device / "bench_fold_methods.json").read_text())["sweep"]
    assert [r["ran"] for r in methods] == ["chain", "fft", "shift"]
    assert all(r["max_abs_diff"] < 1e-10 and r["device_bound"]["copy_gb_s"] > 0 for r in fold + methods)
    factorize = json.loads((device / "bench_factorize.json").read_text())
    assert factorize["device_slug"] == summary["device_slug"] and factorize["device_bound"]["matmul_gflop_s"] > 0
    assert (tmp_path / "out" / "tests.xml").is_file() and (tmp_path / "out" / "device_check.log").is_file()
    # what comes back from a device machine: few files, at most two folders down
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(len(p.relative_to(tmp_path / "out").parts) <= 2 for p in files)


def test_readme_table_puts_devices_side_by_side(tmp_path):
    """The CPU column from its JSON; a GPU column that says it is not measured until a GPU folder exists."""
    cpu = tmp_path / "cpu"
    cpu.mkdir()
    shutil.copy(ROOT / "experiments" / "results" / "cpu" / "bench_fold.json", cpu)
    table = bench_fold.device_table(tmp_path)
    assert "| cpu x1 (cpu; " in table and "GPU: not yet measured" in table
    assert "| 100,000 | auto | 8,550/s (shift, 5.9% of bound, load 1.8) |" in table
    gpu = json.loads((cpu / "bench_fold.json").read_text())
    for r in gpu["sweep"]:
        r.update(device="gpu x1 (NVIDIA H200; ...)", ran="chain", items_per_s=r["items_per_s"] * 500)
        r["bound"]["methods"] = ["chain"]
    (tmp_path / "nvidia-h200").mkdir()
    (tmp_path / "nvidia-h200" / "bench_fold.json").write_text(json.dumps(gpu))
    table = bench_fold.device_table(tmp_path)
    assert "not yet measured" not in table and "| 100,000 | auto | 8,550/s (shift" in table
    assert "4,274,994/s (chain" in table  # 8,549.99 x 500
    # a CPU column whose files come from two machines names both
    methods = json.loads((ROOT / "experiments" / "results" / "cpu" / "bench_fold_methods.json").read_text())
    for r in methods["sweep"]:
        r["device"] = "cpu x1 (cpu; Another CPU, 2 cores)"
    (cpu / "bench_fold_methods.json").write_text(json.dumps(methods))
    head = next(line for line in bench_fold.device_table(tmp_path).splitlines() if line.startswith("| N |"))
    assert "| cpu x1 (cpu; AMD EPYC, 2 cores) / cpu x1 (cpu; Another CPU, 2 cores) |" in head
