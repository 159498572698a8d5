"""The images objective from the images' Gram factor: the same loss as the filtered images', far fewer residuals."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from jfactor.factorize import Chain, factorize
from jfactor.factorize import api as factorize_api
from jfactor.factorize.objectives import factor_fits, gram_factor, load_images
from tests import reference


@st.composite
def _problems(draw):
    ndim = draw(st.integers(1, 3))
    k = tuple(draw(st.integers(1, 3)) for _ in range(ndim))
    c_in, c_out = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(ndim))
    spatial = tuple(draw(st.integers(n, n + 5)) for n in k)
    seed = draw(st.integers(0, 2**16))
    return k, c_in, c_out, stride, spatial, draw(st.integers(1, 3)), seed


@settings(max_examples=60, deadline=None)
@given(_problems())
def test_the_gram_factor_gives_the_squared_output_error_of_every_kernel(problem):
    k, c_in, c_out, stride, spatial, count, seed = problem
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((count, *spatial, c_in))
    factor = gram_factor(images, (*k, c_in, c_out), stride)
    for _ in range(2):
        error = rng.standard_normal((*k, c_in, c_out))
        outputs = reference.conv(images, error, strides=stride)  # numpy, valid positions
        whitened = factor @ error.reshape(factor.shape[0], c_out)
        np.testing.assert_allclose(np.sum(whitened**2), np.sum(outputs**2), rtol=1e-10)


def test_factor_fits_only_where_one_images_windows_stay_small():
    assert factor_fits((8, 64, 64, 1), (15, 15, 1, 1), (1, 1))
    assert not factor_fits((8, 252, 252, 1), (63, 63, 1, 1), (1, 1))  # 36k windows of 3,969 taps
    assert not factor_fits((8, 4, 4, 1), (5, 5, 1, 1), (1, 1))  # no valid position


def test_the_factored_images_objective_finds_what_the_filtered_images_find(monkeypatch):
    # 5x5 taps into 3x3 -> 3x3: 25 factored residuals >= 18 parameters, so both take the same (primal) LM steps
    rng = np.random.default_rng(3)
    target = rng.standard_normal((5, 5))
    images = load_images(["camera"], size=20, count=2, c_in=1, seed=0)
    chain = Chain.build([3, 3])
    run = lambda: factorize(target, chain, objective="images", images=images, restarts=4, baselines=())  # noqa: E731
    factored = run()
    monkeypatch.setattr(factorize_api, "factor_fits", lambda *shapes: False)
    filtered = run()
    # the same minima, each restart's; the search stops at a relative cost decrease of 1e-10, so the kernel
    # error, which the images objective does not weigh, settles to about 1e-6 either way
    np.testing.assert_allclose(factored.restart_errors, filtered.restart_errors, rtol=1e-5)
    np.testing.assert_allclose(factored.approx, filtered.approx, atol=1e-4 * np.abs(target).max())
