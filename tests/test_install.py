"""What pip installs: version ranges, the pinned constraints, the oldest versions, ``jfactor --version``.

``test_the_oldest_versions_pass_the_core_tests`` (marker ``oldest``) builds a virtual
environment from ``constraints-oldest.txt`` with pip, which reaches PyPI, and runs a core
subset of the suite in it: the lower bounds of ``pyproject.toml`` are versions that work.
"""

import os
import platform
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import jax
import jaxlib
import pytest
from packaging.requirements import Requirement
from packaging.version import Version
from typer.testing import CliRunner

import jfactor

ROOT = Path(__file__).parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# One or a few tests per dependency: fold against the numpy reference and its gradients (jax), batched and
# sharded folds, flax nnx, the solver with its optax phase (L-BFGS and Adam) and scipy/skimage baselines, YAML configs
# (pydantic), the CLI (typer, rich, matplotlib) and --version.
CORE_TESTS = [
    "tests/test_fold.py::test_fold_and_canonical_form_equal_the_stack_on_the_exact_region",
    "tests/test_fold_conv.py",
    "tests/test_stack.py::test_batch_norm_and_residual_match_reference",
    "tests/test_batch.py::test_methods_agree_on_the_seed_section8_stack",
    "tests/test_batch.py::test_sharded_fold_equals_single_device_on_four_cpu_devices",
    "tests/test_nnx.py::test_round_trip_of_the_seed_section5_model_is_exact_everywhere",
    "tests/test_nnx.py::test_split_folds_each_linear_run_on_the_shape_reaching_it",
    "tests/test_nnx.py::test_to_nnx_stack_of_every_sequential_layer",
    "tests/test_factorize.py::test_the_seeds_known_factor_case_is_exact_and_wiener_is_not",
    "tests/test_factorize.py::test_batch_of_targets_in_one_call",
    "tests/test_multistart.py::test_the_first_order_carry_keeps_its_types_from_segment_to_segment",
    "tests/test_multistart.py::test_the_batched_lbfgs_phase_follows_optax_documented_loop_restart_by_restart",
    "tests/test_config.py::test_weights_from_npy_and_npz_relative_to_the_config",
    "tests/test_cli.py::test_factorize_writes_the_contract_files",
    "tests/test_install.py::test_version_option_prints_the_versions",
    "tests/test_sweep.py::test_a_running_cell_is_never_deleted_and_is_waited_for",
    # threadpoolctl's lower bound: the oldest that finds the oldest numpy's and scipy's OpenBLAS
    "tests/test_host_blas.py::test_a_factorization_runs_with_one_blas_thread",
    "tests/test_host_blas.py::test_scipys_blas_is_limited_too_where_scipy_linalg_was_not_imported_before",
]


def _pins(name: str) -> dict[str, Version]:
    pins = {}
    for line in (ROOT / name).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", f"{name}: {line} is not an exact pin"
            pins[requirement.name.lower().replace("_", "-")] = Version(spec.version)
    return pins


def _requirements() -> list[Requirement]:
    """The main and [test] requirements, the extras [test] names of jfactor itself expanded."""
    extras = PROJECT["optional-dependencies"]
    found = []
    for requirement in map(Requirement, PROJECT["dependencies"] + extras["test"]):
        found += ([Requirement(text) for extra in sorted(requirement.extras) for text in extras[extra]]
                  if requirement.name == "jfactor" else [requirement])
    return found


def test_every_dependency_has_its_oldest_tested_version_as_lower_bound_and_no_cap():
    oldest = _pins("constraints-oldest.txt")
    for requirement in _requirements():
        (spec,) = requirement.specifier
        assert spec.operator == ">=", f"{requirement}: a range from the oldest tested version, no cap"
        assert oldest[requirement.name.lower()] == Version(spec.version), requirement


def test_the_pinned_constraints_are_inside_the_ranges_and_installed_here():
    pinned = _pins("constraints.txt")
    assert PROJECT["requires-python"] == ">=3.11"
    for requirement in _requirements():
        assert pinned[requirement.name.lower()] in requirement.specifier, requirement
    assert pinned["jax"] == Version(jax.__version__) and pinned["jaxlib"] == Version(jaxlib.__version__)


def test_accelerator_extras_map_to_jax_extras():
    extras = PROJECT["optional-dependencies"]
    assert extras["cuda12"] == ["jax[cuda12]"] and extras["cuda13"] == ["jax[cuda13]"]


def test_version_option_prints_the_versions():
    from jfactor.cli import app

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == (f"jfactor {jfactor.__version__} (jax {jax.__version__}, jaxlib "
                                     f"{jaxlib.__version__}, Python {platform.python_version()})")


@pytest.mark.oldest
def test_the_oldest_versions_pass_the_core_tests(tmp_path):
    venv = tmp_path / "venv"
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints-oldest.txt"),
                              "-e", f"{ROOT}[test]"], capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stderr[-3000:]
    freeze = subprocess.run([str(python), "-m", "pip", "freeze", "--exclude-editable"], capture_output=True, text=True,
                            check=True).stdout
    installed = {Requirement(line).name.lower().replace("_", "-"): Version(re.split("==", line)[1])
                 for line in freeze.splitlines() if "==" in line}
    oldest = _pins("constraints-oldest.txt")
    assert {name: installed.get(name) for name in oldest} == oldest
    env = {**os.environ, "JFACTOR_EXAMPLES": "4", "JFACTOR_GRAD_EXAMPLES": "4", "JFACTOR_BATCH_EXAMPLES": "4"}
    tests = subprocess.run([str(python), "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *CORE_TESTS], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=1200)
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-2000:]
    assert re.search(r"\d+ passed", tests.stdout) and "failed" not in tests.stdout.splitlines()[-1]
