"""The target's grid symmetries, and starts that share them.

Many kernels people factorize are symmetric on the pixel grid: a ring or a disk under the
eight flips and transposes of the square, a line or a Gabor under the point reflection
``K(-x) = K(x)``, a derivative up to a sign.  Full convolution commutes with these maps
(flipping every factor about its own centre flips the chain's kernel, dilated or strided
alike; permuting axes does too where every layer has the same size, dilation and stride
along them), so a chain whose factors share the target's symmetry stays in that much
smaller subspace, and gradients and Levenberg-Marquardt steps (equivariant under these
orthogonal maps) keep it there.  The best minimum often lies in it: on an 11x11 ring into
3-5-5, 12 of 128 D4-symmetric random starts reach the best basin, 3 of 1,024 plain ones do.

A symmetry is a signed axis permutation ``g`` (flip some spatial axes, then permute axes of
equal size) with ``K o g = s(g) K`` for a sign ``s(g)`` (a character of the group).  A
symmetric start projects every factor onto the trivial character and one factor (the
carrier, drawn at random) onto ``s``: ``f <- mean_g s(g) g(f)``, so the chain's kernel has
the target's signs.
"""

from __future__ import annotations

import itertools

import numpy as np

from jfactor.factorize.chain import Chain

TOLERANCE = 1e-3  # relative: a nearly symmetric target still gets symmetric starts (they are only starts)


def apply(element: tuple[tuple[int, ...], tuple[bool, ...]], array: np.ndarray) -> np.ndarray:
    """``g(array)`` for ``element = (perm, flips)`` on the leading ``len(perm)`` (spatial) axes:
    flip the axes marked in ``flips``, then move axis ``perm[i]`` to position ``i``."""
    perm, flips = element
    flipped = np.flip(array, [axis for axis, flip in enumerate(flips) if flip]) if any(flips) else array
    return np.transpose(flipped, tuple(perm) + tuple(range(len(perm), array.ndim)))


def _compatible(perm: tuple[int, ...], chain: Chain) -> bool:
    """Whether every layer looks the same along the axes ``perm`` exchanges."""
    return all(layer.size[p] == layer.size[i] and layer.dilation[p] == layer.dilation[i]
               and layer.stride[p] == layer.stride[i] for layer in chain.layers for i, p in enumerate(perm))


def grid_symmetries(kernel: np.ndarray, chain: Chain, tolerance: float = TOLERANCE) -> list[tuple]:
    """The signed axis permutations the (padded) target ``kernel`` (*extent, C_in, C_out) has
    and the chain can share: ``[((perm, flips), sign), ...]``, the identity first."""
    ndim = chain.ndim
    norm = np.linalg.norm(kernel)
    found = []
    for perm in itertools.permutations(range(ndim)):
        if not _compatible(perm, chain):
            continue
        for flips in itertools.product((False, True), repeat=ndim):
            moved = apply((perm, flips), kernel)  # same shape: compatible axes have equal extents
            for sign in (1.0, -1.0):
                if np.linalg.norm(moved - sign * kernel) <= tolerance * norm:
                    found.append(((perm, flips), sign))
                    break
    return found


def start_group(kernel: np.ndarray, chain: Chain) -> list[tuple]:
    """The symmetries symmetric starts should share: :func:`grid_symmetries`, where they include
    a mirror or an axis exchange; else [] (no symmetric starts).

    A group of only the identity and the point reflection (lines and Gabors at an angle)
    gives no symmetric starts: there, measured over five seeds of the default search, the
    even subspace held the best basin less often than plain starts find it (with half the
    random starts even, the 15x15 motion blur into 3-5-9 reached it in 0 of 5 runs and the
    15x15 Gabor in 0 of 5; without, in 2 and 1).
    """
    group = grid_symmetries(kernel, chain)
    identity = tuple(range(chain.ndim)), (False,) * chain.ndim
    point_reflection = identity[0], (True,) * chain.ndim
    return group if any(element not in (identity, point_reflection) for element, _ in group) else []


def axis_orbits(group: list[tuple], ndim: int) -> tuple[int, ...]:
    """Each spatial axis's orbit under the axis permutations of ``group`` (as
    :func:`grid_symmetries` gives it), named by its lowest axis: ``(0, 0)`` for a square
    target the transposition leaves alone, ``(0, 1)`` without one."""
    orbit = list(range(ndim))
    for _ in range(ndim):  # an orbit's lowest axis spreads one exchange per pass
        for (perm, _flips), _sign in group:
            for axis, moved in enumerate(perm):
                orbit[axis] = orbit[moved] = min(orbit[axis], orbit[moved])
    return tuple(orbit)


def project(factor: np.ndarray, group: list[tuple], signed: bool) -> np.ndarray:
    """``mean_g s(g) g(factor)`` (``signed``) or ``mean_g g(factor)``: the factor's part with the
    group's sign character (or invariant under it)."""
    return np.mean([(sign if signed else 1.0) * apply(element, factor) for element, sign in group], axis=0)


def symmetric_start(factors: list[np.ndarray], group: list[tuple], rng: np.random.Generator) -> list[np.ndarray]:
    """``factors`` projected onto the symmetric subspace: one random factor carries the target's
    signs, the others are invariant (their chain kernel then has the target's symmetry)."""
    carrier = int(rng.integers(len(factors)))
    return [project(f, group, signed=i == carrier) for i, f in enumerate(factors)]


SHARING_TOLERANCE = 1e-8  # relative: a factor this close to +-each of its images shares the symmetry (rounding aside)


def _character(factor: np.ndarray, group: list[tuple]) -> np.ndarray | None:
    """The signs ``c(g)`` with ``g(factor) = c(g) factor`` for each ``g`` of ``group`` (to
    :data:`SHARING_TOLERANCE`), in the group's order; None where some ``g`` maps the factor to
    neither, zeros for a zero factor (every sign fits it)."""
    scale = SHARING_TOLERANCE * np.linalg.norm(factor)
    if scale == 0:
        return np.zeros(len(group))
    signs = []
    for element, _ in group:
        image = apply(element, factor)
        sign = next((c for c in (1.0, -1.0) if np.linalg.norm(image - c * factor) <= scale), None)
        if sign is None:  # stop at the first map that breaks it
            return None
        signs.append(sign)
    return np.array(signs)


def shares(factors: list[np.ndarray], group: list[tuple]) -> bool:
    """Whether a chain's ``factors`` (each (*k_i, C_{i-1}, C_i), frozen layers' weights among them)
    lie in a subspace of ``group``'s (the target's signed symmetries, as :func:`grid_symmetries`
    gives them) that LM cannot leave: each factor mapped by every ``g`` to ``c_i(g)`` times itself,
    and the product of the ``c_i`` the target's signs, so that their chain kernel has them (as
    :func:`symmetric_start` makes them: one factor with the target's signs, the others invariant).
    False where ``group`` holds only the identity, or nothing.

    LM from such a start stays in that subspace (the module docstring), so it reaches only minima
    that share the target's symmetry.  A zero factor fits every sign.  A factor whose channels
    carry different signs is not recognised (no start of jfactor's is one)."""
    if len(group) < 2:
        return False
    characters = []
    for factor in factors:
        characters.append(_character(factor, group))
        if characters[-1] is None:
            return False
    if any(not c.any() for c in characters):
        return True
    return bool(np.array_equal(np.prod(characters, axis=0), [sign for _, sign in group]))
