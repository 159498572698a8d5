import os
import shutil
from pathlib import Path

import jax
import pytest
from hypothesis import HealthCheck, settings
from jax.experimental.compilation_cache import compilation_cache

import jfactor  # noqa: F401  (switches on float64 before any array is made)
from jfactor import cache, code_mappings
from jfactor.errors import ConfigError

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
# the tests themselves keep compiled code too, except with a jaxlib that crashes running some programs
# it reads back (the oldest versions' job compiles every time)
_IN_PROCESS = _SUITE_CACHE is not None and cache.runs_programs_read_back()
_TESTS = Path(__file__).parent


def pytest_sessionstart(session):
    """The folders of compiled code of test files gone or renamed, and of the per-worker layout
    before, are removed (by the controller, or the one process without pytest-xdist)."""
    if _SUITE_CACHE is None or not _SUITE_CACHE.is_dir() or hasattr(session.config, "workerinput"):
        return
    files = {path.stem for path in _TESTS.glob("test_*.py")}
    for folder in _SUITE_CACHE.iterdir():
        if folder.is_dir() and folder.name.split("-")[0] not in files:
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(autouse=True, scope="module")
def _file_compile_cache(request):
    """This test file's folder of compiled code, ``~/.cache/jfactor/xla-tests/<file>``, kept from run
    to run: compiling is most of the suite's time (test_multistart.py and test_exact_hessian.py took
    172 s on two workers with an empty folder, 36 s with a full one).  One folder per file, as
    pytest-xdist runs each file on one worker (``--dist loadfile``, pyproject.toml), but not always on
    the same one; another ``--dist`` gets one per file and worker, so that no two workers write one
    folder.  An unwritable folder leaves the tests without one.

    After the file, a worker that holds half its limit of memory mappings drops jax's compiled
    programs (:mod:`jfactor.code_mappings`): a worker runs some 490 tests, and a process that had run
    three test files held 13,852 mappings; before this, a worker crashed inside XLA's compiler
    (SIGSEGV in ``backend_compile_and_load``) in three of four fresh-clone suites."""
    folder = None
    if _SUITE_CACHE is not None:
        name = request.module.__name__.rsplit(".", 1)[-1]
        if request.config.getoption("dist", "no") not in ("no", "loadfile"):
            name += "-" + os.environ.get("PYTEST_XDIST_WORKER", "main")
        folder = _SUITE_CACHE / name
    if _IN_PROCESS:
        try:
            cache.enable_compilation_cache(folder)
        except ConfigError:  # unwritable: the tests compile every time (the commands' tests will say why)
            pass
    yield folder
    code_mappings.drop_when_crowded()


@pytest.fixture(autouse=True)
def _own_compile_cache(monkeypatch, _file_compile_cache):
    """Commands a test runs (in this process or a child) keep compiled code in its file's folder,
    never in the user's: two workers sharing the user's cache crashed one of them twice in four runs
    reading a compiled program back (jax 0.10.2; perhaps the memory mappings above, not proven).  A
    test that moves jax's cache elsewhere (or a command that switches it on) is undone after it."""
    if _file_compile_cache is not None:
        monkeypatch.setenv(cache.ENV, str(_file_compile_cache))
    before = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
    yield
    if (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs) != before:
        jax.config.update("jax_compilation_cache_dir", before[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
        compilation_cache.reset_cache()
