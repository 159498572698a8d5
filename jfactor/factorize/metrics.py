"""How far an approximate kernel is from its target, in the numbers users ask for.

All functions take numpy arrays ``(*k, C_in, C_out)`` of one shape (float64).
"""

from __future__ import annotations

import math

import numpy as np

from jfactor.factorize.npconv import correlate_valid


def norm(array: np.ndarray) -> float:
    """Frobenius norm, computed without overflow or underflow at any finite scale
    (``np.linalg.norm`` of a 1e300 kernel is inf, of a 1e-200 kernel 0)."""
    peak = float(np.abs(array).max()) if array.size else 0.0
    return 0.0 if peak == 0 else peak * float(np.linalg.norm(array / peak))


def rel_error(approx: np.ndarray, target: np.ndarray) -> float:
    """Relative Frobenius error |approx - target| / |target| (= relative L2 error of the
    frequency response, by Parseval)."""
    return float(np.linalg.norm(approx - target) / np.linalg.norm(target))


def max_abs_error(approx: np.ndarray, target: np.ndarray) -> float:
    return float(np.abs(approx - target).max())


def psnr_db(approx: np.ndarray, target: np.ndarray, taps: int | None = None) -> float | None:
    """Peak signal-to-noise ratio of the taps, peak = max |target|; None when bit-exact.

    The squared error is summed over every tap of both (a chain's taps outside the target's support
    count) and averaged over ``taps``, the target's own number of taps (default: ``target.size``),
    so zero padding around both does not change it."""
    mse = float(np.sum((approx - target) ** 2)) / (target.size if taps is None else taps)
    return None if mse == 0 else 10 * math.log10(float(np.abs(target).max()) ** 2 / mse)


def spectral_error(approx: np.ndarray, target: np.ndarray, pad: int = 8) -> float:
    """Worst-case frequency-response error sup_w |E(w)| / sup_w |T(w)| on a grid ``pad``x finer.

    For multi-channel kernels E(w) is a matrix and |.| its spectral norm; it bounds the
    output error of any input relative to the target's worst-case gain.
    """
    ndim = target.ndim - 2
    size = [pad * n for n in target.shape[:ndim]]
    axes = tuple(range(ndim))

    def gain(kernel):
        spectrum = np.fft.rfftn(kernel, s=size, axes=axes)
        flat = spectrum.reshape(-1, *kernel.shape[-2:])
        return np.linalg.norm(flat, ord=2, axis=(-2, -1)).max()

    return float(gain(approx - target) / gain(target))


def output_psnr_db(approx: np.ndarray, target: np.ndarray, images: np.ndarray, stride) -> float | None:
    """PSNR of ``images`` (B, *spatial, C_in) filtered by approx vs by target, valid positions.

    Peak is the largest |target response|; None when the outputs agree bit for bit.
    """
    ndim = target.ndim - 2
    error_power, peak = 0.0, 0.0
    count = 0
    for image in images:
        for o in range(target.shape[-1]):
            want = sum(correlate_valid(image[..., i], target[..., i, o])
                       for i in range(target.shape[-2]))
            got = sum(correlate_valid(image[..., i], approx[..., i, o])
                      for i in range(target.shape[-2]))
            index = tuple(slice(None, None, s) for s in stride[:ndim])
            want, got = want[index], got[index]
            error_power += float(np.sum((want - got) ** 2))
            count += want.size
            peak = max(peak, float(np.abs(want).max()))
    mse = error_power / max(count, 1)
    return None if mse == 0 else 10 * math.log10(peak**2 / mse)


def summary(approx: np.ndarray, target: np.ndarray, taps: int | None = None) -> dict:
    """The kernel-space metrics as a dict (rel_error, max_abs_error, psnr_db, spectral_error);
    ``taps``: the target's own number of taps where ``target`` is zero-padded (:func:`psnr_db`)."""
    return {
        "rel_error": rel_error(approx, target),
        "max_abs_error": max_abs_error(approx, target),
        "psnr_db": psnr_db(approx, target, taps),
        "spectral_error": spectral_error(approx, target),
    }


def scaled_summary(approx: np.ndarray, target: np.ndarray, images: np.ndarray, stride,
                   taps: int | None = None) -> dict:
    """:func:`summary` and :func:`output_psnr_db`, measured on both kernels divided by the
    target's peak so that any finite scale gives the same relative numbers (max_abs_error is
    scaled back)."""
    peak = float(np.abs(target).max()) or 1.0
    approx, target = approx / peak, target / peak
    measured = summary(approx, target, taps)
    measured["max_abs_error"] *= peak
    measured["output_psnr_db"] = output_psnr_db(approx, target, images, stride)
    return measured
