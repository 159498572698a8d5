"""Factorizations from several threads run in turn instead of hanging XLA's CPU runtime."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from jfactor.factorize import Chain, api, baselines, factorize
from jfactor.one_at_a_time import one_at_a_time

ROOT = Path(__file__).parent.parent


def test_factorizations_from_two_threads_finish_with_the_sequential_results():
    """Two threads each running a factorization (Cholesky LM steps) hung forever without the lock:
    a subprocess, so a hang fails the test instead of the suite."""
    script = (
        "import threading\n"
        "from jfactor import kernels\n"
        "from jfactor.factorize import Chain, factorize\n"
        "target, chain = kernels.make('log', 9), Chain.build([3, 3, 5])\n"
        "run = lambda seed: factorize(target, chain, restarts=64, seed=seed).rel_error\n"
        "found = {}\n"
        "threads = [threading.Thread(target=lambda s=s: found.__setitem__(s, run(s))) for s in (0, 1)]\n"
        "for thread in threads: thread.start()\n"
        "for thread in threads: thread.join()\n"
        "print(found == {s: run(s) for s in (0, 1)}, sorted(found))\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}  # XLA's CPU LAPACK calls are what hung
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240, cwd=ROOT,
                          env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "[0,", "1]"], done.stderr


def test_calls_from_several_threads_do_not_overlap_and_may_nest():
    spans = []

    @one_at_a_time
    def work(depth: int):
        start = time.perf_counter()
        time.sleep(0.05)
        if depth:
            work(depth - 1)  # reentrant: the lock's holder may call in again
        spans.append((start, time.perf_counter(), depth))

    threads = [threading.Thread(target=work, args=(1,), daemon=True) for _ in range(3)]  # a deadlock fails, not hangs
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads)
    outer = sorted((start, end) for start, end, depth in spans if depth == 1)
    assert len(outer) == 3 and len(spans) == 6
    assert all(end <= next_start for (_, end), (next_start, _) in zip(outer, outer[1:]))


def test_the_factorizations_and_the_als_baselines_jax_work_holds_the_lock(monkeypatch):
    """While the LM phase and the ALS baseline run, another thread's locked call waits."""
    waited = {}

    def probed(name, function):
        def run(*args, **kwargs):
            other = threading.Event()
            threading.Thread(target=one_at_a_time(other.set), daemon=True).start()
            waited[name] = (not other.wait(0.2), other)
            return function(*args, **kwargs)

        return run

    monkeypatch.setattr(api, "optimise", probed("optimise", api.optimise))
    monkeypatch.setattr(baselines, "_als", probed("als", baselines._als))
    target = np.outer([1.0, 2.0, 1.0, 3.0, 1.0], [1.0, -1.0, 2.0, 1.0, 1.0])
    factorize(target, Chain.build([3, 3]), restarts=4, baselines=("als",))
    assert set(waited) == {"optimise", "als"}
    for name, (blocked, other) in waited.items():
        assert blocked, name
        assert other.wait(30), name  # and ran once the factorization was done
