"""The images objective from the images' Gram factor: the same loss as the filtered images', far fewer residuals."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jfactor.errors import ConfigError
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


def test_the_gram_factor_is_the_same_accumulated_a_row_of_windows_at_a_time(monkeypatch):
    from jfactor.factorize import objectives

    rng = np.random.default_rng(1)
    images = rng.standard_normal((2, 11, 9, 2))
    whole = gram_factor(images, (3, 4, 2, 1), (2, 1))
    monkeypatch.setattr(objectives, "FACTOR_BYTES", 8)  # one row of windows per chunk
    error = rng.standard_normal((3 * 4 * 2, 3))
    np.testing.assert_allclose(np.sum((gram_factor(images, (3, 4, 2, 1), (2, 1)) @ error) ** 2),
                               np.sum((whole @ error) ** 2), rtol=1e-12)


def test_factor_fits_where_the_factor_is_smaller_than_the_outputs_and_its_gram_small():
    assert factor_fits((8, 64, 64, 1), (15, 15, 1, 1), (1, 1))
    assert factor_fits((4, 96, 96, 96, 1), (5, 5, 5, 1, 1), (1, 1, 1))  # a 3-D target: 830k windows per image
    assert not factor_fits((8, 252, 252, 1), (63, 63, 1, 1), (1, 1))  # a Gram matrix of 3,969^2 entries
    assert not factor_fits((8, 4, 4, 1), (5, 5, 1, 1), (1, 1))  # no valid position
    assert not factor_fits((1, 5, 5, 1), (5, 5, 1, 1), (1, 1))  # one output: 25 rows would be more


def test_an_objective_given_as_factored_is_decided_again_and_its_stride_must_fit(monkeypatch):
    from jfactor import ConfigError
    from jfactor.factorize import Objective

    images = load_images(["camera"], size=12, count=1, c_in=1, seed=0)
    monkeypatch.setattr(factorize_api, "factor_fits", lambda *shapes: False)
    factorize(np.ones((5, 5)), Chain.build([3, 3]), objective=Objective("images", factored=True), images=images,
              restarts=2, baselines=())  # runs on the images themselves
    with pytest.raises(ConfigError, match=r"objective stride \(2,\) has 1 entries for a 2-D target"):
        factorize(np.ones((5, 5)), Chain.build([3, 3]), objective=Objective("images", stride=(2,)), restarts=2)
    with pytest.raises(ConfigError, match=r"objective stride \(2, 2\) is not the target's \(1, 1\)"):
        factorize(np.ones((5, 5)), Chain.build([3, 3]), objective=Objective("images", stride=(2, 2)), restarts=2)


@pytest.mark.parametrize("objective", ["kernel", "images"])
def test_all_zero_images_are_refused_whatever_the_objective(objective):
    from jfactor import ConfigError

    with pytest.raises(ConfigError, match=r"images are all zero: the output metric \(and the images objective\)"):
        factorize(np.ones((5, 5)), Chain.build([3, 3]), objective=objective, images=np.zeros((1, 32, 32, 1)),
                  restarts=2, baselines=())


@pytest.mark.parametrize("objective", ["kernel", "images"])
def test_images_constant_in_a_channel_are_refused_naming_it(objective):
    """On constant images every output is the kernel's sum times the value: a random 5x5 into 3-3
    read an output PSNR of 302 dB at a kernel error of 0.83."""
    from jfactor import ConfigError

    images = np.concatenate([np.ones((1, 12, 12, 2)), np.full((1, 12, 12, 2), -3.0)])
    target = np.random.default_rng(0).standard_normal((5, 5, 2, 1))
    with pytest.raises(ConfigError, match=r"images are constant in input channel\(s\) \[0, 1\] \(one value per "):
        factorize(target, Chain.build([3, 3]), objective=objective, images=images, restarts=2, baselines=())
    images[1, 0, 0, 1] = 0.0  # channel 1 varies in one image; channel 0 is still constant in both
    with pytest.raises(ConfigError, match=r"images are constant in input channel\(s\) \[0\] "):
        factorize(target, Chain.build([3, 3]), objective=objective, images=images, restarts=2, baselines=())
    images[0, 3, 5, 0] = 2.0
    factorize(target, Chain.build([3, 3]), objective=objective, images=images, restarts=2, baselines=())


def test_the_factored_images_objective_finds_what_the_filtered_images_find(monkeypatch):
    # 5x5 taps into 3x3 -> 3x3: 25 factored residuals >= 18 parameters, so both take the same (primal) LM steps
    rng = np.random.default_rng(3)
    target = rng.standard_normal((5, 5))
    images = load_images(["camera"], size=20, count=2, c_in=1, seed=0)
    chain = Chain.build([3, 3])
    run = lambda: factorize(target, chain, objective="images", images=images, restarts=4, baselines=())  # noqa: E731
    calls = []
    monkeypatch.setattr(factorize_api, "gram_factor", lambda *args: calls.append(args) or gram_factor(*args))
    factored = run()
    assert len(calls) == 1  # the factored run took the factor
    monkeypatch.setattr(factorize_api, "factor_fits", lambda *shapes: False)
    filtered = run()
    # the same minima, each restart's; the search stops at a relative cost decrease of 1e-10, so the kernel
    # error, which the images objective does not weigh, settles to about 1e-6 either way
    np.testing.assert_allclose(factored.restart_errors, filtered.restart_errors, rtol=1e-5)
    np.testing.assert_allclose(factored.approx, filtered.approx, atol=1e-4 * np.abs(target).max())


def test_an_image_file_without_content_is_named(tmp_path):
    # before: an all-black file failed later without its name, a NaN one after resize warnings
    from skimage import io

    io.imsave(tmp_path / "black.png", np.zeros((32, 32), np.uint8), check_contrast=False)
    io.imsave(tmp_path / "nan.tif", np.full((32, 32), np.nan, np.float32), check_contrast=False)
    for name, message in (("black.png", "the image is all zero"), ("nan.tif", "the image has non-finite values")):
        with pytest.raises(ConfigError, match=f"{name}: {message}"):
            load_images([str(tmp_path / name)], size=16, count=1)


def test_image_files_of_any_channel_layout_are_read_as_grey(tmp_path):
    # before: a grey+alpha PNG reached skimage's rgb2gray and ended the run with its traceback
    from PIL import Image

    grey = np.random.default_rng(0).integers(1, 255, (40, 40), dtype=np.uint8)
    alpha = np.full_like(grey, 255)
    Image.fromarray(np.stack([grey, alpha], -1), mode="LA").save(tmp_path / "la.png")
    Image.fromarray(grey, mode="L").save(tmp_path / "l.png")
    Image.fromarray(np.stack([grey] * 3 + [alpha], -1), mode="RGBA").save(tmp_path / "rgba.png")
    expected = load_images([str(tmp_path / "l.png")], size=16, count=1)
    for name in ("la.png", "rgba.png"):
        np.testing.assert_allclose(load_images([str(tmp_path / name)], size=16, count=1), expected, atol=1e-3)
    from skimage import io

    io.imsave(tmp_path / "stack.tif", np.ones((3, 20, 20, 5), np.float32), check_contrast=False)
    with pytest.raises(ConfigError, match=r"stack\.tif: not a grey or colour picture \(an array of shape"):
        load_images([str(tmp_path / "stack.tif")], size=16, count=1)


@st.composite
def _kernels(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.integers(1, 6)) for _ in range(ndim)) + (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    return shape, draw(st.integers(1, 3)), draw(st.sampled_from([2.0, 3.0, 8.0])), draw(st.integers(0, 2**16))


@settings(max_examples=12, deadline=None)  # each example compiles the FFTs of a new shape
@given(_kernels())
def test_the_spectral_loss_is_the_sum_of_the_error_spectrum_over_every_frequency(case):
    # before: the real FFT's half spectrum was summed as it stands, so the zero (and Nyquist) frequency
    # weighed half the others and p = 2 was not the kernel objective (loss ratios 0.97-0.996, other minima)
    import jax.numpy as jnp

    from jfactor.factorize import Objective

    shape, pad, p, seed = case
    rng = np.random.default_rng(seed)
    target, approx = rng.standard_normal(shape), rng.standard_normal(shape)
    ndim = len(shape) - 2
    full = lambda e: np.sum(np.abs(np.fft.fftn(e, s=[pad * n for n in shape[:ndim]], axes=range(ndim))) ** p)  # noqa: E731
    objective = Objective("spectral", p=p, pad=pad)
    loss = float(np.sum(np.asarray(objective.residual(jnp.asarray(approx), jnp.asarray(target))) ** 2))
    np.testing.assert_allclose(loss, full(approx - target) / full(-target), rtol=1e-10)
    if p == 2.0:  # Parseval: the kernel objective
        np.testing.assert_allclose(loss, np.sum((approx - target) ** 2) / np.sum(target**2), rtol=1e-10)
