"""fold_conv: the folded conv as a pure function of the weights, under jit, grad and vmap."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jfactor as jf
from jfactor.fold import fold_affine
from tests.strategies import redraw, weighted_stacks

EXAMPLES = int(os.environ.get("JFACTOR_GRAD_EXAMPLES", "6"))


def _projection(conv, rng):
    """A fixed random linear functional of the folded kernel and bias: f(stack) -> scalar."""
    w_kernel = rng.standard_normal(conv.kernel.shape)
    w_bias = None if conv.bias is None else rng.standard_normal(conv.bias.shape)

    def f(stack):
        c = jf.fold_conv(stack)
        value = jnp.sum(w_kernel * c.kernel)
        return value if c.bias is None else value + jnp.sum(w_bias * c.bias)

    def magnitude(c):
        """Sum of the absolute terms of f: the scale of its float64 rounding."""
        value = np.sum(np.abs(w_kernel * c.kernel))
        return value if c.bias is None else value + np.sum(np.abs(w_bias * c.bias))

    return f, magnitude


@settings(max_examples=EXAMPLES)
@given(weighted_stacks(), st.integers(0, 2**32 - 1))
def test_gradients_match_central_differences(stack, seed):
    """Every weight (kernels, biases, BatchNorm gamma/beta/mean/var) in random stacks.

    The folded kernel and bias are affine in each weight but a BatchNorm variance, so a
    unit step is exact up to rounding there; the variance gets a step of 1e-6.
    """
    rng = np.random.default_rng(seed)
    conv = jf.fold_conv(stack)
    f, magnitude = _projection(conv, rng)
    f_jit = jax.jit(f)
    grads = jax.jit(jax.grad(f))(stack)
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(stack)
    leaves = [leaf for _, leaf in paths_leaves]
    scale = magnitude(conv)
    for i, ((path, leaf), grad) in enumerate(zip(paths_leaves, jax.tree.leaves(grads))):
        assert grad.shape == leaf.shape
        direction = rng.standard_normal(leaf.shape)
        h = 1e-6 if jax.tree_util.keystr(path).endswith(".var") else 1.0

        def moved(t, i=i, direction=direction):
            return treedef.unflatten([x + t * direction if j == i else x for j, x in enumerate(leaves)])

        central = (float(f_jit(moved(h))) - float(f_jit(moved(-h)))) / (2 * h)
        analytic = float(np.sum(np.asarray(grad) * direction))
        assert abs(central - analytic) <= 1e-7 * (abs(analytic) + scale), (jax.tree_util.keystr(path), central,
                                                                          analytic)


def _assert_same_conv(conv, ref, atol):
    assert (conv.strides, conv.dilation, conv.padding, conv.groups) == (ref.strides, ref.dilation, ref.padding,
                                                                        ref.groups)
    assert conv.kernel.shape == ref.kernel.shape and (conv.bias is None) == (ref.bias is None)
    np.testing.assert_allclose(conv.kernel, ref.kernel, rtol=0, atol=atol)
    if ref.bias is not None:
        np.testing.assert_allclose(conv.bias, ref.bias, rtol=0, atol=atol)


@settings(max_examples=EXAMPLES)
@given(weighted_stacks(), st.integers(0, 2**31))
def test_jit_and_vmap_equal_fold(stack, seed):
    """jit(fold_conv) and vmap(fold_conv) over three weight draws equal fold(...).conv and fold_batch."""
    items = [redraw(stack, seed + i) for i in range(3)]
    folded = [jf.fold(item) for item in items]
    scale = max(1.0, *(float(np.abs(f.conv.kernel).max()) for f in folded))
    atol = 1e-11 * scale
    _assert_same_conv(jax.jit(jf.fold_conv)(items[0]), folded[0].conv, atol)
    batched = jax.vmap(jf.fold_conv)(jf.stack_batch(items))
    reference = jf.fold_batch(jf.stack_batch(items))
    for i, f in enumerate(folded):
        item = jax.tree.map(lambda x, i=i: x[i], batched)
        _assert_same_conv(item, f.conv, atol)
        _assert_same_conv(item, reference.conv(i), atol)
        affine = fold_affine(items[i])
        assert (f.affine.stride, f.affine.offset, f.affine.groups) == (affine.stride, affine.offset, affine.groups)
        np.testing.assert_allclose(f.affine.kernel, affine.kernel, rtol=0, atol=atol)
        np.testing.assert_allclose(f.affine.bias, affine.bias, rtol=0, atol=atol)


def test_the_issue_example_differentiates_and_trains():
    """grad of a loss on the folded kernel moves the weights towards a target kernel."""
    rng = np.random.default_rng(0)
    stack = jf.Stack([jf.Conv(rng.normal(size=(3, 3, 1, 2)), rng.normal(size=2)),
                      jf.BatchNorm(np.ones(2), np.zeros(2), np.zeros(2), np.ones(2)),
                      jf.Conv(rng.normal(size=(3, 3, 2, 1)))], (16, 16, 1))
    target = np.outer(*[np.convolve([1.0, 2.0, 1.0], [1.0, 2.0, 1.0])] * 2)[..., None, None] / 16

    def loss(s):
        return jnp.sum((jf.fold_conv(s).kernel - target) ** 2)

    step = jax.jit(lambda s: jax.tree.map(lambda w, g: w - 0.01 * g, s, jax.grad(loss)(s)))
    before = float(loss(stack))
    for _ in range(200):
        stack = step(stack)
    assert float(loss(stack)) < 1e-2 * before


def test_fold_under_a_transformation_names_fold_conv():
    stack = jf.Stack([jf.Conv(np.ones((3, 3, 1, 1)))], (8, 8, 1))
    with pytest.raises(jf.FoldError, match="use jfactor.fold_conv"):
        jax.grad(lambda s: jf.fold(s).conv.kernel.sum())(stack)


@pytest.mark.parametrize("call,message", [
    (lambda stack: jf.fold([stack.layers[0]]), r"fold takes a jfactor\.Stack .* got list"),
    (lambda stack: jf.fold(None), r"fold takes a jfactor\.Stack .* got NoneType"),
    (lambda stack: jf.fold_conv([stack.layers[0]]), r"fold_conv takes a jfactor\.Stack .* got list"),
    (lambda stack: jf.fold(stack, probe_batch=0), r"probe_batch must be an integer >= 1, got 0"),
    (lambda stack: jf.fold(stack, seed=-1), r"seed must be an integer >= 0, got -1"),
    (lambda stack: jf.fold(stack, seed=1.5), r"seed must be an integer >= 0, got 1\.5"),
])
def test_fold_names_a_bad_argument(call, message):
    # before: an AttributeError on a list's dtype, numpy's errors on a zero or negative count
    stack = jf.Stack([jf.Conv(np.ones((3, 3, 1, 1)))], (8, 8, 1))
    with pytest.raises(jf.FoldError, match=message):
        call(stack)
