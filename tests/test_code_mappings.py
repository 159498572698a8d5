"""Compiled programs dropped before a process runs out of memory mappings (XLA's compiler
segfaults where an mmap fails)."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jfactor import code_mappings
from jfactor.factorize import Chain, factorize

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux)")


def _programs(count: int) -> list:
    """``count`` distinct jitted programs, each compiled once."""
    programs = [jax.jit(lambda x, i=i: jnp.sin(x) * i + jnp.cos(x * i)) for i in range(count)]
    for i, program in enumerate(programs):
        program(jnp.ones(i + 1))
    return programs


@linux
def test_dropping_compiled_programs_gives_their_mappings_back():
    before, limit = code_mappings.mappings()
    programs = _programs(30)
    held, _ = code_mappings.mappings()
    assert limit >= 1000 and held > before  # each program holds mappings of its own
    assert not code_mappings.drop_when_crowded(1.0, growth=0.0)  # below the threshold: kept
    assert all(program._cache_size() == 1 for program in programs)
    assert code_mappings.drop_when_crowded(0.0, growth=0.0)
    assert all(program._cache_size() == 0 for program in programs)
    assert code_mappings.mappings()[0] < held


def test_mappings_held_by_others_do_not_drop_the_programs_at_every_call(monkeypatch):
    """Mappings that a drop does not free (a memory-mapped dataset) keep the count above the threshold:
    the next drop waits until the count has grown again."""
    counts = iter([(40_000, 65_530), (39_000, 65_530), (40_000, 65_530), (46_000, 65_530), (45_000, 65_530)])
    monkeypatch.setattr(code_mappings, "mappings", lambda: next(counts))
    monkeypatch.setattr(code_mappings, "_held_after_drop", [0])
    assert code_mappings.drop_when_crowded()  # 40,000 held; 39,000 after the drop
    assert not code_mappings.drop_when_crowded()  # 40,000: not a tenth of the limit more
    assert code_mappings.drop_when_crowded()  # 46,000: 7,000 more


def test_where_proc_does_not_say_nothing_is_dropped(monkeypatch, tmp_path):
    monkeypatch.setattr(code_mappings, "MAPS_FILE", tmp_path / "absent")
    (program,) = _programs(1)
    assert code_mappings.mappings() is None
    assert not code_mappings.drop_when_crowded(0.0, growth=0.0)
    assert program._cache_size() == 1


@pytest.mark.parametrize("held, dropped", [(60_000, True), (1_000, False)])
def test_a_factorization_drops_compiled_programs_when_the_process_is_crowded(monkeypatch, held, dropped):
    """Before, a sweep or a chain search compiled every chain's programs into one process and never
    dropped them."""
    monkeypatch.setattr(code_mappings, "mappings", lambda: (held, 65_530))
    monkeypatch.setattr(code_mappings, "_held_after_drop", [0])
    (program,) = _programs(1)
    target = np.outer([1.0, 2.0, 1.0], [1.0, 2.0, 1.0])
    factorize(target, Chain.build([3]), restarts=1, baselines=())
    assert program._cache_size() == (0 if dropped else 1)
