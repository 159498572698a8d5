"""Levenberg-Marquardt's normal equations by correlations equal the products of the Jacobian.

The reference Jacobian is built column by column with numpy: the folded kernel is linear in
each factor, so column (i, entry) is the numpy fold of the chain with factor i a unit
impulse at that entry (:func:`jfactor.factorize.chain.chain_kernel_numpy`, direct
convolutions, no FFT).
"""

import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from jfactor.factorize import Chain
from jfactor.factorize.chain import chain_kernel_numpy, chain_normal_equations


def _reference_jacobian(factors, chain, free):
    columns = []
    for i in free:
        for entry in range(factors[i].size):
            unit = np.zeros(factors[i].size)
            unit[entry] = 1.0
            moved = [unit.reshape(f.shape) if j == i else f for j, f in enumerate(factors)]
            columns.append(chain_kernel_numpy(moved, chain).ravel())
    return np.stack(columns, axis=1)


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
