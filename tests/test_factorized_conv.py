"""FactorizedConv: a chain of small kernels that drops in for an nnx.Conv.

Shapes and padding are checked against nnx.Conv itself with the chain's folded kernel (so
the only freedom left is the kernel); every factorization uses one geometry (chain
4 -> 5 -> 9, receptive field 16, one channel), so the solver compiles once.
"""

import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jfactor as jf
from jfactor import kernels
from jfactor.factorize import Chain, FactorizationError, Solver, chain_kernel, factorize, load_images
from jfactor.interop.factorized_conv import FactorizedConv, FrozenKernel
from jfactor.ops import conv as lax_conv

ROOT = Path(__file__).resolve().parent.parent
FAST = Solver(optimizer="none", refine_steps=200, chunk=50)  # LM only: one compile per geometry
CHAIN = (4, 5, 9)  # receptive field 16: even kernels fill it, odd ones are centred in it
RNG = np.random.default_rng(0)


def nnx_conv(kernel, bias=None, **kwargs) -> nnx.Conv:
    """An nnx.Conv holding ``kernel`` (*k, C_in, C_out): given initialisers, no compile per shape."""
    kernel = jnp.asarray(kernel, jnp.float64)
    return nnx.Conv(kernel.shape[-2], kernel.shape[-1], kernel.shape[:-2], use_bias=bias is not None,
                    param_dtype=jnp.float64, kernel_init=lambda *_: kernel,
                    bias_init=lambda *_: jnp.asarray(bias, jnp.float64), rngs=nnx.Rngs(0), **kwargs)


def random_layer(sizes, c_in, c_out, *, width=2, strides=None, padding="same", bias=True):
    """A FactorizedConv with random factors, and its folded kernel (*E, C_in, C_out)."""
    chain = Chain.build(sizes, strides=strides, channels=width)
    factors = [RNG.normal(size=s) for s in chain.factor_shapes(c_in, c_out)]
    folded = np.asarray(chain_kernel([jnp.asarray(f) for f in factors], chain))
    b = RNG.normal(size=c_out) if bias else None
    return FactorizedConv(factors, chain, kernel_size=chain.extent, padding=padding, bias=b), folded, b


def _close(a, b, tol=1e-12):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=0, atol=tol * max(1.0, np.abs(b).max(initial=0.0)))


@pytest.fixture(scope="module")
def images():
    """Four 40x40 crops of skimage's camera, (4, 40, 40, 1)."""
    return jnp.asarray(load_images(("camera",), size=40, count=4))


# -- shapes and padding: the chain is the conv of its folded kernel -----------------------


@pytest.mark.parametrize("sizes", [(3, 5, 9), CHAIN], ids=["k15", "k16"])
@pytest.mark.parametrize("padding", ["SAME", "VALID", ((2, 3), (0, 1))])
def test_output_is_the_conv_of_the_folded_kernel(sizes, padding):
    layer, folded, bias = random_layer(sizes, 2, 3, padding=padding.lower() if isinstance(padding, str) else padding)
    x = RNG.normal(size=(2, 19, 17, 2))
    _close(layer(x), nnx_conv(folded, bias, padding=padding)(x))


@pytest.mark.parametrize("shape", [(19, 17), (18, 16)])
def test_strided_same_padding_resolves_per_input_like_nnx(shape):
    layer, folded, bias = random_layer((3, 5, 9), 1, 2, strides=(1, 2, 1))  # extent 3 + 4 + 16 = 23, stride 2
    assert layer.chain.stride == (2, 2)
    x = RNG.normal(size=(1, *shape, 1))
    _close(layer(x), nnx_conv(folded, bias, strides=2, padding="SAME")(x))


# -- from_conv: exact where the kernel factorizes, and an honest error where it does not --


@pytest.mark.parametrize("padding", ["VALID", "SAME"])
def test_a_strided_conv_in_a_larger_chain_is_replaced_exactly(padding):
    """A 5x5 conv at stride 2 whose taps sit on even places is a 3x3 s2 impulse then a 3x3, a chain
    of extent 7: the layer computes the conv (before, check_chain placed the kernel a multiple of
    the stride in and the layer padded the input half of that: one pixel off, output error ~1)."""
    kernel = np.zeros((5, 5, 1, 1))
    kernel[::2, ::2] = RNG.normal(size=(3, 3, 1, 1))
    conv = nnx_conv(kernel, [0.5], strides=2, padding=padding)
    layer = FactorizedConv.from_conv(conv, (3, 3), strides=(2, 1), solver=FAST, restarts=8)
    assert layer.init_error < 1e-10
    x = RNG.normal(size=(2, 21, 19, 1))
    _close(layer(x), conv(x), tol=1e-9)


@pytest.mark.parametrize("size", [16, 15])
def test_a_separable_kernel_is_replaced_exactly(size, images):
    conv = nnx_conv(kernels.gaussian(size)[..., None, None], [0.25], padding="SAME")
    layer = FactorizedConv.from_conv(conv, CHAIN, solver=FAST, restarts=2)
    assert layer.init_error < 1e-10
    assert layer.pads((40, 40)) == ((7, 8),) * 2  # SAME: (7, 8) for 16, (7, 7) and one zero high for 15
    _close(layer(images), conv(images))


@pytest.mark.parametrize("padding", ["SAME", "VALID"])
def test_the_output_error_is_the_kernel_error(padding, images):
    """layer(x) - conv(x) is x convolved with the factorization's error kernel, nothing else."""
    target = RNG.normal(size=(15, 15, 1, 1))
    conv = nnx_conv(target, [1.5], padding=padding)
    layer = FactorizedConv.from_conv(conv, CHAIN, solver=FAST, restarts=2, seed=1)
    result = factorize(target, Chain.build(CHAIN), solver=FAST, restarts=2, seed=1, baselines=())  # the same run
    assert layer.init_error == result.rel_error > 0.1  # a random kernel does not factorize
    assert result.evidence["warning"]  # two restarts, two minima: the search doubts its best
    with pytest.warns(UserWarning, match="likely not the global optimum"):  # before: it never reached the user
        FactorizedConv.from_conv(conv, CHAIN, solver=FAST, restarts=2, seed=1)
    assert result.padding == ((0, 1), (0, 1))  # 15 centred in 16: the odd zero high, as the layer pads
    _close(chain_kernel([k[...] for k in layer.kernels], layer.chain), result.approx)
    error = jnp.asarray(result.approx - result.target_padded)
    predicted = lax_conv(images, error, strides=(1, 1), dilation=(1, 1), pads=layer.pads(images.shape[1:3]), groups=1)
    got, want = np.asarray(layer(images)), np.asarray(conv(images))
    scale = np.abs(want).max()  # rounding: relative to the outputs (225-tap sums), not to their difference
    np.testing.assert_allclose(got - want, predicted, rtol=0, atol=1e-12 * scale * 15 * 15)


# -- training in place ---------------------------------------------------------------------


def _fit_step(model, optimizer, x, y):
    """One optax step on |model(x) - y|^2 / |y|^2; returns the loss before it."""
    def loss_fn(model):
        return jnp.sum((model(x) - y) ** 2) / jnp.sum(y**2)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def test_it_trains_towards_the_original_conv_on_images(images):
    """The kernel-space optimum is not the image-space one: fine-tuning on camera crops helps."""
    conv = nnx_conv(RNG.normal(size=(15, 15, 1, 1)), [0.5], padding="SAME")
    layer = FactorizedConv.from_conv(conv, CHAIN, solver=FAST, restarts=2)
    x, y = images, conv(images)
    before = [k[...] for k in layer.kernels] + [layer.bias[...]]
    optimizer = nnx.Optimizer(layer, optax.adam(1e-3), wrt=nnx.Param)
    step = nnx.jit(_fit_step)
    losses = [float(step(layer, optimizer, x, y)) for _ in range(15)]
    assert losses[-1] < 0.8 * losses[0]
    after = [k[...] for k in layer.kernels] + [layer.bias[...]]
    assert all(not np.allclose(a, b) for a, b in zip(after, before))  # every Param moved, bias too


def test_a_frozen_chain_layer_is_not_a_param_and_stays_put():
    chain = Chain.build([3, 3], frozen={0: np.ones((3, 3))})
    factors = [np.ones((3, 3, 1, 1)), RNG.normal(size=(3, 3, 1, 1))]
    layer = FactorizedConv(factors, chain, kernel_size=(5, 5), padding="same")
    assert isinstance(layer.kernels[0], FrozenKernel) and not isinstance(layer.kernels[0], nnx.Param)
    x = RNG.normal(size=(1, 8, 8, 1))
    optimizer = nnx.Optimizer(layer, optax.sgd(0.1), wrt=nnx.Param)
    _fit_step(layer, optimizer, x, jnp.zeros((1, 8, 8, 1)))
    np.testing.assert_array_equal(layer.kernels[0][...], factors[0])
    assert not np.allclose(layer.kernels[1][...], factors[1])


# -- costs -----------------------------------------------------------------------------------


def test_params_and_macs_are_counted():
    layer, folded, _ = random_layer((3, 5, 9), 2, 4, width=3, strides=(1, 1, 2), padding="valid")
    assert layer.num_params == 9 * 2 * 3 + 25 * 3 * 3 + 81 * 3 * 4 + 4
    # per output position (stride 2): the first two layers run at 4 times the output rate
    assert layer.macs_per_output == 4 * (9 * 2 * 3 + 25 * 3 * 3) + 81 * 3 * 4
    # one 40x40 example, valid: 38x38, 34x34, then a 9x9 stride-2 layer: 13x13
    assert layer.macs((40, 40, 2)) == 38 * 38 * 9 * 6 + 34 * 34 * 25 * 9 + 13 * 13 * 81 * 12
    folded_conv = jf.fold(layer.to_stack((40, 40, 2))).conv
    _close(folded_conv.kernel, folded)
    assert folded_conv.strides == (2, 2)


# -- what it refuses, before any compute ---------------------------------------------------


@pytest.mark.parametrize("conv,sizes,options,message", [
    (nnx_conv(np.ones((15, 15, 1, 2)), feature_group_count=1, strides=2), CHAIN, {},
     r"strides \(2, 2\) but the chain's strides multiply to \(1, 1\)"),
    (nnx_conv(np.ones((15, 15, 1, 2))), (3, 3), {}, "covers 5x5 but the target is 15x15"),
    (nnx_conv(np.ones((5, 5, 1, 2))), Chain.build([3, 3]), {"channels": 2}, "channels given with a Chain"),
    (nnx_conv(np.ones((5, 5, 1, 2)), input_dilation=2), (3, 3), {}, "from_conv: not one convolution: input_dilation"),
], ids=["strides", "receptive-field", "chain-and-channels", "input-dilation"])
def test_unsupported_convs_and_chains_are_refused(conv, sizes, options, message):
    with pytest.raises(FactorizationError, match=message):
        FactorizedConv.from_conv(conv, sizes, **options)


def test_grouped_convs_and_mismatched_pieces_are_refused():
    grouped = nnx.Conv(4, 4, (5, 5), feature_group_count=2, param_dtype=jnp.float64,
                       kernel_init=lambda _k, shape, dtype: jnp.ones(shape, dtype), rngs=nnx.Rngs(0))
    with pytest.raises(FactorizationError, match="feature_group_count = 2"):
        FactorizedConv.from_conv(grouped, (3, 3))
    chain = Chain.build([3, 3], channels=2)
    with pytest.raises(FactorizationError, match="factor shapes"):
        FactorizedConv(np.ones((2, 3, 3, 1, 1)), chain, kernel_size=5)
    good = [np.ones((3, 3, 1, 2)), np.ones((3, 3, 2, 1))]
    with pytest.raises(FactorizationError, match="covers"):
        FactorizedConv(good, chain, kernel_size=7)
    with pytest.raises(jf.StackError, match="expected an input"):
        FactorizedConv(good, chain, kernel_size=5)(np.ones((1, 8, 8, 3)))


# -- the experiment ------------------------------------------------------------------------


def test_the_dropin_experiment_runs(tmp_path):
    out = tmp_path / "dropin.json"
    subprocess.run([sys.executable, str(ROOT / "experiments" / "dropin_factorized_conv.py"), "--tiny", "--json",
                    "--out", str(out)], check=True, capture_output=True, text=True, timeout=120, cwd=ROOT)
    result = json.loads(out.read_text())
    rows = {row["kernel"]: row for row in result["rows"]}
    assert rows["gaussian"]["output_rel_error_max"] < 1e-9  # separable: the drop-in is exact
    for row in rows.values():
        assert row["factorized"]["macs"] < row["dense"]["macs"]
        assert set(row["images"]) == {"camera", "astronaut", "coins", "moon"}


def test_bad_dtypes_biases_and_options_are_refused_before_any_factorization():
    conv = nnx.Conv(1, 1, (5, 5), rngs=nnx.Rngs(0), param_dtype=np.float64, dtype=np.float64)
    with pytest.raises(jf.ConfigError, match="from_conv: param_dtype must be a floating dtype"):
        FactorizedConv.from_conv(conv, (3, 3), param_dtype=np.int32)  # was an all-zero layer
    with pytest.raises(FactorizationError, match="runs no baselines"):
        FactorizedConv.from_conv(conv, (3, 3), baselines=("svd",))
    factors = [np.ones((3, 3, 1, 1)), np.ones((3, 3, 1, 1))]
    with pytest.raises(FactorizationError, match=r"bias has 1 non-finite value\(s\)"):
        FactorizedConv(factors, Chain.build([3, 3]), kernel_size=5, bias=np.array([np.nan]))
    with pytest.raises(jf.ConfigError, match="FactorizedConv: param_dtype must be a floating dtype"):
        FactorizedConv(factors, Chain.build([3, 3]), kernel_size=5, param_dtype=np.int8)
