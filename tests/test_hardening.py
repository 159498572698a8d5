"""Large and unusual input: no crash, no lost result, no scale dependence, no unbounded work."""

import functools
import json
import os
import stat
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import scipy.signal as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from jfactor import kernels, ops, rundir
from jfactor.errors import ConfigError, StackError
from jfactor.factorize import Chain, Solver, factorize
from jfactor.factorize.chain import FactorizationError
from jfactor.factorize.metrics import norm
from jfactor.factorize.npconv import correlate_valid
from jfactor.fold import fold, fold_conv, probe_input_shape
from jfactor.stack_config import stack_from_dict
from tests import reference

FAST = Solver(optimizer="none", refine_steps=60)


def _stack_spec(n: int, layers: int, dtype: str, stride: int = 1) -> dict:
    conv = {"kernel_size": 3, "filters": 1, "padding": "same", "weights": [[1, 0, 1], [1, 1, 1], [0, 0, 0]]}
    items = [{"conv": {**conv, "strides": stride if i == 0 else 1}} for i in range(layers)]
    return {"input_shape": [n, n, 1], "dtype": dtype, "layers": items}


GRID = textwrap.dedent("""
    import jax, sys
    jax.config.update("jax_enable_x64", True)
    import numpy as np
    from jfactor.fold import fold
    from jfactor.stack_config import stack_from_dict
    n, layers, dtype = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    conv = {"kernel_size": 3, "filters": 1, "padding": "same", "weights": [[1, 0, 1], [1, 1, 1], [0, 0, 0]]}
    stack = stack_from_dict({"input_shape": [n, n, 1], "dtype": dtype, "layers": [{"conv": conv}] * layers})
    y = np.asarray(stack(np.ones((1, n, n, 1), dtype)))
    folded = fold(stack)
    assert np.isfinite(y).all() and folded.certificate.rel_diff < (1e-12 if dtype == "float64" else 1e-5)
    print("ok")
""")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_apply_and_fold_over_a_grid_of_sizes_and_depths_never_crash(dtype):
    """Each case in its own process: a crash (exit 139) fails the case instead of the suite."""
    for n in (255, 512, 1024, 2048):
        for layers in (1, 3):
            result = subprocess.run([sys.executable, "-c", GRID, str(n), str(layers), dtype], capture_output=True,
                                    text=True, timeout=600)
            assert result.returncode == 0 and result.stdout.strip() == "ok", (n, layers, result.returncode,
                                                                              result.stderr[-2000:])


@pytest.mark.parametrize("formulation, largest_kernel, largest_pad, smallest_input, atol", [
    (ops.conv_by_taps, 3, 2, 7, 1e-12),  # what large float64 inputs take on the CPU
    (ops.conv_by_fft, 4, 4, 9, 1e-11),  # what large kernels take
], ids=["taps", "fft"])
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_convolution_formulations_match_the_reference(formulation, largest_kernel, largest_pad, smallest_input,
                                                      atol, data):
    """Crops, strides, dilation and groups included."""
    ndim = data.draw(st.integers(1, 3))
    groups = data.draw(st.integers(1, 3))
    cin_g, cout_g = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2))
    k = tuple(data.draw(st.integers(1, largest_kernel)) for _ in range(ndim))
    strides = tuple(data.draw(st.integers(1, 3)) for _ in range(ndim))
    dilation = tuple(data.draw(st.integers(1, 2)) for _ in range(ndim))
    pads = tuple((data.draw(st.integers(-1, largest_pad)), data.draw(st.integers(-1, largest_pad)))
                 for _ in range(ndim))
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 16)))
    x = rng.standard_normal((2, *[data.draw(st.integers(smallest_input, smallest_input + 3)) for _ in range(ndim)],
                             groups * cin_g))
    kernel = rng.standard_normal((*k, cin_g, groups * cout_g))
    got = formulation(x, kernel, strides=strides, dilation=dilation, pads=pads, groups=groups)
    np.testing.assert_allclose(np.asarray(got), reference.conv(x, kernel, None, strides, dilation, pads, groups),
                               atol=atol)


def test_large_float64_inputs_use_no_xla_convolution_on_the_cpu():
    """XLA's CPU convolution crashed on some large float64 inputs: jfactor's conv routes them
    tap by tap, small ones and float32 keep XLA's convolution."""
    kernel = np.ones((3, 3, 1, 1))
    run = functools.partial(ops.conv, strides=(1, 1), dilation=(1, 1), pads=((1, 1), (1, 1)), groups=1)
    program = lambda shape, dtype: str(jax.make_jaxpr(run)(np.zeros(shape, dtype), kernel.astype(dtype)))  # noqa: E731
    assert "conv_general_dilated" not in program((1, 2048, 2048, 1), np.float64)
    assert "conv_general_dilated" not in program((4, 256, 256, 1), np.float64)  # 2^18 values
    assert "conv_general_dilated" in program((1, 255, 255, 1), np.float64)
    assert "conv_general_dilated" in program((1, 2048, 2048, 1), np.float32)
    x = np.random.default_rng(0).standard_normal((1, 700, 600, 1))
    np.testing.assert_allclose(np.asarray(run(x, kernel)), reference.conv(x, kernel, None, 1, 1, ((1, 1), (1, 1))),
                               atol=1e-12)


@pytest.mark.parametrize("pads, dilation, by_taps", [
    (((3, 3), (3, 3)), (1, 1), True),  # a chain's first layer padded for the whole chain: XLA crashed here
    (((0, 3), (0, 0)), (1, 1), True),
    (((5, 5), (5, 5)), (2, 2), True),
    (((4, 4), (4, 4)), (2, 2), False),  # within the dilated kernel's reach
    (((2, 2), (2, 2)), (1, 1), False),
    (((2, 0), (-1, 1)), (1, 1), False),
])
def test_small_float64_inputs_padded_beyond_the_kernel_use_no_xla_convolution(pads, dilation, by_taps):
    """XLA's CPU convolution crashed (SIGSEGV, about one process in three on an AVX-512 Xeon) on a
    float64 (4, 32, 32, 1) input whose 3x3 kernel was padded by 3: such convolutions go tap by tap
    on the CPU, and give the reference's result."""
    rng = np.random.default_rng(1)
    x, kernel = rng.standard_normal((4, 32, 32, 1)), rng.standard_normal((3, 3, 1, 2))
    run = functools.partial(ops.conv, strides=(1, 1), dilation=dilation, pads=pads, groups=1)
    program = str(jax.make_jaxpr(run)(x, kernel))
    assert ("conv_general_dilated" not in program) == by_taps
    assert "conv_general_dilated" in str(jax.make_jaxpr(run)(x.astype(np.float32), kernel.astype(np.float32)))
    np.testing.assert_allclose(np.asarray(run(x, kernel)), reference.conv(x, kernel, None, 1, dilation, pads),
                               atol=1e-12)


def test_float64_convolutions_with_many_taps_run_in_a_loop_and_match_the_reference():
    rng = np.random.default_rng(3)
    x, kernel = rng.standard_normal((1, 30, 27, 4)), rng.standard_normal((13, 11, 2, 4))  # 143 taps: a loop
    run = functools.partial(ops.conv_by_taps, strides=(2, 1), dilation=(1, 2), pads=((6, 5), (-1, 3)), groups=2)
    program = str(jax.make_jaxpr(run)(x, kernel))
    assert ops.UNROLL_TAPS < 143 and ("scan" in program or "while" in program)
    assert "conv_general_dilated" not in program
    np.testing.assert_allclose(np.asarray(run(x, kernel)),
                               reference.conv(x, kernel, None, (2, 1), (1, 2), ((6, 5), (-1, 3)), 2), atol=1e-11)


def test_large_kernels_convolve_through_ffts_and_small_ones_or_many_channels_do_not():
    assert ops.fft_pays((2, 1200, 1200, 1), (501, 501, 1, 1), (1, 1), (1, 1), ((0, 0), (0, 0)), 1)
    assert ops.fft_pays((1, 100, 100, 1), (41, 41, 1, 1), (1, 1), (1, 1), ((40, 40), (40, 40)), 1)
    assert not ops.fft_pays((2, 1200, 1200, 1), (31, 31, 1, 1), (1, 1), (1, 1), ((0, 0), (0, 0)), 1)  # 961 taps
    assert not ops.fft_pays((1, 40, 40, 256), (33, 33, 256, 256), (1, 1), (1, 1), ((0, 0), (0, 0)), 1)
    assert not ops.fft_pays((1, 40, 40, 1), (41, 41, 1, 1), (1, 1), (1, 1), ((0, 0), (0, 0)), 1)  # no output
    # only float32 and float64 of one dtype: jnp.fft has no half precision, integers or complex here
    run = functools.partial(ops.conv, strides=(1, 1), dilation=(1, 1), pads=((0, 0), (0, 0)), groups=1)
    rng = np.random.default_rng(2)
    x, kernel = rng.standard_normal((2, 120, 120, 1)), rng.standard_normal((41, 41, 1, 1))
    want = reference.conv(x, kernel, None, 1, 1, ((0, 0), (0, 0)))
    for dtype, fft, atol in (("float32", True, 1e-3), ("float64", True, 1e-11), ("bfloat16", False, 0.05)):
        a, b = jax.numpy.asarray(x, dtype), jax.numpy.asarray(kernel, dtype)
        assert ("fft" in str(jax.make_jaxpr(run)(a, b))) == fft, dtype
        got = run(a, b)
        assert got.dtype == dtype
        np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=atol * np.abs(want).max())


def test_folding_large_kernels_goes_through_ffts_and_stays_exact():
    """Two 41x41 kernels: their composition (a full convolution) and the certificate's runs take
    the FFT route; the folded kernel is their full convolution (scipy) to float64 rounding."""
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((41, 41)), rng.standard_normal((41, 41))
    spec = {"input_shape": [120, 120, 1], "layers": [{"conv": {"kernel_size": 41, "filters": 1, "weights": w.tolist()}}
                                                     for w in (a, b)]}
    stack = stack_from_dict(spec)
    assert "fft" in str(jax.make_jaxpr(lambda s: fold_conv(s).kernel)(stack))
    folded = fold(stack)
    expected = sp.convolve(a[::-1, ::-1], b[::-1, ::-1])[::-1, ::-1]  # correlations compose as convolutions
    np.testing.assert_allclose(np.asarray(folded.conv.kernel)[..., 0, 0], expected, atol=1e-11)
    assert folded.certificate.rel_diff < 1e-13


def test_the_certificate_probe_is_bounded_and_keeps_the_borders():
    assert probe_input_shape((28, 28, 1), (1, 1), (5, 5)) == (28, 28, 1)
    assert probe_input_shape((4099, 100, 3), (4, 1), (7, 7)) == (64 + (4099 - 64) % 4, 64, 3)
    big = fold(stack_from_dict(_stack_spec(1001, 3, "float64", stride=2)))
    assert big.certificate.probe_shape[1:3] == (65, 65)  # 1001 = 65 mod 2: the same borders, far fewer values
    assert big.certificate.max_abs_diff < 1e-12
    small = fold(stack_from_dict(_stack_spec(65, 3, "float64", stride=2)))
    assert small.exact_region is not None and big.exact_region is not None
    assert np.array_equal(np.asarray(big.conv.kernel), np.asarray(small.conv.kernel))
    # the region where the stack is exact ends at the same distance from the far border
    assert [s - b for (_, b), s in zip(big.exact_region, big.output_shape)] == \
           [s - b for (_, b), s in zip(small.exact_region, small.output_shape)]


def test_a_failing_baseline_is_a_note_and_the_result_is_written(tmp_path):
    np.save(tmp_path / "t.npy", np.array([[1.0, 2.0], [3.0, 4.0]]))
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "jfactor", "factorize", "--target", str(tmp_path / "t.npy"),
                             "--chain", "2", "--restarts", "2", "--out", str(out), "--json"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "result.json").read_text())
    assert summary["rel_error"] < 1e-12  # a 2x2 target is its own one-layer chain
    assert all(entry["rel_error"] is None or np.isfinite(entry["rel_error"]) for entry in summary["baselines"].values())
    failed = [entry for entry in summary["baselines"].values() if entry["rel_error"] is None]
    assert all(entry["note"] for entry in failed)


@pytest.mark.parametrize("scale", [1e300, 1e-200, 1e-300])
def test_any_finite_scale_gives_the_same_relative_error(scale):
    target = kernels.make("log", 7, sigma=1.1)
    reference = factorize(target, Chain.build([3, 5]), restarts=3, solver=FAST, baselines=("svd",))
    scaled = factorize(target * scale, Chain.build([3, 5]), restarts=3, solver=FAST, baselines=("svd",))
    assert scaled.rel_error == pytest.approx(reference.rel_error, rel=1e-6)
    assert scaled.metrics["max_abs_error"] == pytest.approx(reference.metrics["max_abs_error"] * scale, rel=1e-6)
    assert scaled.baselines["svd"]["rel_error"] == pytest.approx(reference.baselines["svd"]["rel_error"], rel=1e-9)
    assert np.isfinite(scaled.approx).all()
    assert norm(target * scale) == pytest.approx(np.linalg.norm(target) * scale, rel=1e-12)


def test_the_memory_estimate_counts_the_least_squares_baselines_that_run():
    # before: lstsq's part was counted (as "als") on chains with two free factors, where it does not run
    from jfactor.factorize import budget

    chain, solver = Chain.build([3, 33]), Solver(optimizer="adam", steps=1, refine="none")
    parts = lambda free, names: budget.estimate(chain, 1, 1, free, 35 * 35, 2, 2, solver, 8, names).memory  # noqa: E731
    assert set(parts((0, 1), ("svd", "lstsq"))) == {"first-order"}
    assert set(parts((1,), ("svd", "lstsq"))) == {"first-order", "lstsq"}
    assert parts((0, 1), ("als", "lstsq"))["als"] == 2 * parts((1,), ("lstsq",))["lstsq"]  # from each start


def test_work_past_the_memory_budget_stops_before_compute_naming_the_knob(monkeypatch):
    target = kernels.make("gaussian", 7, sigma=1.0)  # before the budget shrinks (making a family checks it too)
    monkeypatch.setenv("JFACTOR_MEMORY_BUDGET_GB", "1e-6")
    images = np.arange(64.0).reshape(1, 8, 8, 1)  # the user's: not counted (the default ones would be the largest)
    with pytest.raises(ConfigError, match=r"past the memory budget .*JFACTOR_MEMORY_BUDGET_GB.*restarts"):
        factorize(target, Chain.build([3, 5]), restarts=4, solver=FAST, baselines=(),
                  images=images)
    monkeypatch.setenv("JFACTOR_MEMORY_BUDGET_GB", "1")
    with pytest.raises(ConfigError, match=r"\(first-order\).*each of solver\.steps"):  # before: restarts or channels
        factorize(target, Chain.build([3, 5]), restarts=4, solver=Solver(optimizer="adam", steps=10**12,
                                                                         refine="none"), baselines=())
    monkeypatch.setenv("JFACTOR_MEMORY_BUDGET_GB", "1e-6")
    with pytest.raises(ConfigError, match=r"\(als\).*drop the als"):
        factorize(target, Chain.build([3, 5]), restarts=4,
                  solver=Solver(optimizer="adam", steps=1, refine="none"), baselines=("als",), images=images)
    monkeypatch.setenv("JFACTOR_MEMORY_BUDGET_GB", "-1")
    with pytest.raises(ConfigError, match="JFACTOR_MEMORY_BUDGET_GB"):
        factorize(target, Chain.build([3, 5]), restarts=2, solver=FAST, baselines=())


def test_the_images_objective_counts_its_images_against_the_budget(monkeypatch):
    """Without the Gram factor (a kernel too large for it) its residual is every image's output:
    100 crops of each default image once took 3.6 GB past a 1.5 GB budget unrefused.  With it the
    residual is the kernel's taps, whatever the number of images."""
    from jfactor.factorize import api as factorize_api

    target = kernels.make("gaussian", 7, sigma=1.0)
    images = np.random.default_rng(0).standard_normal((50, 64, 64, 1))
    monkeypatch.setenv("JFACTOR_MEMORY_BUDGET_GB", "0.1")
    run = lambda images: factorize(target, Chain.build([3, 5]), restarts=2, solver=FAST, baselines=(),  # noqa: E731
                                   images=images, objective="images")
    run(images)  # factored: 49 residuals
    monkeypatch.setattr(factorize_api, "factor_fits", lambda *shapes: False)
    with pytest.raises(ConfigError, match=r"\(objective\) needs about .* past the memory budget.*objective\.crops"):
        run(images)
    run(images[:2])  # two images fit


def test_the_images_objectives_gram_factor_counts_against_the_budget(monkeypatch):
    """A 41x41 kernel's factor is made from a 1,681 x 1,681 Gram matrix (about 90 MB at its peak),
    which the estimate once left out: it passed a 50 MB budget."""
    from jfactor.factorize import api as factorize_api

    target = kernels.make("gaussian", 41, sigma=6.0)
    made = []
    monkeypatch.setattr(factorize_api, "gram_factor", lambda *args: made.append(args))  # nothing is computed
    monkeypatch.setenv("JFACTOR_MEMORY_BUDGET_GB", "0.05")
    with pytest.raises(ConfigError, match=r"\(gram\) needs about 90\.\d MB, past the memory budget.*smaller chain"):
        factorize(target, Chain.build([21, 21]), restarts=1, solver=FAST, baselines=(), objective="images")
    assert not made


def test_huge_chains_stop_at_the_memory_budget_before_any_array_is_made():
    """A 100,000-wide chain would pad the target to 75 GB and the metric's images to 30 TB: the
    budget check comes first (it once ran out of memory in numpy)."""
    with pytest.raises(ConfigError, match=r"\(images\) needs about .* past the memory budget.*smaller chain sizes"):
        factorize(kernels.make("gaussian", 9), Chain.build([100_001]), restarts=1, solver=FAST, baselines=())


@pytest.mark.parametrize("options, named", [
    ({"seed": -1}, "seed must be a non-negative integer"),
    ({"seed": 1.5}, "seed must be a non-negative integer"),
    ({"images": np.full((2, 16, 16, 1), np.nan)}, "images have non-finite values"),
    ({"images": np.ones((2, 4, 4, 1))}, r"images \(4, 4\) are smaller than the kernel .* \(5, 5\)"),
    ({"images": np.zeros((2, 16, 16, 1)), "objective": "images"},
     r"images are all zero: the output metric \(and the images objective\)"),
    ({"images": np.zeros((0, 16, 16, 1))}, r"images hold no image \(B = 0"),  # before: taken, no output metric
    ({"images": np.ones((2, 16, 16, 1)) * 1j}, "images are complex"),  # before: cast to real with a warning
    ({"budget_s": "1"}, "budget_s must be a positive number of seconds"),  # before: a TypeError from math
])
def test_bad_factorize_options_are_refused_by_name(options, named):
    with pytest.raises(ConfigError, match=named):
        factorize(kernels.make("gaussian", 5), Chain.build([3, 3]), restarts=1, solver=FAST, baselines=(), **options)


def test_a_budget_may_be_a_numpy_number():
    from jfactor.factorize import SearchPolicy

    for budget in (np.int64(10), np.float32(2.5), 3):
        assert SearchPolicy(budget_s=budget).budget_s == budget
    for bad in (True, "1", np.nan):
        with pytest.raises(ConfigError, match="budget_s must be a positive number of seconds"):
            SearchPolicy(budget_s=bad)


@pytest.mark.parametrize("chain", ["3,3", [3, 3], None])
def test_a_chain_that_is_not_a_chain_is_refused_by_name(chain):
    with pytest.raises(ConfigError, match="chain must be a Chain"):
        factorize(kernels.make("gaussian", 5), chain, restarts=1, solver=FAST, baselines=())


@pytest.mark.parametrize("sizes", [[3.0], [3, None], [True, 3], [(3, 3.5)], ["3"]])
def test_chain_sizes_that_are_not_positive_integers_are_refused_by_name(sizes):
    with pytest.raises(FactorizationError, match="size must be a positive integer"):
        Chain.build(sizes)


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_valid_correlation_matches_scipy(data):
    """The output metric's correlation (by FFT) against scipy's direct one, 1-3 dims."""
    ndim = data.draw(st.integers(1, 3))
    kernel_shape = data.draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim))
    x_shape = [k + data.draw(st.integers(0, 6)) for k in kernel_shape]
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    x, kernel = rng.standard_normal(x_shape), rng.standard_normal(kernel_shape)
    np.testing.assert_allclose(correlate_valid(x, kernel), sp.correlate(x, kernel, mode="valid", method="direct"),
                               rtol=0, atol=1e-12)


def test_an_empty_batch_is_refused_by_name():
    from jfactor import batch

    stack = stack_from_dict(_stack_spec(8, 2, "float64"))
    with pytest.raises(StackError, match="the batch is empty"):
        batch.fold_batch(jax.tree.map(lambda w: np.zeros((0,) + np.shape(w)), stack))


def test_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = rundir.write_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_failed_block_removes_the_directory_it_created_and_keeps_an_existing_one(tmp_path):
    with pytest.raises(RuntimeError):
        with rundir.output_dir(tmp_path / "new" / "deep", tmp_path, "x") as directory:
            rundir.write_json(directory / "partial.json", {})
            raise RuntimeError
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "earlier.json").write_text("{}")
    with pytest.raises(RuntimeError):
        with rundir.output_dir(existing, tmp_path, "x"):
            raise RuntimeError
    assert (existing / "earlier.json").read_text() == "{}"


def test_ctrl_c_keeps_finished_work_only_where_asked(tmp_path):
    done = lambda directory: (directory / "chain0.json").exists()  # noqa: E731
    with pytest.raises(rundir.Interrupted) as caught:
        with rundir.output_dir(None, tmp_path / "runs", "x", finished=done) as directory:
            rundir.write_json(directory / "chain0.json", {})
            raise KeyboardInterrupt
    assert caught.value.directory == directory and (directory / "chain0.json").exists()
    with pytest.raises(KeyboardInterrupt) as caught:  # nothing finished: nothing kept
        with rundir.output_dir(None, tmp_path / "early", "x", finished=done) as directory:
            rundir.write_json(directory / "config.json", {})
            raise KeyboardInterrupt
    assert not isinstance(caught.value, rundir.Interrupted) and not (tmp_path / "early").exists()
    with pytest.raises(KeyboardInterrupt):  # not asked: removed like any failed block
        with rundir.output_dir(None, tmp_path / "plain", "x") as directory:
            rundir.write_json(directory / "chain0.json", {})
            raise KeyboardInterrupt
    assert not (tmp_path / "plain").exists()


def test_staged_files_replace_a_directorys_files_all_at_once_or_not_at_all(tmp_path):
    (tmp_path / "result.json").write_text("old")
    (tmp_path / "loss.png").write_text("old picture")
    (tmp_path / "notes.txt").write_text("the user's")
    with pytest.raises(KeyboardInterrupt):
        with rundir.staged(tmp_path, replaces=["loss.png"]) as files:
            rundir.write_json(files / "result.json", {"new": 1})
            raise KeyboardInterrupt  # while the pictures are drawn
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["loss.png", "notes.txt", "result.json"]
    assert (tmp_path / "result.json").read_text() == "old"
    with rundir.staged(tmp_path, replaces=["loss.png", "search.png"]) as files:
        rundir.write_json(files / "result.json", {"new": 1})
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["notes.txt", "result.json"]  # no picture of the old one
    assert json.loads((tmp_path / "result.json").read_text()) == {"new": 1}
    (tmp_path / "factors.npz").mkdir()  # a folder where a file goes: refused before any file moves
    with pytest.raises(ConfigError, match=r"factors.npz: is a folder, where this command writes a file"):
        with rundir.staged(tmp_path) as files:
            rundir.write_json(files / "result.json", {"newer": 1})
            rundir.write_json(files / "factors.npz", {})
    assert json.loads((tmp_path / "result.json").read_text()) == {"new": 1}
    assert not list(tmp_path.glob(".staging-*"))


def test_an_interrupted_factorize_leaves_the_earlier_result_in_its_directory_whole(tmp_path, monkeypatch):
    # before: result.json of the earlier run beside the new run's factors.npz and approx.npy
    from typer.testing import CliRunner

    from jfactor.cli import app

    out = tmp_path / "out"
    command = ["factorize", "--family", "gaussian", "--size", "7", "--restarts", "2", "--out", str(out)]
    assert CliRunner().invoke(app, [*command, "--chain", "3,5"]).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(rundir, "write_json", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    result = CliRunner().invoke(app, [*command, "--chain", "3,3,3"])
    assert result.exit_code != 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_approx_has_the_target_shape_when_the_chain_is_larger():
    rng = np.random.default_rng(0)
    target = sp.convolve2d(rng.standard_normal((3, 3)), rng.standard_normal((13, 7)))  # 15x9
    result = factorize(target, Chain.build([3, 5, 9]), restarts=2, solver=FAST, baselines=())
    assert result.approx.shape[:2] == (15, 15)
    approx = result.approx_like_target()
    assert approx.shape == target.shape
    (lo, _), (left, _) = result.padding
    np.testing.assert_array_equal(approx, result.approx[lo: lo + 15, left: left + 9, 0, 0])


def test_an_unknown_factorize_option_is_named_with_a_suggestion():
    with pytest.raises(TypeError, match=r"factorize\(\): unknown option 'restart'; did you mean 'restarts'\?"):
        factorize(kernels.make("gaussian", 5), Chain.build([3, 3]), restart=2)


def test_an_all_zero_frozen_layer_is_refused_by_name():
    with pytest.raises(FactorizationError, match="frozen layer 1: weights are all zero"):
        Chain.build([3, 3], frozen={1: np.zeros((3, 3))})


@pytest.mark.parametrize("size,sizes", [(5, [3, 3]), (7, [3, 4]), (3, [3, 3])])
def test_a_strided_target_in_a_larger_chain_keeps_its_sampling_phase(size, sizes):
    """The chain computes the target's map: its outputs are the target's strided outputs, shifted
    by whole outputs.  Before: a 5x5 target at stride 2 in a 7x7 chain sat one pixel in, half an
    output off, and an 'exact' result (3e-16) computed another filter (output error 1.3)."""
    from scipy import signal

    from jfactor.factorize import Chain, Target, factorize

    rng = np.random.default_rng(size)
    chain = Chain.build(sizes, strides=[2, 1])  # extent 7 or 9: 2 or 4 more than the target
    target = np.zeros((size, size))
    target[::2, ::2] = rng.standard_normal(((size + 1) // 2,) * 2)  # a stride-2 map the chain can make exactly
    result = factorize(Target.from_array(target, stride=2), chain, restarts=8, baselines=())
    x = rng.standard_normal((41, 41))
    expected = signal.correlate(x, target, mode="valid")[::2, ::2]
    got = np.asarray(result.to_stack((41, 41, 1))(x[None, ..., None]))[0, ..., 0]
    low = [lo // 2 for lo, _ in result.padding]  # whole outputs
    n = min(got.shape[0], expected.shape[0] - max(low))
    scale = np.abs(expected).max()
    assert all(lo % 2 == 0 for lo, _ in result.padding), result.padding
    np.testing.assert_allclose(got[:n, :n], expected[low[0]:low[0] + n, low[1]:low[1] + n], atol=1e-9 * scale)
