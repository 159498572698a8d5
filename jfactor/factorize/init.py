"""Initial factors: random, rank-R separable (SVD), and 1-D polynomial root splitting.

A 1-D kernel ``u`` of length N is the coefficient list of a polynomial of degree N - 1,
and the full convolution of kernels is the product of their polynomials.  Splitting the
roots of ``u`` into groups of ``k_i - 1`` (complex roots with their conjugates, so every
factor stays real) therefore factors ``u`` *exactly* into kernels of sizes ``k_i``.  A
2-D target is a sum of separable terms ``sigma_r u_r v_r^T`` (its SVD); splitting each
``u_r`` and ``v_r`` gives a chain whose channel ``r`` carries term ``r``, so a chain of
width R reproduces the rank-R SVD truncation exactly (separable targets: exact).

- ``roots``: the above, for chains without dilation (a dilated kernel is a polynomial in
  ``z**d``, which generic roots do not split into);
- ``svd``: the same rank-R terms, each 1-D vector split by alternating least squares into
  the chain's (possibly dilated) 1-D factors, so it also serves dilated chains;
- ``lines``: for a 2-D target along a slanted axis (a motion blur at an angle), its profile
  along that axis split by roots, each 1-D factor drawn as a line at the same angle
  (bilinear weights) into its 2-D factor.  The bilinear spread blurs each factor, so the
  start is not close to the target, but LM from there lands in basins random starts rarely
  reach: on a 15x15 motion blur at 30 degrees into 3-5-9, 1-3 of 64 line starts (LM alone)
  reached a minimum 0.3% below the best that 1,024 random starts had found in 5 tries.
  Taps one unit apart along the axis, or (``grid``) one pixel apart along its dominant grid
  axis: at 45 degrees those fall on the diagonal's pixels, and on an 11x11 line at 45
  degrees into 3-5-5, 15 of 128 such starts reached its best minimum, 1 of 128 unit-spaced;
- comb starts (:func:`comb_init`, two of an ``auto`` wave of a target with a slanted axis):
  dilated lines, layer after layer (smallest first) a short line along the axis whose taps
  lie 1, 2, 4, ... grid steps apart, so few taps span the whole line, as in a dilated
  cascade.  On a 15x15 line at 15 degrees into 3-5-9 the best minimum known (1.411e-2; 1,024
  plain restarts end 1.61x above it) has that shape, and 98 of 128 such starts reach it (LM
  alone; line starts 2 of 128); on lines at 30 and 45 degrees none do;
- ``blurs``, for band-pass targets (:data:`BAND_PASS`): every factor but one a Gaussian
  blur (random widths per axis), the remaining one (drawn at random) the least-squares fit
  of the target given them, which the chain is linear in: the target deconvolved by the
  blurs.  On a 15x15 Gabor into 3-5-9 that is the best minimum known (5.955e-3, low-pass
  3x3 and 5x5 factors and a 9x9 one that is the Gabor deconvolved): 3 of 64 such starts
  reach it (LM alone), where 4,096 restarts in waves did not.  On low-pass targets (lines,
  disks) none reached the best minimum in 64.  The same move from a minimum already found
  (:func:`blur_hop`: one factor a new blur, another refitted, the rest kept) carries the
  search between basins that noise around the minimum does not leave; on a chain of three or
  more layers its blur sits up to half a tap off the centre (:data:`BLUR_HOP_SHIFT`), or from
  a symmetric minimum it could only reach symmetric ones (the 15x15 LoG's best is not).  Where the target
  is left alone by exchanging axes (a DoG, a LoG), the blurs are isotropic: the best
  minimum of the 15x15 DoG into 3-5-9 (3.13e-4, blurs of widths 0.86 and 1.2 and the 9x9
  fitted) lies in a window of width space that 2 of 144 isotropic starts on a grid reach
  (all others end 3.1x above it), and anisotropic widths, drawn per axis, almost never do;
- impulse starts (:func:`impulse_start`, about a quarter of the ``auto`` starts of chains of
  three or more layers; two starts in all for two layers, where nothing random is left): one
  factor a unit impulse, a layer that passes its input on, another refitted by least squares
  given the rest.  The best chain of a line often leaves its smallest layer near an impulse: on the
  15x15 line at 60 degrees into 3-5-9, 216 of 512 line starts with the 3x3 an impulse and
  the 5x5 refitted reached the best minimum, 0 of 512 line starts as they are; on the 13x13
  disk into 5-9, the one start with the 9x9 an impulse and the 5x5 refitted does, 2 of 256
  random starts.  They do not help everywhere (an 11x11 line at 45 degrees: every pairing
  ends 2-6x above the best, which grid-spaced line starts reach; so grid-spaced lines and
  symmetric starts are left as they are);
- redraw hops (:func:`redraw_hop`, from a minimum already found, where the target has mirror
  symmetries and the chain three or more layers): one factor a new symmetric random draw,
  another refitted, the rest kept.  Good minima share factors, and a minimum one factor
  away from a better one lies in a basin its noise hops do not leave;
- ``random``: normal factors scaled so the chain's kernel has the target's norm.

Inits are numpy (float64), built once per target before any compilation.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np

from jfactor.factorize import symmetry
from jfactor.factorize.chain import Chain, Target, chain_kernel_numpy, check_chain
from jfactor.factorize.objectives import half_spectrum_weights

INITS = ("auto", "roots", "svd", "lines", "blurs", "random")
ANISOTROPY = 4.0  # the least ratio of a target's second moments along and across its axis for line starts
AXIS_TOLERANCE_DEG = 2.0  # an axis this close to the grid's is served by the separable starts


def _units(roots: np.ndarray, tol: float = 1e-9) -> list[np.ndarray]:
    """Group roots into real-coefficient units: a real root, or a conjugate pair."""
    units, used = [], np.zeros(len(roots), bool)
    for i, r in enumerate(roots):
        if used[i]:
            continue
        used[i] = True
        if abs(r.imag) <= tol * max(1.0, abs(r)):
            units.append(np.array([r.real]))
            continue
        candidates = [j for j in range(len(roots)) if not used[j]]
        j = min(candidates, key=lambda j: abs(roots[j] - np.conj(r)))
        used[j] = True
        units.append(np.array([r, np.conj(r)]))
    return units


@functools.lru_cache(maxsize=256)
def _root_units(core: bytes) -> tuple[np.ndarray, ...]:
    """:func:`_units` of the roots of the float64 polynomial ``core`` (its bytes): computed once
    per vector, as every restart splits the same few vectors."""
    coefficients = np.frombuffer(core)
    return tuple(_units(np.roots(coefficients))) if len(coefficients) > 1 else ()


# tails of tiny taps (a Gaussian of sigma 0.1 on a 7x7 grid: 1e-196) give roots far out, whose
# polynomials overflow: such a start is non-finite and counted as diverged, without numpy's warnings
@np.errstate(over="ignore", invalid="ignore")
def split_roots(u: np.ndarray, sizes: list[int], rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """1-D factors ``f_i`` of lengths ``sizes`` with ``convolve(f_1, ..., f_L) ~= u``.

    Exact whenever the roots can be grouped with real coefficients; otherwise a conjugate
    pair is split into two real roots and the product is only close.  ``rng`` shuffles
    the grouping (restarts see other, equally exact, factorizations); without it units
    are dealt in order of their angle, so each factor covers one frequency band.
    """
    u = np.asarray(u, np.float64)
    nonzero = np.flatnonzero(u)
    lead, trail = nonzero[0], len(u) - 1 - nonzero[-1]
    units = list(_root_units(u[lead: len(u) - trail].tobytes()))
    units += [np.array([0.0])] * trail + [np.array([np.inf])] * lead
    if rng is None:
        units.sort(key=lambda unit: (np.isinf(unit[0]), abs(np.angle(unit[0]))))
    else:
        rng.shuffle(units)
    slots = [k - 1 for k in sizes]
    groups: list[list[complex]] = [[] for _ in sizes]
    for unit in sorted(units, key=len, reverse=True):  # pairs first, they are the hard part
        fits = [i for i in range(len(sizes)) if len(groups[i]) + len(unit) <= slots[i]]
        if fits:
            target = fits[0] if rng is None else fits[rng.integers(len(fits))]
            groups[target].extend(unit)
            continue
        for value in unit:  # no room for the pair: split it into real roots (inexact)
            i = next(i for i in range(len(sizes)) if len(groups[i]) < slots[i])
            groups[i].append(value.real)
    factors = []
    for group, k in zip(groups, sizes):
        finite = [r for r in group if not np.isinf(r)]
        poly = np.real(np.poly(finite)) if finite else np.ones(1)
        factors.append(np.concatenate([np.zeros(k - len(poly)), poly]))
    return _balance_1d(factors, u)


def _balance_1d(factors: list[np.ndarray], u: np.ndarray, dilations=None) -> list[np.ndarray]:
    """Scale factors to equal norms whose (dilated) product matches ``u``'s scale and sign."""
    product = _conv_all(factors, dilations or [1] * len(factors))
    scale = np.dot(product, u) / max(np.dot(product, product), 1e-300)
    norms = [max(np.linalg.norm(f), 1e-300) for f in factors]
    each = abs(scale * math.prod(norms)) ** (1 / len(factors))
    out = [f / n * each for f, n in zip(factors, norms)]
    out[0] *= np.sign(scale) or 1.0
    return out


def _spread(f: np.ndarray, d: int) -> np.ndarray:
    out = np.zeros((len(f) - 1) * d + 1)
    out[::d] = f
    return out


def _conv_all(factors, dilations) -> np.ndarray:
    product = np.ones(1)
    for f, d in zip(factors, dilations):
        product = np.convolve(product, _spread(f, d))
    return product


def split_als(u: np.ndarray, sizes: list[int], dilations: list[int], rng: np.random.Generator,
              sweeps: int = 60) -> list[np.ndarray]:
    """1-D factors of (dilated) sizes fitted to ``u`` by alternating least squares."""
    factors = [rng.standard_normal(k) for k in sizes]
    n = len(u)
    for _ in range(sweeps):
        for i, (k, d) in enumerate(zip(sizes, dilations)):
            others = _conv_all([f for j, f in enumerate(factors) if j != i],
                               [dd for j, dd in enumerate(dilations) if j != i])
            # columns: the others' product shifted to each tap of factor i
            columns = np.zeros((n, k))
            for t in range(k):
                stop = min(n, t * d + len(others))
                columns[t * d: stop, t] = others[: stop - t * d]
            factors[i] = np.linalg.lstsq(columns, u, rcond=None)[0]
    return _balance_1d(factors, u, dilations)


def _in_extent(target: Target, chain: Chain) -> np.ndarray:
    """A single-channel target's kernel zero-padded to the chain's extent, centred as
    :func:`jfactor.factorize.chain.check_chain` places it: (*extent,)."""
    return np.pad(target.kernel[..., 0, 0], check_chain(chain, target))


@functools.lru_cache(maxsize=64)
def _svd(kernel: bytes, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``numpy.linalg.svd`` of the float64 matrix ``kernel`` (its bytes, ``shape``), computed once
    per target (read-only: every restart shares it)."""
    factors = np.linalg.svd(np.frombuffer(kernel).reshape(shape))
    for kept in factors:
        kept.flags.writeable = False
    return factors


def separable_init(target: Target, chain: Chain, method: str, rng: np.random.Generator,
                   shuffle: bool) -> list[np.ndarray] | None:
    """Rank-R separable factors for single-channel 1-D/2-D targets; None where undefined.

    ``method`` is ``roots`` or ``svd``; ``shuffle`` draws another root grouping.
    """
    if target.c_in != 1 or target.c_out != 1 or target.ndim > 2:
        return None
    dilations = chain.effective_dilations
    if method == "roots" and any(d != 1 for dil in dilations for d in dil):
        return None
    kernel = _in_extent(target, chain)

    def split(vector, dim):
        sizes = [layer.size[dim] for layer in chain.layers]
        if method == "roots":
            return split_roots(vector, sizes, rng if shuffle else None)
        return split_als(vector, sizes, [d[dim] for d in dilations], rng)

    widths = chain.channels(1, 1)
    factors = [np.zeros(layer.size + (widths[i], widths[i + 1])) for i, layer in enumerate(chain.layers)]
    if target.ndim == 1:
        terms = [(1.0, [kernel])]
    else:
        u, s, vt = _svd(kernel.tobytes(), kernel.shape)
        terms = [(s[r], [u[:, r], vt[r]]) for r in range(min(len(s), min(widths[1:-1] or [1])))]
    for r, (sigma, vectors) in enumerate(terms):
        per_dim = [split(v, dim) for dim, v in enumerate(vectors)]
        scale = abs(sigma) ** (1 / len(chain.layers))
        for i in range(len(chain.layers)):
            piece = per_dim[0][i]
            for dim in range(1, len(per_dim)):
                piece = np.multiply.outer(piece, per_dim[dim][i])
            cin = 0 if i == 0 else r
            cout = 0 if i == len(chain.layers) - 1 else r
            factors[i][..., cin, cout] = piece * scale
    return factors


PROJECTION_GROUPINGS = 256  # the most root groupings :func:`projection_starts` fits (a start each)
_GROUPINGS_SEEN = 20_000  # the most it enumerates before drawing that many among them
PINNED_ITERATIONS = 40  # Levenberg-Marquardt steps of the pinned fits (:func:`_pinned_fits`)
RECIPROCAL_TOLERANCE = 1e-3  # relative: roots this close to each other's reciprocal belong together


def _reciprocal_units(units: list[np.ndarray]) -> list[np.ndarray]:
    """``units`` (real roots and conjugate pairs, :func:`_units`) merged with their reciprocals'
    units: the roots of a palindromic polynomial (a mirror-symmetric factor's sums) come in sets
    closed under ``r -> 1/r``, so no such factor takes a root without its reciprocal.  A unit
    on the unit circle (or at +-1) is its own; one with no reciprocal within
    :data:`RECIPROCAL_TOLERANCE` stays alone."""
    left, merged = list(units), []
    while left:
        unit = left.pop(0)
        inverse = 1 / unit[0] if unit[0] != 0 else np.inf
        if abs(abs(unit[0]) - 1) <= RECIPROCAL_TOLERANCE or not left:
            merged.append(unit)
            continue
        distances = [np.min(np.abs(other - inverse)) for other in left]
        nearest = int(np.argmin(distances))
        if distances[nearest] <= RECIPROCAL_TOLERANCE * abs(inverse):
            merged.append(np.concatenate([unit, left.pop(nearest)]))
        else:
            merged.append(unit)
    return merged


def _groupings(sizes: list[int], slots: list[int], alike: list) -> list[tuple[int, ...]]:
    """Every way to deal units of ``sizes`` roots to factors with ``slots`` roots each, filling
    every factor exactly: a factor index per unit.  Factors with equal ``alike`` labels (layers
    of one shape, which a chain of width 1 may swap) are dealt in order (the first unit of the
    earlier factor before the later one's), so no chain is listed twice.  At most
    :data:`_GROUPINGS_SEEN` of them, the first in lexicographic order."""
    found: list[tuple[int, ...]] = []

    def deal(unit: int, dealt: list[int], left: list[int]) -> None:
        if len(found) >= _GROUPINGS_SEEN:
            return
        if unit == len(sizes):
            if not any(left):
                found.append(tuple(dealt))
            return
        for factor, room in enumerate(left):
            # an untouched factor of a shape whose earlier factor is untouched too would repeat a chain
            repeats = any(alike[other] == alike[factor] and other not in dealt for other in range(factor))
            if sizes[unit] <= room and (factor in dealt or not repeats):
                left[factor] -= sizes[unit]
                deal(unit + 1, dealt + [factor], left)
                left[factor] += sizes[unit]

    deal(0, [], list(slots))
    return found


def _orbits(size: tuple[int, ...], group: list[tuple]) -> np.ndarray:
    """The orbits of a ``size`` kernel's taps under ``group`` (each tap its own where it is
    empty), as indicator rows (n, prod(size)): the kernels every map of ``group`` leaves
    unchanged are their combinations."""
    if not group:
        return np.eye(math.prod(size))
    impulses = np.eye(math.prod(size)).reshape((-1,) + size)
    averaged = np.stack([symmetry.project(tap, group, signed=False).ravel() for tap in impulses])
    return np.unique(averaged > 0, axis=0).astype(float)


def _pinned_fits(taps: list[np.ndarray], free: list[np.ndarray], kernel: np.ndarray,
                 chain: Chain) -> tuple[list[np.ndarray], np.ndarray]:
    """For each of G pinned chains at once, the chain scaled by ``s`` that fits ``kernel``
    (*extent,) best, each factor ``taps[i][g]`` (prod(k_i),) plus a combination ``q_i`` of the
    rows of ``free[i]`` (m_i, prod(k_i)): Levenberg-Marquardt (Marquardt's diagonal damping) on
    ``(s, q_1, ..., q_L)`` from ``q = 0`` and the best ``s``, :data:`PINNED_ITERATIONS` steps,
    every row its own damping, then ``s`` set to the best scale of the chain each reached.

    It works in the spectrum: a chain of width 1 without dilations is the product of its
    factors' spectra on the ``extent`` grid (its full convolution fits there exactly), each
    factor's spectrum is linear in its ``q_i``, and the first factor's carries the weights
    that keep inner products (:func:`_spectral_weights`), so a step costs a few batched
    products and no inverse transform.
    Args: ``taps``, per factor (G, prod(k_i)).  Returns the factors, per factor
    (G, *k_i, 1, 1) with ``s`` spread evenly over them, and the fits' errors (G,).
    """
    sizes = [layer.size for layer in chain.layers]
    root = np.sqrt(_spectral_weights(kernel.shape)).ravel()

    def spectrum(a, size, weighted=False):
        """(n, F): the flat real FFT on the ``extent`` grid of ``a`` (n, prod(size)), times ``root``
        where ``weighted``."""
        flat = np.fft.rfftn(a.reshape((-1,) + size), kernel.shape, axes=range(-kernel.ndim, 0))
        flat = flat.reshape(len(a), root.size)  # (0, F) for a factor its sums pin whole (a 1x1)
        return flat * root if weighted else flat

    base = [spectrum(t, size, i == 0) for i, (t, size) in enumerate(zip(taps, sizes))]  # (G, F) each
    moves = [spectrum(f, size, i == 0) for i, (f, size) in enumerate(zip(free, sizes))]  # (m_i, F) each
    bounds = np.cumsum([1] + [f.shape[0] for f in free])
    target = spectrum(kernel.reshape(1, -1), kernel.shape, True)[0]

    def evaluate(x, jacobian: bool):
        """The unscaled chains' weighted spectra (G, F) at ``x`` (G, P) and, with ``jacobian``,
        the residuals' (G, P, F)."""
        spectra = [b + x[:, lo:hi] @ m for b, m, lo, hi in zip(base, moves, bounds, bounds[1:])]
        chain_kernel = np.prod(spectra, axis=0)
        if not jacobian:
            return chain_kernel, None
        columns = [chain_kernel[:, None]]
        for i, m in enumerate(moves):
            others = np.prod(spectra[:i] + spectra[i + 1:] + [np.ones_like(chain_kernel)], axis=0)
            columns.append((x[:, :1] * others)[:, None] * m)
        return chain_kernel, np.concatenate(columns, axis=1)

    def inner(a, b):
        """The real inner products of weighted spectra: ``a`` (..., F) and ``b`` (..., F, k)."""
        return np.real(a.conj() @ b)

    def power(spectra):
        """The squared norms (G,) of the kernels whose weighted spectra are ``spectra`` (G, F)."""
        return np.sum(np.abs(spectra) ** 2, axis=1)

    def residual(x, chain_kernel):
        return x[:, :1] * chain_kernel - target

    def best_scale(chain_kernel):
        return (inner(chain_kernel[:, None], target[:, None])[:, 0, 0]
                / np.maximum(power(chain_kernel), np.finfo(float).tiny))

    x = np.zeros((len(taps[0]), bounds[-1]))
    x[:, 0] = best_scale(evaluate(x, False)[0])
    damping = np.full(len(x), 1e-3)
    with np.errstate(over="ignore", invalid="ignore"):  # a fit that overflows ends non-finite: no start
        for _ in range(PINNED_ITERATIONS if x.shape[1] > 1 else 0):
            chain_kernel, jac = evaluate(x, True)
            now = residual(x, chain_kernel)
            normal = inner(jac, jac.transpose(0, 2, 1))
            diagonal = np.einsum("gpp->gp", normal)
            floor = 1e-12 * diagonal.max(axis=1, keepdims=True) + np.finfo(float).tiny
            damped = normal + (damping[:, None] * np.maximum(diagonal, floor))[..., None] * np.eye(x.shape[1])
            trial = x - np.linalg.solve(damped, inner(jac, now[..., None]))[..., 0]
            better = power(residual(trial, evaluate(trial, False)[0])) < power(now)  # a NaN trial fails this
            x = np.where(better[:, None], trial, x)
            damping = np.clip(np.where(better, damping / 3, damping * 2), 1e-12, 1e12)
        chain_kernel = evaluate(x, False)[0]
        x[:, 0] = best_scale(chain_kernel)
        errors = np.sqrt(power(residual(x, chain_kernel)))
    spread = np.abs(x[:, 0]) ** (1 / len(taps))
    factors = [((t + x[:, lo:hi] @ f) * spread[:, None]).reshape((-1,) + size + (1, 1))
               for t, f, lo, hi, size in zip(taps, free, bounds, bounds[1:], sizes)]
    factors[0] = factors[0] * np.sign(x[:, 0]).reshape((-1,) + (1,) * (factors[0].ndim - 1))
    return factors, errors


def _spectral_weights(extent: tuple[int, ...]) -> np.ndarray:
    """(*extent[:-1], extent[-1] // 2 + 1): weights ``w`` that make the real FFTs ``A`` and ``B``
    on the ``extent`` grid of real ``a`` and ``b`` keep their inner product,
    ``sum(w * real(conj(A) * B)) == sum(a * b)`` (Parseval: a frequency the real FFT holds for
    itself and its mirror counts twice: :func:`jfactor.factorize.objectives.half_spectrum_weights`)."""
    weight = half_spectrum_weights(extent[-1], 0) / math.prod(extent)
    return np.broadcast_to(weight, tuple(extent[:-1]) + weight.shape)


def _pinned_taps(bases: list[np.ndarray], sums: list[np.ndarray], roots: list[list[complex]]) -> list[np.ndarray]:
    """Per factor, the kernel (prod(k_i),) of least coefficients in its basis (n_i, prod(k_i))
    whose first-axis sums are the monic polynomial of its ``roots``, ``sums`` (k_i[1], n_i) the
    basis kernels' sums."""
    return [np.linalg.lstsq(summed, np.real(np.poly(mine)) if mine else np.ones(1), rcond=None)[0] @ basis
            for basis, summed, mine in zip(bases, sums, roots)]


def projection_starts(target: Target, chain: Chain, rng: np.random.Generator,
                      limit: int = PROJECTION_GROUPINGS) -> list[list[np.ndarray]]:
    """Starts from the root groupings of the target's sums over its first axis, best first; []
    where they do not apply.

    Summing a 2-D chain over its first axis gives the 1-D chain of its factors' sums, so a chain
    that fits the target shares the roots of the target's sums out among its factors (the 15x15
    ring's best chain into 3-5-9 and its minimum 1.09x above it in two different ways;
    ``docs/search.md``).  Every grouping of those roots into the factors' degrees (conjugates
    together, and reciprocals where the target's mirrors make every factor's sums palindromic,
    :func:`_reciprocal_units`; at most ``limit`` groupings, drawn with ``rng`` among the first
    :data:`_GROUPINGS_SEEN` where there are more) pins each factor's sums to its roots'
    polynomial.  Each factor is invariant under the target's mirror symmetries
    (:func:`jfactor.factorize.symmetry.start_group`; none: any kernel) and the rest of it is
    fitted to the target with the chain's scale (:func:`_pinned_fits`, which keeps the sums),
    from the pinned kernel of least taps' norm (the fit has minima of its own: with scipy's LM,
    one fit at a time, only the kernel of least norm in the tap orbits' values led the 15x15
    ring to its best basin, and only this one the 11x11 ring; with these fits this one leads
    both).  Sorted by the fit's error.  The fits run as one batch: the 15x15 ring's 105 into
    3-5-9 took 0.2 s on a 2-core CPU (scipy's LM, one at a time, 5 s).

    Applies to a single-channel 2-D target whose sums' end taps are not (nearly) zero and whose
    symmetries, where it has mirror ones, keep its sign, and a chain of width 1 with no frozen,
    dilated or strided layer.  Returns: starts, each a list of factors (*k_i, 1, 1).
    """
    if (target.ndim != 2 or target.c_in != 1 or target.c_out != 1 or any(w != 1 for w in chain.widths)
            or any(layer.frozen for layer in chain.layers) or any(s != 1 for s in target.stride)
            or any(d != 1 for dilation in chain.effective_dilations for d in dilation)):
        return []
    kernel = _in_extent(target, chain)
    group = symmetry.start_group(kernel[..., None, None], chain)
    if any(sign != 1 for _, sign in group):
        return []
    sums = kernel.sum(axis=0)
    if min(abs(sums[0]), abs(sums[-1])) <= 1e-8 * np.abs(sums).max():  # roots lost to infinity or crowding 0
        return []
    units = _units(np.roots(sums))
    if any(perm == (0, 1) and flips[1] for (perm, flips), _ in group):  # every factor's sums palindromic
        units = _reciprocal_units(units)
    layers = chain.layers
    groupings = _groupings([len(unit) for unit in units], [layer.size[1] - 1 for layer in layers],
                           [layer.size for layer in layers])
    if not groupings:  # no sharing fills every factor (reciprocal sets wider than a factor's degree)
        return []
    if len(groupings) > limit:
        groupings = [groupings[i] for i in np.sort(rng.choice(len(groupings), limit, replace=False))]
    # the orbits scaled to unit norm: least coefficients in them are least taps' norm
    bases = [o / np.sqrt(o.sum(axis=1, keepdims=True)) for o in (_orbits(layer.size, group) for layer in layers)]
    summed = [basis.reshape((-1,) + layer.size).sum(axis=1).T for basis, layer in zip(bases, layers)]
    free = [np.linalg.svd(m)[2][np.linalg.matrix_rank(m):] @ basis for basis, m in zip(bases, summed)]
    pinned = [_pinned_taps(bases, summed, [[root for unit, owner in zip(units, grouping) if owner == i
                                             for root in unit] for i in range(len(layers))])
              for grouping in groupings]
    factors, errors = _pinned_fits([np.stack(taps) for taps in zip(*pinned)], free, kernel, chain)
    kept = [g for g in np.argsort(errors, kind="stable") if np.isfinite(errors[g])]  # NaN or overflow: no start
    return [[f[g] for f in factors] for g in kept]


def principal_angle(kernel: np.ndarray) -> float | None:
    """The angle (radians, of the (dy, dx) unit vector ``(-sin, cos)``) of a 2-D kernel's long
    axis: the main eigenvector of the second moments of ``|kernel|`` about its centroid.

    None where the kernel has no clear axis (moment ratio under :data:`ANISOTROPY`: disks,
    Gaussians, Gabors with a round envelope) or where the axis is within
    :data:`AXIS_TOLERANCE_DEG` of the grid's (separable starts cover those).
    """
    weight = np.abs(kernel)
    total = weight.sum()
    if kernel.ndim != 2 or not total > 0:
        return None
    grid = np.indices(kernel.shape).reshape(2, -1).astype(np.float64)
    centred = grid - (grid * weight.ravel()).sum(axis=1, keepdims=True) / total
    moments = (centred * weight.ravel()) @ centred.T / total
    values, vectors = np.linalg.eigh(moments)
    if values[1] < ANISOTROPY * max(values[0], 1e-12 * values[1]):
        return None
    dy, dx = vectors[:, 1]
    angle = np.arctan2(-dy, dx) % np.pi
    off_axis = min(angle % (np.pi / 2), np.pi / 2 - angle % (np.pi / 2))
    return None if np.rad2deg(off_axis) < AXIS_TOLERANCE_DEG else float(angle)


def _along(values: np.ndarray, shape: tuple[int, int], direction: np.ndarray) -> np.ndarray:
    """A 1-D kernel drawn as a line through the centre of a ``shape`` grid along ``direction``
    (dy, dx), unit spacing, each tap shared between its four nearest pixels (bilinear)."""
    taps, pixels, weights = _line_stencil(len(values), shape, tuple(direction))
    out = np.zeros(math.prod(shape))
    np.add.at(out, pixels, values[taps] * weights)  # tap after tap, in order
    return out.reshape(shape)


@functools.lru_cache(maxsize=256)
def _line_stencil(count: int, shape: tuple[int, int], direction: tuple[float, float]):
    """Which tap of a ``count``-tap line adds to which pixel (raveled) with which bilinear weight,
    taps in order: (taps, pixels, weights), each (entries,)."""
    centre = (np.array(shape) - 1) / 2
    taps, pixels, weights = [], [], []
    for j in range(count):
        point = centre + (j - (count - 1) / 2) * np.array(direction)
        low = np.floor(point).astype(int)
        for corner in np.ndindex(2, 2):
            pixel = low + corner
            if (pixel >= 0).all() and (pixel < shape).all():
                taps.append(j)
                pixels.append(np.ravel_multi_index(tuple(pixel), shape))
                weights.append(np.prod(np.where(corner, point - low, 1 - (point - low))))
    return np.array(taps, int), np.array(pixels, int), np.array(weights, np.float64)


def _axis(target: Target, chain: Chain, grid: bool = False):
    """:func:`_line_profile` of a single-channel 2-D target for a chain without frozen or
    dilated layers: its long axis's direction and profile, or None (no line starts)."""
    if (target.c_in != 1 or target.c_out != 1 or target.ndim != 2 or any(layer.frozen for layer in chain.layers)
            or any(d != 1 for dil in chain.effective_dilations for d in dil)):
        return None
    lengths = tuple(min(layer.size) for layer in chain.layers)
    return _line_profile(_in_extent(target, chain).tobytes(), chain.extent, lengths, grid)


def has_line_axis(target: Target, chain: Chain) -> bool:
    """Whether :func:`line_init` applies: a slanted long axis, one channel, no frozen or dilated layer."""
    return _axis(target, chain) is not None


def line_init(target: Target, chain: Chain, rng: np.random.Generator, shuffle: bool,
              jitter: float = 0.1, grid: bool = False) -> list[np.ndarray] | None:
    """Factors that are lines along the target's long axis (:func:`principal_angle`), drawn in
    channel 0 of wide chains; None where there is no such axis, for targets that are not
    single-channel 2-D, and for chains with a frozen or dilated layer.

    The target's profile along the axis (bilinear samples through the centre, as many as the
    chain's lines span) is split by roots into 1-D factors as long as each layer is wide
    (:func:`split_roots`; ``shuffle`` draws another root grouping), and each is drawn along
    the axis into its layer.  ``jitter``: relative normal noise added where ``shuffle``.
    ``grid``: taps one pixel apart along the axis's dominant grid axis (a line's taps then
    fall on pixels' rows or columns, at 45 degrees on the diagonal's pixels) instead of one
    unit apart along the axis itself.
    """
    axis = _axis(target, chain, grid)
    if axis is None:
        return None
    lengths = [min(layer.size) for layer in chain.layers]
    direction, profile = axis
    pieces = split_roots(profile, lengths, rng if shuffle else None)
    drawings = []
    for layer, piece in zip(chain.layers, pieces):
        drawn = _along(piece, layer.size, direction)
        if shuffle:
            drawn = drawn + jitter * np.linalg.norm(drawn) / np.sqrt(drawn.size) * rng.standard_normal(drawn.shape)
        drawings.append(drawn)
    return _in_channel_zero(drawings, chain)


def _in_channel_zero(drawings: list[np.ndarray], chain: Chain) -> list[np.ndarray]:
    """Spatial ``drawings`` (one (*k_i,) per layer) as factors (*k_i, C_{i-1}, C_i) of a chain of
    one input and one output channel, each in its channel 0, zero elsewhere."""
    widths = chain.channels(1, 1)
    factors = []
    for i, drawn in enumerate(drawings):
        factor = np.zeros(drawn.shape + (widths[i], widths[i + 1]))
        factor[..., 0, 0] = drawn
        factors.append(factor)
    return factors


def comb_spacings(chain: Chain, rng: np.random.Generator | None = None) -> list[int]:
    """Tap spacing per layer of a comb start (:func:`comb_init`): layers by size (the smaller
    side), smallest first, 1, 2, 4, ... grid steps, each cut to the largest spacing that divides
    that side less one, so the end taps fall on the layer's border along the axis's dominant
    grid axis (even sides: 1); with ``rng``, each a random such spacing instead."""
    lengths = [min(layer.size) for layer in chain.layers]
    fitting = [[s for s in range(1, max(k, 2)) if (k - 1) % s == 0] or [1] for k in lengths]
    spacings = [0] * len(lengths)
    for rank, i in enumerate(sorted(range(len(lengths)), key=lambda i: lengths[i])):
        spacings[i] = (int(rng.choice(fitting[i])) if rng is not None
                       else max(s for s in fitting[i] if s <= 2 ** rank))
    return spacings


def comb_init(target: Target, chain: Chain, rng: np.random.Generator, shuffle: bool,
              jitter: float = 0.1) -> list[np.ndarray] | None:
    """Dilated lines along the target's long axis (grid-spaced, see :func:`line_init`): layer
    ``i`` a line of ones whose taps are :func:`comb_spacings` grid steps apart (``shuffle``:
    random spacings), with relative normal ``jitter``, in channel 0 of wide chains; None
    where :func:`line_init` does not apply."""
    axis = _axis(target, chain, grid=True)
    if axis is None:
        return None
    direction, _ = axis
    drawings = []
    for layer, spacing in zip(chain.layers, comb_spacings(chain, rng if shuffle else None)):
        taps = 1.0 + jitter * rng.standard_normal((min(layer.size) - 1) // spacing + 1)
        drawings.append(_along(taps, layer.size, direction * spacing))
    return _in_channel_zero(drawings, chain)


@functools.lru_cache(maxsize=64)
def _line_profile(kernel: bytes, shape: tuple[int, ...], lengths: tuple[int, ...], grid: bool):
    """The long axis's direction (dy, dx) of the float64 kernel ``kernel`` (its bytes, ``shape``)
    and its profile along that axis through the centre, as many bilinear samples as lines of
    ``lengths`` span, one step of ``direction`` apart; None without a slanted axis
    (:func:`principal_angle`).  ``direction`` is a unit vector, or with ``grid`` one pixel long
    along its larger component."""
    from scipy import ndimage  # imported here: import jfactor stays lean

    kernel = np.frombuffer(kernel).reshape(shape)
    angle = principal_angle(kernel)
    if angle is None:
        return None
    direction = np.array([-np.sin(angle), np.cos(angle)])
    if grid:
        direction = direction / np.abs(direction).max()
    span = sum(length - 1 for length in lengths) + 1
    points = (np.array(shape)[:, None] - 1) / 2 + np.outer(direction, np.arange(span) - (span - 1) / 2)
    profile = ndimage.map_coordinates(kernel, points, order=1, mode="constant")
    for kept in (direction, profile):
        kept.flags.writeable = False  # shared by every later call
    return direction, profile


BLUR_WIDTHS = (0.5, 1.5)  # the range of a blur factor's standard deviation per axis, in taps
# the most a blur hop's blur sits off its factor's centre, per axis, in taps (of the layer: d pixels
# apart where it is dilated by d; blur_hop).  A centred
# blur, with every other factor of a minimum that has the target's mirror symmetries, refits to a
# symmetric start, and LM (equivariant) never leaves the symmetric subspace.  The best minimum of
# the 15x15 LoG into 3-5-9 (1.034e-4) is not symmetric (its 5x5 is a blur shifted along the
# anti-diagonal, the 9x9 makes up for it), the best symmetric one is 1.065x above it: from that one
# 0 of 256 centred blur hops reached the best (152 fell back); of 256 hops shifted up to 0.25, 0.5 and
# 0.75 taps per axis, 12, 15 and 12 did (within 1.01x, LM alone).  In the default search over seeds
# 440-469 the LoG landed within 1.01x of its best known in 30 runs instead of 1, the 11x11 Gabor into
# 3-5-5 in 30 instead of 26, the 15x15 Gabor and the DoG as before, in 2% less to 5% more time (the
# LoG's searches run longer: 1.6 s against 0.94 s).  A two-layer chain's hop keeps no factor of its
# minimum: it is a fresh blur start, and those stay centred (shifted, half of them cost the 15x15 Gabor
# 7 of seeds 400-419 within 1.01x); shifted two-layer hops took the 9x9 Gabor into 5-5 from 30 of
# those 30 runs to 28
BLUR_HOP_SHIFT = 0.5
BAND_PASS = 0.01  # the most a band-pass target's gain at zero frequency is of its peak gain (see band_pass)


def band_pass(kernel: np.ndarray) -> bool:
    """Whether a single-channel kernel (*k,) passes a band: its gain at zero frequency (its sum)
    is at most :data:`BAND_PASS` of its peak gain (on a grid of twice its size).  Designed
    band-pass filters (LoG, DoG, Gabor, derivatives) have none; a random 15x15 normal kernel's
    is 7% of its peak, and blur starts cost it 4% of error at seed 0 of 3-5-9."""
    gain = np.abs(np.fft.fftn(kernel, s=[2 * k for k in kernel.shape], axes=range(kernel.ndim)))
    return bool(gain.flat[0] <= BAND_PASS * gain.max())


@functools.lru_cache(maxsize=64)
def _passes_band(kernel: bytes, shape: tuple[int, ...]) -> bool:
    """:func:`band_pass` of the float64 kernel ``kernel`` (its bytes, ``shape``), once per target."""
    return band_pass(np.frombuffer(kernel).reshape(shape))


def fit_target(target: Target, chain: Chain) -> np.ndarray | None:
    """The target in the chain's extent (*extent,) where a factor can be refitted by least
    squares given the others (:func:`_fit_factor`): a single-channel target and a chain of
    width 1 with no frozen layer; None elsewhere."""
    if (target.c_in != 1 or target.c_out != 1 or any(w > 1 for w in chain.widths)
            or any(layer.frozen for layer in chain.layers)):
        return None
    return _in_extent(target, chain)


def blur_target(target: Target, chain: Chain) -> np.ndarray | None:
    """:func:`fit_target` where blur starts apply: a target that passes a band (:func:`band_pass`);
    None elsewhere."""
    kernel = fit_target(target, chain)
    return kernel if kernel is not None and _passes_band(kernel.tobytes(), kernel.shape) else None


def _blur(size: tuple[int, ...], rng: np.random.Generator, orbits: tuple[int, ...] | None = None,
          shift: float = 0.0) -> np.ndarray:
    """A Gaussian on a ``size`` grid, with a standard deviation per axis drawn from
    :data:`BLUR_WIDTHS`, as a factor of width 1: (*size, 1, 1).  ``orbits`` (one entry per
    axis, see :func:`jfactor.factorize.symmetry.axis_orbits`): axes of one orbit share their
    axis's width (isotropic blurs for a target the transposes leave alone); None: every axis
    its own.  Centred, or (``shift`` > 0) off the centre by an offset drawn from [-shift, shift]
    taps for each axis, not shared along ``orbits``: the offsets are there to break the target's
    mirror symmetries."""
    widths = rng.uniform(*BLUR_WIDTHS, len(size))[list(orbits or range(len(size)))]
    # no draw for a centred blur: blur starts and two-layer hops keep the random stream they had
    offsets = rng.uniform(-shift, shift, len(size)) if shift else np.zeros(len(size))
    axes = [np.exp(-0.5 * ((np.arange(k) - (k - 1) / 2 - o) / w) ** 2) for k, w, o in zip(size, widths, offsets)]
    return functools.reduce(np.multiply.outer, axes)[..., None, None]


@functools.lru_cache(maxsize=64)
def _shift_index(size: tuple[int, ...], dilation: tuple[int, ...], extent: tuple[int, ...]) -> np.ndarray:
    """Flat indices (prod(size), prod(extent)) into a kernel of shape ``extent``: row ``tap``
    gathers it shifted by ``tap * dilation`` (axis by axis, mod ``extent``), the least-squares
    columns of a factor of ``size`` taps spaced ``dilation`` (:func:`_fit_factor`)."""
    count = len(size)
    shifted = [np.expand_dims((np.arange(e)[None, :] - np.arange(k)[:, None] * d) % e,
                              [b for b in range(2 * count) if b not in (a, count + a)])
               for a, (k, d, e) in enumerate(zip(size, dilation, extent))]
    index = np.ravel_multi_index(tuple(shifted), extent).reshape(math.prod(size), -1)
    index.flags.writeable = False  # shared by every call
    return index


def _factor_columns(factors: list[np.ndarray], fitted: int, chain: Chain) -> np.ndarray:
    """The chain kernel (width 1) as a linear map of factor ``fitted``'s taps, the others
    ``factors`` (*k_i, 1, 1): (prod(k_fitted), prod(extent)), row ``tap`` the chain kernel of the
    others (factor ``fitted`` a unit tap at its origin) shifted by the tap's offset times the
    layer's effective dilation."""
    size = chain.layers[fitted].size
    impulse = np.zeros(size + (1, 1))
    impulse[(0,) * len(size)] = 1.0
    at_origin = chain_kernel_numpy(factors[:fitted] + [impulse] + factors[fitted + 1:], chain)[..., 0, 0]
    return at_origin.ravel()[_shift_index(size, tuple(chain.effective_dilations[fitted]), at_origin.shape)]


def _fit_factor(factors: list[np.ndarray], fitted: int, kernel: np.ndarray, chain: Chain) -> list[np.ndarray]:
    """``factors`` (width 1, (*k_i, 1, 1)) with factor ``fitted`` replaced by the least-squares
    fit of ``kernel`` (*extent,) given the others, which the chain is linear in.

    Factor ``fitted``'s taps each shift the chain kernel of the others (factor ``fitted`` a
    unit tap at its origin) by its tap offset times its effective dilation, so the columns of
    the least-squares system are shifted copies of that one kernel.
    """
    size = chain.layers[fitted].size
    factors = list(factors)
    columns = _factor_columns(factors, fitted, chain)
    # QR with column pivoting (LAPACK gelsy), its rank cut where numpy's SVD-based lstsq cuts: the
    # same solution (full column rank: a nonzero kernel's shifts) 2.2x faster for a 9x9 factor
    # (81 columns), which blur hops refit by the hundred
    from scipy.linalg import lstsq

    solution = lstsq(columns.T, kernel.ravel(), cond=np.finfo(columns.dtype).eps * max(columns.shape),
                     lapack_driver="gelsy", check_finite=False)[0]
    factors[fitted] = solution.reshape(size + (1, 1))
    return factors


def blur_init(target: Target, chain: Chain, rng: np.random.Generator,
              orbits: tuple[int, ...] | None = None) -> list[np.ndarray] | None:
    """Blur factors (widths shared along ``orbits``, see :func:`_blur`) and one least-squares
    factor (see the module docstring); None where blur starts do not apply (:func:`blur_target`)."""
    kernel = blur_target(target, chain)
    if kernel is None:
        return None
    fitted = int(rng.integers(len(chain.layers)))
    return _fit_factor([_blur(layer.size, rng, orbits) for layer in chain.layers], fitted, kernel, chain)


def blur_hop(factors: list[np.ndarray], kernel: np.ndarray, chain: Chain, rng: np.random.Generator,
             orbits: tuple[int, ...] | None = None) -> list[np.ndarray]:
    """A hop from a minimum's ``factors`` (width 1, (*k_i, 1, 1), two or more) of ``kernel``
    (:func:`blur_target`) to another basin: one factor (drawn) replaced by a blur (widths
    shared along ``orbits``; on a chain of three or more layers off the centre by up to
    :data:`BLUR_HOP_SHIFT` taps per axis) and another (drawn) refitted by least squares given
    the rest, the others kept.

    On the 11x11 Gabor at 30 degrees into 3-5-5, noise around a minimum 1.017x above the best
    known led back to it in 64 of 64 tries, these hops (then centred) to the best in 2 of 64.
    """
    # a two-layer hop keeps no factor of its minimum: it is a fresh blur start, and those stay centred
    shift = BLUR_HOP_SHIFT if len(factors) > 2 else 0.0
    return _hop(factors, kernel, chain, rng, lambda i: _blur(chain.layers[i].size, rng, orbits, shift))


def redraw_hop(factors: list[np.ndarray], kernel: np.ndarray, chain: Chain, rng: np.random.Generator,
               group: list[tuple]) -> list[np.ndarray]:
    """A hop from a minimum's ``factors`` (width 1, (*k_i, 1, 1), three or more) of ``kernel``
    (:func:`fit_target`) to another basin: one factor (drawn) replaced by a normal draw projected
    onto the target's mirror symmetries ``group`` (:func:`jfactor.factorize.symmetry.project`)
    and another (drawn) refitted by least squares given the rest, the others kept.

    On the 15x15 ring into 3-5-9 the best minimum shares its 9x9 factor (up to sign) with a
    minimum 1.026x above it: from that minimum 30 of 128 such hops that redrew the 3x3 and
    refitted the 5x5 reached the best, 1 of 128 with a draw not projected, and none of 64
    noise hops.
    """
    return _hop(factors, kernel, chain, rng,
                lambda i: symmetry.project(rng.standard_normal(factors[i].shape), group, signed=False))


def impulse_start(factors: list[np.ndarray], kernel: np.ndarray, chain: Chain, rng: np.random.Generator,
                  held: int | None = None) -> list[np.ndarray]:
    """``factors`` (width 1, (*k_i, 1, 1), two or more) with factor ``held`` (drawn where None) a
    unit impulse at its centre (the lower of the two middle taps of an even size, where the
    chain centres the target), a layer that passes its input on, and another (drawn) refitted
    to ``kernel`` (:func:`fit_target`) by least squares given the rest, the others kept (see
    the module docstring)."""
    if held is None:
        held, fitted = rng.choice(len(factors), 2, replace=False)
    else:
        fitted = rng.choice([i for i in range(len(factors)) if i != held])
    size = chain.layers[held].size
    impulse = np.zeros(size + (1, 1))
    impulse[tuple((k - 1) // 2 for k in size)] = 1.0
    return _replaced(factors, int(held), impulse, int(fitted), kernel, chain)


def refit_one(factors: list[np.ndarray], kernel: np.ndarray, chain: Chain,
              rng: np.random.Generator) -> list[np.ndarray]:
    """``factors`` (width 1, (*k_i, 1, 1), two or more) with one (drawn) refitted to ``kernel``
    (:func:`fit_target`) by least squares given the others (a crossover child's, see
    :func:`jfactor.factorize.multistart.crossover`)."""
    return _fit_factor(factors, int(rng.integers(len(factors))), kernel, chain)


def _hop(factors: list[np.ndarray], kernel: np.ndarray, chain: Chain, rng: np.random.Generator,
         new: Callable[[int], np.ndarray]) -> list[np.ndarray]:
    """``factors`` with one factor (drawn) replaced by ``new(its index)`` and another (drawn)
    refitted (:func:`_replaced`): the move of :func:`blur_hop` and :func:`redraw_hop`."""
    replaced, fitted = rng.choice(len(factors), 2, replace=False)
    return _replaced(factors, int(replaced), new(int(replaced)), int(fitted), kernel, chain)


def _replaced(factors: list[np.ndarray], replaced: int, factor: np.ndarray, fitted: int, kernel: np.ndarray,
              chain: Chain) -> list[np.ndarray]:
    """``factors`` with factor ``replaced`` set to ``factor`` and factor ``fitted`` refitted (:func:`_fit_factor`)."""
    factors = list(factors)
    factors[replaced] = factor
    return _fit_factor(factors, fitted, kernel, chain)


def random_init(shapes: list[tuple[int, ...]], rng: np.random.Generator) -> list[np.ndarray]:
    """Normal factors with std 1/sqrt(fan_in) (rescaled later to the target's norm)."""
    return [rng.standard_normal(s) / math.sqrt(math.prod(s[:-1])) for s in shapes]
