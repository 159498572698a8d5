"""`jfactor fold`: files, JSON contract and errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import jfactor as jf
from jfactor.cli import app
from jfactor.progress import ProgressBar
from jfactor.stack_config import load_stack

ROOT = Path(__file__).parent.parent
runner = CliRunner()


def test_fold_writes_kernel_bias_and_summary(tmp_path):
    config = ROOT / "configs" / "seed" / "section5_conv_pool_conv.yaml"
    result = runner.invoke(app, ["fold", str(config), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "folded: one conv 8x8" in result.output and "3x3 -> 3x3 d2 -> AvgPool(2)" in result.output
    out = tmp_path / "out"
    kernel = np.load(out / "kernel.npy")
    expected = jf.fold(load_stack(config)).conv.kernel
    np.testing.assert_array_equal(kernel, expected)
    assert np.load(out / "bias.npy").shape == (1,)
    summary = json.loads((out / "summary.json").read_text())
    for key in ("kernel_shape", "stride", "padding", "groups", "receptive_field", "exact_region", "certificate"):
        assert key in summary
    assert summary["kernel_shape"] == [8, 8, 1, 1] and summary["stride"] == [2, 2]
    assert summary["exact_region"] is None
    assert set(summary["certificate"]) >= {"max_abs_diff", "rel_diff", "dtype"}
    assert summary["certificate"]["dtype"] == "float64"


def test_fold_json_prints_the_same_json(tmp_path):
    config = ROOT / "configs" / "seed" / "section4_avgpool.yaml"
    result = runner.invoke(app, ["fold", str(config), "--out", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed == json.loads((tmp_path / "summary.json").read_text())


def test_fold_reports_the_exact_region(tmp_path):
    config = tmp_path / "padded.yaml"
    config.write_text("input_shape: [10, 10, 1]\nlayers:\n"
                      "  - conv: {kernel_size: 3, filters: 1, padding: same}\n"
                      "  - conv: {kernel_size: 3, filters: 1, padding: same}\n")
    result = runner.invoke(app, ["fold", str(config), "--out", str(tmp_path / "o"), "--json"])
    summary = json.loads(result.stdout)
    assert summary["exact_region"] == [[1, 9], [1, 9]]
    assert summary["certificate"]["outside_max_abs_diff"] > 0


def test_bad_config_exits_2_with_one_line(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("input_shape: [8, 8, 1]\nlayers:\n  - conv: {kernal_size: 3}\n")
    result = subprocess.run([sys.executable, "-m", "jfactor", "fold", str(config), "--out", str(tmp_path / "o")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "error:" in result.stderr and "did you mean 'kernel_size'" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_bad_memory_budget_variable_is_named_as_the_environments_fault(tmp_path, monkeypatch):
    # before: a factorize call reported it as "command line: target: JFACTOR_MEMORY_BUDGET_GB=..."
    for value, message in (("abc", "expected a number of gigabytes"), ("-1", "must be > 0")):
        monkeypatch.setenv("JFACTOR_MEMORY_BUDGET_GB", value)
        stack = ROOT / "configs" / "seed" / "section4_avgpool.yaml"
        for command in (["factorize", "--family", "gaussian", "--size", "7", "--chain", "3,5", "--restarts", "2",
                         "--out", str(tmp_path / "f")],
                        ["fold", str(stack), "--out", str(tmp_path / "o")]):
            result = runner.invoke(app, command)
            assert result.exit_code == 2
            assert result.output.strip() == f"error: JFACTOR_MEMORY_BUDGET_GB='{value}': {message}", result.output
        helped = subprocess.run([sys.executable, "-m", "jfactor", "fold", "--help"], capture_output=True, text=True)
        assert helped.returncode == 0 and "Usage" in helped.stdout  # help is still there to read
    assert not (tmp_path / "f").exists() and not (tmp_path / "o").exists()


def test_unwritable_output_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    config = ROOT / "configs" / "seed" / "section4_avgpool.yaml"
    for out, message in ((blocker / "sub", "file: is a file, so the output directory"),
                         (blocker, "file: is a file, not an output directory")):
        for command in (["fold", str(config)], ["factorize", "--family", "gaussian", "--size", "5", "--chain", "3,3"]):
            result = runner.invoke(app, [*command, "--out", str(out)])  # one message for every command
            assert result.exit_code == 2 and message in result.output, result.output
            assert blocker.read_text() == "x"


def test_factorize_writes_the_contract_files(tmp_path):
    from jfactor import kernels

    np.save(tmp_path / "t.npy", kernels.gaussian(9))
    out = tmp_path / "out"
    result = runner.invoke(app, ["factorize", "--target", str(tmp_path / "t.npy"), "--chain", "3,3,5",
                                 "--restarts", "2", "--optimizer", "none", "--refine-steps", "50",
                                 "--baselines", "svd,als", "--out", str(out), "--json", "--plots"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed == json.loads((out / "result.json").read_text())
    for key in ("rel_error", "max_abs_error", "psnr_db", "spectral_error", "params", "macs", "time_s", "baselines"):
        assert key in printed
    assert set(printed["baselines"]) == {"svd", "als"}
    assert all({"rel_error", "time_s"} <= set(v) for v in printed["baselines"].values())
    assert printed["rel_error"] < 1e-10
    approx = np.load(out / "approx.npy")
    assert approx.shape == (9, 9)  # the target's own layout
    factors = np.load(out / "factors.npz")
    assert [factors[f"layer{i}"].shape for i in range(3)] == [(3, 3, 1, 1), (3, 3, 1, 1), (5, 5, 1, 1)]
    for name in ("kernels.png", "spectrum.png", "loss.png", "search.png"):
        assert (out / name).exists()
    # the same --out again without pictures: none of the first result's stays beside the second
    again = runner.invoke(app, ["factorize", "--target", str(tmp_path / "t.npy"), "--chain", "3,3,5",
                                "--restarts", "2", "--optimizer", "none", "--refine-steps", "5", "--baselines", "svd",
                                "--out", str(out), "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads((out / "result.json").read_text())["baselines"].keys() == {"svd"}
    assert not any((out / name).exists() for name in ("kernels.png", "spectrum.png", "loss.png", "search.png"))


def test_a_chain_wider_than_its_target_writes_its_whole_folded_kernel_and_errors_over_it(tmp_path):
    # before: approx.npy was cropped to the target (not the convolution that replaces the chain,
    # and a lower error than reported), and psnr_db averaged over the chain's wider extent
    from scipy.signal import convolve

    target = np.random.default_rng(3).standard_normal((7, 7))
    np.save(tmp_path / "t.npy", target)
    out = tmp_path / "out"
    result = runner.invoke(app, ["factorize", "--target", str(tmp_path / "t.npy"), "--chain", "5,5", "--restarts",
                                 "2", "--optimizer", "none", "--refine-steps", "20", "--baselines", "svd",
                                 "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    approx, factors = np.load(out / "approx.npy"), np.load(out / "factors.npz")
    composed = convolve(factors["layer0"][..., 0, 0], factors["layer1"][..., 0, 0])  # scipy's full convolution
    np.testing.assert_allclose(approx, composed, rtol=1e-12, atol=1e-14)
    assert approx.shape == (9, 9) and printed["target"]["padding"] == [[1, 1], [1, 1]]
    padded = np.pad(target, printed["target"]["padding"])
    error = np.sum((approx - padded) ** 2)
    assert printed["rel_error"] == pytest.approx(np.sqrt(error) / np.linalg.norm(target), rel=1e-9)
    assert np.sum((approx - padded)[1:-1, 1:-1] ** 2) < 0.999 * error  # the taps outside the target count
    assert printed["psnr_db"] == pytest.approx(10 * np.log10(np.abs(target).max() ** 2 / (error / target.size)),
                                               rel=1e-9)


def test_factorize_table_and_errors(tmp_path):
    result = runner.invoke(app, ["factorize", "--family", "log", "--size", "7", "--chain", "3,5", "--restarts", "2",
                                 "--optimizer", "none", "--refine-steps", "20", "--baselines", "svd",
                                 "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert "jfactor" in result.output and "svd" in result.output
    bad = runner.invoke(app, ["factorize", "--family", "log", "--size", "7", "--chain", "3,3"])
    assert bad.exit_code == 2 and "covers 5x5 but the target is 7x7" in bad.output
    none = runner.invoke(app, ["factorize", "--chain", "3,3"])
    assert none.exit_code == 2 and "give one target" in none.output
    stray = runner.invoke(app, ["factorize", "--target", str(tmp_path / "t.npy"), "--size", "5", "--chain", "3"])
    assert stray.exit_code == 2 and "--size and --param describe a --family target" in stray.output


def test_a_target_of_four_spatial_dims_is_refused_before_any_search(tmp_path):
    # before: a (3, 3, 3, 3, 1, 1) file ran its search, then failed with a traceback in the output
    # metric, and a 4-D family kernel (9, 9, 9, 9) was read as a 2-D one with 9 channels in and out
    np.save(tmp_path / "d4.npy", np.ones((3, 3, 3, 3, 1, 1)))
    outcomes = [runner.invoke(app, ["factorize", "--target", str(tmp_path / "d4.npy"), "--chain", "3", "--json",
                                    "--out", str(tmp_path / "o")]),
                runner.invoke(app, ["factorize", "--family", "gaussian", "--size", "9", "--param", "ndim=4",
                                    "--chain", "3,3,3,3", "--restarts", "2", "--out", str(tmp_path / "o")])]
    for result, message in zip(outcomes, ["has 4 spatial dims; jfactor factorizes kernels of 1 to 3",
                                          "ndim must be 1, 2 or 3, got 4"]):
        assert result.exit_code == 2, result.output
        assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "o").exists()


def test_search_prints_the_front(tmp_path):
    result = runner.invoke(app, ["search", "--family", "gaussian", "--size", "7", "--sizes", "3,5", "--layers", "2",
                                 "--restarts", "2", "--optimizer", "none", "--refine-steps", "30", "--budget", "1e-8",
                                 "--out", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    front = [c for c in summary["candidates"] if c["on_front"]]
    assert front and all(c["rel_error"] < 1e-8 for c in front[:1])
    assert summary["cheapest_under_budget"]["macs"] == min(c["macs"] for c in front if c["rel_error"] <= 1e-8)
    assert (tmp_path / "pareto.png").exists()


def test_search_prints_each_chains_warning_on_the_terminal(tmp_path):
    """Two restarts per chain of a target no chain fits exactly: each chain's evidence warns, and
    the terminal says so under the table, as factorize and run do."""
    result = runner.invoke(app, ["search", "--family", "log", "--size", "5", "--sizes", "3", "--layers", "2",
                                 "--restarts", "2", "--optimizer", "none", "--refine-steps", "30", "--seed", "1",
                                 "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    warned = [c for c in json.loads((tmp_path / "front.json").read_text())["candidates"] if c["evidence"]["warning"]]
    assert warned
    text = " ".join(result.output.split())  # rich wraps long lines
    for c in warned:
        assert f"warning ({c['chain']}): likely not the global optimum" in text


def test_progress_shows_on_a_terminal_on_stderr_and_leaves_pipes_alone(capsys, monkeypatch):
    with ProgressBar(True, 2, "working") as bar:
        bar.advance(2)
    # not a terminal: nothing at all (a transient bar had left a blank line in pipes and logs)
    assert bar.bar is None and capsys.readouterr() == ("", "")
    with ProgressBar(False, 2, "working") as bar:
        bar.advance(2)
    assert capsys.readouterr() == ("", "")
    monkeypatch.setenv("FORCE_COLOR", "1")  # CI systems set it; rich then calls any stream a terminal
    with ProgressBar(True, 2, "working") as bar:
        bar.advance(2)
    assert bar.bar is None and capsys.readouterr() == ("", "")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    with ProgressBar(True, 2, "working") as bar:
        bar.advance(2)
    assert bar.bar is not None and bar.bar.console.stderr
    assert capsys.readouterr().out == ""  # on stderr: stdout holds only results


def test_ctrl_c_in_run_keeps_the_finished_chains_and_says_where(tmp_path, monkeypatch):
    import jfactor.experiment.run as experiment_run

    def one_chain_then_ctrl_c(plan, directory, progress):
        (directory / "chain0_factors.npz").write_bytes(b"finished")
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment_run, "execute", one_chain_then_ctrl_c)
    result = runner.invoke(app, ["run", "--runs-dir", str(tmp_path / "runs"), "--quiet"])
    assert result.exit_code == 130
    kept = next((tmp_path / "runs").iterdir())
    assert (kept / "chain0_factors.npz").read_bytes() == b"finished" and not (kept / "results.json").exists()
    assert f"interrupted: {kept} keeps what finished" in result.output


def test_set_reaches_the_objective_keys_the_flags_leave_open(tmp_path):
    result = runner.invoke(app, ["factorize", "--family", "log", "--size", "5", "--chain", "3,3", "--restarts", "2",
                                 "--optimizer", "none", "--refine-steps", "5", "--baselines", "svd",
                                 "--objective", "images", "--set", "objective.crops=1",
                                 "--set", "objective.image_size=24", "--out", str(tmp_path / "o"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["objective"] == "images"


def test_every_factorize_flag_that_describes_the_factorization_has_its_config_key():
    """The flags a config file or ``--set`` may clash with (``cli.FLAG_KEYS``) are all of
    ``jfactor factorize``'s flags but those about its output; a new flag must be added there."""
    import inspect

    from jfactor import cli

    output = {"ctx", "config", "out", "set_", "as_json", "plots"}
    assert set(inspect.signature(cli.factorize).parameters) - output == set(cli.FLAG_KEYS)
    # and each key is where the flags write it
    common = dict(chain="3,5", dilations="1,2", strides="1,1", channels=2, dtype="float64", restarts=4, budget_s=1.0,
                  objective="kernel", optimizer="none", steps=5, refine="lm", refine_steps=9, init="auto",
                  baselines="svd", seed=3)
    raws = [cli._factorize_config(**sources, **common) for sources in (
        dict(target=None, family="log", size=7, params=["sigma=1.5"], stack=None),
        dict(target=Path("t.npy"), family=None, size=None, params=[], stack=None),
        dict(target=None, family=None, size=None, params=[], stack=Path("s.yaml")))]

    def found(raw, path):
        for part in path.split("."):
            if not isinstance(raw, dict) or part not in raw:
                return False
            raw = raw[part]
        return raw is not None

    for name, key in cli.FLAG_KEYS.items():
        assert any(found(raw, key) for raw in raws), (name, key)


def test_an_empty_directory_option_is_refused_not_read_as_the_current_directory(tmp_path, monkeypatch):
    """``--out ""`` (an unset shell variable) would write into the current directory, over any results
    there; ``--compile-cache ""`` would keep compiled code there, ``--runs-dir ""`` runs.  Each is
    refused, naming the option."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "result.json").write_text("{}")
    config = str(ROOT / "configs" / "seed" / "section4_avgpool.yaml")
    quickstart = str(ROOT / "configs" / "quickstart.yaml")
    for args in (["fold", config, "--out", ""], ["factorize", "--family", "gaussian", "--size", "5", "--chain", "3,3",
                                                "--out", " "], ["--compile-cache", "", "fold", config],
                 ["run", quickstart, "--runs-dir", ""], ["sweep", quickstart, "--runs-dir", ""]):
        result = runner.invoke(app, args)
        option = next(a for a in args if a in ("--out", "--compile-cache", "--runs-dir"))
        assert result.exit_code == 2 and option in result.output and "an empty path" in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]
    assert (tmp_path / "result.json").read_text() == "{}"
    result = runner.invoke(app, ["fold", config, "--out", ".", "--json"])  # the current directory, said plainly
    assert result.exit_code == 0 and (tmp_path / "summary.json").exists()
    # the options' defaults go through the same check (typer hands them over as Paths): a missing config is
    # the error, not the default runs directory
    for command in ("run", "sweep"):
        result = runner.invoke(app, [command, str(tmp_path / "missing.yaml")])
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
        assert "missing.yaml" in result.output


@pytest.mark.parametrize("args, named", [
    (["factorize", "--family", "gaussian", "--size", "5", "--size", "7", "--chain", "3,3"], "--size 5, --size 7"),
    (["factorize", "--family=gaussian", "--size", "5", "--chain", "3,3", "--chain=5"], "--chain 3,3, --chain=5"),
    (["factorize", "--family", "gaussian", "--size", "5", "--chain", "3,3", "--plots", "--no-plots"],
     "--plots, --no-plots"),
    (["--no-compile-cache", "--compile-cache-on", "fold", "x.yaml"], "--no-compile-cache, --compile-cache-on"),
    (["fold", "x.yaml", "--out", "a", "--json", "--out", "b"], "--out a, --out b"),
])
def test_an_option_given_twice_is_refused_naming_both(args, named, capsys, tmp_path, monkeypatch):
    """typer keeps the last of an option given twice: the command ran gaussian7 from --size 5 --size 7."""
    from jfactor.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    assert capsys.readouterr().err == f"error: {named}: one option given 2 times; give it once\n"
    assert not list(tmp_path.iterdir())


def test_options_that_may_repeat_and_a_repeated_value_are_not_refused():
    from jfactor.cli import repeated_options

    assert repeated_options(["factorize", "--family", "gaussian", "--param", "sigma=1", "--param", "truncate=3",
                             "--set", "restarts=4", "--set", "seed=1", "--size", "5", "--chain", "3,3"]) == []
    assert repeated_options(["fold", "--out", "--out"]) == []  # "--out" the value of --out: typer's to judge
    assert repeated_options(["fold", "x.yaml", "--", "--out", "a", "--out", "b"]) == []  # after --: positional


@pytest.mark.parametrize("command", [[sys.executable, "-m", "jfactor"], [str(Path(sys.executable).parent / "jfactor")]])
def test_the_jfactor_command_refuses_an_option_given_twice(command):
    """Both ways in (the installed script is pyproject's [project.scripts] entry) go through cli.main."""
    done = subprocess.run([*command, "factorize", "--family", "box", "--size", "5", "--family", "gaussian",
                           "--chain", "3,3"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr == "error: --family box, --family gaussian: one option given 2 times; give it once\n"
    helped = subprocess.run([*command, "factorize", "--size", "5", "--size", "7", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert helped.returncode == 0 and "--target" in helped.stdout  # help is help, whatever else is given


def test_sigterm_ends_a_run_as_ctrl_c_does(tmp_path):
    """``kill``, a batch scheduler or ``timeout`` send SIGTERM: before, the process died on the spot and
    left its run directory holding config.yaml alone; now nothing had finished, so nothing is kept."""
    import signal
    import time

    config = tmp_path / "long.yaml"
    config.write_text("target: {family: log, size: 31}\nchain: {sizes: [3, 5, 9, 17]}\nrestarts: 256\n")
    runs = tmp_path / "runs"
    process = subprocess.Popen([sys.executable, "-m", "jfactor", "run", str(config), "--runs-dir", str(runs),
                                "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (started := list(runs.glob("*/config.yaml"))):
        time.sleep(0.01)
    for _ in range(12):  # a signal that lands in jax's garbage-collection callback is lost (as Ctrl-C can be)
        process.send_signal(signal.SIGTERM)
        try:
            _, stderr = process.communicate(timeout=10)
            break
        except subprocess.TimeoutExpired:
            continue
    else:
        process.kill()
        _, stderr = process.communicate()
    assert started and process.returncode == 130, stderr[-2000:]
    assert "interrupted: nothing had finished; no run directory kept" in stderr
    assert not runs.exists()  # the run directory went, and the runs folder it had made


def test_main_runs_from_another_thread_without_its_sigterm_handler():
    """Only the main thread may set signal handlers (``signal.signal`` raises ValueError elsewhere)."""
    import threading

    from jfactor.cli import main

    codes = []

    def run():
        try:
            main(["--version"])
        except SystemExit as exc:
            codes.append(exc.code)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=60)
    assert codes == [0]
