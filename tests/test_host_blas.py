"""A factorization runs with numpy's and scipy's BLAS at one thread (jfactor.host_blas)."""

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from jfactor.errors import ConfigError
from jfactor.factorize import Chain, api, factorize
from jfactor.host_blas import serial_blas

ROOT = Path(__file__).parent.parent
TARGET = np.outer([1.0, 2.0, 1.0, 3.0, 1.0], [1.0, -1.0, 2.0, 1.0, 1.0])


def _blas_threads() -> dict[str, int]:
    return {info["filepath"]: info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"}


@pytest.fixture
def two_threads():
    """Every BLAS library at two threads around the test (skipped where none can be: no library
    threadpoolctl controls, or a single CPU, where OpenBLAS caps the count)."""
    import scipy.linalg  # noqa: F401  (its BLAS too)

    with threadpool_limits(limits=2, user_api="blas"):
        before = _blas_threads()
        if not before or set(before.values()) != {2}:
            pytest.skip(f"the BLAS libraries here cannot run two threads: {before}")
        yield before
        assert _blas_threads() == before  # restored


def test_a_factorization_runs_with_one_blas_thread(two_threads, monkeypatch):
    """The draws, LM (jax's CPU Cholesky calls scipy's LAPACK) and the baselines, each at one
    thread; two again after."""
    seen = {"draw": [], "solve": [], "baselines": []}
    draw, optimise, baselines = api._draw, api.optimise, api.baseline_lib.run_baselines

    def recording(name, function):
        def record(*args, **kwargs):
            seen[name].append(_blas_threads())
            return function(*args, **kwargs)
        return record

    monkeypatch.setattr(api, "_draw", recording("draw", draw))
    monkeypatch.setattr(api, "optimise", recording("solve", optimise))
    monkeypatch.setattr(api.baseline_lib, "run_baselines", recording("baselines", baselines))
    factorize(TARGET, Chain.build([3, 3]), restarts=4, baselines=("als",))
    one = {path: 1 for path in two_threads}
    assert all(seen.values()) and all(threads == one for calls in seen.values() for threads in calls), seen
    assert _blas_threads() == two_threads


def test_the_thread_counts_come_back_when_a_draw_raises(two_threads, monkeypatch):
    def failing(*args, **kwargs):
        raise ConfigError("a draw that fails")

    monkeypatch.setattr(api, "_draw", failing)
    with pytest.raises(ConfigError, match="a draw that fails"):
        factorize(TARGET, Chain.build([3, 3]), restarts=4, baselines=())
    assert _blas_threads() == two_threads


def test_overlapping_uses_share_one_limit_restored_when_the_last_ends(two_threads):
    """Two threads whose blocks overlap (the first ends while the second is inside): one thread
    inside either, two again only after both (each restoring its own would leave one)."""
    first_in, first_out, second_in = threading.Event(), threading.Event(), threading.Event()
    inside = {}

    def first():
        with serial_blas():
            first_in.set()
            second_in.wait(30)
        first_out.set()

    thread = threading.Thread(target=first)
    thread.start()
    first_in.wait(30)
    with serial_blas():
        second_in.set()
        first_out.wait(30)
        inside["after the first ended"] = _blas_threads()
    thread.join(30)
    assert inside["after the first ended"] == {path: 1 for path in two_threads}
    assert _blas_threads() == two_threads


def test_scipys_blas_is_limited_too_where_scipy_linalg_was_not_imported_before():
    """scipy loads its own OpenBLAS with scipy.linalg; the limit must find it (a fresh process)."""
    script = (
        "import sys\n"
        "from threadpoolctl import threadpool_info\n"
        "from jfactor.host_blas import serial_blas\n"
        "assert 'scipy.linalg' not in sys.modules\n"
        "blas = lambda: sorted((i['filepath'], i['num_threads']) for i in threadpool_info()\n"
        "                      if i['user_api'] == 'blas')\n"
        "with serial_blas():\n"
        "    inside = blas()\n"
        "import scipy.linalg\n"
        "print(sorted({n for _, n in blas()}), inside == [(path, 1) for path, _ in blas()])\n"
    )
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr
    counts, limited = done.stdout.rsplit("]", 1)
    if counts + "]" != "[2]":
        pytest.skip(f"the BLAS libraries here do not run two threads: {counts}]")
    assert limited.strip() == "True"
