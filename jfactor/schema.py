"""Config validation: strict pydantic models and errors that name file, key path and value.

Every config model derives from :class:`Strict`, which rejects unknown keys with the
nearest accepted key as a suggestion.  :func:`validate` turns pydantic's errors into one
:class:`ConfigError` whose lines read ``file: layers[2].conv.kernel_size: message (got ...)``.
"""

from __future__ import annotations

import difflib
import re
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


_TYPE_TAGS = {"int", "float", "str", "bool", "list", "dict", "tuple", "none", "literal", "is-instance"}


def _is_validator_tag(part: str) -> bool:
    """pydantic's names for a union member or validator (``constrained-int``, ``list[int]``,
    ``function-after[...]``, ``StackConfig``), which are not config keys."""
    return (part.startswith(("function-", "tagged-union", "union[", "constrained-", "lax-or-strict", "json-or-python"))
            or "[" in part or part in _TYPE_TAGS or part[:1].isupper())


def key_path(loc) -> str:
    """('layers', 2, 'conv', 'kernel_size') -> 'layers[2].conv.kernel_size'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _is_validator_tag(str(part)):
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
        by_key: dict[str, list[dict]] = {}  # the alternatives of a union share a key: one line, "or"
        for error in exc.errors():
            by_key.setdefault(key_path(error["loc"]), []).append(error)
        raise ConfigError("\n".join(f"{source}: {key}: {'; or '.join(_alternatives(errors))}"
                                     for key, errors in by_key.items())) from None


def _alternatives(errors: list[dict]) -> list[str]:
    """The distinct messages of one key's errors; where the value has the type of some alternative
    of a union (its error is about the value, as "greater than 0"), not the others' "should be a
    valid list": those only say the value is not of their type."""
    about_value = [e for e in errors if not e["type"].endswith("_type")]
    messages = []
    for error in about_value or errors:
        if _message(error) not in messages:
            messages.append(_message(error))
    return messages


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses a mapping key written twice (plain YAML keeps the last silently);
    a key that overrides one merged in (``<<: *defaults``) is not written twice."""

    def flatten_mapping(self, node):
        # every mapping passes here before it is built, merged ones too; the first pass rewrites
        # node.value to the merged pairs followed by its own, so only the first pass checks them
        if not getattr(node, "_keys_checked", False):
            self._refuse_repeated_keys(node.value)
            node._keys_checked = True
        super().flatten_mapping(node)

    def _refuse_repeated_keys(self, pairs) -> None:
        seen = {}
        for key_node, _ in pairs:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:
                continue  # an unhashable key: the base loader reports it
            if first is not None:
                where = f"lines {first} and {line}" if first != line else f"line {line}"
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is written twice ({where})",
                                                        key_node.start_mark)
            seen[key] = line


class _Dumper(yaml.SafeDumper):
    """``yaml.SafeDumper`` that quotes the strings :func:`load_yaml_text` would read as floats."""


# YAML 1.2 floats without a dot (1e-3, 2E+1), which PyYAML's YAML 1.1 rules read as strings
for _side in (_UniqueKeyLoader, _Dumper):
    _side.add_implicit_resolver(
        "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"))


def dump_yaml(data) -> str:
    """YAML text that :func:`load_yaml_text` reads back as ``data`` (keys in their order)."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)


def load_yaml_text(text: str):
    """``yaml.safe_load`` that refuses duplicate keys."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line: the problem and where (PyYAML's own text spans several lines)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem


def load_yaml(path) -> dict:
    """Read a YAML mapping; a missing file or bad YAML is a :class:`ConfigError` naming it."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, not a config file")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = load_yaml_text(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a text file (byte {exc.start} is not UTF-8)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data
