"""Batched folding: every formulation equals the one-stack fold; errors, compiles, memory, sharding."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jfactor as jf
from jfactor import batch
from jfactor.fold import conv_from_affine, fold_affine, has_bias
from jfactor.stack_config import load_stack
from tests import reference
from tests.strategies import stacks

ROOT = Path(__file__).parent.parent
SEED = ROOT / "configs" / "seed"
# gather materialises taps x size values per item: keep it to 1-D and 2-D stacks here
METHODS_BY_NDIM = {1: batch.METHODS, 2: batch.METHODS, 3: ("auto", "shift", "fft", "chain")}


def redraw(stack, seed):
    """The same structure with new random weights (BatchNorm variances stay positive)."""
    rng = np.random.default_rng(seed)

    def draw(path, w):
        positive = jax.tree_util.keystr(path).endswith(".var")
        return jnp.asarray(rng.uniform(0.2, 2.0, w.shape) if positive else rng.standard_normal(w.shape))

    return jax.tree_util.tree_map_with_path(draw, stack)


def assert_matches_fold_affine(folded, items):
    for i, item in enumerate(items):
        ref = fold_affine(item)
        scale = max(1.0, float(jnp.abs(ref.kernel).max()), float(jnp.abs(ref.bias).max()))
        assert folded.stride == ref.stride and folded.offset == ref.offset and folded.groups == ref.groups
        np.testing.assert_allclose(folded.kernel[i], ref.kernel, rtol=0, atol=1e-11 * scale)
        np.testing.assert_allclose(folded.bias[i], ref.bias, rtol=0, atol=1e-11 * scale)


@settings(max_examples=int(os.environ.get("JFACTOR_BATCH_EXAMPLES", "12")))
@given(stacks(max_layers=3), st.data())
def test_every_method_equals_the_unbatched_fold(stack, data):
    """Random stacks (branches, residuals, groups, strides, dilation, padding), 3 weight draws."""
    if stack.dtype is None:  # pools alone: no weights to batch
        return
    method = data.draw(st.sampled_from(METHODS_BY_NDIM[stack.ndim]), label="method")
    items = [redraw(stack, seed) for seed in range(3)]
    folded = batch.fold_batch(batch.stack_batch(items), method=method)
    assert folded.kernel.shape[0] == len(folded) == 3
    assert_matches_fold_affine(folded, items)
    conv = folded.conv(1)
    ref = conv_from_affine(fold_affine(items[1]), stack.input_shape, stack.output_shape,
                           bias=has_bias(items[1].lower()))
    assert (conv.strides, conv.padding, conv.groups) == (ref.strides, ref.padding, ref.groups)
    assert (conv.bias is None) == (ref.bias is None)


def _seed_batch(name, n, seed=0):
    structure = load_stack(SEED / f"{name}.yaml")
    return structure, [redraw(structure, seed + i) for i in range(n)]


@pytest.mark.parametrize("method", batch.METHODS)
def test_methods_agree_on_the_seed_section8_stack(method):
    _, items = _seed_batch("section8_avgpool", 4)
    folded = batch.fold_batch(batch.stack_batch(items), method=method)
    assert folded.size == (78, 78) and folded.stride == (16, 16)
    assert_matches_fold_affine(folded, items)


def test_grouped_multichannel_stack_and_float32():
    """Channel contractions through the Toeplitz reshape; float32 stays float32."""
    rng = np.random.default_rng(0)
    stack = jf.Stack([
        jf.Conv(rng.normal(size=(3, 3, 1, 4)), rng.normal(size=4), padding="same"),
        jf.Residual([jf.Conv(rng.normal(size=(3, 3, 1, 4)), groups=4, padding="same")]),
        jf.AvgPool(2),
        jf.Conv(rng.normal(size=(5, 5, 2, 4)), groups=2, dilation=2),
    ], (24, 24, 1))
    items = [redraw(stack, seed) for seed in range(2)]
    assert_matches_fold_affine(batch.fold_batch(batch.stack_batch(items), method="gather"), items)
    single = [item.astype(jnp.float32) for item in items]
    ref = fold_affine(items[0])
    for method in ("fft", "chain"):
        folded = batch.fold_batch(batch.stack_batch(single), method=method)
        assert folded.kernel.dtype == jnp.float32
        np.testing.assert_allclose(folded.kernel[0], ref.kernel, atol=1e-4 * float(jnp.abs(ref.kernel).max()))
    size = "x".join(map(str, ref.kernel.shape[:2]))
    assert repr(folded) == f"BatchFolded(2 stacks: {size} kernels, 1->4 channels, stride 2x2, float32)"


@pytest.mark.parametrize("method", ["shift", "chain", "auto"])
def test_second_call_with_other_weights_does_not_compile(method):
    _, items = _seed_batch("section5_conv_pool_conv", 6)
    batch.fold_batch(batch.stack_batch(items[:3]), method=method)
    compiled = batch._fold._cache_size()
    folded = batch.fold_batch(batch.stack_batch(items[3:]), method=method)
    assert batch._fold._cache_size() == compiled
    assert_matches_fold_affine(folded, items[3:])


def test_no_conv_no_scatter_and_memory_linear_in_n():
    """The trap (vmap over a conv's kernel) and scatters never appear; XLA's buffers scale with N."""
    structure, _ = _seed_batch("section6_two_pools", 1)
    sizes = {}
    for n in (64, 256):
        zeros = jax.tree.map(lambda w: jnp.zeros((n,) + w.shape), structure)
        for method in ("shift", "fft", "gather", "chain"):
            jaxpr = str(jax.make_jaxpr(lambda s: batch._fold(s, jnp.dtype("float64"), method))(zeros))
            assert "conv_general_dilated" not in jaxpr and "scatter" not in jaxpr, method
        for method in ("auto", "chain"):
            memory = batch._fold.lower(zeros, dtype=jnp.dtype("float64"), method=method).compile().memory_analysis()
            sizes[n, method] = memory.temp_size_in_bytes + memory.output_size_in_bytes
    for method in ("auto", "chain"):
        assert 3.5 <= sizes[256, method] / sizes[64, method] <= 4.5, sizes


@settings(max_examples=int(os.environ.get("JFACTOR_BATCH_EXAMPLES", "12")))
@given(stacks(max_layers=4, padding_kinds=("valid",), allow_nested=False), st.integers(0, 2**32 - 1))
def test_chain_applies_like_the_numpy_reference(stack, seed):
    """The one-transform chain fold, applied by the independent numpy reference, equals the stack applied by it."""
    if stack.dtype is None:
        return
    items = [redraw(stack, seed + i) for i in range(2)]
    folded = batch.fold_batch(batch.stack_batch(items), method="chain")
    x = np.random.default_rng(seed).standard_normal((2,) + stack.input_shape)
    for i, item in enumerate(items):
        conv = folded.conv(i)
        y = reference.conv(x, np.asarray(conv.kernel), None if conv.bias is None else np.asarray(conv.bias),
                           conv.strides, conv.dilation, conv.padding, conv.groups)
        expected = reference.apply_stack(item, x)
        np.testing.assert_allclose(y, expected, rtol=0, atol=1e-10 * max(1.0, np.abs(expected).max()))


def _equations(jaxpr):
    """Every equation of a jaxpr and of the jaxprs nested in its equations' parameters."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, (jax.extend.core.Jaxpr, jax.extend.core.ClosedJaxpr)):
                    yield from _equations(getattr(sub, "jaxpr", sub))


def test_chain_is_one_composition_in_one_transform():
    """The section-8 stack folds as one chain of its nine maps (each dilated by its stride so far), one irfftn."""
    _, items = _seed_batch("section8_avgpool", 2)
    stacks = batch.stack_batch(items)
    (chain,) = batch.fold_plan(stacks, "chain")
    assert chain.method == "chain" and len(chain.shapes) == 9
    assert [s[0] for s in chain.steps] == [1, 1, 2, 2, 4, 4, 8, 8, 16]
    assert batch.chain_size([s[1:3] for s in chain.shapes], chain.steps) == (78, 78)
    jaxpr = jax.make_jaxpr(lambda s: batch._fold(s, jnp.dtype("float64"), "chain"))(stacks).jaxpr
    ffts = [e.params for e in _equations(jaxpr) if e.primitive.name == "fft"]
    assert [(f["fft_type"], tuple(f["fft_lengths"])) for f in ffts] == [(jax.lax.FftType.IRFFT, (78, 78))]
    assert [c.method for c in batch.fold_plan(stacks, "auto")] == ["shift"] * 8


def test_dft_matrix_is_the_dilated_kernels_dft():
    rng = np.random.default_rng(0)
    kernel = rng.standard_normal(5)
    for length, step, half in ((23, 4, False), (24, 3, True), (7, 1, True)):
        dilated = np.zeros(length)
        dilated[: 4 * step + 1 : step] = kernel
        expected = (np.fft.rfft if half else np.fft.fft)(dilated)
        np.testing.assert_allclose(batch.dft_matrix(length, 5, step, half) @ kernel, expected, atol=1e-13)


def test_auto_is_chosen_per_platform():
    """CPU: the measured per-composition crossover; accelerators: the cheapest plan in the fitted model."""
    structure, _ = _seed_batch("section8_avgpool", 1)
    stacks = jax.tree.map(lambda w: jax.ShapeDtypeStruct((100_000,) + w.shape, w.dtype), structure)
    assert batch.auto_method(stacks, "cpu", 100_000) == "auto"
    assert batch.auto_method(stacks, "gpu", 100_000) == "chain"
    # the model reproduces the H200 runs it was fitted to (shift 193k, fft 1.15M stacks/s at N = 100k)
    rates = {m: 100_000 / batch.modelled_seconds(batch.fold_plan(stacks, m), 100_000) for m in ("shift", "fft")}
    assert rates["shift"] == pytest.approx(193e3, rel=0.1) and rates["fft"] == pytest.approx(1.15e6, rel=0.1)


def test_plan_costs_count_bytes_and_flops():
    """A 1-D composition of 4 taps (stride 1) then 3 taps, one channel, float64."""
    (shift,) = batch.fold_plan(batch.stack_batch([jf.Stack([jf.Conv(np.ones((4, 1, 1))), jf.Conv(np.ones((3, 1, 1)))],
                                                            (10, 1))]), "shift")
    cost = shift.cost()
    assert cost["bytes"] == 8 * (4 + 3 + 6) and cost["flops"] == 2 * 3 * 4 and cost["ops"] == 3
    chain = batch.Composition("chain", shift.shapes, shift.steps).cost()
    assert chain["bytes"] == cost["bytes"] and chain["ops"] == 2


def test_choose_method_crossover():
    assert batch.choose_method((100, 64, 64, 1, 1), (100, 3, 3, 1, 1), (1, 1)) == "shift"
    assert batch.choose_method((100, 64, 64, 1, 1), (100, 15, 15, 1, 1), (1, 1)) == "fft"


def test_stack_batch_names_the_first_difference():
    rng = np.random.default_rng(0)
    a = jf.Stack([jf.Conv(rng.normal(size=(3, 3, 1, 2))), jf.AvgPool(2)], (12, 12, 1))
    strided = jf.Stack([jf.Conv(rng.normal(size=(3, 3, 1, 2)), strides=2), jf.AvgPool(2)], (12, 12, 1))
    wider = jf.Stack([jf.Conv(rng.normal(size=(3, 3, 1, 3))), jf.AvgPool(2)], (12, 12, 1))
    with pytest.raises(jf.StackError, match=r"stacks\[1\]\.layers\[0\] is Conv\(3x3, 1->2, stride 2\)"):
        batch.stack_batch([a, strided])
    with pytest.raises(jf.StackError, match=r"stacks\[2\]\.layers\[0\]\.kernel has shape \(3, 3, 1, 3\)"):
        batch.stack_batch([a, a, wider])
    with pytest.raises(jf.StackError, match="input_shape"):
        batch.stack_batch([a, a.with_input_shape((14, 14, 1))])
    with pytest.raises(jf.StackError, match="at least one"):
        batch.stack_batch([])
    with pytest.raises(jf.StackError, match=r"stacks\[1\] is a Conv"):
        batch.stack_batch([a, a.layers[0]])
    assert batch.stack_batch([a, a]).layers[0].kernel.shape == (2, 3, 3, 1, 2)


def test_fold_batch_errors():
    rng = np.random.default_rng(0)
    stack = jf.Stack([jf.Conv(rng.normal(size=(3, 3, 1, 2)), rng.normal(size=2))], (8, 8, 1))
    with pytest.raises(jf.StackError, match="unbatched stack"):
        batch.fold_batch(stack)
    with pytest.raises(jf.StackError, match="one item of the batch .* N = 3.* 1-D kernel"):
        batch.fold_batch(jf.Stack([jf.Conv(rng.normal(size=(3, 3, 1, 1)))], (8, 8, 1)))
    with pytest.raises(jf.StackError, match="no weights"):
        batch.fold_batch(jf.Stack([jf.AvgPool(2)], (8, 8, 1)))
    with pytest.raises(jf.StackError, match="jfactor.Stack"):
        batch.fold_batch([stack, stack])
    with pytest.raises(jf.ConfigError, match="fold_batch: method must be one of"):
        batch.fold_batch(batch.stack_batch([stack]), method="fast")


def test_batch_items_out_of_range_and_non_finite_weights_are_named():
    rng = np.random.default_rng(0)
    make = lambda: jf.Stack([jf.Conv(rng.normal(size=(3, 3, 1, 2))), jf.AvgPool(2),  # noqa: E731
                             jf.Conv(rng.normal(size=(3, 3, 2, 1)))], (16, 16, 1))
    stacks = [make(), make()]
    folded = batch.fold_batch(batch.stack_batch(stacks))
    np.testing.assert_array_equal(folded.conv(-1).kernel, folded.conv(1).kernel)
    for i in (2, -3):
        with pytest.raises(IndexError, match=f"item {i} of a batch of 2"):
            folded.conv(i)
    with pytest.raises(TypeError, match="items are numbered by integers, got 'a'"):
        folded.conv("a")
    for index in (np.int64(1), jnp.int32(1), np.array(1)):  # numpy and concrete jax integers are items too
        np.testing.assert_array_equal(folded.conv(index).kernel, folded.conv(1).kernel)
    bad = jax.tree.map(lambda w: np.where(np.arange(w.size).reshape(w.shape) == 0, np.nan, w), stacks[1])
    with pytest.raises(jf.StackError, match=r"stack_batch: stacks\[1\]\.layers\[0\]\.kernel has non-finite"):
        batch.stack_batch([stacks[0], bad])
    traced = jax.jit(lambda a, b: batch.stack_batch([a, b]).layers[0].kernel)(*stacks)  # still traceable
    np.testing.assert_array_equal(traced, batch.stack_batch(stacks).layers[0].kernel)


def _run(code, env=None):
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            timeout=300, cwd=ROOT, env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_sharded_fold_equals_single_device_on_four_cpu_devices():
    """XLA_FLAGS must be set before jax starts, so this runs in a fresh process."""
    out = _run("""
        import jax, numpy as np
        from jfactor import batch
        from jfactor.stack_config import load_stack
        assert len(jax.devices()) == 4, jax.devices()
        structure = load_stack("configs/seed/section7_strides.yaml")
        rng = np.random.default_rng(0)
        stacks = jax.tree.map(lambda w: rng.standard_normal((6,) + w.shape), structure)  # 6: padded to 8
        placed = batch.shard_batch(stacks, batch.batch_mesh())
        assert len(placed.layers[0].kernel.sharding.device_set) == 4
        assert placed.layers[0].kernel.shape[0] == 8
        for method in ("shift", "fft"):
            single = batch.fold_batch(stacks, method=method)
            sharded = batch.fold_batch(stacks, method=method, shard=True)
            assert len(sharded) == 6
            np.testing.assert_array_equal(np.asarray(sharded.kernel), np.asarray(single.kernel))
            np.testing.assert_array_equal(np.asarray(sharded.bias), np.asarray(single.bias))
        print("ok")
    """, {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"})
    assert out.strip().endswith("ok")


def test_compilation_cache_writes_to_its_directory(tmp_path):
    _run(f"""
        import jax, numpy as np
        from jfactor import batch
        from jfactor.stack_config import load_stack
        path = batch.enable_compilation_cache({str(tmp_path / "cache")!r})
        structure = load_stack("configs/seed/section2_two_3x3.yaml")
        batch.fold_batch(jax.tree.map(lambda w: np.stack([w, 2 * w]), structure))
        assert any(path.iterdir()), "nothing cached"
    """)


def test_bench_fold_smoke():
    out = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench_fold.py"), "--n", "8", "--tiny", "--json"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    for key in ("n", "device", "items_per_s", "baseline_items_per_s", "speedup", "compile_s", "peak_mem_mb",
                "max_abs_diff", "bound", "bound_fraction"):
        assert key in result, key
    assert result["n"] == 8 and result["max_abs_diff"] < 1e-10


def test_fold_batch_refuses_integer_dtypes_and_non_finite_items():
    rng = np.random.default_rng(0)
    one = jf.Stack([jf.Conv(rng.normal(size=(3, 3, 1, 1)) * 3, np.ones(1)), jf.Conv(rng.normal(size=(3, 3, 1, 1)))],
                   input_shape=(8, 8, 1))
    stacks = jf.batch.stack_batch([one, one, one])
    for dtype in (np.int32, bool):  # were cast and folded truncated, reported as float64
        with pytest.raises(jf.ConfigError, match="fold_batch: dtype must be a floating dtype"):
            jf.batch.fold_batch(stacks, dtype=dtype)
    with pytest.raises(jf.ConfigError, match="Stack.astype: dtype must be a floating dtype"):
        one.astype(np.int32)
    broken = jax.tree.map(lambda w: w.at[1].set(np.nan), stacks)  # edited after stack_batch checked it
    with pytest.raises(jf.StackError, match=r"the folds of 1 of 3 items are not finite \(the first: item 1\)"):
        jf.batch.fold_batch(broken)


@pytest.mark.parametrize("options,match", [({"mesh": "cpu"}, "mesh must be a jax.sharding.Mesh"),
                                           ({"shard": "no"}, "shard must be True or False")])
def test_fold_batch_refuses_a_mesh_or_shard_of_the_wrong_type(options, match):
    one = jf.Stack([jf.Conv(np.ones((3, 3, 1, 1)))], input_shape=(8, 8, 1))
    with pytest.raises(jf.ConfigError, match=match):
        jf.batch.fold_batch(jf.batch.stack_batch([one, one]), **options)
    folded = jf.batch.fold_batch(jf.batch.stack_batch([one, one]), shard=np.True_)  # before: refused, a numpy bool
    np.testing.assert_array_equal(folded.kernel[1], jf.fold(one).conv.kernel)


def test_fold_batch_still_traces_under_jit_and_bfloat16_is_a_floating_dtype():
    one = jf.Stack([jf.Conv(np.ones((3, 3, 1, 1))), jf.Conv(np.full((3, 3, 1, 1), 0.5))], input_shape=(8, 8, 1))
    stacks = jf.batch.stack_batch([one, one])
    traced = jax.jit(lambda s: jf.batch.fold_batch(s).kernel)(stacks)  # no finiteness check on tracers
    np.testing.assert_allclose(traced, jf.batch.fold_batch(stacks).kernel)
    assert one.astype(jnp.bfloat16).dtype == jnp.bfloat16


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float16, 2e-3), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("method", ["auto", "chain", "fft", "shift", "gather"])
def test_half_precision_batches_keep_their_dtype_with_every_method(dtype, tolerance, method):
    """XLA's FFT takes no half precision: the transform methods run in float32 and cast back (the
    chain method returned float32, the FFT method raised jax's error; auto picks FFT here)."""
    rng = np.random.default_rng(0)
    items = [jf.Stack([jf.Conv(rng.standard_normal((7, 7, 1, 2))), jf.Conv(rng.standard_normal((15, 15, 2, 1)))],
                      input_shape=(32, 32, 1)) for _ in range(2)]
    folded = jf.batch.fold_batch(jf.batch.stack_batch([item.astype(dtype) for item in items]), method=method)
    assert folded.kernel.dtype == dtype
    for item, kernel in zip(items, folded.kernel):
        exact = np.asarray(jf.fold(item.astype(dtype).astype(jnp.float64)).conv.kernel)
        assert np.abs(np.asarray(kernel, np.float64) - exact).max() <= tolerance * np.abs(exact).max()


def test_fold_plan_of_an_unbatched_stack_says_what_a_batch_is():
    unbatched = jf.Stack([jf.Conv(np.ones((3, 3, 1, 2))), jf.Conv(np.ones((3, 3, 2, 1)))], input_shape=(8, 8, 1))
    with pytest.raises(jf.StackError, match="one item of the batch .* is not a valid stack"):
        jf.batch.fold_plan(unbatched)  # was jax's ValueError from vmap
