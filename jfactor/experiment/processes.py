"""Which process of a multi-process run this is, on jax's own distributed runtime.

``jfactor sweep --coordinator HOST:PORT --num-processes N --process-id I`` joins process
``I`` of ``N`` through :func:`jax.distributed.initialize`; with none of the three flags,
whatever that function detects on its own (Slurm's ``srun``, Open MPI, ...) is used, and
with nothing detected the run is a single process.  The processes share the run
directory (a shared filesystem across hosts); cells are claimed with file locks, so the
split needs no other communication than one barrier after the claims.
"""

from __future__ import annotations

import dataclasses
import re
import sys

import jax

from jfactor.errors import ConfigError

# how long a process that finished its share waits at exit for the others (jax's default is 5 minutes)
SHUTDOWN_TIMEOUT_S = 7 * 24 * 3600
JOIN_TIMEOUT_S = 300  # how long a process waits for the coordinator and the others to join (jax's default)


@dataclasses.dataclass(frozen=True)
class Processes:
    """Process ``index`` of ``count``; cell ``c`` belongs to process ``c % count``."""

    index: int = 0
    count: int = 1

    def owns(self, cell: int) -> bool:
        return cell % self.count == self.index

    def barrier(self, name: str) -> None:
        """Wait until every process reaches ``name`` (nothing to wait for with one process)."""
        if self.count > 1:
            from jax.experimental import multihost_utils

            try:
                multihost_utils.sync_global_devices(name)
            except AssertionError:  # jax compares the names the processes reached
                raise ConfigError(f"the {self.count} processes reached different barriers ({name} here): start "
                                  "every process with the same config and --set values, its files at the same "
                                  "paths") from None


def _check(coordinator: str, num_processes: int, process_id: int) -> None:
    if not re.fullmatch(r"\[?[\w.:-]+\]?:\d+", coordinator):
        raise ConfigError(f"--coordinator: expected HOST:PORT (e.g. 127.0.0.1:1234), got {coordinator!r}")
    if num_processes < 1:
        raise ConfigError(f"--num-processes: must be >= 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise ConfigError(f"--process-id: must be in 0..{num_processes - 1}, got {process_id}")


def connect(coordinator: str | None = None, num_processes: int | None = None,
            process_id: int | None = None) -> Processes:
    """Join the distributed runtime (flags, or auto-detection); a single process if neither applies."""
    given = [coordinator, num_processes, process_id]
    if any(v is not None for v in given) and not all(v is not None for v in given):
        raise ConfigError("--coordinator, --num-processes and --process-id go together (give all three or none)")
    if jax.distributed.is_initialized():
        return Processes(jax.process_index(), jax.process_count())
    if coordinator is not None:
        _check(coordinator, num_processes, process_id)
        if num_processes == 1:
            return Processes()
    # the barrier is a collective: on CPU devices it needs gloo (this must precede any computation)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator is not None:  # joining blocks until every process is there: say so
        print(f"process {process_id} of {num_processes}: joining the coordinator at {coordinator} (waits up to "
              f"{JOIN_TIMEOUT_S} s for all {num_processes} processes)", file=sys.stderr, flush=True)
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id, initialization_timeout=JOIN_TIMEOUT_S,
                                   shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S)
    except ValueError:
        if coordinator is not None:
            raise
        return Processes()  # no cluster detected: one process
    except RuntimeError as exc:
        if coordinator is None and "before any JAX" in str(exc):
            return Processes()  # called in a process already computing (a library call, a test): one process
        where = f"--coordinator {coordinator}" if coordinator else "jax.distributed.initialize()"
        raise ConfigError(f"{where}: cannot join the distributed runtime: {exc}") from None
    return Processes(jax.process_index(), jax.process_count())
