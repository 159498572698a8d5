"""XLA's persistent compilation cache: compiled code kept on disk across processes.

Every ``jfactor`` command turns it on (:func:`configure`): a second run of the same
geometry loads its compiled code instead of compiling again.  The directory is
``$JFACTOR_COMPILE_CACHE`` if set (``off`` disables the cache), else
``$XDG_CACHE_HOME/jfactor/xla`` (``~/.cache/jfactor/xla``); the commands' ``--compile-cache
DIR`` and ``--no-compile-cache`` override both.  In Python, call
:func:`enable_compilation_cache` yourself.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache

ENV = "JFACTOR_COMPILE_CACHE"
OFF = ("off", "0", "false", "no", "")
# tracing, lowering and XLA compilation (or loading from the cache): the first call of a geometry pays them
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
_stats = {"seconds": 0.0, "programs": 0, "cache_hits": 0}


def _on_duration(event: str, duration: float, **_) -> None:
    if event in COMPILE_EVENTS:
        _stats["seconds"] += duration
    if event == COMPILE_EVENTS[-1]:
        _stats["programs"] += 1


def _on_event(event: str, **_) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _stats["cache_hits"] += 1


jax.monitoring.register_event_duration_secs_listener(_on_duration)
jax.monitoring.register_event_listener(_on_event)


def compile_stats() -> dict:
    """Totals so far in this process: ``seconds`` spent tracing, lowering and compiling,
    ``programs`` made executable, ``cache_hits`` of them loaded from the persistent cache
    (so ``programs - cache_hits`` were compiled by XLA)."""
    return dict(_stats)


def enable_compilation_cache(path, *, min_compile_time_s: float = 0.0) -> Path:
    """Keep compiled code on disk under ``path`` (jax's persistent compilation cache).

    Sets ``jax_compilation_cache_dir`` and ``jax_persistent_cache_min_compile_time_secs``
    (default 0: cache everything, most programs here compile in about a second); a later
    process with the same jax, backend and shapes loads instead of compiling.  Returns the
    directory (created private to the user).  Anyone who can write there can run code in
    your process: keep it private.
    """
    path = Path(path).expanduser().resolve()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if jax.config.jax_compilation_cache_dir not in (None, str(path)):
        compilation_cache.reset_cache()  # jax opened another directory already
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
    return path


def default_directory() -> Path | None:
    """Where the commands cache compiled code, from the environment; None when switched off."""
    if ENV in os.environ:
        value = os.environ[ENV].strip()
        return None if value.lower() in OFF else Path(value)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jfactor" / "xla"


def configure(path: Path | None, enabled: bool = True) -> Path | None:
    """Turn the cache on for a command: ``path`` if given, else :func:`default_directory`;
    nothing when ``enabled`` is False.  Returns the directory in use (None: off)."""
    directory = path if path is not None else default_directory()
    if not enabled or directory is None:
        return None
    return enable_compilation_cache(directory)
