"""One BLAS thread for the host's linear algebra while a factorization draws its starts.

Each wave of a factorization first draws its starts and hops on the host: small linear
algebra, least-squares refits of one factor (at most a few hundred rows), SVDs and roots of a
target.  OpenBLAS's worker threads gain nothing there, and after each call they spin for a
while waiting for the next, on the cores XLA then computes the wave on.  On a 2-core CPU,
numpy's and scipy's OpenBLAS (two copies) held to one thread while a wave is drawn took 4-21%
off the default search's median time on the 15x15 targets of
``experiments/bench_optimality.py`` (the motion blur 0.89 s to 0.72 s, the DoG 1.15 s to
0.91 s, the LoG 1.20 s to 1.15 s); the DoG's 9x9 refits (81 x 225, QR), replayed alone, took
0.21 ms each instead of a median of 0.58 ms.  Held to one thread for the whole factorization
instead (jax's CPU LAPACK kernels, its Cholesky among them, call scipy's), the searches timed
the same to within this machine's noise, so the limit stays where the gain is: the rest (a
large images objective's Gram matrix, a large chain's LM) keeps every thread.

:func:`serial_blas` is that limit (threadpoolctl), process-wide: nested or concurrent uses
(several threads drawing at once) share one, restored when the last of them ends.
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
