"""flax nnx <-> jfactor: from_nnx reads what the nnx module computes, to_nnx writes what jfactor computes.

Every check runs in float64 against the nnx module's own output and the independent
numpy reference (tests/reference.py, which resolves 'same' with the TF rule itself).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import jfactor as jf
from jfactor.interop.nnx import from_nnx, to_nnx
from tests import reference

RNG = np.random.default_rng(0)


def numpy_init(seed=0):
    """An nnx initialiser drawing from numpy: flax's own compiles once per new shape (about 1 s)."""
    rng = np.random.default_rng(seed)
    return lambda key, shape, dtype: jnp.asarray(rng.normal(size=shape), dtype)


def conv(cin, cout, kernel_size, *, seed=0, dtype=jnp.float64, **kwargs):
    """An nnx.Conv with random weights."""
    init = numpy_init(seed)
    return nnx.Conv(cin, cout, kernel_size, param_dtype=dtype, kernel_init=init, bias_init=init,
                    rngs=nnx.Rngs(0), **kwargs)


def linear(cin, cout):
    return nnx.Linear(cin, cout, kernel_init=numpy_init(), rngs=nnx.Rngs(0))


def batch_norm(channels, *, seed=0, **kwargs):
    """An eval-mode nnx.BatchNorm with float64 random statistics."""
    rng = np.random.default_rng(seed)
    layer = nnx.BatchNorm(channels, use_running_average=True, param_dtype=jnp.float64, rngs=nnx.Rngs(0),
                          **kwargs)
    for variable, value in [(layer.mean, rng.normal(size=channels)), (layer.var, rng.uniform(0.2, 2.0, channels)),
                            (layer.scale, rng.normal(size=channels)), (layer.bias, rng.normal(size=channels))]:
        if variable is not None:
            variable.set_value(jnp.asarray(value))
    return layer


def avg_pool(window, strides=None, **kwargs):
    return functools.partial(nnx.avg_pool, window_shape=window, strides=strides, **kwargs)


def _x(shape, batch=2, seed=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((batch,) + tuple(shape)))


def _close(a, b, tol=1e-12):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=0, atol=tol * max(1.0, np.abs(b).max(initial=0.0)))


def _assert_reads(model, input_shape):
    """from_nnx(model) computes what model computes (by the numpy reference: no compile)."""
    stack = from_nnx(model, input_shape)
    x = _x(input_shape)
    _close(reference.apply_stack(stack, np.asarray(x)), model(x))
    return stack


# -- from_nnx: what each nnx layer means ---------------------------------------------------


@pytest.mark.parametrize("padding", ["SAME", "VALID", "same", 2, [(1, 2), (0, 1)], (1, (0, 2))])
@pytest.mark.parametrize("strides,dilation", [(1, 1), (2, 1), (3, 2)])
def test_conv_padding_strides_dilation(padding, strides, dilation):
    model = conv(2, 3, (3, 2), strides=strides, kernel_dilation=dilation, padding=padding)
    stack = _assert_reads(model, (11, 9, 2))
    if padding in ("SAME", "same"):  # flax's 'SAME' is the TF rule, as the reference resolves it
        x = np.asarray(_x((11, 9, 2)))
        _close(model(x), reference.conv(x, model.kernel[...], model.bias[...], strides, dilation, "same"))
        assert stack.layers[0].padding == "same"


def test_conv_kernel_layout_groups_mask_and_causal_padding():
    grouped = conv(4, 6, (3, 2), feature_group_count=2, use_bias=False)
    assert grouped.kernel.shape == (3, 2, 2, 6)  # (*k, C_in // groups, C_out)
    stack = _assert_reads(grouped, (7, 6, 4))
    assert stack.layers[0].groups == 2 and stack.layers[0].bias is None

    masked = conv(2, 2, (3,), mask=jnp.asarray(RNG.integers(0, 2, (3, 2, 2)), jnp.float64))
    _assert_reads(masked, (9, 2))

    causal = conv(1, 2, (3,), kernel_dilation=2, padding="CAUSAL")
    stack = _assert_reads(causal, (9, 1))
    assert stack.layers[0].padding == ((4, 0),)


@pytest.mark.parametrize("options", [{}, {"use_scale": False}, {"use_bias": False}, {"epsilon": 0.3}])
def test_batch_norm_in_eval_mode(options):
    layer = batch_norm(3, **options)
    x = np.asarray(_x((5, 4, 3)))
    scale = 1.0 if layer.scale is None else np.asarray(layer.scale[...])
    bias = 0.0 if layer.bias is None else np.asarray(layer.bias[...])
    mean, var = np.asarray(layer.mean[...]), np.asarray(layer.var[...])
    expected = (x - mean) / np.sqrt(var + layer.epsilon) * scale + bias  # flax 0.12.8's formula
    _close(layer(x), expected)
    stack = _assert_reads(layer, (5, 4, 3))
    assert stack.layers[0].epsilon == layer.epsilon


def test_avg_pool_valid_and_padded():
    valid = _assert_reads(avg_pool((2, 3), (2, 1)), (8, 9, 2))
    assert isinstance(valid.layers[0], jf.AvgPool) and valid.layers[0].strides == (2, 1)
    unit = from_nnx(avg_pool((2, 2)), (8, 8, 1))
    assert unit.layers[0].strides == (1, 1)  # flax's strides default to 1, not to the window
    for padding in ("SAME", [(1, 0), (2, 1)]):
        padded = _assert_reads(avg_pool((3, 2), (2, 2), padding=padding), (9, 8, 2))
        assert isinstance(padded.layers[0], jf.Conv)  # zeros counted: a depthwise box conv


def test_identities_nesting_and_eval_mode():
    model = nnx.Sequential(
        conv(1, 2, (3, 3)),
        nnx.Dropout(0.5, deterministic=True),
        nnx.Dropout(0.0, rngs=nnx.Rngs(0)),
        nnx.Sequential(),
        nnx.Sequential(batch_norm(2), avg_pool((2, 2), (2, 2))),
    )
    stack = _assert_reads(model, (10, 10, 1))
    assert [layer.kind for layer in stack.layers] == ["conv", "identity", "identity", "identity", "batch_norm",
                                                      "avg_pool"]
    assert isinstance(from_nnx(nnx.Sequential(), (4, 1)).layers[0], jf.Identity)
    assert len(from_nnx(model.layers, (10, 10, 1)).layers) == 6  # an nnx.List reads like the Sequential

    trained = nnx.Sequential(conv(1, 2, (3, 3)), nnx.BatchNorm(2, rngs=nnx.Rngs(0)),
                             nnx.Dropout(0.5, rngs=nnx.Rngs(0)))
    with pytest.raises(jf.StackError, match=r"layers\[1\] \(BatchNorm\): not linear"):
        from_nnx(trained, (6, 6, 1))
    trained.eval()  # float32 statistics: jfactor computes 1/sqrt(var + eps) in their dtype
    x = _x((6, 6, 1))
    _close(from_nnx(trained, (6, 6, 1))(x), trained(x), tol=1e-6)


def test_float32_models_stay_float32():
    layer = conv(1, 2, (3, 3), dtype=jnp.float32)
    stack = from_nnx(layer, (6, 6, 1))
    assert stack.dtype == jnp.float32
    x = _x((6, 6, 1)).astype(jnp.float32)
    _close(stack(x), layer(x), tol=1e-5)


# -- from_nnx: errors name the layer ------------------------------------------------------

TWO_D = (8, 8, 2)


@pytest.mark.parametrize(
    "layer,match",
    [
        (nnx.relu, r"layers\[1\] \(relu\): not linear, or unknown to jfactor; it folds nnx\.Conv"),
        (jax.nn.gelu, r"layers\[1\] \(gelu\): not linear"),
        (functools.partial(nnx.max_pool, window_shape=(2, 2)), r"layers\[1\] \(max_pool\): not linear"),
        (linear(2, 2), r"layers\[1\] \(Linear\): nnx\.Linear \(on an \(N, \*spatial, C\) input, a 1x1 .*kernel_size=1"),
        (nnx.Dropout(0.5, rngs=nnx.Rngs(0)), r"layers\[1\] \(Dropout\): not linear: Dropout in training mode"),
        (nnx.BatchNorm(2, rngs=nnx.Rngs(0)),
         r"\(BatchNorm\): not linear: BatchNorm in training mode .* model\.eval\(\)"),
        (batch_norm(8, axis=1), r"\(BatchNorm\): normalises axis 1, not the channels"),
        (conv(2, 2, (3, 3), padding="CIRCULAR"), r"\(Conv\): not one convolution: padding 'CIRCULAR' is not zero"),
        (conv(2, 2, (3, 3), padding="full"), r"\(Conv\): not one convolution: padding 'full' is not zero"),
        (conv(2, 2, (3, 3), padding="CAUSAL"), r"\(Conv\): padding 'CAUSAL' is only defined for 1-D"),
        (conv(2, 2, (2, 2), padding="SAME_LOWER"), r"\(Conv\): padding 'SAME_LOWER' .* is not read; give the "
                                                   r"pads as \(low, high\) pairs"),  # was "is not zero padding"
        (conv(2, 2, (3, 3), input_dilation=2), r"\(Conv\): not one convolution: input_dilation 2"),
        (conv(2, 2, (3, 3), conv_general_dilated=lambda *a, **k: None), r"custom conv_general_dilated"),
        (avg_pool((2, 2), padding="SAME", count_include_pad=False),
         r"\(avg_pool\): not one convolution: .*count_include_pad"),
        (functools.partial(nnx.avg_pool, (2, 2)), r"\(avg_pool\): binds positional arguments"),
        (functools.partial(nnx.avg_pool, strides=(2, 2)), r"missing a required argument: 'window_shape'"),
    ],
)
def test_layers_that_do_not_fold_are_named(layer, match):
    model = nnx.Sequential(conv(2, 2, (1, 1)), layer)
    with pytest.raises(jf.StackError, match=match + r".*pass split=True"):
        from_nnx(model, TWO_D)


@pytest.mark.parametrize(
    "model,shape,match",
    [
        (nnx.Sequential(conv(2, 2, (1, 1)), conv(3, 1, (3, 3))), TWO_D,
         r"layers\[1\] \(Conv\): the kernel expects C_in = 3 x groups 1 = 3 channels, its input has 2"),
        ([conv(2, 1, (9, 9), padding="VALID")], TWO_D, r"layers\[0\] \(Conv\): kernel extent 9 is larger"),
        ([conv(2, 1, (3, 3), padding=[(1, 1)])], TWO_D, r"layers\[0\] \(Conv\): padding \[\[1, 1\]\] has 1 entries"),
        ([avg_pool((2, 2, 2))], TWO_D, r"layers\[0\] \(avg_pool\): pool_size \[2, 2, 2\] has 3 entries"),
        ([batch_norm(3)], TWO_D, r"layers\[0\] \(BatchNorm\): has 3 channels, its input has 2"),
        (nnx.Sequential(conv(2, 2, (1, 1)), nnx.Sequential(nnx.relu)), TWO_D, r"layers\[1\]\.layers\[0\] \(relu\)"),
        ([], TWO_D, r"layers: needs at least one layer"),
        (conv(2, 2, (3, 3)), (8, 8, 0), r"input_shape"),
    ],
)
def test_layers_that_do_not_fit_are_named(model, shape, match):
    with pytest.raises(jf.StackError, match=match):
        from_nnx(model, shape)


# -- from_nnx(split=True) ------------------------------------------------------------------


def test_split_folds_each_linear_run_on_the_shape_reaching_it():
    bn = nnx.BatchNorm(3, rngs=nnx.Rngs(0))  # training mode: a split point that must stay untouched
    model = nnx.Sequential(
        nnx.relu,
        conv(1, 3, (3, 3)), avg_pool((2, 2), (2, 2)),
        nnx.relu, functools.partial(nnx.max_pool, window_shape=(2, 2), strides=(2, 2)), bn,
        conv(3, 2, (2, 2), padding="VALID"),
        lambda x: x.reshape(x.shape[0], -1), linear(18, 4),
    )
    stacks = from_nnx(model, (16, 16, 1), split=True)
    assert isinstance(stacks, list) and [s.input_shape for s in stacks] == [(16, 16, 1), (4, 4, 3)]
    assert [len(s.layers) for s in stacks] == [2, 1] and stacks[1].output_shape == (3, 3, 2)
    np.testing.assert_array_equal(bn.mean[...], np.zeros(3))  # eval_shape ran it functionally

    x = _x((16, 16, 1))
    h = model.layers[0](x)
    _close(stacks[0](h), model.layers[2](model.layers[1](h)))
    assert from_nnx([nnx.relu, nnx.tanh], (4, 1), split=True) == []
    single = from_nnx(conv(1, 1, (3,)), (6, 1), split=True)
    assert len(single) == 1 and single[0].output_shape == (6, 1)


def test_split_errors_name_the_layer():
    flatten = nnx.Sequential(conv(1, 1, (3, 3)), lambda x: x.reshape(x.shape[0], -1), batch_norm(36))
    with pytest.raises(jf.StackError, match=r"layers\[2\] \(BatchNorm\): its input, the output of layers\[1\] "
                                            r"\(<lambda>\), has shape \(36,\); a stack needs \(\*spatial, C\) "
                                            r"with 2 spatial dims"):
        from_nnx(flatten, (6, 6, 1), split=True)
    linear_layer = linear(5, 2)
    with pytest.raises(jf.StackError, match=r"layers\[0\] \(Linear\): cannot infer its output shape on an input "
                                            r"\(1, 6, 6, 1\)"):
        from_nnx([linear_layer], (6, 6, 1), split=True)
    with pytest.raises(jf.StackError, match=r"layers\[0\] \(<lambda>\): returns tuple, not one array"):
        from_nnx([lambda x: (x, x)], (6, 1), split=True)


# -- to_nnx --------------------------------------------------------------------------------


@pytest.mark.parametrize("padding", ["valid", "same", 1, ((2, 0), (1, 3))])
def test_to_nnx_conv_equals_jfactor(padding):
    kernel, bias = RNG.normal(size=(3, 2, 2, 4)), RNG.normal(size=4)
    layer = jf.Conv(kernel, bias, (2, 1), (1, 2), padding, groups=2)
    module = to_nnx(layer)
    assert isinstance(module, nnx.Conv) and module.param_dtype == jnp.float64
    np.testing.assert_array_equal(module.kernel[...], kernel)
    x = _x((9, 8, 4))
    _close(module(x), jf.Stack([layer], (9, 8, 4))(x))
    no_bias = to_nnx(jf.Conv(kernel.astype(np.float32)), rngs=nnx.Rngs(3))
    assert no_bias.bias is None and no_bias.kernel[...].dtype == jnp.float32


def test_to_nnx_stack_of_every_sequential_layer():
    stack = jf.Stack([
        jf.Conv(RNG.normal(size=(3, 3, 1, 2)), padding="same"),
        jf.BatchNorm(RNG.normal(size=2), RNG.normal(size=2), RNG.normal(size=2), RNG.uniform(0.5, 2, 2)),
        jf.AvgPool((2, 3), (2, 1)), jf.SumPool(2), jf.Subsample(2), jf.Identity(),
    ], (18, 16, 1))
    module = to_nnx(stack)
    assert isinstance(module, nnx.Sequential) and isinstance(module.layers[2], functools.partial)
    x = _x(stack.input_shape)
    _close(module(x), stack(x))
    again = from_nnx(module, stack.input_shape)
    assert isinstance(again.layers[2], jf.AvgPool)
    _close(again(x), stack(x))


def test_to_nnx_errors():
    residual = jf.Stack([jf.Identity(), jf.Residual([jf.Conv(np.ones((3, 3, 1, 1)), padding="same")])], (6, 6, 1))
    with pytest.raises(jf.StackError, match=r"layers\[1\] \(residual\): runs parallel branches.*jfactor\.fold"):
        to_nnx(residual)
    with pytest.raises(jf.StackError, match=r"to_nnx: expected a jfactor Conv or Stack, got list"):
        to_nnx([jf.Identity()])


# -- round trips: nnx -> from_nnx -> fold -> to_nnx ----------------------------------------


def _region(folded):
    return (slice(None),) + tuple(slice(a, b) for a, b in folded.exact_region or ()) + (slice(None),)


def _assert_round_trip(model, input_shape):
    """The folded conv, as an nnx.Conv, equals ``model`` on the fold's exact region."""
    folded = jf.fold(_assert_reads(model, input_shape))
    x = _x(input_shape)
    inside = _region(folded)
    _close(np.asarray(to_nnx(folded.conv)(x))[inside], np.asarray(model(x))[inside], tol=1e-10)
    return folded


def test_round_trip_of_the_seed_section5_model_is_exact_everywhere():
    model = nnx.Sequential(conv(1, 1, (3, 3), padding="VALID"), avg_pool((2, 2), (2, 2)),
                           conv(1, 1, (3, 3), padding="VALID", seed=1))
    folded = _assert_round_trip(model, (28, 28, 1))
    assert folded.exact_region is None
    assert folded.conv.kernel.shape == (8, 8, 1, 1) and folded.conv.strides == (2, 2)
    assert folded.canonical.describe() == "3x3 -> 3x3 d2 -> AvgPool(2)"
    x = _x((28, 28, 1))
    _close(to_nnx(folded.canonical.stack)(x), model(x))


def test_round_trip_with_padding_between_layers_holds_on_the_exact_region():
    model = nnx.Sequential(conv(2, 4, (3, 3), strides=2, feature_group_count=2), batch_norm(4),
                           conv(4, 3, (2, 3), kernel_dilation=2, padding=[(1, 0), (2, 1)]))
    folded = _assert_round_trip(model, (15, 13, 2))
    assert folded.exact_region is not None


@st.composite
def nnx_models(draw):
    """A random nnx.Sequential of foldable layers that fits its (small) input."""
    ndim = draw(st.sampled_from([1, 2]))
    shape = tuple(draw(st.integers(6, 12)) for _ in range(ndim)) + (draw(st.integers(1, 3)),)
    layers, current = [], shape
    for i in range(draw(st.integers(1, 3))):
        channels = current[-1]
        kind = draw(st.sampled_from(["conv", "conv", "batch_norm", "avg_pool", "identity"]))
        if kind == "conv":
            groups = draw(st.sampled_from([g for g in (1, 2, 3) if channels % g == 0]))
            padding = draw(st.sampled_from(["SAME", "VALID", 1, "explicit"] + (["CAUSAL"] if ndim == 1 else [])))
            if padding == "explicit":
                padding = [(draw(st.integers(0, 2)), draw(st.integers(0, 2))) for _ in range(ndim)]
            layer = conv(channels, groups * draw(st.integers(1, 2)),
                         tuple(draw(st.integers(1, 3)) for _ in range(ndim)), seed=draw(st.integers(0, 99)),
                         strides=tuple(draw(st.integers(1, 2)) for _ in range(ndim)),
                         kernel_dilation=tuple(draw(st.integers(1, 2)) for _ in range(ndim)),
                         padding=padding, feature_group_count=groups, use_bias=draw(st.booleans()))
        elif kind == "batch_norm":
            layer = batch_norm(channels, seed=i)
        elif kind == "avg_pool":
            layer = avg_pool(tuple(draw(st.integers(1, 2)) for _ in range(ndim)),
                             tuple(draw(st.integers(1, 2)) for _ in range(ndim)),
                             padding=draw(st.sampled_from(["VALID", "SAME"])))
        else:
            layer = draw(st.sampled_from([nnx.Sequential(), nnx.Dropout(0.3, deterministic=True)]))
        try:
            out = from_nnx([layer], current).output_shape
        except jf.StackError:
            continue  # does not fit what is left of the input
        layers.append(layer)
        current = out
    return nnx.Sequential(*layers), shape


@settings(max_examples=12)  # each example compiles a fold: about 1 s on CPU
@given(nnx_models())
def test_round_trip_of_random_models(case):
    _assert_round_trip(*case)


def test_to_nnx_refuses_rngs_that_are_not_nnx_rngs():
    with pytest.raises(jf.StackError, match=r"rngs must be an nnx.Rngs \(nnx.Rngs\(5\), say\), got int"):
        to_nnx(jf.Conv(np.ones((3, 3, 1, 1))), rngs=5)
