"""Grid symmetries of targets, and starts that share them."""

import itertools

import numpy as np
import pytest
import scipy.signal as sp
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from jfactor import kernels
from jfactor.factorize import Chain, factorize
from jfactor.factorize.symmetry import axis_orbits, grid_symmetries, shares, start_group, symmetric_start


def _spread(f, dilation):
    """A 2-D kernel with ``dilation - 1`` zeros between taps (written here, not jfactor's)."""
    out = np.zeros(tuple((k - 1) * d + 1 for k, d in zip(f.shape, dilation)))
    out[tuple(slice(None, None, d) for d in dilation)] = f
    return out


def _compose(factors, dilations):
    """The single-channel chain's kernel by scipy's full convolution."""
    out = np.ones((1, 1))
    for f, d in zip(factors, dilations):
        out = sp.convolve(out, _spread(f[..., 0, 0], d), mode="full")
    return out


def _transform(kernel, flips, swap):
    """Reference flips (axis 0, axis 1) then transpose, for a 2-D array."""
    out = kernel[::-1 if flips[0] else 1, ::-1 if flips[1] else 1]
    return out.T if swap else out


def _elements(group):
    return {(perm, flips): sign for (perm, flips), sign in group}


def test_symmetries_of_known_kernels():
    square = Chain.build([3, 5, 5])
    ring = kernels.ring(11)[..., None, None]
    assert len(grid_symmetries(ring, square)) == 8
    assert all(sign == 1 for _, sign in grid_symmetries(ring, square))
    line = kernels.motion_blur(11, angle=30.0)[..., None, None]
    assert _elements(grid_symmetries(line, square)) == {((0, 1), (False, False)): 1, ((0, 1), (True, True)): 1}
    assert start_group(line, square) == []  # the point reflection alone gives no symmetric starts
    sobel = np.pad(np.outer([1.0, 2.0, 1.0], [-1.0, 0.0, 1.0]), 4)[..., None, None]
    assert _elements(grid_symmetries(sobel, square)) == {
        ((0, 1), (False, False)): 1, ((0, 1), (True, False)): 1,
        ((0, 1), (False, True)): -1, ((0, 1), (True, True)): -1}
    assert len(start_group(sobel, square)) == 4
    noise = np.random.default_rng(0).standard_normal((11, 11, 1, 1))
    assert len(grid_symmetries(noise, square)) == 1


def test_axis_exchanges_need_layers_alike_along_both_axes():
    ring = kernels.ring(7)[..., None, None]
    wide_tall = Chain.build([(3, 5), (5, 3)])
    assert {perm for (perm, _), _ in grid_symmetries(ring, wide_tall)} == {(0, 1)}
    assert len(grid_symmetries(ring, wide_tall)) == 4
    dilated = Chain.build([3, 3], dilations=[(1, 2), (2, 1)])
    assert {perm for (perm, _), _ in grid_symmetries(ring, dilated)} == {(0, 1)}


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 5), min_size=1, max_size=3), dilations=st.lists(st.integers(1, 2), min_size=3,
       max_size=3), flip_sign=st.sampled_from([1, -1]), swap_sign=st.sampled_from([1, -1]),
       seed=st.integers(0, 2**31 - 1))
def test_symmetric_starts_compose_to_a_kernel_with_the_targets_symmetry(sizes, dilations, flip_sign, swap_sign,
                                                                       seed):
    """Whatever the sizes and dilations, factors projected by ``symmetric_start`` compose (scipy's
    convolution) to a kernel with the target's symmetries and signs."""
    rng = np.random.default_rng(seed)
    chain = Chain.build(sizes, dilations=dilations[: len(sizes)])
    extent = chain.extent
    # a target with the character s(flip) = flip_sign per flipped axis, s(swap) = swap_sign
    raw = rng.standard_normal(extent)
    target = np.zeros(extent)
    for flips in itertools.product((False, True), repeat=2):
        for swap in (False, True):
            sign = flip_sign ** sum(flips) * (swap_sign if swap else 1)
            target += sign * _transform(raw, flips, swap)
    assume(np.linalg.norm(target) > 1e-6 * np.linalg.norm(raw))  # some characters vanish on tiny grids
    group = grid_symmetries(target[..., None, None], chain)
    assert len(group) == 8
    drawn = [rng.standard_normal((k, k, 1, 1)) for k in sizes]
    composed = _compose(symmetric_start(drawn, group, rng), [(d, d) for d in dilations[: len(sizes)]])
    scale = np.prod([np.abs(f).sum() for f in drawn])  # bounds |composed|
    for ((perm, flips), sign) in group:
        moved = _transform(composed, flips, perm == (1, 0))
        np.testing.assert_allclose(moved, sign * composed, atol=1e-12 * scale)


@settings(max_examples=30, deadline=None)
@given(kernel=st.sampled_from(["ring", "sobel", "log"]),
       sizes=st.lists(st.sampled_from([3, 5]), min_size=2, max_size=3), seed=st.integers(0, 2**31 - 1),
       which=st.integers(0, 2), corner=st.tuples(st.booleans(), st.booleans()))
def test_symmetric_starts_share_the_group_and_a_nudged_tap_breaks_it(kernel, sizes, seed, which, corner):
    """``shares`` holds for ``symmetric_start``'s factors (one of them with the target's signs: the
    Sobel kernel's flip along its rows changes its sign) and not once a corner tap moves by 1e-6 of
    its factor's largest, or for the identity alone (every factor has it)."""
    rng = np.random.default_rng(seed)
    chain = Chain.build(sizes)
    sobel = np.outer([1.0, 2.0, 1.0], [1.0, 0.0, -1.0])
    target = sobel if kernel == "sobel" else kernels.make(kernel, chain.extent[0])
    padded = np.pad(target, [((e - k) // 2,) * 2 for e, k in zip(chain.extent, target.shape)])[..., None, None]
    group = start_group(padded, chain)
    assert len(group) >= 4
    factors = symmetric_start([rng.standard_normal((k, k, 1, 1)) for k in sizes], group, rng)
    assert shares(factors, group) and not shares(factors, group[:1])  # the identity alone makes no subspace
    nudged = [f.copy() for f in factors]
    which %= len(nudged)
    nudged[which][tuple(-1 if c else 0 for c in corner)] += 1e-6 * np.abs(nudged[which]).max()
    assert not shares(nudged, group)


def test_a_start_shares_a_signed_symmetry_where_its_factors_signs_multiply_to_the_targets():
    """Under the mirrors of a Sobel-like target (one flip changes its sign), a start shares them where
    each factor keeps or flips its sign under each mirror and those signs multiply to the target's
    (scipy's convolution checks that the chain's kernel then has the target's signs); a zero factor
    fits any; signs that multiply to others, or a nudged tap, leave the subspace."""
    blur, sobel = np.outer([1.0, 2, 1], [1.0, 2, 1]), np.outer([1.0, 2, 1], [1.0, 0, -1])
    chain = Chain.build([3, 3])
    group = start_group(_compose([sobel[..., None, None], blur[..., None, None]], [(1, 1)] * 2)[..., None, None],
                        chain)
    assert any(sign < 0 for _, sign in group)
    nudged = sobel.copy()
    nudged[0, 0] += 1e-6
    odd_odd, odd_even = np.outer([1.0, 0, -1], [1.0, 0, -1]), np.outer([1.0, 0, -1], [1.0, 2, 1])
    cases = [((blur, sobel), True), ((sobel, blur), True), ((blur, blur), False), ((sobel, sobel), False),
             ((np.zeros((3, 3)), blur), True), ((blur, nudged), False),
             ((odd_odd, odd_even), True), ((odd_odd, odd_odd), False)]  # signs of other characters, multiplied
    for pair, expected in cases:
        factors = [f[..., None, None] for f in pair]
        assert shares(factors, group) == expected, pair
        composed = _compose(factors, [(1, 1)] * 2)
        signed = all(np.allclose(_transform(composed, flips, perm == (1, 0)), sign * composed, atol=1e-9)
                     for (perm, flips), sign in group)
        assert signed == expected or not composed.any()  # the reference: the kernel has the target's signs


def test_a_ring_reaches_its_best_basin_with_the_default_search():
    """11x11 ring into 3-5-5: 3 of 1,024 plain random restarts reach the best basin (relative
    error 1.4538e-2, experiments/bench_optimality.py); half the random starts symmetric
    make the default search find it."""
    result = factorize(kernels.ring(11), Chain.build([3, 5, 5]), baselines=(), seed=0)
    assert result.rel_error <= 1.4538e-2 * (1 + 1e-4)


@pytest.mark.parametrize("kernel, chain, orbits", [
    (kernels.make("log", 9), Chain.build([3, 3, 3, 3]), (0, 0)),  # the eight maps of the square
    (kernels.gabor(9), Chain.build([5, 5]), (0, 1)),  # only the point reflection
    (kernels.make("log", 9), Chain.build([3, 3], dilations=[1, 3]), (0, 0)),
    (kernels.gaussian(9, 2.0)[:, :, None] * np.exp(-np.arange(5.0))[None, None, :], Chain.build([5, 5], ndim=3),
     (0, 0, 2)),  # round in the first two axes, not along the third
])
def test_axis_orbits_join_the_axes_the_targets_symmetries_exchange(kernel, chain, orbits):
    padded = np.pad(kernel, [((e - k) // 2,) * 2 for e, k in zip(chain.extent, kernel.shape)])
    assert axis_orbits(grid_symmetries(padded[..., None, None], chain), chain.ndim) == orbits
