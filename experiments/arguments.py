"""argparse types for the experiments' flags: bad values fail at parsing, one line, before any compute.

    parser.add_argument("--out", type=arguments.output_file)
    parser.add_argument("--n", type=arguments.positive_int)

(:func:`kept_json` for a results file a script reads back before it adds to it.)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jfactor import rundir
from jfactor._checks import given_path
from jfactor.errors import ConfigError


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be a positive integer")
    return value


def positive_ints(text: str) -> list[int]:
    """A comma-separated list of integers >= 1."""
    return [positive_int(part.strip()) for part in text.split(",")]


def output_dir(text: str) -> Path:
    """A directory that exists and is writable, or can be made; not an empty path (an unset
    shell variable would otherwise mean the current directory)."""
    try:
        return rundir.check_writable(given_path(text))
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def output_file(text: str) -> Path:
    """A file path whose directory is writable (or can be made); not a directory itself."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path}: is a directory; give a file path")
    output_dir(str(path.parent))
    return path


def kept_json(text: str) -> Path:
    """:func:`output_file` whose results, where it exists, are read back: it must hold a JSON object."""
    path = output_file(text)
    if path.exists():
        try:
            kept = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise argparse.ArgumentTypeError(f"{path}: holds earlier results that are not JSON ({exc}); move it "
                                             "or give another path") from None
        if not isinstance(kept, dict):
            raise argparse.ArgumentTypeError(f"{path}: holds earlier results that are not a JSON object")
    return path
