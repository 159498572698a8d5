"""Output directories that are never overwritten, and files written atomically."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from jfactor.errors import ConfigError


SLUG_LENGTH = 100  # characters of a name kept in a directory name (file systems take 255 bytes)


def slug(name: str) -> str:
    """``name`` as one safe path component: runs of other characters than letters, digits, ``_``,
    ``.`` and ``-`` (a ``/``, a NUL byte) become one ``-``, and only the first :data:`SLUG_LENGTH`
    characters are kept; ``run`` where nothing but dots is left."""
    text = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")[:SLUG_LENGTH]
    return text if text.strip(".") else "run"


def writable_dir(path) -> Path:
    """Create ``path`` (and parents); a clear :class:`ConfigError` if that is impossible."""
    path = check_writable(path)  # the messages every command gives (a file in the way, say)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as exc:
        raise ConfigError(f"{path}: output directory is not writable: {exc.strerror or exc}") from None
    return path


def check_writable(path) -> Path:
    """Fail early, creating nothing, if ``path`` could not be created or written."""
    path = Path(path)
    existing = next(p for p in [path, *path.parents] if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise ConfigError(f"{existing}: is a file, so the output directory {path} cannot be made"
                          if existing != path else f"{path}: is a file, not an output directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{existing}: output directory is not writable")
    return path


def _first_missing(path: Path) -> Path | None:
    """The outermost directory of ``path`` that does not exist yet (None if ``path`` exists)."""
    missing = None
    for candidate in [path, *path.parents]:
        if candidate.exists():
            break
        missing = candidate
    return missing


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a command whose output directory already held finished work: ``directory``
    (kept, see :func:`output_dir`)."""

    def __init__(self, directory: Path):
        super().__init__(str(directory))
        self.directory = directory


@contextlib.contextmanager
def output_dir(out, root, name: str, *, finished: Callable[[Path], bool] | None = None):
    """``out`` (created if needed) or a fresh run directory under ``root``, removed again if the
    block fails: a failed command leaves no empty or half-written directory it created (parents
    it created go too, while empty).  An ``out`` that existed before is kept as it was (files
    are only written after the work is done).  Where ``finished(directory)`` says it holds
    finished work, Ctrl-C in the block keeps the directory and raises :class:`Interrupted` with it.
    """
    created = _first_missing(Path(out) if out else Path(root))
    directory = writable_dir(out) if out else new_run_dir(root, name)
    try:
        yield directory
    except KeyboardInterrupt:
        if finished is not None and finished(directory):
            raise Interrupted(directory) from None
        _remove_created(directory, out, created)
        raise
    except BaseException:
        _remove_created(directory, out, created)
        raise


@contextlib.contextmanager
def staged(directory: Path, replaces: Iterable[str] = ()):
    """A hidden folder in ``directory`` for a command's files: when the block ends well they move
    into ``directory`` (one rename each, after every file is written), and the files named in
    ``replaces`` that the block did not write (an earlier result's pictures) are removed from it;
    otherwise they are dropped.  Ctrl-C or an error while the files are made (pictures take
    seconds) leaves ``directory`` as it was, never half an earlier result and half a new one."""
    staging = Path(tempfile.mkdtemp(dir=directory, prefix=".staging-"))
    try:
        yield staging
        written = sorted(path.name for path in staging.iterdir())
        blocked = [name for name in written if (directory / name).is_dir()]
        if blocked:  # checked before any file moves: a rename failing half-way would mix two results
            raise ConfigError(f"{directory / blocked[0]}: is a folder, where this command writes a file")
        for name in written:
            os.replace(staging / name, directory / name)
        for name in set(replaces) - set(written):
            (directory / name).unlink(missing_ok=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _remove_created(directory: Path, out, created: Path | None) -> None:
    """Remove ``directory`` and the parents :func:`output_dir` made (``created``: the outermost),
    while empty; an ``out`` that existed before stays."""
    if out is not None and created is None:
        return
    shutil.rmtree(directory, ignore_errors=True)
    for parent in directory.parents:  # the parents this call made, where nothing else has appeared
        if created is None or created not in (parent, *parent.parents):
            break
        try:
            parent.rmdir()
        except OSError:
            break


def new_run_dir(root, name: str) -> Path:
    """A fresh ``root/<YYYYmmdd-HHMMSS>-<name>[-k]`` directory; existing ones are never reused."""
    root = writable_dir(root)
    stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{slug(name)}"
    for k in range(1, 10_000):
        path = root / (stem if k == 1 else f"{stem}-{k}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise ConfigError(f"{root}: cannot find a free run directory name for {stem}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_with(path: Path, write) -> Path:
    """Write ``path`` atomically with ``write(handle)`` (temp file in the same directory + rename).

    The file gets the mode a plain ``open`` would give it (0666 less the umask), not
    ``mkstemp``'s private 0600.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temp file + rename)."""
    return write_with(path, lambda h: h.write(text.encode()))


def dumps(data) -> str:
    """JSON text of results (numpy scalars and arrays become numbers and lists)."""
    return json.dumps(data, indent=2, default=_json_default)


def write_json(path, data) -> Path:
    return write_text(path, dumps(data) + "\n")


def write_npy(path, array) -> Path:
    return write_with(path, lambda h: np.save(h, np.asarray(array), allow_pickle=False))


def write_npz(path, **arrays) -> Path:
    return write_with(path, lambda h: np.savez(h, **{k: np.asarray(v) for k, v in arrays.items()}))


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, (np.ndarray,)):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
