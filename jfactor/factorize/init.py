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
- ``random``: normal factors scaled so the chain's kernel has the target's norm.

Inits are numpy (float64), built once per target before any compilation.
"""

from __future__ import annotations

import math

import numpy as np

from jfactor.factorize.chain import Chain, Target

INITS = ("auto", "roots", "svd", "random")


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
    core = u[lead: len(u) - trail]
    units = _units(np.roots(core)) if len(core) > 1 else []
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
    kernel = np.pad(target.kernel[..., 0, 0], [((e - n) // 2, e - n - (e - n) // 2)
                                               for e, n in zip(chain.extent, target.size)])

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
        u, s, vt = np.linalg.svd(kernel)
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


def random_init(shapes: list[tuple[int, ...]], rng: np.random.Generator) -> list[np.ndarray]:
    """Normal factors with std 1/sqrt(fan_in) (rescaled later to the target's norm)."""
    return [rng.standard_normal(s) / math.sqrt(math.prod(s[:-1])) for s in shapes]
