"""Applying a stack: jitted apply against the numpy reference, shapes, dtypes, compiles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

import jfactor as jf
from tests import reference
from tests.strategies import stacks


@given(stacks())
def test_apply_matches_reference(stack):
    x = np.random.default_rng(0).standard_normal((2,) + stack.input_shape)
    y = np.asarray(stack(x))
    assert y.shape == (2,) + stack.output_shape
    np.testing.assert_allclose(y, reference.apply_stack(stack, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("padding", ["same", 2, [(0, 3), (2, 1)]])
@pytest.mark.parametrize("strides,dilation", [(1, 1), (2, 1), ((1, 3), (2, 1)), (3, 2)])
def test_conv_settings_match_reference(padding, strides, dilation):
    rng = np.random.default_rng(1)
    conv = jf.Conv(rng.normal(size=(4, 3, 2, 6)), rng.normal(size=6), strides, dilation, padding, groups=2)
    stack = jf.Stack([conv], (13, 11, 4))
    x = rng.normal(size=(3, 13, 11, 4))
    expected = reference.conv(x, np.asarray(conv.kernel), np.asarray(conv.bias), strides, dilation,
                              padding, 2)
    np.testing.assert_allclose(stack(x), expected, rtol=1e-12, atol=1e-12)


def test_float32_stays_float32_and_float64_is_float64():
    rng = np.random.default_rng(2)
    stack = jf.Stack([jf.Conv(rng.normal(size=(3, 3, 1, 2)).astype(np.float32)), jf.AvgPool(2)], (10, 10, 1))
    x32 = rng.normal(size=(1, 10, 10, 1)).astype(np.float32)
    assert stack(x32).dtype == jnp.float32
    assert stack.astype(jnp.float64)(x32).dtype == jnp.float64
    np.testing.assert_allclose(stack(x32), reference.apply_stack(stack, x32), rtol=1e-5, atol=1e-5)


def test_output_shape_is_inferred_without_running():
    stack = jf.Stack([jf.Conv(np.ones((3, 3, 1, 4)), strides=2), jf.AvgPool(2),
                      jf.Branches([[jf.Conv(np.ones((1, 1, 4, 2)))], [jf.Identity()]], "concat")],
                     (28, 28, 1))
    assert stack.output_shape == (6, 6, 6)
    shaped = jax.eval_shape(jf.apply, stack, jax.ShapeDtypeStruct((5, 28, 28, 1), jnp.float32))
    assert shaped.shape == (5, 6, 6, 6)
    assert [out for _, out in stack.shapes()] == [(13, 13, 4), (6, 6, 4), (6, 6, 6)]


def test_apply_compiles_once_for_same_shapes():
    rng = np.random.default_rng(3)

    def make():
        return jf.Stack([jf.Conv(rng.normal(size=(3, 3, 1, 1)), dilation=2), jf.SumPool(3, 2)], (17, 17, 1))

    x = rng.normal(size=(2, 17, 17, 1))
    first = make()
    first(x)
    size = jf.apply._cache_size()
    make()(x)  # other weights, same structure
    first(x + 1.0)
    assert jf.apply._cache_size() == size


def test_one_dimensional_and_three_dimensional_stacks():
    rng = np.random.default_rng(4)
    s1 = jf.Stack([jf.Conv(rng.normal(size=(5, 2, 3)), strides=2), jf.AvgPool(3)], (30, 2))
    s3 = jf.Stack([jf.Conv(rng.normal(size=(3, 2, 3, 1, 2)), padding="same"), jf.SumPool((2, 1, 2))], (7, 8, 9, 1))
    for stack in (s1, s3):
        x = rng.normal(size=(2,) + stack.input_shape)
        np.testing.assert_allclose(stack(x), reference.apply_stack(stack, x), rtol=1e-12, atol=1e-12)


def test_conv_call_resolves_padding_for_the_input():
    conv = jf.Conv(np.ones((3, 1, 1)), padding="same", strides=2)
    x = np.arange(10.0).reshape(1, 10, 1)
    np.testing.assert_allclose(conv(x), reference.conv(x, np.ones((3, 1, 1)), None, 2, 1, "same"))


def test_a_conv_applies_to_inputs_of_another_dtype_as_a_stack_does():
    """A float32 conv (a folded float32 model) on numpy's float64: before, jax's "lax.conv_general_dilated
    requires arguments to have the same dtypes"."""
    rng = np.random.default_rng(4)
    kernel, bias = rng.normal(size=(3, 3, 2, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    conv = jf.Conv(kernel, bias, padding="same")
    x = rng.normal(size=(2, 6, 6, 2))
    for inputs, dtype in ((x, jnp.float64), (x.astype(np.float16), jnp.float32), (x.round().astype(int), jnp.float32)):
        out = conv(inputs)
        assert out.dtype == dtype == jf.Stack([conv], (6, 6, 2))(inputs).dtype
        expected = reference.conv(np.asarray(inputs, np.float64), kernel, bias, 1, 1, "same")
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_batch_norm_and_residual_match_reference():
    rng = np.random.default_rng(5)
    bn = jf.BatchNorm(rng.normal(size=3), rng.normal(size=3), rng.normal(size=3), rng.uniform(1, 2, 3), 1e-5)
    stack = jf.Stack([bn, jf.Residual([jf.Conv(rng.normal(size=(3, 3, 3, 3)), padding="same"), bn])], (9, 9, 3))
    x = rng.normal(size=(2, 9, 9, 3))
    np.testing.assert_allclose(stack(x), reference.apply_stack(stack, x), rtol=1e-12, atol=1e-12)
