"""Direct N-d convolution and cross-correlation in numpy: plain sums of products, no FFT.

The results (``chain_kernel_numpy``) and the output-space metric use these, a second
computation independent of the FFT chain kernel the optimiser differentiates, and light to
import (scipy.signal pulls in scipy.stats, a large share of a command's start-up).
"""

from __future__ import annotations

import numpy as np


def correlate_valid(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Valid cross-correlation: x (*n) with kernel (*m) -> (*(n - m + 1)), as DL frameworks compute it."""
    windows = np.lib.stride_tricks.sliding_window_view(x, kernel.shape)
    return np.tensordot(windows, kernel, axes=kernel.ndim)


def convolve_full(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Full convolution: a (*n) with b (*m) -> (*(n + m - 1))."""
    padded = np.pad(a, [(m - 1, m - 1) for m in b.shape])
    return correlate_valid(padded, b[(slice(None, None, -1),) * b.ndim])
