"""The memory budget that work checks its estimated peak against before any compute.

The budget is ``JFACTOR_MEMORY_BUDGET_GB`` (gigabytes) when set, else half the machine's
physical memory.  Factorizations (:mod:`jfactor.factorize.budget`), target kernel families
(:func:`jfactor.kernels.make`) and the fold certificate's probe (:func:`jfactor.fold.fold`)
check their estimates against it.
"""

from __future__ import annotations

import os

import numpy as np

from jfactor.errors import ConfigError

BUDGET_VARIABLE = "JFACTOR_MEMORY_BUDGET_GB"


def memory_budget() -> float:
    """Bytes a run may use: ``JFACTOR_MEMORY_BUDGET_GB``, else half the physical memory."""
    text = os.environ.get(BUDGET_VARIABLE)
    if text is not None:
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"{BUDGET_VARIABLE}={text!r}: expected a number of gigabytes") from None
        if not value > 0:
            raise ConfigError(f"{BUDGET_VARIABLE}={text!r}: must be > 0")
        return value * 1e9
    try:
        return 0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return np.inf


def size_text(nbytes: float) -> str:
    """``nbytes`` as a short text: 1.5 GB, 320.0 MB, ..."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes:.0f} B"


def check_bytes(need: float, what: str, advice: str) -> None:
    """Raise a :class:`ConfigError` where ``need`` bytes pass the budget: ``what`` needs about that
    much; ``advice`` says what to change."""
    budget = memory_budget()
    if need > budget:
        raise ConfigError(f"{what} needs about {size_text(need)}, past the memory budget of {size_text(budget)} "
                          f"({BUDGET_VARIABLE}): {advice}, or raise {BUDGET_VARIABLE}")
