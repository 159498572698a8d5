"""Levenberg-Marquardt's normal equations by correlations equal the products of the Jacobian,
and the Hessian's second-order term equals its sum over the residual.

The reference Jacobian is built column by column with numpy: the folded kernel is linear in
each factor, so column (i, entry) is the numpy fold of the chain with factor i a unit
impulse at that entry (:func:`jfactor.factorize.chain.chain_kernel_numpy`, direct
convolutions, no FFT).  For the same reason the kernel's second derivative w.r.t. entries of
two factors is the fold with both factors unit impulses at those entries, and zero within one
factor.
"""

import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from jfactor.factorize import Chain
from jfactor.factorize.chain import chain_kernel_numpy, chain_normal_equations, chain_second_order


def _unit(factor, entry):
    unit = np.zeros(factor.size)
    unit[entry] = 1.0
    return unit.reshape(factor.shape)


def _reference_jacobian(factors, chain, free):
    columns = []
    for i in free:
        for entry in range(factors[i].size):
            moved = [_unit(f, entry) if j == i else f for j, f in enumerate(factors)]
            columns.append(chain_kernel_numpy(moved, chain).ravel())
    return np.stack(columns, axis=1)


def _reference_second_order(factors, chain, free, residual):
    """``sum_x r(x) d^2 K(x) / (d p d q)`` for every pair of free entries, by numpy folds."""
    offsets = np.cumsum([0] + [factors[i].size for i in free])
    out = np.zeros((offsets[-1], offsets[-1]))
    for a, i in enumerate(free):
        for b, j in enumerate(free):
            if i == j:
                continue
            for p in range(factors[i].size):
                for q in range(factors[j].size):
                    moved = [_unit(f, p) if k == i else _unit(f, q) if k == j else f for k, f in enumerate(factors)]
                    out[offsets[a] + p, offsets[b] + q] = np.sum(residual * chain_kernel_numpy(moved, chain))
    return out


@st.composite
def chains(draw):
    ndim = draw(st.integers(1, 2))
    layers = draw(st.integers(2, 3))
    per_layer = lambda low, high: [tuple(draw(st.integers(low, high)) for _ in range(ndim))  # noqa: E731
                                   for _ in range(layers)]
    chain = Chain.build(per_layer(1, 4), dilations=per_layer(1, 2), strides=per_layer(1, 2),
                        channels=draw(st.integers(1, 2)), ndim=ndim)
    c_in, c_out = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    free = tuple(i for i in range(layers) if draw(st.booleans())) or (0,)
    return chain, c_in, c_out, free


@settings(max_examples=20, deadline=None)
@given(chains(), st.integers(0, 2**31))
def test_normal_equations_equal_the_products_of_the_jacobian(case, seed):
    chain, c_in, c_out, free = case
    rng = np.random.default_rng(seed)
    factors = [rng.standard_normal(shape) for shape in chain.factor_shapes(c_in, c_out)]
    residual = rng.standard_normal(chain_kernel_numpy(factors, chain).shape)
    jacobian = _reference_jacobian(factors, chain, free)
    gram, gradient = chain_normal_equations([jnp.asarray(f) for f in factors], chain, free, jnp.asarray(residual))
    expected_gram, expected_gradient = jacobian.T @ jacobian, jacobian.T @ residual.ravel()
    np.testing.assert_allclose(gram, expected_gram, rtol=0, atol=1e-11 * np.abs(expected_gram).max())
    np.testing.assert_allclose(gradient, expected_gradient, rtol=0, atol=1e-11 * np.abs(expected_gradient).max())


@settings(max_examples=12, deadline=None)
@given(chains(), st.integers(0, 2**31))
def test_second_order_term_sums_the_kernels_second_derivatives_over_the_residual(case, seed):
    chain, c_in, c_out, free = case
    free = free if len(free) > 1 else tuple(range(len(chain.layers)))  # a pair of free factors, or nothing to test
    rng = np.random.default_rng(seed)
    factors = [rng.standard_normal(shape) for shape in chain.factor_shapes(c_in, c_out)]
    residual = rng.standard_normal(chain_kernel_numpy(factors, chain).shape)
    expected = _reference_second_order(factors, chain, free, residual)
    second = np.asarray(chain_second_order([jnp.asarray(f) for f in factors], chain, free, jnp.asarray(residual)))
    np.testing.assert_allclose(second, expected, rtol=0, atol=1e-11 * max(np.abs(expected).max(), 1.0))
