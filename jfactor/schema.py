"""Config validation: strict pydantic models and errors that name file, key path and value.

Every config model derives from :class:`Strict`, which rejects unknown keys with the
nearest accepted key as a suggestion.  :func:`validate` turns pydantic's errors into one
:class:`ConfigError` whose lines read ``file: layers[2].conv.kernel_size: message (got ...)``.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from jfactor.errors import ConfigError


def suggest(key: str, accepted) -> str:
    """``; did you mean 'x'?`` for the closest accepted key, or an empty string."""
    close = difflib.get_close_matches(str(key), [str(a) for a in accepted], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def unknown_key(key, accepted, what: str = "key") -> str:
    accepted = sorted(accepted)
    return f"unknown {what} {key!r}{suggest(key, accepted)} (accepted: {', '.join(accepted)})"


class Strict(BaseModel):
    """A frozen model that rejects unknown keys, suggesting the nearest accepted one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data):
        if isinstance(data, dict):
            accepted = set(cls.model_fields)
            for key in data:
                if key not in accepted:
                    raise ValueError(unknown_key(key, accepted))
        return data


def key_path(loc) -> str:
    """('layers', 2, 'conv', 'kernel_size') -> 'layers[2].conv.kernel_size'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part).startswith(("function-", "tagged-union", "union[")):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _message(error: dict) -> str:
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] in ("value_error", "assertion_error", "missing"):
        return message
    return f"{message} (got {error.get('input')!r})"


def validate(model: type[BaseModel], data, source: str):
    """``model.model_validate(data)``; failures become one :class:`ConfigError` naming ``source``."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines, seen = [], set()
        for error in exc.errors():
            line = f"{source}: {key_path(error['loc'])}: {_message(error)}"
            if line not in seen:
                seen.add(line)
                lines.append(line)
        raise ConfigError("\n".join(lines)) from None


def load_yaml(path) -> dict:
    """Read a YAML mapping; a missing file or bad YAML is a :class:`ConfigError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data
