"""fold_batch and factorize_batch with shard=True over 2 processes of jax.distributed (CPU, 127.0.0.1).

Two worker processes (two CPU devices each) join one coordinator, fold and factorize the
same batches, and save what they got; the test compares both with the single-process
results computed here.  Workers run in subprocesses with a timeout: a hung collective
fails the test instead of hanging it.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).parent.parent
N_STACKS, N_TARGETS = 5, 3  # odd: padded to the processes, then to each process's 2 devices

WORKER = """
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
process_id, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                           initialization_timeout=120)
import numpy as np
from jfactor import sharding
from tests.test_distributed import run

blocks = []
place = sharding.shard_batch
sharding.shard_batch = lambda tree, mesh: blocks.append(jax.tree.leaves(tree)[0].shape[0]) or place(tree, mesh)
np.savez(out + ".npz", **run(shard=True))
json.dump({"process_count": jax.process_count(), "devices": jax.device_count(),
           "local_devices": jax.local_device_count(), "blocks": blocks}, open(out + ".json", "w"))
jax.distributed.shutdown()
"""


def run(shard: bool) -> dict:
    """fold_batch of N_STACKS stacks and factorize_batch of N_TARGETS targets, as flat arrays."""
    import jfactor as jf
    from jfactor import kernels
    from jfactor.factorize import Chain, Solver, factorize_batch
    from jfactor.stack_config import load_stack

    structure = load_stack(ROOT / "configs" / "seed" / "section5_conv_pool_conv.yaml")
    rng = np.random.default_rng(0)
    stacks = jax.tree.map(lambda w: rng.standard_normal((N_STACKS,) + w.shape), structure)
    folded = jf.fold_batch(stacks, shard=shard)
    targets = [kernels.make("log", 5, sigma=s) for s in np.linspace(0.8, 1.2, N_TARGETS)]
    results = factorize_batch(targets, Chain.build([3, 3]), solver=Solver(optimizer="none", refine_steps=40, chunk=10),
                              restarts=2, shard=shard)
    out = {"kernel": np.asarray(folded.kernel), "bias": np.asarray(folded.bias)}
    for i, r in enumerate(results):
        out |= {f"approx{i}": r.approx, f"restart_errors{i}": r.restart_errors, f"history{i}": r.history,
                f"best{i}": np.asarray(r.best), f"diverged{i}": r.diverged}
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "PYTHONPATH": str(ROOT)}
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(i), str(port), str(tmp_path / f"p{i}")], cwd=ROOT,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        logs = [w.communicate(timeout=400) for w in workers]
    finally:
        for w in workers:
            w.kill()
    for w, (_, err) in zip(workers, logs):
        assert w.returncode == 0, err[-3000:]

    single = run(shard=False)
    for i in range(2):
        info = json.loads((tmp_path / f"p{i}.json").read_text())
        assert info == {"process_count": 2, "devices": 4, "local_devices": 2, "blocks": [3, 2]}, info
        got = np.load(tmp_path / f"p{i}.npz")
        assert set(got.files) == set(single)
        for key, expected in single.items():
            assert got[key].shape == expected.shape, key
            if key.startswith(("best", "diverged")):
                np.testing.assert_array_equal(got[key], expected, err_msg=key)
            else:
                scale = max(1.0, float(np.nanmax(np.abs(expected))))
                np.testing.assert_allclose(got[key], expected, rtol=0, atol=1e-10 * scale, err_msg=key)
