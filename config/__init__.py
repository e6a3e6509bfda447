"""The project's typed-config loader: strict YAML/dict -> dataclass conversion, and the two things
every command line does with configs (dotted `section.field=value` overrides, and resolving a config
file named relative to another one).

Every config object in the project (model shape, training recipe, parallel layout, hardware profile,
simulation recipe) is a dataclass built through `from_dict`, which rejects unknown keys and wrong
types with one clear message that names the field, and then calls the dataclass's own `validate()`
for cross-field rules. This package imports nothing of the project, so `moe`, `parallel`,
`simulator` and `launch` all read YAML through it without importing one another.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration is invalid. The message names the field and how to fix it."""


def require(cond: bool, field_path: str, message: str) -> None:
    """Raise `ConfigError("<field_path>: <message>")` unless `cond`."""
    if not cond:
        raise ConfigError(f"{field_path}: {message}")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against the annotation `tp`; return the converted value or raise ConfigError.
    One dispatch over the annotation kinds (about 60 lines): each branch is a few lines, read together."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"{path}: got {value!r}; allowed: {_type_name(tp)}")
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _coerce(value, arg, path)
            except ConfigError:
                pass
        raise ConfigError(f"{path}: got {value!r} ({type(value).__name__}); expected {_type_name(tp)}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{path}: expected null, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        (_, value_tp) = get_args(tp) or (Any, Any)
        return {k: _coerce(v, value_tp, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML reads "1e-5" without a dot as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        if not math.isfinite(number):  # .nan / .inf would train into NaN or crash deep inside torch
            raise ConfigError(f"{path}: must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    raise ConfigError(f"{path}: unsupported field type {tp!r}")


def from_dict(cls: type[T], data: dict, path: str = "") -> T:
    """Build dataclass `cls` from a mapping, strictly: unknown keys and wrong types are errors."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if f.init}
    prefix = f"{path}." if path else ""
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known fields: {', '.join(known)}"
            raise ConfigError(f"{prefix}{key}: unknown field for {cls.__name__}{hint}")
    kwargs = {}
    for name, f in known.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], prefix + name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix}{name}: required field of {cls.__name__} is missing")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(path)
    return obj


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of fields")
    return data


def parse_overrides(items: list[str], flag: str = "override") -> dict[str, Any]:
    """`["train.steps=20", ...]` -> `{"train.steps": 20}`; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not section or not name:
            raise ConfigError(f"{flag} {item!r}: expected section.field=value, e.g. train.steps=20")
        out[key] = yaml.safe_load(value)
    return out


def apply_overrides(data: dict, overrides: dict[str, Any], where: str = "the config") -> dict:
    """Set each dotted `section.field` (or deeper, `section.sub.field`) of `overrides` in the nested
    mapping `data` (in place), creating the mappings on the way."""
    for dotted, value in (overrides or {}).items():
        *path, key = dotted.split(".")
        if not path or not key or not all(path):
            raise ConfigError(f"override {dotted!r}: use section.field, e.g. train.steps=10")
        node = data
        for depth, name in enumerate(path):
            node.setdefault(name, {})
            if not isinstance(node[name], dict):
                raise ConfigError(f"override {dotted!r}: {'.'.join(path[:depth + 1])} is not a mapping in {where}")
            node = node[name]
        node[key] = value
    return data


def resolve_file(value: str, base: Path) -> Path | None:
    """A config file named `value`, looked up relative to `base` (the referring file's folder) first,
    then to the working directory; None when neither exists."""
    for cand in (Path(base) / value, Path(value)):
        if cand.is_file():
            return cand
    return None
