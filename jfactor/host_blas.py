"""One BLAS thread for the host's linear algebra while a factorization runs.

A factorization calls BLAS on the host in two places: its draws of starts and hops (small
linear algebra: least-squares refits of one factor, at most a few hundred rows, SVDs and roots
of a target, in numpy's and scipy's OpenBLAS, two copies), and, on a CPU, jax's LAPACK kernels,
which call scipy's: LM's Cholesky factorization and triangular solves of the damped normal
equations (one call per restart) and the ALS baseline's solves.  OpenBLAS's worker threads gain
little on such small problems, and beside XLA's threads on the same cores they cost: after
each call they spin for a while waiting for the next, and its threaded factorizations wait on
each other whenever a core is busy elsewhere.

- The draws (2026-12-06, 2-core AMD EPYC): held to one thread while a wave is drawn, the
  default search's median time on the 15x15 targets of ``experiments/bench_optimality.py`` fell
  4-21% (the motion blur 0.89 s to 0.72 s, the DoG 1.15 s to 0.91 s, the LoG 1.20 s to 1.15 s);
  the DoG's 9x9 refits (81 x 225, QR), replayed alone, took 0.21 ms each instead of a median of
  0.58 ms.
- LM (2026-12-07, the same machine type): a batch of 32 Cholesky solves in jax took 82, 455 and
  2,425 us per item at n = 115, 200 and 404 parameters with one thread, 98, 601 and 3,096 with
  OpenBLAS's two; while other processes kept the cores busy, n = 200 took 0.37-0.51 ms with
  one thread and 3.9-15 ms with two.  The 31x31 LoG into 3-5-9-17 (n = 404), 8 restarts warm:
  4.8 and 5.4 s against 5.7 and 9.0 s; beside two busy processes (``yes > /dev/null``), 7.6 s
  against 131 s.  The bench's 15x15 targets (n <= 115) timed the same either way.

So :func:`serial_blas` holds for the whole factorization (draws, LM, baselines); what comes
before it, a large images objective's Gram matrix (numpy products of many windows), keeps
every thread.  Not measured on a CPU with many cores, where OpenBLAS's threads might pay on
Cholesky factorizations of several hundred parameters if XLA leaves cores idle.

:func:`serial_blas` is that limit (threadpoolctl), process-wide (the caller's other threads'
numpy and scipy run on one BLAS thread too while a factorization runs): nested or concurrent uses
(several threads factorizing at once) share one, restored when the last of them ends.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_holders = 0  # uses of serial_blas in progress
_limiter = None  # threadpoolctl's limiter while any is


@functools.cache
def _controller():
    """threadpoolctl's controller of the BLAS libraries loaded, scipy's own OpenBLAS included."""
    import scipy.linalg  # noqa: F401  (loads scipy's OpenBLAS, so that the controller finds it)
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


@contextlib.contextmanager
def serial_blas() -> Iterator[None]:
    """Every BLAS library the controller found (numpy's and scipy's) at one thread inside the
    block; their earlier thread counts back once no block of any thread is inside one."""
    global _holders, _limiter
    with _lock:
        if _holders == 0:
            _limiter = _controller().limit(limits=1, user_api="blas")
        _holders += 1
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0:
                _limiter.restore_original_limits()
                _limiter = None
