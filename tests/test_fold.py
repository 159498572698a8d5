"""Folding is exact against an independent numpy reference, over random stacks."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jfactor as jf
from jfactor.fold import certified
from tests import reference
from tests.strategies import stacks


def _probe(stack, seed=1):
    return np.random.default_rng(seed).standard_normal((2,) + stack.input_shape)


def _region_mask(region, shape):
    if region is None:
        return np.ones(shape, bool)
    mask = np.zeros(shape, bool)
    mask[tuple(slice(a, b) for a, b in region)] = True
    return mask


def _folded_reference(folded, x):
    c = folded.conv
    return reference.conv(x, np.asarray(c.kernel), None if c.bias is None else np.asarray(c.bias),
                          c.strides, c.dilation, c.padding, c.groups)


@given(stacks())
def test_fold_and_canonical_form_equal_the_stack_on_the_exact_region(stack):
    folded = jf.fold(stack)
    x = _probe(stack)
    y_stack = reference.apply_stack(stack, x)
    y_fold = _folded_reference(folded, x)
    assert y_fold.shape == y_stack.shape == (2,) + stack.output_shape
    mask = _region_mask(folded.exact_region, y_stack.shape[1:-1])
    inside = np.abs(y_fold - y_stack)[:, mask]
    scale = max(np.abs(y_stack).max(), 1.0)
    assert inside.size == 0 or inside.max() <= 1e-10 * scale
    assert folded.certificate.positions_checked == 2 * mask.sum() * stack.output_shape[-1]
    if mask.any():
        assert folded.certificate.rel_diff <= 1e-10
    else:  # nothing to certify: no number that reads as exact
        assert folded.certificate.rel_diff is None and folded.certificate.max_abs_diff is None

    canonical = folded.canonical
    y_canonical = reference.apply_stack(canonical.stack, x)
    assert np.abs(y_canonical - y_fold).max() <= 1e-10 * max(np.abs(y_fold).max(), 1.0)
    assert all(conv.strides == (1,) * stack.ndim for conv in canonical.chain)
    assert canonical.stride == folded.stride


@given(stacks(padding_kinds=("valid", "same")))
def test_exact_region_is_tight_for_valid_and_same_padding(stack):
    """Outside the reported box, every position really differs (random weights)."""
    folded = jf.fold(stack)
    if folded.exact_region is None:
        return
    x = _probe(stack)
    diff = np.abs(_folded_reference(folded, x) - reference.apply_stack(stack, x)).max(axis=(0, -1))
    mask = _region_mask(folded.exact_region, diff.shape)
    # positions whose reads of padding hit non-zero virtual values differ generically
    outside = diff[~mask]
    assert outside.size == 0 or outside.min() > 1e-9 * max(1.0, np.abs(diff).max()) or folded_has_holes(folded, diff)


def folded_has_holes(folded, diff):
    """Dilated reads can skip a bad border position, leaving exact islands outside the box."""
    return any(c.dilation != (1,) * len(c.dilation) for c in folded.canonical.chain)


@given(stacks(padding_kinds=("valid",), allow_nested=False))
def test_valid_stacks_fold_exactly_everywhere(stack):
    folded = jf.fold(stack)
    assert folded.exact_region is None
    assert folded.certificate.outside_max_abs_diff is None


@given(stacks(ndims=(2,), max_layers=3))
def test_float32_fold_is_certified_to_float32_rounding(stack):
    folded = jf.fold(stack.astype(np.float32))
    if stack.dtype is not None:  # a stack of pools alone has no weights to cast
        assert folded.conv.kernel.dtype == np.float32
    assert folded.certificate.dtype == "float64"
    assert folded.certificate.positions_checked == 0 or folded.certificate.rel_diff < 1e-4


def test_depthwise_after_depthwise_stays_depthwise():
    rng = np.random.default_rng(0)
    stack = jf.Stack([jf.Conv(rng.normal(size=(3, 3, 1, 4)), groups=4),
                      jf.Conv(rng.normal(size=(5, 5, 1, 4)), groups=4, dilation=2)], (20, 20, 4))
    folded = jf.fold(stack)
    assert folded.conv.groups == 4
    assert folded.conv.kernel.shape == (11, 11, 1, 4)


def test_groups_compose_to_their_gcd():
    rng = np.random.default_rng(0)
    stack = jf.Stack([jf.Conv(rng.normal(size=(3, 1, 12)), groups=4),
                      jf.Conv(rng.normal(size=(3, 2, 6)), groups=6)], (16, 4))
    folded = jf.fold(stack)
    assert folded.conv.groups == 2
    x = _probe(stack)
    np.testing.assert_allclose(_folded_reference(folded, x), reference.apply_stack(stack, x), atol=1e-12)


def test_bias_free_stack_folds_to_bias_free_conv():
    stack = jf.Stack([jf.Conv(np.ones((3, 3, 1, 1))), jf.AvgPool(2)], (10, 10, 1))
    assert jf.fold(stack).conv.bias is None
    with_bias = jf.Stack([jf.Conv(np.ones((3, 3, 1, 1)), np.ones(1)), jf.AvgPool(2)], (10, 10, 1))
    np.testing.assert_allclose(jf.fold(with_bias).conv.bias, [1.0])


def test_padding_between_layers_reports_region_and_difference():
    rng = np.random.default_rng(3)
    stack = jf.Stack([jf.Conv(rng.normal(size=(3, 3, 1, 1)), padding="same"),
                      jf.Conv(rng.normal(size=(3, 3, 1, 1)), padding="same")], (12, 12, 1))
    folded = jf.fold(stack)
    assert folded.exact_region == ((1, 11), (1, 11))
    assert folded.certificate.max_abs_diff < 1e-12
    assert folded.certificate.outside_max_abs_diff > 1e-3


def test_padding_beyond_the_virtual_support_is_harmless():
    """A pool's response to zero-extended input is zero left of it, so 'same' after it is exact there."""
    rng = np.random.default_rng(4)
    stack = jf.Stack([jf.AvgPool(2), jf.Conv(rng.normal(size=(3, 1, 1)), padding="same")], (16, 1))
    folded = jf.fold(stack)
    assert folded.exact_region is None  # 16 is even: the right side is zero too
    odd = jf.fold(stack.with_input_shape((17, 1)))
    assert odd.exact_region == ((0, 7),)


def test_branches_with_different_strides_do_not_fold():
    rng = np.random.default_rng(0)
    stack = jf.Stack([jf.Branches([[jf.Conv(rng.normal(size=(2, 1, 1)), strides=2)],
                                   [jf.Conv(rng.normal(size=(5, 1, 1)))]])], (8, 1))
    assert stack.output_shape == (4, 1)
    with pytest.raises(jf.FoldError, match=r"layers\[0\] \(branches\).*different effective strides"):
        jf.fold(stack)


def test_an_empty_exact_region_certifies_nothing():
    """Forty 3x3 'same' convs on a 32x32 input: no output position is exact, and the certificate
    must not read as a perfect one."""
    rng = np.random.default_rng(0)
    stack = jf.Stack([jf.Conv(0.3 * rng.normal(size=(3, 3, 1, 1)), padding="same") for _ in range(40)], (32, 32, 1))
    folded = jf.fold(stack)
    assert folded.exact_region == ((0, 0), (0, 0)) and folded.certificate.positions_checked == 0
    assert folded.certificate.max_abs_diff is None and folded.certificate.rel_diff is None
    assert folded.certificate.outside_max_abs_diff > 1e-6
    for relative in (False, True):
        assert certified(folded.certificate.to_dict(), relative).startswith("none: no output position is exact")
    # and it is said so, not as an "exact only on output region [0, 0) x [0, 0)"
    from rich.console import Console

    from jfactor.display import fold_summary

    console = Console(record=True, width=200)
    fold_summary(folded, console)
    text = console.export_text()
    assert "exact nowhere: zero padding between layers reaches every output position" in text
    assert "[0, 0)" not in text


@given(st.integers(1, 40), st.integers(1, 6), st.integers(1, 3), st.integers(1, 4), st.integers(0, 8),
       st.integers(0, 8), st.data())
def test_each_dims_clean_mask_counts_every_read_of_each_output(n, k, s, dil, lo, hi, data):
    """The per-dim analysis against the definition: output j is clean when each of its k reads is a
    clean real position, or a padded one outside the support (below: a loop over every read)."""
    from jfactor.analysis import _conv_dim

    extent = dil * (k - 1) + 1
    if n + lo + hi < extent:
        return
    m = (n + lo + hi - extent) // s + 1
    clean = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    support = data.draw(st.none() | st.tuples(st.integers(-5, n + 5), st.integers(-5, n + 5)).map(sorted))
    item = jf.Conv(np.ones((k, 1, 1)), strides=s, dilation=dil, padding=((lo, hi),))
    expected = []
    for j in range(m):
        ok = True
        for t in range(k):
            r = s * j - lo + dil * t
            if 0 <= r < n:
                ok &= bool(clean[r])
            else:
                ok &= support is not None and not support[0] <= r <= support[1]
        expected.append(ok)
    mask, _ = _conv_dim(clean, None if support is None else tuple(support), item, 0, m)
    np.testing.assert_array_equal(mask, expected)


def test_the_exact_region_of_a_long_input_takes_memory_of_its_length_not_times_the_taps():
    # before: an (outputs x taps) index array per dim: 2.5 GB for 500,000 samples and 255 taps
    import tracemalloc

    from jfactor.analysis import exact_region

    n = 100_000
    stack = jf.Stack([jf.Conv(np.ones((255, 1, 1))), jf.Conv(np.ones((255, 1, 1)), padding="same")], (n, 1))
    program = stack.lower(np.float64)
    tracemalloc.start()
    region = exact_region(program, (n,))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert region == ((127, n - 254 - 127),)
    assert peak < 100 * n  # a few arrays of n entries (about 70 bytes each); (n x 255) int64 alone is 204 MB


def _with_variance(var):
    """A conv, a BatchNorm and a branch holding another, whose variances are then replaced by
    ``jax.tree.map`` (as the README's batch recipe replaces weights), which builds no layer and so runs
    none of their checks."""
    import jax

    bn = lambda: jf.BatchNorm(np.ones(2), np.zeros(2), np.zeros(2), np.ones(2), 1e-3)  # noqa: E731
    stack = jf.Stack([jf.Conv(np.ones((3, 3, 1, 2))), bn(), jf.Branches([[bn()], [jf.Identity()]])], (8, 8, 1))
    return jax.tree_util.tree_map_with_path(
        lambda path, w: np.asarray(var, np.float64) if jax.tree_util.keystr(path).endswith(".var") else w, stack)


def test_a_batchnorm_variance_set_past_its_checks_is_refused_by_name():
    """A negative variance read "gamma / sqrt(var + epsilon) overflows float64", no layer named."""
    import jax

    bad = _with_variance([1.0, -1.0])
    with pytest.raises(jf.StackError, match=r"^layers\[1\] \(batch_norm\): var \+ epsilon must be > 0 in every "
                                            r"channel, not in channel\(s\) \[1\]$"):
        jf.fold(bad)
    # named as construction names it (it read "layers[2] (branches): batch_norm: ...")
    with pytest.raises(jf.StackError, match=r"^layers\[2\]\.branches\[0\]\[0\] \(batch_norm\): var \+ epsilon must "):
        jf.fold(bad.__class__([bad.layers[0], jf.BatchNorm(*(np.ones(2),) * 4), bad.layers[2]], bad.input_shape))
    inside = jf.Stack([jf.Residual([jf.BatchNorm(*(np.ones(2),) * 4)])], (8, 8, 2))
    inside = jax.tree_util.tree_map_with_path(lambda path, w: -w if jax.tree_util.keystr(path).endswith(".var") else w,
                                              inside)
    with pytest.raises(jf.StackError, match=r"^layers\[0\]\.layers\[0\] \(batch_norm\): var \+ epsilon must "):
        jf.fold(inside)
    with pytest.raises(jf.StackError, match=r"give a BatchNorm a var \+ epsilon that is not > 0"):
        jf.batch.fold_batch(jf.batch.stack_batch([bad, bad]))
    good = _with_variance([1.0, 2.0])
    assert np.isfinite(np.asarray(jf.fold(good).conv.kernel)).all()
