"""One factorization at a time per process: two threads running XLA programs that call LAPACK hang.

Two threads of one process that each run a jitted program calling LAPACK (jax's CPU Cholesky
and LU are LAPACK custom calls) wait forever for their results (jax 0.10.2 on a 2-core AMD
EPYC: a batched Cholesky in a loop, run by two threads at once, hung in every try, also with
``OPENBLAS_NUM_THREADS=1``, ``--xla_cpu_multi_thread_eigen=false`` or synchronous CPU
dispatch; a jitted Cholesky beside a jitted matrix product, or beside scipy's Cholesky, ran, and
so did scipy's Cholesky in both threads).  The Levenberg-Marquardt steps of all but the
largest chains are Cholesky solves, and the ALS and least-squares baselines solve with LU, so
two threads calling :func:`jfactor.factorize.factorize` at once hung, in every try.
:func:`one_at_a_time` makes such calls wait for each other instead.  Code of the caller's own
that calls LAPACK through jax from another thread can still meet one of jfactor's; wrapped with
:func:`one_at_a_time` (reentrant, process-wide) it waits too.
"""

from __future__ import annotations

import functools
import threading

_lock = threading.RLock()  # reentrant: a locked call may make another (factorize_batch runs the baselines)


def one_at_a_time(function):
    """``function`` holding this process's factorization lock: calls from several threads run in turn."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with _lock:
            return function(*args, **kwargs)

    return wrapper
