"""fold_batch and factorize_batch with shard=True over 2 processes of jax.distributed (CPU, 127.0.0.1).

``experiments/distributed_batch.py`` runs as two processes (two CPU devices each) that
join one coordinator, fold and factorize the same batches and save what they got; the
test compares both with the script's single-process run.  Every run is a subprocess with
a timeout: a hung collective fails the test instead of hanging it.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).parent.parent
SCRIPT = ROOT / "experiments" / "distributed_batch.py"
SIZES = ["--stacks", "5", "--targets", "3"]  # odd: padded to the processes, then to each process's 2 devices

# The script as process i, recording the size of every block that this process shards.
WORKER = """
import json, runpy, sys
import jax
from jfactor import sharding
blocks, place = [], sharding.shard_batch
sharding.shard_batch = lambda tree, mesh: blocks.append(jax.tree.leaves(tree)[0].shape[0]) or place(tree, mesh)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
json.dump(blocks, open(sys.argv[-1] + ".blocks.json", "w"))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(SCRIPT), "--coordinator", f"127.0.0.1:{port}",
                                 "--num-processes", "2", "--process-id", str(i), *SIZES,
                                 "--out", str(tmp_path / f"p{i}")],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(2)]
    try:
        logs = [w.communicate(timeout=400) for w in workers]
    finally:
        for w in workers:
            w.kill()
    for w, (_, err) in zip(workers, logs):
        assert w.returncode == 0, err[-3000:]
    single = subprocess.run([sys.executable, str(SCRIPT), "--single", *SIZES, "--out", str(tmp_path / "single")],
                            cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert single.returncode == 0, single.stderr[-3000:]

    expected = np.load(tmp_path / "single.npz")
    for i in range(2):
        assert f"process {i}/2 (2 of 4 devices): folded 5 stacks and factorized 3 targets" in logs[i][0]
        info = json.loads((tmp_path / f"p{i}.json").read_text())
        assert (info["process"], info["process_count"], info["devices"], info["local_devices"]) == (i, 2, 4, 2)
        # fold_batch: 5 stacks -> blocks of 3; factorize_batch: 3 targets -> blocks of 2
        assert json.loads((tmp_path / f"p{i}.blocks.json").read_text()) == [3, 2]
        got = np.load(tmp_path / f"p{i}.npz")
        assert set(got.files) == set(expected.files)
        for key in expected.files:
            assert got[key].shape == expected[key].shape, key
            if key.startswith(("best", "diverged")):
                np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
            else:
                scale = max(1.0, float(np.nanmax(np.abs(expected[key]))))
                np.testing.assert_allclose(got[key], expected[key], rtol=0, atol=1e-10 * scale, err_msg=key)
