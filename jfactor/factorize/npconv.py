"""Convolution and cross-correlation in numpy, light to import (scipy.signal pulls in scipy.stats,
a large share of a command's start-up).

- :func:`convolve_full` (kernels with kernels, for the result's chain kernel): numpy's FFT at
  the full size, a computation independent of the jax FFT chain kernel the optimiser
  differentiates, to the same float64 rounding;
- :func:`correlate_valid` (images with kernels, for the output-space metric): the same FFT.
"""

from __future__ import annotations

import numpy as np


def correlate_valid(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Valid cross-correlation: x (*n) with kernel (*m) -> (*(n - m + 1)), as DL frameworks compute it:
    the valid part of :func:`convolve_full` with the kernel reversed (memory linear in the sizes)."""
    flipped = kernel[(slice(None, None, -1),) * kernel.ndim]
    return convolve_full(x, flipped)[tuple(slice(m - 1, n) for n, m in zip(x.shape, kernel.shape))]


def convolve_full(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Full convolution: a (*n) with b (*m) -> (*(n + m - 1)), by FFT at the full size (nothing wraps)."""
    size = [n + m - 1 for n, m in zip(a.shape, b.shape)]
    axes = tuple(range(len(size)))
    return np.fft.irfftn(np.fft.rfftn(a, size, axes) * np.fft.rfftn(b, size, axes), size, axes)
