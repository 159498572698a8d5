"""Stack configs: files relative to the config, initialisers, nested layers."""

import numpy as np
import pytest
import yaml

import jfactor as jf
from jfactor import weights
from jfactor.stack_config import load_stack
from tests import reference


def _write(tmp_path, config, name="stack.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


def test_weights_from_npy_and_npz_relative_to_the_config(tmp_path):
    rng = np.random.default_rng(0)
    k1, k2, b2 = rng.normal(size=(3, 3, 2, 4)), rng.normal(size=(2, 2, 4, 1)), rng.normal(size=1)
    (tmp_path / "w").mkdir()
    np.save(tmp_path / "w" / "k1.npy", k1)
    np.savez(tmp_path / "w" / "more.npz", kernel=k2, bias=b2)
    path = _write(tmp_path, {
        "input_shape": [9, 9, 2],
        "layers": [
            {"conv": {"weights": "w/k1.npy", "kernel_size": 3, "filters": 4}},
            {"avg_pool": {"pool_size": 2}},
            {"conv": {"weights": {"file": "w/more.npz", "key": "kernel"},
                      "bias": {"file": "w/more.npz", "key": "bias"}}},
        ],
    })
    stack = load_stack(path)
    np.testing.assert_array_equal(stack.layers[0].kernel, k1)
    np.testing.assert_array_equal(stack.layers[2].bias, b2)
    x = rng.normal(size=(1, 9, 9, 2))
    np.testing.assert_allclose(stack(x), reference.apply_stack(stack, x), rtol=1e-12)


def test_initialisers_are_seeded_and_follow_numpy():
    a = weights.initialize("randint", (3, 3), seed=7, low=-4, high=5)
    assert a.min() >= -4 and a.max() <= 4 and a.dtype == np.float64
    np.testing.assert_array_equal(a, np.random.default_rng(7).integers(-4, 5, (3, 3)))
    np.testing.assert_array_equal(weights.initialize("normal", (4,), seed=1, std=2.0),
                                  np.random.default_rng(1).normal(0.0, 2.0, (4,)))
    u = weights.initialize("uniform", (1000,), seed=2, low=0.0, high=0.5)
    assert 0 <= u.min() and u.max() < 0.5


@pytest.mark.parametrize("spec,named", [
    ({"init": "normal", "std": -1}, r"weights\.std: Input should be greater than or equal to 0"),
    ({"init": "uniform", "low": 2, "high": 1}, r"weights: uniform needs high >= low"),
    ({"init": "uniform", "low": float("nan")}, r"weights\.low: Input should be a finite number"),
    ({"init": "normal", "mean": float("inf")}, r"weights\.mean: Input should be a finite number"),
    ({"init": "randint", "high": 1e30}, r"weights: randint needs \|low\| and \|high\| at most 2\*\*53"),
])
def test_bad_initialiser_numbers_are_named_before_numpy_sees_them(tmp_path, spec, named):
    # before: numpy's ValueError or OverflowError ended `jfactor fold` with a traceback
    from jfactor.errors import ConfigError

    path = _write(tmp_path, {"input_shape": [6, 6, 1], "layers": [
        {"conv": {"kernel_size": 3, "filters": 1, "weights": spec}}]})
    with pytest.raises(ConfigError, match=r"stack\.yaml: layers\[0\]\.conv\." + named):
        load_stack(path)


@pytest.mark.parametrize("init,numbers,named", [
    ("normal", {"std": -0.5}, "normal needs std >= 0"), ("normal", {"mean": float("nan")}, "normal needs finite"),
    ("uniform", {"low": 1.0, "high": 0.0}, "uniform needs high >= low"),
    ("uniform", {"high": float("inf")}, "uniform needs finite numbers, got high=inf"),
    ("randint", {"low": -1e20}, r"randint needs \|low\|")])
def test_initialize_refuses_numbers_numpy_cannot_draw_with(init, numbers, named):
    from jfactor.errors import ConfigError

    with pytest.raises(ConfigError, match=named):
        weights.initialize(init, (2, 2), **numbers)


def test_config_dtype_nesting_and_defaults(tmp_path):
    path = _write(tmp_path, {
        "input_shape": [12, 12, 2],
        "dtype": "float32",
        "layers": [
            {"conv": {"kernel_size": [3, 2], "filters": 2, "padding": "same", "use_bias": True}},
            "identity",
            {"residual": {"layers": [{"conv": {"kernel_size": 3, "filters": 2, "padding": "same", "groups": 2}},
                                     {"batch_norm": {"var": [2.0, 3.0], "epsilon": 0.0}}]}},
            {"branches": {"merge": "concat", "layers": [[{"sum_pool": {"pool_size": 2}}],
                                                        [{"subsample": {"strides": 2}}]]}},
        ],
    })
    stack = load_stack(path)
    assert stack.dtype == np.float32
    assert stack.output_shape == (6, 6, 4)
    np.testing.assert_array_equal(stack.layers[0].bias, [0.0, 0.0])
    assert stack.layers[2].layers[1].epsilon == 0.0
    again = load_stack(path)
    np.testing.assert_array_equal(again.layers[0].kernel, stack.layers[0].kernel)  # seeded defaults
    assert not np.array_equal(stack.layers[0].kernel, stack.layers[2].layers[0].kernel[..., :1, :])


def test_spatial_only_kernels_are_single_channel(tmp_path):
    path = _write(tmp_path, {"input_shape": [5, 1], "layers": [{"conv": {"weights": [1, 2, 3]}}]})
    stack = load_stack(path)
    assert stack.layers[0].kernel.shape == (3, 1, 1)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(jf.ConfigError, match=r"nope\.yaml: config file not found"):
        load_stack(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("layers: [conv: {")
    with pytest.raises(jf.ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_stack(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- conv: {}")
    with pytest.raises(jf.ConfigError, match=r"list\.yaml: the top level must be a mapping"):
        load_stack(listing)
    np.savez(tmp_path / "two.npz", a=np.ones(1), b=np.ones(1))
    with pytest.raises(jf.ConfigError, match=r"two\.npz: needs a key, one of \['a', 'b'\]"):
        weights.load(tmp_path / "two.npz")
    (tmp_path / "junk.npy").write_text("not an array")
    with pytest.raises(jf.ConfigError, match=r"junk\.npy: not a \.npy or \.npz file"):
        weights.load(tmp_path / "junk.npy")


def test_floats_written_without_a_dot_are_numbers():
    from jfactor.experiment.config import parse_value
    from jfactor.schema import dump_yaml, load_yaml_text

    assert parse_value("1e-1") == 0.1 and parse_value("2E+1") == 20.0 and parse_value("-3e0") == -3.0
    assert load_yaml_text("sigma: 1.5e-3\nname: 1e\nsize: 7") == {"sigma": 1.5e-3, "name": "1e", "size": 7}
    data = {"name": "1e5", "sigma": 1e-3, "grid": ["2E+1", 3]}  # a run's config.yaml reads back as it was
    assert load_yaml_text(dump_yaml(data)) == data


def test_merge_keys_merge_and_a_key_written_twice_is_still_refused(tmp_path):
    """``<<: *anchor`` read "could not determine a constructor for the tag 'tag:yaml.org,2002:merge'"."""
    import pytest
    import yaml

    from jfactor.errors import ConfigError
    from jfactor.experiment.config import load_config
    from jfactor.schema import load_yaml_text

    text = "base: &b {sizes: [3, 5], channels: 1}\nwide: {<<: *b, channels: 2}\nboth: {<<: [*b, {name: n}]}\n"
    assert load_yaml_text(text)["wide"] == {"sizes": [3, 5], "channels": 2}
    assert load_yaml_text(text)["both"] == {"sizes": [3, 5], "channels": 1, "name": "n"}
    (tmp_path / "c.yaml").write_text("target: {family: log, size: 7}\n"
                                     "chains:\n  - &b {sizes: [3, 5]}\n  - {<<: *b, channels: 2}\n")
    config, _, _ = load_config(tmp_path / "c.yaml")
    assert [(c.sizes, c.channels) for c in config.chains] == [([3, 5], 1), ([3, 5], 2)]
    # an anchored mapping that overrides a merged key, merged again before it is built itself
    nested = "d: &d {channels: 1}\ng:\n  w: &w {<<: *d, channels: 2}\no: {<<: *w}\n"
    assert load_yaml_text(nested)["o"] == {"channels": 2}
    with pytest.raises(yaml.constructor.ConstructorError, match=r"key 'a' is written twice"):
        load_yaml_text("x: {<<: {a: 1, a: 2}}\n")  # inside a merged mapping
    (tmp_path / "twice.yaml").write_text("chain: {<<: {sizes: [3]}, channels: 1, channels: 2}\n")
    with pytest.raises(ConfigError, match=r"key 'channels' is written twice \(line 1\)"):  # before: not seen
        load_config(tmp_path / "twice.yaml")


def test_family_parameters_are_checked_without_refusing_valid_ones():
    import jax.numpy as jnp

    from jfactor import kernels

    for name, params in [("ring", {"radius": 0}), ("gabor", {"gamma": 0, "wavelength": -3.0}),
                         ("gaussian", {"sigma": None}), ("gaussian", {"sigma": jnp.float32(2)}),
                         ("gaussian", {"sigma": np.array(2.0)}), ("random_normal", {"seed": 10**400})]:
        assert np.isfinite(kernels.make(name, 7, **params)).all()
    for name, size, params, named in [("gaussian", 7, {"sigma": -1}, "sigma must be a positive number"),
                                      ("disk", 7, {"radius": 0}, "radius must be a positive number"),
                                      ("ring", 7, {"radius": -1}, "radius must be a number >= 0"),
                                      ("gaussian", 7, {"sigma": 1e200}, "parameters"),
                                      ("box", 3, {"ndim": 1000}, "ndim must be 1, 2 or 3, got 1000"),
                                      ("gabor", 7, {"theta": "inf"}, "theta must be a finite number, got 'inf'"),
                                      ("gabor", 7, {"phase": float("nan")}, "phase must be a finite number"),
                                      ("gaussian", 10**200, {}, "past the memory budget")]:
        with pytest.raises(jf.ConfigError, match=named):
            kernels.make(name, size, **params)
