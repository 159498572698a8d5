"""Keras 3 (JAX backend) models in, folded Keras layers out; checked against Keras' own ``model.predict``."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jfactor as jf  # switches on float64 before keras starts

os.environ.setdefault("KERAS_BACKEND", "jax")
import keras  # noqa: E402  (after the backend is chosen)

from jfactor.errors import StackError  # noqa: E402
from jfactor.interop.keras3 import from_keras, to_keras  # noqa: E402
from tests.test_seed_notation import SEED, SEED_SIZES  # noqa: E402

L = keras.layers


@pytest.fixture(autouse=True)
def float64_keras():
    """Keras layers made in a test compute in float64, so outputs compare to rounding."""
    before = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    yield
    keras.config.set_floatx(before[0])
    keras.config.set_dtype_policy(before[1])


def _seed_models(text: str) -> list:
    """The seed's code blocks run as real Keras code: one keras.Model per ``Input`` line."""
    names = {"Input": keras.Input, "Conv2D": L.Conv2D, "AveragePooling2D": L.AveragePooling2D}
    chunks = []
    for line in text.splitlines():
        code = line.split("#")[0].strip()
        if not code or code == "python" or set(code) == {"-"}:
            continue
        if "Input(" in code:
            chunks.append([])
        chunks[-1].append(code)
    models = []
    for chunk in chunks:
        scope = dict(names)
        exec(chunk[0], scope)  # noqa: S102  x = Input(...)
        inputs = scope[chunk[0].split("=")[0].strip()]
        for code in chunk[1:]:
            exec(code, scope)  # noqa: S102  the seed's own lines, from the repository
        models.append(keras.Model(inputs, scope[chunk[-1].split("=")[0].strip()]))
    return models


def _apply(conv, x):
    return np.asarray(jf.Stack([conv], x.shape[1:])(x))


@pytest.mark.parametrize("name", sorted(SEED_SIZES))
def test_seed_blocks_as_keras_models_fold_to_the_stated_sizes_and_match_predict(name):
    models = _seed_models((SEED / f"{name}.txt").read_text())
    sizes = []
    for model in models:
        x = np.random.default_rng(0).standard_normal((2,) + model.input_shape[1:])
        folded = jf.fold(from_keras(model))
        sizes.append((folded.receptive_field[0], folded.stride[0]))
        assert folded.exact
        expected = model.predict(x, verbose=0)
        assert expected.dtype == np.float64
        np.testing.assert_allclose(_apply(folded.conv, x), expected, atol=1e-12 * np.abs(expected).max())
    assert sizes == SEED_SIZES[name]


def _branchy(ndim: int = 2):
    conv, pool, pad = {1: (L.Conv1D, L.AveragePooling1D, L.ZeroPadding1D),
                       2: (L.Conv2D, L.AveragePooling2D, L.ZeroPadding2D),
                       3: (L.Conv3D, L.AveragePooling3D, L.ZeroPadding3D)}[ndim]
    size = {1: 24, 2: 14, 3: 9}[ndim]
    x = inputs = keras.Input((size,) * ndim + (3,))
    x = conv(4, 3, padding="same", name="stem")(x)
    x = L.BatchNormalization(name="bn", moving_mean_initializer="random_normal",
                             moving_variance_initializer="ones", gamma_initializer="random_normal")(x)
    x = L.Add(name="repvgg")([conv(4, 3, padding="same")(x), conv(4, 1)(x), L.Identity()(x)])
    x = pad(1, name="pad")(x)
    x = pool(2, name="pool")(x)
    x = L.Concatenate(name="cat")([conv(2, 3, strides=2, padding="same", groups=2)(x),
                                    L.Activation("linear")(conv(3, 1, strides=2)(x))])
    if ndim == 2:
        x = L.DepthwiseConv2D(3, depth_multiplier=2, name="dw")(x)
    return keras.Model(inputs, x)


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_functional_model_with_branches_folds_to_predict_on_the_exact_region(ndim):
    model = _branchy(ndim)
    folded = jf.fold(from_keras(model))
    x = np.random.default_rng(1).standard_normal((2,) + model.input_shape[1:])
    expected = model.predict(x, verbose=0)
    got = _apply(folded.conv, x)
    region = folded.exact_region
    assert region is not None  # 'same' convs and the zero padding after the stem spoil the borders
    inner = (slice(None),) + tuple(slice(a, b) for a, b in region)
    # Keras' own BatchNormalization is off the float64 formula (gamma (x - mean) / sqrt(var + eps) + beta)
    # by ~1e-8 relative (float32 rounding inside it), so the tolerance is float32's here.
    np.testing.assert_allclose(got[inner], expected[inner], atol=1e-6 * np.abs(expected).max())
    # outside the region the difference is real, and the certificate saw it
    assert folded.certificate.outside_max_abs_diff > 1e-6


def test_sequential_reads_in_order_and_to_keras_round_trips():
    model = keras.Sequential([keras.Input((16, 16, 2)), L.Conv2D(3, 3), L.AveragePooling2D(2),
                              L.DepthwiseConv2D(2, strides=2), L.Dropout(0.5), L.Conv2D(2, 1, use_bias=False)])
    folded = jf.fold(from_keras(model))
    x = np.random.default_rng(2).standard_normal((3, 16, 16, 2))
    expected = model.predict(x, verbose=0)
    layer = to_keras(folded.conv)
    assert isinstance(layer, L.Conv2D) and layer.kernel.shape == folded.conv.kernel.shape
    np.testing.assert_allclose(np.asarray(layer(x)), expected, atol=1e-12 * np.abs(expected).max())


def test_to_keras_with_explicit_padding_is_zero_padding_then_conv():
    model = keras.Sequential([keras.Input((10, 10, 1)), L.Conv2D(1, 3, padding="same"), L.Conv2D(1, 3)])
    folded = jf.fold(from_keras(model))
    assert folded.conv.padding == ((1, 1), (1, 1))
    block = to_keras(folded.conv)
    assert [type(layer).__name__ for layer in block.layers] == ["ZeroPadding2D", "Conv2D"]
    x = np.random.default_rng(3).standard_normal((1, 10, 10, 1))
    np.testing.assert_allclose(np.asarray(block(x)), _apply(folded.conv, x), atol=1e-12)


def test_to_keras_keeps_float64_where_keras_computes_in_float32(monkeypatch):
    # before: the Sequential of ZeroPadding2D and Conv2D cast its input to Keras' floatx (float32): error 4.7e-7
    keras.config.set_floatx("float32")
    keras.config.set_dtype_policy("float32")
    rng = np.random.default_rng(8)
    conv = jf.Conv(rng.standard_normal((3, 3, 4, 2)), rng.standard_normal(2), padding=((1, 2), (0, 3)))
    x = rng.standard_normal((2, 11, 10, 4))
    y = to_keras(conv)(x)
    assert y.dtype == "float64"
    np.testing.assert_allclose(np.asarray(y), _apply(conv, x), rtol=0, atol=1e-12)


def _constant_operand_models():
    """(name, model, what the message says): keras.ops calls with a constant operand."""
    def conv(inputs):
        return L.Conv2D(2, 3, name="c")(inputs)

    constant = r"a keras.ops operation with operands that are not tensors of the model \((float|ndarray)\)"
    for name, make, why in (("x + 1.0", lambda c: c + 1.0, constant),
                            ("ops.add", lambda c: keras.ops.add(c, np.array([10.0, 20.0])), constant),
                            ("ops.concatenate", lambda c: keras.ops.concatenate([c, np.ones((1, 4, 4, 1))], axis=-1),
                             constant),
                            ("x * 2.0", lambda c: c * 2.0, "not linear, or unknown to jfactor"),
                            # not read whatever its operands: not linear, not "constant operands"
                            ("ops.clip", lambda c: keras.ops.clip(c, 0.0, 1.0), "not linear, or unknown to jfactor")):
        inputs = keras.Input((6, 6, 1))
        yield name, keras.Model(inputs, L.Identity(name="after")(make(conv(inputs)))), why


@pytest.mark.parametrize("index", range(5))
def test_keras_ops_with_a_constant_operand_are_named_and_split_around(index):
    # before: x + 1.0 read as x (the constant dropped, folded bias None), ops.concatenate with a constant gave 2
    # channels where Keras gives 3, and x * 2.0 raised Keras' "No such layer: multiply"
    name, model, why = list(_constant_operand_models())[index]
    with pytest.raises(StackError, match=r"operation \w+ \(\w+, a keras.ops call\): " + why):
        from_keras(model)
    found = from_keras(model, split=True)  # before: ValueError "'add' is not in list" from the layer positions
    assert [s.nodes for s, _ in found] == [("c",), ("after",)], name
    x = np.random.default_rng(index).standard_normal((1, 6, 6, 1))
    conv_out = keras.Model(model.input, model.get_layer("c").output)(x)
    np.testing.assert_allclose(np.asarray(found[0][1](x)), np.asarray(conv_out), atol=1e-12)


def test_keras_ops_of_the_models_tensors_alone_are_read():
    inputs = keras.Input((6, 6, 1))
    a, b = L.Conv2D(2, 3, name="a")(inputs), L.Conv2D(2, 3, name="b")(inputs)
    model = keras.Model(inputs, keras.ops.concatenate([keras.ops.add(a, b), a], axis=-1))
    found = from_keras(model, split=True)
    assert len(found) == 1 and found[0][0].positions == (1, 2)  # the keras.ops calls have no place in model.layers
    x = np.random.default_rng(9).standard_normal((2, 6, 6, 1))
    expected = model.predict(x, verbose=0)
    np.testing.assert_allclose(np.asarray(from_keras(model)(x)), expected, atol=1e-12 * np.abs(expected).max())


def test_a_broadcast_add_is_named_and_split_around():
    # before: StackError "branch output shapes [(8, 8, 2), (1, 1, 2)] differ" even with split=True
    inputs = keras.Input((8, 8, 1))
    a = L.Conv2D(2, 1, name="a")(inputs)
    pooled = L.AveragePooling2D(8, name="mean")(a)
    model = keras.Model(inputs, L.Add(name="plus")([a, pooled]))
    with pytest.raises(StackError, match=r"layers\[3\] \(plus, Add\): adds tensors of shapes \(8, 8, 2\), "
                                         r"\(1, 1, 2\) \(broadcast\)"):
        from_keras(model)
    # a is also read by the add, outside any segment: a segment ends there
    assert [s.nodes for s, _ in from_keras(model, split=True)] == [("a",), ("mean",)]


def test_a_layers_refused_weights_name_the_keras_layer():
    # before: "conv: kernel has 1 non-finite value(s)", with no word of which Keras layer
    inputs = keras.Input((8, 8, 1))
    model = keras.Model(inputs, L.BatchNormalization(name="my_bn")(L.Conv2D(1, 3, name="my_conv")(inputs)))
    weights = model.get_layer("my_conv").get_weights()
    weights[0][0, 0, 0, 0] = np.nan
    model.get_layer("my_conv").set_weights(weights)
    with pytest.raises(StackError, match=r"layers\[1\] \(my_conv, Conv2D\): conv: kernel has 1 non-finite"):
        from_keras(model)
    weights[0][0, 0, 0, 0] = 1.0
    model.get_layer("my_conv").set_weights(weights)
    stats = model.get_layer("my_bn").get_weights()
    stats[3][:] = -1.0
    model.get_layer("my_bn").set_weights(stats)
    with pytest.raises(StackError, match=r"layers\[2\] \(my_bn, BatchNormalization\): batch_norm: var \+ epsilon"):
        from_keras(model)


def test_split_gives_segments_between_nonlinear_layers_with_their_layer_names():
    inputs = keras.Input((12, 12, 1))
    a = L.Conv2D(2, 3, name="c1")(inputs)
    a = L.AveragePooling2D(2, name="p1")(a)
    r = L.ReLU(name="relu")(a)
    b = L.Conv2D(2, 3, name="c2")(r)
    b = L.BatchNormalization(name="bn2")(b)
    out = L.MaxPooling2D(2, name="max")(b)
    model = keras.Model(inputs, out)
    with pytest.raises(StackError, match=r"layers\[3\] \(relu, ReLU\): not linear.*split=True"):
        from_keras(model)
    found = from_keras(model, split=True)
    assert [(s.nodes, s.source, s.sink) for s, _ in found] == [(("c1", "p1"), "input", "p1"),
                                                             (("c2", "bn2"), "relu", "bn2")]
    assert [s.positions for s, _ in found] == [(1, 2), (4, 5)]  # model.layers[0] is the InputLayer
    x = np.random.default_rng(4).standard_normal((2, 12, 12, 1))
    for segment, stack in found:
        before = x if segment.source == "input" else keras.Model(inputs, model.get_layer(segment.source).output)(x)
        after = keras.Model(inputs, model.get_layer(segment.sink).output)(x)
        # Keras BN: float32
        np.testing.assert_allclose(np.asarray(stack(np.asarray(before))), np.asarray(after), atol=1e-6)


@pytest.mark.parametrize("make,match", [
    (lambda: L.Conv2D(1, 3, activation="relu", name="act"), r"act, Conv2D\): activation 'relu' is not linear"),
    (lambda: L.AveragePooling2D(2, padding="same", name="ap"), r"ap, AveragePooling2D\): a 'same' average pool"),
    (lambda: L.Dense(2, name="dense"), r"dense, Dense\): not linear, or unknown to jfactor"),
])
def test_unsupported_layers_are_errors_naming_them(make, match):
    model = keras.Sequential([keras.Input((8, 8, 1)), L.Conv2D(1, 1), make()])
    with pytest.raises(StackError, match=match):
        from_keras(model)


def test_a_nested_model_is_named_as_one():
    # before: "not linear, or unknown to jfactor", of a Sequential of two convs
    inner = keras.Sequential([keras.Input((8, 8, 1)), L.Conv2D(1, 3), L.Conv2D(1, 3)], name="inner")
    model = keras.Sequential([keras.Input((8, 8, 1)), inner])
    with pytest.raises(StackError, match=r"layers\[0\] \(inner, Sequential\): a nested model; jfactor reads"):
        from_keras(model)


def test_layers_also_called_in_other_models_are_read_by_this_models_calls():
    """A functional model built from a Sequential's layers: before, "conv2d: is used 2 times in the
    model" (every call of the layer, in any model, was counted); a layer called twice in the model is
    still refused."""
    rng = np.random.default_rng(0)
    first, second = L.Conv2D(4, 3), L.Conv2D(2, 3)
    sequential = keras.Sequential([keras.Input((10, 10, 3)), first, second])
    inputs = keras.Input((10, 10, 3))
    functional = keras.Model(inputs, second(first(inputs)))
    x = rng.standard_normal((2, 10, 10, 3))
    for model in (functional, sequential, keras.Model(sequential.inputs, first.output)):
        np.testing.assert_allclose(np.asarray(from_keras(model)(x)), np.asarray(model.predict(x, verbose=0)),
                                   atol=1e-10)
    shared = L.Conv2D(3, 1, name="shared")
    with pytest.raises(StackError, match=r"shared: is used 2 times in the model"):
        from_keras(keras.Model(inputs, shared(shared(inputs))))


def test_a_sequential_without_layers_says_so():
    # before: "the model is not built ... start it with keras.Input(shape=...)", which it was
    with pytest.raises(StackError, match=r"^sequential\w*: has no layers to read$"):
        from_keras(keras.Sequential([keras.Input((8, 8, 1))]))


def test_a_merge_other_than_add_or_concatenate_is_named_as_one():
    inputs = keras.Input((8, 8, 1))
    a, b = L.Conv2D(1, 3, name="a")(inputs), L.Conv2D(1, 3, name="b")(inputs)
    model = keras.Model(inputs, L.Subtract(name="minus")([a, b]))
    # before: "takes 2 inputs", as though Add took one
    with pytest.raises(StackError, match=r"minus, Subtract\): takes 2 inputs; of the layers with several, jfactor"):
        from_keras(model)


def test_keras_on_another_backend_is_a_clear_error():
    code = "import keras\nimport jfactor.interop.keras3"
    env = {**os.environ, "KERAS_BACKEND": "numpy"}
    result = subprocess.run([sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    assert "needs Keras on the JAX backend, but Keras was imported with backend 'numpy'" in result.stderr


def test_import_jfactor_imports_no_optional_framework():
    code = ("import sys, jfactor\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('keras', 'onnx', 'onnxruntime', 'flax')))")
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_model_without_an_input_is_a_clear_error():
    with pytest.raises(StackError, match="the model is not built, so its input shape is unknown"):
        from_keras(keras.Sequential([keras.layers.Conv2D(3, 3)]))  # was Keras's own AttributeError
