"""Smoke run of experiments/bench_factorize.py: every part runs and reports the promised keys."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
VERDICTS = ("PASS", "FAIL", None)


def test_bench_factorize_smoke(tmp_path):
    out_path = tmp_path / "bench.json"
    out = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench_factorize.py"), "--tiny", "--json",
                          "--out", str(out_path)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    written = json.loads(out_path.read_text())
    # which machine ran each part (the parts not rerun keep theirs)
    assert written.pop("part_devices") == {part: result["device"] for part in result["parts"]}
    assert written == result

    for key in ("n", "device", "items_per_s", "baseline_items_per_s", "speedup", "compile_s", "peak_mem_mb",
                "max_abs_diff", "batch", "quality", "timing", "widths"):
        assert key in result, key
    assert result["n"] == 8
    assert result["max_abs_diff"] < 1e-8  # the single calls start where the batched call did
    assert result["batch"]["errors"]["min"] <= result["batch"]["errors"]["median"] <= result["batch"]["errors"]["max"]

    rows = result["quality"]["rows"]
    assert any(r["scipy_rel_error"] is None and r["scipy_note"] for r in rows)  # the wide chain: lm does not apply
    assert any(r["wiener_rel_error"] is not None for r in rows)  # the seed's known-factor case
    for row in rows:
        for key in ("family", "chain", "toolkit_rel_error", "scipy_rel_error", "ratio", "wiener_rel_error",
                    "unsupervised_wiener_rel_error", "toolkit_s", "scipy_s"):
            assert key in row, key
        assert {row["exact_check"], row["scipy_check"], row["wiener_check"]} <= set(VERDICTS)

    assert result["timing"]["check"] in VERDICTS and result["timing"]["scipy_s"] > 0
    assert [r["width"] for r in result["widths"]["rows"]] == [1, 2]
    assert "smallest_exact_width" in result["widths"]
