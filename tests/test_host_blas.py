"""A factorization holds numpy's and scipy's BLAS to one thread while it runs (jfactor.host_blas)."""

import os
import subprocess
import sys

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from jfactor.factorize import api
from jfactor.factorize import Chain, factorize


def _blas_threads() -> dict[str, int]:
    return {info["filepath"]: info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"}


def test_a_factorization_draws_its_starts_with_one_blas_thread_and_restores_the_count(monkeypatch):
    seen = []
    draw = api._draw

    def recording(*args, **kwargs):
        seen.append(_blas_threads())
        return draw(*args, **kwargs)

    monkeypatch.setattr(api, "_draw", recording)
    import scipy.linalg  # noqa: F401  (its BLAS too, before the outer limit)

    with threadpool_limits(limits=2, user_api="blas"):
        before = _blas_threads()
        factorize(np.outer([1.0, 2.0, 1.0, 3.0, 1.0], [1.0, -1.0, 2.0, 1.0, 1.0]), Chain.build([3, 3]), restarts=4,
                  baselines=())
        assert _blas_threads() == before
    assert before and set(before.values()) == {2}
    assert seen and all(threads == {path: 1 for path in before} for threads in seen)


def test_scipys_blas_is_limited_too_where_scipy_linalg_was_not_imported_before():
    """scipy loads its own OpenBLAS with scipy.linalg; the limit must see it (a fresh process)."""
    script = (
        "import sys\n"
        "from threadpoolctl import threadpool_info\n"
        "from jfactor.host_blas import serial_blas\n"
        "assert 'scipy.linalg' not in sys.modules\n"
        "blas = lambda: sorted((i['filepath'], i['num_threads']) for i in threadpool_info()\n"
        "                      if i['user_api'] == 'blas')\n"
        "inside = serial_blas(blas)()\n"
        "import scipy.linalg\n"
        "print(inside == [(path, 1) for path, _ in blas()], {n for _, n in blas()} == {2})\n"
    )
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True"]
