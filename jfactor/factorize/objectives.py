"""What "close to the target" means: residual vectors of the approximate kernel.

Every objective maps ``(approx, target)``, both ``(*k, C_in, C_out)``, to a residual
vector ``r`` normalised so that ``|r| = 1`` for ``approx = 0``; optimizers minimise
``|r|^2 / 2`` and Levenberg-Marquardt uses ``r`` directly, so all three objectives serve
every optimizer.

- ``kernel``: ``approx - target`` (least squares on the taps; by Parseval the same as the
  L2 error of the frequency response, so ``|r|`` is the relative Frobenius error);
- ``spectral``: the frequency-response error on a grid ``pad`` times finer, with
  ``r = |E(w)|^(p/2)``: ``p = 2`` is ``kernel`` again, large ``p`` approaches the worst case
  ``sup |E(w)|``, which bounds the output error for every image;
- ``images``: the difference of the two filters' outputs on images (valid positions,
  the target's stride), i.e. the error weighted by the images' power spectrum; a quadratic
  form in the kernel's error, so factorizations run it on the images' Gram factor
  (:func:`gram_factor`) where that is smaller (:func:`factor_fits`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jfactor._checks import is_int
from jfactor.cache import beside
from jfactor.errors import ConfigError
from jfactor.ops import conv
from jfactor.schema import unknown_key

OBJECTIVES = ("kernel", "spectral", "images")


def _finite_at_least(value, low: float) -> bool:
    """Whether ``value`` is a real number, finite and at least ``low`` (NaN is not)."""
    try:
        return low <= float(value) < math.inf
    except (TypeError, ValueError):
        return False


@dataclasses.dataclass(frozen=True)
class Objective:
    """A hashable objective: ``residual(approx, target, images)`` -> 1-D vector.

    ``images`` (B, *spatial, C_in) is used by the ``images`` objective only (None otherwise);
    ``stride`` is the target's, ``p`` and ``pad`` are the ``spectral`` objective's.  With
    ``factored``, the ``images`` objective takes the images' Gram factor (:func:`gram_factor`,
    (p, p)) in place of the images: the same loss, gradient and Gauss-Newton matrix, from a
    residual of p entries (the kernel's taps times C_in) instead of one per output value.
    """

    name: str = "kernel"
    p: float = 2.0
    pad: int = 4
    stride: tuple[int, ...] = ()
    factored: bool = False

    def __post_init__(self):
        if self.name not in OBJECTIVES:
            raise ConfigError(unknown_key(self.name, OBJECTIVES, "objective"))
        if not _finite_at_least(self.p, 2):
            raise ConfigError(f"objective spectral: p must be a finite number >= 2 (got {self.p!r}); p = 2 is the "
                              "kernel objective")
        if not is_int(self.pad) or self.pad < 1:
            raise ConfigError(f"objective spectral: pad must be a positive integer (got {self.pad!r})")

    @property
    def label(self) -> str:
        return f"spectral_p{self.p:g}" if self.name == "spectral" else self.name

    def raw(self, approx, target, images=None):
        """The unnormalised residual of ``approx`` (*k, C_in, C_out) against ``target``."""
        ndim = approx.ndim - 2
        error = approx - target
        if self.name == "kernel":
            return error.ravel()
        if self.name == "spectral":
            size = tuple(self.pad * n for n in approx.shape[:ndim])
            spectrum = jnp.fft.rfftn(error, s=size, axes=tuple(range(ndim)))
            power = spectrum.real**2 + spectrum.imag**2
            weights = jnp.asarray(np.sqrt(half_spectrum_weights(size[-1], power.ndim - ndim)), power.dtype)
            return (weights * power ** (self.p / 4)).ravel()
        if images is None:
            raise ConfigError("objective images needs images (B, *spatial, C_in)")
        if self.factored:  # images is the Gram factor R (p, p): |R e|^2 is |conv(images, e)|^2 per output channel
            return (images.astype(error.dtype) @ error.reshape(images.shape[0], -1)).ravel()
        out = conv(images.astype(error.dtype), error, strides=self.stride, dilation=(1,) * ndim,
                   pads=((0, 0),) * ndim, groups=1)
        return out.ravel()

    def error_of_loss(self, loss):
        """The relative error a loss ``|r|^2 / 2`` stands for, of degree one in the kernel's error:
        ``(2 loss)^(1/p)`` for ``spectral`` (the error spectrum's p-norm over the target's), ``(2
        loss)^(1/2)`` for the others (for ``kernel`` the kernel's relative error, for ``images`` the
        outputs')."""
        return (2 * np.maximum(loss, 0.0)) ** (1 / (self.p if self.name == "spectral" else 2))

    def residual(self, approx, target, images=None):
        """``raw`` scaled so that ``|residual(0, target)| = 1``."""
        scale = jnp.linalg.norm(self.raw(jnp.zeros_like(target), target, images))
        return self.raw(approx, target, images) / scale


FACTOR_BYTES = 2**26  # the most the Gram matrix (:func:`gram_factor`), or one chunk of windows, may take


def half_spectrum_weights(n: int, trailing: int):
    """How many frequencies each bin of a real FFT's last axis (length ``n``, ``n // 2 + 1`` bins)
    stands for, shaped to broadcast over ``trailing`` axes after it: 1 for the zero frequency and
    (``n`` even) the Nyquist one, 2 for every other (it and its mirror, of equal modulus for a real
    kernel).  Summed with these weights, ``|E|^p`` over the half spectrum is its sum over the whole
    one, so at ``p = 2`` the spectral objective is the kernel one (Parseval)."""
    bins = np.arange(n // 2 + 1)
    return np.where((bins == 0) | (2 * bins == n), 1.0, 2.0).reshape((-1,) + (1,) * trailing)


def factor_taps(kernel_shape: tuple[int, ...]) -> int:
    """p, the rows and columns of :func:`gram_factor` for kernels ``kernel_shape`` (*k, C_in, C_out):
    the kernel's taps times C_in."""
    return math.prod(kernel_shape[:-1])


def factor_fits(image_shape: tuple[int, ...], kernel_shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """Whether the images objective runs on :func:`gram_factor` for images ``image_shape``
    (B, *spatial, C_in) and kernels ``kernel_shape`` (*k, C_in, C_out) at ``stride``: where
    there is a valid position, the factor has fewer rows than the images have outputs, and its
    Gram matrix (p^2 entries in float64) stays under :data:`FACTOR_BYTES`."""
    ndim = len(kernel_shape) - 2
    out = [(n - k) // s + 1 for n, k, s in zip(image_shape[1:-1], kernel_shape[:ndim], stride)]
    taps = factor_taps(kernel_shape)
    return min(out) > 0 and taps < image_shape[0] * math.prod(out) and 8 * taps**2 <= FACTOR_BYTES


def gram_factor(images: np.ndarray, kernel_shape: tuple[int, ...], stride: tuple[int, ...]) -> np.ndarray:
    """R (p, p), p = prod(k) C_in, with ``|R e|^2 = |conv(images, e)|^2`` (valid positions at
    ``stride``, summed over images and output channels) for every kernel ``e`` of ``kernel_shape``
    (*k, C_in, C_out), ``R e`` taken on ``e`` reshaped to (p, C_out).

    The output at position x is the image's window at ``stride * x`` (*k, C_in) dotted with ``e``,
    so ``|conv(images, e)|^2 = e^T M e`` with ``M`` the sum over images and positions of each
    window's outer product (accumulated over chunks of rows of windows, each under
    :data:`FACTOR_BYTES`), and ``R = sqrt(L) Q^T`` from ``M = Q L Q^T`` (float64; ``M`` is positive
    semi-definite, rounding's negative eigenvalues are cut to zero).  images: (B, *spatial, C_in).
    """
    ndim = len(kernel_shape) - 2
    k = tuple(kernel_shape[:ndim])
    taps = factor_taps(kernel_shape)
    gram = np.zeros((taps, taps))
    for image in np.asarray(images, np.float64):
        windows = np.lib.stride_tricks.sliding_window_view(image, k, axis=tuple(range(ndim)))
        windows = windows[tuple(slice(None, None, s) for s in stride)]  # (*out, C_in, *k), a view
        rows = max(1, FACTOR_BYTES // (8 * taps * max(1, math.prod(windows.shape[1:ndim]))))
        for first in range(0, windows.shape[0], rows):
            chunk = np.moveaxis(windows[first:first + rows], ndim, -1).reshape(-1, taps)  # columns (*k, C_in)
            gram += chunk.T @ chunk
    values, vectors = np.linalg.eigh(gram)
    return np.sqrt(np.clip(values, 0.0, None))[:, None] * vectors.T


def image_cache() -> Path | None:
    """``images/`` beside the compile cache in use (None: no cache)."""
    return beside("images")


def sample_image(name: str) -> np.ndarray:
    """skimage.data's image ``name``, decoded once and then kept as ``.npy`` in ``images/``
    beside the compile cache (:mod:`jfactor.cache`; decoding imports skimage.io, ~0.3 s of
    every command's start-up), and in memory for the rest of the process (read-only; reading
    the three default images from disk took about 8 ms of every factorization).  Without a
    compile cache, decoded once per process."""
    return _sample_image(name, image_cache())


@functools.lru_cache(maxsize=16)
def _sample_image(name: str, root: Path | None) -> np.ndarray:
    import skimage
    from skimage import data

    from jfactor.rundir import write_with

    path = None if root is None else root / f"{name}-skimage-{skimage.__version__}.npy"
    image = None
    if path is not None and path.is_file():
        try:
            image = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            pass  # a damaged copy: decode again and replace it
        if image is not None and not _plausible_image(image):
            image = None  # a copy overwritten (all zero, say): decode again and replace it
    if image is None:
        image = getattr(data, name)()
        if path is not None:
            try:
                path.parent.mkdir(mode=0o700, exist_ok=True)
                write_with(path, lambda handle: np.save(handle, image))
            except OSError:
                pass  # a read-only cache only costs the decoding
    image.flags.writeable = False  # shared by every caller in this process
    return image


def _plausible_image(image: np.ndarray) -> bool:
    """Whether a cached sample image can be one: 2-D or 3-D, real numbers, finite, not constant."""
    return (image.ndim in (2, 3) and image.size > 0 and image.dtype.kind in "uif" and bool(np.isfinite(image).all())
            and image.max() > image.min())


def is_image_file(name: str) -> bool:
    """Whether :func:`load_images` reads ``name`` as a file (a name with a suffix) rather than a
    skimage.data name; a URL (``://``) too, read as it is."""
    return "." in str(name)


def local_image_path(name: str, base) -> str:
    """``name`` as :func:`load_images` should read it from a config in directory ``base``: an image
    file relative to ``base`` (an absolute path stays itself), a skimage.data name or a URL as it is."""
    return str((Path(base) / name).resolve()) if is_image_file(name) and "://" not in str(name) else str(name)


def load_images(names_or_paths, size: int = 96, count: int = 4, c_in: int = 1, seed: int = 0,
                ndim: int = 2) -> np.ndarray:
    """Grey float images (count * len(names), *(size,) * ndim, c_in) from skimage.data or files.

    Names are skimage.data functions (``camera``, ``astronaut``, ``coins``, ``moon``, ...);
    anything with a suffix is read as an image file.  Crops are random (seeded); each input
    channel gets its own crop.  ``ndim=1`` takes one row of each crop (a natural 1-D
    signal); ``ndim=3`` stacks ``size`` crops shifted by one pixel (a slowly panning video).
    """
    from skimage import color, data, transform, util

    rng = np.random.default_rng(seed)
    crops = []
    for name in names_or_paths:
        if is_image_file(name):
            from skimage import io

            try:
                image = io.imread(name)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"{name}: cannot read the image: {exc}") from None
        elif hasattr(data, str(name)):
            image = sample_image(str(name))
        else:
            raise ConfigError(f"unknown image {name!r}: give a skimage.data name (camera, astronaut, "
                              "coins, moon, ...) or an image file path")
        image = util.img_as_float(image)
        if image.ndim == 3 and image.shape[-1] in (1, 2):  # grey, with or without alpha
            image = image[..., 0]
        elif image.ndim == 3 and image.shape[-1] in (3, 4):  # colour, with or without alpha
            image = color.rgb2gray(image[..., :3])
        elif image.ndim != 2:
            raise ConfigError(f"{name}: not a grey or colour picture (an array of shape {image.shape}): give a "
                              "2-D image, grey or RGB(A)")
        if not np.isfinite(image).all() or not image.any():  # before resizing, which warns on NaN
            raise ConfigError(f"{name}: the image {'has non-finite values' if image.any() else 'is all zero'}: "
                              "give one with content")
        if min(image.shape) < size:
            image = transform.resize(image, (max(size, image.shape[0]), max(size, image.shape[1])))
        depth = size if ndim == 3 else 1
        if min(image.shape) < size + depth:
            image = transform.resize(image, (size + depth, size + depth))
        for _ in range(count):
            channels = []
            for _ in range(c_in):
                y = rng.integers(0, image.shape[0] - size - depth + 2)
                x = rng.integers(0, image.shape[1] - size - depth + 2)
                frames = np.stack([image[y + t: y + t + size, x + t: x + t + size] for t in range(depth)])
                channels.append(frames[0, size // 2] if ndim == 1 else frames[0] if ndim == 2 else frames)
            crops.append(np.stack(channels, axis=-1))
    return np.stack(crops)
