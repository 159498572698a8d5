"""Target kernel families, as float64 numpy arrays with only spatial axes.

Every family takes ``size`` (odd sizes centre the kernel on a tap) and returns an array
of shape ``(size,) * ndim`` (2-D unless the family is defined in any dimension).
Smoothing kernels sum to one; band-pass kernels (LoG, DoG, Gabor) have zero mean and
unit L1 norm.  ``make(name, size, **params)`` builds one by name, which is how configs
and the CLI refer to them.
"""

from __future__ import annotations

import inspect

import numpy as np

from jfactor._checks import MAX_SPATIAL_DIMS, is_int
from jfactor.errors import ConfigError
from jfactor.memory import check_bytes
from jfactor.schema import unknown_key

_TEMPORARIES = 8  # grid-sized float64 arrays a family holds at once (coordinates and intermediates)


def _grid(size: int, ndim: int = 2) -> list[np.ndarray]:
    """Centred coordinates, one array per axis, each of shape (size,) * ndim."""
    r = np.arange(size) - (size - 1) / 2
    return np.meshgrid(*([r] * ndim), indexing="ij")


def _zero_mean_unit_l1(k: np.ndarray) -> np.ndarray:
    k = k - k.mean()
    return k / np.abs(k).sum()


def gaussian(size: int, sigma: float | None = None, ndim: int = 2) -> np.ndarray:
    """Sampled isotropic Gaussian, sum 1; sigma defaults to size / 6.  Separable (rank 1)."""
    sigma = size / 6 if sigma is None else sigma
    k = np.exp(-sum(x**2 for x in _grid(size, ndim)) / (2 * sigma**2))
    return k / k.sum()


def box(size: int, ndim: int = 2) -> np.ndarray:
    """Uniform average, sum 1.  Separable (rank 1)."""
    return np.full((size,) * ndim, 1.0 / size**ndim)


def log(size: int, sigma: float | None = None) -> np.ndarray:
    """Laplacian of Gaussian (Mexican hat, negated), zero mean, unit L1; sigma defaults to size / 8."""
    sigma = size / 8 if sigma is None else sigma
    y, x = _grid(size)
    r2 = (x**2 + y**2) / (2 * sigma**2)
    return _zero_mean_unit_l1((1 - r2) * np.exp(-r2))


def dog(size: int, sigma: float | None = None, ratio: float = 1.6) -> np.ndarray:
    """Difference of Gaussians G(sigma) - G(ratio * sigma), zero mean, unit L1."""
    sigma = size / 8 if sigma is None else sigma
    return _zero_mean_unit_l1(gaussian(size, sigma) - gaussian(size, ratio * sigma))


def gabor(size: int, sigma: float | None = None, theta: float = 30.0, wavelength: float | None = None,
          phase: float = 0.0, gamma: float = 1.0) -> np.ndarray:
    """Gabor filter at ``theta`` degrees, zero mean, unit L1; wavelength defaults to size / 3."""
    sigma = size / 5 if sigma is None else sigma
    wavelength = size / 3 if wavelength is None else wavelength
    y, x = _grid(size)
    t = np.deg2rad(theta)
    xr, yr = x * np.cos(t) + y * np.sin(t), -x * np.sin(t) + y * np.cos(t)
    envelope = np.exp(-(xr**2 + (gamma * yr) ** 2) / (2 * sigma**2))
    return _zero_mean_unit_l1(envelope * np.cos(2 * np.pi * xr / wavelength + np.deg2rad(phase)))


def _supersampled(size: int, inside, samples: int = 8) -> np.ndarray:
    """Fraction of each pixel for which ``inside(y, x)`` holds, on a samples x samples subgrid."""
    offsets = (np.arange(samples) + 0.5) / samples - 0.5
    y, x = _grid(size)
    cover = np.zeros((size, size))
    for dy in offsets:
        for dx in offsets:
            cover += inside(y + dy, x + dx)
    return cover / samples**2


def disk(size: int, radius: float | None = None) -> np.ndarray:
    """Anti-aliased disk (defocus blur), sum 1; radius defaults to size / 2."""
    radius = size / 2 if radius is None else radius
    k = _supersampled(size, lambda y, x: x**2 + y**2 <= radius**2)
    return k / k.sum()


def ring(size: int, radius: float | None = None, width: float = 1.5) -> np.ndarray:
    """Anti-aliased annulus of ``width`` pixels at ``radius`` (default size / 2 - width), sum 1."""
    radius = size / 2 - width if radius is None else radius

    def inside(y, x):
        r = np.sqrt(x**2 + y**2)
        return (r >= radius - width / 2) & (r <= radius + width / 2)

    k = _supersampled(size, inside)
    return k / k.sum()


def motion_blur(size: int, angle: float = 30.0, length: float | None = None) -> np.ndarray:
    """Anti-aliased line of ``length`` pixels at ``angle`` degrees, one pixel wide, sum 1."""
    length = size - 1 if length is None else length
    t = np.deg2rad(angle)

    def inside(y, x):
        along = x * np.cos(t) - y * np.sin(t)
        across = x * np.sin(t) + y * np.cos(t)
        return (np.abs(along) <= length / 2) & (np.abs(across) <= 0.5)

    k = _supersampled(size, inside)
    return k / k.sum()


def random_normal(size: int, seed: int = 0, ndim: int = 2) -> np.ndarray:
    """Standard normal taps, seeded."""
    return np.random.default_rng(seed).standard_normal((size,) * ndim)


def randint(size: int, low: int = 0, high: int = 2, seed: int = 0, ndim: int = 2) -> np.ndarray:
    """The seed's random integer kernels: numpy ``integers(low, high)`` (high exclusive)."""
    return np.random.default_rng(seed).integers(low, high, (size,) * ndim).astype(np.float64)


FAMILIES = {
    "gaussian": gaussian, "box": box, "log": log, "dog": dog, "gabor": gabor, "disk": disk,
    "ring": ring, "motion_blur": motion_blur, "random_normal": random_normal, "randint": randint,
}
SEPARABLE = ("gaussian", "box")
# parameters that are lengths or ratios: finite and > 0 (a negative sigma once made a valid-looking kernel)
POSITIVE = {"sigma", "ratio", "radius", "width", "length"}


def _real(value) -> float | None:
    """``value`` as a float where it is one real number (a Python, numpy or jax scalar), else None."""
    if isinstance(value, (bool, str)) or np.ndim(value) != 0 or not np.isrealobj(value):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def make(name: str, size: int, **params) -> np.ndarray:
    """The kernel of family ``name`` with ``size`` and family parameters; errors name the bad one."""
    if name not in FAMILIES:
        raise ConfigError(unknown_key(name, FAMILIES, "kernel family"))
    function = FAMILIES[name]
    accepted = [p for p in inspect.signature(function).parameters if p != "size"]
    for key in params:
        if key not in accepted:
            raise ConfigError(f"kernel family {name!r}: {unknown_key(key, accepted, 'parameter')}")
    if not is_int(size) or size < 1:
        raise ConfigError(f"kernel family {name!r}: size must be a positive integer, got {size!r}")
    for key, value in params.items():  # every parameter of every family is one real number (None: its default)
        if value is not None and not is_int(value) and (_real(value) is None or not np.isfinite(_real(value))):
            raise ConfigError(f"kernel family {name!r}: {key} must be a finite number, got {value!r}")
    for key in POSITIVE & {k for k, v in params.items() if v is not None}:
        value, zero_ok = _real(params[key]), (name, key) == ("ring", "radius")  # a ring of radius 0: a small disk
        if value < 0 or (value == 0 and not zero_ok):
            bound = "a number >= 0" if zero_ok else "a positive number"
            raise ConfigError(f"kernel family {name!r}: {key} must be {bound}, got {params[key]!r}")
    ndim = params.get("ndim", 2)
    if not (is_int(ndim) and 1 <= ndim <= MAX_SPATIAL_DIMS):
        # a 4-D family kernel (k, k, k, k) would read as a 2-D one with k channels in and out
        dims = ", ".join(map(str, range(1, MAX_SPATIAL_DIMS))) + f" or {MAX_SPATIAL_DIMS}"
        raise ConfigError(f"kernel family {name!r}: ndim must be {dims}, got {ndim!r}")
    try:
        need = _TEMPORARIES * 8 * float(size) ** ndim
    except OverflowError:
        need = np.inf
    check_bytes(need, f"kernel family {name!r}: size {size} in {ndim} dimensions", "use a smaller size")
    try:
        with np.errstate(all="ignore"):  # a size too small for the family divides by zero
            kernel = function(int(size), **params)
    except (TypeError, ValueError, ArithmeticError) as exc:  # a parameter numpy cannot use (a string, 1e200, ...)
        reason = exc.args[-1] if isinstance(exc, OverflowError) and exc.args else exc  # not (34, 'Numerical ...')
        raise ConfigError(f"kernel family {name!r}: parameters {params}: {reason}") from None
    if not np.isfinite(kernel).all():
        raise ConfigError(f"kernel family {name!r}: size {size} with {params or 'the default parameters'} gives "
                          "non-finite values (too small for the family, or a parameter out of range): use a larger "
                          "size or other parameters")
    return kernel
