"""One BLAS thread for the host's linear algebra while a factorization runs.

A factorization's host work is small linear algebra: least-squares refits of one factor
(at most a few hundred rows), SVDs and root finding of a target.  OpenBLAS's worker threads
gain nothing there, and after each call they spin for a while waiting for the next, on the
cores XLA is computing on.  On a 2-core CPU, numpy's and scipy's OpenBLAS (two copies) limited
to one thread took 12-28% off the default search's time on the 15x15 targets of
``experiments/bench_optimality.py`` (seeds 0-3: the motion blur 1.03 s to 0.75 s, the DoG
1.10 s to 0.92 s) and 8-15% off 1,024 plain restarts; a 9x9 factor's refit (81 x 225, QR)
took 0.21 ms instead of 0.58 ms with no jax computing beside it.

:func:`serial_blas` applies the limit (threadpoolctl) for the duration of a call and restores
the previous thread counts after it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

Result = TypeVar("Result")


def serial_blas(function: Callable[..., Result]) -> Callable[..., Result]:
    """``function`` run with every loaded BLAS library (numpy's and scipy's) at one thread."""

    @functools.wraps(function)
    def limited(*args, **kwargs) -> Result:
        import scipy.linalg  # noqa: F401  (loads scipy's own OpenBLAS, so that the limit reaches it)
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1, user_api="blas"):
            return function(*args, **kwargs)

    return limited
