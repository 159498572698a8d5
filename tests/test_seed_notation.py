"""Keras lines (the seed document's notation) -> stacks; every seed code block folds to the size it states."""

from pathlib import Path

import jax
import numpy as np
import pytest
import scipy.signal as sp
import yaml

import jfactor as jf
from jfactor.interop import seed_notation
from jfactor.fold import fold_affine
from jfactor.interop.seed_notation import load_any, parse_keras, parse_keras_blocks
from jfactor.stack_config import stack_from_dict
from tests import reference

SEED = Path(__file__).parent / "data" / "seed_keras"

# (receptive field, stride) of every model of every file, in order.  Each code block of the
# seed rewrites one model, so all its forms share the sizes the seed states for it.
SEED_SIZES = {
    "section2_two_3x3": [(5, 1)],  # two 3x3 = one 5x5
    "section3_one_5x5": [(5, 1)],
    "section4_avgpool": [(2, 2)] * 3,  # AveragePooling2D((2, 2)) = Conv2D 2x2, strides=2
    "section5_conv_pool_conv": [(8, 2)] * 4,  # ... = Conv2D(1, (8, 8), strides=2)
    "section6_two_pools": [(18, 4)] * 10,  # Conv2D(1, (18, 18), strides=4) = Conv 15x15 + AveragePooling2D((4, 4))
    "section7_strides": [(15, 4)] * 7 + [(18, 4)],  # 4x4 strided convs: "the same as AveragePooling2D"
    "section8_avgpool": [(78, 16)] * 11,  # Conv2D(1, (78, 78), strides=16) = Conv 63x63 + AveragePooling2D((16, 16))
    "section8_strides": [(63, 16)] * 10 + [(47, 16), (78, 16)],  # 2x2 last: 2->3->5->9->17; 4x4: as AveragePooling
}


def _sizes(stack):
    """(receptive field, stride) of the folded map, traced without computing it."""
    affine = jax.eval_shape(fold_affine, stack)
    assert len(set(affine.kernel.shape[:2])) == 1 and len(set(affine.stride)) == 1
    return affine.kernel.shape[0], affine.stride[0]


@pytest.mark.parametrize("name", sorted(SEED_SIZES))
def test_every_seed_block_parses_and_folds_to_the_stated_size(name):
    stacks = parse_keras_blocks((SEED / f"{name}.txt").read_text(), source=name)
    assert [_sizes(stack) for stack in stacks] == SEED_SIZES[name]


@pytest.mark.parametrize("name,size,stride", [
    ("section5_conv_pool_conv", 8, 2), ("section8_avgpool", 78, 16), ("section8_strides", 63, 16)])
def test_the_seeds_headline_models_fold_for_real(name, size, stride):
    stack = parse_keras_blocks((SEED / f"{name}.txt").read_text())[0]
    folded = jf.fold(stack)
    assert folded.conv.kernel.shape == (size, size, 1, 1) and folded.stride == (stride, stride)
    assert folded.exact and folded.certificate.rel_diff < 1e-12


def test_section5_fold_is_the_seeds_d1_over_4_with_randint_weights():
    """The seed's derivation: D1 = convolve2d(A1, A3, 'full'), A3 = A2 repeated 2x2; E2 = (B1 * D1 / 4)[::2, ::2]."""
    stack = parse_keras_blocks((SEED / "section5_conv_pool_conv.txt").read_text(), init="randint")[0]
    a1, a2 = (np.asarray(stack.layers[i].kernel)[:, :, 0, 0] for i in (0, 2))
    assert set(np.unique(np.concatenate([a1, a2]))) <= {0.0, 1.0}
    np.testing.assert_array_equal(a1, np.random.default_rng(0).integers(0, 2, (3, 3)))
    a3 = np.repeat(np.repeat(a2, 2, axis=0), 2, axis=1)
    d1 = sp.convolve2d(a1, a3, mode="full")
    folded = jf.fold(stack)
    np.testing.assert_allclose(np.asarray(folded.conv.kernel)[:, :, 0, 0], d1 / 4, atol=1e-15)
    b1 = np.random.default_rng(5).integers(-4, 5, (1, 28, 28, 1)).astype(float)
    e2 = sp.correlate2d(b1[0, :, :, 0], d1, mode="valid")[::2, ::2] / 4
    np.testing.assert_allclose(reference.apply_stack(stack, b1)[0, :, :, 0], e2, atol=1e-12)


def test_default_weights_are_the_yaml_configs_defaults():
    text = """
    x = Input(shape=(12, 12, 2))
    x = Conv2D(4, (3, 3), use_bias=False)(x)
    x = AveragePooling2D(2)(x)
    x = Conv2D(2, 2, groups=2, use_bias=False)(x)
    """
    parsed = parse_keras(text)
    config = stack_from_dict({"input_shape": [12, 12, 2], "layers": [
        {"conv": {"kernel_size": 3, "filters": 4}}, {"avg_pool": {"pool_size": 2}},
        {"conv": {"kernel_size": 2, "filters": 2, "groups": 2}}]})
    for mine, theirs in zip(parsed.layers, config.layers):
        assert type(mine) is type(theirs)
    for i in (0, 2):
        np.testing.assert_array_equal(parsed.layers[i].kernel, config.layers[i].kernel)
    shifted = parse_keras(text, seed=1)  # conv i draws from default_rng(seed + i), std 1/sqrt(fan_in)
    np.testing.assert_array_equal(shifted.layers[0].kernel,
                                  np.random.default_rng(1).normal(0.0, 18 ** -0.5, (3, 3, 2, 4)))


def test_keyword_forms_options_and_keras_semantics():
    text = """
    import numpy as np
    from tensorflow.keras.layers import Input, Conv1D, AveragePooling1D
    python

    inputs = Input((20, 4))  # positional shape
    x = Conv1D(filters=4, kernel_size=3, strides=2, dilation_rate=1, padding="SAME", groups=2)(inputs)
    y = layers.AvgPool1D(pool_size=3, strides=1)(x)
    y = keras.layers.Conv1D(
        2, 2, dilation_rate=2, padding="causal", use_bias=False, activation="linear",
        data_format="channels_last", name="last",
    )(y)
    """
    stack = parse_keras(text)
    first, pool, last = stack.layers
    assert first.kernel.shape == (3, 2, 4) and first.groups == 2 and first.strides == (2,)
    assert first.padding == "same" and np.all(np.asarray(first.bias) == 0)  # Keras: use_bias=True, zero bias
    assert pool.pool_size == 3 and pool.strides == 1
    assert last.bias is None and last.padding == ((2, 0),) and last.dilation == (2,)
    # Keras: 'same' gives ceil(n / s), a valid pool n - p + 1, causal keeps the length
    assert stack.output_shape == (8, 2)
    x = np.random.default_rng(0).standard_normal((2, 20, 4))
    h = reference.conv(x, first.kernel, first.bias, 2, 1, "same", 2)
    h = reference.pool(h, 3, 1, average=True)
    expected = reference.conv(np.pad(h, [(0, 0), (2, 0), (0, 0)]), last.kernel, None, 1, 2, "valid")
    np.testing.assert_allclose(reference.apply_stack(stack, x), expected, atol=1e-12)

    volume = parse_keras("x = Input(shape=(9, 8, 7, 2))\nx = Convolution3D(3, (3, 2, 1), strides=(2, 1, 3))(x)\n"
                         "x = AveragePooling3D((2, 2, 1))(x)")
    assert volume.layers[0].kernel.shape == (3, 2, 1, 2, 3) and volume.output_shape == (2, 3, 3, 3)


def test_blocks_number_their_convs_per_model():
    text = (SEED / "section7_strides.txt").read_text()
    blocks = parse_keras_blocks(text, init="randint")
    assert len(blocks) == 8
    alone = parse_keras("x = Input(shape=(28, 28, 1))\nx = Conv2D(1, (2, 2), padding='valid')(x)", init="randint")
    np.testing.assert_array_equal(blocks[1].layers[0].kernel, alone.layers[0].kernel)


HEADER = "x = Input(shape=(28, 28, 1))\n"


@pytest.mark.parametrize(
    "text,match",
    [
        (HEADER + "x = Conv2D(1, (3, 3))(x)\nx = MaxPooling2D((2, 2))(x)",
         r"^model\.txt:3: MaxPooling2D is not linear; .*\n    x = MaxPooling2D\(\(2, 2\)\)\(x\)$"),
        (HEADER + "x = Activation('relu')(x)", r"model\.txt:2: Activation is not linear"),
        (HEADER + "x = Dense(10)(x)", r"model\.txt:2: Dense is not a layer jfactor reads; it reads Input, Conv1D"),
        (HEADER + "x = Conv2D(1, (3, 3), activation='relu')(x)",
         r"model\.txt:2: Conv2D: activation='relu' is not linear"),
        ("x = Conv2D(1, (3, 3))(x)", r"model\.txt:1: Conv2D comes before any Input\(shape=\.\.\.\) line"),
        ("import numpy as np\n# nothing\n", r"^model\.txt: no Input\(shape=\.\.\.\) line"),
        (HEADER + "x = Conv2D(1, 3)(x)\n-----\n" + HEADER + "x = Conv2D(1, 3)(x)",
         r"model\.txt:4: a second Input line: this text holds 2 models; keep one per file, or read them all "
         r"with parse_keras_blocks"),
        (HEADER, r"model\.txt:1: this model has no layers after its Input line"),
        (HEADER + "x = Conv2D(1, k)(x)", r"model\.txt:2: argument k is not a literal"),
        (HEADER + "x = Conv2D(1, kernal_size=3)(x)",
         r"Conv2D: missing a required argument: 'kernel_size' \(jfactor reads filters, kernel_size, strides"),
        (HEADER + "x = Conv2D(1, 3, kernal_size=3)(x)", r"got an unexpected keyword argument 'kernal_size'"),
        (HEADER + "y = Conv2D(1, 3)(x)\nx = Conv2D(1, 3)(x)",
         r"model\.txt:3: Conv2D applies to 'x', but the line before made 'y'; jfactor reads one chain"),
        (HEADER + "Now fold it.", r"model\.txt:2: not a line of Python \(invalid syntax\)\n    Now fold it\.$"),
        (HEADER + "print(x)", r"model\.txt:2: expected `x = Layer\(\.\.\.\)\(x\)` or `x = Input\(shape=\.\.\.\)`"),
        (HEADER + "x = Conv2D(1, 3)", r"model\.txt:2: expected `x = Layer"),
        ("x = Input(shape=(28, 28, 1))(x)", r"model\.txt:1: expected `x = Layer"),
        (HEADER + "x = layers[0](1)(x)", r"model\.txt:2: expected `x = Layer"),
        (HEADER + "x = Conv2D(1, 3)(x, training=False)", r"a layer applies to one tensor variable"),
        (HEADER + "x = Conv2D(1, 3, **options)(x)", r"\*\*kwargs cannot be read"),
        (HEADER + "x = Conv2D(1, 3, data_format='channels_first')(x)", r"data_format='channels_first'"),
        (HEADER + "x = Conv2D(1, 3, padding='full')(x)", r"Conv2D: padding must be 'valid' or 'same'"),
        (HEADER + "x = Conv2D(1, 3, padding='causal')(x)", r"\('causal' for Conv1D\), got 'causal'"),
        (HEADER + "x = Conv2D(2, 3)(x)\nx = Conv2D(2, 3, groups=3)(x)",
         r"model\.txt:3: Conv2D: groups = 3 does not divide the 2 input channels"),
        (HEADER + "x = Conv2D(3, 3, groups=1)(x)\nx = Conv2D(2, 3, groups=3)(x)",
         r"C_out = 2 is not divisible by groups = 3"),
        (HEADER + "x = Conv2D(0, 3)(x)", r"Conv2D: filters must be a positive integer"),
        (HEADER + "x = Conv2D(1, 3, use_bias='no')(x)", r"Conv2D: use_bias must be True or False, got 'no'"),
        (HEADER + "x = Conv2D((1, 2), 3)(x)", r"filters and groups must be positive integers"),
        (HEADER + "x = Conv2D(1, (3, 3, 3))(x)", r"kernel_size \[3, 3, 3\] has 3 entries for a 2-D input"),
        (HEADER + "x = AveragePooling2D((2, 2), padding='same')(x)", r"AveragePooling2D: only padding='valid'"),
        (HEADER + "x = Conv1D(1, 3)(x)",
         r"Conv1D: needs a 1-D input \(\*spatial, C\); its input has shape \(28, 28, 1\)"),
        (HEADER + "x = Conv2D(1, 9, strides=4)(x)\nx = Conv2D(1, 9)(x)",
         r"model\.txt:3: Conv2D: kernel extent 9 is larger than its \(padded\) input 5"),
        ("x = Input(shape=(None, None, 1))\nx = Conv2D(1, 3)(x)", r"model\.txt:1: Input: input_shape must be"),
        ("x = Input()\nx = Conv2D(1, 3)(x)", r"model\.txt:1: Input: input_shape must be"),
        ("x = Input(shape=(8, 1), dtype='float32')\nx = Conv1D(1, 3)(x)",
         r"Input: got an unexpected keyword argument 'dtype' \(jfactor reads shape, batch_size, name\)"),
    ],
)
def test_errors_name_the_line(text, match):
    with pytest.raises(jf.ConfigError, match=match):
        parse_keras(text, source="model.txt")


def test_unknown_init_and_blocks_without_input():
    with pytest.raises(jf.ConfigError, match=r"init must be one of normal, uniform, randint, zeros, ones; got 'he'"):
        parse_keras(HEADER + "x = Conv2D(1, 3)(x)", init="he")
    with pytest.raises(jf.ConfigError, match=r"init must be one of"):
        parse_keras_blocks(HEADER + "x = Conv2D(1, 3)(x)", init="he")
    with pytest.raises(jf.ConfigError, match=r"^seed\.txt: no Input"):
        parse_keras_blocks("-----\n", source="seed.txt")


def test_load_any_dispatches_on_the_suffix(tmp_path):
    lines = HEADER + "x = Conv2D(1, (3, 3))(x)\n"
    for suffix in (".txt", ".py"):
        (tmp_path / f"model{suffix}").write_text(lines)
        loaded = load_any(tmp_path / f"model{suffix}")
        np.testing.assert_array_equal(loaded.layers[0].kernel, parse_keras(lines).layers[0].kernel)
    config = {"input_shape": [8, 8, 1], "layers": [{"avg_pool": {"pool_size": 2}}]}
    for suffix in (".yaml", ".yml"):
        (tmp_path / f"stack{suffix}").write_text(yaml.safe_dump(config))
        assert load_any(tmp_path / f"stack{suffix}").output_shape == (4, 4, 1)
    (tmp_path / "bad.txt").write_text(HEADER + "x = MaxPooling2D()(x)\n")
    with pytest.raises(jf.ConfigError, match=r"bad\.txt:2: MaxPooling2D is not linear"):
        load_any(tmp_path / "bad.txt")
    with pytest.raises(jf.ConfigError, match=r"unknown file type '\.json'; expected a YAML stack config"):
        load_any(tmp_path / "stack.json")
    with pytest.raises(jf.ConfigError, match=r"'\.keras'; .* an ONNX model \(\.onnx\); a Keras model file is read in "
                                             r"Python \(jfactor\.from_keras\)"):
        load_any(tmp_path / "model.keras")
    with pytest.raises(jf.ConfigError, match=r"is a directory, not a stack file"):
        load_any(tmp_path)  # before: "unknown file type ''"
    with pytest.raises(jf.ConfigError, match=r"missing\.txt: cannot read"):
        load_any(tmp_path / "missing.txt")
    with pytest.raises(jf.ConfigError, match=r"missing\.yaml: config file not found"):
        load_any(tmp_path / "missing.yaml")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(jf.ConfigError, match=r"binary\.txt: cannot read"):
        seed_notation.load_keras(tmp_path / "binary.txt")


@pytest.mark.parametrize("text", [None, b"x = Input(shape=(8, 8, 1))"])
def test_keras_lines_that_are_not_text_are_refused(text):
    with pytest.raises(jf.ConfigError, match="the Keras lines must be text"):
        jf.parse_keras(text)


def test_a_layer_whose_weights_pass_the_memory_budget_is_refused_before_they_are_drawn():
    text = "x = Input(shape=(28, 28, 1))\nx = Conv2D(100000, 3)(x)\nx = Conv2D(100000, 3)(x)\n"
    with pytest.raises(jf.ConfigError, match=r"huge.txt:3: Conv2D: weights of shape \(3, 3, 100000, 100000\) needs"):
        parse_keras(text, source="huge.txt")  # was a MemoryError drawing 720 GB


@pytest.mark.parametrize("seed", [-1, 1.5, "0"])
def test_a_bad_seed_is_a_config_error(seed):
    with pytest.raises(jf.ConfigError, match="seed must be a non-negative integer"):
        parse_keras("x = Input(shape=(8, 8, 1))\nx = Conv2D(1, 3)(x)\n", seed=seed)
