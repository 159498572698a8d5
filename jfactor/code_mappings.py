"""Compiled programs held in memory, dropped before a process runs out of memory mappings.

Every program XLA compiles for the CPU keeps its machine code in memory mappings of its own
until jax's caches drop it, and Linux allows a process ``vm.max_map_count`` of them (65,530 by
default).  An mmap that fails inside XLA's compiler is a segfault, not an error.  A process that
compiles many distinct programs (a sweep over many chains and targets, a search over chains)
calls :func:`drop_when_crowded` between units of work: every jitted function of the process
compiles again when next called (loaded from disk instead where the persistent compile cache is
on, :mod:`jfactor.cache`, as it is for every command).
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


_held_after_drop = [0]  # mappings held right after the last drop (others than jax's stay)


def drop_when_crowded(fraction: float = 0.5, growth: float = 0.1) -> bool:
    """Drop jax's compiled programs (``jax.clear_caches``) when this process holds more than
    ``fraction`` of its limit of memory mappings and ``growth`` of the limit more than right after
    the last drop (so mappings held by others than jax, a memory-mapped dataset say, do not make
    every call drop them again); returns whether it did."""
    counts = mappings()
    if counts is None:
        return False
    held, limit = counts
    if held <= fraction * limit or held <= _held_after_drop[0] + growth * limit:
        return False
    jax.clear_caches()
    gc.collect()
    _held_after_drop[0] = mappings()[0]
    return True
