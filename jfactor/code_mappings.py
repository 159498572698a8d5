"""Compiled programs held in memory, dropped before a process runs out of memory mappings.

Every program XLA compiles for the CPU keeps its machine code in memory mappings of its own
until jax's caches drop it, and Linux allows a process ``vm.max_map_count`` of them (65,530 by
default).  An mmap that fails inside XLA's compiler is a segfault, not an error: three test
files of this project left a process with 13,852 mappings, and a test worker some 490 tests
in crashed that way.  A process that compiles many distinct programs (a sweep over many
chains and targets, a search over chains, a test worker) calls :func:`drop_when_crowded`
between units of work; with the persistent compile cache on (:mod:`jfactor.cache`), a dropped
program that is needed again is loaded back from disk rather than compiled.
"""

from __future__ import annotations

import gc
from pathlib import Path

import jax

LIMIT_FILE = Path("/proc/sys/vm/max_map_count")
MAPS_FILE = Path("/proc/self/maps")


def mappings() -> tuple[int, int] | None:
    """``(held, limit)``: this process's memory mappings and the most it may hold; None where
    ``/proc`` does not say (not Linux)."""
    try:
        limit = int(LIMIT_FILE.read_text())
        with open(MAPS_FILE, "rb") as handle:
            held = sum(1 for _ in handle)
    except (OSError, ValueError):
        return None
    return held, limit


def drop_when_crowded(fraction: float = 0.5) -> bool:
    """Drop jax's compiled programs (``jax.clear_caches``) when this process holds more than
    ``fraction`` of its limit of memory mappings; returns whether it did."""
    counts = mappings()
    if counts is None or counts[0] <= fraction * counts[1]:
        return False
    jax.clear_caches()
    gc.collect()
    return True
