"""One factorization at a time per process: XLA's CPU runtime hangs when two threads run LAPACK at once.

Two threads of one process that each run a jitted program calling LAPACK (jax's CPU Cholesky
and LU are LAPACK custom calls) wait forever for their results (jax 0.10.2 on a 2-core AMD
EPYC: a batched Cholesky in a loop, run by two threads at once, hung every time; a Cholesky
beside a matrix product did not; ``--xla_cpu_multi_thread_eigen=false`` and synchronous CPU
dispatch did not help).  Every Levenberg-Marquardt step of a factorization is a Cholesky solve,
and the ALS baseline solves with LU, so two threads calling :func:`jfactor.factorize` at once
hung, three runs of three.  :func:`one_at_a_time` makes such calls wait for each other instead:
one search already keeps the CPU's cores busy, so little is lost.  A program of the user's own
that calls LAPACK from another thread can still meet one of jfactor's (the README says so).
"""

from __future__ import annotations

import functools
import threading

_lock = threading.RLock()  # reentrant: factorize_batch runs the baselines, which hold it too


def one_at_a_time(function):
    """``function`` holding this process's factorization lock: calls from several threads run in turn."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with _lock:
            return function(*args, **kwargs)

    return wrapper
