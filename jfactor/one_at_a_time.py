"""One factorization at a time per process: two threads running XLA programs that call LAPACK hang.

jax's CPU Cholesky (jaxlib 0.10.2, ``lapack_dpotrf_ffi``) hands its batch to XLA's intra-op
thread pool and waits for it on a thread of that same pool.  On a 2-core machine the pool has
two threads: two such kernels at once, one per thread, each wait for work that no free thread
is left to run, for good (gdb: both ``tf_XLAEigen`` threads in ``CholeskyFactorization::Kernel``,
every other worker idle).  Two threads each running a batched Cholesky in a loop hung in every
try, also with ``OPENBLAS_NUM_THREADS=1``, ``--xla_cpu_multi_thread_eigen=false`` or
synchronous CPU dispatch, and so did one jitted program holding two independent batched
Choleskys of matrices it computed; a jitted Cholesky beside a jitted matrix product, or beside
scipy's Cholesky, ran, and so did scipy's Cholesky in both threads.  The Levenberg-Marquardt
steps of all but the largest chains are Cholesky solves, so two threads calling
:func:`jfactor.factorize.factorize` at once hung, in every try; the ALS and least-squares
baselines solve with jax's LU (its kernel not traced here) and hold the lock too.  (Within one
of jfactor's programs the solves run one after another: each needs the step before it.)
:func:`one_at_a_time` makes such calls wait for each other instead.
Code of the caller's own that calls LAPACK through jax from another thread can still meet one
of jfactor's; wrapped with :func:`one_at_a_time` (reentrant, process-wide) it waits too.
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
