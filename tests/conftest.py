import gc
import os
from pathlib import Path

import jax
import pytest
from hypothesis import HealthCheck, settings
from jax.experimental.compilation_cache import compilation_cache

import jfactor  # noqa: F401  (switches on float64 before any array is made)
from jfactor import cache

settings.register_profile(
    "default",
    max_examples=int(os.environ.get("JFACTOR_EXAMPLES", "15")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.load_profile("default")


_USER_CACHE = cache.default_directory()  # None: the user switched the compile cache off
_RESOLVED = None if _USER_CACHE is None else _USER_CACHE.expanduser().resolve()
_SUITE_CACHE = None if _RESOLVED is None else _RESOLVED.with_name(_RESOLVED.name + "-tests")


@pytest.fixture(autouse=True, scope="module")
def _compiled_code_dropped_before_mappings_run_out():
    """Every compiled XLA program holds memory mappings of its machine code until jax's caches drop
    it, and Linux allows a process 65,530 (``vm.max_map_count``): three test files left a process
    with 13,852, and a suite worker, some 490 tests in, crashed inside XLA's compiler (SIGSEGV in
    ``backend_compile_and_load``) in three of four fresh-clone suites.  Dropping jax's compiled
    caches after a test file once the worker holds half the limit keeps it well below."""
    yield
    try:
        limit = int(Path("/proc/sys/vm/max_map_count").read_text())
        held = sum(1 for _ in open("/proc/self/maps"))
    except OSError:  # not Linux
        return
    if held > limit // 2:
        jax.clear_caches()
        gc.collect()


@pytest.fixture(autouse=True)
def _own_compile_cache(monkeypatch):
    """Commands a test runs (in this process or a child) keep compiled code in a folder of this
    pytest-xdist worker's own beside the user's (``~/.cache/jfactor/xla-tests/<worker>``, kept from run
    to run), never in the user's, nor in one another worker writes to: two workers sharing the
    user's cache crashed one of them twice in four runs, reading a compiled program back (jax 0.10.2)."""
    if _SUITE_CACHE is not None:
        monkeypatch.setenv(cache.ENV, str(_SUITE_CACHE / os.environ.get("PYTEST_XDIST_WORKER", "main")))
    before = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
    yield
    # a command run in this process turned jax's persistent cache on for the worker: off again, so
    # that only the tests of commands read compiled programs back (jax 0.10.2 crashed a worker once
    # reading one back in the L-BFGS test that followed a command's test)
    if (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs) != before:
        jax.config.update("jax_compilation_cache_dir", before[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
        compilation_cache.reset_cache()
