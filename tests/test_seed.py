"""The seed document's numbers and sizes, reproduced from configs/seed/ and its printed inputs."""

from pathlib import Path

import numpy as np
import pytest
import scipy.signal as sp

import jfactor as jf
from jfactor.stack_config import load_stack

SEED = Path(__file__).parent.parent / "configs" / "seed"


def _fold_values(stack, image):
    """Apply ``stack`` to a 2-D image; returns the 2-D output."""
    x = np.asarray(image, np.float64)[None, :, :, None]
    return np.asarray(stack.with_input_shape(x.shape[1:])(x))[0, :, :, 0]


def test_section1_correlate2d():
    b1 = np.array([[-1, -3, 4, -3, 1, -2, -2], [-3, -4, -2, -2, 1, 3, 2], [-1, -4, 2, 3, 3, 3, -3],
                   [3, -3, -2, 1, 3, -1, 0], [2, -4, 0, 2, 4, 0, 2], [4, 0, -3, 4, 4, 3, 0],
                   [0, -4, -2, 4, 3, -3, 1]])
    c1 = np.array([[-2, 3, 2, 7, -2], [-3, -4, -1, 1, 6], [-2, 0, 7, 5, 9], [-2, 2, 2, 10, 3],
                   [-6, 0, 3, 5, 4]])
    stack = load_stack(SEED / "section1_correlate.yaml")
    np.testing.assert_array_equal(_fold_values(stack, b1), c1)
    a1 = np.asarray(stack.layers[0].kernel)[:, :, 0, 0]
    np.testing.assert_array_equal(sp.convolve2d(b1, a1[::-1, ::-1], mode="valid"), c1)  # the seed's C2


def test_section2_two_3x3_equal_one_5x5():
    b1 = np.array([[-3, -4, 4, -4, 0, -2, 3], [2, 0, -3, 3, 4, 2, -4], [0, 4, -4, 0, 1, 1, 2],
                   [-4, -3, 0, -1, -3, 0, -2], [4, 1, 2, -2, -3, -1, 1], [3, -1, -1, -4, -1, 3, -2],
                   [4, 0, -1, -3, -4, -4, -3]])
    c1 = np.array([[0, -8, 8, 3, 5], [-1, 3, -2, 7, 4], [-11, 0, -7, -3, -2], [3, -3, -6, -7, -8],
                   [7, -7, -7, -5, -2]])
    c2 = np.array([[11, 1, 12], [-2, 0, 1], [-10, -9, -9]])
    d1 = np.array([[0, 0, 1, 0, 1], [0, 1, 1, 2, 1], [0, 1, 1, 1, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    stack = load_stack(SEED / "section2_two_3x3.yaml")
    np.testing.assert_array_equal(_fold_values(jf.Stack(stack.layers[:1], stack.input_shape), b1), c1)
    np.testing.assert_array_equal(_fold_values(stack, b1), c2)
    folded = jf.fold(stack)
    np.testing.assert_array_equal(np.asarray(folded.conv.kernel)[:, :, 0, 0], d1)
    np.testing.assert_array_equal(_fold_values(jf.Stack([folded.conv], stack.input_shape), b1), c2)  # E1


def test_section4_avgpool_is_a_strided_box():
    b1 = 4 * np.array([[-3, -1, 0, 2, -1, 1, -3, -2], [1, -1, 2, -3, -2, -4, -3, -2],
                       [-4, -4, -4, 2, 2, -4, -3, 0], [-3, -2, -1, 4, -1, -2, -4, -1],
                       [-3, -2, -3, 4, -1, 1, -1, 0], [-3, -3, 1, -2, -3, 2, 0, 4],
                       [-2, 4, 2, 4, -3, -3, -4, 0], [-2, 1, 1, -3, 3, -1, -4, 1]])
    c1 = np.array([[-4, 1, -6, -10], [-13, 1, -5, -8], [-11, 0, -1, 3], [1, 4, -4, -7]])
    stack = load_stack(SEED / "section4_avgpool.yaml")
    np.testing.assert_array_equal(_fold_values(stack, b1), c1)
    folded = jf.fold(stack)
    np.testing.assert_array_equal(np.asarray(folded.conv.kernel)[:, :, 0, 0], np.full((2, 2), 0.25))
    assert folded.conv.strides == (2, 2)
    np.testing.assert_array_equal(_fold_values(jf.Stack([folded.conv], stack.input_shape), b1), c1)  # D2


SECTION5_B1 = np.array([
    [0, -2, -1, -3, -4, 2, -3, -1, -3, -4, -2, 1], [4, -1, 2, -4, -4, 4, -1, -1, -4, -2, 2, 2],
    [1, -4, 3, 3, -2, 2, 3, -2, -3, 4, -1, 2], [-3, -1, -4, 4, 0, 3, 1, 0, 0, 0, -4, 1],
    [3, 1, 4, 1, -2, -2, 2, 1, -3, 0, 3, -3], [-4, 0, 3, -4, 3, 4, 2, 0, 3, 0, 1, -4],
    [1, -3, -1, -1, 3, -4, -2, 3, -4, 1, 0, -3], [1, -4, 0, 4, 4, 3, -2, -4, 3, -2, 3, 0],
    [0, 2, -2, 3, 3, 3, 2, -2, -1, 0, 1, -1], [-4, -4, 2, -2, -4, -1, 4, 4, -1, 3, -1, 4],
    [4, 4, -2, -1, -1, 0, 4, -2, 3, 3, -4, 4], [-4, -3, 0, -1, -2, 0, -2, 3, 3, -1, -2, -4]])


def test_section5_conv_pool_conv_is_8x8_stride_2():
    d1 = np.array([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 2, 2, 2, 2, 1, 1], [1, 1, 2, 2, 2, 2, 1, 1],
                   [0, 0, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 1, 1, 1, 1],
                   [0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1, 1]])
    c3 = np.array([[1.75, -2.75, -6.0], [10.75, 3.75, 1.5], [4.25, 8.0, 2.25]])
    e1 = np.array([[1.75, -3.25, -2.75, -2.75, -6.0], [4.0, -0.75, 0.0, 3.25, -0.5],
                   [10.75, 6.25, 3.75, 5.0, 1.5], [6.5, 7.0, 9.25, 3.25, 2.5], [4.25, 5.5, 8.0, 3.0, 2.25]])
    stack = load_stack(SEED / "section5_conv_pool_conv.yaml")
    np.testing.assert_array_equal(_fold_values(stack, SECTION5_B1), c3)
    folded = jf.fold(stack)
    assert folded.conv.kernel.shape == (8, 8, 1, 1) and folded.conv.strides == (2, 2)
    np.testing.assert_array_equal(np.asarray(folded.conv.kernel)[:, :, 0, 0], d1 / 4)
    dense = jf.Stack([jf.Conv(np.asarray(folded.conv.kernel))], (12, 12, 1))
    np.testing.assert_array_equal(_fold_values(dense, SECTION5_B1), e1)  # E1, before striding
    np.testing.assert_array_equal(_fold_values(jf.Stack([folded.conv], (12, 12, 1)), SECTION5_B1), c3)


@pytest.mark.parametrize(
    "config,size,stride,canonical",
    [
        ("section6_two_pools", 18, 4, "3x3 -> 3x3 d2 -> 3x3 d4 -> AvgPool(4)"),
        ("section7_strides", 15, 4, "3x3 -> 3x3 d2 -> 3x3 d4 -> Subsample(4)"),
        ("section8_avgpool", 78, 16, "3x3 -> 3x3 d2 -> 3x3 d4 -> 3x3 d8 -> 3x3 d16 -> AvgPool(16)"),
        ("section8_strides", 63, 16, "3x3 -> 3x3 d2 -> 3x3 d4 -> 3x3 d8 -> 3x3 d16 -> Subsample(16)"),
        ("section8_strides_4x4", 78, 16, "4x4 -> 4x4 d2 -> 4x4 d4 -> 4x4 d8 -> 3x3 d16 -> Subsample(16)"),
        ("section8_strides_2x2_last", 47, 16, "3x3 -> 3x3 d2 -> 3x3 d4 -> 3x3 d8 -> 2x2 d16 -> Subsample(16)"),
    ],
)
def test_sections_6_to_8_sizes_and_exact_dilated_chains(config, size, stride, canonical):
    stack = load_stack(SEED / f"{config}.yaml")
    folded = jf.fold(stack)
    assert folded.receptive_field == (size, size)
    assert folded.stride == (stride, stride)
    assert folded.canonical.describe() == canonical
    assert folded.canonical.max_abs_diff < 1e-9
    assert folded.certificate.rel_diff < 1e-12
    assert folded.exact_region is None


def test_section8_dilated_extents_grow_3_5_9_17_33_into_63_plus_avgpool16():
    folded = jf.fold(load_stack(SEED / "section8_avgpool.yaml"))
    extents = [conv.extent[0] for conv in folded.canonical.chain]
    assert extents == [3, 5, 9, 17, 33]
    assert sum(e - 1 for e in extents) + 1 == 63
    assert folded.canonical.stack.layers[-1].pool_size == (16, 16)


def test_section3_5x5_is_the_full_convolution_of_two_3x3():
    stack = load_stack(SEED / "section3_one_5x5.yaml")
    a1 = np.array([[1, 1, 0], [1, 0, 0], [0, 1, 1]])
    a2 = np.array([[0, 0, 0], [1, 1, 1], [0, 0, 0]])
    np.testing.assert_array_equal(np.asarray(stack.layers[0].kernel)[:, :, 0, 0], sp.convolve2d(a1, a2))


def test_every_seed_config_folds():
    for path in sorted(SEED.glob("*.yaml")):
        folded = jf.fold(load_stack(path))
        assert folded.certificate.rel_diff < 1e-12, path.name
