"""XLA's persistent compilation cache: compiled code kept on disk across processes.

Every ``jfactor`` command turns it on (:func:`configure`): a second run of the same
geometry loads its compiled code instead of compiling again, and the traced programs of
the functions wrapped in :func:`cached_jit` (``programs/`` beside the compiled code), so it
does not trace them again either.  The directory is
``$JFACTOR_COMPILE_CACHE`` if set (``off`` disables the cache), else
``$XDG_CACHE_HOME/jfactor/xla`` (``~/.cache/jfactor/xla``); the commands' ``--compile-cache
DIR`` and ``--no-compile-cache`` override both.  In Python, call
:func:`enable_compilation_cache` yourself.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import inspect
import os
import pickle
import shutil
from pathlib import Path

import jax
import numpy as np
from jax.experimental.compilation_cache import compilation_cache

from jfactor.errors import ConfigError
from jfactor.rundir import write_with

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
    process with the same jax, backend and shapes loads instead of compiling, and the
    programs of :func:`cached_jit` are kept in ``programs/`` under it.  Returns the
    directory (created private to the user).  Anyone who can write there can run code in
    your process: keep it private.
    """
    path = Path(path).expanduser().resolve()
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:  # a file in the way, no permission
        raise ConfigError(f"compile cache {path}: cannot make the directory ({exc.strerror}); give another path "
                          f"(--compile-cache or {ENV}) or switch it off ({ENV}=off)") from None
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


# jaxlib before this runs a deserialized program that calls LAPACK (LM's LU solve) with null
# kernel pointers and crashes (jax-ml/jax#29610, fixed by jax-ml/jax#33522, Nov 2025); 0.10 is
# the oldest release the kept programs were verified on (0.8.1 crashes)
KEEPS_FROM = (0, 10)


def beside(name: str) -> Path | None:
    """The folder ``name`` beside the compiled code of the compile cache in use (None: no cache)."""
    root = jax.config.jax_compilation_cache_dir
    return None if root is None else Path(root) / name


RELEASE_DIGITS = 16  # of the release digest, naming its folder of kept programs
KEPT_RELEASES = 2  # folders of kept programs left after pruning: this release's and the newest other


def runs_programs_read_back() -> bool:
    """Whether this jaxlib runs programs read back from disk safely (:data:`KEEPS_FROM` or newer)."""
    return _jaxlib_version() >= KEEPS_FROM


def programs_directory() -> Path | None:
    """``programs/<release>/`` beside the compile cache in use, one folder per :func:`_release`
    (None: no cache, or a jaxlib older than :data:`KEEPS_FROM`, so nothing is kept)."""
    root = beside("programs") if runs_programs_read_back() else None
    return None if root is None else root / _release()[:RELEASE_DIGITS]


def prune_releases(directory: Path, keep: int = KEPT_RELEASES) -> list[Path]:
    """Remove the folders of kept programs beside ``directory`` (this release's) but the
    ``keep - 1`` most recently modified others, and programs kept directly in their parent by
    versions before folders: an edit or an upgrade makes a release's programs stale for good, and
    the newest other stays so that switching between two versions does not trace again.  Only
    folders named by a release digest are touched.  Returns what it removed."""
    others = [path for path in directory.parent.iterdir() if path != directory and path.is_dir()
              and len(path.name) == RELEASE_DIGITS and all(c in "0123456789abcdef" for c in path.name)]
    others.sort(key=lambda path: path.stat().st_mtime, reverse=True)
    stale = others[keep - 1:] + sorted(directory.parent.glob("*.pickle"))
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale


@functools.lru_cache(maxsize=1)
def _jaxlib_version() -> tuple[int, ...]:
    return tuple(int(part) for part in importlib.metadata.version("jaxlib").split(".")[:2])


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """sha256 (hex) of this package's Python files on disk, read at the first call of the
    process: any edit, even of a comment, changes it."""
    digest = hashlib.sha256()
    root = Path(__file__).parent
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def _release() -> str:
    """What a kept program depends on besides its arguments: the versions of jax, jaxlib
    and optax and the source of this package (any edit makes the kept programs stale)."""
    versions = "".join(f"{name}=={importlib.metadata.version(name)};" for name in ("jax", "jaxlib", "optax"))
    return hashlib.sha256(versions.encode() + source_digest().encode()).hexdigest()


def _spec(leaf) -> jax.ShapeDtypeStruct | None:
    """The abstract value of an argument a kept program can take: a numpy array or a
    concrete array on one device (None for tracers, sharded arrays and Python scalars)."""
    if isinstance(leaf, np.ndarray):
        return jax.ShapeDtypeStruct(leaf.shape, jax.dtypes.canonicalize_dtype(leaf.dtype))
    if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer) and len(leaf.sharding.device_set) == 1:
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, weak_type=leaf.weak_type)
    return None


def _export(jitted, name: str, static: dict, tree, specs: list):
    """Trace ``jitted`` (named ``name``) once for these arguments; returns (exported program,
    output tree)."""
    out_tree = []

    def flat(*leaves):
        out = jitted(**static, **jax.tree.unflatten(tree, leaves))
        out_tree.append(jax.tree.structure(out))
        return jax.tree.leaves(out)

    flat.__name__ = flat.__qualname__ = name
    return jax.export.export(jax.jit(flat))(*specs), out_tree[0]


def _program(jitted, name: str, static: dict, tree, specs: list, directory: Path):
    """A callable ``(*leaves) -> (output leaves, output tree)`` for one signature: loaded from
    ``directory`` if kept there, else traced (and kept); None when it cannot be exported."""
    shapes = [(spec.shape, str(spec.dtype), spec.weak_type) for spec in specs]
    key = hashlib.sha256(repr((name, sorted(static.items()), str(tree), shapes, jax.default_backend(),
                               _release())).encode()).hexdigest()
    short = name.rsplit(".", 1)[-1]
    path = directory / f"{short}-{key}.pickle"
    try:
        serialized, out_tree = pickle.loads(path.read_bytes())
        exported = jax.export.deserialize(bytearray(serialized))
    except Exception:  # absent, damaged or unreadable: trace it again (it is only a cache)
        try:
            exported, out_tree = _export(jitted, short, static, tree, specs)
        except Exception:  # not exportable (a callback, an unstable custom call): plain jit
            return None
        try:
            kept = pickle.dumps((bytes(exported.serialize()), out_tree))
            fresh = not directory.exists()
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_with(path, lambda handle: handle.write(kept))
            if fresh:  # this release's first program: the stale ones go
                prune_releases(directory)
        except Exception:  # unwritable, or serialization fails: kept in this process only
            pass
    call = jax.jit(exported.call)
    return lambda *leaves: (call(*leaves), out_tree)


def cached_jit(fn=None, *, static_argnames: tuple[str, ...] = ()):
    """``jax.jit(fn, static_argnames=...)`` whose traced programs are kept on disk.

    With a compile cache on (:func:`programs_directory`), each signature (static values,
    argument tree, shapes and dtypes) is traced once with :mod:`jax.export` and kept, so a
    later process loads it instead of tracing again (the L-BFGS segment of a factorization
    takes ~1.5 s to trace, longer than it runs).  Calls it cannot keep (no cache, tracers,
    sharded arrays, Python scalars, programs jax cannot export) go to the plain jit.
    Results are the same either way: the kept program is the one the jit would run.
    """
    if fn is None:
        return functools.partial(cached_jit, static_argnames=static_argnames)
    jitted = jax.jit(fn, static_argnames=static_argnames)
    signature = inspect.signature(fn)
    name = f"{fn.__module__}.{fn.__qualname__}"
    programs: dict = {}

    @functools.wraps(fn)
    def call(*args, **kwargs):
        directory = programs_directory()
        if directory is None:
            return jitted(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        static = {k: v for k, v in bound.arguments.items() if k in static_argnames}
        leaves, tree = jax.tree.flatten({k: v for k, v in bound.arguments.items() if k not in static_argnames})
        specs = [_spec(leaf) for leaf in leaves]
        if any(spec is None for spec in specs):
            return jitted(*args, **kwargs)
        lookup = (tuple(static.items()), tree, tuple(specs), directory)
        if lookup not in programs:
            programs[lookup] = _program(jitted, name, static, tree, specs, directory)
        if programs[lookup] is None:
            return jitted(*args, **kwargs)
        out, out_tree = programs[lookup](*leaves)
        return jax.tree.unflatten(out_tree, out)

    return call
