"""Weights from files and seeded initialisers (numpy, float64).

``randint`` follows numpy's ``integers(low, high)`` (high exclusive), so the seed's
``np.random.randint(0, 2, ...)`` and ``randint(-4, 5, ...)`` are
``initialize("randint", shape, low=0, high=2)`` and ``low=-4, high=5``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from jfactor.errors import ConfigError
from jfactor.memory import check_bytes

INITS = ("normal", "uniform", "randint", "zeros", "ones")


def initialize(init: str, shape, *, seed: int = 0, mean: float = 0.0, std: float = 1.0,
               low: float | None = None, high: float | None = None) -> np.ndarray:
    """A float64 array of ``shape`` drawn by ``init`` from ``numpy.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    check_bytes(8 * math.prod(shape), f"weights of shape {shape}", "give fewer filters or smaller kernels")
    if init == "normal":
        _check_finite(init, mean=mean, std=std)
        if std < 0:
            raise ConfigError(f"normal needs std >= 0, got std={std}")
        return rng.normal(mean, std, shape)
    if init == "uniform":
        low, high = (-1.0 if low is None else low), (1.0 if high is None else high)
        _check_finite(init, low=low, high=high)
        if high < low:
            raise ConfigError(f"uniform needs high >= low, got low={low}, high={high}")
        return rng.uniform(low, high, shape)
    if init == "randint":
        low, high = (0 if low is None else low), (2 if high is None else high)
        _check_finite(init, low=low, high=high)
        if max(abs(low), abs(high)) > 2 ** 53:  # float64 holds every integer up to there
            raise ConfigError(f"randint needs |low| and |high| at most 2**53, got low={low}, high={high}")
        low, high = int(low), int(high)
        if high <= low:
            raise ConfigError(f"randint needs high > low, got low={low}, high={high}")
        return rng.integers(low, high, shape).astype(np.float64)
    if init == "zeros":
        return np.zeros(shape)
    if init == "ones":
        return np.ones(shape)
    raise ConfigError(f"unknown init {init!r}; accepted: {', '.join(INITS)}")


def _check_finite(init: str, **numbers) -> None:
    bad = [f"{name}={value}" for name, value in numbers.items() if not math.isfinite(value)]
    if bad:
        raise ConfigError(f"{init} needs finite numbers, got {', '.join(bad)}")


def load(path, key: str | None = None) -> np.ndarray:
    """An array from ``.npy``, or from ``.npz`` (``key`` required when it holds several)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, not a .npy/.npz file")
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    with path.open("rb") as handle:
        head = handle.read(6)
    if not head.startswith((b"\x93NUMPY", b"PK")):
        raise ConfigError(f"{path}: not a .npy or .npz file (numpy's np.save / np.savez write those)")
    try:
        data = np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc):
            raise ConfigError(f"{path}: holds Python objects (pickled), not a numeric array; save one with "
                              "np.save(path, np.asarray(kernel, float))") from None
        raise ConfigError(f"{path}: cannot read as .npy/.npz: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read as .npy/.npz: {exc}") from None
    if isinstance(data, np.lib.npyio.NpzFile):
        names = list(data.files)
        if key is None and len(names) == 1:
            key = names[0]
        if not names:
            raise ConfigError(f"{path}: holds no arrays")
        if key not in names:
            raise ConfigError(f"{path}: needs a key, one of {names}" if key is None
                              else f"{path}: has no array {key!r}; it holds {names}")
        return np.asarray(data[key])
    if key is not None:
        raise ConfigError(f"{path}: a .npy file holds one array; drop key {key!r}")
    return np.asarray(data)
