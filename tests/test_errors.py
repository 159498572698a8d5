"""Bad input gets a clear error naming the layer or config key, never a crash or a NaN."""

import numpy as np
import pytest

import jfactor as jf
from jfactor.stack_config import stack_from_dict

K3 = np.ones((3, 3, 1, 1))


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: jf.Conv(K3, strides=0), r"conv: strides must be a positive integer"),
        (lambda: jf.Conv(K3, dilation=1.5), r"conv: dilation must be a positive integer"),
        (lambda: jf.Conv(K3, strides=(1, 2, 3)), r"strides \[1, 2, 3\] has 3 entries for a 2-D input"),
        (lambda: jf.AvgPool(pool_size=-2), r"avg_pool: pool_size must be a positive integer"),
        (lambda: jf.SumPool(pool_size=(2, 0)), r"sum_pool: pool_size"),
        (lambda: jf.Subsample(strides=True), r"subsample: strides must be a positive integer"),
        (lambda: jf.Conv(np.ones((3, 3))), r"kernel must have shape \(\*k, C_in // groups, C_out\)"),
        (lambda: jf.Conv(np.ones((3, 3, 1, 3)), groups=2), r"C_out = 3 is not divisible by groups = 2"),
        (lambda: jf.Conv(np.full((3, 3, 1, 1), np.nan)), r"kernel has 9 non-finite value"),
        (lambda: jf.Conv(K3, bias=[np.inf]), r"bias has 1 non-finite"),
        (lambda: jf.Conv(K3, bias=[1.0, 2.0]), r"bias has 2 entries for C_out = 1"),
        (lambda: jf.Conv(K3, padding="full"), r"padding must be 'valid', 'same'"),
        (lambda: jf.AvgPool(2, padding="same"), r"only padding='valid'"),
        (lambda: jf.BatchNorm([1.0], [0.0], [0.0], [-1.0], 0.0), r"var \+ epsilon must be > 0"),
        (lambda: jf.BatchNorm([1.0, 1.0], [0.0], [0.0], [1.0]), r"one length"),
        (lambda: jf.BatchNorm([1.0], [0.0], [0.0], [1.0], float("nan")), r"epsilon must be a finite number >= 0"),
        (lambda: jf.BatchNorm([1.0], [0.0], [0.0], [1.0], True), r"epsilon must be a finite number >= 0, got True"),
        (lambda: jf.Branches([[jf.Identity()]], merge="max"), r"merge must be 'sum' or 'concat'"),
        (lambda: jf.Residual([]), r"residual: needs at least one layer"),
    ],
)
def test_bad_layers(make, match):
    with pytest.raises(jf.StackError, match=match):
        make()


class OnlyShaped(jf.Layer):
    """A user's layer with a shape but no lowering (a max pool, say): nothing jfactor can fold."""

    kind = "only_shaped"

    def out_shape(self, in_shape, path=""):
        return in_shape


def test_batch_norm_takes_numpy_epsilons_and_names_its_overflow():
    # before: a numpy float epsilon was refused; a NaN one was taken, and an overflowing scale
    # was reported as a non-finite `conv` kernel
    norm = jf.BatchNorm([1.0], [0.0], [0.0], [1.0], np.float32(1e-5))
    assert norm.epsilon == float(np.float32(1e-5))
    stack = jf.Stack([jf.Conv(np.ones((3, 1, 2))), jf.BatchNorm([1e200, 1.0], [0.0] * 2, [0.0] * 2, [1e-300, 1.0],
                                                              0.0)], (8, 1))
    with pytest.raises(jf.StackError, match=r"layers\[1\] \(batch_norm\): gamma / sqrt\(var \+ epsilon\) overflows "
                                            r"float64 in channel\(s\) \[0\]"):
        jf.fold(stack)


@pytest.mark.parametrize(
    "layers,shape,match",
    [
        ([jf.Conv(K3), jf.Conv(np.ones((9, 9, 1, 1)))], (10, 10, 1),
         r"layers\[1\] \(conv\): kernel extent 9 is larger than its \(padded\) input 8"),
        ([jf.AvgPool(4), jf.AvgPool(4)], (10, 10, 1),
         r"layers\[1\] \(avg_pool\): pool_size extent 4 is larger than its \(padded\) input 2"),
        ([jf.Conv(np.ones((3, 3, 2, 1)))], (10, 10, 1), r"layers\[0\] \(conv\): the kernel expects C_in = 2"),
        ([jf.Conv(np.ones((3, 1, 1)))], (10, 10, 1), r"a 1-D kernel .* cannot apply to a 2-D input"),
        ([jf.Conv(K3, dilation=5)], (8, 8, 1), r"kernel extent 11 is larger"),
        ([jf.BatchNorm([1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [1.0, 1.0])], (4, 4, 1),
         r"layers\[0\] \(batch_norm\): has 2 channels, its input has 1"),
        ([jf.Branches([[jf.Conv(K3)], [jf.Identity()]])], (8, 8, 1),
         r"layers\[0\] \(branches\): branch output shapes \[\(6, 6, 1\), \(8, 8, 1\)\] differ"),
        ([jf.Branches([[jf.AvgPool(2)], [jf.Identity()]], "concat")], (8, 8, 1), r"spatial shapes .* differ"),
        ([jf.Residual([jf.Conv(K3)])], (8, 8, 1), r"layers\[0\] \(residual\): its layers map"),
        ([jf.Identity(), jf.Residual([jf.Conv(np.ones((3, 3, 2, 1)))])], (8, 8, 1),
         r"layers\[1\]\.layers\[0\] \(conv\)"),
        ([jf.Branches([[jf.Identity()], [jf.Identity(), jf.AvgPool(9)]])], (8, 8, 1),
         r"layers\[0\]\.branches\[1\]\[1\] \(avg_pool\)"),
        (["conv"], (8, 8, 1), r"layers\[0\]: 'conv' is not a jfactor layer"),
        ([jf.Identity(), OnlyShaped()], (8, 8, 1), r"layers\[1\]: OnlyShaped defines no lower, so jfactor cannot"),
        ([jf.Layer()], (8, 8, 1), r"layers\[0\]: Layer defines no out_shape or lower"),
        ([jf.Conv(K3)], (8, 8, 0), r"input_shape must be a positive integer"),
        ([jf.Conv(K3)], (8,), r"input_shape must list the spatial sizes then the channels"),
    ],
)
def test_bad_stacks_name_the_layer(layers, shape, match):
    with pytest.raises(jf.StackError, match=match):
        jf.Stack(layers, shape)


def test_input_of_the_wrong_shape():
    stack = jf.Stack([jf.Conv(K3)], (8, 8, 1))
    with pytest.raises(jf.StackError, match=r"input of shape \(2, 9, 8, 1\) does not match the stack"):
        stack(np.ones((2, 9, 8, 1)))


@pytest.mark.parametrize(
    "config,match",
    [
        ({"input_shape": [8, 8, 1], "layers": [{"convv": {"kernel_size": 3}}]},
         r"layers\[0\]: unknown layer kind 'convv'; did you mean 'conv'\?"),
        ({"input_shape": [8, 8, 1], "layers": [{"conv": {"kernal_size": 3, "filters": 1}}]},
         r"layers\[0\]\.conv: unknown key 'kernal_size'; did you mean 'kernel_size'\?"),
        ({"input_shape": [8, 8, 1], "layers": [{"conv": {"kernel_size": "three", "filters": 1}}]},
         r"layers\[0\]\.conv\.kernel_size: must be a positive integer or a list of them, got 'three'"),
        ({"input_shape": [8, 8, 1], "layers": [{"conv": {"kernel_size": 3, "filters": 0}}]},
         r"layers\[0\]\.conv\.filters: Input should be greater than 0"),
        ({"input_shape": [8, 8, 1], "layers": [{"conv": {"kernel_size": 3}}]},
         r"layers\[0\]\.conv: needs filters"),
        ({"input_shape": [8, 8, 1],
          "layers": [{"avg_pool": {"pool_size": 2}}, {"conv": {"kernel_size": 5, "filters": 1}}]},
         r"layers\[1\] \(conv\): kernel extent 5 is larger than its \(padded\) input 4"),
        ({"input_shape": [8, 8, 2], "layers": [{"conv": {"kernel_size": 3, "filters": 2, "groups": 3}}]},
         r"layers\[0\]\.conv\.groups: 3 does not divide the 2 input channels"),
        ({"input_shape": [8, 8, 1], "layers": [{"conv": {"weights": "missing.npy"}}]},
         r"layers\[0\]\.conv\.weights: .*missing\.npy: file not found"),
        ({"input_shape": [8, 8, 1], "layers": [{"conv": {"weights": [[1, 2], [3]]}}]},
         r"layers\[0\]\.conv\.weights: values are not a rectangular array"),
        ({"input_shape": [8, 8, 1], "layers": [{"conv": {"weights": {"init": "randint", "file": "k.npy"}}}]},
         r"give exactly one of file, init or values"),
        ({"input_shape": [8, 8, 1], "layers": [{"conv": {"weights": {"init": "gaussian"}}}]},
         r"layers\[0\]\.conv\.weights\.init: Input should be"),
        ({"input_shape": [8, 8, 1], "layers": [{"conv": {"kernel_size": 3, "filters": 1}, "avg_pool": {}}]},
         r"each layer is a mapping with one key"),
        ({"input_shape": [8, 8, 1], "layers": [{"conv": {"weights": [[1.0, float("nan")]]}}]},
         r"layers\[0\]\.conv: kernel has 1 non-finite"),
        ({"input_shape": [8, 8, 1], "layer": []}, r"unknown key 'layer'; did you mean 'layers'\?"),
        ({"input_shape": [8, 8, 1], "layers": [{"batch_norm": {"gamma": [1.0, 2.0]}}]},
         r"layers\[0\]\.batch_norm\.gamma: has shape \(2,\), expected \(1,\)"),
        ({"input_shape": [8, 8, 1], "dtype": "float16", "layers": ["identity"]}, r"dtype: Input should be"),
        ({"input_shape": [8, 8, 1],
          "layers": [{"branches": {"layers": [["identity"], [{"avg_pool": {"pool_size": 2}}]]}}]},
         r"layers\[0\] \(branches\): branch output shapes"),
    ],
)
def test_bad_configs_name_the_key(config, match, tmp_path):
    with pytest.raises(jf.ConfigError, match=match):
        stack_from_dict(config, base_dir=tmp_path, source="bad.yaml")


def test_config_error_names_the_file():
    with pytest.raises(jf.ConfigError, match=r"^bad\.yaml: layers\[0\]"):
        stack_from_dict({"input_shape": [8, 8, 1], "layers": [{"conv": {}}]}, source="bad.yaml")


def test_a_fold_that_overflows_says_so_not_that_a_layer_is_non_finite():
    big = jf.Conv(np.full((3, 3, 1, 1), 1e308))  # finite, but the folded kernel's taps are sums of 1e616
    with pytest.raises(jf.FoldError, match=r"folded kernel has 25 non-finite value\(s\): .* overflow float64"):
        jf.fold(jf.Stack([big, big], (8, 8, 1)))
